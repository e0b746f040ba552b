"""``hnet``: task-conditioned hypernetwork (von Oswald et al., ICLR 2020) on hypnettorch.

Hyper-parameters (configs/training.yaml ``hnet``): beta 0.01 (output regulariser, paper Split-MNIST), Adam lr
0.001, task embedding 32, chunk size 4000, chunk embedding 32, hypernetwork layers [100, 100]; class-
incremental task inference by lowest entropy (HNET+ENT). The main network is an MLP of ``model.hidden`` x
``model.n_layers``.
"""
from __future__ import annotations

from strategies.registry import register_strategy

NAME = "hnet"


def hnet_bytes(strategy, info) -> int:
    """The task embeddings (inference reads one per task) and the regulariser's targets: the hypernetwork's
    outputs for earlier tasks, stored before the last experience."""
    from strategies.memory import plugin_of, tensor_bytes
    from strategies.plugins.hnet import HNetPlugin

    targets = plugin_of(strategy, HNetPlugin).targets or []
    return tensor_bytes([*strategy.model.hnet.conditional_params, *(t for task in targets for t in task)])


@register_strategy(NAME, stored_bytes=hnet_bytes, gradient_sync="allreduce")
def build(cfg, info, common):
    import numpy as np
    import torch

    from modnet.config import ConfigError
    from strategies.plugins.hnet import HNetModel, HNetPlugin
    from strategies.template import ConditionedTemplate

    if info.is_image and cfg.model.arch in ("cnn", "resnet18"):
        raise ConfigError("strategy hnet builds an MLP main network; use model.arch=mlp or auto with vectors")
    h = cfg.hnet
    model = HNetModel(int(np.prod(info.input_shape)), info.task_classes, hidden=cfg.model.hidden,
                      n_layers=cfg.model.n_layers, class_incremental=info.scenario == "class",
                      task_inference=h.task_inference, chunk_size=h.chunk_size, hnet_layers=list(h.layers),
                      emb_size=h.emb_size, chunk_emb_size=h.chunk_emb_size)
    # hypnettorch's recipe: Adam on the hypernetwork (its output regulariser assumes small steps).
    opt = torch.optim.Adam(model.parameters(), lr=h.lr)
    return ConditionedTemplate(model=model, optimizer=opt, plugins=[HNetPlugin(beta=h.beta)], **common)
