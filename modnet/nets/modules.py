"""Functional modules: units grouped by synchronization, switched on and off by key-vector hard attention.

MISSION.md 1.4, seeds 000 and 002. Three pieces:

* ``cluster_units``: the units of a layer get semantic vectors (``modnet.methods.embedding``, seed 001 eq. 1) from
  their activation profiles, and SynC (``modnet.methods.sync``) groups those vectors into functional modules.
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

from modnet.nets.hat import TrainingMasks, compensated_sigmoid, rows_into_tables, task_rows


# how a module was made, as stored in a gate's ``module_method_<l>`` buffer: SynC, the k-means fallback, or
# "rest": the few free units (under 3) left for a task, one module without clustering
MODULE_METHODS = ("sync", "kmeans", "rest")


# -- modules from synchronization ----------------------------------------------------------------------
def cluster_units(profiles: Tensor, dim: int = 16, steps: int = 200, lr: float = 0.05, k: int | None = None,
                  min_modules: int = 2, max_modules: int = 16, seed: int = 0, sync_dims: int | None = None,
                  min_module_size: int | None = None, sync_dims_fallback: int | None = 3) -> tuple[Tensor, Tensor]:
    """Group units into functional modules: semantic vectors from activation profiles, then SynC.

    ``profiles`` is units x samples. Returns (module id per unit (0..M-1), the units' semantic vectors,
    L2-normalised). See ``cluster_layers`` for the space SynC runs in, its eps rule and its outliers.
    """
    return cluster_layers([profiles], dim, steps, lr, k, min_modules, max_modules, seed, sync_dims=sync_dims,
                          min_module_size=min_module_size, sync_dims_fallback=sync_dims_fallback)[0]


def cluster_layers(profiles: Sequence[Tensor], dim: int = 16, steps: int = 200, lr: float = 0.05,
                   k: int | None = None, min_modules: int = 2, max_modules: int = 16, seed: int = 0,
                   with_method: bool = False, sync_dims: int | None = None,
                   min_module_size: int | None = None, select: Sequence[Tensor | None] | None = None,
                   algorithm: str = "auto", sync_dims_fallback: int | None = 3) -> list[tuple]:
    """``cluster_units`` for every layer (units x samples each): the semantic vectors of layers of equal width
    are fitted in one batched Adam loop (their losses are summed, so each layer's gradient, and Adam's
    elementwise step, are its own), and each layer's fixed target is normalised once, not at every step.

    SynC runs on the semantic vectors' first ``sync_dims`` principal components (None: the vectors as they
    are, the paper's K = 16 space); when no eps there gives a module count in range, it runs again on the
    first ``sync_dims_fallback`` components (None: no second space), then k-means decides. With a fixed
    eps the units' vectors, spread over the 16-d sphere, leave one large cluster, small fragments and many
    outliers (9-17 groups, ~35% outliers on 256 units); with the eps rule below SynC finds 2-4 modules there
    on digits (every layer), and on MNIST-1D's second layer only in 3 principal dimensions. eps rule: the mean distance to the k-th neighbour
    (``k`` None: max(10, n // 10), the ``SynC`` default), k growing by half while SynC finds more than
    ``max_modules`` groups, shrinking by a third while it finds fewer than ``min_modules``, bisected once
    both are seen: SynC decides the modules at the first eps whose count is in range. Groups under ``min_module_size`` units (None: max(3, n // 32)) are outliers, as are units
    that synchronised with nobody; outliers join the module whose centre is nearest. k-means (scikit-learn)
    on the same vectors stays as the fallback when no eps gives a count in range; ``with_method``: each
    layer's tuple also holds how its modules were decided ("sync" or "kmeans") and SynC's outlier count.
    ``select``: per layer, a boolean mask of the units to cluster (None: all); the semantic vectors are
    fitted on every unit, the labels cover the selected units only ("rest": one module, when fewer than max(3,
    ``min_modules``) units are selected). ``algorithm``: SynC's neighbourhood search (``SynC(algorithm=...)``)."""
    from modnet.methods.embedding import NeuronEmbedding, cosine_matrix, similarity_cross_entropy

    for p in profiles:
        if p.shape[0] < min_modules:
            raise ValueError(f"a layer of {p.shape[0]} units cannot hold {min_modules} modules; lower min_modules")
    vectors: list[Tensor | None] = [None] * len(profiles)
    by_width: dict[int, list[int]] = {}
    for i, p in enumerate(profiles):
        by_width.setdefault(p.shape[0], []).append(i)
    for n_units, layers in by_width.items():
        # each layer's start is what cluster_units on its own draws: a fresh generator seeded with `seed`
        start = torch.stack([NeuronEmbedding({"layer": n_units}, dim=dim,
                                             generator=torch.Generator().manual_seed(seed))["layer"].detach()
                             for _ in layers]).to(profiles[layers[0]].device)
        emb = nn.Parameter(start)
        target = torch.stack([F.softmax(cosine_matrix(profiles[i].float()), dim=-1) for i in layers]).detach()
        opt = torch.optim.Adam([emb], lr=lr)
        with torch.enable_grad():  # callers may sit under no_grad (Avalanche adaptation)
            for _ in range(steps):
                opt.zero_grad()
                similarity_cross_entropy(target, cosine_matrix(emb), target_is_softmax=True).backward()
                opt.step()
        for j, i in enumerate(layers):
            vectors[i] = F.normalize(emb[j].detach(), dim=1)
    out = []
    for i, S in enumerate(vectors):
        rows = None if select is None or select[i] is None else select[i]
        S_sel = S if rows is None else S[rows]
        if S_sel.shape[0] < max(min_modules, 3):
            labels, method, outliers = torch.zeros(S_sel.shape[0], dtype=torch.long, device=S.device), "rest", 0
        else:
            labels, method, outliers = sync_modules(S_sel, k, min_modules, max_modules, seed, sync_dims,
                                                    min_module_size, algorithm, sync_dims_fallback)
        out.append((labels, S, method, outliers) if with_method else (labels, S))
    return out


def sync_space(S: Tensor, sync_dims: int | None) -> Tensor:
    """The space SynC clusters units in: the first ``sync_dims`` principal components of their vectors."""
    if sync_dims is None or sync_dims >= S.shape[1]:
        return S
    X = S.double() - S.double().mean(0)
    _, _, V = torch.linalg.svd(X, full_matrices=False)
    return (X @ V[:sync_dims].T).float()


def sync_modules(S: Tensor, k: int | None, min_modules: int, max_modules: int, seed: int = 0,
                 sync_dims: int | None = None, min_module_size: int | None = None,
                 algorithm: str = "auto", sync_dims_fallback: int | None = 3) -> tuple[Tensor, str, int]:
    """(module id per unit from its vector (rows of S), "sync" or "kmeans", SynC's outlier count): see
    ``cluster_layers``."""
    spaces = [sync_dims] + ([sync_dims_fallback] if sync_dims_fallback != sync_dims
                            and sync_dims_fallback is not None else [])
    for i, dims in enumerate(spaces):
        labels, method, outliers = _sync_in_space(S, k, min_modules, max_modules, seed, dims, min_module_size,
                                                  algorithm, kmeans=i == len(spaces) - 1)
        if method == "sync" or i == len(spaces) - 1:
            return labels, method, outliers
    raise AssertionError("unreachable")


def _sync_in_space(S: Tensor, k: int | None, min_modules: int, max_modules: int, seed: int,
                   sync_dims: int | None, min_module_size: int | None, algorithm: str,
                   kmeans: bool) -> tuple[Tensor | None, str, int]:
    """SynC with the eps rule in one space; k-means on S when it finds no count in range and ``kmeans``
    (else (None, "none", outliers))."""
    from modnet.methods.sync import SynC

    n = S.shape[0]
    P = sync_space(S, sync_dims).cpu().numpy()
    min_size = max(3, n // 32) if min_module_size is None else int(min_module_size)
    rank = min(max(10, n // 10), n - 2) if k is None else int(k)
    tried: dict[int, tuple] = {}
    lo, hi = 0, n - 1  # ranks known to give too many groups (<= lo) and too few (>= hi)
    while 1 <= rank <= n - 2 and rank not in tried:
        labels = torch.as_tensor(SynC(k=rank, scale="global", min_cluster_size=min_size,
                                      algorithm=algorithm).fit_predict(P), device=S.device)
        found = int(labels.max()) + 1 if (labels >= 0).any() else 0
        tried[rank] = (labels, found)
        if min_modules <= found <= max_modules:
            break
        # too many groups: a larger neighbourhood (eps); too few: a smaller one; bisect once both are known
        if found > max_modules:
            lo = rank
            nxt = max(rank + 1, rank * 3 // 2) if hi == n - 1 else (rank + hi) // 2
        else:
            hi = rank
            nxt = max(1, rank * 2 // 3) if lo == 0 else (lo + rank) // 2
        if not lo < nxt < hi:
            break
        rank = min(nxt, n - 2)
    labels, found = tried[rank] if rank in tried else (None, 0)
    outliers = int((labels < 0).sum()) if labels is not None else n
    if labels is None or not min_modules <= found <= max_modules:
        if not kmeans:
            return None, "none", outliers
        from sklearn.cluster import KMeans

        n_km = min(max(found, min_modules), max_modules)
        labels = torch.as_tensor(KMeans(n_km, n_init=4, random_state=seed).fit_predict(S.cpu().numpy()),
                                 device=S.device)
        return labels.long(), "kmeans", outliers
    if outliers:
        centres = torch.stack([S[labels == m].mean(0) for m in range(found)])
        out = labels < 0
        labels[out] = (S[out] @ centres.T).argmax(1)
    return labels.long(), "sync", outliers


# -- key-vector hard attention over modules -------------------------------------------------------------
#: the gate's estimators (modules.estimator; modnet.validate keeps a copy, checked by the tests)
ESTIMATORS = ("st", "gumbel")


class ModuleGate(nn.Module):
    """Hard top-k attention over the modules of a task's masked layers (one layer or several).

    For layer l: scores_l = query_l(x) . keys_l^T / sqrt(d); exactly k_l = min(k, M_l) of its M_l modules
    are on per input (a layer with k or fewer modules keeps them all on). The forward value is the hard 0/1
    choice; the gradient is that of softmax(scores / tau) (straight-through), so keys and queries learn.
    ``estimator='gumbel'`` adds Gumbel noise to the scores while training (Gumbel top-k).

    All layers are computed together: the per-layer queries are row blocks of one linear map and the keys one
    (L, M_max, d) tensor whose missing modules score -inf, so a forward is one product of the batch to all
    layers' scores, one top-k and one batched expansion to every layer's units (layers padded to the widest),
    whatever the depth (``_GateFunction``). On small networks the number of ops, not their arithmetic, is
    what a training step pays. Given a task's HAT ``TrainingMasks``, the HAT masks are computed in the same
    autograd function.
    """

    def __init__(self, assignment: Tensor | Sequence[Tensor], query_dim: int, key_dim: int = 16, k: int = 1,
                 tau: float = 1.0, estimator: str = "st", k_share: float = 0.75,
                 n_inherited: Sequence[int] | None = None):
        super().__init__()
        if estimator not in ESTIMATORS:
            raise ValueError(f"gate estimator must be 'st' or 'gumbel', got {estimator!r}")
        assignments = [assignment] if isinstance(assignment, Tensor) else list(assignment)
        n_modules = [int(a.max()) + 1 for a in assignments]
        if any(int(a.min()) < 0 for a in assignments):
            raise ValueError("every unit needs a module id >= 0 (assign SynC's outliers first)")
        if k < 1:
            raise ValueError(f"top-k gate needs k >= 1 modules on per input, got k={k}")
        L, m_max = len(assignments), max(n_modules)
        self.n_layers, self.n_modules, self.tau, self.estimator = L, n_modules, tau, estimator
        self.k = [min(k, m) for m in n_modules]
        self.k_max = max(self.k)
        # rank r of the top-k_max switches its module on in layer l iff r < k_l (None: all layers alike)
        self.register_buffer("rank_on", None if min(self.k) == self.k_max else
                             (torch.arange(self.k_max) < torch.tensor(self.k).unsqueeze(1)).float())
        self.sizes = [int(a.numel()) for a in assignments]
        for i, a in enumerate(assignments):
            self.register_buffer(f"assignment_{i}", a.long().clone())
        valid = torch.arange(m_max) < torch.tensor(n_modules).unsqueeze(1)  # L x M_max
        self.register_buffer("score_pad", torch.zeros(L, m_max).masked_fill(~valid, -torch.inf))
        # module m of layer l -> its units (M_max x units_l, one-hot columns): module gates expand to unit gates
        # by a product with a small inner dimension, the layer's mask folded into it
        for i, a in enumerate(assignments):
            self.register_buffer(f"to_units_{i}", F.one_hot(a.long(), m_max).T.float().contiguous())
        self.keys = nn.Parameter(torch.randn(L, m_max, key_dim) / math.sqrt(key_dim))
        self.query = nn.Linear(query_dim, L * key_dim)
        self._set_pools(n_inherited, k, k_share)
        self._pad_layers()
        self.register_load_state_dict_post_hook(_repad_after_load)

    def _set_pools(self, n_inherited: Sequence[int] | None, k: int, k_share: float) -> None:
        """Modules inherited from earlier tasks (the first ``n_inherited[l]`` of layer l) and the task's own
        are chosen in two pools: top-k (``k``) of its own modules and top-ceil(``k_share`` x count) of the
        inherited ones, per input. Without inherited modules: one pool, top-k of all (``pools`` None)."""
        self.n_inherited = [0] * self.n_layers if n_inherited is None else [int(n) for n in n_inherited]
        self.pools = None
        if not any(self.n_inherited):
            return
        m_max = self.keys.shape[1]
        idx = torch.arange(m_max)
        pools = []
        for own in (True, False):
            ks, pads = [], []
            for m, n_old in zip(self.n_modules, self.n_inherited):
                inside = (idx >= n_old) & (idx < m) if own else idx < n_old
                count = m - n_old if own else n_old
                ks.append(min(k, count) if own else min(count, math.ceil(k_share * count)))
                pads.append(torch.zeros(m_max).masked_fill(~inside, -torch.inf))
            k_p = max(ks)
            if k_p:
                rank_on = (torch.arange(k_p) < torch.tensor(ks).unsqueeze(1)).float()
                pools.append((torch.stack(pads).to(self.keys.device), rank_on.to(self.keys.device), k_p))
        self.pools = tuple(pools)
        self.k = [min(k, m - n) + min(n, math.ceil(k_share * n)) for m, n in zip(self.n_modules, self.n_inherited)]

    def _apply(self, fn, *args, **kwargs):  # .to(device) moves the pools' tensors too
        out = super()._apply(fn, *args, **kwargs)
        if self.pools is not None:
            self.pools = tuple((fn(pad), fn(rank), k) for pad, rank, k in self.pools)
        return out

    def _pad_layers(self) -> None:
        """The per-layer expansions and assignments padded to the widest layer and stacked (derived, not
        saved): every layer then goes through one batched product."""
        L, m_max, width = self.n_layers, self.keys.shape[1], max(self.sizes)
        dev = self.keys.device
        expand = torch.zeros(L, m_max, width, device=dev)  # padding units belong to no module: never on
        units_module = torch.zeros(L, 1, width, dtype=torch.long, device=dev)
        for i, n in enumerate(self.sizes):
            expand[i, :, :n] = getattr(self, f"to_units_{i}")
            units_module[i, 0, :n] = self.assignment(i)
        self.register_buffer("expand_padded", expand, persistent=False)
        self.register_buffer("units_module_padded", units_module, persistent=False)

    def assignment(self, layer: int = 0) -> Tensor:
        return getattr(self, f"assignment_{layer}")

    def module_ids(self, layer: int = 0) -> Tensor:
        """Global id of each of the layer's modules (persistent across tasks; 0..M-1 when never recorded)."""
        ids = getattr(self, f"module_ids_{layer}", None)
        return torch.arange(self.n_modules[layer]) if ids is None else ids

    def module_methods(self, layer: int = 0) -> Tensor:
        """How each module was made: an index into ``MODULE_METHODS`` (0 SynC, 1 the k-means fallback)."""
        codes = getattr(self, f"module_method_{layer}", None)
        if codes is None:
            fallback = getattr(self, f"kmeans_fallback_{layer}", None)
            return torch.full((self.n_modules[layer],), int(fallback is not None and bool(fallback)))
        return codes

    @torch.no_grad()
    def fit_query_to_keys(self, q_in: Tensor, unit_acts: Sequence[Tensor]) -> None:
        """The query map solved in least squares for the current keys (inherited ones included), so that
        each input's scores follow the standardised responses of the modules' units, as
        ``init_keys_from_responses`` does for the keys."""
        x1 = torch.cat([q_in, q_in.new_ones(q_in.shape[0], 1)], 1)
        d = self.keys.shape[-1]
        W = self.query.weight.view(self.n_layers, d, -1).clone()
        b = self.query.bias.view(self.n_layers, d).clone()
        for i, a in enumerate(unit_acts):
            onehot = F.one_hot(self.assignment(i), self.n_modules[i]).to(a.dtype)
            R = a @ onehot / onehot.sum(0).clamp_min(1)
            R = (R - R.mean(0)) / R.std(0).clamp_min(1e-6)
            K = self.keys[i, :self.n_modules[i]]  # M x d
            Z = torch.linalg.lstsq(K, R.T * math.sqrt(d)).solution.T  # B x d: queries giving scores ~ R
            sol = torch.linalg.lstsq(x1, Z).solution  # (D+1) x d
            W[i], b[i] = sol[:-1].T, sol[-1]
        self.query.weight.copy_(W.view_as(self.query.weight))
        self.query.bias.copy_(b.view_as(self.query.bias))

    @property
    def to_units(self) -> Tensor:
        """Block-diagonal (L * M_max) x (all units) expansion of module gates to unit gates (reference)."""
        return torch.block_diag(*[getattr(self, f"to_units_{i}") for i in range(self.n_layers)])

    def _queries(self, q_in: Tensor) -> Tensor:
        return self.query(q_in).view(q_in.shape[0], self.n_layers, -1) / math.sqrt(self.keys.shape[-1])

    @torch.no_grad()
    def init_keys_from_responses(self, q_in: Tensor, unit_acts: Tensor | Sequence[Tensor]) -> None:
        """Start the keys where each input's query scores highest the modules whose units respond to it most.

        Per layer, R[b, m] = standardised mean response of module m's units to input b; the keys solve
        query(x) . keys^T / sqrt(d) ~= R in least squares, so the first top-k choices are already functional
        (inputs go to the modules that fire for them) rather than random.
        """
        acts = [unit_acts] if isinstance(unit_acts, Tensor) else list(unit_acts)
        Q = self._queries(q_in)
        self.keys.zero_()
        for i, a in enumerate(acts):
            onehot = F.one_hot(self.assignment(i), self.n_modules[i]).to(a.dtype)  # units x M
            R = a @ onehot / onehot.sum(0).clamp_min(1)
            R = (R - R.mean(0)) / R.std(0).clamp_min(1e-6)
            self.keys[i, :self.n_modules[i]] = torch.linalg.lstsq(Q[:, i], R).solution.T

    def module_gates(self, q_in: Tensor) -> Tensor:
        """Per input and layer, a 0/1 value per module (exactly k_l ones; B x L x M_max, missing modules 0),
        carrying the straight-through gradient."""
        scores = torch.einsum("bld,lmd->blm", self._queries(q_in), self.keys) + self.score_pad
        noise = self._gumbel(q_in)
        if noise is not None:
            scores = scores + noise.transpose(0, 1)
        soft = F.softmax(scores / self.tau, dim=-1)
        hard = _hard_choice(scores, self.k_max, self.rank_on, self.pools, modules_first=False)
        # straight-through: the value is exactly `hard` (soft - soft.detach() is exactly 0 in floating point;
        # the parentheses matter), the gradient is the softmax's
        return hard + (soft - soft.detach())

    def layer_module_gates(self, q_in: Tensor, layer: int = 0) -> Tensor:
        return self.module_gates(q_in)[:, layer, :self.n_modules[layer]]

    def forward(self, q_in: Tensor, masks: Sequence[Tensor] | TrainingMasks | None = None,
                train: bool = True) -> list[Tensor]:
        """Per layer, the gate of every unit (B x units): its module's gate, times the layer's (HAT) mask when
        ``masks`` (one vector per layer) is given. Given a task's ``TrainingMasks`` (HAT training), the masks
        are computed in the same autograd function, with HAT's compensated gradient, and the weighted
        capacity regulariser is left in ``masks.capacity``.

        Same values and gradients as ``module_gates(q_in).flatten(1) @ to_units`` times the masks (tests check
        it), through one autograd function with the straight-through backward written out: the reference path
        is ~40 small autograd ops per step, which on a small network cost more than its layers. ``train``
        False: the gate's parameters enter detached (the same values; the backward computes no gradient for
        them, nor the straight-through branch when the input takes none either).
        """
        hat, rows = None, 0  # rows: how many leading dims a vector has (1: embedding tables, task given)
        if isinstance(masks, TrainingMasks):
            hat, vectors = (masks.s, masks.smax, masks.thres_cosh, masks.free, masks.task), masks.rows
            rows = int(masks.task is not None)
        elif masks is None:
            vectors = [q_in.new_ones(n) for n in self.sizes]
        else:
            vectors = list(masks)
        if [tuple(m.shape[rows:]) for m in vectors] != [(n,) for n in self.sizes] or \
                any(m.dim() != rows + 1 for m in vectors):
            raise ValueError(f"masks must be one vector per layer of sizes {self.sizes}, got "
                             f"{[tuple(m.shape) for m in vectors]}")
        w, b, keys = self.query.weight, self.query.bias, self.keys
        if not train:
            w, b, keys = w.detach(), b.detach(), keys.detach()
        out = _GateFunction.apply(q_in, w, b, keys, self.score_pad,
                                  self.expand_padded, self.units_module_padded, self.sizes, self.k_max,
                                  self.rank_on, self.pools, self.tau, self._gumbel(q_in), hat, *vectors)
        if hat is not None:
            *out, masks.capacity = out
        return list(out)

    def _gumbel(self, q_in: Tensor) -> Tensor | None:
        """Gumbel noise (L x B x M_max) while training with the Gumbel estimator, else None."""
        if not (self.training and self.estimator == "gumbel"):
            return None
        u = torch.rand(self.n_layers, q_in.shape[0], self.keys.shape[1], device=q_in.device)
        return -torch.log(-torch.log(u.clamp_(1e-9, 1 - 1e-9)))


def _repad_after_load(gate: ModuleGate, incompatible_keys) -> None:
    gate._pad_layers()  # the padded buffers derive from the loaded assignments


def _stack_padded(vectors: Sequence[Tensor], width: int) -> Tensor:
    """Layers' (... x units_l) tensors as one (L x ... x width) tensor, zero-padded (a stack when all layers
    are as wide)."""
    if all(v.shape[-1] == width for v in vectors):
        return torch.stack(list(vectors))
    out = vectors[0].new_zeros(len(vectors), *vectors[0].shape[:-1], width)
    for i, v in enumerate(vectors):
        out[i, ..., :v.shape[-1]] = v
    return out


def _unstack_padded(stacked: Tensor, sizes: Sequence[int]) -> list[Tensor]:
    """The inverse of ``_stack_padded``: layer l's (... x units_l) slice of a (L x ... x width) tensor."""
    if len(sizes) * stacked.shape[-1] == sum(sizes):  # every layer as wide as the stack
        return list(stacked.unbind(0))
    return [stacked[i, ..., :sz] for i, sz in enumerate(sizes)]


def _hard_choice(scores: Tensor, k_max: int, rank_on: Tensor | None, pools, modules_first: bool) -> Tensor:
    """The 0/1 module choice: the top-k_l modules of each layer (ranks switched on by ``rank_on``), or, given
    ``pools`` ((pad, rank_on, k) per pool: -inf outside the pool), the top-k of each pool. ``scores`` is
    L x M x B (``modules_first``) or B x L x M."""
    dim = 1 if modules_first else -1
    if pools is None:
        top = scores.topk(k_max, dim=dim).indices
        if rank_on is None:
            on = 1.0
        else:
            on = (rank_on.unsqueeze(-1) if modules_first else rank_on).to(scores.dtype).expand(top.shape)
        return torch.zeros_like(scores).scatter_(dim, top, on)
    hard = torch.zeros_like(scores)
    for pad, rank, k in pools:
        top = (scores + (pad.unsqueeze(-1) if modules_first else pad)).topk(k, dim=dim).indices
        on = (rank.unsqueeze(-1) if modules_first else rank).to(scores.dtype).expand(top.shape)
        hard = hard + torch.zeros_like(scores).scatter_(dim, top, on)
    return hard


class _GateFunction(torch.autograd.Function):
    """Scores, top-k, expansion to units and product with each layer's mask (optionally HAT's training masks
    computed from their embedding rows), with the straight-through gradient d(value)/d(scores) := softmax
    Jacobian / tau and HAT's compensated embedding gradient written out.

    Layer l's scores are K_l (W_l x + b_l) / sqrt(d): linear in x, so the keys and the query map are
    multiplied first (K_l W_l, M x D per layer, a product independent of the batch) and the batch goes
    through one product to the L * M scores. The layers are padded to the widest and stacked, so that
    every step below is one batched op whatever the depth; the mask is folded into the (modules x units)
    expansion, so each layer's output is a product of inner size M. On small networks the number of ops,
    not their arithmetic, is what a training step pays. Runs in float32 (under autocast too): the gate is
    small and its top-k must not flip on rounding."""

    @staticmethod
    def forward(ctx, q_in, w, b, keys, pad, expand, units_module, sizes, k_max, rank_on, pools, tau, noise, hat,
                *vectors):
        args = (ctx, q_in, w, b, keys, pad, expand, units_module, sizes, k_max, rank_on, pools, tau, noise, hat,
                vectors)
        if torch.is_autocast_enabled(q_in.device.type):
            with torch.autocast(q_in.device.type, enabled=False):
                return _GateFunction._forward(*args)
        return _GateFunction._forward(*args)

    @staticmethod
    def _forward(ctx, q_in, w, b, keys, pad, expand, units_module, sizes, k_max, rank_on, pools, tau, noise, hat,
                 vectors):
        # Layout: scores and module gates are L x M x B (modules before the batch): the softmax over the
        # modules then runs along an inner dimension, ~7x faster than over a last dimension of 4 modules,
        # and every product below takes its operands as they are.
        x = q_in if q_in.dtype == torch.float32 else q_in.float()
        (n, D), (L, M, d), width = x.shape, keys.shape, expand.shape[-1]
        ctx.vector_dtypes = [v.dtype for v in vectors]
        ctx.task, ctx.shapes = (hat[4], [t.shape for t in vectors]) if hat is not None else (None, None)
        vectors = task_rows(vectors, ctx.task)  # HAT training: the task's rows of the embedding tables
        v = _stack_padded([t if t.dtype == torch.float32 else t.float() for t in vectors], width)  # L x width
        if hat is not None:  # v holds the embedding rows: the masks and their compensation factor from them
            s, smax, thres_cosh, free, _ = hat
            free = free if free.dtype == torch.float32 else free.float()
            free = free.view(L, width) if width * L == free.numel() else _stack_padded(free.split(sizes), width)
            v, factor = compensated_sigmoid(v, s, smax, thres_cosh)
            capacity = torch.dot(v.view(-1), free.view(-1))  # padding: sigmoid(0) * 0
        masked = expand * v.unsqueeze(1)  # L x M x width; padding columns are 0
        w_l = w.view(L, d, D)
        kw = torch.bmm(keys, w_l).view(L * M, D)  # K_l W_l
        kb = torch.baddbmm(pad.unsqueeze(-1), keys, b.view(L, d, 1)).view(L * M, 1)  # K_l b_l; -inf: no module
        r = d ** -0.5
        scores = torch.addmm(kb, kw, x.t(), beta=r, alpha=r).view(L, M, n)
        if noise is not None:
            scores = scores + noise.transpose(1, 2)
        hard = _hard_choice(scores, k_max, rank_on, pools, modules_first=True)  # L x M x B
        units = torch.bmm(hard.transpose(1, 2), masked)  # L x B x width
        outs = tuple(_unstack_padded(units, sizes))
        ctx.hat = hat is not None
        ctx.save_for_backward(x, w_l, b, keys, kw, scores, hard, masked, units_module,
                              *((factor, free) if ctx.hat else ()))
        ctx.sizes, ctx.tau, ctx.in_dtype = sizes, tau, q_in.dtype
        return (*outs, capacity) if ctx.hat else outs

    @staticmethod
    def backward(ctx, *grads):
        x, w_l, b, keys, kw, scores, hard, masked, units_module, *hat = ctx.saved_tensors
        sizes = ctx.sizes
        (n, D), (L, M, d), width = x.shape, keys.shape, masked.shape[-1]
        G = _stack_padded([hard.new_zeros(n, sz) if g is None else g if g.dtype == torch.float32 else g.float()
                           for g, sz in zip(grads, sizes)],
                          width)  # L x B x width
        # d out[b, j] / d mask[j] = hard[module(j), b]: (hard G) read at each unit's module
        g_v = torch.bmm(hard, G).gather(1, units_module).view(L, width)
        if ctx.hat:
            factor, free = hat
            g_cap = grads[L]
            if g_cap is not None:  # g_v is the gather's own tensor: updated in place
                g_v.addcmul_(free, g_cap)
            g_v.mul_(factor)  # compensated embedding gradient
        g_vectors = rows_into_tables([g if g.dtype == dt else g.to(dt)
                                      for g, dt in zip(_unstack_padded(g_v, sizes), ctx.vector_dtypes)],
                                     ctx.shapes, ctx.task)
        needs = ctx.needs_input_grad
        if not any(needs[:4]):  # a settled gate on an input without gradient: no straight-through branch
            return (None, None, None, None, *([None] * 10), *g_vectors)
        g_mod = torch.bmm(masked, G.transpose(1, 2))  # L x M x B: d out / d module gate = its masked units
        tau = ctx.tau
        soft = torch.softmax(scores if tau == 1.0 else scores / tau, dim=1)
        # soft * (g_mod - sum_m soft g_mod): the softmax's own backward kernel, one op where written out it is four
        g_s = torch._softmax_backward_data(g_mod, soft, 1, soft.dtype)
        g_s = g_s.mul_(d ** -0.5 / tau).view(L * M, n)  # d loss / d (K_l (W_l x + b_l)), per score
        g_w = g_b = g_keys = None
        if any(needs[1:4]):
            g_kw = (g_s @ x).view(L, M, D)
            g_kb = g_s.sum(1).view(L, M, 1)
            keys_t = keys.transpose(1, 2)
            g_w = torch.bmm(keys_t, g_kw).view(L * d, D) if needs[1] else None
            g_b = torch.bmm(keys_t, g_kb).view(L * d) if needs[2] else None
            g_keys = torch.baddbmm(torch.bmm(g_kb, b.view(L, 1, d)), g_kw, w_l.transpose(1, 2)) if needs[3] else None
        g_x = (g_s.t() @ kw).to(ctx.in_dtype) if needs[0] else None
        return (g_x, g_w, g_b, g_keys, *([None] * 10), *g_vectors)


class ModularGating(nn.Module):
    """The gates of every task of a ``HATNet`` (one ``ModuleGate`` per task over all its masked layers);
    called as ``net.gate(x, task, masks)``.

    Each task gets its own gates, created when the task starts from a fresh clustering of the units (the
    modules are re-clustered between experiences); a finished task's gates and unit assignment stay as they
    were, so what HAT protects for it is not moved by later tasks.
    """

    def __init__(self, query_dim: int, key_dim: int = 16, k: int = 1, tau: float = 1.0, estimator: str = "st",
                 cluster: dict | None = None, profile_samples: int = 256, persistent: bool = True,
                 k_share: float = 0.75):
        super().__init__()
        self.persistent, self.k_share = persistent, k_share
        self.query_dim, self.key_dim, self.k, self.tau, self.estimator = query_dim, key_dim, k, tau, estimator
        self.cluster = dict(cluster or {})
        self.profile_samples = profile_samples
        self.gates = nn.ModuleDict()

    def has_task(self, task: int) -> bool:
        return f"t{task}" in self.gates

    def task_gate(self, task: int) -> ModuleGate | None:
        return self.gates[f"t{task}"] if self.has_task(task) else None

    def add_task(self, net, task: int, x: Tensor) -> None:
        """Create task ``task``'s gate from its units' responses to ``x``.

        ``persistent`` (default): the modules of the latest earlier gate stay, with their keys (copied and
        frozen: ``key_frozen``), restricted to the units earlier tasks claimed (cumulative HAT mask >= 0.5;
        HAT keeps their weights safe); SynC groups the remaining, free units into new modules (one or more:
        SynC may find them one group). The task's
        query scores old and new modules, so it can switch earlier modules on. Each module has a global id
        per layer (``module_ids_<l>``), kept by every gate that holds it; ``module_method_<l>`` says how each
        was made (0 SynC, 1 k-means fallback). Without ``persistent`` (or for the first task) every unit is
        clustered afresh. Earlier gates are never changed."""
        ones = [torch.ones(layer.n_units, device=x.device) for layer in net.masked]
        with torch.no_grad():
            profiles = net.unit_activations(x, ones, task)
        prev = self._latest_gate(task)
        profiles_t = [acts.T.contiguous() for acts in profiles]
        if prev is None or not self.persistent:
            clustered = cluster_layers(profiles_t, **self.cluster, with_method=True)
            assignments = [a for a, *_ in clustered]
            inherited = [torch.zeros(0, dtype=torch.long, device=x.device) for _ in clustered]
            old_ids = [torch.zeros(0, dtype=torch.long, device=x.device) for _ in clustered]
            old_methods = [torch.zeros(0, dtype=torch.long, device=x.device) for _ in clustered]
            # fresh modules get fresh global ids (re-clustered modules are not the earlier tasks' modules)
            next_ids = [max([int(g.module_ids(i).max()) + 1 for g in self.gates.values()] or [0])
                        for i in range(len(clustered))]
        else:
            claimed = [m.to(x.device) >= 0.5 for m in net.cumulative_masks()]
            # the free units may form one module (the inherited ones already give the gate a choice)
            clustered = cluster_layers(profiles_t, **{**self.cluster, "min_modules": 1}, with_method=True,
                                       select=[~c for c in claimed])
            assignments, inherited, old_ids, old_methods, next_ids = [], [], [], [], []
            for i, (labels, _, method, _) in enumerate(clustered):
                a_prev = prev.assignment(i).to(x.device)
                ids_prev = prev.module_ids(i).to(x.device)
                kept = [m for m in range(prev.n_modules[i]) if bool(((a_prev == m) & claimed[i]).any())]
                a = torch.full_like(a_prev, -1)
                for new_id, m in enumerate(kept):
                    a[(a_prev == m) & claimed[i]] = new_id
                free = ~claimed[i]
                if int(free.sum()):
                    a[free] = len(kept) + labels
                assignments.append(a)
                inherited.append(torch.tensor(kept, dtype=torch.long, device=x.device))
                old_ids.append(ids_prev[kept])
                old_methods.append(prev.module_methods(i).to(x.device)[kept])
                next_ids.append(int(max(int(g.module_ids(i).max()) for g in self.gates.values())) + 1)
        gate = self._new_gate(assignments, x.device, [len(i) for i in inherited])
        gate.init_keys_from_responses(x.flatten(1), profiles)
        frozen = torch.zeros(gate.keys.shape[:2] + (1,), device=x.device)
        for i, (a, (_, semantic, method, outliers)) in enumerate(zip(assignments, clustered)):
            n_old, n_mod = len(inherited[i]), gate.n_modules[i]
            code = MODULE_METHODS.index(method)
            ids = torch.cat([old_ids[i], torch.arange(next_ids[i], next_ids[i] + n_mod - n_old, device=x.device)])
            methods = torch.cat([old_methods[i], torch.full((n_mod - n_old,), code, device=x.device)])
            # kept with the gate (saved in its state dict) for module maps, explanations and the results' record
            gate.register_buffer(f"semantic_{i}", semantic)
            gate.register_buffer(f"kmeans_fallback_{i}", torch.tensor(bool((methods == 1).any())))
            gate.register_buffer(f"outliers_{i}", torch.tensor(outliers))
            gate.register_buffer(f"module_ids_{i}", ids.long())
            gate.register_buffer(f"module_method_{i}", methods.long())
            if n_old:
                with torch.no_grad():
                    gate.keys[i, :n_old] = prev.keys[i, inherited[i]].to(x.device)
                frozen[i, :n_old] = 1
        gate.register_buffer("key_frozen", frozen)
        if prev is not None and self.persistent:
            gate.fit_query_to_keys(x.flatten(1), profiles)
        self.gates[f"t{task}"] = gate

    def _latest_gate(self, task: int) -> ModuleGate | None:
        earlier = [int(k[1:]) for k in self.gates.keys() if int(k[1:]) < task]
        return self.gates[f"t{max(earlier)}"] if earlier else None

    @torch.no_grad()
    def record_usage(self, net, task: int, x: Tensor) -> None:
        """After task ``task`` is trained: per module, the share of ``x`` (the task's inputs) that switch it
        on, and how many of its units the task's mask keeps (>= 0.5 at s = smax); kept as the gate's
        ``usage_<l>`` and ``kept_<l>`` buffers (the results' record of which tasks use which module)."""
        gate = self.task_gate(task)
        if gate is None:
            return
        was = gate.training
        gate.eval()
        on = gate.module_gates(x.flatten(1)).mean(0)  # L x M_max
        gate.train(was)
        for i, m in enumerate(net.masks(task)):
            onehot = F.one_hot(gate.assignment(i), gate.n_modules[i]).to(m.dtype)
            gate.register_buffer(f"usage_{i}", on[i, :gate.n_modules[i]].detach().clone())
            gate.register_buffer(f"kept_{i}", ((m >= 0.5).to(m.dtype) @ onehot).long())

    def _new_gate(self, assignments: Sequence[Tensor], device, n_inherited=None) -> ModuleGate:
        return ModuleGate(assignments, self.query_dim, self.key_dim, self.k, self.tau, self.estimator,
                          self.k_share, n_inherited).to(device)

    def rebuild_from_state(self, state: dict, prefix: str, device=None) -> None:
        """Re-create the gates a saved state dict holds (``prefix``: this module's key prefix, e.g. "gate."):
        each task's gate from its saved unit assignments, on ``device``, so that ``load_state_dict`` then fills
        them."""
        tasks = sorted({key[len(prefix) + len("gates."):].split(".")[0] for key in state
                        if key.startswith(prefix + "gates.")})
        for name in tasks:
            head = f"{prefix}gates.{name}."
            n_layers = len([k for k in state if k.startswith(head + "assignment_")])
            frozen = state.get(f"{head}key_frozen")  # the inherited modules come first, their keys frozen
            inherited = None if frozen is None else frozen.flatten(1).sum(1).long().tolist()
            gate = self._new_gate([state[f"{head}assignment_{i}"] for i in range(n_layers)], device or "cpu",
                                  inherited)
            for i in range(n_layers):
                for extra in ("semantic", "kmeans_fallback", "outliers", "module_ids", "module_method", "usage",
                              "kept"):
                    if f"{head}{extra}_{i}" in state:
                        gate.register_buffer(f"{extra}_{i}", state[f"{head}{extra}_{i}"].to(device or "cpu"))
            if f"{head}key_frozen" in state:
                gate.register_buffer("key_frozen", state[f"{head}key_frozen"].to(device or "cpu"))
            self.gates[name] = gate

    def forward(self, x: Tensor, task: int, masks: list[Tensor] | TrainingMasks, train: bool = True) -> list[Tensor]:
        gate = self.task_gate(task)
        if gate is None:
            return masks.compute() if isinstance(masks, TrainingMasks) else masks
        return gate(x if x.dim() == 2 else x.flatten(1), masks, train=train)


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
