"""``replay``: Avalanche's ``Replay``: a class-balanced buffer of stored samples.

Hyper-parameters, configs/training.yaml ``replay``: mem_size (stored samples in total, or ``match``: as many
as fit in modnet's stored bytes, ``strategies.memory``).
"""
from __future__ import annotations

from strategies.memory import replay_buffer_bytes
from strategies.registry import register_strategy

NAME = "replay"


@register_strategy(NAME, stored_bytes=replay_buffer_bytes, gradient_sync="ddp")
def build(cfg, info, common):
    from strategies.common import avalanche_baseline
    from strategies.memory import mem_size

    return avalanche_baseline("Replay", cfg, info, common, mem_size=mem_size(cfg.replay.mem_size, NAME))
