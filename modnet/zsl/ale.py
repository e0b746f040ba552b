"""``ale``: attribute label embedding (Akata et al., TPAMI 2016; bilinear compatibility trained by SGD on the
weighted approximate ranking loss, ``modnet.methods.gzsl.ALE``) on ``baseline_features``: the res101 features on
awa2/cub (Xian et al.), the modular network's penultimate features on pixels.

Hyper-parameters (configs/gzsl.yaml ``ale``): lr (SGD), epochs, batch_size, margin (Delta(y, y') = 1 for y' != y
in the paper), weight_decay. With ``search`` every lr of ``lr_grid`` is a candidate and the class-disjoint
validation split picks one (Xian et al. choose ALE's learning rate on validation classes); results.json records
it as ale_lr. ``lr_candidates`` and ``ranking_scores`` serve every ranking-loss method of this form (``devise``).
"""
from __future__ import annotations

from modnet.zsl.registry import register_zsl_method

NAME = "ale"


def lr_candidates(block, name: str) -> list[dict]:
    """``{"<name>_lr": lr}`` for every lr of ``block.lr_grid`` when ``block.search``, else for ``block.lr``."""
    grid = block.lr_grid if block.get("search") else [block.lr]
    return [{f"{name}_lr": float(lr)} for lr in grid]


def ranking_scores(model_class, cfg, block, lr: float, knowledge, net):
    """``model_class`` (``ALE`` or a subclass) with ``block``'s epochs, batch_size, margin and weight_decay and
    learning rate ``lr``, fitted on the network's baseline features of the training set against ``knowledge``;
    its scores on test-seen and test-unseen."""
    from modnet.zsl.seen_network import baseline_feature_kind

    f_train, f_test_seen, f_test_unseen = net.baseline_inputs(baseline_feature_kind(cfg), cfg.baseline_normalize)
    model = model_class(lr=lr, epochs=block.epochs, batch_size=block.batch_size, margin=block.margin,
                        weight_decay=block.weight_decay, seed=net.seed).fit(f_train, net.split("train")[1],
                                                                            knowledge, net.data.seen_classes)
    return model.scores(f_test_seen), model.scores(f_test_unseen)


def candidates(cfg) -> list[dict]:
    return lr_candidates(cfg.ale, NAME)


@register_zsl_method(NAME, candidates=candidates)
def score(cfg, net, params):
    from modnet.methods.gzsl import ALE

    return ranking_scores(ALE, cfg, cfg.ale, params["ale_lr"], net.data.attributes.to(net.device), net)
