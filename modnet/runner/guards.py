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


class NaNGuard(SupervisedPlugin):
    """Stops a run whose loss is NaN/inf; one host sync per epoch, not per step."""

    def before_training_epoch(self, strategy, **kw):
        self.bad = torch.zeros((), dtype=torch.bool, device=strategy.device)

    def after_backward(self, strategy, **kw):
        self.bad |= ~torch.isfinite(strategy.loss.detach()).all()

    def after_training_epoch(self, strategy, **kw):
        if bool(self.bad):
            raise NaNLossError(
                f"loss became NaN/inf in experience {strategy.experience.current_experience}, epoch "
                f"{strategy.clock.train_exp_epochs}; lower train.lr or check the input data for "
                "extreme values")
