"""Evaluation of a strategy on a test stream: the evaluator plugin and one accuracy-matrix row."""
from __future__ import annotations

import re
import warnings

_ACC_KEY = re.compile(r"Top1_Acc_Exp/eval_phase/test_stream/Task\d+/Exp(\d+)")


def make_evaluator(progress: bool):
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.logging import InteractiveLogger
    from avalanche.training.plugins import EvaluationPlugin

    if not progress:  # quiet on purpose: the results table is printed at the end
        warnings.filterwarnings("ignore", message="No loggers specified")
    return EvaluationPlugin(accuracy_metrics(experience=True), loggers=[InteractiveLogger()] if progress else [])


def accuracy_row(metrics: dict, n: int) -> list[float]:
    row = [float("nan")] * n
    for k, v in metrics.items():
        m = _ACC_KEY.fullmatch(k)
        if m:
            row[int(m.group(1))] = float(v)
    return row


def stream_evaluator(test_stream, n: int):
    """``evaluate(index, strategy)`` for ``run_experiences``: the whole test stream, one row."""
    return lambda index, strategy: accuracy_row(strategy.eval(test_stream), n)
