"""Representation analysis: CKA (full, debiased, mini-batch) and one-to-one neuron matching.

MISSION.md 1.5 (seeds 002, 004).

* CKA — Kornblith, Norouzi, Lee, Hinton, "Similarity of Neural Network Representations Revisited", ICML 2019:
  CKA(K, L) = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) on the Gram matrices of two representations of the same
  n examples. Linear kernel K = X X^T, RBF kernel exp(-||x_i - x_j||^2 / (2 sigma^2)) with
  sigma^2 = threshold^2 * median squared distance (as in the authors' public CKA demo notebook).
* Debiased CKA uses the unbiased HSIC estimator of Song et al. (JMLR 2012), with K~, L~ the Gram matrices with
  zeroed diagonals:
      HSIC_1(K, L) = [tr(K~ L~) + 1^T K~ 1 * 1^T L~ 1 / ((n-1)(n-2)) - 2/(n-2) * 1^T K~ L~ 1] / (n (n-3)).
* Mini-batch CKA — Nguyen, Raghu, Kornblith, "Do Wide and Deep Networks Learn the Same Things?", ICLR 2021:
  average HSIC_1 over mini-batches, then CKA = mean HSIC_1(K, L) / sqrt(mean HSIC_1(K, K) mean HSIC_1(L, L)).
  Unbiased per batch, so the average converges to the population value as batches accumulate.
* Matching — Li, Yosinski, Clune, Lipson, Hopcroft, "Convergent Learning: Do different neural networks learn
  the same representations?", ICLR 2016 (arXiv 2015): correlate every unit of net A with every unit of net B
  over the same inputs and pick the one-to-one assignment with the largest total correlation (Hungarian
  algorithm, ``scipy.optimize.linear_sum_assignment``).

Inputs may be numpy arrays or torch tensors on any device; the computation runs in float64 on the input's
device (CKA of nearly-identical representations loses digits in float32). Activations with more than two
dimensions are flattened to (n_examples, features) for CKA; for matching, a conv map (n, C, H, W) is read as
C units observed at n*H*W positions, as Li et al. do. Plots use matplotlib's object API with the Agg canvas, so
importing this module never changes the global backend.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

__all__ = [
    "gram_linear",
    "gram_rbf",
    "hsic_unbiased",
    "cka",
    "linear_cka",
    "rbf_cka",
    "debiased_linear_cka",
    "MiniBatchCKA",
    "cka_matrix",
    "collect_activations",
    "compare_models",
    "plot_cka_heatmap",
    "cross_correlation",
    "match_units",
]


# ----------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------

def _as_2d(x, name: str = "X", device=None) -> Tensor:
    """numpy/tensor activations -> float64 (n_examples, n_features) tensor, validated."""
    t = x.detach() if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))
    if device is not None:
        t = t.to(device)
    t = t.to(torch.float64)
    if t.ndim < 2:
        raise ValueError(f"{name} must have shape (n_examples, features...), got {tuple(t.shape)}; "
                         "add a feature axis, e.g. x.reshape(-1, 1)")
    t = t.reshape(t.shape[0], -1)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or inf; check the activations (e.g. a diverged model)")
    return t


def _pair(X, Y) -> tuple[Tensor, Tensor]:
    X = _as_2d(X, "X")
    Y = _as_2d(Y, "Y", device=X.device)
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"X and Y must describe the same examples: got {X.shape[0]} and {Y.shape[0]} rows")
    if X.shape[0] < 2:
        raise ValueError("CKA needs at least 2 examples")
    return X, Y


# ----------------------------------------------------------------------------------------------------------
# Gram matrices, centring, HSIC
# ----------------------------------------------------------------------------------------------------------

def gram_linear(X: Tensor) -> Tensor:
    """K = X X^T."""
    return X @ X.T


def gram_rbf(X: Tensor, threshold: float = 1.0) -> Tensor:
    """K_ij = exp(-||x_i - x_j||^2 / (2 threshold^2 median_{kl} ||x_k - x_l||^2)).

    The median runs over all n^2 squared distances, the zero diagonal included, as in Kornblith's demo.
    """
    if threshold <= 0:
        raise ValueError(f"threshold must be > 0, got {threshold}")
    dots = X @ X.T
    sq_norms = dots.diagonal()
    sq_dist = (sq_norms[:, None] + sq_norms[None, :] - 2 * dots).clamp_min(0)
    # numpy's median averages the two middle values for even counts; torch.median would take the lower one
    sq_median = torch.quantile(sq_dist.flatten(), 0.5)
    return torch.exp(-sq_dist / (2 * threshold ** 2 * sq_median))


def _center(K: Tensor) -> Tensor:
    """H K H with H = I - 11^T/n."""
    return K - K.mean(dim=0, keepdim=True) - K.mean(dim=1, keepdim=True) + K.mean()


def hsic_unbiased(K: Tensor, L: Tensor) -> Tensor:
    """Song et al. (2012) unbiased HSIC estimator HSIC_1 of two (n x n) Gram matrices, n > 3.

    Accepts stacked Grams: K (..., n, n), L (..., n, n) broadcast against each other.
    """
    n = K.shape[-1]
    if n <= 3:
        raise ValueError(f"the unbiased HSIC needs more than 3 examples per batch, got {n}")
    eye = torch.eye(n, dtype=torch.bool, device=K.device)
    K = K.masked_fill(eye, 0)
    L = L.masked_fill(eye, 0)
    trace_kl = (K * L).sum(dim=(-2, -1))  # tr(K~ L~), both symmetric
    k_row, l_row = K.sum(dim=-1), L.sum(dim=-1)
    middle = k_row.sum(-1) * l_row.sum(-1) / ((n - 1) * (n - 2))
    last = 2.0 / (n - 2) * (k_row * l_row).sum(-1)  # 1^T K~ L~ 1
    return (trace_kl + middle - last) / (n * (n - 3))


def _cka_from_grams(K: Tensor, L: Tensor, debiased: bool) -> Tensor:
    if debiased:
        kl, kk, ll = hsic_unbiased(K, L), hsic_unbiased(K, K), hsic_unbiased(L, L)
    else:
        Kc, Lc = _center(K), _center(L)
        kl, kk, ll = (Kc * Lc).sum(), (Kc * Kc).sum(), (Lc * Lc).sum()
    return kl / torch.sqrt(kk * ll)


def cka(X, Y, kernel: str = "linear", threshold: float = 1.0, debiased: bool = False) -> Tensor:
    """CKA between two representations X (n, p) and Y (n, q) of the same n examples. 0-d float64 tensor.

    kernel: "linear" or "rbf" (``threshold`` = sigma as a fraction of the median distance).
    debiased: use the unbiased HSIC estimator (less biased for n not >> features).
    """
    X, Y = _pair(X, Y)
    if kernel == "linear":
        if not debiased:
            # feature-space form, O(n p q) instead of O(n^2 (p + q)): ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)
            X = X - X.mean(dim=0, keepdim=True)
            Y = Y - Y.mean(dim=0, keepdim=True)
            return (Y.T @ X).square().sum() / torch.sqrt((X.T @ X).square().sum() * (Y.T @ Y).square().sum())
        K, L = gram_linear(X), gram_linear(Y)
    elif kernel == "rbf":
        K, L = gram_rbf(X, threshold), gram_rbf(Y, threshold)
    else:
        raise ValueError(f"kernel must be 'linear' or 'rbf', got {kernel!r}")
    return _cka_from_grams(K, L, debiased)


def linear_cka(X, Y) -> Tensor:
    """Linear CKA (Kornblith et al. 2019)."""
    return cka(X, Y, kernel="linear")


def rbf_cka(X, Y, threshold: float = 0.5) -> Tensor:
    """RBF-kernel CKA with sigma = threshold * median pairwise distance (Kornblith et al. 2019)."""
    return cka(X, Y, kernel="rbf", threshold=threshold)


def debiased_linear_cka(X, Y) -> Tensor:
    """Linear CKA with the unbiased HSIC estimator (Song et al. 2012; Nguyen et al. 2021)."""
    return cka(X, Y, kernel="linear", debiased=True)


# ----------------------------------------------------------------------------------------------------------
# Mini-batch CKA
# ----------------------------------------------------------------------------------------------------------

def _as_layer_list(acts) -> list[Tensor]:
    if isinstance(acts, Mapping):
        return list(acts.values())
    if isinstance(acts, (list, tuple)):
        return list(acts)
    return [acts]


class MiniBatchCKA:
    """Linear CKA accumulated over mini-batches (Nguyen et al. 2021), for one pair or layer x layer.

    ``update(acts_a, acts_b)`` takes one batch: each side a single activation array or a list/dict of layers
    (same examples on both sides, more than 3 per batch). ``compute()`` returns a 0-d tensor when single
    arrays were passed, else a (layers_a, layers_b) matrix. Nothing is synchronised to the host in
    ``update``; the sums stay on the activations' device.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._hsic_ab: Tensor | None = None
        self._hsic_aa: Tensor | None = None
        self._hsic_bb: Tensor | None = None
        self._scalar = False
        self.n_batches = 0

    @staticmethod
    def _grams(acts: list[Tensor], device) -> Tensor:
        return torch.stack([gram_linear(_as_2d(a, "activations", device=device)) for a in acts])

    def update(self, acts_a, acts_b) -> None:
        layers_a, layers_b = _as_layer_list(acts_a), _as_layer_list(acts_b)
        if not layers_a or not layers_b:
            raise ValueError("update() needs at least one layer on each side")
        device = layers_a[0].device if isinstance(layers_a[0], Tensor) else None
        Ka = self._grams(layers_a, device)  # (La, n, n)
        Kb = self._grams(layers_b, device)  # (Lb, n, n)
        if Ka.shape[-1] != Kb.shape[-1]:
            raise ValueError(f"both sides must hold the same batch of examples: {Ka.shape[-1]} vs {Kb.shape[-1]}")
        ab = hsic_unbiased(Ka[:, None], Kb[None, :])  # (La, Lb)
        aa, bb = hsic_unbiased(Ka, Ka), hsic_unbiased(Kb, Kb)
        if self._hsic_ab is None:
            self._hsic_ab, self._hsic_aa, self._hsic_bb = ab, aa, bb
            self._scalar = not isinstance(acts_a, (list, tuple, Mapping)) and \
                not isinstance(acts_b, (list, tuple, Mapping))
        else:
            if ab.shape != self._hsic_ab.shape:
                raise ValueError(f"layer counts changed between batches: {tuple(ab.shape)} vs "
                                 f"{tuple(self._hsic_ab.shape)}; call reset() to start over")
            self._hsic_ab = self._hsic_ab + ab
            self._hsic_aa = self._hsic_aa + aa
            self._hsic_bb = self._hsic_bb + bb
        self.n_batches += 1

    def compute(self) -> Tensor:
        if self._hsic_ab is None:
            raise ValueError("no batches accumulated; call update() first")
        # the 1/n_batches factors cancel in the ratio
        out = self._hsic_ab / torch.sqrt(self._hsic_aa[:, None] * self._hsic_bb[None, :])
        return out[0, 0] if self._scalar else out


