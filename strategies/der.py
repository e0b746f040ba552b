"""``der``: Dark Experience Replay (Buzzega et al., NeurIPS 2020) on Avalanche's ``Naive``.

L = ℓ(y, f(x)) + α ||z' - h(x')||² over a reservoir buffer of (x', z') (``strategies.plugins.der``: logits
stored at the step a sample is seen, as the paper and its code Mammoth; Avalanche 0.6.0's ``DER`` stores them
after the experience and calls the model without task labels).

Hyper-parameters, configs/training.yaml ``der``: mem_size (samples, or ``match``: as many as fit in modnet's
stored bytes with their logits), alpha (paper, Seq-MNIST buffer 500: 1.0; 200: 0.2).
"""
from __future__ import annotations

from strategies.memory import stored_tensors_of_plugin
from strategies.registry import register_strategy

NAME = "der"


def dark_experience_replay(cfg, info, common, block: str, alpha: float, beta: float):
    """Naive fine-tuning with the DER plugin (``beta`` > 0: DER++), buffer size from ``cfg.<block>``."""
    from strategies.common import avalanche_baseline
    from strategies.memory import mem_size
    from strategies.plugins.der import DarkExperienceReplay

    der = DarkExperienceReplay(mem_size(cfg[block].mem_size, block), alpha=alpha, beta=beta)
    return avalanche_baseline("Naive", cfg, info, common, plugins=[der])


stored_buffer_bytes = stored_tensors_of_plugin("strategies.plugins.der:DarkExperienceReplay")


def buffer_settings(strategy) -> dict:
    from strategies.memory import plugin_of
    from strategies.plugins.der import DarkExperienceReplay

    return {"mem_size": plugin_of(strategy, DarkExperienceReplay).buffer.size}


@register_strategy(NAME, stored_bytes=stored_buffer_bytes, gradient_sync="allreduce", settings=buffer_settings)
def build(cfg, info, common):
    return dark_experience_replay(cfg, info, common, NAME, alpha=cfg.der.alpha, beta=0.0)
