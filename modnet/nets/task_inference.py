"""Class-incremental task prediction (issue 12): which task's masked sub-network should answer an input
that comes without a task label. Two predictors, beside the input-space LDA keys of
``modnet.nets.modules.TaskKeys``:

* ``ClassGaussians``: one Gaussian per (task, class) with its own covariance in the query space (quadratic
  discriminant analysis), from running sums (no sample is kept).
* ``TaskOOD``: from the network itself, a per-task out-of-distribution (OOD) head on distribution-shifting
  transforms, inside HAT's masked sub-networks.
* ``TaskFeatureGaussians``: from the network itself, per task Gaussians over a masked layer's units under the
  task's mask, plus (Expert Gate) a per-task decoder from those units back to the input; both scores
  standardised on the task's own training data.

``ClassGaussians``
------------------
Class c (a (task, class) slot) keeps n_c, mu_c and the packed covariance of its queries q(x) (the
flattened input), merged batch by batch (Chan et al.); Sigma_c = sum (x - mu_c)(x - mu_c)' / (n_c - 1),
shrunk towards a scaled identity (Ledoit-Wolf-style target): Sigma_c <- (1 - lambda) Sigma_c + lambda tr(Sigma_c)/d I. The task score is the
log-likelihood pooled over the task's classes, log p(x | t) = logsumexp_c log N(q(x); mu_c, Sigma_c), and
p(t | x) its softmax over the trained tasks (equal task priors). The LDA keys share one pooled covariance
over all classes of all tasks: a linear boundary, which MNIST-1D is built to defeat (Greydanus 2020); a
covariance per class gives quadratic boundaries. Storage: 1 + d + d (d + 1) / 2 float32 per class (count,
mean, packed covariance; MNIST-1D, d = 40: 861 floats, 3,444 bytes per class, 34,440 for 10 classes, the size
of 195 stored samples of 176 bytes).

``TaskOOD``
-----------

CSI (Tack et al., NeurIPS 2020) trains a classifier on (class, transform) pairs: every input x of a task with
n classes and its K - 1 transformed copies T_k(x) (rotations for images) are labelled y + n k, so the head has
n K outputs. A transformed copy is a sample of a shifted distribution; the features learn what the task's own
data look like, and the head's confidence on an input of another task is low. CLOM (Kim et al., 2022,
k-gyuhak/CLOM) puts one such head per task behind HAT's task masks: task t's features and its head are frozen
once t is trained, so its OOD score never drifts; class-incremental prediction then is within-task prediction
x task prediction (Kim et al., NeurIPS 2022).

Here each task t owns a joint head h_t (features of t's masked sub-network -> n_t K logits) next to its
classification head. Training task t adds weight * CE(h_t(f_t(T_k x)), y + n_t k) over all k (k = 0 the
identity) to the loss (``strategies.plugins.ood.TaskOODPlugin``). Where the heads only train (they pick no
task), the batch can carry them without growing: ``copies=replace`` puts T_{i mod K}(x_i) in row i, the joint
head reads every row and the task's classification head the identity rows (i mod K = 0) only. At test time the transforms are ensembled
(CSI's "ensemble" score):

    g_t(x)[c] = 1/K sum_k h_t(f_t(T_k x))[c + n_t k]          (B x n_t)
    s_t(x)    = max_c g_t(x)[c]    (score=maxlogit)   or   logsumexp_c g_t(x)[c]   (score=energy)

and optionally (``calibrate``), since tasks' scores live on different scales, calibrated with two floats per
task measured on the task's own training data once it is trained (no sample is kept): z_t(x) = (s_t(x) -
mean_t) / std_t. On MNIST-1D the raw score picks the task better (0.402 vs 0.346, seed 0), so calibration is
off by default; the two floats are recorded either way. The task is argmax_t z_t(x) (or s_t(x)); its classes are scored by its classification head (classify=head) or by g_t (classify=joint).

Transforms (``TRANSFORMS``; identity is always k = 0): ``reverse`` (time reversal of a vector; a 180 degree
rotation of an image), ``negate`` (sign flip), ``reverse_negate``, ``rot90`` / ``rot180`` / ``rot270`` (images;
a vector of square length is read as a square image), ``shift`` (circular shift by half the length),
``permute`` (a fixed random permutation of the flattened input).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from modnet.methods.novelty import shrunk

SCORES = ("maxlogit", "energy", "transform")
CLASSIFY = ("head", "joint")
LABELS = ("joint", "extra")
# the training loss: every transformed copy of each input beside it (all), one copy (i mod K) beside it (one),
# or input i as T_{i mod K}(x_i) in its own row (replace: the batch keeps its B rows)
COPIES = ("all", "one", "replace")


def _square(x: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """x as (B, C, H, W) and the map back to x's shape (vectors of square length become 1 x n x n)."""
    if x.dim() == 4:
        return x, lambda y: y
    d = x[0].numel()
    n = math.isqrt(d)
    if n * n != d:
        raise ValueError(f"image transforms need images or vectors of square length, got shape {tuple(x.shape)}")
    shape = x.shape
    return x.reshape(x.shape[0], 1, n, n), lambda y: y.reshape(shape)


def _rot(k: int) -> Callable[[Tensor], Tensor]:
    def f(x: Tensor) -> Tensor:
        img, back = _square(x)
        return back(torch.rot90(img, k, dims=(2, 3)))
    return f


