"""Scale-out: 2-process gloo DDP on CPU, a 2-worker joblib Hydra sweep, and the mean +- std aggregation.

References independent of the code under test: hand-computed means/stds of planted numbers, Python's
``statistics`` module on the jobs' own results.json files, the single-process run of the same global batches
(DDP must reproduce it), and bitwise equality of the ranks' parameters.
"""
from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import math
import os
import socket
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# digits, 2 task-incremental experiences of 5 classes (chance 0.2). 1256 training samples make both
# experiences even-sized (634, 622), so 2 ranks x 8 samples cover exactly the global batches of 1 x 16.
SMALL = ["benchmark.n_experiences=2", "benchmark.max_train_samples=1256",
         "train.lr=0.2", "train.batch_size=16", "hat.smax=50", "progress=false", "device=cpu", "threads=1",
         "seed=0"]
# HAT alone: its masks are smooth in the weights, so equal global batches give equal parameters up to float
# summation order (hard top-k module gates would amplify those last bits into different gate decisions).
# EWC rides along: its penalty reaches the old heads outside the forward, so its ranks average .grad with one
# all-reduce after backward instead of DDP's hooks (declared per strategy: register_strategy(gradient_sync=...)): both paths are checked.
# modnet without transform heads goes through DDP's hooks; the default one (MODNET: transform heads, whose loss
# runs outside DDP's forward) through the all-reduce
# naive (Avalanche's multi-head model, through DDP's hooks) has one head in its first experience: every step
# reaches every parameter and DDP runs without find_unused_parameters there (with it in the second)
HAT_ONLY = [*SMALL, "strategies=[modnet,ewc,naive]", "train.epochs=2", "model.modules=none", "model.gate=none",
            "model.task_keys=false", "model.transform_heads=never"]
