"""Plugins of the functional-module part of ``modnet`` (see ``modnet/modules.py``).

``TaskKeysPlugin``   after each experience, adds its samples to the running statistics of the keys of its
                     (task, class) pairs (the samples themselves are not kept).
``SyncRegPlugin``    + weight * L_sync on the units' activation profiles of the batch (seed 000, "Sync in
                     mini-batch"): units that fire alike are pulled together, which sharpens the modules.
"""
from __future__ import annotations

import torch
from avalanche.core import SupervisedPlugin
from torch.utils.data import DataLoader

from modnet.sync import sync_loss


class TaskKeysPlugin(SupervisedPlugin):
    def __init__(self, batch_size: int = 512):
        super().__init__()
        self.batch_size = batch_size

    def after_training_exp(self, strategy, **kw):
        model = strategy.model
        task = strategy.experience.current_experience
        loader = DataLoader(strategy.experience.dataset, batch_size=self.batch_size, shuffle=False)
        for batch in loader:
            x, y = batch[0].to(strategy.device), batch[1].to(strategy.device)
            model.task_keys.update(x, model.slot_of(task, y))


class SyncRegPlugin(SupervisedPlugin):
    def __init__(self, weight: float = 0.01, eps: float = 0.3):
        super().__init__()
        self.weight, self.eps = weight, eps

    def before_training_exp(self, strategy, **kw):
        strategy.model.record_activations = True

    def before_backward(self, strategy, **kw):
        acts = strategy.model.last_activations
        if acts:
            reg = torch.stack([sync_loss(a.flatten(1).T, self.eps) for a in acts]).mean()
            strategy.loss = strategy.loss + self.weight * reg

    def after_training_exp(self, strategy, **kw):
        strategy.model.record_activations = False
        strategy.model.last_activations = []
