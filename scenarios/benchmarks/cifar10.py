"""``cifar10``: torchvision's CIFAR-10 (modnet cl only), Split (classes over experiences) or Permuted
(``benchmark.variant=permuted``). Downloaded only with ``benchmark.download=true`` on a machine that is online.
"""
from __future__ import annotations

from scenarios.benchmarks._torchvision import register_torchvision

NAME = "cifar10"

register_torchvision(NAME, "CIFAR-10", order=12, module=__name__)
