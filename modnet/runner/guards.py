"""Guards that stop a training run as soon as it can no longer give meaningful numbers.

``NaNGuard`` is an Avalanche plugin: once the loss is NaN or infinite every later step is wasted (and the
accuracy matrix would be filled with chance-level numbers), so it raises ``NaNLossError`` at the end of the
epoch that produced it. It keeps the step's losses (detached, no op) and checks them on the device every
``fold_every`` steps, into a flag it reads once per epoch: one host sync per epoch, not one per step.
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
    # the losses kept between two checks on the device: an op per this many steps, not one per step (each a few us
    # warm, 15-40 us in situ after a step's kernels), and as many one-element tensors held meanwhile
    fold_every = 256

    def before_training_epoch(self, strategy, **kw):
        self.finite = torch.ones((), dtype=torch.bool, device=strategy.device)
        self._losses: list = []

    def after_backward(self, strategy, **kw):
        # the step's loss, detached (no op): a scalar or Avalanche's one-element loss
        self._losses.append(strategy.loss.detach())
        if len(self._losses) >= self.fold_every:
            self._fold()

    def _fold(self) -> None:
        """Whether every kept loss is finite, on the device, and-ed into ``finite``."""
        if self._losses:
            losses = torch.cat([loss.reshape(-1) for loss in self._losses])
            self.finite = self.finite & torch.isfinite(losses).all()
            self._losses = []

    def after_training_epoch(self, strategy, **kw):
        self._fold()
        if not bool(self.finite):
            raise NaNLossError(
                f"loss became NaN/inf in experience {strategy.experience.current_experience + 1}, epoch "
                f"{strategy.clock.train_exp_epochs}; lower train.lr (train.cnn_lr for the CNN) or check the input "
                "data for extreme values")