def cka_matrix(acts_a: Sequence, acts_b: Sequence, kernel: str = "linear", threshold: float = 1.0,
               debiased: bool = False) -> Tensor:
    """Layer x layer CKA: entry (i, j) = CKA(acts_a[i], acts_b[j]). Returns a float64 tensor (La, Lb).

    Gram matrices are computed once per layer; all activations must hold the same n examples.
    """
    layers_a, layers_b = _as_layer_list(acts_a), _as_layer_list(acts_b)
    if not layers_a or not layers_b:
        raise ValueError("cka_matrix needs non-empty lists of activations")
    first = _as_2d(layers_a[0], "acts_a[0]")

    def grams(layers, side):
        out = []
        for i, a in enumerate(layers):
            a = _as_2d(a, f"{side}[{i}]", device=first.device)
            if a.shape[0] != first.shape[0]:
                raise ValueError(f"{side}[{i}] has {a.shape[0]} examples, acts_a[0] has {first.shape[0]}")
            out.append(gram_linear(a) if kernel == "linear" else gram_rbf(a, threshold))
        return out

    if kernel not in ("linear", "rbf"):
        raise ValueError(f"kernel must be 'linear' or 'rbf', got {kernel!r}")
    Ka, Kb = grams(layers_a, "acts_a"), grams(layers_b, "acts_b")
    return torch.stack([torch.stack([_cka_from_grams(K, L, debiased) for L in Kb]) for K in Ka])


