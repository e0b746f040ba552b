"""Guards that stop a training run as soon as it can no longer give meaningful numbers.

``NaNGuard`` is an Avalanche plugin: once the loss is NaN or infinite every later step is wasted (and the
accuracy matrix would be filled with chance-level numbers), so it raises ``NaNLossError`` at the end of the
epoch that produced it. It keeps a flag on the device and reads it once per epoch: one host sync per epoch,
not one per step.
"""
from __future__ import annotations

import torch
from avalanche.core import SupervisedPlugin


class NaNLossError(RuntimeError):
    """The training loss became NaN or infinite."""


class StrategyFailed(RuntimeError):
    """Strategies of a comparison that could not finish (their training diverged); the others did, and their
    results are written."""


class NaNGuard(SupervisedPlugin):
    """Stops a run whose loss is NaN/inf; one host sync per epoch, not per step."""

    # after_backward reads the loss only (strategies.template.step_fusable: a step in one graph sets it as well)
    fused_step_callbacks = ("after_backward",)

    def before_training_epoch(self, strategy, **kw):
        self.total = torch.zeros(1, dtype=torch.float64, device=strategy.device)

    def after_backward(self, strategy, **kw):
        # one op per step: a running float64 sum of the losses is non-finite iff some loss was (NaN and inf
        # propagate; float64 cannot overflow on a sum of float32 values over any feasible number of steps)
        self.total += strategy.loss.detach()  # a scalar or Avalanche's one-element loss

    def after_training_epoch(self, strategy, **kw):
        if not bool(torch.isfinite(self.total).all()):
            raise NaNLossError(
                f"loss became NaN/inf in experience {strategy.experience.current_experience + 1}, epoch "
                f"{strategy.clock.train_exp_epochs}; lower train.lr (train.cnn_lr for the CNN) or check the input "
                "data for extreme values")
