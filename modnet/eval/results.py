"""Continual-learning results: the accuracy matrix and what follows from it, written as JSON, CSV and PNGs."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from modnet.eval.tables import SEED_STD_DDOF, aggregate_runs, markdown_table, mean_matrix, mean_std_cell
from modnet.rundir import results_json

# The scalar results of a run that are averaged over seeds: name -> (table label, table cell format).
# stored_bytes: what the strategy keeps for inference or replay besides a baseline network's weights
# (strategies/memory.py).
SEED_METRICS = {"average_accuracy": ("avg acc", "{:.4f}"), "forgetting": ("forgetting", "{:.4f}"),
                "bwt": ("BWT", "{:.4f}"), "train_seconds": ("train s", "{:.1f}"),
                "stored_bytes": ("stored bytes", "{:.0f}")}


def summarize(matrix) -> dict:
    """R[i][j] = accuracy on test experience j after training experience i (T = last row).

    average_accuracy = mean_j R[T][j] (Lopez-Paz & Ranzato 2017's ACC);
    forgetting = mean_{j<T} (max_{j<=l<T} R[l][j] - R[T][j]) (Chaudhry et al. 2018: the drop from the best
    accuracy an experience reached once trained; ``forgetting``);
    bwt = mean_{j<T} (R[T][j] - R[j][j]) (Lopez-Paz & Ranzato 2017; Avalanche's ``bwt_metrics``).
    The two differ where an experience's accuracy rose after it was trained (a later task helped it) and then
    fell: BWT counts the fall from R[j][j] only, forgetting from the peak.
    """
    R = np.asarray(matrix, dtype=float)
    if R.ndim != 2 or R.shape[0] != R.shape[1]:
        raise ValueError(f"accuracy matrix must be square (experiences x experiences), got shape {R.shape}")
    T = R.shape[0] - 1
    bwt = float(np.mean([R[T, j] - R[j, j] for j in range(T)])) if T > 0 else 0.0
    return {"accuracy_matrix": R.tolist(), "average_accuracy": float(R[T].mean()),
            "forgetting": forgetting(R), "bwt": bwt + 0.0}  # -0.0 + 0.0 is +0.0 (-0.0 printed "-0.0000")


def forgetting(matrix) -> float:
    """Average forgetting after the last experience T (Chaudhry et al. 2018, "Riemannian walk", eq. 4):
    mean_{j<T} (max_{j<=l<T} R[l][j] - R[T][j]), each earlier experience's drop from the best accuracy it had
    once trained; 0 for a matrix of one experience. ``matrix``: square, or its lower triangle as rows of
    growing length (continual GZSL's)."""
    T = len(matrix) - 1
    return float(np.mean([max(matrix[l][j] for l in range(j, T)) - matrix[T][j] for j in range(T)])) if T > 0 else 0.0


def forgetting_ratio(matrix, joint_row, n_classes) -> float:
    """HAT's forgetting ratio (Serra et al. 2018, sec. 4.1; MISSION.md 1.1) after the last experience T:
    rho = mean_tau [(A^{tau<=T} - A_R^tau) / (A_J^{tau<=T} - A_R^tau)] - 1, with A^{tau<=T} = R[T][tau] the
    accuracy on task tau after training T, A_R^tau = 1 / n_classes[tau] a random stratified classifier's and
    A_J^{tau<=T} the accuracy on tau of joint training on tasks <= T (``joint_row``: the last row of the
    ``cumulative`` strategy, which trains on every experience so far). 0 = as good as joint training, -1 = as
    good as chance."""
    R, J = np.asarray(matrix, dtype=float), np.asarray(joint_row, dtype=float)
    chance = 1.0 / np.asarray(n_classes, dtype=float)
    return float(np.mean((R[-1] - chance) / np.maximum(J - chance, 1e-12)) - 1.0)


def add_forgetting_ratio(strategies: dict, n_classes, joint: str = "cumulative") -> None:
    """Every strategy's ``rho`` (``forgetting_ratio``) against ``joint``'s last row, seed by seed when both
    ran on several seeds (``rho`` the mean, ``rho_std``); nothing when ``joint`` did not run."""
    if joint not in strategies:
        return
    ref = strategies[joint]
    ref_runs = ref.get("per_seed", [ref])
    for r in strategies.values():
        runs = r.get("per_seed", [r])
        if len(runs) == len(ref_runs):
            rhos = [forgetting_ratio(a["accuracy_matrix"], b["accuracy_matrix"][-1], n_classes)
                    for a, b in zip(runs, ref_runs)]
        else:
            rhos = [forgetting_ratio(r["accuracy_matrix"], ref["accuracy_matrix"][-1], n_classes)]
        r["rho"] = float(np.mean(rhos))
        if len(rhos) > 1:
            r["rho_std"] = float(np.std(rhos, ddof=SEED_STD_DDOF))  # as every other _std of the results (tables)


def aggregate_seeds(runs: list[dict]) -> dict:
    """Mean over seeds of each field (``modnet.eval.tables``), plus the std of the scalar ones and the
    per-seed runs."""
    out = summarize(mean_matrix([r["accuracy_matrix"] for r in runs]))
    stats = aggregate_runs(runs, by=(), metrics=SEED_METRICS).iloc[0]
    for key in SEED_METRICS:
        out[key] = float(stats[f"{key}_mean"])
        out[f"{key}_std"] = float(stats[f"{key}_std"])
    if len(runs) > 1:
        out["per_seed"] = runs
    else:  # extra per-run fields (e.g. the module report) pass through
        out.update({k: v for k, v in runs[0].items() if k not in out})
    return out


def format_table(strategies: dict) -> str:
    """Markdown table of ``aggregate_seeds`` entries: mean ± std where a strategy ran on several seeds."""
    rows = []
    for name, r in strategies.items():
        n = len(r.get("per_seed", [r]))
        rows.append([name, *[mean_std_cell(r[k], r.get(f"{k}_std"), n, fmt) for k, (_, fmt) in SEED_METRICS.items()]])
    return markdown_table(["strategy", *[label for label, _ in SEED_METRICS.values()]], rows)


def write_results(out_dir: Path, results: dict, plots: bool = True) -> None:
    """results.json, results.csv and (``plots``) the PNGs, each written to a temporary file and renamed: a
    crash never leaves a half-written file."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "results.json.tmp"
    tmp.write_text(results_json(results))
    tmp.replace(out_dir / "results.json")
    tmp = out_dir / "results.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        # a multi-seed run: the scalars' mean and std over the seeds (the table's mean ± std), the matrix the mean
        scalars = ("average_accuracy", "forgetting", "bwt", "train_seconds")
        # run_complete: false while the run is interrupted or a strategy failed (results.json's "complete"): the
        # rows are finished strategies' results, but the run's other strategies are missing from the file
        w.writerow(["strategy", "seeds", "run_complete", *[c for k in scalars for c in (k, f"{k}_std")],
                    "stored_bytes", "after_exp", *[f"acc_exp{j}" for j in range(results["n_experiences"])]])
        complete = "true" if results.get("complete", True) else "false"
        for name, r in results["strategies"].items():
            n_seeds = len(r.get("per_seed") or [r])
            for i, row in enumerate(r["accuracy_matrix"]):
                w.writerow([name, n_seeds, complete, *[v for k in scalars for v in (r[k], r.get(f"{k}_std", 0.0))],
                            r.get("stored_bytes"), i, *row])
    tmp.replace(out_dir / "results.csv")
    if plots:
        plot_results(out_dir, results)


def save_figure(fig, path: Path, dpi: int = 120) -> None:
    """``fig.savefig`` to a temporary file, then rename (atomic)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png")
    tmp.replace(path)


def curve_limits(curves, pad: float = 0.1) -> tuple[float, float]:
    """y-axis limits scaled to the data (lines in 0.93-1.0 stay apart), padded by ``pad`` of the range (at
    least 0.01), kept inside [0, 1.02]."""
    values = np.asarray([v for c in curves for v in c], dtype=float)
    values = values[np.isfinite(values)]
    if not len(values):
        return 0.0, 1.02
    lo, hi = float(values.min()), float(values.max())
    margin = max(pad * (hi - lo), 0.01)
    return max(0.0, lo - margin), min(1.02, hi + margin)


def curve_styles(n: int) -> list[tuple]:
    """(colour, marker, line style) of ``n`` curves, no two alike: matplotlib's ten default colours, then the
    same colours with another marker and a dashed line (the default cycle repeats its colours from the 11th
    curve on: the README's MNIST-1D run plots twelve strategies)."""
    import matplotlib

    colors = matplotlib.colormaps["tab10"].colors
    markers, lines = "osD^vP*Xph", ("-", "--", ":", "-.")
    return [(colors[i % 10], markers[(i // 10) % len(markers)], lines[(i // 10) % len(lines)]) for i in range(n)]


def accuracy_matrix_figure(name: str, r: dict):
    """A strategy's accuracy matrix as a heat map, each cell's value written in it; at least 4.4 x 3.6 inches,
    so that a matrix of one or two experiences keeps its title, axis labels and colour bar inside the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    R = np.asarray(r["accuracy_matrix"])
    fig, ax = plt.subplots(figsize=(max(4.4, 1.2 + 0.7 * R.shape[1]), max(3.6, 1.0 + 0.6 * R.shape[0])))
    im = ax.imshow(R, vmin=0, vmax=1, cmap="viridis")
    for i in range(R.shape[0]):
        for j in range(R.shape[1]):
            ax.text(j, i, f"{R[i, j]:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if R[i, j] < 0.5 else "black")
    # experiences counted from 1, as the progress lines and the curves count them (results.json and
    # results.csv keep Avalanche's ids, from 0)
    ax.set_xticks(range(R.shape[1]), range(1, R.shape[1] + 1))
    ax.set_yticks(range(R.shape[0]), range(1, R.shape[0] + 1))
    ax.set_xlabel("test experience")
    ax.set_ylabel("after training experience")
    n_seeds = len(r.get("per_seed") or [r])
    ax.set_title(f"{name}: accuracy matrix" + (f"\nmean of {n_seeds} seeds" if n_seeds > 1 else ""), fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def plot_results(out_dir: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    strategies = results["strategies"]
    for name, r in strategies.items():
        fig = accuracy_matrix_figure(name, r)
        save_figure(fig, out_dir / f"accuracy_matrix_{name}.png")
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    curves = []
    for (name, r), (color, marker, line) in zip(strategies.items(), curve_styles(len(strategies))):
        R = np.asarray(r["accuracy_matrix"])
        seen_avg = [R[i, : i + 1].mean() for i in range(R.shape[0])]
        curves.append(seen_avg)
        ax.plot(range(1, len(seen_avg) + 1), seen_avg, color=color, marker=marker, linestyle=line, label=name)
    ax.set_xticks(range(1, results["n_experiences"] + 1))
    ax.set_xlabel("experiences trained")
    ax.set_ylabel("mean accuracy on experiences seen so far")
    ax.set_ylim(*curve_limits(curves))
    n_seeds = len(results.get("seeds") or [None])
    ax.set_title(f"{results['benchmark']} ({results['scenario']}-incremental)"
                 + (f", mean of {n_seeds} seeds" if n_seeds > 1 else ""))
    # beside the axes, not over the curves (twelve strategies' legend covered modnet's curve)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, out_dir / "accuracy_curves.png")
    plt.close(fig)
