"""``modnet aggregate <dir>``: every ``results.json`` below a folder -> mean +- std over seeds, per setting.

A setting is (benchmark, scenario, strategy, variant). The variant names the settings that are not seeds or
strategies and differ between the runs (``hat.c=0.5``), read from each run's ``fingerprint.json`` (every config
key that decides its numbers, ``modnet.rundir``) or, for a folder without one, its Hydra job's
``.hydra/overrides.yaml``; only keys that take two or more values across the folder count, so runs that differ
in a hyper-parameter, however they were started (a sweep, or cl runs copied side by side), are never averaged
together. A ``results.json`` of a multi-seed run (``seeds=[0,1,2]``) contributes each of its
seeds (its ``per_seed`` entries). For every metric of ``modnet.eval.results`` (average accuracy, forgetting, BWT,
train seconds): mean and standard deviation over the runs, std with ``ddof`` (default 0, numpy's and
``modnet.eval.results.aggregate_seeds``' convention; ddof=1 gives the sample std).

Written into the folder (or ``out_dir``): aggregate.json, aggregate.md (markdown table), aggregate.csv and
aggregate.png (bars with std error bars). ``modnet.eval.tables`` does the statistics and tables, matplotlib
the plot.
"""
from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from modnet.eval.results import SEED_METRICS
from modnet.eval.tables import aggregate_runs, markdown_table, mean_std_cell, write_csv
from modnet.rundir import results_json

METRICS = tuple(SEED_METRICS)
SETTING = ("benchmark", "scenario", "strategy", "variant")
# Overrides that say which run it is, not which setting: never part of a variant.
_NOT_VARIANT = {"seed", "seeds", "strategies", "benchmark", "scenario", "output_dir", "progress", "threads",
                "device", "resume", "loggers"}
# a fingerprint's keys that are part of the setting already (the benchmark's label) or say which run it is
_NOT_VARIANT_KEYS = {"benchmark.name", "scenario"}


def _fingerprint_settings(results_file: Path) -> dict[str, str] | None:
    """The run's config keys from its fingerprint.json (dotted key -> value as text), those that can make a
    variant; None without the file."""
    path = results_file.parent / "fingerprint.json"
    fp = _read_json(path) if path.exists() else None
    if not isinstance(fp, dict):
        return None
    out = {}
    for key, value in fp.items():
        if not key.startswith("config."):
            continue
        key = key[len("config."):]
        if key.split(".")[0] in _NOT_VARIANT - {"benchmark"} or key in _NOT_VARIANT_KEYS:
            continue
        out[key] = value if isinstance(value, str) else json.dumps(value)
    return out


def _overrides(results_file: Path) -> dict[str, str]:
    """The job's command-line overrides (Hydra writes them next to the job's outputs), key -> value."""
    path = results_file.parent / ".hydra" / "overrides.yaml"
    if not path.exists():
        return {}
    from omegaconf import OmegaConf

    out = {}
    for item in OmegaConf.to_container(OmegaConf.load(path)) or []:
        key, _, value = str(item).partition("=")
        out[key.lstrip("+~")] = value
    return out


def _is_zero_shot(res) -> bool:
    """A ``modnet gzsl`` results.json (its methods' U, S, H already mean +- std over its seeds)."""
    from modnet.rundir import results_command

    return results_command(res) == "gzsl"


def _runs_of(results_file: Path, res) -> list[dict]:
    """One record per (strategy, seed) in a results.json (``res``: its content, ``_read_json``'s), with its
    metrics."""
    try:
        if isinstance(res, Exception):
            raise res
        if _is_zero_shot(res):
            return []
        bench, scenario, strategies = res["benchmark"], res["scenario"], res["strategies"]
        seeds = list(res.get("seeds") or [res["seed"]])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{results_file} is not a modnet results.json ({type(err).__name__}: {err}); "
                         "remove it or point aggregate at the sweep folder only") from None
    runs = []
    for name, entry in strategies.items():
        per_seed = entry.get("per_seed") or [entry]
        if len(per_seed) != len(seeds):
            raise ValueError(f"{results_file}: strategy {name} has {len(per_seed)} per-seed results for "
                             f"seeds {seeds}")
        for seed, r in zip(seeds, per_seed):
            runs.append({"benchmark": bench, "scenario": scenario, "strategy": name, "seed": int(seed),
                         "file": str(results_file),
                         **{m: float(r[m]) if r.get(m) is not None else math.nan for m in METRICS}})
    return runs