# the default modnet: modules, gates, task keys (hard gates learn more slowly than HAT alone at lr 0.2 on 628
# samples per task: one epoch sits near chance on some seeds)
MODNET = [*SMALL, "strategies=[modnet]", "train.epochs=2", "train.lr=0.05"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """One rank: the data-parallel job for both configs, saving its final models for the parent."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    import modnet.runner.distributed as md
    from modnet.config import compose

    train = md.train_strategy

    def train_and_save(name, cfg, info, seed, ctx):
        result, model = train(name, cfg, info, seed, ctx)
        torch.save(model.state_dict(), Path(cfg.output_dir) / f"{name}_rank{ctx.rank}.pt")
        return result, model

    md.train_strategy = train_and_save  # run_ddp looks it up at call time
    ctx = md.init_distributed("cpu", rank=rank, world_size=world_size)
    assert ctx.backend == "gloo" and ctx.world_size == world_size
    for name, overrides in (("hat", HAT_ONLY), ("modnet", MODNET)):
        (Path(out_dir) / name).mkdir(exist_ok=True)
        md.run_ddp(compose("cl", [*overrides, f"output_dir={out_dir}/{name}"]), ctx)
    dist.destroy_process_group()


def _assert_same_ranks(run_dir: Path, strategy: str) -> dict:
    rank0 = torch.load(run_dir / f"{strategy}_rank0.pt", weights_only=True)
    rank1 = torch.load(run_dir / f"{strategy}_rank1.pt", weights_only=True)
    assert rank0.keys() == rank1.keys()
    for k in rank0:  # gradients are all-reduced, then the same HAT operations run: bit-identical
        assert torch.equal(rank0[k], rank1[k]), k
    return rank0


def test_ddp_two_gloo_ranks_stay_identical_and_match_one_process(tmp_path, capfd):
    import torch.multiprocessing as mp

    from modnet.config import compose
    from modnet.runner.distributed import DistContext, train_strategy
    from scenarios import build_benchmark

    # Reference: one process drawing the same global batches of 16 (same sampler, world size 1, no DDP).
    # Run first: it also imports Avalanche, which the forked ranks then share instead of re-importing.
    cfg = compose("cl", HAT_ONLY)
    info = build_benchmark(cfg.benchmark, cfg.scenario, cfg.seed)
    assert all(len(e.dataset) % 2 == 0 for e in info.benchmark.train_stream)
    single = {name: train_strategy(name, cfg, info, cfg.seed, DistContext()) for name in cfg.strategies}

    capfd.readouterr()
    mp.start_processes(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    # DDP's own warning (C++, on the ranks' stderr) where find_unused_parameters searched a step that used every
    # parameter: naive's first experience printed it on both ranks before the flag followed the model
    assert "did not find any unused parameters" not in capfd.readouterr().err
    for run, strategies in (("hat", ["modnet", "ewc", "naive"]), ("modnet", ["modnet"])):
        results = json.loads((tmp_path / run / "results.json").read_text())
        assert (results["world_size"], results["backend"], results["per_rank_batch_size"]) == (2, "gloo", 8)
        for name in strategies:
            r = results["strategies"][name]
            assert len(r["accuracy_matrix"]) == 2
            assert r["average_accuracy"] > 0.4, (run, name)  # 2 x chance after 1-2 epochs
            params = _assert_same_ranks(tmp_path / run, name)
            if run != "hat":
                continue
            # DDP's (modnet) or the all-reduce's (ewc) averaged gradient is the gradient of the global batch
            ref_result, ref_model = single[name]
            for k, v in ref_model.state_dict().items():
                scale = max(1.0, float(v.abs().max())) if v.is_floating_point() else 1.0
                assert float((v - params[k]).abs().max()) <= 1e-3 * scale, (name, k)
            assert torch.allclose(torch.tensor(ref_result["accuracy_matrix"]),
                                  torch.tensor(r["accuracy_matrix"]), atol=0.01)
    # HAT's masks freeze the units of task 0: nothing forgotten
    hat = json.loads((tmp_path / "hat" / "results.json").read_text())["strategies"]["modnet"]
    assert hat["forgetting"] == pytest.approx(0.0, abs=1e-6)


def test_ddp_searches_for_unused_parameters_only_where_a_step_can_leave_one_out():
    """``reaches_every_parameter`` (which turns DDP's find_unused_parameters off) against autograd: a forward and
    backward on a batch of the given tasks, then which parameters got no gradient."""
    from types import SimpleNamespace

    from modnet.nets.models import HATMLP, MLPBackbone, MultiHeadNet, SingleHeadNet, reaches_every_parameter

    def every_parameter_reached(model, x, task=None):
        model.zero_grad(set_to_none=True)
        (model(x) if task is None else model(x, torch.full((x.shape[0],), task))).sum().backward()
        return all(p.grad is not None for p in model.parameters())

    torch.manual_seed(0)
    x = torch.rand(6, 5)
    single = SingleHeadNet(MLPBackbone(5, 8, 1), 4)
    assert reaches_every_parameter(single, [0]) and every_parameter_reached(single, x)
    multi = MultiHeadNet(MLPBackbone(5, 8, 1))
    multi.classifier.adaptation(SimpleNamespace(classes_in_this_experience=[0, 1], task_labels=[0], dataset=None))
    assert reaches_every_parameter(multi, [0]) and every_parameter_reached(multi, x, 0)
    # a data set of two tasks: a batch of one of them leaves the other's head out
    assert not reaches_every_parameter(multi, [0, 1])
    multi.classifier.adaptation(SimpleNamespace(classes_in_this_experience=[2, 3], task_labels=[1], dataset=None))
    assert not reaches_every_parameter(multi, [1]) and not every_parameter_reached(multi, x, 1)
    assert not every_parameter_reached(multi, x, 0)
    # the modular network: the heads of the tasks still to come get no gradient from the first
    hat = HATMLP(5, [[0, 1], [2, 3]], hidden=8, n_layers=1)
    assert not reaches_every_parameter(hat, [0]) and not every_parameter_reached(hat, x, 0)


def test_ddp_rank_0_prints_a_line_per_experience(capsys):
    """`modnet ddp` printed nothing per experience where `modnet cl` prints a line (README: one line per step in
    logs); rank 0 now prints cl's line with the mean accuracy the matrix records, another rank nothing."""
    from modnet.config import compose
    from modnet.runner.distributed import DistContext, train_strategy
    from scenarios import build_benchmark

    cfg = compose("cl", [*HAT_ONLY, "strategies=[naive]"])
    info = build_benchmark(cfg.benchmark, cfg.scenario, cfg.seed)
    capsys.readouterr()
    result, _ = train_strategy("naive", cfg, info, cfg.seed, DistContext())
    out = capsys.readouterr().out
    for i, row in enumerate(result["accuracy_matrix"]):
        assert f"[naive seed {cfg.seed}] experience {i + 1}/2 trained: mean accuracy on the {i + 1} seen " \
               f"{sum(row[:i + 1]) / (i + 1):.4f}" in out
    train_strategy("naive", cfg, info, cfg.seed, dataclasses.replace(DistContext(), rank=1))
    assert "experience 1/2 trained" not in capsys.readouterr().out


def test_ddp_says_when_an_epoch_repeats_samples_to_split_them_evenly(monkeypatch, capsys):
    """An experience of 7 samples on 2 ranks: as torch's DistributedSampler, the epoch's order is padded to 8,
    one sample repeated, where one process trains 7 (the README's exception to "one process's steps"); rank 0
    says so, rank 1 does not, and an even experience needs no line."""
    import modnet.runner.distributed as md
    from avalanche.training.plugins import EvaluationPlugin

    from modnet.config import compose
    from modnet.runner.runner import make_strategy
    from scenarios.base import split_benchmark

    cfg = compose("cl", [*HAT_ONLY, "strategies=[naive]", "train.batch_size=4"])
    y = torch.tensor([0, 1, 0, 1, 0, 1, 0, 2, 3, 2, 3, 2, 3, 2])  # 7 samples of classes 0/1, 7 of 2/3
    x = torch.randn(len(y), 64)
    info = split_benchmark("planted", x[:-1], y[:-1], x, y, 2, "task", 0)  # training: 7 and 6 samples
    strategy = md.make_distributed(make_strategy("naive", cfg, info, torch.device("cpu"),
                                                 EvaluationPlugin(loggers=[])))
    monkeypatch.setattr(md, "_shared_seed", lambda device: 0)
    for rank, (exp, line) in itertools.product((0, 1), zip(info.benchmark.train_stream, (True, False))):
        monkeypatch.setattr(md, "_rank_world", lambda rank=rank: (rank, 2))
        strategy.adapted_dataset = exp.dataset
        capsys.readouterr()
        strategy.make_train_dataloader()
        said = "[ddp] 7 training samples do not split evenly over 2 processes" in capsys.readouterr().out
        assert said == (line and rank == 0), (rank, len(exp.dataset))
        rows = sum(len(batch[0]) for batch in strategy.dataloader)
        assert rows == (4 if len(exp.dataset) == 7 else 3)  # this rank's share: 8 / 2, or 6 / 2


def test_ddp_says_a_matched_buffer_size_on_rank_0_only(monkeypatch, capsys, tmp_path):
    """Every rank resolves replay.mem_size=match (same bytes, same size), but only rank 0 says so: under
    `modnet ddp` each rank printed the line before. The size itself is hand-computed: digits' 64 float32
    pixels + two int64 labels = 272 bytes a sample, so 2720 stored bytes hold exactly 10 samples."""
    import modnet.runner.distributed as md
    from modnet.config import compose

    sizes = []

    def fake_train(name, cfg, info, seed, ctx):  # no training: modnet "stores" 2720 bytes, replay records its size
        if name == "replay":
            sizes.append(int(cfg.replay.mem_size))
        return {"accuracy_matrix": [[0.5, 0.0], [0.5, 0.5]], "train_seconds": 0.0,
                "stored_bytes": 2720 if name == "modnet" else 0}, None

    monkeypatch.setattr(md, "train_strategy", fake_train)
    cfg = compose("cl", [*SMALL, "strategies=[modnet,replay]", "replay.mem_size=match",
                         "scenario=class", f"output_dir={tmp_path}"])
    line = "[replay] replay.mem_size=match: 10 samples of 272 bytes for modnet's 2720 stored bytes"
    capsys.readouterr()
    md.run_ddp(cfg, dataclasses.replace(md.DistContext(), rank=1, world_size=2))
    assert line not in capsys.readouterr().out
    md.run_ddp(cfg, md.DistContext())
    assert capsys.readouterr().out.count(line) == 1
    assert sizes == [10, 10]


def test_ddp_rejects_bad_settings_before_training():
    from modnet.config import ConfigError, compose
    from modnet.validate import check_ddp_config

    with pytest.raises(ConfigError, match="divisible"):
        check_ddp_config(compose("cl", ["strategies=[naive]", "train.batch_size=33"]), 2)
    with pytest.raises(ConfigError, match="A-GEM"):
        check_ddp_config(compose("cl", ["strategies=[agem]"]), 2)


def _results(path: Path, benchmark: str, seeds: list[int], strategies: dict, overrides=None) -> None:
    """A results.json as ``modnet cl`` writes it; strategies: name -> list of per-seed metric dicts."""
    path.mkdir(parents=True)
    entries = {}
    for name, runs in strategies.items():
        entries[name] = dict(runs[0], accuracy_matrix=[[0.5]])
        if len(runs) > 1:
            entries[name]["per_seed"] = runs
    (path / "results.json").write_text(json.dumps({"benchmark": benchmark, "scenario": "task", "n_experiences": 1,
                                                   "seed": seeds[0], "seeds": seeds, "strategies": entries}))
    if overrides is not None:
        (path / ".hydra").mkdir()
        (path / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))


def _m(acc, forg, sec):
    return {"average_accuracy": acc, "forgetting": forg, "bwt": -forg, "train_seconds": sec}


def test_aggregate_matches_hand_computed_means_and_stds(tmp_path):
    from modnet.eval.aggregate import aggregate

    d = tmp_path / "sweep"
    _results(d / "0", "split-digits", [0], {"modnet": [_m(0.8, 0.10, 10)], "naive": [_m(0.5, 0.4, 2)]})
    _results(d / "1", "split-digits", [1], {"modnet": [_m(0.9, 0.00, 12)], "naive": [_m(0.6, 0.3, 4)]})
    _results(d / "2", "split-digits", [2, 3], {"modnet": [_m(1.0, 0.05, 14), _m(0.7, 0.15, 16)]})
    _results(d / "3", "split-mnist", [0], {"modnet": [_m(0.95, 0.01, 100)]})
    # the same benchmark at two values of a swept hyper-parameter: never averaged together
    _results(d / "4", "split-fmnist", [0], {"modnet": [_m(0.6, 0.0, 1)]}, ["seed=0", "hat.c=0.5"])
    _results(d / "5", "split-fmnist", [1], {"modnet": [_m(0.8, 0.0, 1)]}, ["seed=1", "hat.c=0.5"])
    _results(d / "6", "split-fmnist", [0], {"modnet": [_m(0.2, 0.0, 1)]}, ["seed=0", "hat.c=0.75"])

    summary = aggregate(d)
    groups = {(g["benchmark"], g["strategy"], g["variant"]): g for g in summary["groups"]}
    assert set(groups) == {("split-digits", "modnet", ""), ("split-digits", "naive", ""),
                           ("split-mnist", "modnet", ""), ("split-fmnist", "modnet", "hat.c=0.5"),
                           ("split-fmnist", "modnet", "hat.c=0.75")}
    g = groups[("split-digits", "modnet", "")]
    # acc 0.8, 0.9, 1.0, 0.7: mean 0.85; deviations +-0.05, +-0.15 -> var (2*0.0025 + 2*0.0225) / 4 = 0.0125
    assert g["n"] == 4 and g["seeds"] == [0, 1, 2, 3]
    assert g["metrics"]["average_accuracy"]["mean"] == pytest.approx(0.85)
    assert g["metrics"]["average_accuracy"]["std"] == pytest.approx(math.sqrt(0.0125))
    # forgetting 0.10, 0.00, 0.05, 0.15: mean 0.075, deviations +-0.025, +-0.075 -> var 0.003125
    assert g["metrics"]["forgetting"]["mean"] == pytest.approx(0.075)
    assert g["metrics"]["forgetting"]["std"] == pytest.approx(math.sqrt(0.003125))
    assert g["metrics"]["bwt"]["mean"] == pytest.approx(-0.075)
    assert g["metrics"]["train_seconds"]["mean"] == pytest.approx(13.0)
    assert g["metrics"]["train_seconds"]["std"] == pytest.approx(math.sqrt(5.0))  # (9+1+1+9)/4
    naive = groups[("split-digits", "naive", "")]["metrics"]["average_accuracy"]
    assert (naive["mean"], naive["std"]) == (pytest.approx(0.55), pytest.approx(0.05))
    assert groups[("split-fmnist", "modnet", "hat.c=0.5")]["metrics"]["average_accuracy"]["mean"] == \
        pytest.approx(0.7)
    assert groups[("split-mnist", "modnet", "")]["metrics"]["average_accuracy"]["std"] == 0.0

    md = (d / "aggregate.md").read_text()
    assert "| split-digits | task | modnet |  | 4 | 0.8500 ± 0.1118 | 0.0750 ± 0.0559 | -0.0750 ± 0.0559 | " \
           "13.0 ± 2.2 |" in md
    assert "| split-fmnist | task | modnet | hat.c=0.75 | 1 | 0.2000 | 0.0000 |" in md  # one run: no "± 0"
    rows = {(r["benchmark"], r["strategy"], r["variant"]): r for r in csv.DictReader(open(d / "aggregate.csv"))}
    assert float(rows[("split-digits", "naive", "")]["forgetting_mean"]) == pytest.approx(0.35)
    assert float(rows[("split-digits", "naive", "")]["forgetting_std"]) == pytest.approx(0.05)
    assert (d / "aggregate.png").stat().st_size > 0
    assert json.loads((d / "aggregate.json").read_text())["groups"] == json.loads(json.dumps(summary["groups"]))

    sample = aggregate(d, out_dir=tmp_path / "ddof1", ddof=1, plot=False)
    g1 = next(g for g in sample["groups"] if g["benchmark"] == "split-digits" and g["strategy"] == "modnet")
    assert g1["metrics"]["average_accuracy"]["std"] == pytest.approx(math.sqrt(0.05 / 3))


def test_aggregate_tells_runs_apart_by_their_fingerprints(tmp_path):
    """Runs started apart (no Hydra overrides) and copied side by side: the same seed at train.epochs 3 and 10 was
    pooled into one "mean ± std over seeds" (seeds 0 0). Their fingerprint.json keys that differ make the variant;
    the seed and the strategies never do."""
    from modnet.eval.aggregate import aggregate

    def fingerprint(folder, epochs, seed, strategies):
        (folder / "fingerprint.json").write_text(json.dumps({
            "config.train.epochs": epochs, "config.seed": seed, "config.strategies": strategies,
            "config.benchmark.name": "digits", "config.hat.c": 0.75, "version.torch": "2.x"}))

    d = tmp_path / "runs"
    for name, epochs, seed, acc in (("a", 3, 0, 0.8), ("b", 10, 0, 0.9), ("c", 3, 1, 0.6)):
        _results(d / name, "split-digits", [seed], {"naive": [_m(acc, 0.1, 1)]})
        fingerprint(d / name, epochs, seed, ["naive"] if name != "c" else ["naive", "ewc"])
    # another benchmark beside them, with keys of its own (a sweep over benchmark=digits,mnist1d): no variant
    _results(d / "m", "split-mnist1d", [0], {"naive": [_m(0.5, 0.1, 1)]})
    (d / "m" / "fingerprint.json").write_text(json.dumps({"config.train.epochs": 3, "config.seed": 0,
                                                          "config.benchmark.num_samples": 5000}))
    summary = aggregate(d, plot=False)["groups"]
    assert [(g["benchmark"], g["variant"]) for g in summary if g["benchmark"] == "split-mnist1d"] == \
        [("split-mnist1d", "")]
    groups = {g["variant"]: g for g in summary if g["benchmark"] == "split-digits"}
    assert set(groups) == {"train.epochs=3", "train.epochs=10"}
    assert groups["train.epochs=3"]["seeds"] == [0, 1]
    assert groups["train.epochs=3"]["metrics"]["average_accuracy"]["mean"] == pytest.approx(0.7)
    assert groups["train.epochs=10"]["n"] == 1


def test_aggregate_reports_bad_folders(tmp_path):
    from modnet.eval.aggregate import aggregate

    with pytest.raises(FileNotFoundError, match="does not exist"):
        aggregate(tmp_path / "missing")
    with pytest.raises(ValueError, match="no results.json"):
        aggregate(tmp_path)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "results.json").write_text('{"benchmark": "a"}')
    with pytest.raises(ValueError, match="not a modnet results.json"):
        aggregate(tmp_path)


