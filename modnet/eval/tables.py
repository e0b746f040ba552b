"""Mean and standard deviation over runs, per setting, and the tables that show them.

The one implementation behind every average over seeds in modnet: ``modnet cl`` (a strategy's seeds,
``modnet.eval.results.aggregate_seeds``), ``modnet gzsl`` (a method's seeds) and ``modnet aggregate`` (the runs
of a sweep folder, grouped by setting). A run is a flat record, setting columns plus metric columns; pandas
groups the records by setting. The std has ``ddof`` degrees of freedom: 0 (population std, numpy's default
and the convention of the results files) or 1 (sample std). A NaN metric value (a run that did not report
the metric) is left out of that metric's statistics.

A group of one run has no spread to show: its table cells give the value alone, not "± 0.000".
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import pandas as pd


# the ddof of every "_std" over seeds in the results files and tables of cl, ddp and gzsl (results.json's
# "std_ddof"); modnet aggregate --ddof 1 recomputes the sample std from a run folder
SEED_STD_DDOF = 0


def seeds_note(n_seeds: int, sample_std: str = "") -> str:
    """The line under a table of mean ± std over ``n_seeds`` seeds that says which std it is (and ``sample_std``:
    where the sample std is to be had); "" for one seed."""
    if n_seeds < 2:
        return ""
    scale = math.sqrt((n_seeds - 1) / n_seeds)  # population std = sample std x sqrt((n - 1) / n)
    return (f"mean ± std over {n_seeds} seeds; std: population (ddof {SEED_STD_DDOF}), {scale:.2f}x the sample std"
            + (f"; {sample_std}" if sample_std else ""))


def aggregate_runs(records: Sequence[dict], by: Sequence[str], metrics: Sequence[str],
                   ddof: int = SEED_STD_DDOF) -> pd.DataFrame:
    """One row per setting (distinct values of the ``by`` columns, sorted; with no ``by``, one row for all
    records): the ``by`` columns, ``n`` (runs), then per metric ``<metric>_mean``, ``<metric>_std`` and
    ``<metric>_count`` (runs that reported it). Other keys of the records are ignored."""
    by, metrics = list(by), list(metrics)
    frame = pd.DataFrame.from_records(list(records), columns=[*by, *metrics])
    frame[metrics] = frame[metrics].astype(float)
    grouped = frame.groupby(by, sort=True, dropna=False) if by else frame.groupby(lambda _: 0)
    values = grouped[metrics]
    stats = {"mean": values.mean(), "std": values.std(ddof=ddof), "count": values.count()}
    out = pd.DataFrame({"n": grouped.size()})
    for m in metrics:
        for stat, table in stats.items():
            out[f"{m}_{stat}"] = table[m]
    return out.reset_index(drop=not by)


def mean_matrix(matrices: Sequence) -> list[list[float]]:
    """Element-wise mean of equally shaped matrices (e.g. the accuracy matrices of a strategy's seeds)."""
    stacked = pd.concat([pd.DataFrame(m, dtype=float) for m in matrices])
    return stacked.groupby(level=0).mean().to_numpy().tolist()


def mean_std_cell(mean: float | None, std: float | None, count: int, fmt: str = "{:.4f}") -> str:
    """``mean ± std`` over ``count`` runs; the mean alone for one run (or no std), ``n/a`` for none."""
    if mean is None or math.isnan(mean):
        return "n/a"
    text = fmt.format(mean)
    if text.startswith("-") and float(text) == 0.0:  # -0.0 (BWT of no forgetting) or a tiny negative: no sign
        text = text[1:]
    if count < 2 or std is None or math.isnan(std):
        return text
    return f"{text} ± {fmt.format(std)}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A markdown table: the header, its separator, one line per row (cells as given, str()-ed)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


def write_csv(path: Path, rows: Sequence[dict]) -> None:
    """A CSV file of table rows (dicts; columns in the first row's key order): floats at full precision,
    missing values (None, NaN) as empty cells."""
    pd.DataFrame.from_records(list(rows)).to_csv(path, index=False)
