"""``lwf``: Avalanche's ``LwF`` (Li & Hoiem 2016).

Hyper-parameters, configs/training.yaml ``lwf``: alpha (continual-learning-baselines Split-MNIST: 1.0), temperature
(paper: 2).
"""
from __future__ import annotations

from strategies.memory import lwf_bytes
from strategies.registry import register_strategy

NAME = "lwf"


@register_strategy(NAME, stored_bytes=lwf_bytes, gradient_sync="allreduce")
def build(cfg, info, common):
    from strategies.common import avalanche_baseline

    return avalanche_baseline("LwF", cfg, info, common, alpha=cfg.lwf.alpha, temperature=cfg.lwf.temperature)