# ----------------------------------------------------------------------------------------------------------
# Activations from torch models
# ----------------------------------------------------------------------------------------------------------

def _resolve_layers(model: nn.Module, layers: Iterable) -> list[tuple[str, nn.Module]]:
    by_name = dict(model.named_modules())
    by_id = {id(m): name for name, m in by_name.items()}
    resolved = []
    for layer in layers:
        if isinstance(layer, str):
            if layer not in by_name:
                raise ValueError(f"model has no submodule {layer!r}; available: {sorted(n for n in by_name if n)}")
            resolved.append((layer, by_name[layer]))
        elif isinstance(layer, nn.Module):
            if id(layer) not in by_id:
                raise ValueError(f"{type(layer).__name__} is not a submodule of the model")
            resolved.append((by_id[id(layer)], layer))
        else:
            raise ValueError(f"layers must be submodule names or modules, got {type(layer).__name__}")
    if not resolved:
        raise ValueError("give at least one layer")
    return resolved


def _batches(loader_or_tensor) -> Iterable[Tensor]:
    """A tensor is one batch; a loader yields tensors or (inputs, targets, ...) tuples (Avalanche adds task ids)."""
    if isinstance(loader_or_tensor, (Tensor, np.ndarray)):
        yield torch.as_tensor(loader_or_tensor)
        return
    for batch in loader_or_tensor:
        yield batch[0] if isinstance(batch, (list, tuple)) else batch


