"""``eszsl``: embarrassingly simple zero-shot learning (Romera-Paredes & Torr, ICML 2015; closed form,
``modnet.methods.gzsl.ESZSL``) on ``baseline_features``: the res101 features on awa2/cub (Xian et al.), the modular
network's penultimate features on pixels.

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
    from modnet.methods.gzsl import ESZSLPath
    from modnet.zsl.seen_network import baseline_feature_kind

    kind = baseline_feature_kind(cfg)
    f_train, f_test_seen, f_test_unseen = net.baseline_inputs(kind, cfg.baseline_normalize)
    # every candidate (gamma, lam) of this network from one eigendecomposition per side (ESZSLPath)
    path = net.cached(("eszsl_path", kind, cfg.baseline_normalize), lambda: ESZSLPath(
        f_train, net.split("train")[1], net.data.attributes.to(net.device), net.data.seen_classes))
    eszsl = path.model(params["eszsl_gamma"], params["eszsl_lambda"])
    return eszsl.scores(f_test_seen), eszsl.scores(f_test_unseen)
