"""``fmnist``: torchvision's Fashion-MNIST (modnet cl only), Split (classes over experiences) or Permuted
(``benchmark.variant=permuted``). Downloaded only with ``benchmark.download=true`` on a machine that is online.
"""
from __future__ import annotations

from scenarios.benchmarks._torchvision import register_torchvision

NAME = "fmnist"

register_torchvision(NAME, "Fashion-MNIST", order=11, module=__name__)
