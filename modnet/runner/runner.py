"""The experience runner: the one loop that trains a strategy experience by experience.

For every experience of the training stream: seed it (so a resumed run gives the numbers of an
uninterrupted one), train it, time it, let the hooks look at the strategy (drift snapshots, data-parallel
checks, zero-shot extension), evaluate (by default the whole test stream, one row of the accuracy matrix),
and checkpoint atomically. ``modnet cl``, ``modnet ddp``, continual ``modnet gzsl`` and ``modnet bench``
build their strategies with ``make_strategy`` and run them with ``run_experiences``.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch


def set_seed(seed: int) -> None:
    from avalanche.training.determinism.rng_manager import RNGManager

    RNGManager.set_random_seeds(seed)  # python, numpy and torch generators, as Avalanche's loaders use them


def strategy_arguments(cfg, device, evaluator, train=None) -> dict:
    """The arguments every strategy shares (Avalanche template keywords), from the ``train`` config block."""
    t = cfg.train if train is None else train
    smoothing = float(t.get("label_smoothing", 0.0))  # configs/gzsl.yaml train block only
    if not 0.0 <= smoothing < 1.0:
        from modnet.config import ConfigError

        raise ConfigError(f"train.label_smoothing={smoothing} must lie in [0, 1)")
    return dict(criterion=torch.nn.CrossEntropyLoss(label_smoothing=smoothing), train_mb_size=t.batch_size,
                train_epochs=t.epochs, eval_mb_size=t.eval_batch_size, device=device, evaluator=evaluator,
                eval_every=-1)


def make_strategy(name: str, cfg, info, device, evaluator, plugins: Sequence = ()):
    """Strategy ``name`` from the registry with the shared arguments, HAT's reference loop when configured
    (``validation_schedule``), the NaN guard and the speed options of ``cfg.train`` (bf16 autocast,
    channels_last, batches sliced from tensors: ``tensor_batches``, ``compile``), plus ``plugins``."""
    from modnet.runner.evaluation import use_lean_evaluation
    from modnet.runner.guards import NaNGuard
    from modnet.runner.tensor_batches import use_tensor_batches
    from strategies.registry import build_strategy

    strategy = build_strategy(name, cfg, info, strategy_arguments(cfg, device, evaluator))
    use_tensor_batches(strategy, bool(cfg.train.get("tensor_batches", True)))
    use_lean_evaluation(strategy)  # callbacks no metric or logger listens to are not forwarded each step
    schedule = validation_schedule(cfg.train)
    if schedule is not None:  # first: its restore-best runs before any plugin consolidates the task
        strategy.plugins.insert(0, schedule)
    strategy.plugins.append(NaNGuard())
    if cfg.train.amp:
        from strategies.plugins.perf import AutocastPlugin

        strategy.plugins.append(AutocastPlugin(device.type))
    if channels_last(cfg.train.channels_last, device) and info.is_image:
        from strategies.plugins.perf import ChannelsLastPlugin

        strategy.plugins.append(ChannelsLastPlugin())
    backend = compile_backend(cfg.train.get("compile", False))
    if backend is not None and compiles(strategy):
        if hasattr(strategy.model, "masked_pass"):  # the modular networks (HATNet): the step's losses too
            strategy.train_condition.compiled = backend
        else:  # a baseline on Avalanche's forward: its training forward
            strategy.compiled_forward = backend
        # the first step of each experience waits for its graph: said before, not mistaken for a hang
        print(f"[{name}] train.compile={backend}: each experience's first training step compiles its graph "
              "(seconds to minutes)", flush=True)
    elif backend is not None:
        print(f"[{name}] train.compile={backend}: not compiled (its own forward), it trains eager", flush=True)
    strategy.plugins.extend(plugins)
    return strategy


def compiles(strategy) -> bool:
    """Whether ``train.compile`` reaches this strategy: the modular networks' training step, or the training
    forward of a strategy on Avalanche's forward (``modnet.runner.tensor_batches.batch_forward``); not a
    strategy with a forward of its own (hnet's hypernetwork)."""
    return hasattr(strategy.model, "masked_pass") or hasattr(type(strategy), "compiled_forward")


def compile_backend(option) -> str | None:
    """``train.compile``: false (eager), true (inductor) or a ``torch.compile`` backend's name. It compiles
    the modular networks' training step (``strategies.template.compiled_training_loss``: masks, gates, HAT's
    compensation, the layers, the criterion and the plugins' loss terms; behind data-parallel training, the
    masked pass alone, ``modnet.nets.models.compiled_masked_pass``) and the baselines' training forwards
    (``modnet.runner.tensor_batches.compiled_batch_forward``; their losses eager; ``compiles``); every
    evaluation runs eager."""
    if option is None or option is False:
        return None
    backend = "inductor" if option is True else str(option)
    import torch._dynamo

    known = torch._dynamo.list_backends(exclude_tags=())
    if backend not in known:
        from modnet.config import ConfigError

        raise ConfigError(f"train.compile={option!r} is not a torch.compile backend; use true (inductor), false, "
                          f"or one of {', '.join(known)}")
    return backend


def channels_last(option, device) -> bool:
    """``train.channels_last``: true / false, or auto = on the CPU. There max_pool2d runs ~10x faster on a
    channels_last map (torch 2.14, one thread: 1.0 vs 12.3 ms on 64 x 32 x 32 x 32) and the small CNN's
    training epoch took 0.88 s instead of 1.25 s (bench CNN, 1024 images); on CUDA it pays under bf16
    autocast (tensor cores), so it stays a choice there."""
    if option == "auto":
        return device.type == "cpu"
    return bool(option)


def validation_schedule(train):
    """HAT's reference loop (``strategies.plugins.validation``) from the ``train`` block, or None when its
    options are all off (``valid_fraction`` 0, ``lr_patience`` null, ``restore_best`` false: today's loop)."""
    fraction = float(train.get("valid_fraction", 0.0) or 0.0)
    patience = train.get("lr_patience", None)
    restore = bool(train.get("restore_best", False))
    if fraction == 0 and patience is None and not restore:
        return None
    from strategies.plugins.validation import ValidationSchedulePlugin

    return ValidationSchedulePlugin(fraction, patience, float(train.get("lr_factor", 3.0)),
                                    float(train.get("lr_min", 1e-4)), restore, int(train.eval_batch_size))


def strategy_result(name: str, strategy, info, record: "RunRecord") -> dict:
    """What a strategy's run reports: the accuracy matrix and its summary (``modnet.eval.results``), the
    training time, the bytes it stores for inference or replay (its registry entry's ``stored_bytes``), the
    values it trained with (its entry's ``settings``, where it has them) and its network's description."""
    from modnet.eval.results import summarize
    from modnet.nets.record import describe_network
    from strategies.registry import get_strategy

    entry = get_strategy(name)
    count = entry.stored_bytes
    return {**summarize(record.rows), "train_seconds": record.train_seconds,
            "stored_bytes": None if count is None else int(count(strategy, info)),
            **({"settings": entry.settings(strategy)} if entry.settings is not None else {}),
            "network": describe_network(strategy.model)}


class RunnerHook:
    """Called by ``run_experiences`` around each experience (override what you need).

    A hook that keeps something across experiences a resumed run needs (e.g. a snapshot taken after experience 0)
    sets ``state_key`` and returns it from ``state_dict`` (tensors, lists of tensors, numbers: what
    ``torch.load(weights_only=True)`` reads); it is saved in every checkpoint and given back to
    ``load_state_dict`` on resume."""

    state_key: str | None = None

    def after_training_exp(self, index: int, strategy) -> None:
        """Experience ``index`` is trained, not yet evaluated."""

    def after_eval_exp(self, index: int, strategy, row: list[float]) -> None:
        """Experience ``index`` is trained and evaluated (``row``: its accuracy-matrix row)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class ExperienceLine(RunnerHook):
    """Runner hook: one line per experience evaluated, ``prefix`` then the mean accuracy on the experiences seen
    so far: what a log file or a pipe shows of a run, where no progress bar does."""

    def __init__(self, prefix: str, n: int):
        self.prefix, self.n = prefix, n

    def after_eval_exp(self, index: int, strategy, row: list[float]) -> None:
        seen = [a for a in row[: index + 1] if a == a]
        mean = sum(seen) / len(seen) if seen else float("nan")
        print(f"{self.prefix} experience {index + 1}/{self.n} trained: mean accuracy on the {index + 1} seen "
              f"{mean:.4f}", flush=True)


@dataclass
class RunRecord:
    """What a run of the experiences gives: the accuracy matrix rows and the training time."""

    rows: list[list[float]] = field(default_factory=list)
    train_seconds: float = 0.0
    resumed_at: int = 0


def save_atomic(obj, path: Path) -> None:
    """torch.save to a temporary file, then rename: a crash never leaves a truncated checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, warn: Callable[[str], None] | None = None) -> dict | None:
    """A checkpoint written by the runner (tensors only: ``weights_only=True``), or None when absent.

    An unreadable one (truncated, 0 bytes, not written by the runner) is named in one warning line, moved
    aside to ``<name>.corrupt`` (kept, not overwritten) and None is returned: that strategy starts over."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or "done" not in state:
            raise ValueError("not a runner checkpoint")
        return state
    except Exception as err:  # torch raises assorted errors on a damaged file
        aside = path.with_name(path.name + ".corrupt")
        os.replace(path, aside)
        reason = str(err).strip().splitlines()[0][:80] if str(err).strip() else type(err).__name__
        (warn or _warn_line)(f"warning: checkpoint {path} is unreadable ({reason}); moved to {aside.name}, "
                             "this strategy restarts from its first experience")
        return None


def _warn_line(msg: str) -> None:
    import sys

    print(msg, file=sys.stderr, flush=True)


def finished_result(state: dict | None) -> dict | None:
    """The result stored in a finished strategy's checkpoint, else None."""
    if state is not None and state.get("done"):
        return json.loads(state["result"])
    return None


