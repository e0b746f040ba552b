"""Functional modules: units grouped by synchronization, switched on and off by key-vector hard attention.

MISSION.md 1.4, seeds 000 and 002. Three pieces:

* ``cluster_units``: the units of a layer get semantic vectors (``modnet.embedding``, seed 001 eq. 1) from
  their activation profiles, and SynC (``modnet.sync``) groups those vectors into functional modules.
* ``ModuleGate``: each module owns a key vector (its knowledge embedding); a query computed from the input
  scores the keys and a hard top-k decision switches modules on, trained with a straight-through (or
  Gumbel-softmax straight-through) estimator. Its output multiplies the HAT mask of the layer, so gates and
  task masks compose: a gated-off unit is silent for that input, a masked-off unit for that task.
* ``TaskKeys``: task-agnostic (class-incremental) inference. Each class of each task keeps a key vector
  k_c = Sigma^-1 mu_c and bias b_c = -1/2 mu_c' Sigma^-1 mu_c computed in closed form from running
  statistics of the query space (class sums, pooled scatter; no sample is stored). The query q(x) scores the
  keys, q.k_c + b_c, which is the log-likelihood of a shared-covariance Gaussian up to a constant (LDA);
  the task whose keys score highest is picked, and its HAT masks and modules answer.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F


# -- modules from synchronization ----------------------------------------------------------------------
def cluster_units(profiles: Tensor, dim: int = 16, steps: int = 200, lr: float = 0.05, k: int = 3,
                  min_modules: int = 2, max_modules: int = 16, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Group units into functional modules: semantic vectors from activation profiles, then SynC.

    ``profiles`` is units x samples. Returns (module id per unit (0..M-1), the units' semantic vectors,
    L2-normalised). SynC's outliers join the module
    whose centre is nearest, so every unit belongs to one module. When SynC finds fewer than
    ``min_modules`` or more than ``max_modules`` groups, k-means (scikit-learn) on the same semantic vectors
    sets the count to the nearest bound, so the gate always has a choice to make.
    """
    from modnet.embedding import NeuronEmbedding, cosine_matrix, similarity_cross_entropy
    from modnet.sync import SynC

    n_units = profiles.shape[0]
    if n_units < min_modules:
        raise ValueError(f"a layer of {n_units} units cannot hold {min_modules} modules; lower min_modules")
    gen = torch.Generator().manual_seed(seed)
    emb = NeuronEmbedding({"layer": n_units}, dim=dim, generator=gen).to(profiles.device)
    target = cosine_matrix(profiles.float()).detach()
    opt = torch.optim.Adam(emb.parameters(), lr=lr)
    with torch.enable_grad():  # callers may sit under no_grad (Avalanche adaptation)
        for _ in range(steps):
            opt.zero_grad()
            similarity_cross_entropy(target, cosine_matrix(emb["layer"])).backward()
            opt.step()
    S = F.normalize(emb["layer"].detach(), dim=1)
    labels = torch.as_tensor(SynC(k=min(k, n_units - 1)).fit_predict(S.cpu().numpy()), device=S.device)
    n_found = int(labels.max()) + 1 if (labels >= 0).any() else 0
    if not min_modules <= n_found <= max_modules:
        from sklearn.cluster import KMeans

        n = min(max(n_found, min_modules), max_modules)
        labels = torch.as_tensor(KMeans(n, n_init=4, random_state=seed).fit_predict(S.cpu().numpy()),
                                 device=S.device)
    elif (labels < 0).any():
        centres = torch.stack([S[labels == m].mean(0) for m in range(n_found)])
        out = labels < 0
        labels[out] = (S[out] @ centres.T).argmax(1)
    return labels.long(), S


