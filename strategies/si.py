"""``si``: Avalanche's ``SynapticIntelligence`` (Zenke et al. 2017).

Hyper-parameters, configs/training.yaml ``si``: si_lambda (continual-learning-baselines Split-MNIST: 1.0), eps (damping,
paper 1e-3).
"""
from __future__ import annotations

from strategies.registry import register_strategy

NAME = "si"


@register_strategy(NAME, gradient_sync="allreduce")
def build(cfg, info, common):
    from strategies.common import avalanche_baseline

    return avalanche_baseline("SynapticIntelligence", cfg, info, common, si_lambda=cfg.si.si_lambda, eps=cfg.si.eps)
