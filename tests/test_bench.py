"""The bench command runs and reports consistent figures (speed itself is measured by `modnet bench`)."""
import json

import pytest

from modnet.cli import main


def test_each_loop_runs_in_its_own_process_and_reports_its_peak_memory():
    """``isolate`` (the default): a loop runs in a spawned process, which measures its own peak memory; in this
    process there is no peak of the loop's own to report (None). The plain loop: no Avalanche import to wait for."""
    from modnet.jobs.bench import bench_training

    opts = {"threads": 1, "mlp_shapes": {"mlp": {"in_dim": 784, "hidden": 400, "n_layers": 2}}}
    for isolate in (True, False):
        r = bench_training("mlp", 256, 128, 2, "cpu", opts, kinds=("plain",), isolate=isolate)["plain"]
        assert r["samples_per_s"] > 0
        assert (r["peak_memory_mb"] >= 0) if isolate else r["peak_memory_mb"] is None


def test_the_second_task_loop_times_a_task_after_a_consolidated_one():
    """"modnet (second task)": the experience timed is the second of a two-task Permuted-X of the bench's data,
    built after one epoch of the first, whose HAT masks are then consolidated (HAT conditions the second
    task's gradients) and whose gate's modules the second task's gate inherits."""
    import torch

    from modnet.jobs.bench import _build_avalanche, _data

    opts = {"threads": 1, "mlp_shapes": {"mlp": {"in_dim": 64, "hidden": 32, "n_layers": 2}}}
    x, y = _data("mlp", 256, 10, torch.device("cpu"), options=opts)
    strategy, exp, timer = _build_avalanche("modnet", "mlp", x, y, 64, 1, torch.device("cpu"), opts,
                                            second_task=True)
    assert exp.current_experience == 1 and len(exp.dataset) == 256 and len(timer.times) == 1
    model = strategy.model
    assert model.trained == 1 and all(bool((m > 0.5).any()) for m in model.cumulative_masks())
    strategy.train(exp)
    gate = model.gate.task_gate(1)
    assert gate is not None and any(gate.n_inherited)  # the first task's modules, held by the second's gate
    # the same inputs as the bench's data, their features reordered
    x1 = exp.dataset[0][0]
    assert torch.equal(x1.sort().values, x[0].sort().values) and not torch.equal(x1, x[0])


def test_loops_keeps_only_the_named_loops_that_apply():
    """``loops`` narrows the ratio run to the named loops (a GPU run leaves the slow Avalanche-loader loops
    out); a named loop that does not apply (a compiled one without ``compile``) stays out; a bad name is one line
    before any import."""
    from modnet.jobs.bench import ratio_loops
    from modnet.validate import validate

    kinds = ("plain", "naive", "modnet")
    every = ratio_loops(kinds, {"compile": True})
    assert {"naive (Avalanche loader)", "modnet (compiled)", "naive (compiled)", "modnet (second task)"} <= set(every)
    chosen = ["plain", "modnet", "modnet (HAT only)", "modnet (compiled)"]
    assert list(ratio_loops(kinds, {"compile": True, "loops": chosen})) == \
        [k for k in every if k in chosen]  # RATIO_LOOPS' order
    assert set(ratio_loops(kinds, {"compile": False, "loops": chosen})) == {"plain", "modnet", "modnet (HAT only)"}
    from modnet.config import ConfigError, compose

    for bad in ("[plain,nope]", "[plain,plain]", "[]", "plain"):
        with pytest.raises(ConfigError, match="loops="):
            validate("bench", compose("bench", [f"loops={bad}"]))
    validate("bench", compose("bench", ['loops=[plain,"modnet (HAT only)"]']))


def test_the_timed_epochs_train_the_gate():
    """A run trains its gate in all but its last ``modules.settle_epochs`` epochs; the bench's experiences are one
    epoch long, which the default settle epoch would make a settle epoch (no gate gradient, a cheaper step): the
    bench times gate-training epochs, its gate moved by every one of them (before stop 41 it did not move)."""
    import torch

    from modnet.jobs.bench import _build_avalanche, _data

    opts = {"threads": 1, "mlp_shapes": {"mlp": {"in_dim": 64, "hidden": 32, "n_layers": 2}}}
    x, y = _data("mlp", 256, 10, torch.device("cpu"), options=opts)
    strategy, exp, _ = _build_avalanche("modnet", "mlp", x, y, 64, 1, torch.device("cpu"), opts)
    for epoch in range(2):  # the bench's warm-up epoch, then a timed one: the same experience trained again
        strategy.train(exp)
        if epoch == 0:
            gate = strategy.model.gate.task_gate(0)
            before = [p.detach().clone() for p in gate.parameters()]
    assert any(not torch.equal(b, p) for b, p in zip(before, gate.parameters()))