# -- key-vector hard attention over modules -------------------------------------------------------------
class ModuleGate(nn.Module):
    """Hard top-k attention over the modules of one layer, for one task.

    scores = query(x) . keys^T / sqrt(d); exactly ``k`` modules are on per input. The forward value is the
    hard 0/1 choice; the gradient is that of softmax(scores / tau) (straight-through), so keys and query
    learn. ``estimator='gumbel'`` adds Gumbel noise to the scores while training (Gumbel top-k).
    """

    def __init__(self, assignment: Tensor, query_dim: int, key_dim: int = 16, k: int = 1, tau: float = 1.0,
                 estimator: str = "st"):
        super().__init__()
        if estimator not in ("st", "gumbel"):
            raise ValueError(f"gate estimator must be 'st' or 'gumbel', got {estimator!r}")
        n_modules = int(assignment.max()) + 1
        if not 1 <= k <= n_modules:
            raise ValueError(f"top-k gate with k={k} needs 1 <= k <= {n_modules} modules in this layer")
        self.register_buffer("assignment", assignment.long().clone())
        self.n_modules, self.k, self.tau, self.estimator = n_modules, k, tau, estimator
        self.keys = nn.Parameter(torch.randn(n_modules, key_dim) / math.sqrt(key_dim))
        self.query = nn.Linear(query_dim, key_dim)

    @torch.no_grad()
    def init_keys_from_responses(self, q_in: Tensor, unit_acts: Tensor) -> None:
        """Start the keys where each input's query scores highest the modules whose units respond to it most.

        R[b, m] = standardised mean response of module m's units to input b; keys solve
        query(x) . keys^T / sqrt(d) ~= R in least squares, so the first top-k choices are already functional
        (inputs go to the modules that fire for them) rather than random.
        """
        onehot = F.one_hot(self.assignment, self.n_modules).to(unit_acts.dtype)  # units x M
        R = unit_acts @ onehot / onehot.sum(0).clamp_min(1)
        R = (R - R.mean(0)) / R.std(0).clamp_min(1e-6)
        Q = self.query(q_in) / math.sqrt(self.keys.shape[1])
        self.keys.copy_(torch.linalg.lstsq(Q, R).solution.T)

    def module_gates(self, q_in: Tensor) -> Tensor:
        """Per input, a 0/1 value per module (exactly k ones) carrying the straight-through gradient."""
        scores = self.query(q_in) @ self.keys.T / math.sqrt(self.keys.shape[1])
        if self.training and self.estimator == "gumbel":
            u = torch.rand_like(scores).clamp_(1e-9, 1 - 1e-9)
            scores = scores - torch.log(-torch.log(u))
        soft = F.softmax(scores / self.tau, dim=1)
        hard = torch.zeros_like(scores).scatter_(1, scores.topk(self.k, dim=1).indices, 1.0)
        # straight-through: the value is exactly `hard` (soft - soft.detach() is exactly 0 in floating point;
        # the parentheses matter), the gradient is the softmax's
        return hard + (soft - soft.detach())

    def forward(self, q_in: Tensor) -> Tensor:
        return self.module_gates(q_in)[:, self.assignment]  # B x units


