"""Task-conditioned hypernetwork baseline (von Oswald et al., ICLR 2020) on hypnettorch.

hypnettorch does the networks and the regulariser: a main network without own weights (``mnets.MLP``), a
chunked hypernetwork (``hnets.ChunkedHMLP``) that generates them from a task embedding e_t, and the output
regulariser ``hnet_regularizer.calc_fix_target_reg``. We add the Avalanche glue: a multi-head model and a
plugin that trains one task the way the reference code does (chrhenning/hypercl, mnist/train_splitMNIST.py,
``train_class_one_t``):

    L = L_task(θ, e_t) + β / (t) · Σ_{t' < t} || f_h(e_t', θ + Δθ) - Θ*_t' ||²

Θ*_t' are the weights the hypernetwork generated for task t' before task t started (the stored targets of
*all* earlier tasks), Δθ is the look-ahead: the step the optimiser is about to take on the task loss alone
(reference: ``--no_lookahead`` off, ``calc_delta_theta`` on Adam, detached). As in the reference, the task
loss is back-propagated first, Δθ is read from its gradient, then the regulariser is back-propagated on top,
and only the current task embedding e_t moves (earlier ones are fixed inputs of the targets).

Only hypnettorch's mnets/hnets/utils are imported: its bundled data handlers break on current numpy, and its
``optim_step.adam_step`` uses ``Tensor.add_(Number, Tensor)``, gone from current torch (``adam_lookahead``
below is the same formula).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from avalanche.core import SupervisedPlugin
from torch import Tensor, nn

from modnet.nets.models import MultiHeadTaskNet
from strategies.template import train_condition


#: hnet.init (modnet.validate keeps a copy, checked by the tests)
INITS = ("xavier", "hyperfan")


class HNetModel(MultiHeadTaskNet):
    """Main MLP whose weights come from a hypernetwork, one output head (a slice of outputs) per task.

    ``init='xavier'`` is the reference code's initialisation (hypercl ``mnist/train_utils.py``): Xavier-uniform
    hypernetwork weight matrices, zero biases, task and chunk embeddings N(0, 1). ``'hyperfan'`` is
    hypnettorch's chunked hyperfan init (it clips the chunk embeddings' variance when the inputs are large).
    """

    def __init__(self, in_dim: int, task_classes: Sequence[Sequence[int]], main_layers: Sequence[int] = (400, 400),
                 class_incremental: bool = False, task_inference: str = "entropy", chunk_size: int = 42000,
                 hnet_layers: Sequence[int] = (10, 10), emb_size: int = 96, chunk_emb_size: int = 96,
                 init: str = "xavier"):
        super().__init__(task_classes, class_incremental, task_inference)
        from hypnettorch.hnets import ChunkedHMLP
        from hypnettorch.mnets import MLP

        sizes = [len(c) for c in self.task_classes]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).tolist()
        self.mnet = MLP(n_in=in_dim, n_out=int(self.offsets[-1]), hidden_layers=list(main_layers),
                        no_weights=True, verbose=False)
        self.hnet = ChunkedHMLP(self.mnet.param_shapes, chunk_size=chunk_size, chunk_emb_size=chunk_emb_size,
                                cond_in_size=emb_size, layers=list(hnet_layers), num_cond_embs=self.n_tasks,
                                verbose=False)
        if init == "xavier":
            for w in self.hnet.layer_weight_tensors:
                nn.init.xavier_uniform_(w)
            for b in self.hnet.layer_bias_vectors:
                if b is not None:
                    nn.init.zeros_(b)
            # task embeddings and chunk embeddings: hypnettorch already draws them from N(0, 1)
        elif init == "hyperfan":
            self.hnet.apply_chunked_hyperfan_init(mnet=self.mnet)
        else:  # INITS
            raise ValueError(f"hnet init must be one of {INITS}, got {init!r}")

    def task_logits(self, x: Tensor, task: int, condition=None) -> Tensor:
        out = self.mnet(x.flatten(1), weights=self.hnet(cond_id=task))
        return out[:, self.offsets[task]:self.offsets[task + 1]]

    def task_units(self, x: Tensor, task: int) -> list[Tensor]:
        """The main network's hidden layers (after their ReLU) under task ``task``'s generated weights, as
        ``HATNet.task_units`` (the CKA drift's representation): hypnettorch's MLP, layer by layer (its
        ``param_shapes``: weight, bias per layer; ReLU between layers)."""
        weights, h, hidden = self.hnet(cond_id=task), x.flatten(1), []
        for i in range(0, len(weights) - 2, 2):
            h = torch.relu(nn.functional.linear(h, weights[i], weights[i + 1]))
            hidden.append(h)
        return hidden


def adam_lookahead(optimizer: torch.optim.Adam, params: Sequence[Tensor]) -> list[Tensor]:
    """Δθ that ``optimizer.step()`` would apply to ``params`` given their current ``.grad`` (detached; the
    optimiser's state is not touched). Adam (Kingma & Ba), as torch computes it, step k = state step + 1:
    m = β1 m + (1 - β1) g,  v = β2 v + (1 - β2) g²,  Δθ = -lr / (1 - β1^k) · m / (sqrt(v / (1 - β2^k)) + ε).
    A parameter without gradient gets g = 0."""
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    steps = []
    for p in params:
        group = group_of[id(p)]
        if group.get("weight_decay", 0) or group.get("amsgrad", False):
            raise ValueError("adam_lookahead covers Adam without weight decay and amsgrad")
        beta1, beta2 = group["betas"]
        state = optimizer.state.get(p, {})
        g = torch.zeros_like(p) if p.grad is None else p.grad.detach()
        k = int(state.get("step", 0)) + 1
        m = beta1 * state["exp_avg"] + (1 - beta1) * g if "exp_avg" in state else (1 - beta1) * g
        v = beta2 * state["exp_avg_sq"] + (1 - beta2) * g * g if "exp_avg_sq" in state else (1 - beta2) * g * g
        denom = (v / (1 - beta2 ** k)).sqrt() + group["eps"]
        steps.append(-group["lr"] / (1 - beta1 ** k) * m / denom)
    return steps


class HNetPlugin(SupervisedPlugin):
    """Trains task t with the output regulariser on the hypernetwork outputs for tasks 0..t-1.

    ``beta``: regulariser strength (paper Split-MNIST: 0.01). ``lookahead``: regularise f_h(e_t', θ + Δθ)
    (paper: on). ``iterations``: optimiser steps per task (paper Split-MNIST: 2000 at batch 128); the
    experience is trained for ceil(iterations / batches per epoch) epochs, so at least ``iterations`` steps
    whatever its size (None: ``train.epochs``, the shared loop's epoch count).
    """

    def __init__(self, beta: float = 0.01, lookahead: bool = True, iterations: int | None = 2000):
        super().__init__()
        self.beta = beta
        self.lookahead = lookahead
        self.iterations = iterations
        self.task = 0
        self.targets = None

    def before_training_exp(self, strategy, **kw):
        from hypnettorch.utils.hnet_regularizer import get_current_targets

        model: HNetModel = strategy.model
        self.task = strategy.experience.current_experience
        train_condition(strategy).task = self.task  # class-incremental training: this task's head
        # Θ*_t' for every t' < t, computed once from the hypernetwork as it is now (detached)
        self.targets = get_current_targets(self.task, model.hnet) if self.task > 0 else None
        if self.iterations is not None:
            batches = math.ceil(len(strategy.experience.dataset) / strategy.train_mb_size)
            strategy.train_epochs = max(1, math.ceil(self.iterations / batches))

    def after_backward(self, strategy, **kw):
        """The task loss's gradient is in ``.grad``: read the look-ahead from it, then add the regulariser's."""
        if self.task == 0 or self.beta == 0:
            return
        from hypnettorch.utils.hnet_regularizer import calc_fix_target_reg

        model: HNetModel = strategy.model
        d_theta = adam_lookahead(strategy.optimizer, model.hnet.unconditional_params) if self.lookahead else None
        reg = calc_fix_target_reg(model.hnet, self.task, targets=self.targets, mnet=model.mnet, dTheta=d_theta,
                                  prev_theta=None, prev_task_embs=None)
        (self.beta * reg).backward()
        strategy.loss = strategy.loss.detach() + self.beta * reg.detach()  # what the loss logger reports

    def before_update(self, strategy, **kw):
        # Only the current task embedding moves (reference: one Adam on e_t per task); earlier ones stay fixed.
        for t, emb in enumerate(strategy.model.hnet.conditional_params):
            if t != self.task:
                emb.grad = None

    def after_training_exp(self, strategy, **kw):
        strategy.model.mark_trained(self.task)
