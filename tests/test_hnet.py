"""hnet (von Oswald et al. 2020): the look-ahead is Adam's own step, the output regulariser keeps an earlier
task's generated weights at their targets, and Split-Digits task-incremental forgets little."""
import json
from types import SimpleNamespace

import torch

from modnet.cli import main
from modnet.nets.models import Condition
from strategies.plugins.hnet import HNetModel, HNetPlugin, adam_lookahead


def test_adam_lookahead_is_the_step_torch_adam_takes():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5))
    q = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.Adam([p, q], lr=0.01)
    for _ in range(3):  # the first step (empty state) and later ones
        opt.zero_grad()
        ((p ** 3).sum() + (q * torch.arange(3.0)).sum()).backward()
        predicted = adam_lookahead(opt, [p, q])
        before = [p.detach().clone(), q.detach().clone()]
        opt.step()
        for new, old, d in zip([p, q], before, predicted):
            torch.testing.assert_close(new.detach() - old, d, rtol=1e-5, atol=1e-7)


def _planted_task(seed, n=64):
    """4-d Gaussian inputs, label = which side of a planted hyperplane (one per task)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    w = torch.randn(4, generator=g)
    return x, (x @ w > 0).long()


def _train_task(model, plugin, task, x, y, steps, lr=0.01):
    """What the template does per step with the plugin's hooks (Adam, one full batch)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    strategy = SimpleNamespace(model=model, optimizer=opt, loss=None, train_mb_size=len(y),
                               experience=SimpleNamespace(current_experience=task, dataset=range(len(y))),
                               train_condition=Condition(), train_epochs=1)
    plugin.before_training_exp(strategy)
    for _ in range(steps):
        opt.zero_grad()
        strategy.loss = torch.nn.functional.cross_entropy(model.task_logits(x, task), y)
        strategy.loss.backward()
        plugin.after_backward(strategy)
        plugin.before_update(strategy)
        opt.step()
    plugin.after_training_exp(strategy)


def _accuracy(model, task, x, y):
    with torch.no_grad():
        return float((model.task_logits(x, task).argmax(1) == y).float().mean())


def test_regulariser_keeps_the_earlier_tasks_generated_weights(tmp_path):
    """Train task 0, store the weights the hypernetwork generates for it (our own forward, not hypnettorch's
    target helper), train task 1 (a different planted rule): with beta the task-0 weights stay near their
    stored values and task 0 stays solved; without it they drift far."""
    (x0, y0), (x1, y1) = _planted_task(1), _planted_task(2)
    drift, acc0 = {}, {}
    for beta in (0.0, 0.05):
        torch.manual_seed(0)
        model = HNetModel(4, [[0, 1], [2, 3]], main_layers=[16], chunk_size=100, hnet_layers=[16, 16],
                          emb_size=8, chunk_emb_size=8)
        plugin = HNetPlugin(beta=beta, lookahead=True, iterations=None)
        _train_task(model, plugin, 0, x0, y0, steps=300)
        assert _accuracy(model, 0, x0, y0) > 0.95
        with torch.no_grad():
            stored = torch.cat([w.flatten() for w in model.hnet(cond_id=0)])
        emb0 = model.hnet.conditional_params[0].detach().clone()
        _train_task(model, plugin, 1, x1, y1, steps=300)
        assert _accuracy(model, 1, x1, y1) > 0.95
        torch.testing.assert_close(model.hnet.conditional_params[0].detach(), emb0)  # e_0 is not trained on
        with torch.no_grad():
            now = torch.cat([w.flatten() for w in model.hnet(cond_id=0)])
        drift[beta] = float((now - stored).norm() / stored.norm())
        acc0[beta] = _accuracy(model, 0, x0, y0)
    assert drift[0.05] < 0.2 * drift[0.0], drift
    assert acc0[0.05] > 0.95


