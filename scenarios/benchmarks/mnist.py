"""``mnist``: torchvision's MNIST (modnet cl only), Split (classes over experiences) or Permuted
(``benchmark.variant=permuted``). Downloaded only with ``benchmark.download=true`` on a machine that is online.
"""
from __future__ import annotations

from scenarios.benchmarks._torchvision import register_torchvision

NAME = "mnist"

register_torchvision(NAME, "MNIST", order=10, module=__name__)
