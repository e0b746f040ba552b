"""What the torchvision benchmarks (mnist, fmnist, cifar10, cifar100) share: the keys ``modnet cl`` reads and
the loader (``scenarios.sources.load_torchvision_arrays``). Each data set's own file names it, its title and
its place in the listings."""
from __future__ import annotations

from scenarios.registry import register_benchmark

KEYS = ("root", "download", "variant", "n_experiences", "class_order", "max_train_samples")
# data set -> (its class count, the folder torchvision keeps its files in under ``root``: without it the data set
# is certainly absent; its files inside are torchvision's to check)
FOLDERS = {"mnist": (10, "MNIST"), "fmnist": (10, "FashionMNIST"), "cifar10": (10, "cifar-10-batches-py"),
           "cifar100": (100, "cifar-100-python")}


def register_torchvision(name: str, title: str, order: int, module: str) -> type:
    """Register torchvision's data set ``name`` for ``modnet cl`` (``module``: the registering file)."""

    n_classes, folder = FOLDERS[name]

    class Loaders:
        N_CLASSES = n_classes

        @staticmethod
        def check(bcfg, command):
            """Without ``download``, the data set's folder is under ``root`` and holds files (else torchvision's
            "Dataset not found" after torch's import; a download that failed offline leaves the folder empty)."""
            from pathlib import Path

            root = Path(str(bcfg.root)).expanduser()
            if not bcfg.get("download") and not any(p.is_file() for p in (root / folder).rglob("*")):
                raise FileNotFoundError(f"{title} not found: no files under {root / folder}; put torchvision's "
                                        f"{title} files under benchmark.root={bcfg.root}, or run with "
                                        "benchmark.download=true on a machine with internet access")

        @staticmethod
        def arrays(bcfg):
            from scenarios.sources import load_torchvision_arrays

            return load_torchvision_arrays(name, bcfg.root, bcfg.download)

    Loaders.__module__ = module
    return register_benchmark(name, commands=("cl",), order=order, keys={"cl": KEYS},
                              description=f"torchvision {title}: continual-learning images without class "
                                          "attributes")(Loaders)
