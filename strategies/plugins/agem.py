"""A-GEM's projection without the host's test of the constraint (Chaudhry, Ranzato, Rohrbach & Elhoseiny,
ICLR 2019, "Efficient Lifelong Learning with A-GEM"):

    g~ = g - (g . g_ref / g_ref . g_ref) g_ref   if g . g_ref < 0,   else g

Avalanche's ``AGEMPlugin`` reads g . g_ref back to the host (``if dotg < 0``) every step, on a GPU a sync that
stops the host from queueing the next kernels. Written as one expression, the coefficient is
where(g . g_ref < 0, g . g_ref / g_ref . g_ref, 0): the same gradient, to the bit (a coefficient of exactly 0
leaves g as it is; ``where`` keeps the 0/0 of an all-zero reference gradient out), with one more pass writing
the gradients back when the constraint holds. Memory, its sampling and the reference gradient stay Avalanche's,
but for the forward of a memory batch on a multi-head network: Avalanche's ``MultiTaskModule.forward`` reads
the batch's task labels back (``torch.unique``) every step; when the memory loader is the runner's tensor
loader (``modnet.runner.tensor_batches``), it has read them on the host as it drew the batch, and the network's
``forward_tasks`` takes them (``MultiHeadNet.forward`` is ``forward_tasks`` over the sorted labels: the same
logits to the bit).
"""
from __future__ import annotations

import torch
from avalanche.training.plugins import AGEMPlugin

from modnet.nets.models import forward_known_tasks


def _flat_gradients(params, device) -> torch.Tensor:
    """Every parameter's gradient as one vector, in ``named_parameters``' order as Avalanche's; zeros for a
    parameter without one (a head of another task on a multi-head model)."""
    # reshape: a channels_last conv weight's gradient is not one contiguous run (view(-1) fails on it)
    return torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=device)
                      for p in params])


class SyncFreeAGEMPlugin(AGEMPlugin):
    """Avalanche's ``AGEMPlugin`` whose ``after_backward`` projects without reading the dot product, and whose
    reference gradient takes a memory batch's task labels from the loader when it knows them."""

    def before_training_iteration(self, strategy, **kwargs):
        """Avalanche's reference gradient g_ref on a memory batch (its code, but for the forward)."""
        if len(self.buffers) == 0:
            return
        strategy.model.train()
        strategy.optimizer.zero_grad()
        mb = self.sample_from_memory()
        xref, yref, tid = mb[0].to(strategy.device), mb[1].to(strategy.device), mb[-1]
        # the task labels of the batch just drawn, read on the host by the tensor loader (None: Avalanche's)
        out = forward_known_tasks(strategy.model, xref, tid, getattr(self.buffer_dataloader, "batch_tasks", None))
        strategy._criterion(out, yref).backward()
        self.reference_gradients = _flat_gradients(list(strategy.model.parameters()), strategy.device)
        strategy.optimizer.zero_grad()

    @torch.no_grad()
    def after_backward(self, strategy, **kwargs):
        if len(self.buffers) == 0:
            return
        params = list(strategy.model.parameters())
        current = _flat_gradients(params, strategy.device)
        if current.shape != self.reference_gradients.shape:
            raise RuntimeError("Different model parameters in AGEM projection")
        ref = self.reference_gradients
        dotg = torch.dot(current, ref)
        coefficient = torch.where(dotg < 0, dotg / torch.dot(ref, ref), torch.zeros_like(dotg))
        projected = current - ref * coefficient
        offset = 0
        for p in params:
            if p.grad is not None:
                p.grad.copy_(projected[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
