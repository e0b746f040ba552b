"""``gem``: Avalanche's ``GEM`` (Lopez-Paz & Ranzato 2017; needs quadprog).

Hyper-parameters, configs/training.yaml ``gem``: patterns_per_exp (continual-learning-baselines Permuted-MNIST: 1000),
memory_strength (paper: 0.5).
"""
from __future__ import annotations

from strategies.memory import gem_memory_bytes
from strategies.registry import register_strategy

NAME = "gem"


@register_strategy(NAME, stored_bytes=gem_memory_bytes, gradient_sync="allreduce")
def build(cfg, info, common):
    from strategies.common import avalanche_baseline

    return avalanche_baseline("GEM", cfg, info, common,
                              patterns_per_exp=cfg.gem.patterns_per_exp, memory_strength=cfg.gem.memory_strength)
