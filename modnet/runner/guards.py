"""Plugins that stop a run that has gone wrong, with one line saying what to do."""
from __future__ import annotations

import torch
from avalanche.core import SupervisedPlugin


class NaNLossError(RuntimeError):
    pass


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
                f"{strategy.clock.train_exp_epochs}; lower train.lr or check the input data for extreme values")
