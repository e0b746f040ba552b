"""``agem``: Avalanche's ``AGEM`` (Chaudhry et al. 2019), its projection without a host read per step
(``strategies.plugins.agem``: the same gradients).

Hyper-parameters, configs/training.yaml ``agem``: patterns_per_exp (A-GEM: 250 per task; ``match``: as
``gem``'s), sample_size (A-GEM: 256).
"""
from __future__ import annotations

from strategies.memory import agem_buffer_bytes
from strategies.registry import register_strategy

NAME = "agem"


def settings(strategy) -> dict:
    from avalanche.training.plugins import AGEMPlugin

    from strategies.memory import plugin_of

    return {"patterns_per_exp": plugin_of(strategy, AGEMPlugin).patterns_per_experience}


@register_strategy(NAME, stored_bytes=agem_buffer_bytes, gradient_sync=None, settings=settings,
                   no_ddp_reason="A-GEM samples its reference gradient from memory independently on every rank")
def build(cfg, info, common):
    from strategies.common import avalanche_baseline
    from strategies.memory import mem_size
    from strategies.plugins.agem import SyncFreeAGEMPlugin

    # Avalanche's AGEM is the same template with AGEMPlugin as its plugin (plugins=None: [agem])
    agem = SyncFreeAGEMPlugin(mem_size(cfg.agem.patterns_per_exp, NAME, "patterns_per_exp"), cfg.agem.sample_size)
    return avalanche_baseline("Naive", cfg, info, common, plugins=[agem])
