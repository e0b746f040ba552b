"""Neuron semantic embedding and the static knowledge distillation loss (seed 001).

Every unit i of a chosen layer L gets a learnable vector S^L_i in R^K (K = 16 in the paper), so a layer owns a
matrix S^L in R^{C x K}. With A^L in R^{C x N} the activation profiles of the C units over N samples, the vectors
are trained so that units which fire alike get similar vectors (seed 001, eq. 1):

    L_embedding = -1/|L| * 1/C * sum_L sum_{i,j} h(d(A^L, A^L))_{ij} * log h(d(S^L, S^L))_{ij}

with d the pairwise cosine similarity and h a row-wise softmax, i.e. a cross-entropy per unit (row) between the
target distribution over its fellow units given by activations and the one given by vectors, averaged over units
and layers. The minimum over S is the entropy of the target rows, reached when cos(S, S) reproduces cos(A, A)
(the diagonal, 1 on both sides, pins the per-row softmax shift).

Static knowledge distillation (eq. 2-3) swaps the roles: the teacher's fitted cos(S, S), computed once, is the
target and the student's activation similarities on the batch are the prediction,

    L = L_task + beta * L_SKD,   L_SKD = -1/|L| * 1/C * sum_L sum_{i,j} h(d(S_T, S_T)) log h(d(A_S, A_S)),

so no teacher forward pass is needed per sample.

Choices made here (the paper leaves them open):
- A unit's activation profile is its response across the samples of a batch. For convolutional layers the map of
  each channel is averaged over space first, so a (N, C, H, W) output gives a C x N profile matrix. (The paper's
  figure compares per-image activation maps, C x wh; the batch profile works for MLPs and conv layers alike.)
- The target side of each cross-entropy is detached: fitting S never moves the model, and SKD never moves S.
- Unit mapping in SKD: student unit i mirrors teacher unit i of the layer it is paired with, so the two layers
  must have the same width C; a mismatch raises ValueError (add a 1x1 conv / linear adapter to the student, or
  pair layers of equal width, as in the paper's VGG13 -> VGG8 and resnet32x4 -> resnet8x4 pairs).

torch does the tensor work; the Avalanche plugin for training the vectors alongside a network lives at the end
of this module, the distillation plugins in `strategies.plugins.distill`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avalanche.core import SupervisedPlugin

__all__ = [
    "ActivationRecorder",
    "NeuronEmbedding",
    "NeuronEmbeddingPlugin",
    "additive_relation",
    "cosine_matrix",
    "embedding_loss",
    "fit_neuron_embedding",
    "nearest_units",
    "similarity_cross_entropy",
    "skd_loss",
    "unit_profiles",
]

_EPS = 1e-8


# --------------------------------------------------------------------------------------------- similarities


def unit_profiles(activation: Tensor) -> Tensor:
    """Layer output (N, C, *spatial) -> C x N matrix of unit activation profiles (spatial dims averaged)."""
    if not isinstance(activation, Tensor):
        raise ValueError(f"expected a tensor of activations, got {type(activation).__name__}")
    if activation.dim() < 2:
        raise ValueError(
            f"activations need shape (batch, units, ...), got {tuple(activation.shape)}; "
            "record a layer whose output keeps the batch dimension first"
        )
    if activation.dim() > 2:
        activation = activation.flatten(2).mean(dim=2)
    return activation.transpose(0, 1)


def cosine_matrix(rows: Tensor) -> Tensor:
    """Pairwise cosine similarity of the rows of a (C, D) matrix (or of each matrix of a (L, C, D) stack); an
    all-zero row (dead unit) gets 0 everywhere."""
    unit = rows / rows.norm(dim=-1, keepdim=True).clamp_min(_EPS)
    return unit @ unit.transpose(-2, -1)


def similarity_cross_entropy(target_sim: Tensor, pred_sim: Tensor, temperature: float = 1.0,
                             target_is_softmax: bool = False) -> Tensor:
    """-1/C sum_{i,j} softmax(target/T)_{ij} log softmax(pred/T)_{ij}, both softmaxes taken over rows.

    A (L, C, C) stack of matrix pairs gives the sum of the L losses (each layer's gradient is its own loss's).
    ``target_is_softmax``: ``target_sim`` already holds softmax(target/T) (a fixed target fitted over many
    steps need not be normalised again each step)."""
    if target_sim.shape != pred_sim.shape or target_sim.dim() not in (2, 3) or \
            target_sim.shape[-1] != target_sim.shape[-2]:
        raise ValueError(
            f"similarity matrices must be square and of one shape, got {tuple(target_sim.shape)} "
            f"and {tuple(pred_sim.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    target = target_sim if target_is_softmax else F.softmax(target_sim / temperature, dim=-1)
    log_pred = F.log_softmax(pred_sim if temperature == 1.0 else pred_sim / temperature, dim=-1)
    return -(target * log_pred).sum(dim=-1).mean(dim=-1).sum()


def _check_widths(name: str, acts_units: int, vector_units: int, what: str) -> None:
    if acts_units != vector_units:
        raise ValueError(
            f"layer '{name}': the activations have {acts_units} units but {what} has {vector_units} rows; "
            "unit i is paired with row i, so pair layers of equal width (or add an adapter layer)"
        )


def _per_layer(acts, vectors) -> list[tuple[str, Tensor, Tensor]]:
    """Pair activations with vectors: two tensors, or two mappings sharing the layer names of `acts`."""
    if isinstance(vectors, NeuronEmbedding):
        vectors = dict(vectors.items())
    if isinstance(acts, Tensor) and isinstance(vectors, Tensor):
        return [("layer", acts, vectors)]
    if isinstance(acts, Mapping) and isinstance(vectors, Mapping):
        if not acts:
            raise ValueError("no activations given: record at least one layer")
        missing = [name for name in acts if name not in vectors]
        if missing:
            raise ValueError(f"no vectors for layers {missing}; known layers: {sorted(vectors)}")
        return [(name, acts[name], vectors[name]) for name in acts]
    raise ValueError("pass activations and vectors both as tensors or both as {layer name: tensor} mappings")


def embedding_loss(acts, S, temperature: float = 1.0) -> Tensor:
    """Seed 001 eq. 1: cross-entropy from softmax(cos(A, A)) (target, detached) to softmax(cos(S, S)).

    `acts` is one layer's output (N, C, ...) and `S` its (C, K) vectors, or both are {layer name: tensor} mappings
    (a `NeuronEmbedding` is one); the loss is then averaged over the layers of `acts`.
    """
    losses = []
    for name, act, vectors in _per_layer(acts, S):
        profiles = unit_profiles(act).detach()
        _check_widths(name, profiles.shape[0], vectors.shape[0], "the embedding")
        target = cosine_matrix(profiles.to(vectors.dtype))
        losses.append(similarity_cross_entropy(target, cosine_matrix(vectors), temperature))
    return torch.stack(losses).mean()


def skd_loss(student_acts, teacher_S, temperature: float = 1.0) -> Tensor:
    """Seed 001 eq. 2: cross-entropy from the teacher's softmax(cos(S_T, S_T)) (detached) to the student's
    softmax(cos(A_S, A_S)) on the batch; gradients reach the student only. Same argument forms as
    `embedding_loss`, with `teacher_S` keyed by the student's layer names."""
    losses = []
    for name, act, vectors in _per_layer(student_acts, teacher_S):
        profiles = unit_profiles(act)
        _check_widths(name, profiles.shape[0], vectors.shape[0], "the teacher's embedding")
        target = cosine_matrix(vectors.detach().to(device=profiles.device, dtype=profiles.dtype))
        losses.append(similarity_cross_entropy(target, cosine_matrix(profiles), temperature))
    return torch.stack(losses).mean()


