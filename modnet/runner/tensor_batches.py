"""Batches sliced from tensors: Avalanche's data loaders without per-sample ``__getitem__`` and collate.

Avalanche's loaders fetch every sample through its dataset tree (subset and concatenation indices, transform
groups, data attributes) and collate them: on a small MLP that costs as much as the training step itself
(ContinualAI/avalanche#1074, #839). When an experience's dataset is backed by tensors (a ``TensorDataset`` at
every leaf, no transform on the input, ``targets`` and ``targets_task_labels`` attributes: digits, npz,
mnist1d, torchvision arrays held in memory, replay buffers made from them), ``scenarios.tensors.resolve_tensors``
turns it, once per experience, into index arithmetic: the leaf tensor, the row of every sample, its label and
task label.
A batch is then ``x[rows[perm[i:j]]], y[perm[i:j]], t[perm[i:j]]`` on the device the data live on; no host
sync in the step.

``TensorBatchLoader`` replaces any of Avalanche's ``MultiDatasetDataLoader`` (the ``SingleDatasetDataLoader``
of evaluation, the ``TaskBalancedDataLoader`` of training, Replay's ``ReplayDataLoader``, A-GEM's never-ending
``GroupBalancedInfiniteDataLoader`` over its memories) and a plain torch
``DataLoader`` over a random or sequential sampler, with the same semantics, read from the loader it
replaces: its datasets (groups), per-group batch sizes, the group whose end ends the epoch, oversampling of
the others (Replay: every batch holds the current batch plus ``batch_size_mem`` buffer samples, the buffer
re-shuffled whenever it runs out), shuffle and drop_last. It draws its permutations exactly as torch's
``RandomSampler`` does (a seed from the global torch generator, ``randperm`` on a CPU generator seeded with
it) at the same points of the epoch, after the same one draw a DataLoader iterator makes, so a run gives the
same batches, hence the same numbers, as with Avalanche's loaders for a given seed (tests/test_tensor_batches).

``use_tensor_batches(strategy)`` switches a built strategy to a subclass of its class (as
``modnet.runner.distributed.make_distributed`` does) whose ``make_train_dataloader``,
``make_eval_dataloader`` and ``_before_training_exp`` (after the plugins: Replay swaps in its loader there)
replace the loader when every dataset it reads is tensor-backed, and keep Avalanche's otherwise; its
``_after_training_exp`` does the same to the memory loader A-GEM's plugin has just rebuilt. Plugins
that read ``strategy.experience.dataset`` or ``strategy.adapted_dataset`` (GEM/AGEM memories, EWC's Fisher,
the replay buffer's storage policy) see the Avalanche datasets unchanged; those that pass over an experience
(EWC's Fisher, the task keys, the transform heads' calibration, the module profiles) read it through
``scenarios.tensors.dataset_batches``, in slices of its tensors.
"""
from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
import torch

from scenarios.tensors import TensorView, draw_loader_seed, resolve_tensors

NEVER_ENDING = 10**10  # the length Avalanche gives a never-ending loader


class _Group:
    """One dataset of a loader: its batches, in RandomSampler's order (shuffle) or in order."""

    def __init__(self, view: TensorView, batch_size: int, shuffle: bool, drop_last: bool, order=None):
        self.view, self.batch_size, self.shuffle, self.drop_last = view, batch_size, shuffle, drop_last
        self.order = order  # callable() -> index tensor of an epoch (a data-parallel shard), else None
        n = order.length if order is not None else len(view)
        self.n_batches = n // batch_size if drop_last else -(-n // batch_size)
        # the task labels, on the host (read once, here): which tasks a batch holds is then known without
        # reading the batch (a group of one task label, as most are, needs no copy)
        t = view.t
        lo, hi = (int(t.min()), int(t.max())) if len(t) else (None, None)
        self.task_labels = frozenset() if lo is None else frozenset({lo}) if lo == hi else t.cpu().numpy()

    def tasks(self, host_idx) -> frozenset[int]:
        """The task labels of the batch at host indices ``host_idx`` (a CPU index tensor or a slice)."""
        labels = self.task_labels
        if isinstance(labels, frozenset):
            return labels
        return frozenset(np.unique(labels[host_idx if isinstance(host_idx, slice) else host_idx.numpy()]).tolist())

    def all_tasks(self) -> frozenset[int]:
        """Every task label of the group."""
        return self.tasks(slice(None))

    def batches(self):
        """(index tensor on the data's device, the same indices on the host) of one pass (the permutation is
        drawn at the first batch, as RandomSampler does)."""
        device = self.view.x.device
        if self.order is not None:
            perm = self.order()
        elif self.shuffle:
            g = torch.Generator()
            g.manual_seed(draw_loader_seed())
            perm = torch.randperm(len(self.view), generator=g)
        else:  # in order: slices (views of the tensors when no row map)
            for k in range(self.n_batches):
                cut = slice(k * self.batch_size, (k + 1) * self.batch_size)
                yield cut, cut
            return
        on_device = perm.to(device)
        b = self.batch_size
        for k in range(self.n_batches):
            yield on_device[k * b:(k + 1) * b], perm[k * b:(k + 1) * b]