@pytest.mark.slow  # ratio rounds of ten loops and SynC: ~25 s (in this process; the spawned path is tested above)
def test_bench_writes_ratios_that_agree_with_its_throughputs(tmp_path):
    rc = main(["bench", "archs=[mlp]", "samples.mlp=512", "epochs=2", "sync_sizes=[200,400]", "niwt=false", "repeats=1",
               "ratio_rounds=3", "isolate=false", f"output_dir={tmp_path}"])
    assert rc == 0
    res = json.loads((tmp_path / "bench.json").read_text())
    r = res["training"]["mlp"]
    for kind in ("plain", "naive", "modnet"):
        assert r[kind]["samples_per_s"] > 0 and r[kind]["peak_memory_mb"] is None
    assert r["separate_runs_time_ratio_vs_naive"] == pytest.approx(
        r["naive"]["samples_per_s"] / r["modnet"]["samples_per_s"])
    # the headline ratio is the median over rounds of same-round epoch-time ratios, recomputed here by hand
    t = r["interleaved_epoch_seconds"]
    assert set(t) == {"plain", "naive", "naive (Avalanche loader)", "modnet (Avalanche loader)", "modnet (HAT only)",
                      "modnet (HAT + gates)", "modnet (no transform heads)", "modnet", "modnet (second task)",
                      "modnet + sync regulariser", "plain (modnet's rows)"}
    # batch 128: the transform heads' copies replace the 3 in 4 rows with k_i != 0 (transform_copies=auto: replace)
    assert r["modnet_rows_per_step"] == 128
    assert all(len(v) == 3 for v in t.values())
    per_round = sorted(m / n for m, n in zip(t["modnet"], t["naive"]))
    assert r["modnet_time_ratio_vs_naive"] == pytest.approx(per_round[1])
    assert r["step_cost_vs_naive"]["naive"]["median"] == pytest.approx(1.0)
    assert res["ratio_clock"] == "thread_cpu"  # auto, on the CPU at one thread: lockstep rounds
    assert res["lockstep_steps"] == 8  # configs/bench.yaml's default, recorded beside the figures
    assert res["isolate"] is False and "in this process" in (tmp_path / "bench.md").read_text()
    sync = res["sync"]["sizes"]
    assert set(sync) == {"200", "400"} and all(v["clusters"] >= 1 for v in sync.values())
    md = (tmp_path / "bench.md").read_text()
    assert "modnet step cost / naive step cost" in md and "| 400 |" in md
    assert set(r["page_faults_per_epoch"]) == set(t) and "page faults / epoch" in md  # lockstep, Linux
    # which CPU kernels ran, in torch's own names (ratios and some bugs differ between machines)
    assert res["cpu_capability"] in ("DEFAULT", "VSX", "Z VECTOR", "NO AVX", "AVX2", "AVX512", "SVE256", "SVE")
    assert f"CPU kernels {res['cpu_capability']}" in md


