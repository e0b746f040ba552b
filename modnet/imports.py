"""Deferred imports of the packages Avalanche imports at its own import but a ``modnet`` command rarely uses.

``import avalanche`` executes ``import wandb`` (its confusion-matrix metric, for a W&B chart) and ``import
qpsolvers`` (its GEM plugin, which solves a QP after each experience; qpsolvers imports jax to find its solvers)
at the top of their modules. Both are used only inside functions: wandb when a W&B logger or chart is asked for,
qpsolvers when GEM runs. ``defer_unused_imports`` puts a deferred module in their place: ``import wandb``
returns at once, and the package's code runs in full, in that module, at the first access of an attribute it
does not have yet (``wandb.init``, ``qpsolvers.solve_qp``, or ``__path__``, which an import of a submodule reads
first, so ``import wandb.sdk`` runs ``wandb/__init__`` before it as an ordinary import would). Its ``__name__``,
``__file__`` and ``__spec__`` are there from the start: ``inspect.getmodule``, which torch and pydantic call at
their imports, reads ``__file__`` of every module in ``sys.modules``; ``importlib.util.LazyLoader``'s modules load
on any attribute, so that scan loaded both packages at once. Measured (AMD EPYC, AVX512, stop 35): the imports of
``modnet gzsl`` 10.9 s, of which qpsolvers 1.3 s (jax 1.2 s) and wandb 1.0 s.

The ``modnet`` command calls it before a job's imports (the process is the command's); a library user's process
is left alone unless it calls it.
"""
from __future__ import annotations

import importlib.util
import sys
import threading
import types

DEFERRED = ("wandb", "qpsolvers")
_LOAD = threading.RLock()


class _DeferredModule(types.ModuleType):
    """A package whose code has not run yet: the first missing attribute runs it in this module."""

    def __getattr__(self, attr: str):
        with _LOAD:
            if type(self) is _DeferredModule:  # not loaded by another thread meanwhile
                spec = self.__spec__
                self.__class__ = types.ModuleType
                if spec.submodule_search_locations is not None:
                    self.__path__ = spec.submodule_search_locations
                try:
                    spec.loader.exec_module(self)
                except BaseException:
                    sys.modules.pop(spec.name, None)  # as a failed import leaves it: absent
                    raise
        return getattr(self, attr)


def defer_unused_imports(names: tuple[str, ...] = DEFERRED) -> list[str]:
    """Register a deferred module for each of ``names`` that is installed and not imported yet; returns those
    registered. A name already imported, or not installed, is left as it is (its import then fails or succeeds
    as it would have)."""
    deferred = []
    for name in names:
        if name in sys.modules:
            continue
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            continue
        module = importlib.util.module_from_spec(spec)
        module.__dict__.pop("__path__", None)  # read by a submodule's import: it loads the package first
        module.__class__ = _DeferredModule
        sys.modules[name] = module
        deferred.append(name)
    return deferred
