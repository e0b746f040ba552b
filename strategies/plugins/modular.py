"""Plugins of the functional-module part of ``modnet`` (see ``modnet/modules.py``).

``ModulesPlugin``    inherited module keys stay as they are; records which modules each task uses.
``TaskKeysPlugin``   after each experience, adds its samples to the running statistics of the keys of its
                     (task, class) pairs (the samples themselves are not kept).
``SyncRegPlugin``    + weight * L_sync on the units' activation profiles of the batch (seed 000, "Sync in
                     mini-batch"): units that fire alike are pulled together, which sharpens the modules.
"""
from __future__ import annotations

import dataclasses

import torch
from avalanche.core import SupervisedPlugin

from modnet.methods.sync import sync_loss
from strategies.template import train_condition
from strategies.update import UpdateTerm, UpdateTerms


class ModulesPlugin(UpdateTerm):
    """The persistent functional modules of a gated ``HATNet`` (``modnet.nets.modules.ModularGating``):
    before_training_epoch  in the settle epochs (below) the training condition's ``train_gate`` is off: the
                     gate's parameters enter the forward detached, so no gradient is computed for them
    update_terms     the keys a task's gate inherited from earlier tasks' modules get no update (their
                     gradient rows times 0: ``key_frozen``), so a module keeps its key across tasks
                     in the experience's last ``settle_epochs`` epochs the task's gate (query map and keys) gets
                     no update at all (its gradients times 0, or ``frozen``), so the layers and heads end fitted
                     to the routing the gate keeps (a stop requested early, ``train.lr_patience``, waits for
                     ``settle_epochs`` more epochs)
    after_training_exp  which modules the task switches on and keeps units of (``record_usage``), from the
                     same samples its modules were profiled on

    Why settle: the gate's choice is hard (top-k, straight-through gradient), so one update of its query map
    can switch other modules on for many inputs at once, and nothing after the experience's last step adapts
    the layers to that. Measured (Split-Digits task-incremental, seed 0, AVX-512 CPU): the last step of the
    fourth experience moved the query map by 0.28 (norm), which alone took that task's training accuracy
    from 0.984 to 0.841 (0.817 with the whole step); every other parameter's share of that step alone left it
    at 0.984. As HAT anneals its masks to binary within each epoch, the gate's routing is fixed before the end."""

    def __init__(self, settle_epochs: int = 0):
        super().__init__()
        if isinstance(settle_epochs, bool) or not isinstance(settle_epochs, int) or settle_epochs < 0:
            raise ValueError(f"modules.settle_epochs must be a non-negative integer (0 = the gate trains in every "
                             f"epoch), got {settle_epochs!r}")
        self.settle_epochs = settle_epochs
        self._gate_params: list = []

    def before_training_exp(self, strategy, **kw):
        gate = strategy.model.gate.task_gate(strategy.experience.current_experience)
        frozen = getattr(gate, "key_frozen", None) if gate is not None else None
        inherited = frozen is not None and bool(frozen.any())
        masks = [(gate.keys, 1 - frozen)] if inherited else []
        self._gate_params = [] if gate is None else list(gate.parameters())
        # the settle epochs' "no step for the gate": where the optimiser has no momentum and no weight decay (HAT's
        # plain SGD), a zero gradient takes no step, exactly: the gate's gradients are multiplied by a 0-d factor,
        # 1 then 0, so the compiled step keeps one graph for the whole experience (the factor is a tensor, not a
        # constant of it); else the gate's parameters are frozen (no gradient: no decay, no momentum step), a
        # second graph for the settle epochs
        self._gate_factor = None
        groups = getattr(getattr(strategy, "optimizer", None), "param_groups", ())
        if self.settle_epochs and self._gate_params and not any(g.get("momentum", 0) or g.get("weight_decay", 0)
                                                                for g in groups):
            self._gate_factor = torch.ones((), device=self._gate_params[0].device)
            masks += [(p, self._gate_factor) for p in self._gate_params]
        self._terms = UpdateTerms(grad_masks=masks)
        self._settle_terms = self._terms if self._gate_factor is not None else \
            dataclasses.replace(self._terms, frozen=self._gate_params)
        self._settle, self._extra_left = False, None

    def before_training_epoch(self, strategy, **kw):
        # The settle epochs are the experience's last: its last settle_epochs of train.epochs, or, when a plugin
        # stops training early (train.lr_patience's schedule asks Avalanche to stop before the next epoch), the
        # settle_epochs after that request, which waits for them
        last = self.settle_epochs and strategy.clock.train_exp_epochs >= strategy.train_epochs - self.settle_epochs
        if self.settle_epochs and not last and self._extra_left != 0 and getattr(strategy, "_stop_training", False):
            strategy._stop_training = False  # Avalanche 0.6's flag, read right after before_training_epoch
            if self._extra_left is None:
                self._extra_left = self.settle_epochs
        if self._extra_left == 0:
            strategy.stop_training()  # the settle epochs are done: the stop that waited for them
        elif self._extra_left is not None:
            self._extra_left -= 1
        self._settle = bool(last) or self._extra_left is not None
        if self._gate_factor is not None:
            self._gate_factor.fill_(0.0 if self._settle else 1.0)
        # eager: the gate's parameters enter the settle epochs' forwards detached (no gradient computed for
        # them). A compiled pass keeps one graph per task (a flag in its guards would compile a second): there
        # the gradients are computed and zeroed (or dropped, frozen) by the update
        condition = train_condition(strategy)
        condition.train_gate = condition.compiled is not None or not self._settle

    def update_terms(self, strategy) -> UpdateTerms:
        # the inherited keys' gradient rows times 0 (the template applies it before the optimiser's step); in the
        # settle epochs the gate's parameters take no step (their gradients times 0, or frozen)
        return self._settle_terms if self._settle else self._terms

    def after_training_exp(self, strategy, **kw):
        from scenarios.tensors import dataset_head

        train_condition(strategy).train_gate = True

        model = strategy.model
        ds = strategy.experience.dataset
        n = min(len(ds), model.gate.profile_samples)
        x = dataset_head(ds, n, tensors=getattr(strategy, "tensor_batches", False)).to(strategy.device)
        model.gate.record_usage(model, strategy.experience.current_experience, x)


