"""``ewc``: Avalanche's ``EWC`` (Kirkpatrick et al. 2017).

Hyper-parameters, configs/training.yaml ``ewc``: ewc_lambda (continual-learning-baselines Split-MNIST: 0.4 ... 10000 by
setup), class_ewc_lambda (class-incremental; null = ewc_lambda), mode separate | online, decay_factor (online
only).

Avalanche's penalty is λ Σ_e Σ_i F_i^e (θ_i - θ*_i^e)², F = mean over mini-batches of the squared gradient. Its
curvature along θ_i is 2 λ Σ_e F_i^e, so plain SGD (the shared optimiser, lr 0.05) on it alone is stable only
while lr · 2 λ Σ_e F_i^e < 2, i.e. λ < 1 / (lr · max_i Σ_e F_i). Class-incremental, the single head's bias has
F ≈ 0.2 after the first experience on Split-Digits: λ = 1000 gives lr 2 λ F ≈ 23, the old head oscillates with
growing amplitude and the loss is NaN within the next experience. Task-incremental the old heads receive no
task gradient and stay at θ*, so λ = 1000 is stable there. Hence a class-incremental λ of its own
(``strategies/ewc.py`` picks it by ``scenario``). The shared layers' Σ F grows with the experiences too (Split-MNIST-1D
task-incremental, λ 1000: NaN in the fourth experience), so the plugin (``strategies.plugins.ewc.StableEWCPlugin``,
Avalanche's ``EWCPlugin`` plus this) lowers λ to margin / (2 lr · max Σ F) after an experience where λ would pass
the bound (``ewc.stability_margin``, default 1; null = Avalanche's behaviour). The same plugin writes the
penalty's gradient out (added after the backward, where Avalanche's goes through autograd) and reads a
tensor-backed experience's Fisher pass from its tensors: Avalanche's penalty and importances, at less cost.
"""
from __future__ import annotations

from strategies.memory import ewc_bytes
from strategies.registry import register_strategy

NAME = "ewc"


def settings(strategy) -> dict:
    """The λ asked for and the one each experience's penalty was weighted with after it (the stability bound
    may lower it; ``lambda_history``): what a reader needs to reproduce the run."""
    from strategies.memory import plugin_of
    from strategies.plugins.ewc import StableEWCPlugin

    ewc = plugin_of(strategy, StableEWCPlugin)
    return {"ewc_lambda": ewc.requested_lambda, "ewc_lambda_after_experience": list(ewc.lambda_history)}


@register_strategy(NAME, stored_bytes=ewc_bytes, gradient_sync="allreduce", settings=settings)
def build(cfg, info, common):
    from strategies.common import avalanche_baseline
    from strategies.plugins.ewc import StableEWCPlugin

    margin = cfg.ewc.get("stability_margin", 1.0)
    ewc = StableEWCPlugin(scenario_ewc_lambda(cfg.ewc, info.scenario), mode=cfg.ewc.mode,
                          decay_factor=cfg.ewc.decay_factor, margin=None if margin is None else float(margin))
    return avalanche_baseline("Naive", cfg, info, common, plugins=[ewc])


def scenario_ewc_lambda(ewc_cfg, scenario: str) -> float:
    """``class_ewc_lambda`` class-incremental (when set), ``ewc_lambda`` otherwise."""
    if scenario == "class" and ewc_cfg.get("class_ewc_lambda") is not None:
        return float(ewc_cfg.class_ewc_lambda)
    return float(ewc_cfg.ewc_lambda)
