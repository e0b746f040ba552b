"""Evaluation inside the runner: one accuracy-matrix row per trained experience."""
from __future__ import annotations

import functools


def stream_evaluator(test_stream, accuracy):
    """``evaluate(index, strategy)`` for ``run_experiences``: the strategy evaluates the whole test stream and
    the row is the last one of ``accuracy`` (a ``modnet.eval.metrics.AccuracyMatrix`` in its evaluator)."""

    def evaluate(index, strategy):
        strategy.eval(test_stream)
        return accuracy.matrix()[-1]

    return evaluate


def _overrides(obj, callback: str, base: type) -> bool:
    """Whether ``obj``'s class implements ``callback`` beyond ``base``'s no-op."""
    mine = getattr(type(obj), callback, None)
    return mine is not None and mine is not getattr(base, callback, None)


@functools.cache
def lean_evaluation_class(cls: type) -> type:
    """A subclass of Avalanche's ``EvaluationPlugin`` (``cls``) that does not answer the callbacks nobody
    listens to.

    ``EvaluationPlugin`` answers every ``before_*``/``after_*`` callback it does not define by forwarding it to
    its metrics and loggers, and each forward first swaps ``strategy.experience`` for a logging copy of it
    (``experience.logging()``, a ``copy.copy``): eight times per training step, whatever the metrics. When no
    logger is attached and no metric implements a callback beyond ``PluginMetric``'s no-op, that forward has
    no effect (the experience is restored, nothing is published), so this class reports the callback as
    absent and Avalanche's ``trigger_plugins`` (``hasattr``) skips the plugin for it. With a logger, or a metric
    that listens (the minibatch/epoch accuracy and loss metrics of the loggers), it forwards as before."""
    from avalanche.evaluation.metric_definitions import PluginMetric

    class LeanEvaluation(cls):
        def __getattribute__(self, item):
            if item.startswith(("before_", "after_")):
                d = object.__getattribute__(self, "__dict__")
                cache = d.setdefault("_lean_listens", {})
                listens = cache.get(item)
                if listens is None:
                    defined = any(item in vars(k) for k in type(self).__mro__)
                    listens = cache[item] = defined or bool(d.get("loggers")) or any(
                        _overrides(m, item, PluginMetric) for m in d.get("metrics", ()))
                if not listens:
                    raise AttributeError(item)
            return super().__getattribute__(item)

    LeanEvaluation.__name__ = LeanEvaluation.__qualname__ = f"Lean{cls.__name__}"
    return LeanEvaluation


def use_lean_evaluation(strategy) -> None:
    """Switch the strategy's ``EvaluationPlugin`` (``strategy.evaluator``) to ``lean_evaluation_class``."""
    from avalanche.training.plugins import EvaluationPlugin

    evaluator = getattr(strategy, "evaluator", None)
    if isinstance(evaluator, EvaluationPlugin) and not type(evaluator).__name__.startswith("Lean"):
        evaluator.__class__ = lean_evaluation_class(type(evaluator))
