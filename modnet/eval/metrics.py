"""The evaluation layer of ``modnet cl``: the accuracy matrix as an Avalanche metric, and the evaluator.

``AccuracyMatrix`` is a ``PluginMetric``: during every evaluation phase it counts, per test experience, the
correct predictions of the strategy's minibatch outputs (Avalanche's ``Accuracy``, with the count kept on the
device until the phase ends) and, when the phase ends, appends the
row R[i][j] = accuracy on test experience j after training experience i (NaN for experiences the phase did
not evaluate). Keying by the experience itself, not by a metric name, makes it the same for task-incremental
benchmarks (a task label per experience) and class-incremental ones (one label for all).

``build_evaluator`` puts it into an ``EvaluationPlugin`` with Avalanche's accuracy, loss, forgetting, BWT
and timing metrics and the loggers a run asks for (``LOGGERS``). The forgetting and BWT that modnet reports
are computed from the matrix (``modnet.eval.results.summarize``): BWT as Avalanche's, forgetting as Chaudhry
et al. 2018's (from each experience's peak; Avalanche's logged forgetting is -BWT); Avalanche's own metrics
are there for its loggers, and only when a logger is there to show them: the per-step training
metrics cost a host sync every step.
"""
from __future__ import annotations

import math
import uuid
import warnings
from pathlib import Path
from typing import Sequence

import torch
from avalanche.evaluation import PluginMetric
from avalanche.evaluation.metric_utils import stream_type

from modnet.config import ConfigError

# interactive: tqdm bars on the terminal; text: output_dir/log.txt; csv: output_dir/csv/;
# tensorboard: output_dir/tb/; wandb: an offline Weights & Biases run under output_dir/wandb/.
LOGGERS = ("interactive", "text", "csv", "tensorboard", "wandb")


class AccuracyMatrix(PluginMetric[list]):
    """R[i][j]: accuracy on experience j of ``stream`` after training experience i, one row per eval phase.

    Rows are appended in the order of ``strategy.eval`` calls over ``stream`` (evaluations of other streams
    leave the matrix alone), so evaluating the test stream once after each trained experience gives the
    square matrix of ``modnet.eval.results.summarize``. Every row has one column per experience of the whole
    stream, also when a phase evaluates only a slice of it.
    """

    def __init__(self, stream: str = "test"):
        super().__init__()
        self.stream = stream
        self.reset()

    def reset(self) -> None:
        """Forget every row: a fresh matrix for a fresh strategy."""
        self._rows: list[dict[int, float]] = []
        self._width = 0
        # per experience of the phase: (correct predictions, a tensor on the outputs' device; samples). Avalanche's
        # Accuracy reads each batch's count on the host (a device sync per evaluation batch on a GPU); these
        # are read once per experience, at the end of the phase. The same accuracy: its mean of batch
        # accuracies weighted by batch size is correct / samples.
        self._phase: dict[int, tuple[torch.Tensor, int]] = {}

    def result(self) -> list[list[float]]:
        return self.matrix()

    def matrix(self) -> list[list[float]]:
        """The rows so far, each ``n_experiences`` long, NaN where an experience was not evaluated."""
        return [[row.get(j, math.nan) for j in range(self._width)] for row in self._rows]

    def before_eval(self, strategy) -> None:
        self._phase = {}

    def after_eval_iteration(self, strategy) -> None:
        super().after_eval_iteration(strategy)
        exp = strategy.experience
        if stream_type(exp) == self.stream:
            correct = _correct(strategy.mb_output, strategy.mb_y)
            j = exp.current_experience
            if j in self._phase:
                total, n = self._phase[j]
                self._phase[j] = (total + correct, n + len(strategy.mb_y))
            else:
                self._phase[j] = (correct, len(strategy.mb_y))
            self._width = max(self._width, _stream_length(exp), exp.current_experience + 1)

    def after_eval(self, strategy) -> None:
        if self._phase:
            self._rows.append({j: int(correct) / n if n else 0.0 for j, (correct, n) in self._phase.items()})
        self._phase = {}


