"""``si``: Synaptic Intelligence (Zenke, Poole & Ganguli 2017) as our plugin on Avalanche's ``Naive``.

Avalanche 0.6.0's ``SynapticIntelligence`` is a silent no-op here (importances stay zero: the accuracy matrix
is naive's, bit for bit, at si_lambda 1 and 10000); ``strategies.plugins.si.SynapticIntelligence`` computes
the path integral ω_k = Σ_n -g_k(n) Δθ_k(n) of the task loss, Ω_k += ω_k / (Δ_k² + ξ) after each experience
and adds c Σ_k Ω_k (θ_k - θ̃_k)².

Hyper-parameters, configs/training.yaml ``si``: si_lambda (c; Zenke et al. Split-MNIST: 1.0), xi (damping ξ;
van de Ven et al.'s code: 0.1, Zenke et al.: 1e-3).
"""
from __future__ import annotations

from strategies.memory import stored_tensors_of_plugin
from strategies.registry import register_strategy

NAME = "si"


@register_strategy(NAME, stored_bytes=stored_tensors_of_plugin("strategies.plugins.si:SynapticIntelligence"),
                   gradient_sync="allreduce")
def build(cfg, info, common):
    from strategies.common import avalanche_baseline
    from strategies.plugins.si import SynapticIntelligence

    return avalanche_baseline("Naive", cfg, info, common,
                              plugins=[SynapticIntelligence(si_lambda=cfg.si.si_lambda, xi=cfg.si.xi)])
