"""``eszsl``: embarrassingly simple zero-shot learning (Romera-Paredes & Torr, ICML 2015; closed form,
``modnet.methods.gzsl.ESZSL``) on the modular network's penultimate features (``baseline_features``).

Hyper-parameters (configs/gzsl.yaml ``eszsl``): gamma, the feature-side ridge (Xian et al.'s 10^alpha), and lam,
the knowledge-side ridge (Xian et al.'s 10^gamma); with ``search`` every pair of 10^grid_log10 (Xian et al.:
exponents -3..3) is a candidate and the class-disjoint validation split picks one. results.json records the
pair as eszsl_gamma, eszsl_lambda.
"""
from __future__ import annotations

from modnet.zsl.registry import register_zsl_method

NAME = "eszsl"


def candidates(cfg) -> list[dict]:
    e = cfg.eszsl
    if e.search:
        grid = [10.0 ** x for x in e.grid_log10]
        return [{"eszsl_gamma": g, "eszsl_lambda": lam} for g in grid for lam in grid]
    return [{"eszsl_gamma": float(e.gamma), "eszsl_lambda": float(e.lam)}]


@register_zsl_method(NAME, candidates=candidates)
def score(cfg, net, params):
    from modnet.methods.gzsl import ESZSL

    f_train, f_test_seen, f_test_unseen = net.baseline_inputs(cfg.baseline_features, cfg.baseline_normalize)
    eszsl = ESZSL(gamma=params["eszsl_gamma"], lam=params["eszsl_lambda"]).fit(
        f_train, net.split("train")[1], net.data.attributes.to(net.device), net.data.seen_classes)
    return eszsl.scores(f_test_seen), eszsl.scores(f_test_unseen)