def test_aggregate_skips_gzsl_results_beside_cl_ones_and_refuses_a_file_as_out(tmp_path, capsys):
    """`modnet run`'s folder holds cl/, gzsl/ and explain/: aggregate read gzsl's results.json as a broken cl one and
    stopped; it now aggregates the cl runs (the same figures as the cl folder alone) and says which it skipped. A
    folder of gzsl results alone, and --out naming a file (a traceback from mkdir), are one line each."""
    from modnet.cli import main
    from modnet.eval.aggregate import aggregate

    run = tmp_path / "run"
    _results(run / "cl", "split-digits", [0, 1], {"modnet": [_m(0.8, 0.1, 1), _m(0.6, 0.3, 1)]})
    gzsl = {"benchmark": "digits", "calibration": "validate", "seeds": [0], "methods": {"niwt": {"H": 0.5}}}
    (run / "gzsl").mkdir()
    (run / "gzsl" / "results.json").write_text(json.dumps(gzsl))
    summary = aggregate(run, plot=False)
    assert [(g["strategy"], g["n"]) for g in summary["groups"]] == [("modnet", 2)]
    assert summary["groups"][0]["metrics"]["average_accuracy"]["mean"] == pytest.approx(0.7)
    assert "skipping 1 gzsl results.json" in capsys.readouterr().err
    assert main(["aggregate", str(run / "gzsl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "only gzsl results" in err[0]
    (tmp_path / "note.txt").write_text("x")
    assert main(["aggregate", str(run), "--out", str(tmp_path / "note.txt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "note.txt is a file" in err[0]
    assert (tmp_path / "note.txt").read_text() == "x"


def test_joblib_sweep_two_workers_then_aggregate(tmp_path):
    sweep_dir = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "modnet.jobs.sweep", "seed=0,1", "strategies=[naive],[ewc]", "train.epochs=1",
           "benchmark.n_experiences=2", "threads=1", "device=cpu", "hydra/launcher=joblib",
           "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={sweep_dir}"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    from omegaconf import OmegaConf

    jobs = sorted(p.parent for p in sweep_dir.glob("*/results.json"))
    assert len(jobs) == 4  # 2 seeds x 2 strategies, one folder each
    assert "Joblib" in OmegaConf.load(jobs[0] / ".hydra" / "hydra.yaml").hydra.launcher._target_
    # by hand, from the jobs' own files: mean and population std over the seeds (statistics module)
    acc = {}
    for job in jobs:
        res = json.loads((job / "results.json").read_text())
        (name, r), = res["strategies"].items()
        acc.setdefault(name, {})[res["seed"]] = r["average_accuracy"]
    assert {k: sorted(v) for k, v in acc.items()} == {"naive": [0, 1], "ewc": [0, 1]}

    rows = {r["strategy"]: r for r in csv.DictReader(open(sweep_dir / "aggregate.csv"))}  # written by the sweep
    md = (sweep_dir / "aggregate.md").read_text()
    for name, by_seed in acc.items():
        mean, std = statistics.fmean(by_seed.values()), statistics.pstdev(by_seed.values())
        assert float(rows[name]["average_accuracy_mean"]) == pytest.approx(mean, abs=1e-12)
        assert float(rows[name]["average_accuracy_std"]) == pytest.approx(std, abs=1e-12)
        assert rows[name]["n"] == "2" and rows[name]["seeds"] == "0 1"
        assert f"| {name} | 2 | {mean:.4f} ± {std:.4f} |" in md
    assert acc["naive"][0] > 0.4  # trained, not chance (0.2)


def test_a_failing_sweep_job_leaves_the_others_aggregated_and_exits_1(tmp_path):
    """A job whose loss diverges (lr 1e5): Hydra stopped the sweep with a traceback and never aggregated the jobs that
    finished. Now the job records its failure, the sweep's other job runs and is aggregated, the failed one is named,
    and the command exits 1."""
    sweep_dir = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "modnet.cli", "sweep", "strategies=[naive]", "train.lr=100000,0.05", "train.epochs=1",
           "benchmark.n_experiences=2", "progress=false", f"hydra.sweep.dir={sweep_dir}"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "NaN" in proc.stderr
    summary = json.loads((sweep_dir / "aggregate.json").read_text())
    assert [(g["strategy"], g["variant"]) for g in summary["groups"]] == [("naive", "train.lr=0.05")]
    assert f"job {sweep_dir / '0'}: naive failed" in proc.stdout
    assert json.loads((sweep_dir / "0" / "results.json").read_text())["failed"]["naive"]["seed"] == 0


def test_a_sweep_into_a_folder_of_another_sweep_stops_before_launching(tmp_path, capsys):
    """hydra.sweep.dir holding a sweep with other overrides: its jobs were launched, each stopped by its folder's
    fingerprint with a traceback, and multirun.yaml rewritten; now one line before any job. The same sweep's
    overrides again (output keys aside) pass the check."""
    import modnet.jobs.sweep as sweep
    from modnet.cli import main
    from modnet.config import ConfigError

    d = tmp_path / "sw"
    d.mkdir()
    (d / "multirun.yaml").write_text("hydra:\n  overrides:\n    task:\n    - seed=0,1\n    - train.epochs=2\n")
    before = (d / "multirun.yaml").read_text()
    assert main(["sweep", "seed=0,1", "train.epochs=1", f"hydra.sweep.dir={d}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds another sweep" in err[0] and "train.epochs=2" in err[0], err
    assert (d / "multirun.yaml").read_text() == before and sorted(p.name for p in d.iterdir()) == ["multirun.yaml"]
    sweep._check_sweep_dir(["train.epochs=2", "seed=0,1", "progress=false", "resume=true", f"hydra.sweep.dir={d}"])
    # the swept overrides in another order number the jobs differently (Hydra's product runs over them in the
    # order given): job 1 of 'strategies=.. seed=..' is job 2 of 'seed=.. strategies=..', so a resumed sweep
    # re-ran a job another folder held and aggregated seed 0 twice; now refused
    (d / "multirun.yaml").write_text("hydra:\n  overrides:\n    task:\n    - seed=0,1\n"
                                     "    - strategies=[naive],[modnet]\n    - train.epochs=1\n")
    sweep._check_sweep_dir(["train.epochs=1", "seed=0,1", "strategies=[naive],[modnet]", f"hydra.sweep.dir={d}"])
    with pytest.raises(ConfigError, match="same order"):
        sweep._check_sweep_dir(["strategies=[naive],[modnet]", "seed=0,1", "train.epochs=1", "resume=true",
                                f"hydra.sweep.dir={d}"])


def test_sweep_checks_every_job_and_the_launcher_before_launching(monkeypatch):
    import modnet.jobs.sweep as sweep
    from modnet.config import ConfigError

    assert sweep.validate_sweep(["seed=0,1,2", "strategies=[modnet],[naive]", "hydra/launcher=joblib"]) == 6
    with pytest.raises(ConfigError, match="train.epochs"):  # only the second value of the sweep is bad
        sweep.validate_sweep(["train.epochs=1,x"])
    with pytest.raises(ConfigError, match="hydra.sweep.dir"):
        sweep.validate_sweep(["output_dir=/tmp/x"])
    monkeypatch.setattr(sweep, "_plugin_installed", lambda module: False)
    with pytest.raises(ConfigError, match="pip install hydra-submitit-launcher"):
        sweep.validate_sweep(["hydra/launcher=slurm", "seed=0,1"])


def test_a_sweep_job_that_left_no_results_counts_as_failed(tmp_path, capsys):
    """A joblib or Slurm worker's ConfigError (e.g. its job folder in use) is printed by the worker, never seen by
    the sweep's process: the sweep exited 0. Jobs launched minus results.json found are failed jobs: planted, 3
    jobs launched, one results.json -> 2 named on stderr, and ``main``'s exit code counts them."""
    from omegaconf import OmegaConf

    from modnet.jobs.sweep import AggregateCallback

    sweep_dir = tmp_path / "sweep"
    (sweep_dir / "0").mkdir(parents=True)
    (sweep_dir / "0" / "results.json").write_text("{}")
    (sweep_dir / "1").mkdir()
    AggregateCallback.expected = 3
    try:
        AggregateCallback().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep_dir)}}}))
    finally:
        AggregateCallback.expected = None
    assert AggregateCallback.missing == 2
    assert "2 of 3 job(s) wrote no results.json" in capsys.readouterr().err


def test_aggregate_keeps_data_parallel_runs_apart_and_names_unfinished_runs(tmp_path, capsys):
    """A ``modnet ddp`` run (results.json world_size 2) beside a one-process run of the same settings was averaged
    with it (its fingerprint has no world size), said only in a multi-line Python warning. Now the world size makes
    a variant where the runs differ in it; a run interrupted before every seed finished (complete false) is named
    in one line (only its strategies finished on every seed are in its table)."""
    from modnet.eval.aggregate import aggregate

    d = tmp_path / "runs"
    for name, acc in (("one", 0.8), ("ddp", 0.6)):
        _results(d / name, "split-digits", [0], {"modnet": [_m(acc, 0.1, 1)]})
        (d / name / "fingerprint.json").write_text(json.dumps({"config.seed": 0, "config.train.epochs": 3}))
    ddp = json.loads((d / "ddp" / "results.json").read_text())
    (d / "ddp" / "results.json").write_text(json.dumps({**ddp, "world_size": 2}))
    _results(d / "cut", "split-digits", [1], {"modnet": [_m(0.7, 0.1, 1)]})
    cut = json.loads((d / "cut" / "results.json").read_text())
    (d / "cut" / "results.json").write_text(json.dumps({**cut, "complete": False}))
    (d / "cut" / "fingerprint.json").write_text(json.dumps({"config.seed": 1, "config.train.epochs": 3}))
    capsys.readouterr()
    groups = {g["variant"]: g for g in aggregate(d, plot=False)["groups"]}
    assert set(groups) == {"world_size=1", "world_size=2"}
    assert groups["world_size=2"]["metrics"]["average_accuracy"]["mean"] == pytest.approx(0.6)
    assert groups["world_size=1"]["seeds"] == [0, 1]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1 unfinished run(s)" in err[0] and "cut" in err[0]


def test_an_interrupted_multi_seed_run_keeps_the_seeds_that_finished_in_results_json(tmp_path, monkeypatch):
    """``modnet cl seeds=[0,1]`` stopped after a strategy's first seed: results.json listed it as finished but held
    none of its figures (they waited for every seed, in checkpoints only). Planted failure: the second seed's run
    of naive raises; its first seed's results are under ``partial``."""
    from modnet.cli import main
    from modnet.jobs import cl

    real = cl.run_strategy

    def failing_second_seed(name, cfg, info, seed, *args, **kwargs):
        if seed == 1:
            raise KeyboardInterrupt
        return real(name, cfg, info, seed, *args, **kwargs)

    monkeypatch.setattr(cl, "run_strategy", failing_second_seed)
    assert main(["cl", "strategies=[naive]", "seeds=[0,1]", "train.epochs=1", "benchmark.n_experiences=2",
                 "progress=false", f"output_dir={tmp_path}"]) == 130
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["complete"] is False and res["strategies"] == {} and res["finished"] == [["naive", 0]]
    (first,) = res["partial"]["naive"]
    assert first["seed"] == 0 and len(first["accuracy_matrix"]) == 2 and 0 < first["average_accuracy"] <= 1