def save_finished(path: Path, result: dict, meta: dict | None = None) -> None:
    save_atomic({"done": True, "result": json.dumps(result), **(meta or {})}, path)


def run_experiences(strategy, train_stream, evaluate: Callable[[int, object], list[float]], *, seed: int,
                    checkpoint: Path | None = None, resume_state: dict | None = None,
                    test_stream=None, hooks: Sequence[RunnerHook] = (), log: Callable[[str], None] = print,
                    checkpoint_meta: dict | None = None) -> RunRecord:
    """Train ``strategy`` on each experience of ``train_stream``; after each, ``evaluate(index, strategy)``
    gives the accuracy-matrix row.

    ``resume_state``: a checkpoint of this strategy written by an earlier run (``next_exp``, ``model``,
    ``rows``, ``train_seconds``): training continues at ``next_exp`` with the saved model. The model is first
    given the structure it had grown: the gates the checkpoint holds (a modular network's gates are made per
    task), and the adaptation (heads grown) to the training experiences so far and, when given,
    ``test_stream`` (evaluation adapts multi-head models to every test experience). ``checkpoint_meta``: extra
    entries (strings, e.g. the run fingerprint) stored in every checkpoint.
    """
    record = RunRecord()
    start = 0
    if resume_state is not None:
        from avalanche.models.dynamic_modules import avalanche_model_adaptation

        start = int(resume_state["next_exp"])
        gate = getattr(strategy.model, "gate", None)
        if gate is not None:  # gates made per task from a clustering: their shapes are in the checkpoint
            gate.rebuild_from_state(resume_state["model"], "gate.", next(strategy.model.parameters()).device)
        strategy.model.train()
        for exp in list(train_stream)[:start]:
            avalanche_model_adaptation(strategy.model, exp)
        strategy.model.eval()
        for exp in (test_stream or []):
            avalanche_model_adaptation(strategy.model, exp)
        strategy.model.load_state_dict(resume_state["model"])
        record.rows = [list(r) for r in resume_state["rows"].tolist()]
        record.train_seconds = float(resume_state["train_seconds"])
        record.resumed_at = start
        saved_hooks = resume_state.get("hooks") or {}
        for hook in hooks:
            if hook.state_key is not None and hook.state_key in saved_hooks:
                hook.load_state_dict(saved_hooks[hook.state_key])
        n = len(train_stream)
        log(f"resumed: experiences 1-{start} of {n} done" + (f", continuing with experience {start + 1}"
                                                               if start < n else ""))
    for i, exp in enumerate(train_stream):
        if i < start:
            continue
        set_seed(seed * 1000 + i)
        t0 = time.perf_counter()
        strategy.train(exp)
        record.train_seconds += time.perf_counter() - t0
        for hook in hooks:
            hook.after_training_exp(i, strategy)
        row = evaluate(i, strategy)
        record.rows.append(row)
        for hook in hooks:
            hook.after_eval_exp(i, strategy, row)
        if checkpoint is not None:
            # rows in float64: a resumed run's matrix is the uninterrupted run's, bit for bit
            save_atomic({"next_exp": i + 1, "model": strategy.model.state_dict(),
                         "rows": torch.tensor(record.rows, dtype=torch.float64),
                         "train_seconds": record.train_seconds, "done": False, **(checkpoint_meta or {}),
                         "hooks": {h.state_key: h.state_dict() for h in hooks if h.state_key is not None}},
                        checkpoint)
    return record
