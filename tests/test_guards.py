"""modnet.runner.guards: what stops a training run that can no longer give meaningful numbers."""
import types

import pytest
import torch

from modnet.runner.guards import NaNGuard, NaNLossError


@pytest.mark.parametrize("bad_step", [None, 0, 3, 4, 9])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_guard_stops_an_epoch_with_any_non_finite_loss_wherever_it_falls(bad_step, bad):
    """NaNGuard keeps the losses between checks (``fold_every`` = 4 here): a non-finite loss in the first fold, on a
    fold's last step, in a later fold or in the epoch's remainder (10 steps: 4 + 4 + 2) stops the epoch; finite
    losses, scalars and Avalanche's one-element losses mixed, pass."""
    guard = NaNGuard()
    guard.fold_every = 4
    strategy = types.SimpleNamespace(device=torch.device("cpu"), loss=None,
                                     clock=types.SimpleNamespace(train_exp_epochs=0),
                                     experience=types.SimpleNamespace(current_experience=0))
    guard.before_training_epoch(strategy)
    for step in range(10):
        value = bad if step == bad_step else 1e30 * step  # large but finite
        strategy.loss = torch.tensor([value]) if step % 2 else torch.tensor(value)
        guard.after_backward(strategy)
    if bad_step is None:
        guard.after_training_epoch(strategy)
    else:
        with pytest.raises(NaNLossError):
            guard.after_training_epoch(strategy)
