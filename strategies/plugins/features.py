"""``TaskFeaturesPlugin``: fits a class-incremental modular network's per-task feature Gaussians
(``modnet.nets.task_inference.TaskFeatureGaussians``, ``task_inference.method=features``).

after_training_exp  task t's class Gaussians over its masked layer's features (eval mode, s = smax) on its
                    training data, and the mean and std of its score there (no sample is kept)
"""
from __future__ import annotations

import torch
from avalanche.core import SupervisedPlugin


class TaskFeaturesPlugin(SupervisedPlugin):
    def __init__(self, batch_size: int = 512):
        super().__init__()
        self.batch_size = batch_size

    @torch.no_grad()
    def after_training_exp(self, strategy, **kw):
        model = strategy.model
        task = strategy.experience.current_experience
        from scenarios.tensors import dataset_batches

        # the loader's seed drawn on the tensor path too: the same numbers after it as through Avalanche's loader
        xs, ys = zip(*dataset_batches(strategy.experience.dataset, self.batch_size,
                                      tensors=getattr(strategy, "tensor_batches", False), loader_rng=True))
        x, y = torch.cat(xs).to(strategy.device), torch.cat(ys).to(strategy.device)
        was_training = model.training
        model.eval()
        try:
            model.task_features.fit(model, x, model.local_labels(task, y), task, self.batch_size)
        finally:
            model.train(was_training)
