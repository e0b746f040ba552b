"""``devise``: DeViSE (Frome et al., NIPS 2013) as Xian et al. 2018 evaluate it: a bilinear compatibility
x^T W s_c on the modular network's penultimate features (``baseline_features``), trained by SGD on the pairwise
hinge rank loss with unit-norm class knowledge (``modnet.methods.gzsl.DeViSE``: ALE with every violation
weighted 1).

Hyper-parameters (configs/gzsl.yaml ``devise``): margin (paper: 0.1), lr (SGD), epochs, batch_size,
weight_decay; with ``search`` every lr of ``lr_grid`` is a candidate and the class-disjoint validation split
picks one (Xian et al. tune DeViSE's learning rate and margin on validation classes); results.json records it
as devise_lr.
"""
from __future__ import annotations

from modnet.zsl.registry import register_zsl_method

NAME = "devise"


def candidates(cfg) -> list[dict]:
    d = cfg.devise
    return [{"devise_lr": float(lr)} for lr in d.lr_grid] if d.search else [{"devise_lr": float(d.lr)}]


@register_zsl_method(NAME, candidates=candidates)
def score(cfg, net, params):
    from modnet.methods.gzsl import DeViSE

    d = cfg.devise
    f_train, f_test_seen, f_test_unseen = net.baseline_inputs(cfg.baseline_features, cfg.baseline_normalize)
    knowledge = DeViSE.unit_knowledge(net.data.attributes.to(net.device))
    model = DeViSE(lr=params["devise_lr"], epochs=d.epochs, batch_size=d.batch_size, margin=d.margin,
                   weight_decay=d.weight_decay, seed=net.seed).fit(f_train, net.split("train")[1], knowledge,
                                                                   net.data.seen_classes)
    return model.scores(f_test_seen), model.scores(f_test_unseen)