def _model_device(model: nn.Module) -> torch.device | None:
    for p in model.parameters():
        return p.device
    return None


@contextmanager
def _hooked(model: nn.Module, layers: Iterable, storage_device=None):
    """Forward hooks on ``layers``; yields a function x -> {layer name: output}, run in eval mode, no grad.

    Hooks are removed and the model's training mode restored on exit, whatever happens inside.
    """
    resolved = _resolve_layers(model, layers)
    captured: dict[str, Tensor] = {}
    handles = []
    for name, module in resolved:
        def hook(_module, _inputs, output, name=name):
            out = output[0] if isinstance(output, (tuple, list)) else output
            captured[name] = out.detach() if storage_device is None else out.detach().to(storage_device)
        handles.append(module.register_forward_hook(hook))
    device = _model_device(model)
    was_training = model.training
    model.eval()

    @torch.no_grad()
    def run(x: Tensor) -> dict[str, Tensor]:
        captured.clear()
        model(x.to(device) if device is not None else x)
        return {name: captured[name] for name, _ in resolved}

    try:
        yield run
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


def collect_activations(model: nn.Module, loader_or_tensor, layers: Iterable,
                        storage_device=None) -> dict[str, Tensor]:
    """Outputs of ``layers`` (submodule names or modules) over all inputs, concatenated along the batch.

    Runs the model in eval mode under ``torch.no_grad()`` (training mode is restored afterwards); inputs go to
    the model's device. ``storage_device`` (default: where the layer ran) is where the activations are kept,
    e.g. "cpu" for large datasets on a GPU model. Returns {name: tensor (n_examples, ...)} in ``layers`` order.
    """
    chunks: dict[str, list[Tensor]] = {}
    with _hooked(model, layers, storage_device) as layer_outputs:
        for x in _batches(loader_or_tensor):
            for name, out in layer_outputs(x).items():
                chunks.setdefault(name, []).append(out)
    if not chunks:
        raise ValueError("the data yielded no batches")
    return {name: torch.cat(parts) for name, parts in chunks.items()}


def compare_models(model_a: nn.Module, model_b: nn.Module, loader_or_tensor, layers_a: Iterable,
                   layers_b: Iterable, minibatch: bool = True) -> Tensor:
    """Layer x layer linear CKA between two models on the same data.

    minibatch=True streams the data through ``MiniBatchCKA`` (memory independent of the dataset size; the
    loader must give both models the same batches, so it must not reshuffle between the two passes — here
    each batch goes through both models at once). minibatch=False collects everything and uses
    ``cka_matrix`` (exact full-data linear CKA).
    """
    if not minibatch:
        acts_a = collect_activations(model_a, loader_or_tensor, layers_a)
        acts_b = collect_activations(model_b, loader_or_tensor, layers_b)
        return cka_matrix(list(acts_a.values()), list(acts_b.values()))
    accumulator = MiniBatchCKA()
    with _hooked(model_a, layers_a) as outputs_a, _hooked(model_b, layers_b) as outputs_b:
        for x in _batches(loader_or_tensor):
            accumulator.update(list(outputs_a(x).values()), list(outputs_b(x).values()))
    if accumulator.n_batches == 0:
        raise ValueError("the data yielded no batches")
    return accumulator.compute()


