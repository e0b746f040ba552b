"""HAT as an Avalanche plugin: each piece of the method hooks the training callback where it belongs.

Avalanche's ``SupervisedTemplate`` runs the loop (data, forward, loss, optimiser, evaluation); this plugin
adds what HAT needs around it (Serra et al. 2018, MISSION.md 1.1):
  before_training_exp    the strategy's condition: the task whose embeddings train, HAT's training settings
  before_training_epoch  count the batches for the s schedule
  before_forward         s annealed from 1/smax to smax over the epoch's batches (in the condition)
  before_backward        + c * capacity regulariser (recorded by the forward in the condition's trace; its
                         ``loss_term``, which the template computes with the forward under train.compile)
  update_terms           the step's gradient conditioning of protected weights, clipping, and the clamp of the
                         embeddings to +-thres_emb after it (``strategies.update``: the template applies them
                         around the optimiser's step; the embedding compensation happens in the masks' backward,
                         modnet.nets.hat.CompensatedMasks)
  after_training_exp     cumulative masks a^{<=t} = max(a^{<t}, a_t); the condition leaves HAT training
Evaluation runs the network's default condition (s = smax). The plugin writes nothing onto the model but
its parameters (clamp) and the cumulative-mask buffers it registered (``consolidate``).
"""
from __future__ import annotations

import torch
from modnet.nets.hat import annealed_s, capacity_regulariser, flush_subnormals, free_capacity, weight_protection
from modnet.nets.models import HATNet, HATTraining
from strategies.template import ForwardLossTerm, train_condition
from strategies.update import UpdateTerm, UpdateTerms


class HATPlugin(ForwardLossTerm, UpdateTerm):
    def __init__(self, smax: float = 400.0, c: float = 0.75, thres_cosh: float = 50.0, thres_emb: float = 6.0,
                 clipgrad: float = 10000.0):
        super().__init__()
        self.smax, self.c = smax, c
        self.thres_cosh, self.thres_emb, self.clipgrad = thres_cosh, thres_emb, clipgrad
        self.task = 0
        self._batch = 0
        self._n_batches = 1

    @staticmethod
    def _model(strategy) -> HATNet:
        if not isinstance(strategy.model, HATNet):
            raise TypeError(f"HATPlugin needs a HATNet model, got {type(strategy.model).__name__}")
        return strategy.model

    def before_training(self, strategy, **kw):
        # sigmoid(s*e) at s=400 produces subnormal floats, which are ~100x slower on x86 CPUs: flushed to zero
        # (this thread; torch's OpenMP workers inherit the mode only when started after it: flush_subnormals)
        flush_subnormals()

    def before_training_exp(self, strategy, **kw):
        # Avalanche has adapted the model (new gates) and rebuilt the optimiser before this callback.
        self.task = strategy.experience.current_experience
        model = self._model(strategy)
        condition = train_condition(strategy)
        condition.task = self.task
        # Everything below changes only between tasks: computed once per experience, so that each step's
        # update is a few fused multi-tensor ops (one compiled function under train.compile) whatever the depth.
        # From the second task on, each protected weight's gradient times its multiplier (HAT eq. 2)
        protected = []
        for layer, out_m, in_m in zip(model.masked, model.cumulative_masks(), model.input_masks()):
            protected.append((layer.weight, weight_protection(out_m, in_m, layer.weight.shape).contiguous()))
            if layer.bias is not None:
                protected.append((layer.bias, 1 - out_m))
        self._terms = UpdateTerms(grad_masks=protected if self.task > 0 else (), clip_norm=self.clipgrad,
                                  clamps=[([layer.task_embedding.weight for layer in model.masked], self.thres_emb)])
        # The training masks carry the compensated embedding gradient and give the weighted capacity
        # regulariser c R, R = sum_l a_l . (1 - a^{<t}_l) / sum (1 - a^{<t}) (HAT eq. 5), whose free capacity
        # is fixed per task (c folded into it: one product less per step).
        condition.hat = HATTraining(self.smax, self.thres_cosh, self.c * free_capacity(model.cumulative_masks()))

    def before_training_epoch(self, strategy, **kw):
        self._batch = 0
        self._n_batches = len(strategy.dataloader)

    def before_forward(self, strategy, **kw):
        if strategy.is_training:
            train_condition(strategy).s = annealed_s(self._batch, self._n_batches, self.smax)
            self._batch += 1

    def loss_term(self, model, x, y, condition):
        reg = condition.trace.capacity  # c * R, from the training forward
        if reg is None:  # no training forward went through the masks: compute it now
            reg = self.c * capacity_regulariser(model.masks(self.task, condition.s), model.cumulative_masks())
        return reg

    def update_terms(self, strategy) -> UpdateTerms:
        return self._terms  # built per experience (before_training_exp)

    def after_training_exp(self, strategy, **kw):
        model = self._model(strategy)
        model.consolidate(self.task)
        train_condition(strategy).hat = None
        warn_masks_off(model, self.task)


def masked_off_layers(model: HATNet, task: int) -> list[tuple[int, int]]:
    """(layer, units) of each masked layer where task ``task``'s HAT mask at smax is off (< 0.5) in every unit."""
    with torch.no_grad():
        on = [int((m > 0.5).sum()) for m in model.masks(task)]  # one host read per layer, once per experience
    return [(i, layer.n_units) for i, (n, layer) in enumerate(zip(on, model.masked)) if n == 0]


def warn_masks_off(model: HATNet, task: int) -> None:
    """One line on stderr when a task ends with a masked layer shut: its path then passes nothing and its accuracy
    is chance, which nothing else says while training (seen: a 4-channel CNN on 80 images at lr 0.2, where the
    capacity regulariser won over the task's loss)."""
    off = masked_off_layers(model, task)
    if off:
        import sys

        layers = ", ".join(f"{i} ({n} units)" for i, n in off)
        print(f"warning: task {task + 1} ended with its HAT mask off in every unit of masked layer(s) {layers}: "
              "its path passes nothing and its accuracy is chance; lower hat.c, train longer (train.epochs) or at "
              "another train.lr, or widen the network", file=sys.stderr, flush=True)