def test_hnet_forgets_little_on_split_digits_task_incremental(tmp_path):
    """Split-Digits, 5 tasks of 2 digits, the paper's configuration with a shorter loop (100 steps a task). Its
    main network's drift is recorded as every strategy's (hnet had no CKA plot: no layers of its own to hook)."""
    assert main(["cl", "strategies=[hnet]", "hnet.iterations=100", f"output_dir={tmp_path}",
                 "progress=false"]) == 0
    r = json.loads((tmp_path / "results.json").read_text())["strategies"]["hnet"]
    assert r["forgetting"] < 0.02
    assert r["average_accuracy"] > 0.95
    assert len(r["first_experience_cka"]) == 2 and (tmp_path / "cka_hnet_seed0.png").exists()


def test_hnet_task_units_are_the_hidden_layers_its_output_is_computed_from():
    """task_units: the main MLP's hidden layers under the task's generated weights; hypnettorch's own forward of
    the last layer on the last of them gives the network's output (the same layers, in order, with their ReLU)."""
    torch.manual_seed(0)
    model = HNetModel(6, [[0, 1], [2, 3]], main_layers=[16, 12], chunk_size=100, hnet_layers=[16], emb_size=8,
                      chunk_emb_size=8)
    x = torch.randn(9, 6)
    with torch.no_grad():
        hidden = model.task_units(x, 1)
        weights = model.hnet(cond_id=1)
        out = model.mnet(x, weights=weights)
    assert [tuple(h.shape) for h in hidden] == [(9, 16), (9, 12)] and all((h >= 0).all() for h in hidden)
    torch.testing.assert_close(torch.nn.functional.linear(hidden[-1], weights[-2], weights[-1]), out)


def test_plugin_regularises_the_weights_after_adams_look_ahead_step():
    """HNetPlugin's gradient on task 1 (von Oswald et al. 2020, eq. 2 with the look-ahead): the task loss's plus
    beta d/dtheta ||f_h(e_0, theta + dtheta) - W*_0||^2, dtheta Adam's next step from the task gradient (detached),
    W*_0 the weights generated for task 0 before task 1, written out here; with lookahead=False the same without
    dtheta, and the two differ (a plugin ignoring lookahead passed every other test)."""
    (x0, y0), (x1, y1) = _planted_task(1), _planted_task(2)
    torch.manual_seed(0)
    model = HNetModel(4, [[0, 1], [2, 3]], main_layers=[16], chunk_size=100, hnet_layers=[16, 16], emb_size=8,
                      chunk_emb_size=8)
    _train_task(model, HNetPlugin(beta=0.05, iterations=None), 0, x0, y0, steps=30)
    with torch.no_grad():
        target = torch.cat([w.flatten() for w in model.hnet(cond_id=0)])
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    strategy = SimpleNamespace(model=model, optimizer=opt, loss=None, train_mb_size=len(y1),
                               experience=SimpleNamespace(current_experience=1, dataset=range(len(y1))),
                               train_condition=Condition(), train_epochs=1)
    theta = list(model.hnet.unconditional_params)
    grads = {}
    for lookahead in (True, False):
        plugin = HNetPlugin(beta=0.05, lookahead=lookahead, iterations=None)
        plugin.before_training_exp(strategy)
        opt.zero_grad()
        strategy.loss = torch.nn.functional.cross_entropy(model.task_logits(x1, 1), y1)
        strategy.loss.backward()
        task_grad = [p.grad.clone() for p in theta]
        step = adam_lookahead(opt, theta) if lookahead else [torch.zeros_like(p) for p in theta]
        plugin.after_backward(strategy)
        grads[lookahead] = [p.grad.clone() for p in theta]
        moved = [(p + d).detach().requires_grad_() for p, d in zip(theta, step)]
        generated = torch.cat([w.flatten() for w in model.hnet(cond_id=0, weights={"uncond_weights": moved})])
        reg_grad = torch.autograd.grad(((generated - target) ** 2).sum(), moved)
        for got, g_task, g_reg in zip(grads[lookahead], task_grad, reg_grad):
            torch.testing.assert_close(got, g_task + 0.05 * g_reg, rtol=1e-4, atol=1e-7)
    assert any(not torch.allclose(a, b) for a, b in zip(grads[True], grads[False]))