class TensorBatchLoader:
    """Batches ``[x, y, task_label]`` sliced from tensor views; the semantics of Avalanche's
    ``MultiDatasetDataLoader`` (see the module docstring). One group with ``shuffle``: torch's
    ``DataLoader(shuffle=True)``; groups ``[data, memory]`` with ``termination=0, oversample=True``: Replay's."""

    def __init__(self, views: Sequence[TensorView], batch_sizes: Sequence[int], *, termination: int = -1,
                 oversample: bool = False, shuffle: bool = True, drop_last: bool = False, orders=None,
                 never_ending: bool = False):
        orders = orders or [None] * len(views)
        self.groups = [_Group(v, b, shuffle, drop_last, o) for v, b, o in zip(views, batch_sizes, orders)]
        lengths = [g.n_batches for g in self.groups]
        if termination < 0:
            termination = int(np.argmax(lengths))
        self.termination, self.oversample, self.never_ending = termination, oversample, never_ending
        # never ending (A-GEM's memory loader): every group cycles, none ends the stream; Avalanche's length
        self.n_iterations = NEVER_ENDING if never_ending else lengths[termination]
        # the task label every batch carries when all samples share one (read once, here): lets a multi-head
        # model take its single-task path without reading the batch's labels back (``single_task_forward``)
        labels = set().union(*(g.all_tasks() for g in self.groups))
        self.single_task = labels.pop() if len(labels) == 1 else None
        # the task labels of the batch last yielded, read from the groups' host copies: a multi-head model's
        # ``forward_tasks`` takes them (replay's and cumulative's batches mix tasks)
        self.batch_tasks: list[int] | None = None

    def __len__(self) -> int:
        return self.n_iterations

    def __iter__(self):
        draw_loader_seed()  # the base seed a DataLoader iterator draws: the global generator advances as before
        groups = self.groups
        if self.never_ending and not any(g.n_batches for g in groups):
            raise RuntimeError("a never-ending loader needs a group with at least one sample (Avalanche's "
                               "MultiDatasetSampler raises too)")
        if len(groups) == 1:
            g = groups[0]
            if g.n_batches == 0:
                return
            view = g.view
            while True:  # one pass, or pass after pass when never ending (a new permutation each)
                for idx, host_idx in g.batches():
                    self.batch_tasks = sorted(g.tasks(host_idx))
                    yield list(view.take(idx))
                if not self.never_ending:
                    return
        iters: list = [None] * len(groups)
        alive = [g.n_batches > 0 for g in groups]
        # never ending: the groups in their order, each cycled (Avalanche's MultiDatasetSampler); else the
        # group that ends the epoch first
        order = list(range(len(groups))) if self.never_ending else \
            [self.termination] + [k for k in range(len(groups)) if k != self.termination]
        if not self.never_ending and not alive[self.termination]:
            return
        while True:
            taken: list = [None] * len(groups)
            tasks: set[int] = set()
            for k in order:
                g = groups[k]
                if not alive[k]:
                    continue
                if iters[k] is None:
                    iters[k] = g.batches()
                idx = next(iters[k], None)
                if idx is None:  # a group's pass is over: the epoch ends, the group drops out, or it cycles
                    if not self.never_ending and (k == self.termination or not self.oversample):
                        if k == self.termination:
                            return
                        alive[k] = False
                        continue
                    iters[k] = g.batches()
                    idx = next(iters[k])
                taken[k] = g.view.take(idx[0])
                tasks |= g.tasks(idx[1])
            parts = [p for p in taken if p is not None]
            self.batch_tasks = sorted(tasks)
            yield [torch.cat([p[j] for p in parts]) for j in range(3)]


