"""Quadratic penalties c Σ_k w_k (θ_k - θ*_k)² with their gradient written out (EWC's, SI's surrogate).

The penalty's value goes into ``strategy.loss`` as a constant and its gradient 2 c w (θ - θ*) is added to the
parameters' gradients after the backward, in foreach ops: through autograd it costs five ops per parameter each
way, more than the step of a small network.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


@torch.no_grad()
def weighted_distance(params: Sequence[Tensor], anchors: Sequence[Tensor],
                      weights: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """(Σ_k w_k (θ_k - θ*_k)², [w_k (θ_k - θ*_k)]): the penalty's value without its weight and, per parameter,
    half its gradient."""
    diffs = torch._foreach_sub([p.detach() for p in params], list(anchors))
    weighted = torch._foreach_mul(diffs, list(weights))
    value = torch.stack([torch.dot(w.reshape(-1), d.reshape(-1)) for w, d in zip(weighted, diffs)]).sum()
    return value, weighted


@torch.no_grad()
def add_to_gradients(params: Sequence[Tensor], terms: Sequence[Tensor], alpha: float) -> None:
    """p.grad += alpha * term for every parameter; one without a gradient gets one (the penalty touches it, as
    when it was in the graph)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    torch._foreach_add_([p.grad for p in params], list(terms), alpha=alpha)