# --------------------------------------------------------------------------------------------- the vectors


class NeuronEmbedding(nn.Module):
    """One learnable K-vector per unit per layer: S^L in R^{C x K} (seed 001, K = 16).

    Acts as a read-only mapping {layer name: (C, K) parameter}, so it can be passed wherever `embedding_loss`,
    `skd_loss` or `SKDPlugin` take vectors. Layer names are the model's submodule names (dots allowed).
    """

    def __init__(self, layer_sizes: Mapping[str, int], dim: int = 16, generator: torch.Generator | None = None):
        super().__init__()
        if not layer_sizes:
            raise ValueError("layer_sizes is empty: give {layer name: number of units}")
        bad = {name: size for name, size in layer_sizes.items() if int(size) < 2}
        if bad:
            raise ValueError(f"every layer needs >= 2 units to compare, got {bad}")
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.dim = dim
        self.layer_names = list(layer_sizes)
        # ParameterDict keys may not contain '.', which submodule names do; keep the names in a list instead.
        self.vectors = nn.ParameterList(
            nn.Parameter(torch.randn(int(size), dim, generator=generator)) for size in layer_sizes.values()
        )

    def __getitem__(self, layer: str) -> nn.Parameter:
        if layer not in self.layer_names:
            raise KeyError(f"no embedding for layer '{layer}'; known layers: {self.layer_names}")
        return self.vectors[self.layer_names.index(layer)]

    def __contains__(self, layer: object) -> bool:
        return layer in self.layer_names

    def keys(self) -> list[str]:
        return list(self.layer_names)

    def items(self) -> list[tuple[str, nn.Parameter]]:
        return list(zip(self.layer_names, self.vectors))

    def as_dict(self) -> dict[str, Tensor]:
        """Detached copies {layer: (C, K)}: the static knowledge to hand to a student."""
        return {name: vectors.detach().clone() for name, vectors in self.items()}

    def similarity(self, layer: str) -> Tensor:
        """cos(S^L, S^L), the unit x unit similarity the vectors encode."""
        return cosine_matrix(self[layer])

    def loss(self, acts: Mapping[str, Tensor], temperature: float = 1.0) -> Tensor:
        return embedding_loss(acts, self, temperature)


