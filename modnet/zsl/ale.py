"""``ale``: attribute label embedding (Akata et al., TPAMI 2016; bilinear compatibility trained by SGD on the
weighted approximate ranking loss, ``modnet.methods.gzsl.ALE``) on the modular network's penultimate features
(``baseline_features``).

Hyper-parameters (configs/gzsl.yaml ``ale``): lr (SGD), epochs, batch_size, margin (Delta(y, y') = 1 for y' != y
in the paper), weight_decay.
"""
from __future__ import annotations

from modnet.zsl.registry import register_zsl_method

NAME = "ale"


@register_zsl_method(NAME)
def score(cfg, net, params):
    from modnet.methods.gzsl import ALE

    a = cfg.ale
    f_train, f_test_seen, f_test_unseen = net.baseline_inputs(cfg.baseline_features, cfg.baseline_normalize)
    ale = ALE(lr=a.lr, epochs=a.epochs, batch_size=a.batch_size, margin=a.margin, weight_decay=a.weight_decay,
              seed=net.seed).fit(f_train, net.split("train")[1], net.data.attributes.to(net.device),
                                 net.data.seen_classes)
    return ale.scores(f_test_seen), ale.scores(f_test_unseen)