def test_baselines_are_timed_on_a_second_task_against_naives(tmp_path, capsys):
    """``baselines``: each named strategy gets a loop on the second task of the two-task Permuted-X (after one
    epoch of the first: SI's importances are then nonzero, its surrogate in every step), with "naive (second
    task)" beside them as their reference column; a bad name is one line before any import."""
    import torch

    from modnet.jobs.bench import _build_avalanche, _data, ratio_loops
    from strategies.plugins.si import SynapticIntelligence

    kinds = ("plain", "naive", "modnet")
    assert not any("(second task)" in k and k != "modnet (second task)" for k in ratio_loops(kinds, {}))
    chosen = ratio_loops(kinds, {"baselines": ["si", "lwf"]})
    assert {"naive (second task)", "si (second task)", "lwf (second task)"} <= set(chosen)
    assert "ewc (second task)" not in chosen
    opts = {"threads": 1, "mlp_shapes": {"mlp": {"in_dim": 64, "hidden": 32, "n_layers": 2}}}
    x, y = _data("mlp", 256, 10, torch.device("cpu"), options=opts)
    strategy, exp, _ = _build_avalanche("si", "mlp", x, y, 64, 1, torch.device("cpu"), opts, second_task=True)
    si = next(p for p in strategy.plugins if isinstance(p, SynapticIntelligence))
    assert exp.current_experience == 1 and sum(float(o.abs().sum()) for o in si.importance.values()) > 0

    # Cumulative's second-task epoch trains both tasks' samples: 2 x 256 in every round when each round builds
    # it anew (trained again on the same experience, it would hold 3 x, 4 x 256: a baseline's state grows)
    assert main(["bench", "archs=[mlp]", "samples.mlp=256", "epochs=2", "sync_sizes=[]", "niwt=false", "repeats=1",
                 "ratio_rounds=2", "isolate=false", "second_task=false", "baselines=[si,cumulative]",
                 'loops=[naive,"naive (second task)","si (second task)","cumulative (second task)"]',
                 f"output_dir={tmp_path}"]) == 0
    r = json.loads((tmp_path / "bench.json").read_text())["training"]["mlp"]
    assert set(r["interleaved_epoch_seconds"]) == {"naive", "naive (second task)", "si (second task)",
                                                   "cumulative (second task)"}
    assert r["step_cost_vs_naive (second task)"]["naive (second task)"]["median"] == pytest.approx(1.0)
    assert r["epoch_samples"] == {"cumulative (second task)": 512} and r["samples"] == 256
    t = r["interleaved_epoch_seconds"]  # its ratios per step: its epoch time counted per 256 samples
    per_round = sorted(c / 2 / n for c, n in zip(t["cumulative (second task)"], t["naive (second task)"]))
    assert r["step_cost_vs_naive (second task)"]["cumulative (second task)"]["median"] == \
        pytest.approx(sum(per_round) / 2)
    md = (tmp_path / "bench.md").read_text()
    assert "step cost / naive (second task)" in md and "its epoch trains 512 samples" in md
    capsys.readouterr()
    for bad in ("[nope]", "[si,si]", "modnet"):
        assert main(["bench", f"baselines={bad}", "archs=[mlp]"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "baselines" in err[0] and ("ewc" in err[0] or bad == "modnet")


def test_bench_counts_are_checked_and_one_sync_size_writes_strict_json(tmp_path, capsys):
    """repeats 0 ("best of 0 runs"), one epoch (only the warm-up), negative rounds: one line each. One SynC size
    has no growth exponent: null in bench.json (was NaN, which strict JSON parsers refuse)."""
    for bad, key in (("repeats=0", "repeats"), ("epochs=1", "epochs"), ("ratio_rounds=-1", "ratio_rounds")):
        assert main(["bench", bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and key in err[0]
    assert main(["bench", "archs=[mlp_small]", "samples.mlp_small=256", "epochs=2", "repeats=1", "ratio_rounds=0",
                 "isolate=false", "niwt=false", "sync_sizes=[200]", f"output_dir={tmp_path}"]) == 0
    res = json.loads((tmp_path / "bench.json").read_text(),
                     parse_constant=lambda c: pytest.fail(f"bench.json holds {c}"))
    assert res["sync"]["growth_exponent_per_iteration"] is None
    assert "no growth exponent" in (tmp_path / "bench.md").read_text()


def _matmul_epoch(log, name, steps, products, size=192):
    """A fake training epoch: ``steps`` steps of ``products`` (size x size) matrix products each, logging when
    each step starts and ends (bench._lockstep_round's loop interface: epoch(clock, on_step) -> seconds)."""
    import time

    import torch

    a = torch.randn(size, size)

    def epoch(clock, on_step):
        t0 = clock()
        for _ in range(steps):
            log.append((name, "start", time.perf_counter()))
            for _ in range(products):
                a @ a
            log.append((name, "end", time.perf_counter()))
            on_step()
        return clock() - t0
    return epoch


def test_lockstep_round_takes_one_step_of_each_loop_in_turn_and_times_each_on_its_own_cpu_clock():
    """Three loops in lockstep: the steps never overlap, they come round-robin in the given order (a loop that
    has finished leaves the round), and each epoch's thread CPU time is its own arithmetic: a loop planted with
    twice the products per step measures ~2x the other, the third loop's steps in between not counted."""
    import torch

    from modnet.jobs.bench import _lockstep_round

    torch.set_num_threads(1)
    log = []
    torch.randn(192, 192) @ torch.randn(192, 192)  # the first product's one-off set-up is no loop's
    run = {"one": _matmul_epoch(log, "one", 6, 20), "two": _matmul_epoch(log, "two", 6, 40),
           "short": _matmul_epoch(log, "short", 2, 80)}
    out, faults = _lockstep_round(run, ["two", "short", "one"])
    starts = [name for name, what, _ in log if what == "start"]
    assert starts == ["two", "short", "one"] * 2 + ["two", "one"] * 4
    for (n1, w1, t1), (n2, w2, t2) in zip(log[::2], log[1::2]):  # each start is followed by its own end
        assert (n1, w1, n2, w2) == (n1, "start", n1, "end") and t2 >= t1
    assert set(out) == {"one", "two", "short"}
    # 240 products against 120: the clocks count each loop's own work. Bounds wide enough for a machine shared with
    # another job (1.5 seen with 60/120 products beside a README run); a wall or process clock would give ~1
    assert 1.35 < out["two"] / out["one"] < 2.8
    assert set(faults) in ({"one", "two", "short"}, set())  # per loop on Linux, none elsewhere


def test_lockstep_round_with_several_steps_per_turn_hands_the_turn_on_after_each_block():
    """steps_per_turn=2: each loop takes two steps, then the next loop in order; a loop whose epoch ends inside a
    block (3 steps: one block of 2, then 1) leaves the round after its last step; still no two steps overlap."""
    from modnet.jobs.bench import _lockstep_round

    log = []
    run = {"a": _matmul_epoch(log, "a", 5, 1, size=8), "b": _matmul_epoch(log, "b", 3, 1, size=8),
           "c": _matmul_epoch(log, "c", 6, 1, size=8)}
    _lockstep_round(run, ["a", "b", "c"], steps_per_turn=2)
    starts = [name for name, what, _ in log if what == "start"]
    assert starts == ["a", "a", "b", "b", "c", "c", "a", "a", "b", "c", "c", "a", "c", "c"]
    for (n1, w1, t1), (n2, w2, t2) in zip(log[::2], log[1::2]):
        assert (n1, w1, n2, w2) == (n1, "start", n1, "end") and t2 >= t1


def test_lockstep_steps_must_be_a_positive_integer(capsys):
    for bad, says in (("0", "positive integer"), ("-3", "positive integer"), ("2.5", "must be int"),
                      ("true", "must be int")):
        assert main(["bench", f"lockstep_steps={bad}", "archs=[mlp]"]) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "lockstep_steps" in err[0] and says in err[0]


def test_second_task_must_be_a_boolean_and_false_leaves_its_loop_out(capsys):
    from modnet.jobs.bench import ratio_loops

    for bad in ("2", "maybe"):
        assert main(["bench", f"second_task={bad}", "archs=[mlp]"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "second_task" in err[0] and "must be bool" in err[0]
    kinds = ("plain", "naive", "modnet")
    assert "modnet (second task)" in ratio_loops(kinds, {})  # the default
    assert "modnet (second task)" not in ratio_loops(kinds, {"second_task": False})
    assert "modnet (second task)" not in ratio_loops(("plain", "naive"), {})  # only beside modnet


def test_image_loops_take_the_layout_modnet_cl_trains_in(tmp_path, capsys):
    """channels_last=auto (the default) is modnet cl's train.channels_last=auto: channels_last maps on the CPU;
    recorded in bench.json; true / false as given; anything else refused in one line."""
    for value, expected in (("auto", True), ("false", False), ("true", True)):
        out = tmp_path / value
        assert main(["bench", "archs=[]", "sync_sizes=[]", "niwt=false", f"channels_last={value}",
                     f"output_dir={out}"]) == 0
        assert json.loads((out / "bench.json").read_text())["channels_last"] is expected
    capsys.readouterr()
    assert main(["bench", "channels_last=maybe", "archs=[cnn]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "channels_last" in err[0] and "true, false or auto" in err[0]


def test_lockstep_round_raises_a_loops_error_after_the_others_finish():
    from modnet.jobs.bench import _lockstep_round

    log = []

    def broken(clock, on_step):
        on_step()
        raise RuntimeError("loop failed")
    with pytest.raises(RuntimeError, match="loop failed"):
        _lockstep_round({"ok": _matmul_epoch(log, "ok", 3, 1), "broken": broken}, ["ok", "broken"])
    assert [name for name, what, _ in log if what == "end"] == ["ok"] * 3  # the other loop was not left waiting


def test_thread_cpu_ratios_need_one_cpu_thread(capsys):
    assert main(["bench", "ratio_clock=thread_cpu", "threads=2", "archs=[mlp]"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ratio_clock=thread_cpu" in err[0] and "threads=1" in err[0]


@pytest.mark.parametrize("isolate", [True, False])
def test_bench_md_says_how_the_throughputs_were_run(isolate):
    """bench.md's throughput heading said "Separate processes (throughput and memory ...)" under isolate=false too,
    where every loop ran in the bench's own process and no memory was measured."""
    from modnet.jobs.bench import _markdown

    memory = 12.5 if isolate else None
    res = {"device": "cpu", "threads": 1, "isolate": isolate, "training": {"mlp": {
        "config": "784-400-400", **{k: {"samples_per_s": 100.0, "peak_memory_mb": memory} for k in ("plain", "naive")}}}}
    md = _markdown(res)
    assert ("Separate processes" in md) == isolate and ("in this process" in md) == (not isolate)
    assert ("| plain | 100 | 12.5 |" if isolate else "| plain | 100 | n/a (isolate=false) |") in md