# --------------------------------------------------------------------------------------------- recording


class ActivationRecorder:
    """Forward hooks that keep the latest output of named submodules: `recorder.outputs[name]`.

    Use as a context manager or call `remove()`. With `detach=True` the stored outputs carry no graph.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], detach: bool = False):
        modules = dict(model.named_modules())
        missing = [name for name in layers if name not in modules]
        if missing:
            known = [name for name in modules if name]
            raise ValueError(f"layers {missing} are not submodules of the model; named submodules: {known}")
        if not layers:
            raise ValueError("give at least one layer name to record")
        self.model = model
        self.layers = list(layers)
        self.detach = detach
        self.outputs: dict[str, Tensor] = {}
        self._handles = [modules[name].register_forward_hook(self._hook(name)) for name in self.layers]

    def _hook(self, name: str):
        def keep(module, inputs, output):
            if not isinstance(output, Tensor):
                raise ValueError(
                    f"layer '{name}' returned {type(output).__name__}, not a tensor; record a submodule "
                    "whose output is a single tensor"
                )
            self.outputs[name] = output.detach() if self.detach else output

        return keep

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "ActivationRecorder":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _batches_of_inputs(data) -> Iterable[Tensor]:
    """Inputs from a tensor (one batch), or from an iterable of tensors or of (x, y, ...) tuples (a DataLoader)."""
    if isinstance(data, Tensor):
        yield data
        return
    for batch in data:
        yield batch[0] if isinstance(batch, (tuple, list)) else batch


@torch.no_grad()
def _record_profiles(model: nn.Module, layers: Sequence[str], data, device) -> list[dict[str, Tensor]]:
    """One forward pass over `data`; per batch the C x N profiles of every layer (kept on `device`)."""
    batches = []
    with ActivationRecorder(model, layers, detach=True) as recorder:
        for x in _batches_of_inputs(data):
            if x.shape[0] < 2:
                continue  # one sample gives no co-activation to compare
            model(x.to(device))
            batches.append({name: unit_profiles(recorder.outputs[name]) for name in layers})
    if not batches:
        raise ValueError("data gave no batch with >= 2 samples; pass a DataLoader or a tensor of inputs")
    return batches


def fit_neuron_embedding(
    model: nn.Module,
    layers: Sequence[str],
    data,
    dim: int = 16,
    epochs: int = 100,
    lr: float = 0.05,
    device: torch.device | str | None = None,
    temperature: float = 1.0,
    seed: int = 0,
) -> NeuronEmbedding:
    """Fit S post hoc on a trained network (seed 001 eq. 1); the model is left unchanged.

    The model runs once over `data` (a DataLoader, an iterable of batches or one input tensor) in eval mode;
    the per-batch activation profiles are cached and Adam fits the vectors for `epochs` passes over them, so
    cos(S, S) matches the batch-level cos(A, A) on average.
    """
    if epochs < 1 or lr <= 0:
        raise ValueError(f"epochs must be >= 1 and lr > 0, got epochs={epochs}, lr={lr}")
    if device is None:
        first_param = next(model.parameters(), None)
        device = first_param.device if first_param is not None else "cpu"
    device = torch.device(device)
    was_training = model.training
    model.eval()
    try:
        batches = _record_profiles(model, layers, data, device)
    finally:
        model.train(was_training)

    sizes = {name: profiles.shape[0] for name, profiles in batches[0].items()}
    embedding = NeuronEmbedding(sizes, dim, generator=torch.Generator().manual_seed(seed)).to(device)
    optimizer = torch.optim.Adam(embedding.parameters(), lr=lr)
    order = torch.Generator().manual_seed(seed)
    # Targets are fixed: compute each batch's cos(A, A) once instead of every epoch.
    targets = [{name: cosine_matrix(p) for name, p in batch.items()} for batch in batches]
    for _ in range(epochs):
        for index in torch.randperm(len(targets), generator=order).tolist():
            optimizer.zero_grad()
            loss = torch.stack(
                [
                    similarity_cross_entropy(target, cosine_matrix(embedding[name]), temperature)
                    for name, target in targets[index].items()
                ]
            ).mean()
            loss.backward()
            optimizer.step()
    return embedding


# --------------------------------------------------------------------------------------------- explanations


def _unit_rows(S: Tensor) -> Tensor:
    return S.detach() / S.detach().norm(dim=1, keepdim=True).clamp_min(_EPS)


def _top_k(scores: Tensor, exclude: Sequence[int], k: int) -> tuple[Tensor, Tensor]:
    scores = scores.clone()
    scores[list(exclude)] = float("-inf")
    k = min(k, scores.numel() - len(set(exclude)))
    values, indices = scores.topk(k)
    return indices, values


def nearest_units(S: Tensor, unit: int, k: int = 5) -> tuple[Tensor, Tensor]:
    """The k units whose vectors are most cosine-similar to unit `unit`'s ("which units fire alike").

    Returns (indices, cosine similarities), best first, the unit itself left out.
    """
    if not 0 <= unit < S.shape[0]:
        raise ValueError(f"unit {unit} out of range for a layer of {S.shape[0]} units")
    rows = _unit_rows(S)
    return _top_k(rows @ rows[unit], [unit], k)


def additive_relation(S: Tensor, a: int, b: int, k: int = 5) -> tuple[Tensor, Tensor]:
    """Units nearest (cosine) to S_a + S_b, the word2vec-style additive relation of seed 001 (Fig. 3).

    The two vectors are length-normalised before summing: the loss only constrains directions, so raw lengths
    carry no meaning. Units a and b are left out of the answer. Returns (indices, cosine similarities).
    """
    for unit in (a, b):
        if not 0 <= unit < S.shape[0]:
            raise ValueError(f"unit {unit} out of range for a layer of {S.shape[0]} units")
    rows = _unit_rows(S)
    query = rows[a] + rows[b]
    query = query / query.norm().clamp_min(_EPS)
    return _top_k(rows @ query, [a, b], k)


# --------------------------------------------------------------------------------------------- online fitting


class NeuronEmbeddingPlugin(SupervisedPlugin):
    """Train the neuron vectors alongside a network in an Avalanche strategy (seed 001: "during the training").

    Forward hooks keep the (detached) outputs of `layers` during each training forward; after the model's own
    update (`after_update`) the plugin takes `steps_per_update` Adam steps on the embedding loss of that
    mini-batch. It never touches the model's gradients, loss or optimizer. The vectors are created at the first
    forward, once the layer widths are known, from a private RNG (so the strategy's random stream is unchanged).
    The result is `plugin.embedding`.
    """

    def __init__(
        self,
        layers: Sequence[str],
        dim: int = 16,
        lr: float = 0.05,
        temperature: float = 1.0,
        steps_per_update: int = 1,
        seed: int = 0,
    ):
        super().__init__()
        if not layers:
            raise ValueError("give at least one layer name whose units get vectors")
        if lr <= 0 or steps_per_update < 1:
            raise ValueError(f"need lr > 0 and steps_per_update >= 1, got {lr}, {steps_per_update}")
        self.layers = list(layers)
        self.dim = dim
        self.lr = lr
        self.temperature = temperature
        self.steps_per_update = steps_per_update
        self.seed = seed
        self.embedding: NeuronEmbedding | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._recorder: ActivationRecorder | None = None

    def before_training_exp(self, strategy, *args, **kwargs):
        self._detach_hooks()
        self._recorder = ActivationRecorder(strategy.model, self.layers, detach=True)

    def after_training_exp(self, strategy, *args, **kwargs):
        self._detach_hooks()

    def after_update(self, strategy, *args, **kwargs):
        if self._recorder is None or not self._recorder.outputs:
            return
        acts = {name: self._recorder.outputs[name] for name in self.layers}
        if next(iter(acts.values())).shape[0] < 2:
            return  # a one-sample batch has no co-activation to learn from
        if self.embedding is None:
            sizes = {name: unit_profiles(a).shape[0] for name, a in acts.items()}
            generator = torch.Generator().manual_seed(self.seed)
            self.embedding = NeuronEmbedding(sizes, self.dim, generator=generator).to(strategy.device)
            self._optimizer = torch.optim.Adam(self.embedding.parameters(), lr=self.lr)
        for _ in range(self.steps_per_update):
            self._optimizer.zero_grad()
            self.embedding.loss(acts, self.temperature).backward()
            self._optimizer.step()

    def _detach_hooks(self) -> None:
        if self._recorder is not None:
            self._recorder.remove()
            self._recorder = None
