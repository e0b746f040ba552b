"""Networks from a config: the modular network every command trains, and the plain backbones of the baselines.

``build_modular_network`` is the one place the modular network (HAT masks + SynC modules + key-vector gates
+ task keys) is assembled from the ``model``, ``modules`` and ``hat`` config blocks; ``modnet cl``, ``modnet
gzsl``, ``modnet explain`` and the bench all call it.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from torch import nn

from modnet.config import (GATES, MODULES, TRANSFORM_COPIES, ConfigError, check_choice, check_share,  # noqa: F401
                           transform_copies)
from modnet.nets.models import (CNNBackbone, HATCNN, HATMLP, HATNet, HATResNet18, MLPBackbone, MultiHeadNet,
                                ResNet18Backbone, SingleHeadNet, use_cosine_heads)

ARCHS = ("auto", "mlp", "cnn", "resnet18")
HEADS = ("linear", "cosine")
TASK_INFERENCE = ("auto", "gauss", "keys", "ood", "features", "heads")


def resolve_arch(arch: str, input_shape: Sequence[int]) -> str:
    """``model.arch`` for data of ``input_shape``: auto = cnn for images (C, H, W), mlp for vectors."""
    check_choice("model.arch", arch, ARCHS)
    is_image = len(input_shape) == 3
    if arch == "auto":
        return "cnn" if is_image else "mlp"
    if arch in ("cnn", "resnet18") and not is_image:
        raise ConfigError(f"model.arch={arch} needs images (N, C, H, W); the data has vectors of shape "
                          f"{tuple(input_shape)}; use model.arch=mlp or auto")
    return arch


# model.transform_heads: where CSI's joint (class, transform) heads are trained beside every task
TRANSFORM_HEADS = ("auto", "inference", "always", "never")
# task_inference.transform_copies: the heads' training batch (modnet.nets.task_inference.TaskOOD copies),
# checked and resolved by modnet.config.transform_copies (also before any import, by modnet.validate)
TRANSFORM_ROWS = "the share of each batch in the transform heads' loss; 1 = all"


def build_modular_network(cfg, input_shape: Sequence[int], task_classes: Sequence[Sequence[int]],
                          class_incremental: bool) -> HATNet:
    """The modular network: HAT masks, plus SynC modules with key-vector gates and task keys as configured
    (``cfg.model``, ``cfg.modules``, ``cfg.hat``); one head per entry of ``task_classes``."""
    from modnet.nets.modules import ModularGating, TaskKeys

    m = cfg.model
    query_dim = int(np.prod(input_shape))
    gate = task_keys = None
    check_choice("model.gate", m.gate, GATES)
    check_choice("model.modules", m.modules, MODULES)
    if m.gate == "topk":
        if m.modules != "sync":
            raise ConfigError("model.gate=topk switches functional modules on and off: it needs model.modules=sync")
        g = cfg.modules
        gate = ModularGating(query_dim, key_dim=g.key_dim, k=g.k, tau=g.tau, estimator=g.estimator,
                             cluster=dict(g.cluster), profile_samples=g.profile_samples,
                             persistent=bool(g.get("persistent", True)), k_share=float(g.get("k_share", 0.75)))
    ti = cfg.task_inference
    check_choice("task_inference.method", ti.method, TASK_INFERENCE)
    method = ti.method
    if method == "auto":  # the network's own predictor where it was measured at least as good: MLPs (issue 12)
        method = "features" if resolve_arch(m.arch, input_shape) == "mlp" else "gauss"
    n_slots = sum(len(c) for c in task_classes)
    # what inference works with: one float64 d x d Cholesky factor per (task, class); what is stored is a
    # packed float32 triangle, a quarter of it (ClassGaussians)
    gauss_mb = n_slots * query_dim ** 2 * 8 / 2 ** 20
    if class_incremental and m.task_keys and method == "gauss" and gauss_mb > ti.gauss_max_mb:
        print(f"task_inference.method=gauss would factor {n_slots} covariances of {query_dim} x {query_dim} "
              f"({gauss_mb:.0f} MB > task_inference.gauss_max_mb={ti.gauss_max_mb}): the task is picked by the "
              "LDA keys (task_inference.method=keys)")
        method = "keys"
    if class_incremental and m.task_keys and method == "keys":
        task_keys = TaskKeys(n_slots, query_dim, shrinkage=cfg.modules.key_shrinkage)
    elif class_incremental and m.task_keys and method == "gauss":
        from modnet.nets.task_inference import ClassGaussians

        task_keys = ClassGaussians(n_slots, query_dim, shrinkage=ti.shrinkage)
    common = dict(class_incremental=class_incremental, smax=cfg.hat.smax, task_inference=cfg.hat.task_inference,
                  gate=gate, task_keys=task_keys)
    arch = resolve_arch(m.arch, input_shape)
    if arch == "resnet18":
        net = HATResNet18(input_shape, task_classes, width=m.resnet_width, **common)
    elif arch == "cnn":
        net = HATCNN(input_shape, task_classes, channels=list(m.cnn_channels), hidden=m.hidden, dropout=m.dropout,
                     **common)
    else:
        net = HATMLP(query_dim, task_classes, hidden=m.hidden, n_layers=m.n_layers, dropout=m.dropout,
                     input_dropout=m.get("input_dropout", 0.0), **common)
    check_choice("model.head", m.get("head", "linear"), HEADS)
    if m.get("head", "linear") == "cosine":
        tau = float(m.get("head_tau", 16.0))
        if not tau > 0:
            raise ConfigError(f"model.head_tau={tau} must be > 0 (the cosine head's scale, logits in [-tau, tau])")
        use_cosine_heads(net, tau)
    ood_in_features = method == "features" and float(ti.get("feature_ood_weight", 0.0)) > 0
    transform_heads = str(m.get("transform_heads", "auto"))
    check_choice("model.transform_heads", transform_heads, TRANSFORM_HEADS)
    heads_for_inference = class_incremental and m.task_keys and (method == "ood" or ood_in_features)
    if transform_heads == "never" and class_incremental and m.task_keys and method == "ood":
        raise ConfigError("task_inference.method=ood picks the task with the transform heads: it needs "
                          "model.transform_heads=auto, inference or always")
    if transform_heads == "auto":  # measured to help MLPs (issue 12), to hurt the small CNN's conv features
        transform_heads = "always" if arch == "mlp" else "inference"
    if transform_heads == "always" or (transform_heads == "inference" and heads_for_inference):
        from modnet.nets.task_inference import TaskOOD

        # inside the features' combination the heads' score is task_inference.feature_ood_score (their own
        # method=ood keeps task_inference.score)
        score = str(ti.get("feature_ood_score", "energy")) if ood_in_features else ti.score
        rows = check_share("task_inference.transform_rows", ti.get("transform_rows", 1.0), TRANSFORM_ROWS)
        copies = transform_copies(ti.get("transform_copies", "auto"), rows, heads_for_inference)
        net.task_ood = TaskOOD([len(c) for c in task_classes], net.heads[0].in_features,
                               transforms=list(ti.transforms), score=score, calibrate=ti.calibrate,
                               classify=ti.classify, labels=ti.labels, copies=copies, rows=rows)
        net.task_ood_predicts_task = class_incremental and m.task_keys and method == "ood"
    if class_incremental and m.task_keys and method == "features":
        from modnet.nets.task_inference import TaskFeatureGaussians

        layer = int(ti.get("feature_layer", 0))
        extra = [(int(k), float(w)) for k, w in (ti.get("feature_extra_layers", None) or [])]
        for k in [layer] + [k for k, _ in extra]:
            if not 0 <= k < len(net.masked):
                raise ConfigError(f"task_inference.feature_layer / feature_extra_layers: layer {k}, but the network "
                                  f"has {len(net.masked)} masked layers; choose 0..{len(net.masked) - 1}")
        net.task_features = TaskFeatureGaussians([len(c) for c in task_classes], net.masked[layer].n_units,
                                                 layer=layer, shrinkage=float(ti.get("feature_shrinkage", 0.1)),
                                                 gates=bool(ti.get("feature_gates", True)),
                                                 decoder_weight=float(ti.get("decoder_weight", 0.0)),
                                                 decoder_ridge=float(ti.get("decoder_ridge", 1e-3)),
                                                 dtype=str(ti.get("feature_dtype", "float32")),
                                                 extra_layers=[(k, net.masked[k].n_units, w) for k, w in extra],
                                                 ood_weight=float(ti.get("feature_ood_weight", 0.0))
                                                 if net.task_ood is not None else 0.0,
                                                 covariance=str(ti.get("feature_covariance", "class")))
    return net


def build_baseline_network(cfg, input_shape: Sequence[int], n_classes: int, class_incremental: bool) -> nn.Module:
    """The same backbone without masks: one head over all classes (class-incremental) or one per task."""
    m = cfg.model
    arch = resolve_arch(m.arch, input_shape)
    if arch == "resnet18":
        backbone = ResNet18Backbone(input_shape, m.resnet_width)
    elif arch == "cnn":
        backbone = CNNBackbone(input_shape, list(m.cnn_channels), m.hidden, m.dropout)
    else:
        backbone = MLPBackbone(int(np.prod(input_shape)), m.hidden, m.n_layers, m.dropout,
                               m.get("input_dropout", 0.0))
    return SingleHeadNet(backbone, n_classes) if class_incremental else MultiHeadNet(backbone)
