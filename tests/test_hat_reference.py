"""HAT's reference training loop (joansj/hat approaches/hat.py) as a plugin, and HAT's forgetting ratio."""
import types

import pytest
import torch
from torch import nn

from modnet.eval.results import add_forgetting_ratio, forgetting_ratio
from strategies.plugins.validation import ValidationSchedulePlugin, split_validation


class _FakeStrategy:
    """What the plugin touches: a model, an optimiser, stop_training."""

    def __init__(self, lr=0.05):
        self.model = nn.Linear(2, 1)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=lr)
        self.stopped_at = None
        self.epoch = 0

    def stop_training(self):
        self.stopped_at = self.epoch


def _run_epochs(plugin, strategy, losses):
    """Epoch e sets every weight to e (what training would have changed) and sees validation loss losses[e]."""
    lrs = []
    plugin.before_training_exp(strategy)
    for e, loss in enumerate(losses):
        strategy.epoch = e
        with torch.no_grad():
            for p in strategy.model.parameters():
                p.fill_(float(e))
        plugin.validation_loss = types.MethodType(lambda self, s, v=loss: v, plugin)
        plugin.after_training_epoch(strategy)
        lrs.append(strategy.optimizer.param_groups[0]["lr"])
        if strategy.stopped_at is not None:
            break
    plugin.after_training_exp(strategy)
    return lrs


def test_lr_schedule_matches_the_reference_rule_by_hand():
    """Reference: patience 5; a worse epoch costs one; at 0 the rate is divided by 3 and patience is reset;
    a better epoch resets patience; training stops when the divided rate would be under lr_min."""
    plugin = ValidationSchedulePlugin(fraction=0.1, lr_patience=2, lr_factor=3.0, lr_min=0.005)
    strategy = _FakeStrategy(lr=0.09)
    # epoch:   0    1    2    3    4    5    6    7
    losses = [1.0, 0.5, 0.6, 0.7, 0.4, 0.9, 0.9, 0.9]
    lrs = _run_epochs(plugin, strategy, losses)
    # 0: best; 1: best; 2: patience 1; 3: patience 0 -> 0.03; 4: best (patience 2); 5: 1; 6: 0 -> 0.01;
    # 7: patience 1
    assert lrs == pytest.approx([0.09, 0.09, 0.09, 0.03, 0.03, 0.03, 0.01, 0.01])
    assert strategy.stopped_at is None
    strategy = _FakeStrategy(lr=0.09)
    lrs = _run_epochs(plugin, strategy, [1.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0])
    # 2: 0.03, 4: 0.01, 6: 0.0033 < 0.005 -> stop (the rate is not lowered)
    assert strategy.stopped_at == 6 and lrs == pytest.approx([0.09, 0.09, 0.03, 0.03, 0.01, 0.01, 0.01])
    # the next experience starts at the initial rate again
    plugin.before_training_exp(strategy)
    assert strategy.optimizer.param_groups[0]["lr"] == pytest.approx(0.09)


def test_restore_best_returns_the_weights_of_the_best_validation_epoch():
    plugin = ValidationSchedulePlugin(fraction=0.1, lr_patience=None, restore_best=True)
    strategy = _FakeStrategy()
    _run_epochs(plugin, strategy, [3.0, 1.0, 0.7, 2.0, 0.9])
    assert all(torch.all(p == 2.0) for p in strategy.model.parameters())
    plugin = ValidationSchedulePlugin(fraction=0.1, lr_patience=None, restore_best=False)
    strategy = _FakeStrategy()
    _run_epochs(plugin, strategy, [3.0, 1.0, 0.7, 2.0, 0.9])
    assert all(torch.all(p == 4.0) for p in strategy.model.parameters())


def test_validation_split_is_a_disjoint_tenth():
    train, val = split_validation(250, 0.1, torch.Generator().manual_seed(0))
    assert len(val) == 25 and len(train) == 225 and not set(train) & set(val)
    assert sorted(train + val) == list(range(250))
    assert split_validation(250, 0.0, torch.Generator().manual_seed(0))[1] == []


def test_the_reference_loop_runs_in_a_cl_run_and_holds_out_data(tmp_path):
    from modnet.cli import main

    assert main(["cl", "strategies=[modnet]", "train.epochs=30",
                 "train.valid_fraction=0.1", "train.lr_patience=5", "train.restore_best=true",
                 "modules.profile_samples=64", f"output_dir={tmp_path}", "progress=false"]) == 0
    import json

    s = json.loads((tmp_path / "results.json").read_text())["strategies"]
    assert s["modnet"]["average_accuracy"] >= 0.9 and s["modnet"]["forgetting"] <= 0.01


def test_forgetting_ratio_by_hand():
    R = [[0.9, 0.1], [0.8, 0.95]]
    joint = [0.9, 1.0]
    # task 0: (0.8 - 0.5) / (0.9 - 0.5) = 0.75; task 1: (0.95 - 0.5) / (1.0 - 0.5) = 0.9; mean 0.825
    assert forgetting_ratio(R, joint, [2, 2]) == pytest.approx(0.825 - 1)
    strategies = {"a": {"accuracy_matrix": R}, "cumulative": {"accuracy_matrix": [[0.9, 0.2], joint]}}
    add_forgetting_ratio(strategies, [2, 2])
    assert strategies["a"]["rho"] == pytest.approx(-0.175) and strategies["cumulative"]["rho"] == 0.0
    without = {"a": {"accuracy_matrix": R}}
    add_forgetting_ratio(without, [2, 2])
    assert "rho" not in without["a"]
    # two seeds: rho seed by seed (-0.175 and R's second seed, which equals the joint: 0), their mean and their
    # population std, the convention of every _std in the results (0.0875; the sample std would be 0.124)
    two = {"a": {"per_seed": [{"accuracy_matrix": R}, {"accuracy_matrix": [[0.9, 0.2], joint]}]},
           "cumulative": {"per_seed": [{"accuracy_matrix": [[0.9, 0.2], joint]}] * 2}}
    add_forgetting_ratio(two, [2, 2])
    assert two["a"]["rho"] == pytest.approx(-0.0875) and two["a"]["rho_std"] == pytest.approx(0.0875)
