"""HAT's reference training loop as an Avalanche plugin (joansj/hat, approaches/hat.py ``Appr.train``).

The reference holds out a validation split of each task's training data (10%, its data loaders'
``pc_valid``), evaluates the validation loss after every epoch, divides the learning rate by ``lr_factor`` (3)
after ``lr_patience`` (5) epochs without a new best, stops once the rate falls under ``lr_min`` (1e-4) and
restores the weights of the best epoch before the task is consolidated. ``ValidationSchedulePlugin`` does
that on any Avalanche strategy (it is a ``train`` option, so every strategy of a comparison gets it):

  after_train_dataset_adaptation  hold out ``fraction`` of the experience's training data (a random split
                                  drawn from a generator seeded by torch's current seed: resume-safe, and the
                                  global random stream is not touched)
  before_training_exp             the learning rate back to its initial value, best = the model as it starts
  after_training_epoch            validation loss (eval mode, the strategy's plain cross-entropy); best ->
                                  keep the weights; else patience; lr / factor; lr < lr_min -> stop
  after_training_exp              the best weights back (the plugin must run before plugins that consolidate
                                  the task: ``modnet.runner.make_strategy`` puts it first)

The validation loss is the cross-entropy of the network's evaluation forward (for ``modnet``: s = smax, the
task's masks and gates); the reference adds HAT's capacity regulariser to it, which is not added here so
that the same rule serves every strategy.
"""
from __future__ import annotations

import copy

import torch
from avalanche.core import SupervisedPlugin
from avalanche.models.utils import avalanche_forward
from torch.nn import functional as F


def split_validation(n: int, fraction: float, generator: torch.Generator) -> tuple[list[int], list[int]]:
    """(training indices, validation indices) of ``n`` samples: ``round(fraction * n)`` (at least one when
    fraction > 0 and n > 1) drawn at random for validation."""
    n_val = min(n - 1, max(1, round(fraction * n))) if fraction > 0 and n > 1 else 0
    perm = torch.randperm(n, generator=generator).tolist()
    return sorted(perm[n_val:]), sorted(perm[:n_val])


class ValidationSchedulePlugin(SupervisedPlugin):
    """Validation split, patience-based learning-rate decay, early stop and restore-best (module doc).

    ``fraction`` 0 keeps all training data and validates on the training data itself (as the reference does
    when given no split); ``lr_patience`` None keeps the rate fixed (no decay, no stop); ``restore_best``
    False keeps the last epoch's weights."""

    def __init__(self, fraction: float = 0.1, lr_patience: int | None = 5, lr_factor: float = 3.0,
                 lr_min: float = 1e-4, restore_best: bool = True, batch_size: int = 512):
        super().__init__()
        if not 0 <= fraction < 1:
            raise ValueError(f"train.valid_fraction must be in [0, 1), got {fraction}")
        if lr_patience is not None and lr_patience < 1:
            raise ValueError(f"train.lr_patience must be >= 1 or null (no decay), got {lr_patience}")
        if lr_factor <= 1:
            raise ValueError(f"train.lr_factor must be > 1, got {lr_factor}")
        self.fraction, self.lr_patience, self.lr_factor = fraction, lr_patience, lr_factor
        self.lr_min, self.restore_best, self.batch_size = lr_min, restore_best, batch_size
        self._initial_lrs: list[float] | None = None
        self.history: list[dict] = []  # per epoch of the current experience: val loss, lr, best
        self._val = None

    # -- the split --------------------------------------------------------------------------------------
    def after_train_dataset_adaptation(self, strategy, **kw):
        ds = strategy.adapted_dataset
        gen = torch.Generator().manual_seed(torch.initial_seed() % (2 ** 63))
        train_idx, val_idx = split_validation(len(ds), self.fraction, gen)
        if val_idx:
            strategy.adapted_dataset = ds.subset(train_idx)
            self._val = ds.subset(val_idx)
        else:
            self._val = ds

    def _val_batches(self, strategy):
        from scenarios.tensors import dataset_batches

        # slices of the held-out samples' tensors where they have them (the loader's seed drawn all the same)
        for batch in dataset_batches(self._val, self.batch_size, tensors=getattr(strategy, "tensor_batches", False),
                                     loader_rng=True, task_labels=True):
            x, y = batch[0].to(strategy.device), batch[1].to(strategy.device)
            t = batch[2].to(strategy.device) if len(batch) > 2 else torch.zeros_like(y)
            yield x, y, t

    @torch.no_grad()
    def validation_loss(self, strategy) -> float:
        model = strategy.model
        was_training = model.training
        model.eval()
        total, n = 0.0, 0
        try:
            for x, y, t in self._val_batches(strategy):
                out = avalanche_forward(model, x, t)
                total += float(F.cross_entropy(out, y, reduction="sum"))
                n += len(y)
        finally:
            model.train(was_training)
        return total / max(n, 1)

    # -- the schedule -----------------------------------------------------------------------------------
    def _set_lr(self, strategy, lrs) -> None:
        for group, lr in zip(strategy.optimizer.param_groups, lrs):
            group["lr"] = lr

    def before_training_exp(self, strategy, **kw):
        groups = strategy.optimizer.param_groups
        if self._initial_lrs is None:
            self._initial_lrs = [g["lr"] for g in groups]
        self._set_lr(strategy, self._initial_lrs + [self._initial_lrs[-1]] * (len(groups) - len(self._initial_lrs)))
        self._best_loss = float("inf")
        self._best_state = copy.deepcopy(strategy.model.state_dict()) if self.restore_best else None
        self._patience = self.lr_patience
        self.history = []

    def after_training_epoch(self, strategy, **kw):
        loss = self.validation_loss(strategy)
        lr = strategy.optimizer.param_groups[0]["lr"]
        improved = loss < self._best_loss
        self.history.append({"val_loss": loss, "lr": lr, "best": improved})
        if improved:
            self._best_loss = loss
            if self.restore_best:
                self._best_state = copy.deepcopy(strategy.model.state_dict())
            self._patience = self.lr_patience
            return
        if self.lr_patience is None:
            return
        self._patience -= 1
        if self._patience <= 0:
            lrs = [g["lr"] / self.lr_factor for g in strategy.optimizer.param_groups]
            if lrs[0] < self.lr_min:
                strategy.stop_training()
                return
            self._patience = self.lr_patience
            self._set_lr(strategy, lrs)

    def after_training_exp(self, strategy, **kw):
        if self.restore_best and self._best_state is not None:
            strategy.model.load_state_dict(self._best_state)
        self._best_state = None
        self._val = None
