"""``replay``: Avalanche's ``Replay``: a class-balanced buffer of stored samples.

Hyper-parameters, configs/training.yaml ``replay``: mem_size (stored samples in total).
"""
from __future__ import annotations

from strategies.registry import register_strategy

NAME = "replay"


@register_strategy(NAME, gradient_sync="ddp")
def build(cfg, info, common):
    from strategies.common import avalanche_baseline

    return avalanche_baseline("Replay", cfg, info, common, mem_size=cfg.replay.mem_size)
