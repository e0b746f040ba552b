"""Every strategy ``modnet cl`` can run, by name: ours (``modnet``, ``hnet``) and Avalanche's baselines.

A strategy is an Avalanche ``SupervisedTemplate`` (Avalanche runs the loop, the evaluation and the logging)
with plugins; each builder below takes the resolved config, the benchmark and the evaluator, and returns
one, with the same backbone widths, optimiser, epochs and batch sizes for all of them.
To add a strategy: write a builder ``def build_x(cfg, info, common) -> SupervisedTemplate`` and register it
in ``STRATEGIES`` (and give its hyper-parameters a block in ``configs/cl.yaml``).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from modnet.config import check_choice
from modnet.nets.models import (CNNBackbone, HATCNN, HATMLP, HATResNet18, MLPBackbone, MultiHeadNet, ResNet18Backbone,
                           SingleHeadNet)
from scenarios.base import BenchmarkInfo


ARCHS = ("auto", "mlp", "cnn", "resnet18")


def _arch(cfg, info: BenchmarkInfo) -> str:
    arch = cfg.model.arch
    check_choice("model.arch", arch, ARCHS)
    if arch == "auto":
        return "cnn" if info.is_image else "mlp"
    if arch in ("cnn", "resnet18") and not info.is_image:
        raise ValueError(f"model.arch={arch} needs images (N, C, H, W); {info.name} has vectors of shape "
                         f"{info.input_shape}; use model.arch=mlp or auto")
    return arch


def build_hat_model(cfg, info: BenchmarkInfo) -> nn.Module:
    """The modular network: HAT masks, plus SynC modules with key-vector gates and task keys as configured."""
    from modnet.nets.modules import ModularGating, TaskKeys

    m, class_inc = cfg.model, info.scenario == "class"
    common = dict(class_incremental=class_inc, smax=cfg.hat.smax, task_inference=cfg.hat.task_inference)
    arch = _arch(cfg, info)
    if arch == "resnet18":
        net = HATResNet18(info.input_shape, info.task_classes, width=m.resnet_width, **common)
    elif arch == "cnn":
        net = HATCNN(info.input_shape, info.task_classes, channels=list(m.cnn_channels), hidden=m.hidden,
                     dropout=m.dropout, **common)
    else:
        net = HATMLP(int(np.prod(info.input_shape)), info.task_classes, hidden=m.hidden, n_layers=m.n_layers,
                     dropout=m.dropout, **common)
    query_dim = int(np.prod(info.input_shape))
    if m.gate == "topk":
        if m.modules != "sync":
            raise ValueError("model.gate=topk switches functional modules on and off: it needs model.modules=sync")
        g = cfg.modules
        net.gate = ModularGating(query_dim, key_dim=g.key_dim, k=g.k, tau=g.tau, estimator=g.estimator,
                                 cluster=dict(g.cluster), profile_samples=g.profile_samples)
    if class_inc and m.task_keys:
        net.task_keys = TaskKeys(net.n_key_slots, query_dim, shrinkage=cfg.modules.key_shrinkage)
    return net


def build_baseline_model(cfg, info: BenchmarkInfo) -> nn.Module:
    m = cfg.model
    arch = _arch(cfg, info)
    if arch == "resnet18":
        backbone = ResNet18Backbone(info.input_shape, m.resnet_width)
    elif arch == "cnn":
        backbone = CNNBackbone(info.input_shape, list(m.cnn_channels), m.hidden, m.dropout)
    else:
        backbone = MLPBackbone(int(np.prod(info.input_shape)), m.hidden, m.n_layers, m.dropout)
    return SingleHeadNet(backbone, info.n_classes) if info.scenario == "class" else MultiHeadNet(backbone)


def _sgd(cfg, model: nn.Module) -> torch.optim.Optimizer:
    # foreach: one multi-tensor update for all parameters (torch only defaults to it on CUDA)
    return torch.optim.SGD(model.parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum, foreach=True)


def build_modnet(cfg, info, common):
    from avalanche.training.templates import SupervisedTemplate

    from strategies.hat import HATPlugin

    model = build_hat_model(cfg, info)
    h = cfg.hat
    from strategies.modular import SyncRegPlugin, TaskKeysPlugin

    plugins = [HATPlugin(smax=h.smax, c=h.c, thres_cosh=h.thres_cosh, thres_emb=h.thres_emb, clipgrad=h.clipgrad)]
    if model.task_keys is not None:
        plugins.append(TaskKeysPlugin())
    if cfg.modules.sync_reg > 0:
        plugins.append(SyncRegPlugin(cfg.modules.sync_reg, cfg.modules.sync_eps, cfg.modules.sync_rows,
                                     cfg.modules.sync_every))
    return SupervisedTemplate(model=model, optimizer=_sgd(cfg, model), plugins=plugins, **common)


def build_hnet(cfg, info, common):
    from avalanche.training.templates import SupervisedTemplate

    from strategies.hnet import HNetModel, HNetPlugin

    if info.is_image and cfg.model.arch in ("cnn", "resnet18"):
        raise ValueError("strategy hnet builds an MLP main network; use model.arch=mlp or auto with vectors")
    h = cfg.hnet
    model = HNetModel(int(np.prod(info.input_shape)), info.task_classes, hidden=cfg.model.hidden,
                      n_layers=cfg.model.n_layers, class_incremental=info.scenario == "class",
                      task_inference=h.task_inference, chunk_size=h.chunk_size, hnet_layers=list(h.layers),
                      emb_size=h.emb_size, chunk_emb_size=h.chunk_emb_size)
    # hypnettorch's recipe: Adam on the hypernetwork (its output regulariser assumes small steps).
    opt = torch.optim.Adam(model.parameters(), lr=h.lr)
    return SupervisedTemplate(model=model, optimizer=opt, plugins=[HNetPlugin(beta=h.beta)], **common)


def _baseline(cls_name: str, kwargs_from_cfg: Callable) -> Callable:
    def build(cfg, info, common):
        import avalanche.training as at

        model = build_baseline_model(cfg, info)
        return getattr(at, cls_name)(model=model, optimizer=_sgd(cfg, model), **kwargs_from_cfg(cfg), **common)

    build.__doc__ = f"Avalanche's ``{cls_name}`` on the shared backbone."
    return build


STRATEGIES: dict[str, Callable] = {
    "modnet": build_modnet,
    "hnet": build_hnet,
    "naive": _baseline("Naive", lambda cfg: {}),
    "cumulative": _baseline("Cumulative", lambda cfg: {}),
    "ewc": _baseline("EWC", lambda cfg: dict(ewc_lambda=cfg.ewc.ewc_lambda, mode=cfg.ewc.mode,
                                             decay_factor=cfg.ewc.decay_factor)),
    "si": _baseline("SynapticIntelligence", lambda cfg: dict(si_lambda=cfg.si.si_lambda, eps=cfg.si.eps)),
    "lwf": _baseline("LwF", lambda cfg: dict(alpha=cfg.lwf.alpha, temperature=cfg.lwf.temperature)),
    "gem": _baseline("GEM", lambda cfg: dict(patterns_per_exp=cfg.gem.patterns_per_exp,
                                             memory_strength=cfg.gem.memory_strength)),
    "agem": _baseline("AGEM", lambda cfg: dict(patterns_per_exp=cfg.agem.patterns_per_exp,
                                               sample_size=cfg.agem.sample_size)),
    "replay": _baseline("Replay", lambda cfg: dict(mem_size=cfg.replay.mem_size)),
}


def build_strategy(name: str, cfg, info: BenchmarkInfo, common: dict):
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; valid choices: {', '.join(STRATEGIES)}")
    return STRATEGIES[name](cfg, info, common)
