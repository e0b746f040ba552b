"""``hnet``: task-conditioned hypernetwork (von Oswald et al., ICLR 2020) on hypnettorch.

Hyper-parameters (configs/training.yaml ``hnet``), the reference code's Split-MNIST classifier (chrhenning/hypercl,
mnist/train_args_default.py ``_set_default_split`` and mnist/train_args.py): main MLP 400-400 (ReLU), chunked
hypernetwork with chunks of 42000 weights, hidden layers [10, 10], task and chunk embeddings of 96, Xavier
init with N(0, 1) embeddings; beta 0.01 with look-ahead, targets of all earlier tasks; Adam lr 0.001
(betas 0.9, 0.999) at batch 128 for a fixed number of steps per task (its own loop length, not
``train.epochs``): the paper's 2000 are ~21 epochs of Split-MNIST's ~12k samples a task; Split-Digits has ~250
a task, so ``hnet.iterations`` defaults to 300 (150 epochs).
Class-incremental task inference by lowest entropy (HNET+ENT). ``hnet.main_layers: null`` uses the shared
backbone's ``model.hidden`` x ``model.n_layers`` instead.
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
    main_layers = [cfg.model.hidden] * cfg.model.n_layers if h.main_layers is None else list(h.main_layers)
    model = HNetModel(int(np.prod(info.input_shape)), info.task_classes, main_layers=main_layers,
                      class_incremental=info.scenario == "class", task_inference=h.task_inference,
                      chunk_size=h.chunk_size, hnet_layers=list(h.layers), emb_size=h.emb_size,
                      chunk_emb_size=h.chunk_emb_size, init=h.init)
    # the reference's optimisers: Adam (0.9, 0.999) on θ and on the current task embedding, same lr; one Adam
    # over both is the same per-parameter update (the plugin keeps earlier embeddings without gradient)
    opt = torch.optim.Adam(model.parameters(), lr=h.lr, betas=(0.9, 0.999))
    if h.batch_size is not None:
        common = {**common, "train_mb_size": int(h.batch_size)}
    plugin = HNetPlugin(beta=h.beta, lookahead=h.lookahead, iterations=h.iterations)
    return ConditionedTemplate(model=model, optimizer=opt, plugins=[plugin], **common)
