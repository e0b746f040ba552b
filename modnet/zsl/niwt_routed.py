"""``niwt_routed``: NIWT whose predicted importance follows the modules the class knowledge selects.

Beyond the paper (issue 13, "module keys in the knowledge space"): on the modular network each seen class c
switches some modules on and leaves others off; its routing r_c (the share of c's training images for which
each unit of the importance layer is on: module gate x HAT mask) is tied to its knowledge by a ridge map
(``modnet.methods.niwt.RoutingMap``), so an unseen class's knowledge predicts which modules should fire for
it, and NIWT's predicted importance is kept only there: a*_u <- a*_u * r(k_u). Step 3 then fits w_u to that
per-module importance, as plain ``niwt`` does (same config block ``niwt``, same layer, same scale rule).

It extends a copy of the seen-class network (``SeenNetwork.seen_copy``), so it runs beside ``niwt`` in one
table on the very same trained network.
"""
from __future__ import annotations

from modnet.zsl.niwt import fixed_layer, importance_layer, niwt_arguments
from modnet.zsl.registry import register_zsl_method

NAME = "niwt_routed"


@register_zsl_method(NAME)
def score(cfg, net, params):
    from modnet.methods.niwt import NIWT

    copy = net.seen_copy()
    data = copy.data
    layer = importance_layer(copy.model, fixed_layer(cfg))
    index = fixed_layer(cfg) % len(copy.model.unit_taps)
    x, y = copy.split("train")
    niwt = NIWT(copy.model, layer, copy.head, forward_fn=copy.forward, seed=copy.seed, progress=copy.progress,
                **niwt_arguments(cfg))
    niwt.fit(x, y, data.attributes.to(copy.device), data.seen_classes, data.unseen_classes,
             seen_routing=copy.unit_routing(index))
    copy.add_classes(data.unseen_classes, niwt.unseen.weight, niwt.unseen.bias)
    return copy.scores(copy.split("test_seen")[0]), copy.scores(copy.split("test_unseen")[0])
