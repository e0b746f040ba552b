"""``modnet``: the modular network (HAT task masks, SynC functional modules, key-vector gates, task keys).

Hyper-parameters (configs/training.yaml): ``hat`` (Serra et al. 2018: smax 400, c 0.75, thres_cosh 50, thres_emb 6,
clipgrad 10000), ``modules`` (k, key_dim, tau, estimator, settle_epochs, clustering; sync regulariser weight,
eps, every, rows), ``model`` (widths, ``modules``/``gate``/``task_keys`` switches); plain SGD (``train.lr``
0.05, momentum 0) as HAT's reference.
"""
from __future__ import annotations

from strategies.memory import modnet_bytes
from strategies.registry import register_strategy

NAME = "modnet"


def modnet_strategy(model, optimizer, *, smax: float = 400.0, c: float = 0.75, thres_cosh: float = 50.0,
                    thres_emb: float = 6.0, clipgrad: float = 10000.0, sync_reg: float = 0.0, sync_eps: float = 0.3,
                    sync_rows: int | None = None, sync_every: int = 1, ood_weight: float = 1.0,
                    settle_epochs: int = 1, plugins=(), **template_args):
    """The ``modnet`` strategy on a modular network (``modnet.nets.models.HATNet``): an Avalanche template
    whose forward passes the network its condition, with HAT's plugin, the task keys' plugin when the network
    has task keys, the OOD heads' plugin when it has
    per-task OOD heads (class-incremental, ``task_inference.method=ood``), and the sync regulariser when ``sync_reg`` > 0. ``template_args`` are Avalanche's
    (criterion, train_mb_size, train_epochs, eval_mb_size, device, evaluator, ...)."""
    from strategies.plugins.hat import HATPlugin
    from strategies.plugins.modular import ModulesPlugin, SyncRegPlugin, TaskKeysPlugin
    from strategies.template import ConditionedTemplate

    ours = [HATPlugin(smax=smax, c=c, thres_cosh=thres_cosh, thres_emb=thres_emb, clipgrad=clipgrad)]
    if getattr(model, "gate", None) is not None:
        ours.append(ModulesPlugin(settle_epochs))
    if model.task_keys is not None:
        ours.append(TaskKeysPlugin())
    if getattr(model, "task_ood", None) is not None:
        from strategies.plugins.ood import TaskOODPlugin

        ours.append(TaskOODPlugin(ood_weight))
    if getattr(model, "task_features", None) is not None:
        from strategies.plugins.features import TaskFeaturesPlugin

        ours.append(TaskFeaturesPlugin())
    if sync_reg > 0:
        ours.append(SyncRegPlugin(sync_reg, sync_eps, sync_rows, sync_every))
    return ConditionedTemplate(model=model, optimizer=optimizer, plugins=[*ours, *plugins], **template_args)


def modnet_gradient_sync(strategy) -> str:
    """DDP's hooks, unless the network has transform heads: TaskOODPlugin's loss runs the heads (and, on a
    network with batch norm, a second forward of the backbone) outside DDP's forward, and DDP's reducer fails
    on parameters its forward did not reach or reached twice in one backward."""
    return "allreduce" if getattr(strategy.model, "task_ood", None) is not None else "ddp"


@register_strategy(NAME, stored_bytes=modnet_bytes, gradient_sync=modnet_gradient_sync, resumes_at_experience=True)
def build(cfg, info, common):
    from strategies.common import modular_network, sgd

    model = modular_network(cfg, info)
    h, m = cfg.hat, cfg.modules
    return modnet_strategy(model, sgd(cfg, info, model), smax=h.smax, c=h.c, thres_cosh=h.thres_cosh,
                           thres_emb=h.thres_emb, clipgrad=h.clipgrad, sync_reg=m.sync_reg, sync_eps=m.sync_eps,
                           sync_rows=m.sync_rows, sync_every=m.sync_every,
                           settle_epochs=m.settle_epochs,
                           ood_weight=cfg.task_inference.weight, **common)
