"""Evaluation inside the runner: one accuracy-matrix row per trained experience."""
from __future__ import annotations


def stream_evaluator(test_stream, accuracy):
    """``evaluate(index, strategy)`` for ``run_experiences``: the strategy evaluates the whole test stream and
    the row is the last one of ``accuracy`` (a ``modnet.eval.metrics.AccuracyMatrix`` in its evaluator)."""

    def evaluate(index, strategy):
        strategy.eval(test_stream)
        return accuracy.matrix()[-1]

    return evaluate