def _read_json(path: Path):
    """The file's JSON content, or the decoding error (named by ``_runs_of`` where a results.json is read)."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return err


def collect_runs(root: Path) -> list[dict]:
    """Every (benchmark, scenario, strategy, seed) run below ``root``, with its variant label."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"sweep folder {root} does not exist; pass the folder a `modnet sweep` wrote "
                                "(hydra.sweep.dir, default outputs/sweeps/<date>)")
    files = sorted(root.rglob("results.json"))
    if not files:
        raise ValueError(f"no results.json below {root}: the jobs have not finished, or this is not a sweep "
                         "or `modnet cl` output folder")
    contents = {f: _read_json(f) for f in files}  # each file read once
    zero_shot = [f for f in files if _is_zero_shot(contents[f])]
    if zero_shot:  # e.g. `modnet run`'s folder: cl/, gzsl/ and explain/ side by side
        files = [f for f in files if f not in zero_shot]
        if not files:
            raise ValueError(f"{root} holds only gzsl results ({len(zero_shot)}), which aggregate does not read: run "
                             "`modnet gzsl seeds=[0,1,2]` for mean ± std over seeds (its results.csv / table)")
        print(f"modnet aggregate: skipping {len(zero_shot)} gzsl results.json ({', '.join(map(str, zero_shot[:3]))}"
              f"{', ...' if len(zero_shot) > 3 else ''}): a gzsl run reports mean ± std over its own seeds in its "
              "results.csv", file=sys.stderr)
    unfinished = [f for f in files if isinstance(contents[f], dict) and contents[f].get("complete") is False]
    if unfinished:
        print(f"modnet aggregate: {len(unfinished)} unfinished run(s) ({', '.join(map(str, unfinished[:3]))}"
              f"{', ...' if len(unfinished) > 3 else ''}): only their strategies finished on every seed are read "
              "(resume=true finishes them)", file=sys.stderr)
    fingerprints = {f: _fingerprint_settings(f) for f in files}
    if all(fp is not None for fp in fingerprints.values()):
        overrides = fingerprints  # every key of every run: also runs started apart (cl runs copied side by side)
    else:
        overrides = {f: _overrides(f) for f in files}
    # data-parallel runs (modnet ddp: results.json's world_size) are another setting than one process's (another
    # sampler, their own steps): the world size makes a variant where the runs differ in it
    overrides = {f: {**o, "world_size": str(contents[f].get("world_size", 1) if isinstance(contents[f], dict) else 1)}
                 for f, o in overrides.items()}
    # the keys that vary among the runs of one benchmark (a sweep over benchmarks has each one's own keys: they make
    # no variant, the benchmark's label tells those runs apart already)
    by_benchmark: dict[str, list[Path]] = defaultdict(list)
    for f in files:
        res = contents[f]
        by_benchmark[str(res.get("benchmark") if isinstance(res, dict) else None)].append(f)
    runs = []
    for group in by_benchmark.values():
        values = defaultdict(set)
        for f in group:
            for k, v in overrides[f].items():
                values[k].add(v)
        varied = sorted(k for k, vs in values.items() if k not in _NOT_VARIANT
                        and (len(vs) > 1 or any(k not in overrides[f] for f in group)))
        for f in group:
            variant = ",".join(f"{k}={overrides[f][k]}" for k in varied if k in overrides[f])
            runs.extend({**r, "variant": variant} for r in _runs_of(f, contents[f]))
    return runs


def aggregate(sweep_dir, out_dir=None, ddof: int = 0, plot: bool = True) -> dict:
    """Group the runs below ``sweep_dir`` by setting and write mean +- std tables; returns the summary.

    Returns ``{"sweep_dir", "ddof", "n_files", "groups": [{"benchmark", "scenario", "strategy", "variant",
    "n", "seeds", "metrics": {metric: {"mean", "std", "values"}}}]}`` (groups sorted by those keys).
    """
    if ddof not in (0, 1):
        raise ValueError(f"ddof must be 0 (population std) or 1 (sample std), got {ddof!r}")
    sweep_dir = Path(sweep_dir)
    if out_dir is not None and (Path(out_dir).exists() and not Path(out_dir).is_dir() or
                                any(p.is_file() for p in Path(out_dir).parents)):
        raise ValueError(f"--out {out_dir} is a file (or below one); give a folder for aggregate.json/.md/.csv/.png")
    runs = collect_runs(sweep_dir)
    by_setting: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        by_setting[tuple(r[k] for k in SETTING)].append(r)
    summary_groups = []
    for stats in aggregate_runs(runs, by=SETTING, metrics=METRICS, ddof=ddof).to_dict("records"):
        key = tuple(stats[k] for k in SETTING)
        rs = sorted(by_setting[key], key=lambda r: r["seed"])
        seeds = [r["seed"] for r in rs]
        if len(set(seeds)) < len(seeds):
            files = sorted({r["file"] for r in rs})
            print(f"modnet aggregate: {'/'.join(k for k in key if k)}: seed(s) repeated across runs {seeds} "
                  f"({', '.join(files)}); they are averaged as separate runs", file=sys.stderr)
        summary_groups.append({**dict(zip(SETTING, key)), "n": len(rs), "seeds": seeds,
                               "metrics": {m: _metric(stats, m, [r[m] for r in rs]) for m in METRICS}})
    summary = {"sweep_dir": str(sweep_dir), "ddof": ddof, "n_files": len({r["file"] for r in runs}),
               "groups": summary_groups}
    write_aggregate(summary, Path(out_dir) if out_dir is not None else sweep_dir, plot=plot)
    return summary


