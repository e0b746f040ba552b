"""``naive``: Avalanche's ``Naive``: fine-tuning, no protection (the lower bound).
"""
from __future__ import annotations

from strategies.memory import nothing_stored
from strategies.registry import register_strategy

NAME = "naive"


@register_strategy(NAME, stored_bytes=nothing_stored, gradient_sync="ddp", resumes_at_experience=True)
def build(cfg, info, common):
    from strategies.common import avalanche_baseline

    return avalanche_baseline("Naive", cfg, info, common)