def _reverse(x: Tensor) -> Tensor:
    return x.flip(dims=(2, 3)) if x.dim() == 4 else x.flip(dims=(-1,))


def _shift(x: Tensor) -> Tensor:
    flat = x.flatten(1)
    return flat.roll(flat.shape[1] // 2, dims=1).reshape(x.shape)


def _permute(x: Tensor) -> Tensor:
    flat = x.flatten(1)
    g = torch.Generator().manual_seed(12)  # fixed: the same permutation in training and at test time
    perm = torch.randperm(flat.shape[1], generator=g).to(x.device)
    return flat[:, perm].reshape(x.shape)


TRANSFORMS: dict[str, Callable[[Tensor], Tensor]] = {
    "reverse": _reverse,
    "negate": lambda x: -x,
    "reverse_negate": lambda x: -_reverse(x),
    "rot90": _rot(1),
    "rot180": _rot(2),
    "rot270": _rot(3),
    "shift": _shift,
    "permute": _permute,
}


class TaskOOD(nn.Module):
    """Per-task joint (class x transform) heads and their calibration: p(task | x) from the network.

    ``task_sizes[t]``: classes of task t; ``feature_dim``: the width of the heads' input (the masked
    sub-network's output); ``transforms``: names in ``TRANSFORMS`` (identity is added as k = 0).
    The network passes itself to every call (``net.features`` of a task's masked sub-network): this module
    keeps only the heads and two floats per task.
    """

    def __init__(self, task_sizes: Sequence[int], feature_dim: int, transforms: Sequence[str] = ("reverse",),
                 score: str = "maxlogit", calibrate: bool = True, classify: str = "head", labels: str = "joint",
                 copies: str = "all", rows: float = 1.0):
        super().__init__()
        if copies not in COPIES:
            raise ValueError(f"copies must be one of {COPIES}, got {copies!r}")
        if not 0.0 < rows <= 1.0:
            raise ValueError(f"rows (the share of each batch in the heads' loss) must be in (0, 1], got {rows}")
        if copies == "replace" and rows < 1.0:
            raise ValueError(f"copies='replace' transforms the batch's own rows, every one of them enters the "
                             f"heads' loss: rows must be 1, got {rows} (rows < 1 takes copies 'one' or 'all')")
        self.copies, self.rows = copies, float(rows)
        unknown = [t for t in transforms if t not in TRANSFORMS]
        if unknown:
            raise ValueError(f"unknown transforms {unknown}; choose from {', '.join(TRANSFORMS)}")
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {score!r}")
        if classify not in CLASSIFY:
            raise ValueError(f"classify must be one of {CLASSIFY}, got {classify!r}")
        self.transforms = list(transforms)
        self.n_transforms = len(self.transforms) + 1
        self.task_sizes = [int(n) for n in task_sizes]
        self.score, self.calibrate_scores, self.classify = score, calibrate, classify
        if labels not in LABELS:
            raise ValueError(f"labels must be one of {LABELS}, got {labels!r}")
        self.labels = labels
        width = (lambda n: n * self.n_transforms) if labels == "joint" else (lambda n: n + 1)
        self.heads = nn.ModuleList(nn.Linear(feature_dim, width(n)) for n in self.task_sizes)
        # calibration of each task's score on its own training data: z = (s - mean) / std
        self._offsets: dict[tuple, Tensor] = {}  # _row_offsets' tensors
        self.register_buffer("score_mean", torch.zeros(len(self.task_sizes)))
        self.register_buffer("score_std", torch.ones(len(self.task_sizes)))

    def expand(self, x: Tensor) -> Tensor:
        """[x; T_1 x; ...; T_{K-1} x]: (K B, ...)."""
        return torch.cat([x] + [TRANSFORMS[name](x) for name in self.transforms])

    def joint_logits(self, net, x: Tensor, task: int, condition=None) -> Tensor:
        """h_t(f_t(x)): B x n_t K logits of (class, transform) pairs, label c + n_t k."""
        return self.heads[task](self._features(net, x, task, condition))

    def loss(self, net, x: Tensor, y_local: Tensor, task: int, condition=None, feature: Tensor | None = None,
             copy_features: Tensor | None = None) -> Tensor:
        """CE over (class, transform) labels of x and its transformed copies (CSI's joint labels).

        ``copies=all``: every input and its K - 1 copies (K B rows, CSI's batch); ``one``: input i as
        transform k_i = i mod K, B rows, a K-th of the cost (the loader's per-epoch shuffle varies k_i); the
        rows are taken grouped by transform (inputs 0, K, 2K, ..., then T_1 of inputs 1, K + 1, ..., and so
        on: strided slices, no gather), which the mean cross-entropy does not see. ``replace``: ``x`` is
        already the batch of ``replace_rows`` (row i holds T_{i mod K}(x_i)), every row enters with the
        label y_i + n_t (i mod K); no row is added.
        ``rows`` < 1: only the batch's first ceil(rows B) inputs enter the loss (the loader shuffles every
        epoch, so each input takes part in a ``rows`` share of the steps): the same expected loss at a
        ``rows`` share of the copies' cost.
        ``feature``: the heads' input f_t(x) of the untransformed batch from the training forward of the same
        step (same masks and slope); then only the transformed rows (``copies_of(x)``) go through the
        network, or none when ``copy_features`` (f_t of those rows, computed in the training forward's own
        pass: ``Condition.extra``) is given too. All give the same loss up to float rounding."""
        m = self.loss_rows(x.shape[0])
        if m < x.shape[0]:  # (a slice of every row is no copy, but its backward zero-fills and copies the gradient)
            x, y_local = x[:m], y_local[:m]
            feature = None if feature is None else feature[:m]
        if feature is None:
            if self.copies == "one":
                x = torch.cat([x[::self.n_transforms], *self._one_copy(x)])
            elif self.copies == "all":
                x = self.expand(x)  # (replace: the batch's rows are the loss's rows)
            return F.cross_entropy(self.joint_logits(net, x, task, condition).float(),
                                   self._labels(y_local, self.task_sizes[task]))
        if copy_features is None:
            copies = self.copies_of(x)
            copy_features = None if copies is None else self._features(net, copies, task, condition)
        return self.loss_from_features(feature, copy_features, y_local, task)

    def loss_rows(self, batch: int) -> int:
        """How many of a batch's first inputs enter the loss: ceil(rows * batch), at least one."""
        return batch if self.rows >= 1.0 else max(1, math.ceil(self.rows * batch))

    def copies_of(self, x: Tensor) -> Tensor | None:
        """The transformed rows the loss needs for inputs ``x`` (already cut to ``loss_rows``): ``one``,
        T_k(x_i) for the rows with k = i mod K != 0, grouped by k ([T_1 x[1::K]; T_2 x[2::K]; ...]); ``all``,
        [T_1 x; ...; T_{K-1} x]; None without transforms or with ``replace`` (no row is added)."""
        if not self.transforms or self.copies == "replace":
            return None
        if self.copies == "one":
            parts = self._one_copy(x)
            return torch.cat(parts) if parts else x[:0]  # a batch of one input has no copy
        return torch.cat([TRANSFORMS[name](x) for name in self.transforms])

    def replace_rows(self, x: Tensor) -> Tensor:
        """``copies=replace``: the batch with row i as T_{i mod K}(x_i) (a new tensor; the rows with
        i mod K = 0, ``identity_rows``, stay as they are). Strided slices: no gather, no host read."""
        k_all = self.n_transforms
        out = x.clone()
        # a comparison, not a slice at x.shape[0]: in a compiled graph (symbolic batch size) the slice would make
        # the batch size a constant, each batch size a graph
        names = self.transforms if x.shape[0] >= k_all else self.transforms[:x.shape[0] - 1]
        for k, name in enumerate(names, 1):
            out[k::k_all] = TRANSFORMS[name](x[k::k_all])
        return out

    @property
    def identity_rows(self) -> slice:
        """The rows of a ``replace_rows`` batch that hold their input untransformed: i mod K = 0."""
        return slice(None, None, self.n_transforms)

    def _labels(self, y_local: Tensor, task_n: int) -> Tensor:
        """The joint labels of the loss's rows: c + n_t k (``labels=joint``), or n_t for every transformed
        row (``extra``); ``one``: input i as transform i mod K, in ``copies_of``'s order (grouped by k);
        ``replace``: row i as transform i mod K, in the batch's order."""
        b = y_local.shape[0]
        if self.copies == "replace":
            if self.labels == "extra":
                return torch.where(self._row_offsets(b, 1, y_local.device) == 0, y_local, task_n)
            return y_local + self._row_offsets(b, task_n, y_local.device)
        if self.copies == "one":
            k_all = self.n_transforms
            if self.labels == "extra":
                return torch.cat([y_local[::k_all], y_local.new_full((b - (b + k_all - 1) // k_all,), task_n)])
            return torch.cat([y_local[::k_all]] + [y_local[k::k_all] + task_n * k for k in range(1, min(k_all, b))])
        if self.labels == "extra":  # every transformed copy is class n ("not this task")
            return torch.cat([y_local] + [torch.full_like(y_local, task_n)] * (self.n_transforms - 1))
        return torch.cat([y_local + task_n * k for k in range(self.n_transforms)])

    def _row_offsets(self, b: int, task_n: int, device) -> Tensor:
        """task_n * (i mod K) for the rows i < b of a ``replace_rows`` batch: made once per batch size and task
        width (a training run sees two batch sizes), kept beside the module, not in its state."""
        if torch.compiler.is_compiling():  # a compiled loss computes them in its graph (a cache would guard on b)
            return (torch.arange(b, device=device) % self.n_transforms) * task_n
        key = (b, task_n, device)
        out = self._offsets.get(key)
        if out is None:
            out = self._offsets[key] = (torch.arange(b, device=device) % self.n_transforms) * task_n
        return out

    def loss_from_features(self, feature: Tensor, copy_features: Tensor | None, y_local: Tensor,
                           task: int) -> Tensor:
        """The loss from the heads' inputs: ``feature`` of the untransformed inputs (B' rows) and
        ``copy_features`` of ``copies_of`` them."""
        labels = self._labels(y_local, self.task_sizes[task])
        if copy_features is None:  # replace (every row in ``feature``), or no transforms
            joint = feature
        elif self.copies == "one":
            joint = torch.cat([feature[::self.n_transforms], copy_features.to(feature.dtype)])
        else:
            joint = torch.cat([feature, copy_features.to(feature.dtype)])
        head = self.heads[task]
        # the loss runs after the forward, outside bf16 autocast: features from it are cast to the head's dtype
        return F.cross_entropy(head(joint.to(head.weight.dtype)).float(), labels)

    def _one_copy(self, x: Tensor) -> list[Tensor]:
        """[T_1(x[1::K]), T_2(x[2::K]), ...]: each input i with k = i mod K != 0 under its transform, grouped
        by k (strided slices: no gather, no host sync); a last batch smaller than K has fewer transforms."""
        k_all = self.n_transforms
        return [TRANSFORMS[name](x[k::k_all]) for k, name in enumerate(self.transforms[:x.shape[0] - 1], 1)]

    @staticmethod
    def _features(net, x: Tensor, task: int, condition=None) -> Tensor:
        """f_t(x): the heads' input on task t's masked sub-network."""
        return net.masked_pass(x, task, condition, record=False)[1]

    def blocks(self, net, x: Tensor, task: int, condition=None) -> Tensor:
        """h_t(f_t(T_k x)) for every k: K x B x K x n_t (transform applied, joint block); labels=extra:
        1 x B x 1 x (n_t + 1), the untransformed input only."""
        n, b, k = self.task_sizes[task], x.shape[0], self.n_transforms
        if self.labels == "extra":
            return self.joint_logits(net, x, task, condition).float().reshape(1, b, 1, n + 1)
        return self.joint_logits(net, self.expand(x), task, condition).float().reshape(k, b, k, n)

    def ensemble(self, net, x: Tensor, task: int, condition=None) -> Tensor:
        """g_t(x) = 1/K sum_k h_t(f_t(T_k x))[., block k]: B x n_t."""
        return self._ensemble(self.blocks(net, x, task, condition))

    def _ensemble(self, out: Tensor) -> Tensor:
        if self.labels == "extra":  # log p(c, in | x): the classes' log-probabilities, the extra class left out
            return torch.log_softmax(out[0, :, 0], 1)[:, :-1]
        k = self.n_transforms
        return out[torch.arange(k), :, torch.arange(k)].mean(0)

    def raw_score(self, out: Tensor) -> Tensor:
        """A task's score from its joint logits ``out`` (K x B x K x n_t, ``blocks``)."""
        if self.labels == "extra":
            # log p(in | x) = logsumexp_c log p(c | x) over the task's classes
            return self._ensemble(out).logsumexp(1) if self.score != "maxlogit" else self._ensemble(out).max(1).values
        if self.score == "transform":
            # sum_k log p(transform k | T_k x) (self-supervised OOD: Golan & El-Yaniv 2018, Hendrycks et al. 2019)
            k = self.n_transforms
            logp = torch.log_softmax(out.flatten(2), 2).reshape(out.shape).logsumexp(3)  # K x B x K
            return logp[torch.arange(k), :, torch.arange(k)].mean(0)
        g = self._ensemble(out)
        return g.max(1).values if self.score == "maxlogit" else torch.logsumexp(g, 1)

    @torch.no_grad()
    def calibrate(self, net, x: Tensor, task: int, batch_size: int = 512) -> None:
        """mean_t, std_t of task t's score on its own (training) data x."""
        s = torch.cat([self.raw_score(self.blocks(net, x[i:i + batch_size], task))
                       for i in range(0, x.shape[0], batch_size)])
        self.score_mean[task] = s.mean()
        self.score_std[task] = s.std().clamp_min(1e-6) if s.numel() > 1 else 1.0

    def task_scores(self, net, x: Tensor, n_tasks: int, condition=None) -> tuple[Tensor, list[Tensor]]:
        """(z: B x n_tasks calibrated scores, the ensembled logits g_t of every task)."""
        outs = [self.blocks(net, x, t, condition) for t in range(n_tasks)]
        gs = [self._ensemble(o) for o in outs]
        s = torch.stack([self.raw_score(o) for o in outs], 1)
        if self.calibrate_scores:
            s = (s - self.score_mean[:n_tasks]) / self.score_std[:n_tasks]
        return s, gs


class ClassGaussians(nn.Module):
    """Per-(task, class) Gaussians with their own covariance in the query space (QDA), for picking the task
    without a label; the same interface as ``modnet.nets.modules.TaskKeys`` (``update``,
    ``task_log_posterior``), so a ``HATNet`` uses either as its ``task_keys``.

    Stored per class, float32: n_c, mu_c (d) and the upper triangle of the biased covariance
    P_c = 1/n_c sum (x - mu_c)(x - mu_c)' (d (d + 1) / 2), row-major (``torch.triu_indices``): 1 + d + d (d + 1)
    / 2 floats, a quarter of full float64 d x d sums. A batch b (n_b, mu_b, P_b computed in float64) merges
    as Chan et al. (1979): n = n_c + n_b, delta = mu_b - mu_c, mu = mu_c + delta n_b / n,
    n P = n_c P_c + n_b P_b + delta delta' n_c n_b / n, so any batching gives the same Gaussians (to float32
    rounding) and no raw scatter sum x x' (whose cancellation against n mu mu' would need float64) is kept.
    """

    def __init__(self, n_classes: int, query_dim: int, shrinkage: float = 0.05):
        super().__init__()
        if not 0.0 < shrinkage <= 1.0:
            raise ValueError(f"shrinkage must be in (0, 1] (it keeps every covariance invertible), got {shrinkage}")
        self.shrinkage = shrinkage
        self.query_dim = int(query_dim)
        n_packed = self.query_dim * (self.query_dim + 1) // 2
        self.register_buffer("counts", torch.zeros(n_classes))
        self.register_buffer("means", torch.zeros(n_classes, query_dim))
        self.register_buffer("packed_cov", torch.zeros(n_classes, n_packed))
        self._cache: tuple | None = None
        self._version = 0

    def _triu(self, device) -> tuple[Tensor, Tensor]:
        return tuple(torch.triu_indices(self.query_dim, self.query_dim, device=device))

    def _unpack(self, packed: Tensor) -> Tensor:
        """C x d(d+1)/2 upper triangles -> C x d x d symmetric matrices (float64)."""
        d = self.query_dim
        i, j = self._triu(packed.device)
        full = packed.new_zeros(packed.shape[0], d, d, dtype=torch.float64)
        full[:, i, j] = packed.double()
        full[:, j, i] = packed.double()
        return full

    @torch.no_grad()
    def update(self, q: Tensor, y: Tensor) -> None:
        q = q.flatten(1).double()
        d = self.query_dim
        i, j = self._triu(q.device)
        for c in y.unique().tolist():
            qc = q[y == c]
            n_b = float(qc.shape[0])
            mu_b = qc.mean(0)
            diff = qc - mu_b
            p_b = (diff.T @ diff) / n_b
            n_a = float(self.counts[c])
            mu_a = self.means[c].double()
            p_a = self._unpack(self.packed_cov[c:c + 1])[0]
            n = n_a + n_b
            delta = mu_b - mu_a
            mu = mu_a + delta * (n_b / n)
            p = (n_a * p_a + n_b * p_b + torch.outer(delta, delta) * (n_a * n_b / n)) / n
            self.counts[c] = n
            self.means[c] = mu.to(self.means.dtype)
            self.packed_cov[c] = p[i, j].to(self.packed_cov.dtype)
        self._cache = None
        self._version += 1

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._cache = None
        self._version += 1
        # checkpoints of the earlier layout (float64 running sums and full scatters): converted on load
        if prefix + "scatters" in state_dict and prefix + "packed_cov" not in state_dict:
            sums = state_dict.pop(prefix + "sums").double()
            scat = state_dict.pop(prefix + "scatters").double()
            n = state_dict[prefix + "counts"].double()
            mu = sums / n.clamp_min(1).unsqueeze(1)
            pop = scat / n.clamp_min(1).view(-1, 1, 1) - mu.unsqueeze(2) * mu.unsqueeze(1)
            i, j = self._triu(pop.device)
            state_dict[prefix + "counts"] = n.float()
            state_dict[prefix + "means"] = mu.float()
            state_dict[prefix + "packed_cov"] = pop[:, i, j].float()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def covariances(self) -> Tensor:
        """Sigma_c = n_c / (n_c - 1) P_c of every class, unshrunk: C x d x d, float64."""
        n = self.counts.double().view(-1, 1, 1)
        return self._unpack(self.packed_cov) * (n / (n - 1).clamp_min(1))

    def gaussians(self) -> tuple[Tensor, Tensor, Tensor]:
        """(mu: C x d, Cholesky factors L_c of the shrunk Sigma_c: C x d x d, seen: C) of the classes (float64):
        Sigma_c = n_c / (n_c - 1) P_c, shrunk towards tr(Sigma_c)/d I."""
        key = (self._version, self.means.device)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        seen = self.counts > 0
        if not seen.any():
            raise RuntimeError("ClassGaussians has no statistics yet: update() it with each trained experience")
        mu = self.means.double()
        cov = shrunk(self.covariances(), self.shrinkage)
        cov[~seen] = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
        out = (mu, torch.linalg.cholesky(cov), seen)
        self._cache = (key, out)
        return out

    def class_log_likelihood(self, q: Tensor) -> Tensor:
        """log N(q; mu_c, Sigma_c) for every class (B x C; -inf for classes without samples)."""
        mu, chol, seen = self.gaussians()
        q = q.flatten(1).double()
        diff = (q.unsqueeze(0) - mu.unsqueeze(1)).transpose(1, 2)  # C x d x B
        z = torch.linalg.solve_triangular(chol, diff, upper=False)
        logdet = torch.log(torch.diagonal(chol, dim1=1, dim2=2)).sum(1)  # 1/2 log det Sigma_c
        d = mu.shape[1]
        ll = -0.5 * (z ** 2).sum(1) - logdet.unsqueeze(1) - 0.5 * d * math.log(2 * math.pi)  # C x B
        ll[~seen] = -torch.inf
        return ll.T

    def task_log_posterior(self, q: Tensor, task_classes: Sequence[Tensor]) -> Tensor:
        """log p(task | x) over the given tasks (B x T): the classes' likelihoods pooled per task."""
        ll = self.class_log_likelihood(q)
        per_task = torch.stack([torch.logsumexp(ll[:, idx], dim=1) for idx in task_classes], dim=1)
        return F.log_softmax(per_task, dim=1).to(q.dtype)


STORED_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _stored(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t in the storage dtype, or in float32 where that dtype would overflow it (float16 beyond 65504)."""
    low = t.to(dtype)
    return low if bool(torch.isfinite(low).all()) else t.float()


class TaskFeatureGaussians(nn.Module):
    """From the network itself: per task t, one Gaussian per class of t over h_t(x), the output of masked layer
    ``layer`` on t's path (HAT keeps those units from drifting once t is trained), with its own shrunk
    covariance (``ClassGaussians``, packed float32):

        s_t(x) = logsumexp_{c in t} log N(h_t(x); mu_tc, Sigma_tc)
        z_t(x) = (s_t(x) - mean_t) / std_t        mean_t, std_t: of s_t on t's own training data

    The task is argmax_t z_t(x). Each task's features live in a space of their own (other units, other
    dimension), so raw likelihoods do not compare; the standardisation puts every task's score in units of
    its own training spread. Units off for a task (mask 0) are 0 on every input and carry no evidence: each
    task keeps its Gaussians only over the units active on its training data (``units_t``; the marginals of
    the full-width ones), so what is stored is what is used.

    ``gates``: h_t(x) under t's HAT mask and the module gates of input x (``HATNet.task_units``), or, with
    ``gates=False``, under t's HAT mask alone (every unit of t's mask on, whatever the gates pick for x). The
    gates switch modules per input, so an input of another task turns a different subset of t's units off, and
    zeroed units are what a Gaussian models worst; without them h_t(x) = relu(W x + b) * a_t on the first layer.
    Split-MNIST-1D class-incremental, gauss-trained networks, seeds 0-2, layer 0 (task prediction,
    scripts/cil_candidates_probe.py): gated, shrinkage 0.003: 0.531 / 0.497 / 0.459; ungated, 0.01: 0.597 /
    0.524 / 0.557 (input-space QDA: 0.618 / 0.608 / 0.587).

    ``decoder_weight`` > 0 adds Expert Gate's reconstruction score (Aljundi, Chakravarty & Tuytelaars, CVPR
    2017: one autoencoder per task, the task of the lowest reconstruction error) inside the network: a ridge
    decoder per task from h_t(x) back to the flattened input, fitted in closed form on t's training data,

        W_t = argmin_W ||(X - mu_x) - (H_t - mu_h) W||^2 + ridge n ||W||^2,   r_t(x) = ||x - mu_x - (h_t(x) - mu_h) W_t||^2

    standardised as s_t (its own training mean and std, sign flipped so that higher is more in-task) and
    added: z_t(x) += decoder_weight (-(r_t(x) - mean^r_t) / std^r_t). Seeds 0-2 as above, ungated, weight 0.3:
    0.628 / 0.539 / 0.586. Stored per task: its classes' Gaussians over its a_t units (1 + a + a (a + 1) / 2
    float32 per class), the unit indices, two floats, and with the decoder a_t x d + a_t + d + 2 floats;
    ``covariance="tied"`` keeps one covariance per task, pooled over its classes (within-task LDA, as Lee et
    al.'s 2018 Mahalanobis OOD detector): 1 / n_t of the covariance bytes. ``dtype`` float16 (or bfloat16) halves the means, covariances and decoder (the scores are computed in
    float64 from them; a tensor float16 would overflow stays float32). MNIST-1D seeds 0-2, ungated with the
    decoder: task prediction float32 0.628 / 0.539 / 0.587, float16 0.629 / 0.538 / 0.586, bfloat16 0.629 /
    0.536 / 0.585.
    """

    def __init__(self, task_sizes: Sequence[int], width: int, layer: int = 0, shrinkage: float = 0.1,
                 gates: bool = True, decoder_weight: float = 0.0, decoder_ridge: float = 1e-3,
                 dtype: str = "float32", extra_layers: Sequence[tuple[int, int, float]] = (), ood_weight: float = 0.0,
                 covariance: str = "class"):
        super().__init__()
        if covariance not in ("class", "tied"):
            raise ValueError(f"covariance must be 'class' or 'tied', got {covariance!r}")
        # tied: one covariance per task, pooled over its classes (LDA inside the task; Lee et al. 2018's
        # Mahalanobis OOD score uses the same tied form), stored once instead of once per class
        self.tied = covariance == "tied"
        # more masked layers' Gaussians, (layer, width, weight) each: z_t += weight z_t^(layer); and the CSI
        # heads' standardised score (the network's ``task_ood``, trained alongside): z_t += ood_weight z_t^ood
        self.extra = nn.ModuleList(TaskFeatureGaussians(task_sizes, w, layer=l, shrinkage=shrinkage, gates=gates,
                                                        dtype=dtype, covariance=covariance) for l, w, _ in extra_layers)
        self.extra_weights = [float(wt) for _, _, wt in extra_layers]
        self.ood_weight = float(ood_weight)
        if dtype not in STORED_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(STORED_DTYPES)}, got {dtype!r}")
        self.dtype = STORED_DTYPES[dtype]
        self.layer = int(layer)
        self.task_sizes = [int(n) for n in task_sizes]
        self.width = int(width)
        self.shrinkage = float(shrinkage)
        self.gates = bool(gates)
        if decoder_weight < 0:
            raise ValueError(f"decoder_weight must be >= 0, got {decoder_weight}")
        self.decoder_weight = float(decoder_weight)
        self.decoder_ridge = float(decoder_ridge)
        # before a task is fitted its Gaussians are empty (0 units); fit() replaces them by its active units'
        self.gaussians = nn.ModuleList(ClassGaussians(n, 0, shrinkage) for n in self.task_sizes)
        for t in range(len(self.task_sizes)):
            self.register_buffer(f"units_{t}", torch.zeros(0, dtype=torch.long))
            if self.decoder_weight > 0:
                self.register_buffer(f"decoder_{t}", torch.zeros(0, 0))      # a_t x d
                self.register_buffer(f"decoder_mean_h_{t}", torch.zeros(0))  # a_t
                self.register_buffer(f"decoder_mean_x_{t}", torch.zeros(0))  # d
        self.register_buffer("score_mean", torch.zeros(len(self.task_sizes)))
        self.register_buffer("score_std", torch.ones(len(self.task_sizes)))
        self.register_buffer("recon_mean", torch.zeros(len(self.task_sizes) if self.decoder_weight > 0 else 0))
        self.register_buffer("recon_std", torch.ones(len(self.task_sizes) if self.decoder_weight > 0 else 0))
        self._cache: dict = {}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a fitted task's Gaussians, units and decoder have the sizes of its active units: resize before loading
        self._cache = {}
        for t, n in enumerate(self.task_sizes):
            key = f"{prefix}gaussians.{t}.means"
            if prefix + f"units_{t}" not in state_dict and key in state_dict:
                # checkpoints of the full-width layout: keep the units with a variance on the task's data
                g = ClassGaussians(n, state_dict[key].shape[1], self.shrinkage)
                g.counts.copy_(state_dict[f"{prefix}gaussians.{t}.counts"])
                g.packed_cov.copy_(state_dict[f"{prefix}gaussians.{t}.packed_cov"])
                full = g._unpack(g.packed_cov)
                active = torch.diagonal(full, dim1=1, dim2=2).amax(0) > 1e-12 if g.counts.sum() > 0 else \
                    torch.zeros(full.shape[1], dtype=torch.bool)
                units = active.nonzero().squeeze(1)
                ii, jj = torch.triu_indices(len(units), len(units))
                state_dict[prefix + f"units_{t}"] = units
                state_dict[key] = state_dict[key][:, units]
                state_dict[f"{prefix}gaussians.{t}.packed_cov"] = full[:, units][:, :, units][:, ii, jj].float()
            if key in state_dict and state_dict[key].shape[1] != self.gaussians[t].query_dim:
                g = ClassGaussians(n, state_dict[key].shape[1], self.shrinkage).to(self.score_mean.device)
                for name in ("means", "packed_cov"):  # the checkpoint's dtype (float16 ...) and rows (tied: 1)
                    g._buffers[name] = torch.empty_like(state_dict[f"{prefix}gaussians.{t}.{name}"],
                                                        device=self.score_mean.device)
                self.gaussians[t] = g
            for name in (f"units_{t}", f"decoder_{t}", f"decoder_mean_h_{t}", f"decoder_mean_x_{t}"):
                if prefix + name in state_dict and name in self._buffers:
                    self._buffers[name] = torch.empty_like(state_dict[prefix + name], device=self.score_mean.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def features(self, net, x: Tensor, task: int) -> Tensor:
        """h_t(x) over the layer's full width (eval mode, s = smax)."""
        if self.gates:
            return net.task_units(x, task)[self.layer]
        was_training = net.training
        net.eval()
        try:
            return net.unit_activations(x, net.masks(task), task)[self.layer]
        finally:
            net.train(was_training)

    def _task_gaussians(self, task: int) -> tuple[Tensor, Tensor, Tensor]:
        """(task t's units, mu: n_t x a, Cholesky factors: n_t x a x a) of its classes, each covariance shrunk
        towards tr(Sigma_c)/a I."""
        g = self.gaussians[task]
        key = (g._version, g.means.device)
        if task in self._cache and self._cache[task][0] == key:
            return self._cache[task][1]
        if g.query_dim == 0:
            raise RuntimeError(f"task {task}'s feature Gaussians are not fitted yet")
        # tied: the one pooled (unbiased) covariance of the task, 1 x a x a, shared by its classes
        raw = g._unpack(g.packed_cov) if self.tied else g.covariances()
        shrinkage = self.shrinkage
        chol, info = torch.linalg.cholesky_ex(shrunk(raw, shrinkage))
        while bool(info.any()) and shrinkage < 1.0:  # rounding (float16 storage) left a matrix indefinite:
            shrinkage = min(1.0, shrinkage * 2)  # more shrinkage until it factors (1: the scaled identity)
            chol, info = torch.linalg.cholesky_ex(shrunk(raw, shrinkage))
        out = (getattr(self, f"units_{task}"), g.means.double(), chol)
        self._cache[task] = (key, out)
        return out

    def raw_score(self, net, x: Tensor, task: int) -> Tensor:
        """s_t(x) = logsumexp_c log N(h_t(x); mu_tc, Sigma_tc) over task t's units: B."""
        return self._raw_scores(self.features(net, x, task), x, task)[0]

    def _raw_scores(self, h: Tensor, x: Tensor, task: int) -> tuple[Tensor, Tensor | None]:
        """(s_t, minus the decoder's reconstruction error or None) from the full-width features h."""
        units, mu, chol = self._task_gaussians(task)
        q = h.double()[:, units]
        z = torch.linalg.solve_triangular(chol, (q.unsqueeze(0) - mu.unsqueeze(1)).transpose(1, 2), upper=False)
        logdet = torch.log(torch.diagonal(chol, dim1=1, dim2=2)).sum(1)
        ll = -0.5 * (z ** 2).sum(1) - logdet.unsqueeze(1) - 0.5 * mu.shape[1] * math.log(2 * math.pi)
        recon = None
        if self.decoder_weight > 0:
            w = getattr(self, f"decoder_{task}").double()
            rec = (q - getattr(self, f"decoder_mean_h_{task}").double()) @ w + getattr(self, f"decoder_mean_x_{task}").double()
            recon = -((x.flatten(1).double() - rec) ** 2).sum(1)
        return ll.logsumexp(0), recon

    @torch.no_grad()
    def fit(self, net, x: Tensor, y_local: Tensor, task: int, batch_size: int = 512) -> None:
        """Task t's class Gaussians over its active units from its training data (labels local to its head),
        the decoder when there is one, then the mean and std of its score(s) on the same data."""
        full = ClassGaussians(self.task_sizes[task], self.width, self.shrinkage).to(x.device)
        # the features of t's training data, once: the Gaussians, the decoder and the score statistics use them
        starts = range(0, x.shape[0], batch_size)
        hs = [self.features(net, x[i:i + batch_size], task) for i in starts]
        for i, h in zip(starts, hs):
            full.update(h, y_local[i:i + batch_size])
        active = torch.diagonal(full.covariances(), dim1=1, dim2=2).amax(0) > 1e-12
        if not active.any():
            active[0] = True
        units = active.nonzero().squeeze(1)
        g = ClassGaussians(self.task_sizes[task], len(units), self.shrinkage).to(x.device)
        cov = full._unpack(full.packed_cov)[:, units][:, :, units]
        ii, jj = g._triu(x.device)
        g.counts.copy_(full.counts)
        g.means.copy_(full.means[:, units])
        if self.tied:  # pooled: sum_c n_c P_c / (N - C) over the classes with samples
            n = full.counts.double().view(-1, 1, 1)
            cov = ((n * cov).sum(0, keepdim=True) / (n.sum() - (n > 0).sum()).clamp_min(1))
            g._buffers["packed_cov"] = cov[:, ii, jj].float()
        else:
            g.packed_cov.copy_(cov[:, ii, jj].to(g.packed_cov.dtype))
        g._buffers["means"] = _stored(g.means, self.dtype)
        g._buffers["packed_cov"] = _stored(g.packed_cov, self.dtype)
        self.gaussians[task] = g
        self._buffers[f"units_{task}"] = units.to(self.score_mean.device)
        self._cache.pop(task, None)
        if self.decoder_weight > 0:
            h = torch.cat(hs).double()[:, units]
            target = x.flatten(1).double()
            mu_h, mu_x = h.mean(0), target.mean(0)
            a = h - mu_h
            gram = a.T @ a + self.decoder_ridge * len(a) * torch.eye(a.shape[1], dtype=a.dtype, device=a.device)
            w = torch.linalg.solve(gram, a.T @ (target - mu_x))
            self._buffers[f"decoder_{task}"] = _stored(w, self.dtype)
            self._buffers[f"decoder_mean_h_{task}"] = _stored(mu_h, self.dtype)
            self._buffers[f"decoder_mean_x_{task}"] = _stored(mu_x, self.dtype)
        s, r = [], []
        for k, hb in zip(starts, hs):
            sb, rb = self._raw_scores(hb, x[k:k + batch_size], task)
            s.append(sb)
            r.append(rb)
        for part in self.extra:
            part.fit(net, x, y_local, task, batch_size)
        s = torch.cat(s)
        self.score_mean[task] = s.mean()
        self.score_std[task] = s.std().clamp_min(1e-6) if s.numel() > 1 else 1.0
        if self.decoder_weight > 0:
            r = torch.cat(r)
            self.recon_mean[task] = r.mean()
            self.recon_std[task] = r.std().clamp_min(1e-6) if r.numel() > 1 else 1.0

    @torch.no_grad()
    def task_scores(self, net, x: Tensor, n_tasks: int) -> Tensor:
        """z: B x n_tasks."""
        zs = []
        for t in range(n_tasks):
            s, r = self._raw_scores(self.features(net, x, t), x, t)
            z = (s.float() - self.score_mean[t]) / self.score_std[t]
            if r is not None:
                z = z + self.decoder_weight * (r.float() - self.recon_mean[t]) / self.recon_std[t]
            zs.append(z)
        z = torch.stack(zs, 1)
        for part, weight in zip(self.extra, self.extra_weights):
            z = z + weight * part.task_scores(net, x, n_tasks)
        if self.ood_weight > 0:
            ood = net.task_ood  # its score on each task's own training data: score_mean, score_std (calibrate)
            s = torch.stack([ood.raw_score(ood.blocks(net, x, t)) for t in range(n_tasks)], 1)
            z = z + self.ood_weight * (s - ood.score_mean[:n_tasks]) / ood.score_std[:n_tasks]
        return z