def _metric(stats: dict, metric: str, values: list[float]) -> dict:
    """One metric of a group: mean, std (NaN with fewer runs than ddof + 1) and the runs' values."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return {"mean": None, "std": None, "values": []}
    return {"mean": float(stats[f"{metric}_mean"]), "std": float(stats[f"{metric}_std"]), "values": values}


def format_markdown(summary: dict) -> str:
    """Markdown table, one row per setting: mean ± std over its n runs (the value alone for one run)."""
    with_variant = any(g["variant"] for g in summary["groups"])
    settings = ["benchmark", "scenario", "strategy"] + (["variant"] if with_variant else [])
    header = settings + ["n"] + [label for label, _ in SEED_METRICS.values()]
    rows = [[g[k] for k in settings] + [g["n"]] +
            [mean_std_cell(g["metrics"][m]["mean"], g["metrics"][m]["std"], len(g["metrics"][m]["values"]), fmt)
             for m, (_, fmt) in SEED_METRICS.items()]
            for g in summary["groups"]]
    return f"mean ± std over seeds (std ddof={summary['ddof']})\n\n" + markdown_table(header, rows)


def write_aggregate(summary: dict, out_dir: Path, plot: bool = True) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "aggregate.json").write_text(results_json(summary))
    (out_dir / "aggregate.md").write_text(format_markdown(summary) + "\n")
    write_csv(out_dir / "aggregate.csv", [
        {**{k: g[k] for k in SETTING}, "n": g["n"], "seeds": " ".join(map(str, g["seeds"])),
         **{f"{m}_{s}": g["metrics"][m][s] for m in METRICS for s in ("mean", "std")}}
        for g in summary["groups"]])
    if plot:
        plot_aggregate(summary, out_dir / "aggregate.png")


def plot_aggregate(summary: dict, path: Path) -> None:
    """Bars of average accuracy and forgetting per strategy, grouped by setting, std as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = summary["groups"]
    settings = list(dict.fromkeys(_setting(g) for g in groups))
    strategies = list(dict.fromkeys(g["strategy"] for g in groups))
    by_key = {(_setting(g), g["strategy"]): g for g in groups}
    width = 0.8 / max(len(strategies), 1)
    x = np.arange(len(settings))
    fig, axes = plt.subplots(1, 2, figsize=(max(7.0, 1.2 + 1.6 * len(settings) * 2), 4.2))
    for ax, metric in zip(axes, ("average_accuracy", "forgetting")):
        for i, name in enumerate(strategies):
            stats = [by_key[(s, name)]["metrics"][metric] if (s, name) in by_key else None for s in settings]
            means = [st["mean"] if st and st["mean"] is not None else np.nan for st in stats]
            stds = [st["std"] if st and st["std"] is not None and not math.isnan(st["std"]) else 0.0
                    for st in stats]
            ax.bar(x + (i - (len(strategies) - 1) / 2) * width, means, width, yerr=stds, capsize=3, label=name)
        ax.set_xticks(x, settings, rotation=15 if len(settings) > 2 else 0, fontsize=8)
        label = SEED_METRICS[metric][0]
        ax.set_ylabel(label)
        ax.set_title(f"{label} (mean ± std over seeds)")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylim(0, 1.02)
    axes[0].legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _setting(g: dict) -> str:
    return f"{g['benchmark']}\n{g['scenario']}" + (f"\n{g['variant']}" if g["variant"] else "")


def main(argv: list[str] | None = None) -> int:
    """``modnet aggregate DIR [--ddof 0|1] [--out OUT_DIR]``."""
    import argparse

    p = argparse.ArgumentParser(prog="modnet aggregate", description=__doc__.splitlines()[0])
    p.add_argument("sweep_dir", help="folder with results.json files below it (a sweep folder)")
    p.add_argument("--ddof", type=int, default=0, help="std degrees of freedom: 0 population, 1 sample")
    p.add_argument("--out", default=None, help="where to write aggregate.* (default: sweep_dir)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    summary = aggregate(args.sweep_dir, out_dir=args.out, ddof=args.ddof)
    print(format_markdown(summary))
    print(f"aggregate.json/.md/.csv/.png written to {args.out or args.sweep_dir}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (FileNotFoundError, ValueError) as err:
        print(f"modnet aggregate: error: {err}", file=sys.stderr)
        sys.exit(2)
