"""What the strategy files share: the networks for a benchmark, the optimiser, Avalanche baselines."""
from __future__ import annotations

import torch
from torch import nn


def modular_network(cfg, info) -> nn.Module:
    """The modular network for benchmark ``info`` (``modnet.nets.build.build_modular_network``)."""
    from modnet.nets.build import build_modular_network

    return build_modular_network(cfg, info.input_shape, info.task_classes, info.scenario == "class")


def baseline_network(cfg, info) -> nn.Module:
    """The same backbone without masks, single-head (class-incremental) or multi-head (task-incremental)."""
    from modnet.nets.build import build_baseline_network

    return build_baseline_network(cfg, info.input_shape, info.n_classes, info.scenario == "class")


def learning_rate(cfg, info) -> float:
    """SGD's lr for every strategy on ``info``'s data: ``train.cnn_lr`` when the backbone is the small CNN
    (``model.arch=cnn``, or ``auto`` on images) and it is set, else ``train.lr``."""
    from modnet.nets.build import resolve_arch

    cnn_lr = cfg.train.get("cnn_lr")
    if cnn_lr is not None and resolve_arch(cfg.model.arch, info.input_shape) == "cnn":
        return float(cnn_lr)
    return float(cfg.train.lr)


def sgd(cfg, info, model: nn.Module) -> torch.optim.Optimizer:
    # foreach: one multi-tensor update for all parameters (torch only defaults to it on CUDA)
    return torch.optim.SGD(model.parameters(), lr=learning_rate(cfg, info), momentum=cfg.train.momentum,
                           foreach=True)


def avalanche_baseline(class_name: str, cfg, info, common: dict, **hyper):
    """Avalanche's strategy ``class_name`` on the shared backbone and optimiser."""
    import avalanche.training as at

    model = baseline_network(cfg, info)
    return getattr(at, class_name)(model=model, optimizer=sgd(cfg, info, model), **hyper, **common)
