"""``derpp``: DER++ (Buzzega et al., NeurIPS 2020): DER plus a cross-entropy on a second buffer batch,
L = ℓ(y, f(x)) + α ||z' - h(x')||² + β ℓ(y'', f(x'')) (``strategies.plugins.der``).

Hyper-parameters, configs/training.yaml ``derpp``: mem_size (samples, or ``match``), alpha and beta (paper,
Seq-MNIST buffer 500: 1.0 and 0.5; 200: 0.2 and 1.0).
"""
from __future__ import annotations

from strategies.der import buffer_settings, dark_experience_replay, stored_buffer_bytes
from strategies.registry import register_strategy

NAME = "derpp"


@register_strategy(NAME, stored_bytes=stored_buffer_bytes, gradient_sync="allreduce", settings=buffer_settings)
def build(cfg, info, common):
    return dark_experience_replay(cfg, info, common, NAME, alpha=cfg.derpp.alpha, beta=cfg.derpp.beta)
