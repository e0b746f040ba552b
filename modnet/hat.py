"""Hard Attention to the Task (HAT) masked layers and the HAT arithmetic.

Serra, Suris, Miron, Karatzoglou, "Overcoming catastrophic forgetting with hard attention to the task",
ICML 2018 (MISSION.md 1.1). Each masked layer owns one learnable embedding e_t per task; its unit mask is
a_t = sigmoid(s * e_t) and multiplies the layer's output. The functions below are the pieces of the method
that are not layers (annealing, gradient conditioning, compensation, regulariser); the Avalanche plugin in
``strategies/hat.py`` calls them at the right callbacks.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class HATMaskedLayer(nn.Module):
    """Mixin: one task embedding row per task, a mask per unit of the layer's output."""

    n_units: int

    def _init_task_embedding(self, n_tasks: int, n_units: int) -> None:
        if n_tasks < 1:
            raise ValueError(f"n_tasks must be >= 1, got {n_tasks}")
        self.n_units = n_units
        # N(0, 1) init as in the reference code: sigmoid(s*e) starts near 0.5 at s=1.
        self.task_embedding = nn.Embedding(n_tasks, n_units)

    def mask(self, task: int, s: float) -> Tensor:
        return torch.sigmoid(s * self.task_embedding.weight[task])


class HATLinear(nn.Linear, HATMaskedLayer):
    """``nn.Linear`` whose output units are gated by a per-task HAT mask."""

    def __init__(self, in_features: int, out_features: int, n_tasks: int, bias: bool = True):
        nn.Linear.__init__(self, in_features, out_features, bias=bias)
        self._init_task_embedding(n_tasks, out_features)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:  # type: ignore[override]
        out = F.linear(x, self.weight, self.bias)
        return out if mask is None else out * mask


class HATConv2d(nn.Conv2d, HATMaskedLayer):
    """``nn.Conv2d`` whose output channels are gated by a per-task HAT mask."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, n_tasks: int, **kw):
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, **kw)
        self._init_task_embedding(n_tasks, out_channels)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:  # type: ignore[override]
        out = self._conv_forward(x, self.weight, self.bias)
        if mask is None:
            return out
        # a task mask (C,) or a task mask composed with per-input module gates (B, C)
        return out * (mask.view(1, -1, 1, 1) if mask.dim() == 1 else mask[:, :, None, None])


def annealed_s(batch_idx: int, n_batches: int, smax: float) -> float:
    """s for batch ``batch_idx`` (0-based) of an epoch of ``n_batches``: 1/smax -> smax linearly (HAT eq. 3)."""
    if n_batches <= 1:
        return float(smax)
    return 1.0 / smax + (smax - 1.0 / smax) * batch_idx / (n_batches - 1)


def capacity_regulariser(masks: list[Tensor], masks_prev: list[Tensor]) -> Tensor:
    """R = sum a_t (1 - a^{<t}) / sum (1 - a^{<t}) over all units of all masked layers (HAT eq. 5)."""
    num = sum((m * (1 - p)).sum() for m, p in zip(masks, masks_prev))
    den = sum((1 - p).sum() for p in masks_prev)
    return num / den.clamp_min(1e-12)


def weight_protection(out_prev: Tensor, in_prev: Tensor | None, weight_shape: torch.Size) -> Tensor:
    """Gradient multiplier 1 - min(a_i^{<t,l}, a_j^{<t,l-1}) for a weight joining input unit j to unit i.

    ``in_prev`` is None for the first layer (its inputs carry no mask), then only the output unit protects.
    Conv weights (out, in, kh, kw) share the multiplier over the kernel positions.
    """
    if in_prev is None:
        prot = out_prev.view(-1, *([1] * (len(weight_shape) - 1)))
        return (1 - prot).expand(weight_shape)
    prot = torch.minimum(out_prev.view(-1, 1), in_prev.view(1, -1))
    prot = prot.view(weight_shape[0], weight_shape[1], *([1] * (len(weight_shape) - 2)))
    return (1 - prot).expand(weight_shape)


def compensate_embedding_grad(emb: nn.Embedding, s: float, smax: float, thres_cosh: float = 50.0) -> None:
    """Scale the embedding gradient by smax/s * (cosh(clamp(s e)) + 1) / (cosh(e) + 1) (HAT sec. 2.5)."""
    if emb.weight.grad is None:
        return
    e = emb.weight.detach()
    num = torch.cosh(torch.clamp(s * e, -thres_cosh, thres_cosh)) + 1
    den = torch.cosh(e) + 1
    emb.weight.grad.mul_(smax / s * num / den)
