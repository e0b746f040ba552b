"""Every strategy by name, one self-registering file each (Mammoth's ``models/`` pattern).

A strategy is an Avalanche ``SupervisedTemplate`` (Avalanche runs the loop, evaluation and logging) with
plugins. Each lives in its own file ``strategies/<name>.py`` with its hyper-parameters documented beside
it and its config block in ``configs/training.yaml``; the file registers a builder
``build(cfg, info, common) -> SupervisedTemplate`` with ``@register_strategy(NAME, ...)``. ``common`` holds
the arguments every strategy shares (criterion, batch sizes, epochs, device, evaluator), so all of them run
with the same backbone widths, optimiser, epochs and batch sizes. What a data-parallel run and a resumed
run need to know about a strategy is declared with it, not kept in a list elsewhere.

The entry files import nothing heavy at import time: listing the names (``strategy_names``) to check a
config costs no Avalanche import.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable

from modnet.config import check_choice

# files of this package that are not strategies
_NOT_ENTRIES = {"registry", "template", "update", "plugins", "common", "memory"}


@dataclass(frozen=True)
class StrategyEntry:
    """A registered strategy.

    gradient_sync           data-parallel runs: "ddp" (gradients averaged in the DDP backward), "allreduce"
                            (one all-reduce after the backward, for plugins that backpropagate through
                            parameters the DDP forward did not use), None (cannot run data-parallel), or
                            ``f(strategy) -> "ddp" | "allreduce"`` where it depends on the built model
    no_ddp_reason           why not, when gradient_sync is None
    resumes_at_experience   the whole state is the model's state dict (plain SGD, no plugin state): a resumed
                            run continues at the next experience; the others re-run from their first one
    stored_bytes            ``f(strategy, info) -> int``: the bytes it keeps for inference or replay besides a
                            baseline network's weights, read after the last experience (``strategies.memory``)
    settings                ``f(strategy) -> dict``: values it trained with that its config may not say, read
                            from the strategy after the last experience (a buffer's size where the config said
                            ``match``, EWC's λ per experience after its stability bound); results.json's
                            ``settings``
    """

    name: str
    build: Callable
    gradient_sync: str | Callable | None = "ddp"
    no_ddp_reason: str | None = None
    resumes_at_experience: bool = False
    stored_bytes: Callable | None = None
    settings: Callable | None = None


STRATEGIES: dict[str, StrategyEntry] = {}


def register_strategy(name: str, *, stored_bytes: Callable, gradient_sync: str | Callable | None = "ddp",
                      no_ddp_reason: str | None = None, resumes_at_experience: bool = False,
                      settings: Callable | None = None) -> Callable:
    """Decorator of a strategy file's builder: ``@register_strategy("mine", stored_bytes=...)``."""
    if gradient_sync not in ("ddp", "allreduce", None) and not callable(gradient_sync):
        raise ValueError(f"gradient_sync must be 'ddp', 'allreduce', None or a function of the strategy, "
                         f"got {gradient_sync!r}")

    def register(build: Callable) -> Callable:
        if name in STRATEGIES and STRATEGIES[name].build is not build:
            raise ValueError(f"strategy {name!r} is registered twice")
        STRATEGIES[name] = StrategyEntry(name, build, gradient_sync, no_ddp_reason, resumes_at_experience,
                                         stored_bytes, settings)
        return build

    return register


def _load_entries() -> None:
    import strategies

    for info in pkgutil.iter_modules(strategies.__path__):
        if info.name not in _NOT_ENTRIES and not info.name.startswith("_"):
            importlib.import_module(f"strategies.{info.name}")


def strategy_names() -> list[str]:
    _load_entries()
    return list(STRATEGIES)


def get_strategy(name: str) -> StrategyEntry:
    check_choice("strategies", name, strategy_names())
    return STRATEGIES[name]


def build_strategy(name: str, cfg, info, common: dict):
    """Strategy ``name`` for benchmark ``info`` (``scenarios.BenchmarkInfo``), with the shared arguments."""
    return get_strategy(name).build(cfg, info, common)
