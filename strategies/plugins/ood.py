"""``TaskOODPlugin``: trains and calibrates the per-task OOD heads of a class-incremental modular network
(``modnet.nets.task_inference.TaskOOD``; CSI's joint (class, transform) labels inside HAT's masks, as CLOM).

before_forward      the transformed copies the loss needs go into the training forward's condition
                    (``Condition.extra``): they run through task t's masked sub-network in the batch's own
                    pass (one gate and mask computation, larger products), where the network has no batch
                    norm (its rows are then independent); with batch norm, a second forward in before_backward.
                    ``copies=replace``: the classification loss reads the identity rows only
                    (``strategy.classification_rows``)
training_input      replace: the batch's row i becomes T_{i mod K}(x_i), in the template's forward (eager:
                    ``strategy.mbatch`` then holds it; under train.compile inside the step's graph)
after_update        replace: the step's batch and logits cut to those rows, for the training metrics after it
before_backward     + weight * CE(h_t(f_t(T_k x)), y + n_t k) over the batch and its K - 1 transformed copies
                    (``loss_term``; under train.compile computed with the forward, in its graph), through task
                    t's masked sub-network (HAT's training masks at the step's s, so HAT's gradient
                    conditioning protects earlier tasks' units from this loss as from the task's own)
after_training_exp  mean and std of the task's ensembled score on its own training data (two floats per task;
                    no sample is kept)
"""
from __future__ import annotations

import dataclasses

import torch

from modnet.nets.models import ForwardTrace
from scenarios.tensors import dataset_batches
from strategies.template import ForwardLossTerm, train_condition


class TaskOODPlugin(ForwardLossTerm):
    # after_update cuts the step's batch and outputs for the metrics: no gradient read (a fused step may run it)
    fused_step_callbacks = ("before_backward", "after_update")

    def __init__(self, weight: float = 1.0, batch_size: int = 512):
        super().__init__()
        self.weight, self.batch_size = weight, batch_size
        self._share_pass = False  # set per experience: whether the copies can join the training pass

    def before_training_exp(self, strategy, **kw):
        train_condition(strategy)  # the template whose criterion reads classification_rows (clear error if not)
        self._share_pass = not strategy.model.rows_coupled

    # training forwards only (evaluation calls before_eval_forward / after_eval_forward)
    def before_forward(self, strategy, **kw):
        ood = strategy.model.task_ood
        if ood.copies == "replace":  # the rows themselves are replaced by training_input, in the forward
            strategy.classification_rows = ood.identity_rows
        elif self._share_pass:
            x = strategy.mb_x
            train_condition(strategy).extra = ood.copies_of(x[:ood.loss_rows(x.shape[0])])

    def training_input(self, model, x):
        # replace: row i becomes T_{i mod K}(x_i) (the template applies it eager before the forward, or inside
        # the compiled graph under train.compile, where it is one fused kernel instead of ~7 eager ops)
        ood = model.task_ood
        return ood.replace_rows(x) if ood.copies == "replace" else x

    def after_forward(self, strategy, **kw):
        train_condition(strategy).extra = None

    def after_update(self, strategy, **kw):
        # replace: what reads the step after it (Avalanche's training accuracy, after_training_iteration) sees
        # the rows the classification loss read, the untransformed inputs with their logits (views, no copy)
        rows = strategy.classification_rows
        if rows is not None:
            strategy.mbatch = [t[rows] for t in strategy.mbatch]
            strategy.mb_output = strategy.mb_output[rows]

    def loss_term(self, model, x, y, condition):
        task = condition.task
        # the main forward's heads' input, where it is this batch's on this task: its untransformed rows are
        # the transform heads' identity rows (the same masks, gates and slope s)
        trace = condition.trace
        feature = trace.feature if (trace.feature_task == task and trace.feature is not None
                                    and trace.feature.shape[0] == x.shape[0]) else None
        # the copies' heads' input from the same pass (before_forward), else a forward of their own
        copy_features = trace.extra_feature if feature is not None else None
        ood = model.task_ood
        # a forward of its own only where the main one did not compute the heads' inputs (its own trace: HAT's
        # plugin has read this step's capacity regulariser from the main forward). Built only then: in a compiled
        # graph dataclasses.replace guards every field of the condition's class, ~40 guards checked each step
        own_forward = feature is None or (copy_features is None and bool(ood.transforms) and ood.copies != "replace")
        cond = dataclasses.replace(condition, record=False, extra=None, trace=ForwardTrace()) if own_forward else None
        # each label's position in the task's head (in a compiled step, a comparison fused into its graph)
        return self.weight * ood.loss(model, x, model.local_labels(task, y), task, cond, feature=feature,
                                      copy_features=copy_features)

    @torch.no_grad()
    def after_training_exp(self, strategy, **kw):
        strategy.classification_rows = None
        model = strategy.model
        task = train_condition(strategy).task
        # sliced from the experience's tensors where it has them (the loader's seed drawn all the same: the
        # same numbers after it as through Avalanche's per-sample loader)
        batches = dataset_batches(strategy.experience.dataset, self.batch_size,
                                  tensors=getattr(strategy, "tensor_batches", False), loader_rng=True)
        x = torch.cat([batch[0] for batch in batches]).to(strategy.device)
        was_training = model.training
        model.eval()
        try:
            model.task_ood.calibrate(model, x, task, self.batch_size)
        finally:
            model.train(was_training)
