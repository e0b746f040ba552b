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


def sgd(cfg, model: nn.Module) -> torch.optim.Optimizer:
    # foreach: one multi-tensor update for all parameters (torch only defaults to it on CUDA)
    return torch.optim.SGD(model.parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum, foreach=True)


def avalanche_baseline(class_name: str, cfg, info, common: dict, **hyper):
    """Avalanche's strategy ``class_name`` on the shared backbone and optimiser."""
    import avalanche.training as at

    model = baseline_network(cfg, info)
    return getattr(at, class_name)(model=model, optimizer=sgd(cfg, model), **hyper, **common)
