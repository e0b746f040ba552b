"""Task-conditioned hypernetwork baseline (von Oswald et al., ICLR 2020) on hypnettorch.

hypnettorch does the networks and the regulariser: a main network without own weights (``mnets.MLP``), a
chunked hypernetwork (``hnets.ChunkedHMLP``) that generates them from a task embedding, and the output
regulariser ``hnet_regularizer.calc_fix_target_reg`` that keeps the weights generated for earlier tasks
where they were. We add the Avalanche glue: a multi-head model and a plugin that hooks the regulariser in.
Only hypnettorch's mnets/hnets/utils are imported: its bundled data handlers break on current numpy.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from avalanche.core import SupervisedPlugin
from torch import Tensor

from modnet.nets.models import MultiHeadTaskNet
from strategies.template import train_condition


class HNetModel(MultiHeadTaskNet):
    """Main MLP whose weights come from a hypernetwork, one output head (a slice of outputs) per task."""

    def __init__(self, in_dim: int, task_classes: Sequence[Sequence[int]], hidden: int = 256, n_layers: int = 2,
                 class_incremental: bool = False, task_inference: str = "entropy", chunk_size: int = 4000,
                 hnet_layers: Sequence[int] = (100, 100), emb_size: int = 32, chunk_emb_size: int = 32):
        super().__init__(task_classes, class_incremental, task_inference)
        from hypnettorch.hnets import ChunkedHMLP
        from hypnettorch.mnets import MLP

        sizes = [len(c) for c in self.task_classes]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).tolist()
        self.mnet = MLP(n_in=in_dim, n_out=int(self.offsets[-1]), hidden_layers=[hidden] * n_layers,
                        no_weights=True, verbose=False)
        self.hnet = ChunkedHMLP(self.mnet.param_shapes, chunk_size=chunk_size, chunk_emb_size=chunk_emb_size,
                                cond_in_size=emb_size, layers=list(hnet_layers), num_cond_embs=self.n_tasks,
                                verbose=False)
        self.hnet.apply_chunked_hyperfan_init(mnet=self.mnet)

    def task_logits(self, x: Tensor, task: int, condition=None) -> Tensor:
        out = self.mnet(x.flatten(1), weights=self.hnet(cond_id=task))
        return out[:, self.offsets[task]:self.offsets[task + 1]]


class HNetPlugin(SupervisedPlugin):
    """Adds beta * output regulariser for earlier tasks; trains only the current task's embedding."""

    def __init__(self, beta: float = 0.01):
        super().__init__()
        self.beta = beta
        self.task = 0
        self.targets = None

    def before_training_exp(self, strategy, **kw):
        from hypnettorch.utils.hnet_regularizer import get_current_targets

        model: HNetModel = strategy.model
        self.task = strategy.experience.current_experience
        train_condition(strategy).task = self.task  # class-incremental training: this task's head
        self.targets = get_current_targets(self.task, model.hnet) if self.task > 0 else None

    def before_backward(self, strategy, **kw):
        if self.task == 0 or self.beta == 0:
            return
        from hypnettorch.utils.hnet_regularizer import calc_fix_target_reg

        model: HNetModel = strategy.model
        reg = calc_fix_target_reg(model.hnet, self.task, targets=self.targets, mnet=model.mnet,
                                  prev_theta=None, prev_task_embs=None)
        strategy.loss = strategy.loss + self.beta * reg

    def before_update(self, strategy, **kw):
        # As in the reference code only the current task embedding moves; earlier ones stay fixed.
        for t, emb in enumerate(strategy.model.hnet.conditional_params):
            if t != self.task and emb.grad is not None:
                emb.grad.zero_()

    def after_training_exp(self, strategy, **kw):
        strategy.model.mark_trained(self.task)
