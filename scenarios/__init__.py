"""Data sources turned into Avalanche benchmarks."""
from __future__ import annotations

from modnet.config import BENCHMARK_CHOICES
from scenarios.base import BenchmarkInfo, permuted_benchmark, split_benchmark
from scenarios.sources import load_digits_arrays, load_npz_arrays, load_torchvision_arrays

BENCHMARKS = BENCHMARK_CHOICES["cl"]
VARIANTS = ("split", "permuted")


def build_benchmark(bcfg, scenario: str, seed: int, device=None) -> BenchmarkInfo:
    """Build the benchmark named by ``bcfg.name`` (config group ``benchmark``) in the given scenario.

    With ``device`` the arrays move there once, before Avalanche splits them, so batches need no copies.
    """
    name, variant = bcfg.name, bcfg.get("variant", "split")
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {BENCHMARKS}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown benchmark.variant {variant!r}; choose one of {VARIANTS}")
    if name == "digits":
        arrays = load_digits_arrays(bcfg.test_fraction, image=bcfg.get("image", False))
    elif name == "npz":
        if not bcfg.get("path"):
            raise ValueError("benchmark=npz needs benchmark.path=<file.npz>")
        arrays = load_npz_arrays(bcfg.path)
    else:
        arrays = load_torchvision_arrays(name, bcfg.root, bcfg.download)
    limit = bcfg.get("max_train_samples")
    if limit:
        arrays = (arrays[0][:limit], arrays[1][:limit], *arrays[2:])
    if device is not None:
        arrays = tuple(a.to(device) for a in arrays)
    label = f"{variant}-{name}"
    if variant == "permuted":
        return permuted_benchmark(label, *arrays, bcfg.n_experiences, scenario, seed)
    return split_benchmark(label, *arrays, bcfg.n_experiences, scenario, seed, bcfg.get("class_order"))


__all__ = ["BenchmarkInfo", "build_benchmark", "split_benchmark", "permuted_benchmark", "load_digits_arrays",
           "load_npz_arrays", "load_torchvision_arrays", "BENCHMARKS"]
