"""What the torchvision benchmarks (mnist, fmnist, cifar10, cifar100) share: the keys ``modnet cl`` reads and
the loader (``scenarios.sources.load_torchvision_arrays``). Each data set's own file names it, its title and
its place in the listings."""
from __future__ import annotations

from scenarios.registry import register_benchmark

KEYS = ("root", "download", "variant", "n_experiences", "class_order", "max_train_samples")


def register_torchvision(name: str, title: str, order: int, module: str) -> type:
    """Register torchvision's data set ``name`` for ``modnet cl`` (``module``: the registering file)."""

    class Loaders:
        @staticmethod
        def arrays(bcfg):
            from scenarios.sources import load_torchvision_arrays

            return load_torchvision_arrays(name, bcfg.root, bcfg.download)

    Loaders.__module__ = module
    return register_benchmark(name, commands=("cl",), order=order, keys={"cl": KEYS},
                              description=f"torchvision {title}: continual-learning images without class "
                                          "attributes")(Loaders)
