"""``modnet``: the modular network (HAT task masks, SynC functional modules, key-vector gates, task keys).

Hyper-parameters (configs/training.yaml): ``hat`` (Serra et al. 2018: smax 400, c 0.75, thres_cosh 50, thres_emb 6,
clipgrad 10000), ``modules`` (k, key_dim, tau, estimator, clustering; sync regulariser weight, eps, every,
rows), ``model`` (widths, ``modules``/``gate``/``task_keys`` switches); plain SGD (``train.lr`` 0.05,
momentum 0) as HAT's reference.
"""
from __future__ import annotations

from strategies.registry import register_strategy

NAME = "modnet"


@register_strategy(NAME, gradient_sync="ddp", resumes_at_experience=True)
def build(cfg, info, common):
    from strategies.common import modular_network, sgd
    from strategies.plugins.hat import HATPlugin
    from strategies.plugins.modular import SyncRegPlugin, TaskKeysPlugin
    from strategies.template import ConditionedTemplate

    model = modular_network(cfg, info)
    h = cfg.hat
    plugins = [HATPlugin(smax=h.smax, c=h.c, thres_cosh=h.thres_cosh, thres_emb=h.thres_emb, clipgrad=h.clipgrad)]
    if model.task_keys is not None:
        plugins.append(TaskKeysPlugin())
    if cfg.modules.sync_reg > 0:
        plugins.append(SyncRegPlugin(cfg.modules.sync_reg, cfg.modules.sync_eps, cfg.modules.sync_rows,
                                     cfg.modules.sync_every))
    return ConditionedTemplate(model=model, optimizer=sgd(cfg, model), plugins=plugins, **common)
