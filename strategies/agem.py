"""``agem``: Avalanche's ``AGEM`` (Chaudhry et al. 2019).

Hyper-parameters, configs/training.yaml ``agem``: patterns_per_exp (A-GEM: 250 per task), sample_size (A-GEM: 256).
"""
from __future__ import annotations

from strategies.memory import agem_buffer_bytes
from strategies.registry import register_strategy

NAME = "agem"


@register_strategy(NAME, stored_bytes=agem_buffer_bytes, gradient_sync=None,
                   no_ddp_reason="A-GEM samples its reference gradient from memory independently on every rank")
def build(cfg, info, common):
    from strategies.common import avalanche_baseline

    return avalanche_baseline("AGEM", cfg, info, common,
                              patterns_per_exp=cfg.agem.patterns_per_exp, sample_size=cfg.agem.sample_size)
