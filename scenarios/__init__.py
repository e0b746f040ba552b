"""Data sources turned into Avalanche benchmarks.

Every benchmark is a file ``scenarios/benchmarks/<name>.py`` registered in ``scenarios.registry`` with its
config ``configs/benchmark/<name>.yaml``; ``build_benchmark`` builds the continual stream of the one a config
names. This package imports nothing heavy itself (``modnet.config`` lists the benchmarks through it before
torch is imported); the sources and the Avalanche builders load on first use.
"""
from __future__ import annotations

import importlib

VARIANTS = ("split", "permuted")


def one_class_per_task(n_classes: int, n_experiences: int, scenario: str, experiences_key: str) -> str | None:
    """Why a task-incremental split of ``n_classes`` into ``n_experiences`` is refused (a task's head of one
    class predicts it whatever the input: accuracy 1.0 for every strategy, trained or not), or None. Shared by
    the early config check (``modnet.validate``) and ``scenarios.base.split_benchmark``."""
    if scenario != "task" or n_classes != n_experiences:
        return None
    return (f"{n_classes} classes in {n_experiences} task-incremental experiences leave one class per task, which "
            f"every network classifies right without learning anything; set {experiences_key} to at most "
            f"{n_classes // 2}, or scenario=class")

# public name -> module that defines it (imported on first use)
_LAZY = {"BenchmarkInfo": "scenarios.base", "split_benchmark": "scenarios.base",
         "permuted_benchmark": "scenarios.base", "load_digits_arrays": "scenarios.sources",
         "load_npz_arrays": "scenarios.sources", "load_torchvision_arrays": "scenarios.sources"}


def build_benchmark(bcfg, scenario: str, seed: int, device=None):
    """Build the benchmark named by ``bcfg.name`` (config group ``benchmark``) in the given scenario: its
    registered ``arrays`` loader, then ``split_benchmark`` or ``permuted_benchmark`` (``bcfg.variant``).
    Returns a ``scenarios.base.BenchmarkInfo``.

    With ``device`` the arrays move there once, before Avalanche splits them, so batches need no copies.
    """
    from scenarios.base import permuted_benchmark, split_benchmark
    from scenarios.registry import benchmark_names, get_benchmark

    name, variant = bcfg.name, bcfg.get("variant", "split")
    names = tuple(benchmark_names("cl"))
    if name not in names:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {names}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown benchmark.variant {variant!r}; choose one of {VARIANTS}")
    arrays = get_benchmark(name).arrays(bcfg)
    limit = bcfg.get("max_train_samples")
    if limit:
        missing = sorted(set(arrays[1].tolist()) - set(arrays[1][:limit].tolist()))
        if missing:  # else a split's message about the classes left, without naming the cap
            raise ValueError(f"benchmark.max_train_samples={limit} keeps the first {limit} training samples, which "
                             f"hold none of classes {missing}; raise it (or null: all samples)")
        arrays = (arrays[0][:limit], arrays[1][:limit], *arrays[2:])
    if device is not None:
        arrays = tuple(a.to(device) for a in arrays)
    label = f"{variant}-{name}"
    if variant == "permuted":
        return permuted_benchmark(label, *arrays, bcfg.n_experiences, scenario, seed)
    return split_benchmark(label, *arrays, bcfg.n_experiences, scenario, seed, bcfg.get("class_order"))


def __getattr__(name: str):
    if name == "BENCHMARKS":  # the continual benchmarks, as before the registry
        from scenarios.registry import benchmark_names

        return tuple(benchmark_names("cl"))
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'scenarios' has no attribute {name!r}")


__all__ = ["BenchmarkInfo", "build_benchmark", "split_benchmark", "permuted_benchmark", "load_digits_arrays",
           "load_npz_arrays", "load_torchvision_arrays", "BENCHMARKS", "VARIANTS"]