class ModularGating(nn.Module):
    """The gates of every task and masked layer of a ``HATNet``; called as ``net.gate(x, task, masks)``.

    Each task gets its own gates, created when the task starts from a fresh clustering of the units (the
    modules are re-clustered between experiences); a finished task's gates and unit assignment stay as they
    were, so what HAT protects for it is not moved by later tasks.
    """

    def __init__(self, query_dim: int, key_dim: int = 16, k: int = 1, tau: float = 1.0, estimator: str = "st",
                 cluster: dict | None = None, profile_samples: int = 256):
        super().__init__()
        self.query_dim, self.key_dim, self.k, self.tau, self.estimator = query_dim, key_dim, k, tau, estimator
        self.cluster = dict(cluster or {})
        self.profile_samples = profile_samples
        self.gates = nn.ModuleDict()
        self._by_task: dict[int, list[ModuleGate]] = {}  # python-side cache of the gates' order

    def has_task(self, task: int) -> bool:
        return f"t{task}_l0" in self.gates

    def layer_gates(self, task: int) -> list[ModuleGate]:
        cached = self._by_task.get(task)
        if cached is not None:
            return cached
        out, i = [], 0
        while f"t{task}_l{i}" in self.gates:
            out.append(self.gates[f"t{task}_l{i}"])
            i += 1
        if out:
            self._by_task[task] = out
        return out

    def add_task(self, net, task: int, x: Tensor) -> None:
        """Cluster each masked layer's units on their responses to ``x`` and create the task's gates."""
        ones = [torch.ones(layer.n_units, device=x.device) for layer in net.masked]
        with torch.no_grad():
            profiles = net.unit_activations(x, ones)
        device = x.device
        for i, acts in enumerate(profiles):
            assignment, semantic = cluster_units(acts.T.contiguous(), **self.cluster)
            k = min(self.k, int(assignment.max()) + 1)
            gate = ModuleGate(assignment, self.query_dim, self.key_dim, k, self.tau, self.estimator).to(device)
            gate.register_buffer("semantic", semantic)  # kept for module maps and explanations
            gate.init_keys_from_responses(x.flatten(1), acts)
            self.gates[f"t{task}_l{i}"] = gate
        self._by_task.pop(task, None)

    def forward(self, x: Tensor, task: int, masks: list[Tensor]) -> list[Tensor]:
        gates = self.layer_gates(task)
        if not gates:
            return masks
        q_in = x.flatten(1)
        return [m * g(q_in) for m, g in zip(masks, gates)]


class TaskKeys(nn.Module):
    """Closed-form class keys in a query space, for picking the task without a label (see module doc).

    One key per row ("class"); a ``HATNet`` uses one row per (task, class) pair (``key_slots``).
    """

    def __init__(self, n_classes: int, query_dim: int, shrinkage: float = 0.1):
        super().__init__()
        self.shrinkage = shrinkage
        self.register_buffer("sums", torch.zeros(n_classes, query_dim, dtype=torch.float64))
        self.register_buffer("counts", torch.zeros(n_classes, dtype=torch.float64))
        self.register_buffer("scatter", torch.zeros(query_dim, query_dim, dtype=torch.float64))

    @torch.no_grad()
    def update(self, q: Tensor, y: Tensor) -> None:
        q = q.flatten(1).double()
        self.sums.index_add_(0, y, q)
        self.counts.index_add_(0, y, torch.ones_like(y, dtype=torch.float64))
        self.scatter += q.T @ q

    def keys(self) -> tuple[Tensor, Tensor]:
        """(K, b): key k_c = Sigma^-1 mu_c per class (rows), bias b_c = -1/2 mu_c' Sigma^-1 mu_c."""
        seen = self.counts > 0
        n, c = self.counts.sum(), int(seen.sum())
        if c == 0:
            raise RuntimeError("TaskKeys has no statistics yet: update() it with each trained experience")
        mu = self.sums / self.counts.clamp_min(1).unsqueeze(1)
        within = self.scatter - (mu[seen].T * self.counts[seen]) @ mu[seen]
        cov = within / (n - c).clamp_min(1)
        d = cov.shape[0]
        target = torch.eye(d, dtype=cov.dtype, device=cov.device) * torch.diagonal(cov).mean().clamp_min(1e-8)
        cov = (1 - self.shrinkage) * cov + self.shrinkage * target  # shrinkage keeps Sigma invertible
        K = torch.linalg.solve(cov, mu.T).T
        b = -0.5 * (K * mu).sum(1)
        b[~seen] = -torch.inf
        return K, b

    def class_scores(self, q: Tensor) -> Tensor:
        K, b = self.keys()
        return (q.flatten(1).double() @ K.T + b).to(q.dtype)

    def task_log_posterior(self, q: Tensor, task_classes: Sequence[Tensor]) -> Tensor:
        """log p(task | x) over the given tasks (B x T), from the class scores pooled per task."""
        s = self.class_scores(q)
        per_task = torch.stack([torch.logsumexp(s[:, idx], dim=1) for idx in task_classes], dim=1)
        return F.log_softmax(per_task, dim=1)
