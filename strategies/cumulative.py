"""``cumulative``: Avalanche's ``Cumulative``: retrains on every experience so far (the upper bound; keeps all
samples).
"""
from __future__ import annotations

from strategies.memory import cumulative_bytes
from strategies.registry import register_strategy

NAME = "cumulative"


@register_strategy(NAME, stored_bytes=cumulative_bytes, gradient_sync="ddp")
def build(cfg, info, common):
    from strategies.common import avalanche_baseline

    return avalanche_baseline("Cumulative", cfg, info, common)
