"""An Avalanche experience's dataset as tensors: the index arithmetic behind every tensor-backed pass over it.

When an experience's dataset is backed by tensors (a ``TensorDataset`` at every leaf, no transform on the input,
``targets`` and ``targets_task_labels`` attributes: digits, npz, mnist1d, torchvision arrays held in memory,
replay buffers made from them), ``resolve_tensors`` turns it, once per experience, into the leaf tensor, the row
of every sample, its label and task label (``TensorView``), checked against the dataset's own ``__getitem__``.
``dataset_batches`` and ``dataset_head`` read an experience outside training (statistics, calibration, module
profiles, evaluation) as slices of those tensors, and fall back to Avalanche's per-sample loader otherwise.
The training loaders built on it are the runner's (``modnet.runner.tensor_batches``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

_CHECKS = 8  # samples of each resolved dataset compared with its __getitem__ (a mismatch: Avalanche's loader)


@dataclass
class TensorView:
    """A dataset as tensors: sample i is ``(x[rows[i]], y[i], t[i])`` (``rows`` None: ``x[i]``)."""

    x: torch.Tensor
    rows: torch.Tensor | None
    y: torch.Tensor
    t: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def take(self, idx: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if isinstance(idx, slice):
            rows = idx if self.rows is None else self.rows[idx]
            return self.x[rows], self.y[idx], self.t[idx]
        # index_select: on CPU about 6x faster than advanced indexing x[idx] for a 128 x 784 batch
        rows = idx if self.rows is None else self.rows.index_select(0, idx)
        return self.x.index_select(0, rows), self.y.index_select(0, idx), self.t.index_select(0, idx)


class _NotTensors(Exception):
    pass


def _identity_on_input(groups, group_name) -> bool:
    if groups is None:
        return True
    from avalanche.benchmarks.utils.transforms import TupleTransform

    t = groups.transform_groups[group_name]  # as the dataset's __getitem__ reads it
    if t is None:
        return True
    return isinstance(t, TupleTransform) and (len(t.transforms) == 0 or t.transforms[0] is None)


def _as_index(indices) -> torch.Tensor:
    from avalanche.benchmarks.utils.flat_data import LazyRange

    if isinstance(indices, LazyRange):
        return torch.arange(indices._start, indices._end) + indices._offset
    if isinstance(indices, torch.Tensor):
        return indices.long()
    return torch.as_tensor(np.asarray(list(indices) if not isinstance(indices, (list, np.ndarray)) else indices,
                                      dtype=np.int64))


def _locate(node, idx: torch.Tensor, group_name) -> list:
    """Where the samples ``idx`` of ``node`` (a FlatData tree) live: a list of (leaf, positions in ``idx``,
    indices in the leaf); raises _NotTensors on an input transform or an unknown node."""
    from avalanche.benchmarks.utils.flat_data import ConstantSequence, FlatData

    if not isinstance(node, FlatData) or isinstance(node, ConstantSequence):
        return [(node, torch.arange(len(idx)), idx)]
    for attr in ("_frozen_transform_groups", "_transform_groups"):
        if not _identity_on_input(getattr(node, attr, None), group_name):
            raise _NotTensors(f"an input transform ({attr})")
    if node._indices is not None:
        idx = _as_index(node._indices)[idx]
    children = node._datasets
    if len(children) == 1:
        return _locate(children[0], idx, group_name)
    cum = torch.as_tensor(node._cumulative_sizes, dtype=torch.long)
    which = torch.searchsorted(cum, idx, right=True)
    starts = torch.cat([torch.zeros(1, dtype=torch.long), cum[:-1]])
    out = []
    for k in torch.unique(which).tolist():
        sel = (which == k).nonzero().squeeze(1)
        out += [(leaf, sel[s], li) for leaf, s, li in _locate(children[k], idx[sel] - starts[k], group_name)]
    return out


def _values(node) -> torch.Tensor:
    """The values of a data attribute's FlatData tree (lists, tensors, arrays, ConstantSequence leaves)."""
    from avalanche.benchmarks.utils.data_attribute import DataAttribute
    from avalanche.benchmarks.utils.flat_data import ConstantSequence, FlatData

    if isinstance(node, DataAttribute):  # a nested attribute: its FlatData (np.asarray would iterate per sample)
        return _values(node.data)
    if isinstance(node, ConstantSequence):
        return torch.full((len(node),), int(node._constant_value), dtype=torch.long)
    if isinstance(node, FlatData):
        parts = [_values(c) for c in node._datasets]
        v = parts[0] if len(parts) == 1 else torch.cat(parts)
        return v if node._indices is None else v[_as_index(node._indices)]
    if isinstance(node, torch.Tensor):
        return node.reshape(-1).long()
    return torch.as_tensor(np.asarray(node, dtype=np.int64).reshape(-1))


