"""``niwt``: Neuron Importance-aware Weight Transfer (Selvaraju et al., ECCV 2018; ``modnet.methods.niwt``).

On the modular network itself: importance at ``unit_taps[niwt.layer]`` (a masked layer's output after its HAT
mask and module gates; default -2, one block before the head's input, as the paper's "one block deeper":
VGG16 conv5_3, ResNet-101 layer4[0]), classifier = the network's head, forward = the network's own in eval
mode (masks at s = smax, gates on). The unseen classes become new rows of that head (``HATNet.add_classes``),
so the GZSL scores are the extended network's outputs.

Hyper-parameters (configs/gzsl.yaml ``niwt``): lr and lam of the unseen-weight fit (official: 1e-3 / 1e-3 on
AWA2, 1e-4 / 1e-2 on CUB), batch_size (official grid 16, 32, 64), patience 40 iterations without a
min_improvement of 1% (official), max_iterations; map_* for the knowledge -> importance map (full-batch Adam,
best epoch on held-out seen classes; or ``map_fit=centered``, a closed-form ridge map of the class deviations from
the seen mean); importance_samples, importance_match, map_targets choose where the
importance is measured and how it is matched (the official code: per image); init, bias (official: b_u = 0) and
scale put the new rows beside the trained ones: step 3's cosine loss fixes only the direction of w_u, so
``scale=seen_budget`` (the default; ``modnet.methods.niwt.match_seen_scale``) gives each new row the mean and spread
of a seen row's scores on images of other classes (``negatives``), then lifts all of them by one shift, the largest
that sends at most ``niwt.seen_budget`` of the seen training images to an unseen row; measured on the seen
training images, never on test data.
"""
from __future__ import annotations

from modnet.zsl.registry import register_zsl_method

NAME = "niwt"


def importance_layer(model, index: int):
    """``model.unit_taps[index]`` of a modular network, with one clear error for an index out of range."""
    from modnet.config import ConfigError

    n = len(model.unit_taps)
    if not -n <= index < n:
        raise ConfigError(f"niwt.layer={index} (niwt.layer or an entry of niwt.layers) but the network has {n} "
                          f"masked layers; choose among "
                          f"{-n}..{n - 1} (-2 = one block before the head's input)")
    return model.unit_taps[index]


def niwt_arguments(cfg) -> dict:
    """The ``niwt`` config block as keyword arguments of ``modnet.methods.niwt.NIWT`` (all but the layer)."""
    from omegaconf import OmegaConf

    kw = OmegaConf.to_container(cfg.niwt, resolve=True)
    for key in ("layer", "layers"):
        kw.pop(key, None)
    return kw


def candidates(cfg) -> list[dict]:
    """``{"niwt_layer": index}`` for ``niwt.layer``, or when it is null for every index of ``niwt.layers`` (chosen
    on the class-disjoint validation splits like the other methods' settings)."""
    grid = [cfg.niwt.layer] if cfg.niwt.layer is not None else list(cfg.niwt.layers)
    return [{"niwt_layer": int(index)} for index in grid]


def fixed_layer(cfg) -> int:
    """The importance layer where nothing is validated (continual GZSL, niwt_routed): ``niwt.layer``, or the
    first of ``niwt.layers`` when it is null."""
    return candidates(cfg)[0]["niwt_layer"]


@register_zsl_method(NAME, candidates=candidates)
def score(cfg, net, params):
    from modnet.methods.niwt import NIWT

    data = net.data
    if net.classes != list(data.seen_classes):
        # an earlier candidate setting (validation) extended this network: fit on the seen-class network again
        net = net.seen_copy()
    x, y = net.split("train")
    layer = int(params.get("niwt_layer", fixed_layer(cfg)))
    niwt = NIWT(net.model, importance_layer(net.model, layer), net.head, forward_fn=net.forward,
                seed=net.seed, progress=net.progress, **niwt_arguments(cfg))
    niwt.fit(x, y, data.attributes.to(net.device), data.seen_classes, data.unseen_classes)
    net.add_classes(data.unseen_classes, niwt.unseen.weight, niwt.unseen.bias)
    return net.scores(net.split("test_seen")[0]), net.scores(net.split("test_unseen")[0])