class TaskKeysPlugin(SupervisedPlugin):
    def __init__(self, batch_size: int = 512):
        super().__init__()
        self.batch_size = batch_size

    def after_training_exp(self, strategy, **kw):
        from scenarios.tensors import dataset_batches

        model = strategy.model
        task = strategy.experience.current_experience
        # the loader's seed drawn on the tensor path too: the same numbers after it as through Avalanche's loader
        batches = dataset_batches(strategy.experience.dataset, self.batch_size,
                                  tensors=getattr(strategy, "tensor_batches", False), loader_rng=True)
        for x, y in batches:
            model.update_task_keys(x.to(strategy.device), task, y.to(strategy.device))


class SyncRegPlugin(SupervisedPlugin):
    """``every``: lazy regularisation (Karras et al., StyleGAN2, 2020, sec. 3.1): L_sync is evaluated on
    every ``every``-th step only, with its weight multiplied by ``every``, so its expected contribution to
    the updates is unchanged while its cost is divided by ``every``.
    ``rows``: how many units per layer have their L_sync term evaluated per evaluation (None = all, as in the
    paper). The rows are a strided slice that moves by one each evaluation, so every unit's term is
    evaluated once every ceil(N / rows) evaluations; the pairwise product shrinks by the same factor.
    The regulariser is the mean over layers of their L_sync; layers of equal width are regularised in one
    batched call."""

    def __init__(self, weight: float = 0.01, eps: float = 0.3, rows: int | None = None, every: int = 1):
        super().__init__()
        if rows is not None and rows < 1:
            raise ValueError(f"modules.sync_rows must be >= 1 or null (all units), got {rows}")
        if every < 1:
            raise ValueError(f"modules.sync_every must be >= 1 (1 = every step), got {every}")
        self.weight, self.eps, self.rows, self.every = weight, eps, rows, every
        self._step = 0

    def before_training_exp(self, strategy, **kw):
        self._step = 0

    def before_forward(self, strategy, **kw):
        # the training forward records the units' activations on the steps whose L_sync is evaluated only:
        # recording costs a pass over every conv map (its spatial means), wasted on the other every - 1 steps
        train_condition(strategy).record = self._step % self.every == 0

    def before_backward(self, strategy, **kw):
        acts = train_condition(strategy).trace.activations
        step, self._step = self._step, self._step + 1
        if not acts or step % self.every:
            return
        evaluation = step // self.every  # the row slice moves by one per evaluation
        groups: dict[tuple, list] = {}  # layers of equal shape: one batched call (its ~30 small ops) per shape
        for a in acts:
            a = a.flatten(1)  # batch x units (a view)
            groups.setdefault(tuple(a.shape), []).append(a)
        total = 0.0
        for (_, n), group in groups.items():  # batch x units: the units are the columns, no transposed copy
            stride = 1 if self.rows is None else max(1, -(-n // self.rows))
            feats = group[0] if len(group) == 1 else torch.stack(group)
            total = total + len(group) * sync_loss(feats, self.eps, stride, evaluation % stride, items="columns")
        # the mean over layers of their L_sync (a stacked call is the mean over its layers)
        strategy.loss = strategy.loss + (self.weight * self.every / len(acts)) * total

    def after_training_exp(self, strategy, **kw):
        train_condition(strategy).record = False