def _correct(output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """How many predictions are right, on the outputs' device (as Avalanche's ``Accuracy``: logits or
    one-hot rows are read by their argmax)."""
    predicted = output.argmax(1) if output.dim() > 1 else output
    true = y.argmax(1) if y.dim() > 1 else y
    if len(predicted) != len(true):
        raise ValueError("Size mismatch for true and predicted tensors")
    return (predicted == true).sum()


def _stream_length(experience) -> int:
    """Experiences in the whole stream an experience comes from. Avalanche's classic benchmarks point a
    sliced stream's experiences to the slice (the whole stream is in ``benchmark.streams``); the newer ones
    point them to the whole stream."""
    origin = experience.origin_stream
    streams = getattr(getattr(origin, "benchmark", None), "streams", {})
    return len(streams.get(origin.name, origin))


def check_loggers(loggers: Sequence[str]) -> None:
    """A ``ConfigError`` naming the valid choices for any unknown logger name."""
    unknown = [name for name in loggers if name not in LOGGERS]
    if unknown:
        raise ConfigError(f"config loggers: unknown logger(s) {', '.join(map(repr, unknown))}; choose among "
                          f"{', '.join(LOGGERS)}")


def shows_progress_bars(progress: bool) -> bool:
    """tqdm bars only when asked and stdout is a terminal; elsewhere the runner prints a line per experience."""
    import sys

    return bool(progress) and sys.stdout.isatty()


def build_evaluator(loggers: Sequence[str], output_dir, progress: bool, extra_metrics: bool = True):
    """An ``EvaluationPlugin`` with an ``AccuracyMatrix`` and the ``loggers`` named (see ``LOGGERS``);
    returns ``(evaluator, accuracy_matrix)``.

    ``interactive`` is dropped when ``progress`` is false or stdout is not a terminal (a log file would get
    every tqdm redraw; ``shows_progress_bars``). File loggers write below ``output_dir`` (one
    folder per run: two runs in one folder would overwrite each other's CSV files). With ``extra_metrics``
    and at least one logger, Avalanche's accuracy and loss (epoch, experience, stream), forgetting and BWT
    (experience, stream) and timing (epoch, experience) metrics are added for the loggers.
    """
    from avalanche.evaluation.metrics import (accuracy_metrics, bwt_metrics, forgetting_metrics, loss_metrics,
                                              timing_metrics)
    from avalanche.training.plugins import EvaluationPlugin

    check_loggers(loggers)
    progress = shows_progress_bars(progress)
    names = [name for name in dict.fromkeys(loggers) if name != "interactive" or progress]
    made = [_make_logger(name, Path(output_dir)) for name in names]
    accuracy = AccuracyMatrix()
    metrics = [accuracy]
    if extra_metrics and made:
        metrics += [*accuracy_metrics(epoch=True, experience=True, stream=True),
                    *loss_metrics(epoch=True, experience=True, stream=True),
                    *forgetting_metrics(experience=True, stream=True), *bwt_metrics(experience=True, stream=True),
                    *timing_metrics(epoch=True, experience=True)]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="No loggers specified")  # quiet on purpose: no loggers asked
        evaluator = EvaluationPlugin(*metrics, loggers=made)
    return evaluator, accuracy


def close_loggers(evaluator) -> None:
    """Flush and close the files (and the W&B run) that ``build_evaluator``'s loggers hold open."""
    from avalanche.logging import CSVLogger, InteractiveLogger, TensorboardLogger, TextLogger, WandBLogger

    for logger in evaluator.loggers:
        if isinstance(logger, CSVLogger):
            logger.close()
        elif isinstance(logger, TextLogger) and not isinstance(logger, InteractiveLogger):  # that one is stdout
            logger.file.close()
        elif isinstance(logger, TensorboardLogger):
            logger.writer.close()
        elif isinstance(logger, WandBLogger):
            logger.wandb.finish()


def _make_logger(name: str, output_dir: Path):
    from avalanche.logging import CSVLogger, InteractiveLogger, TensorboardLogger, TextLogger

    if name == "interactive":
        return InteractiveLogger()
    output_dir.mkdir(parents=True, exist_ok=True)
    if name == "text":
        return TextLogger(open(output_dir / "log.txt", "a"))  # appends: a resumed run continues its log
    if name == "csv":
        return CSVLogger(output_dir / "csv")
    if name == "tensorboard":
        return TensorboardLogger(output_dir / "tb")
    return _wandb_logger(output_dir)


def _wandb_logger(output_dir: Path):
    """Avalanche's ``WandBLogger`` as an offline run in ``output_dir/wandb`` (sync it later with ``wandb sync``).

    Avalanche 0.6.0's logger calls ``wandb.util.generate_id`` and ``wandb.viz``, which current wandb no
    longer has: the run id is given here, and scalars (all that ``build_evaluator``'s metrics emit) are
    logged without the ``wandb.viz`` type checks.
    """
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise ConfigError("logger wandb needs the wandb package: pip install wandb") from None
    from avalanche.logging import WandBLogger

    class OfflineWandBLogger(WandBLogger):
        def log_single_metric(self, name, value, x_plot):
            self.step = x_plot
            if isinstance(value, (int, float)):
                self.wandb.log({name: value}, step=x_plot)

    return OfflineWandBLogger(project_name="modnet", run_name=output_dir.name, dir=str(output_dir),
                              save_code=False, params={"mode": "offline", "id": uuid.uuid4().hex[:8]})
