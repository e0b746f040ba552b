"""``ewc``: Avalanche's ``EWC`` (Kirkpatrick et al. 2017).

Hyper-parameters, configs/training.yaml ``ewc``: ewc_lambda (continual-learning-baselines Split-MNIST: 0.4 ... 10000 by
setup), mode separate | online, decay_factor (online only).
"""
from __future__ import annotations

from strategies.memory import ewc_bytes
from strategies.registry import register_strategy

NAME = "ewc"


@register_strategy(NAME, stored_bytes=ewc_bytes, gradient_sync="allreduce")
def build(cfg, info, common):
    from strategies.common import avalanche_baseline

    return avalanche_baseline("EWC", cfg, info, common,
                              ewc_lambda=cfg.ewc.ewc_lambda, mode=cfg.ewc.mode, decay_factor=cfg.ewc.decay_factor)
