"""The Avalanche template of strategies whose model takes an explicit condition (``modnet.nets.models``).

A modular network's forward is told what to do by its caller (hypnettorch's ``condition``): the task being
trained, HAT's slope s and training settings, what to record. The template owns that condition
(``train_condition``); plugins set its fields in their callbacks (HAT: task, s, HAT settings; the sync
regulariser: record) and read what the forward recorded (``train_condition.trace``). Evaluation uses a
fresh default condition (s = smax, nothing recorded). No plugin sets attributes on the model.

A plugin whose loss term is a function of the training forward is a ``ForwardLossTerm`` (HAT's capacity
regulariser, the transform heads' loss): eager, its ``before_backward`` adds the term after Avalanche's
criterion; with ``train.compile`` the template computes the forward, the criterion and every such term in
one compiled function (``compiled_training_loss``), so that their ops are one graph, forward and backward.

A plugin that conditions the gradients or bounds the parameters is an ``strategies.update.UpdateTerm`` (HAT, the
gates' frozen keys): the template's ``optimizer_step`` applies every such plugin's terms around the optimiser's
step, as one compiled function under ``train.compile``.
"""
from __future__ import annotations

import torch
from avalanche.core import SupervisedPlugin
from avalanche.training.templates import SupervisedTemplate
from torch import Tensor, nn

from modnet.nets.models import Condition, ForwardTrace, compile_once


class ConditionedTemplate(SupervisedTemplate):
    """``SupervisedTemplate`` whose forward calls ``model(x, task_labels, condition=...)``."""

    def __init__(self, **kwargs):  # keywords only, as Avalanche's templates are moving to
        super().__init__(**kwargs)
        self.train_condition = Condition()
        # the rows of a training batch the classification loss reads (None: all); a plugin that turns some of
        # the batch's rows into inputs for another loss sets it every step (the transform heads' replaced
        # rows, strategies.plugins.ood)
        self.classification_rows: slice | None = None
        # this step's criterion and ForwardLossTerm terms, computed with the forward (train.compile)
        self.loss_fused = False
        self._fused_loss: Tensor | None = None

    def criterion(self):
        if self.is_training and self._fused_loss is not None:
            loss, self._fused_loss = self._fused_loss, None
            return loss
        rows = self.classification_rows if self.is_training else None
        if rows is None:
            return super().criterion()
        return self._criterion(self.mb_output[rows], self.mb_y[rows])

    def optimizer_step(self):
        """The optimiser's step with every ``UpdateTerm`` plugin's gradient multipliers, norm clip and parameter
        bounds around it (``strategies.update.update_step``; one compiled function under ``train.compile``)."""
        from strategies.update import UpdateTerm, merge_terms, update_step

        terms = [p.update_terms(self) for p in self.plugins if isinstance(p, UpdateTerm)]
        if not terms:
            return super().optimizer_step()
        update_step(self.optimizer, merge_terms(terms), self.train_condition.compiled)

    def _task_argument(self):
        # a batch whose task label the tensor loader knows (every label the same: evaluation of one experience)
        # goes as an int, so a task-incremental network needs no torch.unique of the labels (a host read)
        single = getattr(self.dataloader, "single_task", None)
        return self.mb_task_id if single is None else single

    def forward_through(self, model: nn.Module):
        """The current mini-batch through ``model`` (the strategy's model, or a data-parallel wrapper of it).
        Training: the batch as the ``ForwardLossTerm`` plugins make it (``training_input``) first, kept as the
        step's batch (``mbatch``), which their loss terms read."""
        self.loss_fused = False
        if self.is_training:
            condition = self.train_condition
            condition.trace = ForwardTrace()  # this step's records only
            x = self.mb_x
            for term in self.plugins:
                if isinstance(term, ForwardLossTerm):
                    x = term.training_input(self.model, x)
            self.mbatch[0] = x
        else:
            condition = Condition()
        return model(self.mb_x, self._task_argument(), condition=condition)

    def forward(self):
        condition = self.train_condition
        if not (self.is_training and condition.compiled is not None):
            return self.forward_through(self.model)
        condition.trace = ForwardTrace()
        # the criterion reads the graph's own logits: a plugin's after_forward that rewrites mb_output changes what
        # the callbacks after it see, not this step's loss (AutocastPlugin's float cast: the graph casts too)
        terms = tuple(p for p in self.plugins if isinstance(p, ForwardLossTerm))
        out, self._fused_loss = compiled_training_loss(condition.compiled)(
            self.model, self.mb_x, self._task_argument(), condition, self.mb_y, self.classification_rows,
            self._criterion, terms)
        self.loss_fused = True
        return out


class ForwardLossTerm(SupervisedPlugin):
    """A plugin whose loss term is computed from the training forward (the batch, the condition's trace):
    ``loss_term`` is its one override point. Eager, ``before_backward`` adds the term to ``strategy.loss``
    (after Avalanche's criterion, in the plugins' order); when the template has computed it with the forward
    (``ConditionedTemplate.loss_fused``, ``train.compile``), it adds nothing."""

    def loss_term(self, model: nn.Module, x: Tensor, y: Tensor, condition: Condition) -> Tensor:
        raise NotImplementedError

    def training_input(self, model: nn.Module, x: Tensor) -> Tensor:
        """The training batch as the forward and every loss term read it (default: as it is; the transform heads
        replace rows of it). Eager, the template applies it before the forward; compiled, inside the graph."""
        return x

    def before_backward(self, strategy, **kw):
        if getattr(strategy, "loss_fused", False):
            return
        strategy.loss = strategy.loss + self.loss_term(strategy.model, strategy.mb_x, strategy.mb_y,
                                                       train_condition(strategy))


def training_loss(model: nn.Module, x: Tensor, task, condition: Condition, y: Tensor, rows: slice | None,
                  criterion, terms) -> tuple[Tensor, Tensor]:
    """(logits, loss) of a training step: each ``ForwardLossTerm``'s ``training_input`` on the batch ``x``, the
    forward under ``condition``, ``criterion`` on the ``rows`` the
    classification loss reads, plus each ``ForwardLossTerm``'s term in the plugins' order, as the eager
    callbacks sum them. The losses are computed in float32 outside autocast, as the eager loop computes them
    after ``AutocastPlugin`` has closed it."""
    for term in terms:
        x = term.training_input(model, x)
    out = model(x, task, condition=condition)
    with torch.autocast(x.device.type, enabled=False):
        out = out.float()
        loss = criterion(out, y) if rows is None else criterion(out[rows], y[rows])
        for term in terms:
            loss = loss + term.loss_term(model, x, y, condition)
    return out, loss


def compiled_training_loss(backend: str):
    """``training_loss`` through ``torch.compile(backend=backend, dynamic=True)``, one per backend: the
    network's masks, gates, HAT's compensation, the layers, the criterion and the plugins' terms are one
    graph, forward and backward (the masked pass alone, ``modnet.nets.models.compiled_masked_pass``, leaves
    the heads and losses eager: the Split-MNIST MLP's step cost 1.57x a plain step that way, 1.38x this way,
    ``scripts/step_floor_probe.py``). A graph per task (``modnet.nets.models.compile_once``)."""
    return compile_once(training_loss, backend)


def train_condition(strategy) -> Condition:
    """The training condition of a strategy built on ``ConditionedTemplate`` (a clear error otherwise)."""
    condition = getattr(strategy, "train_condition", None)
    if condition is None:
        raise TypeError(f"this plugin needs a strategy built on strategies.template.ConditionedTemplate "
                        f"(its model takes a condition), got {type(strategy).__name__}")
    return condition