class _ShardOrder:
    """A data-parallel rank's share of an epoch, as torch's ``DistributedSampler`` gives it: one permutation
    of all samples (seed + epoch), padded to a multiple of the ranks, every ``world``-th index from ``rank``."""

    def __init__(self, n: int, rank: int, world: int, seed: int, shuffle: bool, drop_last: bool):
        self.n, self.rank, self.world, self.seed, self.shuffle, self.drop_last = n, rank, world, seed, shuffle, \
            drop_last
        self.epoch = 0
        self.length = (n - world) // world + 1 if drop_last and n % world else -(-n // world)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __call__(self) -> torch.Tensor:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            idx = torch.randperm(self.n, generator=g)
        else:
            idx = torch.arange(self.n)
        total = self.length * self.world
        if total > self.n:
            idx = torch.cat([idx, idx.repeat(-(-(total - self.n) // self.n))[: total - self.n]])
        else:
            idx = idx[:total]
        return idx[self.rank:total:self.world]


def sharded_loader(dataset, batch_size: int, rank: int, world: int, seed: int, shuffle: bool = True,
                   drop_last: bool = False):
    """A rank's training loader over a tensor-backed ``dataset`` (``DistributedSampler`` semantics, by
    slicing), with its order (``set_epoch``), or (None, None) when the dataset is not tensor-backed."""
    view = resolve_tensors(dataset)
    if view is None:
        return None, None
    order = _ShardOrder(len(view), rank, world, seed, shuffle, drop_last)
    return TensorBatchLoader([view], [batch_size], shuffle=shuffle, drop_last=drop_last, orders=[order]), order


def convert_loader(loader):
    """A ``TensorBatchLoader`` with the semantics of Avalanche's or torch's ``loader``, or None when it reads
    a dataset that is not tensor-backed (or is a kind of loader not handled here)."""
    from avalanche.benchmarks.utils.data_loader import MultiDatasetDataLoader
    from torch.utils.data import DataLoader, RandomSampler, SequentialSampler

    if isinstance(loader, MultiDatasetDataLoader):
        kw = loader.loader_kwargs
        if loader.distributed_sampling or kw.get("num_workers", 0) \
                or "sampler" in kw or "batch_sampler" in kw:
            return None
        views = [resolve_tensors(d) for d in loader.datasets]
        if any(v is None for v in views):
            return None
        return TensorBatchLoader(views, loader.batch_sizes, termination=loader.termination_dataset,
                                 oversample=loader.oversample_small_datasets, shuffle=bool(kw.get("shuffle", False)),
                                 drop_last=bool(kw.get("drop_last", False)), never_ending=loader.never_ending)
    if isinstance(loader, DataLoader) and loader.batch_size is not None and loader.num_workers == 0:
        if type(loader.sampler) is RandomSampler and not loader.sampler.replacement \
                and loader.sampler.generator is None and loader.sampler._num_samples is None:
            shuffle = True
        elif type(loader.sampler) is SequentialSampler:
            shuffle = False
        else:
            return None
        view = resolve_tensors(loader.dataset)
        if view is None:
            return None
        return TensorBatchLoader([view], [loader.batch_size], shuffle=shuffle, drop_last=loader.drop_last)
    return None


def pin_memory_for(device, dataset, pin_memory: bool | None = None) -> bool:
    """A data loader's ``pin_memory``: as given, else pinned on CUDA (Avalanche's default) unless the data
    already live on the GPU (``train.data_on_device``), which cannot be pinned ("cannot pin
    'torch.cuda.FloatTensor'")."""
    if pin_memory is not None:
        return bool(pin_memory)
    if device is None or torch.device(device).type != "cuda":
        return False
    if dataset is None or len(dataset) == 0:
        return True
    first = dataset[0][0]
    return not (isinstance(first, torch.Tensor) and first.is_cuda)


def batch_forward(model, x: torch.Tensor, task_labels: torch.Tensor | None, single: int | None,
                  tasks: Sequence[int] | None) -> torch.Tensor:
    """Avalanche's training forward (``SupervisedProblem.forward``: ``model(x)`` without ``task_labels``, else
    ``avalanche_forward``), given the task labels the loader read on the host: a multi-task network's one head
    when every label is ``single``, its ``forward_tasks`` when the batch's labels are ``tasks`` (no
    ``torch.unique`` of the labels on the device; ``modnet.nets.models.forward_known_tasks``)."""
    from avalanche.models.utils import is_multi_task_module

    from modnet.nets.models import forward_known_tasks

    if task_labels is None:
        return model(x)
    if single is not None and is_multi_task_module(model):
        return single_task_forward(model, x, single)
    return forward_known_tasks(model, x, task_labels, tasks)


def compiled_batch_forward(backend: str):
    """``batch_forward`` through ``torch.compile(backend=backend, dynamic=True)``: ``train.compile`` for the
    baselines' training forwards (their losses and their plugins' penalties stay eager). A graph per head set
    (the task, or the tasks a mixed batch holds), dynamic in the batch size; Avalanche growing a head or a
    class-incremental classifier changes the network's modules, and dynamo compiles the new one."""
    from modnet.nets.models import compile_once

    return compile_once(batch_forward, backend)


def single_task_forward(model, x: torch.Tensor, task: int) -> torch.Tensor:
    """What Avalanche's ``MultiTaskModule.forward(x, task_labels)`` returns when every label is ``task``,
    without its per-step ``torch.unique`` (a host read), boolean masks and scatter: the task's head on the
    whole batch (``forward`` with an int label, Avalanche's own fast path), padded with zero logits to
    ``max_class_label`` columns and in the default float dtype, as the split-by-task path writes it."""
    out = model(x, int(task))
    width = int(getattr(getattr(model, "module", model), "max_class_label", out.shape[1]))  # DDP: its module
    if out.shape[1] < width:
        out = torch.nn.functional.pad(out, (0, width - out.shape[1]))
    return out.to(torch.get_default_dtype())


@functools.cache
def tensor_batches_class(cls: type) -> type:
    """A subclass of an Avalanche template's class whose data loaders slice tensors where they can."""
    from avalanche.training.templates.problem_type.supervised_problem import SupervisedProblem

    # only a strategy that keeps Avalanche's forward (Naive, EWC, LwF, GEM, ...; not one with its own)
    avalanche_forward = getattr(cls, "forward", None) is SupervisedProblem.forward

    class TensorBatches(cls):
        tensor_batches = True

        if avalanche_forward:
            # train.compile's backend for the training forwards (set by the runner; None: eager)
            compiled_forward: str | None = None

            def forward(self):
                # the task labels the loader read on the host: one for the whole batch, or the several of a
                # batch that mixes tasks (replay, cumulative); Avalanche's forward passes task labels only
                # where the benchmark has them
                single = getattr(self.dataloader, "single_task", None)
                tasks = getattr(self.dataloader, "batch_tasks", None)
                labels = self.mb_task_id if hasattr(self.experience, "task_labels") else None
                fn = batch_forward
                if self.is_training and self.compiled_forward is not None:
                    fn = compiled_batch_forward(self.compiled_forward)
                return fn(self.model, self.mb_x, labels, single, tasks)

        def _tensor_loader(self):
            if self.tensor_batches:
                converted = convert_loader(self.dataloader)
                if converted is not None:
                    self.dataloader = converted

        def make_train_dataloader(self, *args, **kwargs):
            kwargs["pin_memory"] = pin_memory_for(self.device, self.adapted_dataset, kwargs.get("pin_memory"))
            super().make_train_dataloader(*args, **kwargs)
            self._tensor_loader()

        def make_eval_dataloader(self, *args, **kwargs):
            kwargs["pin_memory"] = pin_memory_for(self.device, self.adapted_dataset, kwargs.get("pin_memory"))
            super().make_eval_dataloader(*args, **kwargs)
            self._tensor_loader()

        def _before_training_exp(self, **kwargs):
            super()._before_training_exp(**kwargs)
            # plugins run inside: Replay has replaced the loader by its ReplayDataLoader
            if not isinstance(self.dataloader, TensorBatchLoader):
                self._tensor_loader()

        def _after_training_exp(self, **kwargs):
            super()._after_training_exp(**kwargs)
            # plugins run inside: A-GEM has rebuilt its memory loader (never ending, one group per memory),
            # whose iterator has drawn nothing yet (a generator), so the swap leaves the random stream as it was
            if self.tensor_batches:
                from avalanche.training.plugins import AGEMPlugin

                for plugin in self.plugins:
                    if isinstance(plugin, AGEMPlugin) and not isinstance(plugin.buffer_dataloader, TensorBatchLoader):
                        converted = convert_loader(plugin.buffer_dataloader)
                        if converted is not None:
                            plugin.buffer_dataloader, plugin.buffer_dliter = converted, iter(converted)

    TensorBatches.__name__ = TensorBatches.__qualname__ = f"TensorBatches{cls.__name__}"
    return TensorBatches


def use_tensor_batches(strategy, enabled: bool = True):
    """Switch a built strategy to ``tensor_batches_class`` of its class; returns it."""
    strategy.__class__ = tensor_batches_class(type(strategy))
    strategy.tensor_batches = enabled
    return strategy
