"""``ale``: attribute label embedding (Akata et al., TPAMI 2016; bilinear compatibility trained by SGD on the
weighted approximate ranking loss, ``modnet.methods.gzsl.ALE``) on the modular network's penultimate features
(``baseline_features``).

Hyper-parameters (configs/gzsl.yaml ``ale``): lr (SGD), epochs, batch_size, margin (Delta(y, y') = 1 for y' != y
in the paper), weight_decay. With ``search`` every lr of ``lr_grid`` is a candidate and the class-disjoint
validation split picks one (Xian et al. choose ALE's learning rate on validation classes); results.json records
it as ale_lr.
"""
from __future__ import annotations

from modnet.zsl.registry import register_zsl_method

NAME = "ale"


def candidates(cfg) -> list[dict]:
    a = cfg.ale
    return [{"ale_lr": float(lr)} for lr in a.lr_grid] if a.get("search") else [{"ale_lr": float(a.lr)}]


@register_zsl_method(NAME, candidates=candidates)
def score(cfg, net, params):
    from modnet.methods.gzsl import ALE

    a = cfg.ale
    f_train, f_test_seen, f_test_unseen = net.baseline_inputs(cfg.baseline_features, cfg.baseline_normalize)
    ale = ALE(lr=params["ale_lr"], epochs=a.epochs, batch_size=a.batch_size, margin=a.margin, weight_decay=a.weight_decay,
              seed=net.seed).fit(f_train, net.split("train")[1], net.data.attributes.to(net.device),
                                 net.data.seen_classes)
    return ale.scores(f_test_seen), ale.scores(f_test_unseen)
