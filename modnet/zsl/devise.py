"""``devise``: DeViSE (Frome et al., NIPS 2013) as Xian et al. 2018 evaluate it: a bilinear compatibility
x^T W s_c on ``baseline_features`` (through ALE's ``ranking_scores``: the res101 features on awa2/cub, Xian et
al.; the modular network's penultimate features on pixels), trained by SGD on the pairwise hinge rank loss
with unit-norm class knowledge (``modnet.methods.gzsl.DeViSE``: ALE with every violation weighted 1).

Hyper-parameters (configs/gzsl.yaml ``devise``): margin (paper: 0.1), lr (SGD), epochs, batch_size,
weight_decay; with ``search`` every lr of ``lr_grid`` is a candidate and the class-disjoint validation split
picks one (Xian et al. tune DeViSE's learning rate and margin on validation classes); results.json records it
as devise_lr.
"""
from __future__ import annotations

from modnet.zsl.ale import lr_candidates, ranking_scores
from modnet.zsl.registry import register_zsl_method

NAME = "devise"


def candidates(cfg) -> list[dict]:
    return lr_candidates(cfg.devise, NAME)


@register_zsl_method(NAME, candidates=candidates)
def score(cfg, net, params):
    from modnet.methods.gzsl import DeViSE

    knowledge = DeViSE.unit_knowledge(net.data.attributes.to(net.device))
    return ranking_scores(DeViSE, cfg, cfg.devise, params["devise_lr"], knowledge, net)
