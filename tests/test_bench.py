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
                      "modnet (HAT + gates)", "modnet (no transform heads)", "modnet", "modnet + sync regulariser",
                      "plain (modnet's rows)"}
    assert r["modnet_rows_per_step"] == 128 + 96  # batch 128, one transformed copy of the 3 in 4 rows with k_i != 0
    assert all(len(v) == 3 for v in t.values())
    per_round = sorted(m / n for m, n in zip(t["modnet"], t["naive"]))
    assert r["modnet_time_ratio_vs_naive"] == pytest.approx(per_round[1])
    assert r["step_cost_vs_naive"]["naive"]["median"] == pytest.approx(1.0)
    sync = res["sync"]["sizes"]
    assert set(sync) == {"200", "400"} and all(v["clusters"] >= 1 for v in sync.values())
    md = (tmp_path / "bench.md").read_text()
    assert "modnet step cost / naive step cost" in md and "| 400 |" in md
    # which CPU kernels ran, in torch's own names (ratios and some bugs differ between machines)
    assert res["cpu_capability"] in ("DEFAULT", "VSX", "Z VECTOR", "NO AVX", "AVX2", "AVX512", "SVE256", "SVE")
    assert f"CPU kernels {res['cpu_capability']}" in md
