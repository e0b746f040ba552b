"""Dark Experience Replay, DER and DER++ (Buzzega, Boschini, Porrello, Abati & Calderara, NeurIPS 2020).

A buffer M of at most ``mem_size`` samples of the stream, filled by reservoir sampling (every sample seen so
far has the same chance mem_size / seen to be in it), keeps each sample's input x, label y, task label t and
the network's logits z = h_θ(x) at the step it was stored. Each training step adds

    DER     L = ℓ(y, f(x)) + α ||z' - h_θ(x')||²            (x', z') ~ M
    DER++   L = ℓ(y, f(x)) + α ||z' - h_θ(x')||² + β ℓ(y'', f(x''))     (x'', y'') ~ M, a second batch

(Algorithm 1 of the paper; ||·||² is the mean squared error of ``F.mse_loss``, as the reference code
Mammoth). Buffer batches are as large as the training batch. The stored logits are those of the forward of
the step, before its update (Mammoth's ``buffer.add_data(..., logits=outputs.data)``), not recomputed after
the experience as Avalanche 0.6.0's ``DER`` does (which also calls the model without task labels, so it
cannot run task-incremental). The buffer lives on the strategy's device as plain tensors, with a host copy of
its task labels: a buffer batch's slots are drawn on the host, so a multi-head network learns which heads the
batch needs without reading the labels back from the device (``MultiHeadNet.forward_tasks``; its ``forward``
would read them with ``torch.unique``, a host sync every step on a GPU).
"""
from __future__ import annotations

import numpy as np
import torch
from avalanche.core import SupervisedPlugin
from torch import Tensor
from torch.nn import functional as F

from modnet.nets.models import forward_known_tasks


