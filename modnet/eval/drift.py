"""How much a strategy's hidden representation of the first experience moves while later ones are learned.

Layer x layer linear CKA (``modnet.methods.analysis``) between the hidden layers' outputs on the first test
experience right after training it and at the end of the run: a protected representation keeps its
diagonal at 1 (HAT guarantees it for the first task's masked sub-network), fine-tuning lets it drift.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from modnet.methods.analysis import cka_matrix, collect_activations, plot_cka_heatmap
from modnet.nets.models import HATNet, MultiHeadTaskNet


class _FirstTask(nn.Module):
    """Calls a multi-task model as task 0 (the probe experience), so hooks see that task's path."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.inner = model

    def forward(self, x):
        if isinstance(self.inner, MultiHeadTaskNet) and not self.inner.class_incremental:
            return self.inner.forward_single_task(x, 0)
        if isinstance(self.inner, MultiHeadTaskNet):
            return self.inner.task_logits(x, 0)
        if hasattr(self.inner, "forward_single_task"):
            return self.inner.forward_single_task(x, 0)
        return self.inner(x)


def hidden_layers(model: nn.Module) -> list[str]:
    """Names (under ``_FirstTask``) of the layers whose outputs form the hidden representation (the
    baselines; a ``HATNet``'s units are read through ``HATNet.task_units``)."""
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
             and not n.startswith("classifier")]
    return [f"inner.{n}" for n in names]


def snapshot(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor] | None:
    if isinstance(model, HATNet) or hasattr(model, "task_units"):
        # a HATNet: the masked (and gated) units of task 0's path, as its heads see them; the hypernetwork's main
        # network: its hidden layers under task 0's generated weights (it has no layers of its own to hook)
        return [a.flatten(1) for a in model.task_units(x, 0)]
    layers = hidden_layers(model)
    if not layers:
        return None
    acts = collect_activations(_FirstTask(model), x, layers)
    return [a.flatten(1) for a in acts.values()]


def plot_drift(before: list[torch.Tensor], after: list[torch.Tensor], path: Path, name: str) -> list[float]:
    m = cka_matrix(before, after)
    labels = [f"h{i}" for i in range(len(before))]
    # experiences counted from 1 in pictures (README), Avalanche's experience 0 here
    plot_cka_heatmap(m, path, labels, labels, title=f"{name}: CKA of experience 1's hidden layers",
                     xlabel="after the last experience", ylabel="after experience 1")
    return torch.diagonal(m).tolist()
