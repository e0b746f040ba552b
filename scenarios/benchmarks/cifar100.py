"""``cifar100``: torchvision's CIFAR-100 (modnet cl only), Split (classes over experiences) or Permuted
(``benchmark.variant=permuted``). Downloaded only with ``benchmark.download=true`` on a machine that is online.
"""
from __future__ import annotations

from scenarios.benchmarks._torchvision import register_torchvision

NAME = "cifar100"

register_torchvision(NAME, "CIFAR-100", order=13, module=__name__)
