"""Clustering by synchronization (SynC) and the mini-batch sync regulariser.

Böhm, Plant, Shao, Yang, "Clustering by Synchronization", KDD 2010 (MISSION.md 1.2, seed 000).
Every point is an oscillator; all points move at once by the extended Kuramoto interaction

    x_i(t+1) = x_i(t) + 1/|Nb_eps(x)| * sum_{y in Nb_eps(x)} sin(y_i(t) - x_i(t))      (per coordinate i)

with Nb_eps(x) = {y : ||y - x|| <= eps} (x itself included), until the local order parameter

    r_c = 1/n * sum_x 1/|Nb_eps(x)| * sum_{y in Nb_eps(x)} exp(-||y - x||)

reaches 1 - tol. Points that ended on (nearly) the same position form a cluster; a point that synchronised
with nobody is an outlier (label -1).

Implementation notes (why it looks the way it does):

* Everything is torch on the input's device. The n x n interaction is never materialised: rows are processed
  in chunks whose distance block holds at most ``chunk_elements`` entries, and the sum of sines uses
  sin(y - x) = sin(y) cos(x) - cos(y) sin(x), so each chunk is one (chunk x n) @ (n x 2d+1) matmul of the
  neighbour mask with [sin X | cos X | 1] instead of a (chunk x n x d) tensor. Cost per iteration O(n^2 d) time, O(chunk_elements + n d) memory.
* Distances use ``torch.cdist(..., compute_mode="donot_use_mm_for_euclid_dist")``: the matmul shortcut loses
  ~1e-3 to cancellation in float32, which is the same size as the convergence tolerance on exp(-distance).
* sin() is an attraction only while coordinate gaps stay inside (-pi/2, pi/2); the paper therefore works on
  data normalised to [0, 1] per dimension. ``SynC`` does that by default (``scale="minmax"``); ``eps`` and
  ``eps_`` live in that scaled space. ``scale="global"`` divides every dimension by the largest range instead
  (keeps the geometry isotropic), ``scale=None`` uses the data as given.
* eps rules: ``"knn"`` = mean distance to the k-th nearest neighbour (k = n // 10 by default, see ``SynC``);
  ``"mdl"`` = the paper's search: eps runs from the mean 5-NN distance upwards in steps of
  mean-(k+1)-NN - mean-k-NN distance (at least ``eps_growth`` relative) until all points synchronise into one
  cluster, and the clustering with the lowest MDL coding cost (``mdl_cost``) wins.

* ``SynC(algorithm="grid")`` (``"auto"`` from ``AUTO_GRID_MIN_N`` points): the same dynamics over the leaves of a
  k-d partition, after EGG-SynC's grid (Jakob et al.): leaf pairs farther than eps apart are skipped, leaf pairs
  wholly within eps are added as summaries, the rest pair by pair (section "Beyond n^2" below).

Connected components, neighbour graphs and KDEs are likewise torch; scikit-learn only supplies the
estimator protocol (``BaseEstimator``/``ClusterMixin``: ``get_params``, ``fit_predict``, cloning).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import math
import numbers
import warnings
from typing import Callable

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClusterMixin
from torch import Tensor
from torch.nn import functional as F

DEFAULT_CHUNK_ELEMENTS = 1 << 24  # 16M distance entries per block: 64 MiB in float32.
_EXACT_CDIST = "donot_use_mm_for_euclid_dist"

__all__ = [
    "SynC",
    "sync_step",
    "order_parameter",
    "knn_distance",
    "mdl_cost",
    "sync_loss",
    "sync_diagnostics",
    "cosine_distance_matrix",
]


# ----------------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------------

def _row_blocks(n_rows: int, n_cols: int, chunk_elements: int):
    """Row slices such that a (rows x n_cols) block has at most ``chunk_elements`` entries."""
    step = max(1, int(chunk_elements) // max(1, n_cols))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


def _as_points(X, device=None, dtype=None) -> Tensor:
    """numpy / list / tensor -> 2-D floating tensor (n, d), validated."""
    if isinstance(X, Tensor):
        t = X.detach()
        if device is not None:
            t = t.to(device)
    else:
        t = torch.as_tensor(np.asarray(X), device=device)
    if dtype is not None:
        t = t.to(dtype)
    elif not t.is_floating_point():
        t = t.to(torch.get_default_dtype())
    if t.ndim != 2:
        raise ValueError(f"expected a 2-D array of points (n_samples, n_features), got shape {tuple(t.shape)}; "
                         "reshape it, e.g. X.reshape(len(X), -1)")
    if t.shape[0] < 2:
        raise ValueError(f"need at least 2 points to cluster, got {t.shape[0]}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError("X contains NaN or inf; remove or impute those entries first")
    return t


def _check_eps(eps: float) -> float:
    if isinstance(eps, bool) or not (isinstance(eps, numbers.Real) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")
    return float(eps)


def _euclidean(A: Tensor, B: Tensor) -> Tensor:
    return torch.cdist(A, B, compute_mode=_EXACT_CDIST)


# ----------------------------------------------------------------------------------------------------------
# The synchronization dynamics
# ----------------------------------------------------------------------------------------------------------

def _sync_iteration(X: Tensor, eps: float, chunk_elements: int) -> tuple[Tensor, Tensor]:
    """One interaction step and the order parameter of the *current* positions, sharing the distances."""
    n, d = X.shape
    sin_x, cos_x = torch.sin(X), torch.cos(X)
    # sum_y sin(y - x) = cos(x) * sum_y sin(y) - sin(x) * sum_y cos(y): one matmul of the neighbour mask with
    # [sin | cos | 1] gives both sums and the neighbour count.
    trig = torch.cat([sin_x, cos_x, torch.ones_like(X[:, :1])], dim=1)
    X_next = torch.empty_like(X)
    r_sum = X.new_zeros(())
    for rows in _row_blocks(n, n, chunk_elements):
        dist = _euclidean(X[rows], X)
        nb = dist.le(eps).to(X.dtype)           # includes the point itself (distance 0)
        sums = nb @ trig
        count = sums[:, 2 * d:]                  # >= 1
        pull = cos_x[rows] * sums[:, :d] - sin_x[rows] * sums[:, d:2 * d]
        X_next[rows] = X[rows] + pull / count
        closeness = dist.neg_().exp_().mul_(nb).sum(dim=1)   # in place: the distance block is not needed again
        r_sum = r_sum + (closeness / count.squeeze(1)).sum()
    return X_next, r_sum / n


def sync_step(X, eps: float, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> Tensor:
    """One SynC update of all points at once (Böhm et al. 2010, eq. 2).

    x <- x + 1/|Nb_eps(x)| * sum_{y in Nb_eps(x)} sin(y - x), per coordinate, Nb_eps(x) = {y: ||y-x|| <= eps}
    including x. ``X`` (n, d) is used as given (no scaling). Returns a tensor on X's device.
    """
    X = _as_points(X)
    return _sync_iteration(X, _check_eps(eps), chunk_elements)[0]


def order_parameter(X, eps: float, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> Tensor:
    """Local order parameter r_c = mean_x mean_{y in Nb_eps(x)} exp(-||y - x||) (Böhm et al. 2010, eq. 3).

    1 means every neighbourhood has collapsed onto one point. Returns a 0-d tensor on X's device.
    """
    X = _as_points(X)
    return _sync_iteration(X, _check_eps(eps), chunk_elements)[1]


def knn_distance(X, k: int, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> Tensor:
    """Distance of every point to its k-th nearest neighbour (the point itself not counted). Shape (n,)."""
    X = _as_points(X)
    n = X.shape[0]
    if not (isinstance(k, (int, np.integer)) and 1 <= k < n):
        raise ValueError(f"k must be an integer in [1, n_samples - 1] = [1, {n - 1}], got {k!r}")
    out = X.new_empty(n)
    for rows in _row_blocks(n, n, chunk_elements):
        dist = _euclidean(X[rows], X)
        # the k+1 smallest include the point itself at distance 0
        out[rows] = dist.topk(k + 1, dim=1, largest=False).values[:, k]
    return out


def _connected_components(X: Tensor, radius: float, distance: Callable[[Tensor, Tensor], Tensor],
                          chunk_elements: int) -> Tensor:
    """Component id (smallest member index) of each point in the graph {(i, j): distance <= radius}.

    Min-label propagation with pointer jumping; the distance blocks are recomputed per pass so memory stays
    bounded. Synchronised clusters are near-cliques, so this converges in two or three passes there.
    """
    n = X.shape[0]
    labels = torch.arange(n, device=X.device)
    sentinel = torch.tensor(n, device=X.device)
    while True:
        new = labels.clone()
        for rows in _row_blocks(n, n, chunk_elements):
            adjacent = distance(X[rows], X) <= radius
            neighbour_min = torch.where(adjacent, labels.unsqueeze(0), sentinel).min(dim=1).values
            new[rows] = torch.minimum(new[rows], neighbour_min)
        new = new[new]  # pointer jumping: follow the label's own label
        if torch.equal(new, labels):
            return labels
        labels = new


def _labels_from_components(components: Tensor, min_cluster_size: int) -> Tensor:
    """Consecutive cluster ids 0..K-1 by first appearance; components smaller than min_cluster_size -> -1."""
    _, inverse, counts = torch.unique(components, return_inverse=True, return_counts=True)
    keep = counts >= min_cluster_size
    new_id = torch.cumsum(keep.to(torch.long), 0) - 1
    new_id = torch.where(keep, new_id, torch.full_like(new_id, -1))
    return new_id[inverse]


def _synchronize(X: Tensor, eps: float, tol: float, max_iter: int, chunk_elements: int
                 ) -> tuple[Tensor, int, float]:
    """Run the dynamics until r_c >= 1 - tol (or max_iter updates). Returns positions, updates, final r_c."""
    r = X.new_zeros(())
    for n_iter in range(max_iter + 1):
        X_next, r = _sync_iteration(X, eps, chunk_elements)
        if float(r) >= 1.0 - tol:  # one host sync per iteration: the loop needs the answer
            return X, n_iter, float(r)
        if n_iter == max_iter:
            break
        X = X_next
    warnings.warn(f"SynC did not reach r_c >= {1 - tol} within max_iter={max_iter} (r_c = {float(r):.5f}); "
                  "increase max_iter or eps", RuntimeWarning, stacklevel=3)
    return X, max_iter, float(r)


# ----------------------------------------------------------------------------------------------------------
# Beyond n^2: the grid / neighbour-list variant (SynC(algorithm="grid"))
# ----------------------------------------------------------------------------------------------------------
# EGG-SynC (Jakob et al.) puts the points in a grid of cells of side eps, so that a point meets only the points
# of neighbouring cells, and adds a cell whose every point is within eps as one summary (its sums of sin and
# cos) instead of point by point. A full grid over 16 dimensions has 3^16 neighbour cells, so the cells here
# are the leaves of a k-d partition (median splits of the widest coordinate), each with the bounding box of
# its members in all d dimensions. For a row leaf A and a column leaf B:
#   * mindist(box A, box B) > eps: no pair interacts, B is skipped;
#   * maxdist(box A, box B) <= eps: every pair interacts: B adds its sums of [sin | cos | 1] to every row of A
#     (exact: sum_y sin(y - x) = cos x sum sin y - sin x sum cos y), and the order parameter gets bounds;
#   * otherwise the pairs are computed one by one: the neighbour mask from one matmul of centred coordinates
#     (eps^2 - ||x - y||^2 as a dot product; a distance kernel costs ~20x more per pair on the CPU), entries
#     within float32 rounding of the threshold recomputed directly, then one matmul with
#     [sin | cos | 1 | y | ||y||^2], whose last columns give each row's sum of squared neighbour distances
#     (the order parameter's bounds below: exp(-t) <= 1 - t^2 (1 - e^-eps) / eps^2 on [0, eps], Jensen).
# Leaves are independent: a thread pool runs them, each leaf's torch ops on one thread (``_leaf_workers``).
# Before the dynamics starts, neighbourhoods are about a cluster wide and most leaf pairs are partial (cost
# ~ n^2 / #clusters instead of n^2); once clusters contract, whole leaves are summaries and an iteration costs
# ~ n * #leaves. The positions are those of the exact variant up to the order of float additions.
#
# Order parameter on summarised pairs: with t = ||y - x|| over the members y of B, c_B their mean and
# s_B = mean ||y - c_B||^2, sum_y t^2 = n_B (||x - c_B||^2 + s_B) exactly, and exp(-t) is convex, so
#   lower: sum_y exp(-t) >= n_B exp(-sqrt(mean t^2))                         (Jensen, twice)
#   upper: sum_y exp(-t) <= min(n_B exp(-mindist(x, box B)), n_B - sum t + sum t^2 / 2),
#          sum t >= max(n_B ||c_B - x||, sum t^2 / maxdist(x, box B)).
# Points in high dimension are nearly equidistant, so the lower bound is within a few per cent of 1 - r_c.
# The stopping test r_c >= 1 - tol is taken on the bounds; only when they straddle 1 - tol is r_c computed
# pair by pair (the stopping decision, hence the clustering, is the exact variant's).

_GRID_MARGIN = 1e-5           # relative: a leaf pair this close to eps is computed pair by pair
GRID_LEAF_SIZE = 512          # largest leaf
GRID_MIN_SPLIT = 256          # a leaf wider than eps / 2 is split down to this size
GRID_KNN_ROWS = 512           # eps rule on n > this many points: mean k-NN distance of this many rows
AUTO_GRID_MIN_N = {"cpu": 3000, "cuda": 50000}   # algorithm="auto": grid from this many points on


def _kd_leaves(X: Tensor, split_diag: float) -> tuple[list[Tensor], Tensor, Tensor]:
    """Leaves of a k-d partition of X: (index set of each, lower and upper corner of each box, (L, d)). A node
    is halved at the median of its widest coordinate while it holds more than GRID_LEAF_SIZE points, or more
    than GRID_MIN_SPLIT points spread wider than ``split_diag`` (bounding-box diagonal). Built in numpy on the
    host (torch's column reductions of small blocks cost milliseconds each on the CPU)."""
    P = X.detach().cpu().numpy()
    leaves, lows, highs, stack = [], [], [], [np.arange(P.shape[0])]
    while stack:
        idx = stack.pop()
        pts = P[idx]
        low, high = pts.min(0), pts.max(0)
        span = high - low
        diag = float(np.sqrt((span.astype(np.float64) ** 2).sum()))
        m = idx.size
        if diag > 0 and (m > GRID_LEAF_SIZE or (m > GRID_MIN_SPLIT and diag > split_diag)):
            order = np.argpartition(pts[:, int(span.argmax())], m // 2)
            stack += [idx[order[m // 2:]], idx[order[:m // 2]]]
        else:
            leaves.append(idx)
            lows.append(low)
            highs.append(high)
    return ([torch.from_numpy(leaf).to(X.device) for leaf in leaves], torch.from_numpy(np.stack(lows)).to(X.device),
            torch.from_numpy(np.stack(highs)).to(X.device))


class _Leaves:
    """The points reordered leaf by leaf (leaf j = rows offsets[j]:offsets[j+1]) and the leaf-pair classes."""

    def __init__(self, X: Tensor, eps: float):
        leaves, self.lo, self.hi = _kd_leaves(X, eps / 2)
        self.perm = torch.cat(leaves)
        self.X = X[self.perm]
        self.sizes = torch.tensor([len(leaf) for leaf in leaves], device=X.device)
        self.offsets = [0] + torch.cumsum(self.sizes, 0).tolist()
        self.leaf_of = torch.repeat_interleave(torch.arange(len(leaves), device=X.device), self.sizes)
        # leaf-pair distance bounds over the boxes: (L, L)
        gap = (self.lo[None] - self.hi[:, None]).clamp_min(0) + (self.lo[:, None] - self.hi[None]).clamp_min(0)
        far = torch.maximum((self.hi[None] - self.lo[:, None]).abs(), (self.hi[:, None] - self.lo[None]).abs())
        mindist, maxdist = gap.norm(dim=-1), far.norm(dim=-1)
        self.full = maxdist <= eps * (1 - _GRID_MARGIN)
        self.partial = ~self.full & (mindist <= eps * (1 + _GRID_MARGIN))

    def rows(self, a: int) -> slice:
        return slice(self.offsets[a], self.offsets[a + 1])

    def members(self, leaves: Tensor) -> Tensor:
        """Row indices (reordered) of the given leaves, concatenated."""
        starts = torch.tensor(self.offsets[:-1], device=self.X.device)[leaves]
        sizes = self.sizes[leaves]
        shift = torch.repeat_interleave(starts - (torch.cumsum(sizes, 0) - sizes), sizes)
        return torch.arange(int(sizes.sum()), device=self.X.device) + shift


@contextlib.contextmanager
def _leaf_workers():
    """A thread pool over leaves whose torch ops run single-threaded: leaf blocks are mid-sized, and intra-op
    parallel regions on a shared CPU wait at every barrier for a descheduled thread (several times slower
    than the work itself when the cores are busy), while independent leaves need no barrier at all."""
    threads = torch.get_num_threads()
    if threads <= 1:
        yield map
        return
    torch.set_num_threads(1)
    try:
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            yield pool.map
    finally:
        torch.set_num_threads(threads)


def _neighbour_mask(ya: Tensor, yc: Tensor, eps: float) -> Tensor:
    """Float 0/1 mask ||ya_i - yc_j|| <= eps of centred rows and candidates from one matmul, eps^2 - ||ya_i -
    yc_j||^2 = [ya, 1, eps^2 - ||ya||^2] . [2 yc, -||yc||^2, 1] (a pairwise-distance kernel costs ~20x more per
    pair on the CPU). Rows holding an entry within the matmul's worst-case rounding of 0 are recomputed
    directly, so the mask is the exact variant's."""
    na, nc = ya.square().sum(1, keepdim=True), yc.square().sum(1, keepdim=True)
    diff = torch.cat([ya, torch.ones_like(na), eps * eps - na], 1) @ torch.cat([2 * yc, -nc, torch.ones_like(nc)], 1).T
    # float32 rounding of an 18-term dot product: at most 18 * 2^-24 * (sum of |terms|) <= 2e-6 * slack_scale
    slack = 2e-6 * (2 * float(na.max()) + 2 * float(nc.max()) + eps * eps)
    gap = diff.abs()
    rows = torch.nonzero(gap.amin(1) <= slack).squeeze(1)
    mask = diff.clamp_(min=0).sign_()          # diff > 0 -> 1; diff = 0 is a border entry, set below
    if rows.numel():
        i, j = torch.nonzero(gap[rows] <= slack).unbind(1)
        i = rows[i]
        mask[i, j] = ((ya[i] - yc[j]).square().sum(1).sqrt() <= eps).to(mask.dtype)
    return mask


def _grid_iteration(X: Tensor, eps: float, exact_r: bool = False) -> tuple[Tensor, float, float]:
    """``_sync_iteration`` over the k-d leaves: (next positions, lower and upper bound of r_c). With
    ``exact_r`` only r_c is computed, pair by pair on every leaf pair that may interact (lower = upper)."""
    n, d = X.shape
    T = _Leaves(X, eps)
    Xp = T.X
    sin_x, cos_x = torch.sin(Xp), torch.cos(Xp)
    trig = torch.cat([sin_x, cos_x, torch.ones_like(Xp[:, :1])], dim=1)
    n_leaves = len(T.sizes)
    leaf_trig = Xp.new_zeros(n_leaves, 2 * d + 1).index_add_(0, T.leaf_of, trig)
    count_leaf = T.sizes.to(X.dtype)
    centre = Xp.new_zeros(n_leaves, d).index_add_(0, T.leaf_of, Xp) / count_leaf[:, None]
    spread = (Xp - centre[T.leaf_of]).double().square().sum(1)
    spread = spread.new_zeros(n_leaves).index_add_(0, T.leaf_of, spread) / count_leaf.double()
    # chord of exp(-t) on [0, eps] and t >= t^2 / eps: exp(-t) <= 1 - k_eps t^2 for a neighbour
    k_eps = (1.0 - math.exp(-eps)) / (eps * eps)

    def leaf(a: int) -> tuple[Tensor | None, float, float]:
        rows = T.rows(a)
        xa = Xp[rows]
        part = torch.nonzero(T.partial[a]).squeeze(1)
        full = torch.nonzero(T.full[a]).squeeze(1)
        if exact_r:
            cand = T.members(torch.cat([part, full]))
            dist = _euclidean(xa, Xp[cand])
            nb = dist.le(eps)
            close = dist.neg_().exp_().mul_(nb).sum(1)
            r = float((close / nb.sum(1)).sum())
            return None, r, r
        sums = xa.new_zeros(xa.shape[0], 2 * d + 1)
        close_lo = xa.new_zeros(xa.shape[0], dtype=torch.float64)
        close_hi = close_lo.clone()
        if part.numel():
            # pair by pair: the mask, then one matmul with [sin | cos | 1 | y | ||y||^2] (y centred on the
            # leaf) gives the sums and, per row, the count and sum of squared distances to its neighbours
            cand = T.members(part)
            ya, yc = xa - centre[a], Xp[cand] - centre[a]
            ext = torch.cat([trig[cand], yc, yc.square().sum(1, keepdim=True)], dim=1)
            moments = _neighbour_mask(ya, yc, eps) @ ext
            sums += moments[:, :2 * d + 1]
            c = moments[:, 2 * d].double()
            s_y, s_n = moments[:, 2 * d + 1:3 * d + 1].double(), moments[:, 3 * d + 1].double()
            ya64 = ya.double()
            n_a = ya64.square().sum(1)
            m2 = s_n - 2 * (ya64 * s_y).sum(1) + c * n_a                 # sum of t^2 over the neighbours
            slack = 2e-4 * (s_n + c * n_a + 2 * n_a.sqrt() * s_y.norm(dim=1))  # float32 sums, conservative
            close_lo += c * torch.exp(-((m2 + slack).clamp_min(0) / c).sqrt())
            close_hi += c - k_eps * (m2 - slack).clamp_min(0)
        if full.numel():
            sums += leaf_trig[full].sum(0)
            nB = count_leaf[full].double()
            dc = _euclidean(xa, centre[full]).double()                 # ||x - c_B||
            t2 = dc.square() + spread[full]                             # mean_y ||y - x||^2 (exact)
            close_lo += (nB * torch.exp(-t2.sqrt())).sum(1)
            lo_b, hi_b = T.lo[full][None], T.hi[full][None]
            xx = xa[:, None]
            mind = ((lo_b - xx).clamp_min(0) + (xx - hi_b).clamp_min(0)).double().norm(dim=-1)
            maxd = torch.maximum((xx - lo_b).abs(), (hi_b - xx).abs()).double().norm(dim=-1)
            sum_t = torch.maximum(nB * dc, nB * t2 / maxd.clamp_min(1e-30))
            close_hi += torch.minimum(nB * torch.exp(-mind), nB - sum_t + nB * t2 / 2).sum(1)
        count = sums[:, 2 * d:]
        x_next = xa + (cos_x[rows] * sums[:, :d] - sin_x[rows] * sums[:, d:2 * d]) / count
        return (x_next, float((close_lo / count.squeeze(1).double()).sum()),
                float((close_hi / count.squeeze(1).double()).sum()))

    with _leaf_workers() as run:
        results = list(run(leaf, range(n_leaves)))
    r_lo = sum(r[1] for r in results)   # in leaf order: the same sum whatever the threads
    r_hi = sum(r[2] for r in results)
    if exact_r:
        return X, r_lo / n, r_lo / n
    X_next = torch.cat([r[0] for r in results])
    out = torch.empty_like(X)
    out[T.perm] = X_next
    return out, r_lo / n, min(r_hi / n, 1.0)


def _synchronize_grid(X: Tensor, eps: float, tol: float, max_iter: int) -> tuple[Tensor, int, float]:
    """``_synchronize`` with ``_grid_iteration``; the stopping test is decided by the bounds of r_c, or by the
    exact r_c where they straddle 1 - tol. The r_c returned is a lower bound (exact where computed)."""
    r = 0.0
    for n_iter in range(max_iter + 1):
        X_next, r, r_hi = _grid_iteration(X, eps)
        if r < 1.0 - tol <= r_hi:
            r = _grid_iteration(X, eps, exact_r=True)[1]
        if r >= 1.0 - tol:
            return X, n_iter, r
        if n_iter == max_iter:
            break
        X = X_next
    warnings.warn(f"SynC did not reach r_c >= {1 - tol} within max_iter={max_iter} (r_c = {r:.5f}); "
                  "increase max_iter or eps", RuntimeWarning, stacklevel=3)
    return X, max_iter, r


def _grid_components(X: Tensor, radius: float) -> Tensor:
    """``_connected_components`` (Euclidean) over the k-d leaves: a leaf pair within ``radius`` box to box
    joins wholesale. Component id = smallest member index, as there."""
    n = X.shape[0]
    T = _Leaves(X, radius)
    n_leaves = len(T.sizes)
    labels = torch.arange(n, device=X.device)   # in leaf order
    while True:
        leaf_min = torch.full((n_leaves,), n, device=X.device).scatter_reduce_(0, T.leaf_of, labels, "amin")

        def leaf(a: int) -> Tensor:
            rows = T.rows(a)
            low = labels[rows]
            full = torch.nonzero(T.full[a]).squeeze(1)
            if full.numel():
                low = torch.minimum(low, leaf_min[full].min())
            part = torch.nonzero(T.partial[a]).squeeze(1)
            if part.numel():
                cand = T.members(part)
                adjacent = _euclidean(T.X[rows], T.X[cand]) <= radius
                low = torch.minimum(low, torch.where(adjacent, labels[cand][None], n).min(dim=1).values)
            return low

        with _leaf_workers() as run:
            new = torch.cat(list(run(leaf, range(n_leaves))))
        new = new[new]
        if torch.equal(new, labels):
            break
        labels = new
    # back to the input order, each component named by its smallest original index
    first = torch.full((n,), n, device=X.device).scatter_reduce_(0, labels, T.perm, "amin")
    out = torch.empty_like(labels)
    out[T.perm] = first[labels]
    return out


def _sampled_knn_mean(X: Tensor, k: int, chunk_elements: int) -> float:
    """Mean k-NN distance (the eps rules' statistic): exact up to GRID_KNN_ROWS points, else the mean over
    GRID_KNN_ROWS evenly spaced rows (each against all points; a relative standard error of well under 1%
    when k-NN distances vary by tens of per cent)."""
    n = X.shape[0]
    if n <= GRID_KNN_ROWS:
        return float(knn_distance(X, k, chunk_elements).mean())
    rows = torch.linspace(0, n - 1, GRID_KNN_ROWS, device=X.device).long()
    total = 0.0
    for block in _row_blocks(GRID_KNN_ROWS, n, chunk_elements):
        dist = _euclidean(X[rows[block]], X)
        total += float(dist.topk(k + 1, dim=1, largest=False).values[:, k].sum())
    return total / GRID_KNN_ROWS


# ----------------------------------------------------------------------------------------------------------
# MDL coding cost (Böhm et al. 2010, Sec. "Finding the natural clustering")
# ----------------------------------------------------------------------------------------------------------

def _silverman_bandwidth(Xc: Tensor, floor: float) -> Tensor:
    """h_j = 0.9 * min(std_j, IQR_j / 1.34) * n^(-1/(d+4)) per dimension (Silverman's rule), floored."""
    n, d = Xc.shape
    std = Xc.std(dim=0, unbiased=False)
    q = torch.quantile(Xc, torch.tensor([0.25, 0.75], device=Xc.device, dtype=Xc.dtype), dim=0)
    iqr = q[1] - q[0]
    spread = torch.where(iqr > 0, torch.minimum(std, iqr / 1.34), std)
    return (0.9 * spread * n ** (-1.0 / (d + 4))).clamp_min(floor)


def _loo_kde_log2_density(Xc: Tensor, h: Tensor, chunk_elements: int) -> Tensor:
    """log2 of the leave-one-out Gaussian product-kernel density of each member of a cluster. Shape (n_c,)."""
    n, d = Xc.shape
    Z = Xc / h
    log_norm = -math.log(n - 1) - 0.5 * d * math.log(2 * math.pi) - torch.log(h).sum()
    out = Xc.new_empty(n)
    for rows in _row_blocks(n, n, chunk_elements):
        sq = _euclidean(Z[rows], Z).square()
        idx = torch.arange(rows.start, rows.stop, device=Xc.device)
        sq[idx - rows.start, idx] = float("inf")  # leave the point itself out
        out[rows] = torch.logsumexp(-0.5 * sq, dim=1) + log_norm
    return out / math.log(2)


def mdl_cost(X, labels, bandwidth_floor: float = 1e-3, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> float:
    """MDL coding cost L(D, M) = L(M) + L(D | M) in bits of a clustering ``labels`` (-1 = outlier) of ``X``.

    Following Böhm et al. (2010): every cluster C (n_C members) pays
      * its cluster-id code n_C * log2(n / n_C) (entropy of the cluster assignment),
      * its parameters, (p / 2) * log2(n_C) with p = d (one kernel bandwidth per dimension),
      * its points under the cluster's kernel density estimate, -sum_{x in C} log2 pdf_C(x), a Gaussian
        product-kernel KDE with Silverman's bandwidth h_j = 0.9 min(std_j, IQR_j/1.34) n_C^(-1/(d+4)).
    Outliers form one group that pays its id code and is coded by the uniform density over the data's
    bounding box (density 1 / prod(range_j)).

    Choices made explicit (the paper leaves them open): the KDE is leave-one-out, because a density that
    contains the point itself rewards tiny clusters with arbitrarily small bandwidths; bandwidths are floored
    at ``bandwidth_floor`` (the coding precision, in data units) so duplicate points stay finite.
    Costs of continuous data are relative (they depend on the precision), so only compare them on one X.
    """
    X = _as_points(X)
    labels = torch.as_tensor(np.asarray(labels) if not isinstance(labels, Tensor) else labels,
                             device=X.device).long()
    n, d = X.shape
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
    total = 0.0
    outliers = labels < 0
    n_out = int(outliers.sum())
    if n_out:
        ranges = (X.max(dim=0).values - X.min(dim=0).values).clamp_min(bandwidth_floor)
        total += n_out * math.log2(n / n_out) + n_out * float(torch.log2(ranges).sum())
    for c in torch.unique(labels[~outliers]):
        Xc = X[labels == c]
        n_c = Xc.shape[0]
        if n_c < 2:
            raise ValueError("every cluster needs >= 2 members for the leave-one-out KDE; "
                             "label singletons as outliers (-1)")
        h = _silverman_bandwidth(Xc, bandwidth_floor)
        total += n_c * math.log2(n / n_c) + 0.5 * d * math.log2(n_c)
        total -= float(_loo_kde_log2_density(Xc, h, chunk_elements).sum())
    return total


# ----------------------------------------------------------------------------------------------------------
# The estimator
# ----------------------------------------------------------------------------------------------------------

class SynC(ClusterMixin, BaseEstimator):
    """Clustering by synchronization (Böhm et al., KDD 2010), scikit-learn style, vectorised in torch.

    Parameters
    ----------
    eps : float or None
        Neighbourhood radius in the *scaled* space (see ``scale``). None: chosen by ``eps_rule``.
    eps_rule : "knn" | "mdl"
        "knn": eps = mean distance to the k-th nearest neighbour. "mdl": the paper's search, eps from that value
        upwards in steps of (mean (k+1)-NN - mean k-NN distance) until global synchronisation; the clustering
        with the lowest ``mdl_cost`` is kept.
    k : int or None
        Neighbour rank for both rules (clipped to n - 2). None -> max(10, n // 10) for "knn" (suits a handful
        of clusters; for many small clusters give a smaller k or use "mdl"), 5 for "mdl" (its start value).
    max_iter : int
        Most synchronisation updates per run.
    tol : float
        Stop when the order parameter r_c >= 1 - tol (paper: 1e-3).
    scale : "minmax" | "global" | None
        "minmax" (paper): every dimension to [0, 1]. "global": divide by the largest range (isotropic).
    min_cluster_size : int
        Synchronised groups smaller than this are outliers (-1); 2 = "synchronised with nobody".
    merge_radius : float or None
        Points whose synchronised positions are within this distance (transitively) share a cluster;
        None -> eps / 2 (converged clusters are > eps apart, members within ~tol of each other).
    max_eps_candidates : int
        Cap on the eps values tried by the MDL search.
    eps_growth : float
        MDL search step: eps <- max(eps + paper_step, eps * (1 + eps_growth)). The paper's additive step
        (difference of mean k- and (k+1)-NN distances) alone needs hundreds of full SynC runs to reach global
        synchronisation; the relative floor bounds the search to ~log(eps_end/eps_start)/log(1+growth) runs.
        0 gives the paper's schedule.
    chunk_elements : int
        Largest pairwise-distance block held in memory.
    device : str, torch.device or None
        Where to compute. None: the tensor's own device; numpy input -> CUDA when available, else CPU.
    dtype : str
        "float32" or "float64" computation dtype.
    algorithm : "auto" | "exact" | "grid"
        How the eps-neighbourhoods are found. "exact": all n^2 pairs per iteration (O(n^2 d)). "grid": the
        EGG-SynC idea on a k-d partition (see ``_grid_iteration``): only leaf pairs whose boxes are within eps
        are visited, leaves wholly within eps are added as summaries; same dynamics and stopping decision, so
        the same clusters; the eps rules' mean k-NN distance comes from ``GRID_KNN_ROWS`` rows when n is
        larger. "auto": "grid" from ``AUTO_GRID_MIN_N`` points on (per device type), else "exact".

    Attributes
    ----------
    labels_ : np.ndarray (n,)  cluster id, -1 for outliers.
    X_sync_ : torch.Tensor (n, d)  synchronised positions, scaled space, on the compute device.
    cluster_centers_ : np.ndarray (K, d)  mean of each cluster's members in the original space.
    n_clusters_, n_iter_, order_parameter_, eps_ : results of the kept run ("grid": order_parameter_ is the
        lower bound of r_c that passed 1 - tol, or r_c itself where the bounds straddled it).
    eps_candidates_, mdl_costs_ : lists, "mdl" rule only.
    """

    def __init__(self, eps: float | None = None, eps_rule: str = "knn", k: int | None = None,
                 max_iter: int = 300, tol: float = 1e-3, scale: str | None = "minmax",
                 min_cluster_size: int = 2, merge_radius: float | None = None, max_eps_candidates: int = 64,
                 eps_growth: float = 0.1,
                 chunk_elements: int = DEFAULT_CHUNK_ELEMENTS, device=None, dtype: str = "float32",
                 algorithm: str = "auto"):
        self.eps = eps
        self.eps_rule = eps_rule
        self.k = k
        self.max_iter = max_iter
        self.tol = tol
        self.scale = scale
        self.min_cluster_size = min_cluster_size
        self.merge_radius = merge_radius
        self.max_eps_candidates = max_eps_candidates
        self.eps_growth = eps_growth
        self.chunk_elements = chunk_elements
        self.device = device
        self.dtype = dtype
        self.algorithm = algorithm

    # -- validation and preprocessing ---------------------------------------------------------------------
    def _check_params(self) -> None:
        if self.eps is not None:
            _check_eps(self.eps)
        if self.eps_rule not in ("knn", "mdl"):
            raise ValueError(f"eps_rule must be 'knn' or 'mdl', got {self.eps_rule!r}")
        if self.scale not in ("minmax", "global", None):
            raise ValueError(f"scale must be 'minmax', 'global' or None, got {self.scale!r}")
        if self.algorithm not in ("auto", "exact", "grid"):
            raise ValueError(f"algorithm must be 'auto', 'exact' or 'grid', got {self.algorithm!r}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")
        if not (0 < self.tol < 1):
            raise ValueError(f"tol must be in (0, 1), got {self.tol!r}")
        if not (self.eps_growth >= 0):
            raise ValueError(f"eps_growth must be >= 0, got {self.eps_growth!r}")
        if self.max_iter < 1 or self.max_eps_candidates < 1 or self.min_cluster_size < 1:
            raise ValueError("max_iter, max_eps_candidates and min_cluster_size must be >= 1")
        if self.merge_radius is not None:
            _check_eps(self.merge_radius)

    def _device(self, X):
        if self.device is not None:
            return torch.device(self.device)
        if isinstance(X, Tensor):
            return X.device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def _scaled(self, X: Tensor) -> Tensor:
        if self.scale is None:
            return X
        lo = X.min(dim=0).values
        ranges = X.max(dim=0).values - lo
        if self.scale == "global":
            ranges = ranges.max().expand_as(ranges)
        # a constant dimension carries no information: leave it at 0 rather than dividing by 0
        ranges = torch.where(ranges > 0, ranges, torch.ones_like(ranges))
        return (X - lo) / ranges

    def _k(self, n: int) -> int:
        if self.k is None:
            # knn rule: the neighbourhood must hold a sizeable share of a cluster, or the dynamics freezes
            # clusters into fragments (5 blobs x 120 points: k=10 -> ~30 groups, k=60 -> the 5 blobs).
            # mdl rule: start small; the search grows eps anyway.
            k = max(10, n // 10) if self.eps_rule == "knn" else 5
        else:
            k = self.k
        if not (isinstance(k, (int, np.integer)) and k >= 1):
            raise ValueError(f"k must be a positive integer, got {k!r}")
        return int(min(k, n - 2)) if n > 2 else 1

    # -- one clustering at a fixed eps -----------------------------------------------------------------------
    def _use_grid(self, X: Tensor) -> bool:
        if self.algorithm != "auto":
            return self.algorithm == "grid"
        return X.shape[0] >= AUTO_GRID_MIN_N.get(X.device.type, AUTO_GRID_MIN_N["cuda"])

    def _mean_knn(self, Xs: Tensor, k: int) -> float:
        if self._use_grid(Xs):
            return _sampled_knn_mean(Xs, k, self.chunk_elements)
        return float(knn_distance(Xs, k, self.chunk_elements).mean())

    def _cluster_at(self, Xs: Tensor, eps: float) -> dict:
        radius = self.merge_radius if self.merge_radius is not None else eps / 2
        if self._use_grid(Xs):
            X_sync, n_iter, r = _synchronize_grid(Xs, eps, self.tol, self.max_iter)
            components = _grid_components(X_sync, radius)
        else:
            X_sync, n_iter, r = _synchronize(Xs, eps, self.tol, self.max_iter, self.chunk_elements)
            components = _connected_components(X_sync, radius, _euclidean, self.chunk_elements)
        labels = _labels_from_components(components, self.min_cluster_size)
        return {"eps": eps, "X_sync": X_sync, "n_iter": n_iter, "r": r, "labels": labels}

    def fit(self, X, y=None):
        """Cluster X (n, d), numpy or torch (any device). ``y`` is ignored (scikit-learn protocol)."""
        self._check_params()
        torch_dtype = getattr(torch, self.dtype)
        X_orig = _as_points(X, device=self._device(X), dtype=torch_dtype)
        Xs = self._scaled(X_orig)
        n = Xs.shape[0]

        if self.eps is not None:
            best = self._cluster_at(Xs, float(self.eps))
        elif self.eps_rule == "knn":
            eps = self._mean_knn(Xs, self._k(n))
            best = self._cluster_at(Xs, max(eps, 1e-12))
        else:
            best = self._mdl_search(Xs)

        labels = best["labels"]
        self.labels_ = labels.cpu().numpy()
        self.X_sync_ = best["X_sync"]
        self.n_iter_ = best["n_iter"]
        self.order_parameter_ = best["r"]
        self.eps_ = best["eps"]
        self.n_clusters_ = int(labels.max()) + 1
        members = labels >= 0
        sums = X_orig.new_zeros(self.n_clusters_, X_orig.shape[1]).index_add_(0, labels[members], X_orig[members])
        counts = torch.bincount(labels[members], minlength=self.n_clusters_).clamp_min(1)
        self.cluster_centers_ = (sums / counts.unsqueeze(1).to(sums.dtype)).cpu().numpy()
        return self

    def fit_predict(self, X, y=None):
        return self.fit(X).labels_

    def _mdl_search(self, Xs: Tensor) -> dict:
        n = Xs.shape[0]
        k = self._k(n)
        eps = self._mean_knn(Xs, k)
        paper_step = self._mean_knn(Xs, min(k + 1, n - 1)) - eps
        self.eps_candidates_, self.mdl_costs_ = [], []
        best, best_cost = None, math.inf
        for _ in range(self.max_eps_candidates):
            eps = max(eps, 1e-12)
            result = self._cluster_at(Xs, eps)
            cost = mdl_cost(Xs, result["labels"], chunk_elements=self.chunk_elements)
            self.eps_candidates_.append(eps)
            self.mdl_costs_.append(cost)
            if cost < best_cost:
                best, best_cost = result, cost
            if int(result["labels"].max()) <= 0:  # global synchronisation: one cluster (or none) left
                break
            # the paper's additive step, but at least a relative one so the search reaches global sync
            eps = max(eps + paper_step, eps * (1.0 + self.eps_growth))
        else:
            warnings.warn(f"MDL eps search stopped after max_eps_candidates={self.max_eps_candidates} values "
                          f"(eps up to {eps:.4g}) before global synchronisation; raise max_eps_candidates or "
                          "eps_growth", RuntimeWarning, stacklevel=3)
        return best


# ----------------------------------------------------------------------------------------------------------
# Mini-batch sync regulariser and the diagnostics of seed 000
# ----------------------------------------------------------------------------------------------------------

def cosine_distance_matrix(A: Tensor, B: Tensor | None = None) -> Tensor:
    """1 - cos(a_i, b_j) for all pairs; rows are items (e.g. units), columns their features."""
    a = F.normalize(A, dim=-1)
    b = a if B is None else F.normalize(B, dim=-1)
    return 1.0 - a @ b.transpose(-1, -2)


def _check_features(features: Tensor, name: str = "features", batched: bool = False) -> None:
    if not isinstance(features, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor (n_items, n_dims); wrap numpy with torch.as_tensor")
    if batched and features.ndim == 3 and features.shape[1] >= 2:
        return
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"{name} must be 2-D (n_items >= 2, n_dims), got shape {tuple(features.shape)}; "
                         "for unit activation profiles pass activations.T (units x samples)")


def sync_loss(features: Tensor, eps: float, stride: int = 1, offset: int = 0, items: str = "rows") -> Tensor:
    """Mini-batch sync regulariser (seed 000, "Sync in mini-batch"), differentiable.

    L_sync = 1/N sum_i 1/|Nb_eps(x_i)| sum_{x_j in Nb_eps(x_i)} dist(x_i, x_j),  dist = 1 - cos(x_i, x_j),
    Nb_eps(x_i) = {j != i : dist(x_i, x_j) <= eps}. Rows of ``features`` (N, D) are the items that should
    synchronise (neuron semantic vectors, or unit activation profiles = activations.T). An item without
    neighbours contributes 0 but still counts in N. The neighbourhood is a hard threshold, so gradients flow
    through the distances only: minimising L pulls every item towards its current neighbours.

    ``items="columns"``: the items are the columns of ``features`` (D, N), e.g. a layer's activations
    (batch x units) as they come, so that no transposed copy is made.

    ``features`` may also be (L, N, D) (or (L, D, N) with ``items="columns"``): L independent sets, e.g.
    layers of equal width; the result is the mean of their L_sync.

    ``stride`` > 1 evaluates the outer sum on the rows ``offset, offset + stride, ...`` only (each against all
    N items): the cost drops by ``stride`` and, with ``offset`` cycling through 0..stride-1 over successive
    steps, every item's term is evaluated once per cycle; each call is the mean over its rows.
    """
    if items not in ("rows", "columns"):
        raise ValueError(f"items must be 'rows' (features are N x D) or 'columns' (D x N), got {items!r}")
    if items == "columns" and isinstance(features, Tensor) and features.ndim >= 2:
        features = features.transpose(-1, -2)  # a view: the checks below speak of (N, D)
    _check_features(features, batched=True)
    eps = _check_eps(eps)
    n = features.shape[-2]
    if not (isinstance(stride, int) and stride >= 1 and 0 <= offset < min(stride, n)):
        raise ValueError(f"need an integer stride >= 1 and 0 <= offset < min(stride, n_items), got stride "
                         f"{stride}, offset {offset}, {n} items")
    return _SyncLoss.apply(features.transpose(-1, -2), eps, stride, offset)


class _SyncLoss(torch.autograd.Function):
    """L_sync on X (..., D, N) whose columns are the items, with its gradient written out: as a training
    regulariser it runs every few steps on every layer, and autograd's graph of normalise / product /
    threshold / mean costs several times the arithmetic on small layers.

    With A = X / |X| (columns), R = the evaluated columns (m of them), C = R^T A (m x N cosines),
    W_ij = nb_ij / (|Nb(i)| m) (the neighbourhoods held fixed, as autograd would: the threshold has no
    gradient), P = W o C and L = sum W - sum P:
      -dL/dA = G = R W  (as neighbours)  + A W^T on the evaluated columns (as rows),
      dL/dX = -(G - A <A, G>) / |X|  per column,
    where <A_j, G_j> = (column sum of P)_j + (row sum of P)_j on the evaluated columns: the radial part
    comes from the small m x N matrix, not from another pass over X. Only two passes over X each way.
    tests/test_sync.py checks it against finite differences (gradcheck) and hand-computed values.
    """

    @staticmethod
    def forward(ctx, X: Tensor, eps: float, stride: int, offset: int) -> Tensor:
        # 1 / |X| per column, (..., 1, N); square-and-sum: vector_norm over a strided dim is ~7x slower on the CPU
        inv = X.square().sum(-2, keepdim=True).sqrt_().clamp_min_(1e-12).reciprocal_()
        A = X * inv  # a product: a division by the broadcast norm is ~1.6x slower on the CPU
        C = A[..., offset::stride].transpose(-1, -2) @ A  # (..., m, N)
        nb = (1.0 - C) <= eps  # as written in the definition, so that ties fall the same way
        n = X.shape[-1]
        # the item itself sits at column offset + i * stride of row i: one strided view of the flat matrix
        nb.view(*nb.shape[:-2], -1)[..., offset::n + stride].fill_(False)
        W = nb.to(X.dtype)
        W /= W.sum(-1, keepdim=True).clamp_min(1.0) * (W.numel() // n)  # mean over rows (and sets)
        P = W * C
        ctx.save_for_backward(A, inv, W, P)
        ctx.stride, ctx.offset = stride, offset
        return W.sum() - P.sum()

    @staticmethod
    def backward(ctx, grad: Tensor):
        A, inv, W, P = ctx.saved_tensors
        o, st = ctx.offset, ctx.stride
        W, P = W * grad, P * grad
        G = A[..., o::st] @ W  # G = -dL/dA
        G[..., o::st] += A @ W.transpose(-1, -2)
        c = P.sum(-2)  # <A_j, G_j>
        c[..., o::st] += P.sum(-1)
        # dL/dX = (G - A c) / (-|X|)
        return G.addcmul_(A, c.unsqueeze(-2), value=-1.0).mul_(inv.neg()), None, None, None


@torch.no_grad()
def _diagnostics_one(features: Tensor, eps: float) -> dict[str, Tensor]:
    dist = cosine_distance_matrix(features)
    n = dist.shape[0]
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=dist.device)
    nb = (dist <= eps) & off_diagonal
    count = nb.sum(dim=1).to(dist.dtype)
    has_nb = count > 0
    mean_nb_dist = ((nb * dist).sum(dim=1) / count.clamp_min(1))[has_nb]
    components = _connected_components(features, eps, cosine_distance_matrix, DEFAULT_CHUNK_ELEMENTS)
    largest = torch.unique(components, return_counts=True)[1].max()
    zero = dist.new_zeros(())
    return {
        "n_with_neighbours": has_nb.sum().to(dist.dtype),
        "share_with_neighbours": has_nb.to(dist.dtype).mean(),
        "mean_neighbour_count": count.mean(),
        "largest_cluster_size": largest.to(dist.dtype),
        "mean_neighbour_distance": mean_nb_dist.mean() if mean_nb_dist.numel() else zero,
    }


def sync_diagnostics(features: Tensor, eps: float, previous: Tensor | None = None) -> dict[str, float]:
    """The per-layer statistics of seed 000's "Functional Module Level" table, cosine distance, radius eps.

    ``features`` is (N, D) — N items (units) — or (B, N, D) for B mini-batches, averaged over B. Returns
      n_with_neighbours / share_with_neighbours : items with >= 1 other item within eps (count / fraction),
      mean_neighbour_count     : neighbours per item (itself excluded), mean over all items,
      largest_cluster_size     : size of the largest connected component of the eps-graph (single linkage),
      mean_neighbour_distance  : mean cosine distance to the neighbours, over items that have any,
      stability_l1             : mean |features - previous| (only when ``previous`` is given; lower = stabler).
    """
    if not isinstance(features, Tensor) or features.ndim not in (2, 3):
        raise ValueError("features must be a torch.Tensor of shape (N, D) or (B, N, D)")
    eps = _check_eps(eps)
    batches = features.detach() if features.ndim == 3 else features.detach().unsqueeze(0)
    for b in batches:
        _check_features(b)
    per_batch = [_diagnostics_one(b, eps) for b in batches]
    out = {key: float(torch.stack([d[key] for d in per_batch]).mean()) for key in per_batch[0]}
    if previous is not None:
        if not isinstance(previous, Tensor) or previous.shape != features.shape:
            raise ValueError(f"previous must be a tensor of the same shape as features {tuple(features.shape)}")
        out["stability_l1"] = float((features.detach() - previous.detach().to(features.device)).abs().mean())
    return out
