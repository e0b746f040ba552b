"""``gem``: Avalanche's ``GEM`` (Lopez-Paz & Ranzato 2017; needs quadprog).

Hyper-parameters, configs/training.yaml ``gem``: patterns_per_exp (continual-learning-baselines Permuted-MNIST: 1000; ``match``: modnet's
stored bytes shared among the experiences, ``strategies.memory``),
memory_strength (paper: 0.5).
"""
from __future__ import annotations

from strategies.memory import gem_memory_bytes
from strategies.registry import register_strategy

NAME = "gem"


def settings(strategy) -> dict:
    from avalanche.training.plugins import GEMPlugin

    from strategies.memory import plugin_of

    return {"patterns_per_exp": plugin_of(strategy, GEMPlugin).patterns_per_experience}


@register_strategy(NAME, stored_bytes=gem_memory_bytes, gradient_sync="allreduce", settings=settings)
def build(cfg, info, common):
    from strategies.common import avalanche_baseline
    from strategies.memory import mem_size

    return avalanche_baseline("GEM", cfg, info, common,
                              patterns_per_exp=mem_size(cfg.gem.patterns_per_exp, NAME, "patterns_per_exp"),
                              memory_strength=cfg.gem.memory_strength)
