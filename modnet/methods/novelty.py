"""A seen / unseen novelty gate for GZSL from the seen network's own features (Socher et al., NIPS 2013,
"Zero-shot learning through cross-modal transfer"; the detector of Lee et al., NeurIPS 2018).

The units f(x) of one masked layer of the seen network (``modnet gzsl``'s ``gate.layer``: the first, or
the head's input) on the seen training images give one Gaussian per seen class with a tied covariance:
mu_c = mean of class c, Sigma = the pooled within-class covariance, shrunk towards tr(Sigma)/d I. The
novelty of an input is its smallest squared Mahalanobis distance to a seen class mean,

    nu(x) = min_c (f(x) - mu_c)' Sigma^-1 (f(x) - mu_c),

and an input is called unseen when nu(x) > tau_q, the q-quantile of nu over the seen training images. A gated
method predicts among the unseen classes when the gate says unseen and among the seen classes otherwise
(Socher et al.'s two experts): its U is the share of unseen images the gate passes times the method's accuracy
among unseen classes, its S the share of seen images it keeps times the accuracy among seen classes. The gate
needs no unseen image: mu, Sigma and tau come from the seen training data; q (and the layer) are
hyper-parameters (``modnet gzsl`` chooses them on the class-disjoint validation split, like calibrated stacking's
gamma).

``shrunk`` is also the covariance shrinkage of the task-prediction Gaussians (``modnet.nets.task_inference``).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor


def shrunk(cov: Tensor, shrinkage: float) -> Tensor:
    """(1 - shrinkage) Sigma_c + shrinkage tr(Sigma_c)/d I for every C x d x d covariance (Ledoit-Wolf-style
    target; keeps each invertible)."""
    scale = torch.diagonal(cov, dim1=1, dim2=2).mean(1).clamp_min(1e-8).view(-1, 1, 1)
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    return (1 - shrinkage) * cov + shrinkage * scale * eye


class SeenNoveltyGate:
    """Tied class Gaussians over seen features; ``novelty(f)`` and ``is_unseen(f, q)``."""

    def __init__(self, shrinkage: float = 0.1):
        if not 0.0 <= shrinkage <= 1.0:
            raise ValueError(f"shrinkage must be in [0, 1], got {shrinkage}")
        self.shrinkage = shrinkage
        self.means: Tensor | None = None
        self.precision_factor: Tensor | None = None
        self.train_novelty: Tensor | None = None
        self._whitened_means: Tensor | None = None

    @torch.no_grad()
    def fit(self, features: Tensor, y: Tensor, classes: Sequence[int]) -> "SeenNoveltyGate":
        f = features.flatten(1).double()
        y = y.to(f.device)
        cls = torch.as_tensor(list(classes), device=f.device)
        member = y.unsqueeze(1) == cls.unsqueeze(0)  # n x C
        if not bool(member.any(1).all()):
            raise ValueError("every training label must be one of the seen classes")
        counts = member.sum(0).double()
        self.means = (member.double().T @ f) / counts.clamp_min(1).unsqueeze(1)
        resid = f - self.means[member.double().argmax(1)]
        cov = resid.T @ resid / max(f.shape[0] - len(cls), 1)
        # Sigma^-1 = L^-T L^-1: distances as ||L^-1 (f - mu)||^2
        self.precision_factor = torch.linalg.cholesky(shrunk(cov.unsqueeze(0), self.shrinkage)[0])
        self._whitened_means = self._whiten(self.means)
        self.train_novelty = self.novelty(f)
        return self

    def _whiten(self, f: Tensor) -> Tensor:
        """L^-1 f for every row of f (n x d -> n x d)."""
        return torch.linalg.solve_triangular(self.precision_factor, f.T, upper=False).T

    @torch.no_grad()
    def novelty(self, features: Tensor, batch_size: int = 4096) -> Tensor:
        """nu(x) for every row: the smallest squared Mahalanobis distance to a seen class mean, as
        min_c ||z - m_c||^2 with z = L^-1 f(x), m_c = L^-1 mu_c: one triangular solve per input rather than one
        per (input, class) pair (C times less work; float64, so the expanded square loses nothing that matters)."""
        if self.means is None:
            raise RuntimeError("SeenNoveltyGate.fit first")
        m = self._whitened_means
        m_sq = (m ** 2).sum(1)
        out = []
        for fb in features.flatten(1).double().split(batch_size):
            z = self._whiten(fb)
            dist = (z ** 2).sum(1, keepdim=True) - 2 * z @ m.T + m_sq
            out.append(dist.min(1).values.clamp_min(0))
        return torch.cat(out)

    def threshold(self, quantile: float) -> float:
        """tau_q: the q-quantile of the seen training images' novelty."""
        if not 0.0 < quantile <= 1.0:
            raise ValueError(f"gate quantile must be in (0, 1], got {quantile}")
        return float(torch.quantile(self.train_novelty, quantile))

    def is_unseen(self, novelty: Tensor, quantile: float) -> Tensor:
        return novelty > self.threshold(quantile)

    def sides(self, novelties: Sequence[Tensor], quantile: float) -> list[Tensor]:
        """``is_unseen`` of each novelty tensor at one threshold (computed once)."""
        tau = self.threshold(quantile)
        return [nu > tau for nu in novelties]


def gated_scores(scores: Tensor, unseen: Tensor, seen_classes: Sequence[int],
                 unseen_classes: Sequence[int]) -> Tensor:
    """The scores with the seen classes' columns at -inf where ``unseen`` and the unseen classes' columns at
    -inf elsewhere: the argmax picks among the classes the gate allows."""
    out = scores.clone()
    u = unseen.to(scores.device).unsqueeze(1)
    seen_cols = torch.as_tensor(list(seen_classes), device=scores.device, dtype=torch.long)
    unseen_cols = torch.as_tensor(list(unseen_classes), device=scores.device, dtype=torch.long)
    out[:, seen_cols] = torch.where(u, torch.full_like(out[:, seen_cols], -math.inf), out[:, seen_cols])
    out[:, unseen_cols] = torch.where(u, out[:, unseen_cols], torch.full_like(out[:, unseen_cols], -math.inf))
    return out
