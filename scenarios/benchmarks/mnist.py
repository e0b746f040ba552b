"""``mnist``: torchvision's MNIST (modnet cl only), Split (classes over experiences) or Permuted
(``benchmark.variant=permuted``). Downloaded only with ``benchmark.download=true`` on a machine that is online.
"""
from __future__ import annotations

from scenarios.registry import register_benchmark

NAME = "mnist"


@register_benchmark(NAME, commands=("cl",), order=10,
                    description="torchvision MNIST: continual-learning images without class attributes",
                    keys={"cl": ("root", "download", "variant", "n_experiences", "class_order", "max_train_samples")})
class Mnist:
    @staticmethod
    def arrays(bcfg):
        from scenarios.sources import load_torchvision_arrays

        return load_torchvision_arrays(NAME, bcfg.root, bcfg.download)
