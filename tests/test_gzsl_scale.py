"""GZSL at the real data size: the planted xlsa17 generator (scenarios/planted_xlsa17.py), gzsl's large_train
block, and ALE's written-out gradient against autograd of its loss."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from torch.nn import functional as F

from modnet.cli import main
from modnet.config import ConfigError, compose
from modnet.jobs.gzsl import with_large_train
from modnet.methods.gzsl import ALE
from scenarios.planted_xlsa17 import write_planted_xlsa17
from scenarios.zsl import load_xlsa17

AWA2 = Path(__file__).parent / "data" / "zsl" / "AWA2"


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    out = tmp_path_factory.mktemp("planted_awa2")
    info = write_planted_xlsa17(AWA2 / "att_splits.mat", out, n_features=64, noise=0.5, per_class=30, seed=3)
    return out, info


def test_planted_folder_follows_the_real_split(planted):
    out, info = planted
    data = load_xlsa17(out)
    split = scipy.io.loadmat(str(AWA2 / "att_splits.mat"))
    names = [str(c[0][0]) for c in split["allclasses_names"]]
    unseen = sorted(names.index(line.split()[-1]) for line in (AWA2 / "testclasses.txt").read_text().split("\n")
                    if line.strip())
    assert data.unseen_classes == unseen == info["unseen"] and len(data.seen_classes) == 40
    assert data.x_train.shape[1] == 64 and info["n"] == 50 * 30
    assert set(data.y_test_unseen.tolist()) == set(unseen)
    assert not set(data.y_train.tolist()) & set(unseen) and not set(data.y_test_seen.tolist()) & set(unseen)
    counts = np.bincount(np.concatenate([data.y_train, data.y_test_seen, data.y_test_unseen]), minlength=50)
    assert counts.tolist() == [30] * 50
    # every seen class keeps training and test-seen images (the first 30 images of a class could all be trainval)
    assert set(data.y_train.tolist()) == set(data.y_test_seen.tolist()) == set(data.seen_classes)


def test_a_seen_class_without_test_samples_stops_in_one_line(planted):
    """A split where a seen class has no test-seen image: one ValueError naming the class (it used to be a
    KeyError inside Avalanche's nc_benchmark), from the data and from split_benchmark alike."""
    from dataclasses import replace

    from scenarios.base import split_benchmark

    data = load_xlsa17(planted[0])
    gone = data.seen_classes[3]
    keep = data.y_test_seen != gone
    with pytest.raises(ValueError, match=rf"seen classes \[{gone}\] have no test_seen samples") as error:
        replace(data, x_test_seen=data.x_test_seen[keep], y_test_seen=data.y_test_seen[keep]).validate()
    assert "\n" not in str(error.value)
    x, y = torch.zeros(6, 2), torch.tensor([0, 0, 1, 1, 2, 2])
    with pytest.raises(ValueError, match=r"classes \[2\] have training but no test samples"):
        split_benchmark("toy", x, y, x[:4], y[:4], 1, "task", 0)


def test_planted_class_means_are_a_linear_map_of_the_attributes(planted):
    """Least squares from the seen classes' attributes to their mean features places the unseen classes: the
    nearest predicted mean classifies the unseen test images."""
    data = load_xlsa17(planted[0])
    att = data.attributes.double()
    seen = torch.tensor(data.seen_classes)
    means = torch.stack([data.x_train[data.y_train == c].double().mean(0) for c in data.seen_classes])
    design = torch.cat([att[seen], torch.ones(len(seen), 1, dtype=torch.float64)], 1)
    mix = torch.linalg.lstsq(design, means).solution
    unseen = torch.tensor(data.unseen_classes)
    predicted = torch.cat([att[unseen], torch.ones(len(unseen), 1, dtype=torch.float64)], 1) @ mix
    guess = unseen[torch.cdist(data.x_test_unseen.double(), predicted).argmin(1)]
    assert (guess == data.y_test_unseen).double().mean() > 0.8


def test_large_train_applies_from_min_samples_on():
    cfg = compose("gzsl", ["large_train.min_samples=100", "large_train.epochs=null"])

    class Data:
        def __init__(self, n):
            self.x_train = torch.zeros(n, 3)

    small, large = with_large_train(cfg, Data(99)), with_large_train(cfg, Data(100))
    assert small is cfg
    assert (large.train.batch_size, large.train.lr) == (cfg.large_train.batch_size, cfg.large_train.lr)
    assert large.train.epochs == cfg.train.epochs and cfg.train.batch_size != cfg.large_train.batch_size
    assert with_large_train(compose("gzsl", ["large_train.min_samples=null"]), Data(10 ** 6)).train == cfg.train


def test_large_train_sets_clswgan_sizes_and_ale_search():
    cfg = compose("gzsl", ["large_train.min_samples=100", "large_train.clswgan.hidden=32",
                           "large_train.clswgan.epochs=null"])

    class Data:
        def __init__(self, n):
            self.x_train = torch.zeros(n, 3)

    assert with_large_train(cfg, Data(99)).clswgan == cfg.clswgan
    large = with_large_train(cfg, Data(100)).clswgan
    assert large.hidden == 32 != cfg.clswgan.hidden
    assert large.epochs == cfg.clswgan.epochs  # null keeps the clswgan block's value
    assert large.syn_num == cfg.large_train.clswgan.syn_num
    assert cfg.clswgan.features is None and large.features == "penultimate"  # CPU sizes: the network's features
    ale = with_large_train(cfg, Data(100)).ale
    assert ale.search is True and cfg.ale.search is False  # large sets pick ALE's lr on the validation split
    from modnet.zsl.ale import candidates

    assert candidates(cfg) == [{"ale_lr": cfg.ale.lr}]
    assert candidates(with_large_train(cfg, Data(100))) == [{"ale_lr": lr} for lr in cfg.ale.lr_grid]


def _ale_by_autograd(ale: ALE, x, y, knowledge, seen, uniform: bool = False):
    """ALE's minibatch SGD on its loss as the class documents it, gradients by autograd; ``uniform``: every
    violation weighted 1 (DeViSE's hinge rank loss, as its docstring states)."""
    generator = torch.Generator().manual_seed(ale.seed)
    s = knowledge.float()[seen]
    position = torch.full((knowledge.shape[0],), -1, dtype=torch.long)
    position[seen] = torch.arange(len(seen))
    target = position[y]
    W = (0.01 * torch.randn(x.shape[1], s.shape[1], generator=generator)).requires_grad_(True)
    optimizer = torch.optim.SGD([W], lr=ale.lr, weight_decay=ale.weight_decay)
    harmonic = torch.cumsum(1.0 / torch.arange(1, len(seen) + 1, dtype=torch.float32), 0)
    for _ in range(ale.epochs):
        order = torch.randperm(x.shape[0], generator=generator)
        for start in range(0, x.shape[0], ale.batch_size):
            idx = order[start:start + ale.batch_size]
            f = x[idx] @ W @ s.T
            violation = F.relu(ale.margin + f - f.gather(1, target[idx, None])).scatter(1, target[idx, None], 0.0)
            rank = (violation > 0).sum(1)
            weight = torch.where(rank > 0, harmonic[(rank - 1).clamp(min=0)] / rank.clamp(min=1), 0.0)
            if uniform:
                weight = torch.ones_like(weight)
            loss = (weight.detach() * violation.sum(1)).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return W.detach()


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_ale_gradient_matches_autograd_of_its_loss(weight_decay):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(300, 20, generator=g), torch.randint(0, 6, (300,), generator=g)
    knowledge = torch.randn(8, 5, generator=g)
    ale = ALE(lr=0.05, epochs=3, batch_size=32, weight_decay=weight_decay, seed=1).fit(x, y, knowledge, range(6))
    torch.testing.assert_close(ale.W, _ale_by_autograd(ale, x, y, knowledge, list(range(6))), atol=1e-6, rtol=0)


def test_gzsl_on_a_planted_awa2_folder_uses_large_train(planted, tmp_path, monkeypatch):
    """End to end on a small planted AWA2 folder (960 training images) with large_train switched on: every
    method reports, the linear ones place the unseen classes (U well above chance, 0.1; NIWT needs the
    real size, see configs/gzsl.yaml), the saved config holds large_train's batches and epochs, and the network
    has the benchmark's width (benchmark.hidden, here small for speed)."""
    import modnet.jobs.gzsl as gzsl_job

    ran_on, run_seed = [], gzsl_job.run_seed

    def recording_run_seed(*args, **kwargs):  # the threads the seed's training and methods run on
        ran_on.append(torch.get_num_threads())
        return run_seed(*args, **kwargs)

    monkeypatch.setattr(gzsl_job, "run_seed", recording_run_seed)
    before = torch.get_num_threads()
    out = tmp_path / "out"
    assert main(["gzsl", "benchmark=awa2", f"benchmark.path={planted[0]}", "progress=false", "threads=1",
                 "benchmark.hidden=48",
                 "large_train.min_samples=500", "large_train.batch_size=32", "large_train.epochs=10",
                 "niwt.map_epochs=100", "niwt.max_iterations=100", "ale.epochs=5", "eszsl.grid_log10=[-1,0]",
                 "calibration.mode=validate", "methods=[niwt,eszsl,ale]", "large_train.threads=2",
                 f"output_dir={out}"]) == 0
    assert ran_on == [2]  # large_train's threads, not threads=1
    assert torch.get_num_threads() == before  # and the job gives the process its threads back
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == {"niwt", "eszsl", "ale"}
    for name in ("eszsl", "ale"):
        assert results["methods"][name]["U"] > 0.3, name
    saved = (out / "config.yaml").read_text()
    assert "batch_size: 32" in saved and "epochs: 10" in saved and "\nthreads: 2\n" in saved
    assert [layer["units"] for layer in results["network"]["layers"]] == [48, 48]
    # baseline_features=auto: on awa2 ESZSL reads the res101 features themselves (Xian et al.): its figures are
    # those of ESZSL fitted here on the raw training features with the pair validation chose
    from modnet.methods.gzsl import ESZSL, gzsl_evaluate

    data = load_xlsa17(planted[0])
    chosen = results["methods"]["eszsl"]["setting_per_seed"][0]
    eszsl = ESZSL(chosen["eszsl_gamma"], chosen["eszsl_lambda"]).fit(data.x_train, data.y_train, data.attributes,
                                                                     data.seen_classes)
    direct = gzsl_evaluate(eszsl.scores(data.x_test_seen), data.y_test_seen, eszsl.scores(data.x_test_unseen),
                           data.y_test_unseen, data.seen_classes, data.unseen_classes)
    assert results["methods"]["eszsl"]["uncalibrated"]["H"] == pytest.approx(direct.H, abs=1e-6)


def test_large_train_sets_the_threads_of_large_runs_only():
    """large_train.threads (default null: torch's default, every core) replaces threads on a training set of
    min_samples or more; a smaller one keeps threads (1: small networks run fastest on one core)."""
    from types import SimpleNamespace

    cfg = compose("gzsl", [])
    at = int(cfg.large_train.min_samples)
    assert with_large_train(cfg, SimpleNamespace(x_train=torch.zeros(at, 1))).threads is None
    assert with_large_train(cfg, SimpleNamespace(x_train=torch.zeros(at - 1, 1))).threads == 1
    assert cfg.threads == 1  # on a copy
    two = compose("gzsl", ["large_train.threads=2"])
    assert with_large_train(two, SimpleNamespace(x_train=torch.zeros(at, 1))).threads == 2
    from modnet.validate import validate

    with pytest.raises(ConfigError, match="large_train.threads"):
        validate("gzsl", compose("gzsl", ["large_train.threads=0"]))


def test_benchmark_hidden_sets_the_width_of_the_runs_networks_where_the_benchmark_names_one(capsys):
    from modnet.jobs.gzsl import with_benchmark_width

    awa2 = compose("gzsl", ["benchmark=awa2"])
    assert awa2.benchmark.hidden == 1024 and with_benchmark_width(awa2).model.hidden == 1024
    assert awa2.model.hidden == 256                                                    # on a copy
    assert with_benchmark_width(compose("gzsl", ["benchmark=cub"])).model.hidden == 1024
    assert with_benchmark_width(compose("gzsl", ["benchmark=awa2", "benchmark.hidden=null",
                                                 "model.hidden=128"])).model.hidden == 128
    assert with_benchmark_width(compose("gzsl", ["benchmark=npz"])).model.hidden == 256  # npz: null
    assert "hidden" not in compose("gzsl").benchmark                                    # digits: model.hidden
    assert main(["gzsl", "benchmark=awa2", "benchmark.path=nowhere", "benchmark.hidden=0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "benchmark.hidden=0 must be a positive integer" in err[0], err


def test_baseline_features_auto_reads_backbone_features_and_pixels_through_the_network():
    from modnet.zsl.seen_network import baseline_feature_kind

    assert baseline_feature_kind(compose("gzsl", ["benchmark=awa2"])) == "input"
    assert baseline_feature_kind(compose("gzsl", ["benchmark=cub"])) == "input"
    assert baseline_feature_kind(compose("gzsl")) == "penultimate"                       # digits: pixels
    assert baseline_feature_kind(compose("gzsl", ["benchmark=npz"])) == "penultimate"
    assert baseline_feature_kind(compose("gzsl", ["benchmark=npz", "benchmark.backbone_features=true"])) == "input"
    assert baseline_feature_kind(compose("gzsl", ["benchmark=awa2", "baseline_features=penultimate"])) == "penultimate"
    cfg = compose("gzsl", ["benchmark=awa2"])
    assert baseline_feature_kind(cfg, cfg.clswgan.features) == "input"                  # null: baseline_features
    assert baseline_feature_kind(cfg, "penultimate") == "penultimate"


def test_devise_gradient_matches_autograd_of_the_hinge_rank_loss():
    from modnet.methods.gzsl import DeViSE

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(300, 20, generator=g), torch.randint(0, 6, (300,), generator=g)
    knowledge = DeViSE.unit_knowledge(torch.randn(8, 5, generator=g))
    assert torch.allclose(knowledge.norm(dim=1), torch.ones(8))
    model = DeViSE(lr=0.5, epochs=3, batch_size=32, margin=0.1, seed=1).fit(x, y, knowledge, range(6))
    torch.testing.assert_close(model.W, _ale_by_autograd(model, x, y, knowledge, list(range(6)), uniform=True),
                               atol=1e-6, rtol=0)
    # and it is not ALE: the rank weights differ once a sample violates more than one class
    ale = ALE(lr=0.5, epochs=3, batch_size=32, margin=0.1, seed=1).fit(x, y, knowledge, range(6))
    assert (model.W - ale.W).abs().max() > 1e-3


def test_devise_places_unseen_classes_of_a_planted_compatibility():
    """Features whose class means are a fixed linear map of the classes' knowledge: DeViSE fitted on 6 seen
    classes ranks the 4 unseen ones well above chance (0.25) over the unseen classes."""
    from modnet.methods.gzsl import DeViSE

    g = torch.Generator().manual_seed(3)
    n_seen, n_unseen, a, d = 6, 4, 8, 30
    knowledge = torch.randn(n_seen + n_unseen, a, generator=g)
    A = torch.randn(a, d, generator=g)
    y = torch.arange(n_seen + n_unseen).repeat_interleave(60)
    x = DeViSE.unit_knowledge(knowledge)[y] @ A + 0.3 * torch.randn(len(y), d, generator=g)
    seen, unseen = list(range(n_seen)), list(range(n_seen, n_seen + n_unseen))
    train = y < n_seen
    model = DeViSE(lr=0.5, epochs=30, margin=0.1, seed=0).fit(x[train], y[train], DeViSE.unit_knowledge(knowledge),
                                                             seen)
    zsl = (model.scores(x[~train])[:, unseen].argmax(1) + n_seen == y[~train]).float().mean()
    assert zsl > 0.6, zsl
