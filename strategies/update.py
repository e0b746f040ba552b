"""The optimiser's step with the plugins' gradient conditioning and parameter bounds, as one function.

HAT conditions the gradients before the step (each protected weight's gradient times 1 - min(a^{<t}_i, a^{<t}_j),
eq. 2; the norm of all gradients clipped) and bounds the task embeddings after it (|e| <= thres_emb); the gates
freeze their inherited keys (their gradient rows times 0). Written as Avalanche callbacks (before_update,
optimizer.step(), after_update) each is a few eager ops per step, and the callbacks' dispatch costs as much again.

A plugin that does this is an ``UpdateTerm``: its one override point, ``update_terms``, returns what it adds to
the step as tensors (``UpdateTerms``: gradient multipliers, a norm bound, parameter bounds, parameters that take
no step), not code. The
template (``strategies.template.ConditionedTemplate.optimizer_step``) gathers every plugin's terms and runs
``update_step``: the multipliers, the clip, the optimiser's step and the bounds, in that order (HAT's reference
order: restrict the gradients, clip, step, clamp). With ``train.compile`` and an SGD optimiser the step's one graph
(``strategies.template.training_step``) calls ``sgd_update`` on the gradients it takes; where the step is not one
graph, ``update_step`` runs them as one compiled function of their own (``compiled_sgd_update``): torch's
functional SGD (``torch.optim.sgd.sgd``) on the clipped gradients, the multipliers, the norm and the bounds in
one graph. Measured on the bench's Split-MNIST MLP
(784-400-400, 13 tensors, 520k parameters, 1 thread): 118 us a step against 187 us eager, and ~360 us as the
three Avalanche callbacks; ``torch.compile`` of ``optimizer.step()`` itself took 219-350 us.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
from avalanche.core import SupervisedPlugin
from torch import Tensor
from torch.optim.sgd import sgd as functional_sgd

from modnet.nets.hat import clip_grad_norm


@dataclasses.dataclass(frozen=True)
class UpdateTerms:
    """What a plugin adds to the optimiser's step (immutable: a plugin returns a new one to change its terms, so
    that the template can keep the merge of the same terms from one step to the next). ``grad_masks``: (parameter,
    multiplier) pairs, the parameter's gradient multiplied (broadcast) before the step; ``clip_norm``: a bound on
    the 2-norm of every gradient the step applies (None: none); ``clamps``: (parameters, bound) pairs, each
    parameter clamped to [-bound, bound] after the step; ``frozen``: parameters that take no step this time (their
    gradient dropped, as if they had none: no decay, no momentum step, not in the clip's norm)."""

    grad_masks: Sequence[tuple[Tensor, Tensor]] = ()
    clip_norm: float | None = None
    clamps: Sequence[tuple[Sequence[Tensor], float]] = ()
    frozen: Sequence[Tensor] = ()


class UpdateTerm(SupervisedPlugin):
    """A plugin whose share of the update is ``UpdateTerms`` (its one override point, ``update_terms``, read every
    step: build the tensors once per experience). The template applies them around the optimiser's step; the
    plugin writes no gradient or parameter itself."""

    def update_terms(self, strategy) -> UpdateTerms:
        raise NotImplementedError


def merge_terms(terms: Sequence[UpdateTerms]) -> UpdateTerms:
    """Every plugin's terms as one: the multipliers and bounds in the plugins' order, the tightest norm bound."""
    norms = [t.clip_norm for t in terms if t.clip_norm is not None]
    return UpdateTerms(grad_masks=[m for t in terms for m in t.grad_masks],
                       clip_norm=min(norms) if norms else None,
                       clamps=[c for t in terms for c in t.clamps],
                       frozen=[p for t in terms for p in t.frozen])


def fusable_sgd(optimizer) -> bool:
    """Whether ``compiled_sgd_update`` computes ``optimizer``'s step: torch's SGD with one parameter group, not
    differentiable, not fused (Nesterov, momentum, dampening, weight decay and maximize are its arguments)."""
    if type(optimizer) is not torch.optim.SGD or len(optimizer.param_groups) != 1:
        return False
    group = optimizer.param_groups[0]
    return not group.get("differentiable") and not group.get("fused") and not isinstance(group["lr"], Tensor)


def sgd_arguments(optimizer, params: list[Tensor], terms: UpdateTerms) -> tuple[list | None, tuple]:
    """What ``sgd_update`` takes beside the parameters, gradients and multipliers, for ``params`` of a
    ``fusable_sgd`` optimiser: their momentum buffers (None without momentum), and (clip bound, clamped
    parameters, their bounds, lr, weight decay, momentum, dampening, nesterov, maximize)."""
    group = optimizer.param_groups[0]
    momentum = group["momentum"]
    buffers = [optimizer.state[p].get("momentum_buffer") for p in params] if momentum else None
    return buffers, (terms.clip_norm, [p for ps, _ in terms.clamps for p in ps],
                     [float(b) for ps, b in terms.clamps for _ in ps], group["lr"], group["weight_decay"], momentum,
                     group["dampening"], group["nesterov"], group["maximize"])


def keep_momentum(optimizer, params: list[Tensor], buffers: list | None) -> None:
    """The momentum buffers a compiled step made or updated (``sgd_arguments``' list), into the optimiser's state,
    where its own step keeps them."""
    for p, buf in zip(params, buffers or ()):
        if buf is not None:
            optimizer.state[p]["momentum_buffer"] = buf


def update_step(optimizer, terms: UpdateTerms, compiled: str | None = None) -> None:
    """The gradients' multipliers, the norm clip, ``optimizer.step()``, the parameters' bounds. ``compiled``: a
    ``torch.compile`` backend, used where ``fusable_sgd(optimizer)`` (else the eager path). The parameters the
    step applies are the optimiser's with a gradient; the multiplier of a parameter without one is skipped."""
    for p in terms.frozen:
        p.grad = None
    masked = [(p.grad, m) for p, m in terms.grad_masks if p.grad is not None]
    if compiled is not None and fusable_sgd(optimizer):
        params = [p for p in optimizer.param_groups[0]["params"] if p.grad is not None]
        if not params:
            return
        buffers, rest = sgd_arguments(optimizer, params, terms)
        compiled_sgd_update(compiled)(params, [p.grad for p in params], buffers, [g for g, _ in masked],
                                      [m for _, m in masked], *rest)
        keep_momentum(optimizer, params, buffers)
        return
    if masked:
        torch._foreach_mul_([g for g, _ in masked], [m for _, m in masked])
    if terms.clip_norm is not None:
        clip_grad_norm([p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None],
                       terms.clip_norm)
    optimizer.step()
    with torch.no_grad():
        for params, bound in terms.clamps:
            torch._foreach_clamp_min_(list(params), -bound)
            torch._foreach_clamp_max_(list(params), bound)


def sgd_update(params: list[Tensor], grads: list[Tensor], buffers: list | None, masked: list[Tensor],
               multipliers: list[Tensor], clip_norm: float | None, clamped: list[Tensor], bounds: list[float],
               lr: float, weight_decay: float, momentum: float, dampening: float, nesterov: bool,
               maximize: bool) -> None:
    """g <- g * m for each (masked gradient, multiplier); g <- g min(1, clip_norm / (||g||_2 + 1e-6)) over all
    ``grads`` (torch.nn.utils.clip_grad_norm_'s factor); torch's functional SGD on them; p <- clamp(p, -b, b).
    The clipped gradients are the step's, not written back to ``.grad`` (one pass over them less; the template
    clears them before the next backward); the multipliers are (in place, as eager). The clip scales before the
    step: a step taken unclipped and moved back by lr (1 - factor) g where the norm was over the bound would read
    the gradients once, not twice, but be off by ~eps lr |g|, large exactly where clipping matters (exploding
    gradients; ``tests/test_update.py``)."""
    with torch.no_grad():  # (not the decorator: dynamo would cache its graphs on the decorator's code)
        for g, m in zip(masked, multipliers):
            g.mul_(m)
        if clip_norm is not None:
            norm = torch.stack([(g * g).sum() for g in grads]).sum().sqrt()
            factor = (clip_norm / (norm + 1e-6)).clamp(max=1.0)
            grads = [g * factor for g in grads]
        functional_sgd(params, grads, [None] * len(params) if buffers is None else buffers, foreach=False,
                       weight_decay=weight_decay, momentum=momentum, lr=lr, dampening=dampening, nesterov=nesterov,
                       maximize=maximize)
        for p, b in zip(clamped, bounds):
            p.clamp_(-b, b)


def compiled_sgd_update(backend: str):
    """``sgd_update`` through ``torch.compile(backend, dynamic=True)``, once per backend for the process
    (``modnet.nets.models.compile_once``). A new graph where the set of gradients changes (a task's first step with
    inherited modules, the gates' settle epochs) and for each learning rate: torch's SGD takes the rate as
    ``add_``'s alpha, a constant of the graph (the rate as a tensor factor would stay symbolic but round apart from
    the eager step, which the compiled step matches bit for bit through ``aot_eager``); a schedule
    (``train.lr_patience``) reaches a handful of rates, the same ones every task, each compiled once."""
    from modnet.nets.models import compile_once

    return compile_once(sgd_update, backend)