class ReservoirBuffer:
    """At most ``size`` samples (x, y, t, logits), reservoir sampling over every sample offered (Vitter's
    algorithm R): the n-th sample offered goes in while the buffer is not full, and afterwards replaces a
    uniformly drawn slot j < size when j = randint(0, n) falls inside the buffer."""

    def __init__(self, size: int):
        if size < 0:
            raise ValueError(f"buffer size must be >= 0, got {size}")
        self.size = int(size)
        self.seen = 0
        self.x: Tensor | None = None
        self.y: Tensor | None = None
        self.t: Tensor | None = None
        self.logits: Tensor | None = None
        # each slot's task label on the host (-1: stored without one known there); bookkeeping beside ``t``,
        # not counted in the bytes kept (it repeats ``t``)
        self.t_host = np.full(self.size, -1, dtype=np.int64)
        self.n = 0  # samples held

    def _allocate(self, x: Tensor, y: Tensor, t: Tensor, logits: Tensor) -> None:
        self.x = x.new_empty((self.size, *x.shape[1:]))
        self.y = y.new_empty((self.size,))
        self.t = t.new_empty((self.size,))
        self.logits = logits.new_zeros((self.size, logits.shape[1]))

    @torch.no_grad()
    def add(self, x: Tensor, y: Tensor, t: Tensor, logits: Tensor, task: int | None = None) -> None:
        """Offer a batch; ``task``: the task label of all its rows when the host knows it (None: unknown)."""
        if self.size == 0:
            self.seen += len(y)
            return
        if self.x is None:
            self._allocate(x, y, t, logits)
        if logits.shape[1] > self.logits.shape[1]:  # a wider head: pad the stored logits with zeros
            self.logits = F.pad(self.logits, (0, logits.shape[1] - self.logits.shape[1]))
        # the slots are drawn sample by sample (on the CPU generator); the rows are then written in one indexed
        # copy per tensor instead of four small copies per sample. A slot drawn twice in one batch keeps the
        # later sample, as writing in order would.
        row_of_slot: dict[int, int] = {}
        for i in range(len(y)):
            if self.n < self.size:
                slot = self.n
                self.n += 1
            else:
                draw = torch.randint(0, self.seen + 1, ())  # the CPU generator's: a host tensor on every device
                draw.host_side = True
                slot = int(draw.item())
            self.seen += 1
            if slot < self.size:
                row_of_slot[slot] = i
        if not row_of_slot:
            return
        slot_list = list(row_of_slot)
        self.t_host[slot_list] = -1 if task is None else int(task)
        slots = torch.tensor(slot_list, device=self.y.device)
        rows = torch.tensor(list(row_of_slot.values()), device=y.device)
        self.x[slots], self.y[slots], self.t[slots] = x[rows], y[rows], t[rows]
        padded = self.logits.new_zeros((len(rows), self.logits.shape[1]))
        padded[:, :logits.shape[1]] = logits[rows]
        self.logits[slots] = padded

    def sample(self, batch_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``min(batch_size, held)`` distinct samples, uniformly (Mammoth's ``get_data``)."""
        return self.rows(self.draw(batch_size))

    def draw(self, batch_size: int) -> Tensor:
        """``min(batch_size, held)`` distinct slots, uniformly, drawn on the CPU's generator: a host tensor on
        every device (marked ``host_side``). On the CPU the draw is the one ``randperm`` on the buffer's device
        made; on a GPU the slots now come from the CPU's stream of random numbers, not the GPU's."""
        slots = torch.randperm(self.n)[:batch_size]
        slots.host_side = True  # reading it waits for no device (tests/test_host_reads.py reads this flag)
        return slots

    def rows(self, slots: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(x, y, t, logits) of ``slots`` (a host tensor from ``draw``)."""
        idx = slots.to(self.y.device)
        return self.x[idx], self.y[idx], self.t[idx], self.logits[idx]

    def tasks_of(self, slots: Tensor) -> list[int] | None:
        """The sorted task labels held in ``slots``, read from the host copy; None if one was stored unknown."""
        labels = np.unique(self.t_host[slots.numpy()])
        return None if len(labels) and labels[0] < 0 else labels.tolist()

    def __len__(self) -> int:
        return self.n

    def stored_tensors(self) -> list[Tensor]:
        """What the buffer holds: the first ``n`` rows of x, y, t and logits."""
        if self.x is None:
            return []
        return [b[:self.n] for b in (self.x, self.y, self.t, self.logits)]


class DarkExperienceReplay(SupervisedPlugin):
    """DER (``beta`` = 0) or DER++ (``beta`` > 0): adds α MSE(h(x'), z') + β CE(f(x''), y'') to
    ``strategy.loss`` and stores the current batch with its logits after the update."""

    def __init__(self, mem_size: int, alpha: float, beta: float = 0.0):
        super().__init__()
        if alpha < 0 or beta < 0:
            raise ValueError(f"DER needs alpha >= 0 and beta >= 0, got alpha={alpha}, beta={beta}")
        self.buffer = ReservoirBuffer(mem_size)
        self.alpha, self.beta = float(alpha), float(beta)

    def _buffer_logits(self, strategy, slots: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(logits, y, stored logits) of the buffer's ``slots``, through the strategy's model with their task
        labels: a multi-head network's ``forward_tasks`` given the labels from the buffer's host copy (no read
        of them from the device), else Avalanche's forward."""
        x, y, t, z = self.buffer.rows(slots)
        return forward_known_tasks(strategy.model, x, t, self.buffer.tasks_of(slots)), y, z

    def before_backward(self, strategy, **kwargs):
        if len(self.buffer) == 0:
            return
        batch = len(strategy.mb_y)
        out, _, z = self._buffer_logits(strategy, self.buffer.draw(batch))
        width = min(out.shape[1], z.shape[1])
        strategy.loss = strategy.loss + self.alpha * F.mse_loss(out[:, :width], z[:, :width])
        if self.beta > 0:
            out, y, _ = self._buffer_logits(strategy, self.buffer.draw(batch))
            strategy.loss = strategy.loss + self.beta * F.cross_entropy(out, y)

    @torch.no_grad()
    def after_training_iteration(self, strategy, **kwargs):
        # the inputs as read (no augmentation here) and the logits of this step's forward, before its update
        self.buffer.add(strategy.mb_x.detach(), strategy.mb_y.detach(), strategy.mb_task_id.detach(),
                        strategy.mb_output.detach().float(), task=batch_task(strategy))

    def stored_tensors(self) -> list[Tensor]:
        return self.buffer.stored_tensors()


def batch_task(strategy) -> int | None:
    """The one task label of the training batch as the tensor loader knows it on the host (every batch of the
    loader one task, or this batch's labels read there); None when the batch mixes tasks or no tensor loader
    runs (Avalanche's own loaders: the buffer's batches then take ``forward``'s read, as before)."""
    loader = getattr(strategy, "dataloader", None)
    single = getattr(loader, "single_task", None)
    if single is not None:
        return int(single)
    tasks = getattr(loader, "batch_tasks", None)
    return int(tasks[0]) if tasks is not None and len(tasks) == 1 else None
