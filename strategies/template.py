"""The Avalanche template of strategies whose model takes an explicit condition (``modnet.nets.models``).

A modular network's forward is told what to do by its caller (hypnettorch's ``condition``): the task being
trained, HAT's slope s and training settings, what to record. The template owns that condition
(``train_condition``); plugins set its fields in their callbacks (HAT: task, s, HAT settings; the sync
regulariser: record) and read what the forward recorded (``train_condition.trace``). Evaluation uses a
fresh default condition (s = smax, nothing recorded). No plugin sets attributes on the model.
"""
from __future__ import annotations

from avalanche.training.templates import SupervisedTemplate
from torch import nn

from modnet.nets.models import Condition, ForwardTrace


class ConditionedTemplate(SupervisedTemplate):
    """``SupervisedTemplate`` whose forward calls ``model(x, task_labels, condition=...)``."""

    def __init__(self, **kwargs):  # keywords only, as Avalanche's templates are moving to
        super().__init__(**kwargs)
        self.train_condition = Condition()
        # the rows of a training batch the classification loss reads (None: all); a plugin that turns some of
        # the batch's rows into inputs for another loss sets it every step (the transform heads' replaced
        # rows, strategies.plugins.ood)
        self.classification_rows: slice | None = None

    def criterion(self):
        rows = self.classification_rows if self.is_training else None
        if rows is None:
            return super().criterion()
        return self._criterion(self.mb_output[rows], self.mb_y[rows])

    def forward_through(self, model: nn.Module):
        """The current mini-batch through ``model`` (the strategy's model, or a data-parallel wrapper of it)."""
        if self.is_training:
            condition = self.train_condition
            condition.trace = ForwardTrace()  # this step's records only
        else:
            condition = Condition()
        # a batch whose task label the tensor loader knows (every label the same: evaluation of one experience)
        # goes as an int, so a task-incremental network needs no torch.unique of the labels (a host read)
        single = getattr(self.dataloader, "single_task", None)
        return model(self.mb_x, self.mb_task_id if single is None else single, condition=condition)

    def forward(self):
        return self.forward_through(self.model)


def train_condition(strategy) -> Condition:
    """The training condition of a strategy built on ``ConditionedTemplate`` (a clear error otherwise)."""
    condition = getattr(strategy, "train_condition", None)
    if condition is None:
        raise TypeError(f"this plugin needs a strategy built on strategies.template.ConditionedTemplate "
                        f"(its model takes a condition), got {type(strategy).__name__}")
    return condition
