"""Hard Attention to the Task (HAT) masked layers and the HAT arithmetic.

Serra, Suris, Miron, Karatzoglou, "Overcoming catastrophic forgetting with hard attention to the task",
ICML 2018 (MISSION.md 1.1). Each masked layer owns one learnable embedding e_t per task; its unit mask is
a_t = sigmoid(s * e_t) and multiplies the layer's output. The functions below are the pieces of the method
that are not layers (annealing, gradient conditioning, compensation, regulariser); the Avalanche plugin in
``strategies/hat.py`` calls them at the right callbacks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def flush_subnormals() -> None:
    """Subnormal floats flushed to zero on the CPU (x86 FTZ/DAZ), for this thread and the threads it starts.

    HAT's masks sigmoid(s e) at s = smax are subnormal on many of the units a task leaves off, and so are
    products with them; x86 CPUs compute on subnormals ~100x slower (a 1000 x 1000 matmul: 1.8 s instead of
    9 ms). ``torch.set_flush_denormal`` sets the mode of the calling thread only; a thread inherits it when it
    is started, and torch's OpenMP workers are started at the first parallel op and then live as long as the
    process. Set after that op, the workers keep computing on subnormals and every multi-threaded op waits for
    them (a HAT ResNet-18 step at 2 threads: 2.6-3.2x a plain step instead of 1.17x, in one process). So it
    is set when this module is imported, again by ``modnet cl`` / ``gzsl`` (and a sweep's jobs, ddp's ranks, the
    bench's processes) before their data, and by the HAT plugin."""
    torch.set_flush_denormal(True)


flush_subnormals()  # at import: the HAT networks' users import them before the first parallel op, as a rule


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
    """``nn.Linear`` whose output units are gated by a per-task HAT mask. Its forward is nn.Linear's: the
    network applies the mask after the unit's ReLU (``apply_unit_mask``), as HAT's reference code does."""

    def __init__(self, in_features: int, out_features: int, n_tasks: int, bias: bool = True):
        nn.Linear.__init__(self, in_features, out_features, bias=bias)
        self._init_task_embedding(n_tasks, out_features)


class SlicedStrideConv2d(nn.Conv2d):
    """``nn.Conv2d``, except that on the CPU a strided 1 x 1 convolution without padding (ResNet's shortcut) is
    the stride-1 convolution of the input's strided slice: the same outputs (a 1 x 1 kernel reads only the
    pixels the stride lands on) and gradients.

    Why: oneDNN's strided 1 x 1 weight-gradient kernels write past their workspace on channels_last maps with
    fewer input channels than their block, 8 with AVX2 and 16 with AVX-512 (uxlfoundation/oneDNN#6035, open).
    Measured with torch 2.14.1 on an AVX2 machine: ``aten.convolution_backward`` of a (32, 4, 8, 8) channels_last
    input and an (8, 4, 1, 1) weight at stride 2 ends in "double free or corruption" or a segmentation fault
    (HATResNet18 at width 4, the tests' size; contiguous maps were not hit). The slice goes through the
    stride-1 kernel, which does not take that path (tests/test_resnet.py compares the two on the shapes that
    crashed). Other devices keep the strided kernel."""

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if (input.device.type == "cpu" and self.stride != (1, 1) and self.kernel_size == (1, 1)
                and self.padding == (0, 0) and self.padding_mode == "zeros" and input.dim() == 4):
            sh, sw = self.stride
            return F.conv2d(input[:, :, ::sh, ::sw], weight, bias, 1, 0, self.dilation, self.groups)
        return super()._conv_forward(input, weight, bias)


class HATConv2d(SlicedStrideConv2d, HATMaskedLayer):
    """``nn.Conv2d`` whose output channels are gated by a per-task HAT mask. Its forward is nn.Conv2d's (but for
    ``SlicedStrideConv2d``'s strided 1 x 1 case on the CPU): the network applies the mask where the architecture
    puts it (``apply_unit_mask``; after ReLU and pooling in HATCNN, after batch norm in HATResNet18)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, n_tasks: int, **kw):
        SlicedStrideConv2d.__init__(self, in_channels, out_channels, kernel_size, **kw)
        self._init_task_embedding(n_tasks, out_channels)


def apply_unit_mask(h: Tensor, mask: Tensor | None) -> Tensor:
    """h * mask over the units (dim 1) of h (B, C) or (B, C, H, W): a task mask (C,), or a task mask composed
    with per-input module gates (B, C). In h's dtype: under bf16 autocast the float32 mask would otherwise
    promote every masked map to float32 (twice the memory traffic of each layer after it, and a cast back
    before each conv); the mask's gradient is cast back to float32 by autograd."""
    if mask is None:
        return h
    if mask.dtype != h.dtype:
        mask = mask.to(h.dtype)
    if h.dim() == 2:
        return h * mask
    shape = (1, -1) if mask.dim() == 1 else tuple(mask.shape)
    return h * mask.view(*shape, *([1] * (h.dim() - 2)))


def compensated_sigmoid(e: Tensor, s: float, smax: float, thres_cosh: float) -> tuple[Tensor, Tensor]:
    """(a, factor): the mask a = sigmoid(s e) and the factor that turns dL/da into HAT's compensated
    embedding gradient (sec. 2.5, ``compensate_embedding_grad``):

      dL/de = dL/da * s a (1 - a) * smax/s * (cosh(clamp(s e)) + 1) / (cosh(e) + 1) = dL/da * factor

    with a (1 - a) from the float32 sigmoid as autograd computes it, so the result matches the reference
    implementation (autograd through the sigmoid, then the compensation pass) to rounding (tests check it)."""
    se = e * s
    a = torch.sigmoid(se)
    # (cosh(clamp(s e)) + 1) a (1 - a) in one op: the sigmoid's own backward kernel, as autograd runs it
    factor = torch.ops.aten.sigmoid_backward(torch.cosh(se.clamp_(-thres_cosh, thres_cosh)).add_(1.0), a)
    factor /= torch.cosh(e).add_(1.0)
    factor *= smax  # s * smax / s
    return a, factor


def task_rows(vectors, task: int | None) -> list[Tensor]:
    """The vectors themselves (``task`` None), or row ``task`` of each (task x units) embedding table."""
    return list(vectors) if task is None else [t[task] for t in vectors]


def rows_into_tables(grads, tables_shapes, task: int | None) -> list[Tensor]:
    """The gradients of ``task_rows``' rows as gradients of what it was given: the rows' own (``task`` None),
    or each table's (zeros but row ``task``, as autograd's select backward writes it)."""
    if task is None:
        return list(grads)
    out = []
    for g, shape in zip(grads, tables_shapes):
        full = g.new_zeros(shape)
        full[task] = g
        out.append(full)
    return out


class CompensatedMasks(torch.autograd.Function):
    """HAT's training-time masks of every layer in one autograd node: a_l = sigmoid(s * e_l) for the task's
    embedding rows e_l, plus the capacity regulariser R = sum a . free (``capacity_regulariser`` with
    ``free = free_capacity(a^{<t})``, times its weight c if ``free`` carries it), whose backward returns
    HAT's compensated embedding gradient (``compensated_sigmoid``) directly. The factor is computed in the
    forward on all layers' units at once; the backward is one product.
    ``apply(s, smax, thres_cosh, free, task, *rows)`` returns (*masks, R). With ``task`` None the rows are
    given; with a task, the layers' whole embedding tables are, and their gradients are the tables' (the rows
    are picked inside: no select node per layer in the graph).
    """

    @staticmethod
    def forward(ctx, s, smax, thres_cosh, free, task, *rows):
        ctx.task, ctx.shapes = task, [r.shape for r in rows]
        rows = task_rows(rows, task)
        a, factor = compensated_sigmoid(torch.cat(rows), s, smax, thres_cosh)
        ctx.save_for_backward(factor, free)
        ctx.sizes = [r.numel() for r in rows]
        return (*a.split(ctx.sizes), a @ free)

    @staticmethod
    def backward(ctx, *grads):
        factor, free = ctx.saved_tensors
        g_masks, g_reg = grads[:-1], grads[-1]
        g = torch.cat([factor.new_zeros(n) if gm is None else gm for gm, n in zip(g_masks, ctx.sizes)])
        if g_reg is not None:
            g.addcmul_(free, g_reg)  # g is the cat's own tensor: written in place
        return (None, None, None, None, None, *rows_into_tables(g.mul_(factor).split(ctx.sizes), ctx.shapes, ctx.task))


@dataclass
class TrainingMasks:
    """A task's HAT masks during training, before they are computed: its embedding rows e_l (one per masked
    layer; or, with ``task``, the layers' whole embedding tables, whose row ``task`` is used), the annealed s,
    and the compensation settings; ``free`` is the capacity regulariser's weight times
    ``free_capacity(a^{<t})``. ``compute()`` gives the masks through ``CompensatedMasks``; a ``ModuleGate``
    computes them inside its own autograd function instead (one node for masks and gates). Whoever computes
    them leaves the weighted capacity regulariser c R in ``capacity``."""

    rows: list[Tensor]
    s: float
    smax: float
    thres_cosh: float
    free: Tensor
    capacity: Tensor | None = None
    task: int | None = None

    def compute(self) -> list[Tensor]:
        *masks, self.capacity = CompensatedMasks.apply(self.s, self.smax, self.thres_cosh, self.free, self.task,
                                                       *self.rows)
        return masks


_SMALL = 1 << 16  # CPU clip: gradients with fewer elements share one concatenated dot


def _flat(g: Tensor) -> Tensor:
    return g if g.dim() == 1 else g.reshape(-1)


def clip_grad_norm(grads: list[Tensor], max_norm: float, read_norm: bool | None = None) -> None:
    """``torch.nn.utils.clip_grad_norm_`` on a list of gradients, without its per-call parameter filtering.

    On the GPU the scale is applied unconditionally (min(1, max_norm / norm), no host sync). On the CPU,
    where reading the norm costs no device sync, the multiply is skipped when the norm is within bounds:
    with HAT's bound of 10000 that is nearly always, and the multiply is a full pass over every gradient.
    The CPU reads the squared norm as BLAS dot products, which run at memory speed where ``_foreach_norm``
    falls back to one slower reduction per tensor. ``read_norm``: None, the CPU's way on the CPU and the
    device's elsewhere; False, the device's way on any device (what a GPU step runs, without a host read).
    """
    if not grads:
        return
    if grads[0].device.type == "cpu" if read_norm is None else read_norm:
        # large gradients one dot each; the many small ones (biases, embeddings, gate) in one concatenated dot,
        # where one call per tensor would cost more than its arithmetic
        small = [_flat(g) for g in grads if g.numel() < _SMALL]
        sq = sum(float(torch.dot(f, f)) for f in (_flat(g) for g in grads if g.numel() >= _SMALL))
        if small:
            f = small[0] if len(small) == 1 else torch.cat(small)
            sq += float(torch.dot(f, f))  # a float64 sum of the dots
        if sq <= max_norm * max_norm:  # a NaN norm fails this: scaled as torch does
            return
        total = torch.tensor(sq).sqrt()
    else:
        total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    torch._foreach_mul_(grads, (max_norm / (total + 1e-6)).clamp_(max=1.0))


def annealed_s(batch_idx: int, n_batches: int, smax: float) -> float:
    """s for batch ``batch_idx`` (0-based) of an epoch of ``n_batches``: 1/smax -> smax linearly (HAT eq. 3)."""
    if n_batches <= 1:
        return float(smax)
    return 1.0 / smax + (smax - 1.0 / smax) * batch_idx / (n_batches - 1)


def capacity_regulariser(masks: list[Tensor], masks_prev: list[Tensor]) -> Tensor:
    """R = sum a_t (1 - a^{<t}) / sum (1 - a^{<t}) over all units of all masked layers (HAT eq. 5)."""
    return torch.cat(masks) @ free_capacity(masks_prev)


def free_capacity(masks_prev: list[Tensor]) -> Tensor:
    """(1 - a^{<t}) / sum (1 - a^{<t}) over the concatenated units: fixed during a task, so the regulariser
    costs one dot product per step (``capacity_regulariser``)."""
    free = torch.cat([1 - p for p in masks_prev])
    return free / free.sum().clamp_min(1e-12)


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
    """Scale the embedding gradient by smax/s * (cosh(clamp(s e)) + 1) / (cosh(e) + 1) (HAT sec. 2.5).

    The reference formula: training applies it inside ``CompensatedMasks``' backward; tests compare the two."""
    if emb.weight.grad is None:
        return
    e = emb.weight.detach()
    num = torch.cosh(torch.clamp(s * e, -thres_cosh, thres_cosh)) + 1
    emb.weight.grad.mul_(smax / s * num / (torch.cosh(e) + 1))