# ----------------------------------------------------------------------------------------------------------
# Plot
# ----------------------------------------------------------------------------------------------------------

def plot_cka_heatmap(matrix, path, labels_a: Sequence[str] | None = None, labels_b: Sequence[str] | None = None,
                     title: str = "CKA", xlabel: str = "model B", ylabel: str = "model A") -> Path:
    """Save a CKA matrix (rows: model A layers, columns: model B layers) as a PNG heat map; returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    m = matrix.detach().cpu().numpy() if isinstance(matrix, Tensor) else np.asarray(matrix, dtype=float)
    if m.ndim != 2:
        raise ValueError(f"matrix must be 2-D (layers_a, layers_b), got shape {m.shape}")
    for labels, size, side in ((labels_a, m.shape[0], "labels_a"), (labels_b, m.shape[1], "labels_b")):
        if labels is not None and len(labels) != size:
            raise ValueError(f"{side} has {len(labels)} entries for {size} layers")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a floor on the size keeps labels and title readable for the 2-3 layer matrices of small networks
    fig = Figure(figsize=(max(4.5, 1.5 + 0.5 * m.shape[1]), max(3.8, 1.2 + 0.5 * m.shape[0])), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(m, vmin=0.0, vmax=1.0, cmap="magma", origin="lower")
    if m.size <= 64:
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8, color="white" if v < 0.5 else "black")
    ax.set_xticks(range(m.shape[1]), labels_b if labels_b is not None else range(m.shape[1]), rotation=90)
    ax.set_yticks(range(m.shape[0]), labels_a if labels_a is not None else range(m.shape[0]))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


# ----------------------------------------------------------------------------------------------------------
# One-to-one neuron matching (convergent learning)
# ----------------------------------------------------------------------------------------------------------

def _units_last(acts, name: str, device=None) -> Tensor:
    """(n, units) stays; (n, C, *spatial) -> (n * prod(spatial), C): every position is an observation."""
    t = acts.detach() if isinstance(acts, Tensor) else torch.as_tensor(np.asarray(acts))
    if device is not None:
        t = t.to(device)
    t = t.to(torch.float64)
    if t.ndim < 2:
        raise ValueError(f"{name} must be (n_examples, units) or (n_examples, channels, ...), got {tuple(t.shape)}")
    if t.ndim > 2:
        t = t.movedim(1, -1).reshape(-1, t.shape[1])
    return t


def cross_correlation(acts_a, acts_b) -> Tensor:
    """Pearson correlation of every unit of A with every unit of B over the same inputs: (units_a, units_b).

    A unit that never varies has no defined correlation; it gets 0 with everything.
    """
    A = _units_last(acts_a, "acts_a")
    B = _units_last(acts_b, "acts_b", device=A.device)
    if A.shape[0] != B.shape[0]:
        raise ValueError(f"acts_a and acts_b must come from the same inputs: {A.shape[0]} vs {B.shape[0]} rows")
    if A.shape[0] < 2:
        raise ValueError("correlations need at least 2 observations")
    A = A - A.mean(dim=0)
    B = B - B.mean(dim=0)
    scale = torch.outer(A.norm(dim=0), B.norm(dim=0))
    corr = (A.T @ B) / scale
    return torch.where(scale > 0, corr, torch.zeros_like(corr))


def match_units(acts_a, acts_b) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one matching of the units of net A to those of net B (Li et al., convergent learning).

    Maximises the summed correlation with the Hungarian algorithm (scipy's linear_sum_assignment) on the
    cross-correlation matrix. Returns ``(permutation, correlations)``: unit i of A is matched to unit
    ``permutation[i]`` of B with correlation ``correlations[i]``. Needs units_a <= units_b (every unit of A is
    matched); with fewer units in B, swap the arguments.
    """
    corr = cross_correlation(acts_a, acts_b)
    if corr.shape[0] > corr.shape[1]:
        raise ValueError(f"net A has more units ({corr.shape[0]}) than net B ({corr.shape[1]}); swap the arguments")
    c = corr.cpu().numpy()
    rows, cols = linear_sum_assignment(c, maximize=True)
    permutation = np.empty(c.shape[0], dtype=np.int64)
    permutation[rows] = cols
    return permutation, c[np.arange(c.shape[0]), permutation]