def _resolve(dataset) -> TensorView:
    from torch.utils.data import TensorDataset

    flat = getattr(dataset, "_flat_data", None)
    attrs = getattr(dataset, "_data_attributes", None)
    if flat is None or attrs is None or "targets" not in attrs or "targets_task_labels" not in attrs:
        raise _NotTensors("not an Avalanche classification dataset with task labels")
    in_getitem = [name for name, a in attrs.items() if a.use_in_getitem]
    if in_getitem != ["targets_task_labels"]:
        raise _NotTensors(f"attributes appended to samples: {in_getitem}")
    n = len(dataset)
    if n == 0:
        raise _NotTensors("empty")
    group = flat._transform_groups.current_group if getattr(flat, "_transform_groups", None) else "train"
    parts = _locate(flat, torch.arange(n), group)
    leaves = {id(p[0]): p[0] for p in parts}
    for leaf in leaves.values():
        if not isinstance(leaf, TensorDataset) or len(leaf.tensors) != 2:
            raise _NotTensors(f"a {type(leaf).__name__} leaf")
    y = _values(attrs["targets"].data)
    t = _values(attrs["targets_task_labels"].data)
    if len(leaves) == 1:
        leaf = next(iter(leaves.values()))
        x = leaf.tensors[0]
        rows = torch.empty(n, dtype=torch.long)
        for _, pos, lpos in parts:
            rows[pos] = lpos
        if torch.equal(rows, torch.arange(n)) and len(x) == n:
            rows = None
        else:
            rows = rows.to(x.device)
    else:  # samples from several tensors (e.g. a replay buffer over permuted experiences): one copy
        x0 = parts[0][0].tensors[0]
        x = torch.empty((n, *x0.shape[1:]), dtype=x0.dtype, device=x0.device)
        for leaf, pos, lpos in parts:
            x[pos.to(x.device)] = leaf.tensors[0][lpos.to(x.device)]
        rows = None
    view = TensorView(x, rows, y.to(x.device), t.to(x.device))
    _check(dataset, view)
    return view


def _check(dataset, view: TensorView) -> None:
    n = len(view)
    for i in sorted({0, n - 1, *np.linspace(0, n - 1, _CHECKS).astype(int).tolist()}):
        elem = dataset[int(i)]
        if len(elem) != 3:
            raise _NotTensors(f"samples of {len(elem)} fields")
        x, y, t = view.take(torch.tensor([i], device=view.x.device))
        ex = elem[0]
        if not (isinstance(ex, torch.Tensor) and ex.dtype == x.dtype and torch.equal(ex.to(x.device), x[0])
                and int(elem[1]) == int(y) and int(elem[2]) == int(t)):
            raise _NotTensors(f"sample {i} differs from the dataset's own")


def resolve_tensors(dataset) -> TensorView | None:
    """``dataset`` (an Avalanche dataset) as tensors, or None when it is not tensor-backed."""
    try:
        return _resolve(dataset)
    except _NotTensors:
        return None


def dataset_batches(dataset, batch_size: int, tensors: bool = True, loader_rng: bool = False,
                    task_labels: bool = False):
    """(x, y) of ``dataset`` in order, ``batch_size`` at a time, for one pass over an experience outside
    training (statistics, evaluation): slices of its tensors when it is tensor-backed and ``tensors``, else
    Avalanche's per-sample loader (the same batches in the same order; it fetches and collates every sample,
    a pass as long as a training epoch's on a small network, and draws a seed from the global generator).
    ``loader_rng``: the tensor path draws that seed too, so that what follows (the next epoch's shuffle, a
    plugin's random draws) gets the same numbers on either path. ``task_labels``: (x, y, t)."""
    fields = 3 if task_labels else 2
    view = resolve_tensors(dataset) if tensors else None
    if view is not None:
        if loader_rng:
            draw_loader_seed()
        return (view.take(slice(i, i + batch_size))[:fields] for i in range(0, len(view), batch_size))
    from torch.utils.data import DataLoader

    return (tuple(batch[:fields]) for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False))


def dataset_head(dataset, n: int, tensors: bool = True) -> torch.Tensor:
    """The inputs of ``dataset``'s first ``n`` samples, stacked: a slice of its tensors when it is tensor-backed
    and ``tensors``, else one ``dataset[i]`` per sample (neither draws from a random generator)."""
    view = resolve_tensors(dataset) if tensors else None
    if view is not None:
        return view.take(slice(0, n))[0]
    return torch.stack([dataset[i][0] for i in range(n)])


def draw_loader_seed() -> int:
    """A seed from the global generator, as a DataLoader iterator and RandomSampler draw one."""
    seed = torch.empty((), dtype=torch.int64).random_()
    seed.host_side = True  # a host tensor on every device: reading it waits for no device (tests/test_host_reads)
    return int(seed.item())
