"""Neuron Importance-aware Weight Transfer (NIWT): zero-shot classifiers from domain knowledge.

Selvaraju, Chattopadhyay, Elhoseiny et al., "Choose Your Neuron: Incorporating Domain Knowledge through
Neuron-Importance", ECCV 2018 (seed 003; reference code github.com/ramprs/neuron-importance-zsl).

The three steps, each usable alone on any torch classifier (a modnet network or a torchvision model) on
any device:

1. ``class_importance``: importance of unit n of a layer L for class c,
       a_c^n = mean_{x in class c} mean_{i,j} d o_c(x) / d A^n_{ij}(x),
   the Grad-CAM channel weight (gradient of the class score w.r.t. the activation, averaged over space for
   conv maps, channels are the units), then averaged over the samples of the class.
2. ``KnowledgeToImportance``: a linear map W_{K->a}: knowledge (attributes, averaged word2vec, sentence
   embeddings) -> importance, trained with the cosine loss 1 - cos(W k_c + b, a_c); the epoch that scores
   best on held-out seen classes is kept (``fit_centered``: a closed-form ridge map of the classes' deviations
   from the seen mean instead, the importance all seen classes share left out of the prediction). Its inverse
   (importance -> knowledge) names the attributes behind an importance vector: ``importance_to_knowledge``
   (textual explanations, modnet/explain.py).
3. ``fit_unseen_weights``: for each unseen class u the predicted importance a*_u = W k_u + b; a new output
   weight vector w_u (initialised from a Gaussian with the seen weights' per-dimension mean and std) is
   optimised so that the importance it induces on seen images matches a*_u:
       L(w) = mean_b [1 - cos(d (w_{u_b} . f(x_b)) / d A(x_b), a*_{u_b})] + lambda * 0.5 * ||W_U - mean(w_S)||^2
   with f the classifier's input (penultimate features), Adam, stopped when the loss has not improved by 1%
   in 40 iterations. Defaults of the official code: lr 1e-3 / lambda 1e-3 (AWA2), lr 1e-4 / lambda 1e-2 (CUB).
   The loss fixes the direction of w_u only (cosine) and no loss reaches b_u (official: 0). ``match_seen_scale``
   then sets length and bias from seen images: ``negatives`` makes a new row score the images of other
   classes as the trained rows score theirs (mean and std of w_c . f(x) + b_c over x not of class c);
   ``seen_budget`` (configs/gzsl.yaml's default) then shifts every unseen row by one constant, the largest that
   sends at most a stated share of the seen training images to an unseen row.

Which layer: at the last layer before a linear classifier o = W f + b, the importance is d o_c / d f = w_c,
the class weight vector itself (after global average pooling, the same for every spatial position), so the
weights would simply be regressed from knowledge. NIWT therefore takes the importance one block deeper
(VGG16: conv5_3, ResNet-101: layer4[0]; for an MLP the hidden layer before the penultimate one), where the
induced importance J(x)^T w depends on the network between that layer and the classifier.

``NIWT`` ties the steps together and returns a ``GZSLModel`` scoring every class (seen and unseen). On a
network with one head per task (the HAT network, ``modnet.nets.models``) ``NIWT.fit_heads`` measures each seen
class through its own head, fits one knowledge -> importance map for the shared layer and unseen weights for
every head, which the network then takes as new rows of its heads (``HATNet.add_classes``).
PyTorch autograd does the gradients (forward hooks + ``torch.autograd.grad``, double backward for step 3).
"""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

ForwardFn = Callable[[Tensor], Tensor]

__all__ = [
    "class_importance",
    "sample_importance",
    "KnowledgeToImportance",
    "fit_unseen_weights",
    "UnseenWeights",
    "NIWT",
    "Head",
    "GZSLModel",
    "RoutingMap",
    "cosine_distance",
]


# ----------------------------------------------------------------------------------------------------------
# Step 1: class-dependent neuron importance
# ----------------------------------------------------------------------------------------------------------
class _ActivationCapture:
    """Forward hook that swaps a layer's output for a detached leaf that requires grad.

    Gradients w.r.t. that leaf are exactly d score / d activation, and the backward pass stops there (nothing
    is computed for the layers below, whose parameters may be frozen or not).
    """

    def __init__(self) -> None:
        self.activation: Tensor | None = None
        self.calls = 0

    def __call__(self, module: nn.Module, inputs, output):
        if not isinstance(output, Tensor):
            raise ValueError(f"NIWT needs a layer whose output is one tensor; {type(module).__name__} returned "
                             f"{type(output).__name__}. Pick a layer (e.g. a ReLU or a block) with a tensor output.")
        self.calls += 1
        leaf = output.detach().requires_grad_(True)
        self.activation = leaf
        return leaf


@contextlib.contextmanager
def _capture(layer: nn.Module) -> Iterator[_ActivationCapture]:
    capture = _ActivationCapture()
    handle = layer.register_forward_hook(capture)
    try:
        yield capture
    finally:
        handle.remove()


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    # Eval mode makes samples of a batch independent (BatchNorm running stats, no dropout), so the gradient of
    # the summed scores w.r.t. the batch activation is the per-sample gradient: one backward per batch.
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    # Only d score / d activation (and d / d W_U) are taken: with the network's parameters frozen, the layers
    # below the captured one build no graph (their outputs need none), which is most of a CNN's forward cost.
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _pool_units(grad: Tensor) -> Tensor:
    """[B, N, *spatial] -> [B, N]: average over space (dims >= 2); units are dim 1 (channels)."""
    return grad.flatten(2).mean(dim=2) if grad.dim() > 2 else grad


def _checked_activation(capture: _ActivationCapture, layer: nn.Module) -> Tensor:
    if capture.calls == 0 or capture.activation is None:
        raise ValueError(f"the layer {type(layer).__name__} was not called by the model's forward: pass a "
                         "submodule that the forward pass runs (e.g. model.layer4[0]).")
    if capture.calls > 1:
        raise ValueError(f"the layer {type(layer).__name__} ran {capture.calls} times in one forward pass; "
                         "importance needs a layer used once (wrap shared modules or pick another layer).")
    return capture.activation


def sample_importance(model: nn.Module, layer: nn.Module, x: Tensor, class_index: Tensor,
                      forward_fn: ForwardFn | None = None) -> Tensor:
    """Per-sample importance [B, N]: d o_{class_index[b]}(x_b) / d A(x_b), averaged over space.

    ``class_index`` holds output columns of the model (not dataset class ids). One forward and one backward
    pass for the whole batch; the model runs in eval mode. ``forward_fn`` replaces ``model(x)`` when the
    network needs extra arguments (e.g. ``lambda x: net(x, task_labels)``).
    """
    forward = forward_fn or model
    device = _model_device(model)
    x = x.to(device)
    class_index = class_index.to(device=device, dtype=torch.long)
    with _eval_mode(model), _frozen(model), torch.enable_grad(), _capture(layer) as capture:
        logits = forward(x)
        activation = _checked_activation(capture, layer)
        score = logits.gather(1, class_index[:, None]).sum()
        (grad,) = torch.autograd.grad(score, activation)
    return _pool_units(grad)


def class_importance(model: nn.Module, layer: nn.Module, x: Tensor, y: Tensor, n_classes: int,
                     batch_size: int = 256, forward_fn: ForwardFn | None = None) -> Tensor:
    """Class-dependent neuron importance [n_classes, N] (NIWT step 1, Grad-CAM channel weights per class).

    a_c^n = mean over the samples x of class c of mean over space of d o_c(x) / d A^n(x), where A is the
    output of ``layer`` (a submodule of ``model``; for conv maps the channels are the units) and o_c the
    model's output column c (the ground-truth class score of each sample; ``y`` holds output columns
    0..n_classes-1). Rows of classes without samples are zero.

    Runs batch by batch on the model's device (the inputs are moved there); returns a tensor on that device.
    At the last layer before a linear classifier this equals the class weight vector w_c (see module doc):
    take the layer one block deeper for NIWT. Used by modnet/explain.py for Grad-CAM and text explanations.
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} samples but y has {y.shape[0]} labels; pass one label per sample.")
    if x.shape[0] == 0:
        raise ValueError("class_importance needs at least one sample.")
    y = torch.as_tensor(y)
    if int(y.min()) < 0 or int(y.max()) >= n_classes:
        raise ValueError(f"labels must be output columns in [0, {n_classes}); got range "
                         f"[{int(y.min())}, {int(y.max())}]. Map dataset class ids to the model's columns first.")
    device = _model_device(model)
    sums: Tensor | None = None
    counts = torch.zeros(n_classes, device=device)
    for start in range(0, x.shape[0], batch_size):
        yb = y[start:start + batch_size].to(device=device, dtype=torch.long)
        imp = sample_importance(model, layer, x[start:start + batch_size], yb, forward_fn)
        if sums is None:
            sums = torch.zeros(n_classes, imp.shape[1], device=device, dtype=imp.dtype)
        sums.index_add_(0, yb, imp)
        counts.index_add_(0, yb, torch.ones_like(yb, dtype=counts.dtype))
    assert sums is not None
    return sums / counts.clamp(min=1).to(sums.dtype)[:, None]


# ----------------------------------------------------------------------------------------------------------
# Step 2: domain knowledge -> importance (and back)
# ----------------------------------------------------------------------------------------------------------
def cosine_distance(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise 1 - cos(a, b), the loss of the NIWT steps 2 and 3."""
    return 1.0 - F.cosine_similarity(a, b, dim=-1, eps=1e-12)


MAP_FITS = ("adam", "centered")


def centered_ridge(k: Tensor, y: Tensor, ridge: float, dual: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """(mean k, mean y, B) of the ridge regression of the centred targets on the centred inputs,
        B = argmin ||(k - mean k) B - (y - mean y)||^2 + lam ||B||^2,   lam = ridge x mean_i ||k_i - mean k||^2
    (scale-free; the bias, mean y - mean k B, unpenalised). ``dual``: B = kc' (kc kc' + lam I)^-1 yc, the
    cheaper form when there are fewer rows than input dimensions; else the primal (kc' kc + lam I)^-1 kc' yc."""
    k_mean, y_mean = k.mean(0), y.mean(0)
    kc, yc = k - k_mean, y - y_mean
    gram = kc @ kc.T if dual else kc.T @ kc
    lam = ridge * gram.trace() / kc.shape[0]
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    coef = kc.T @ torch.linalg.solve(gram + lam * eye, yc) if dual else torch.linalg.solve(gram + lam * eye,
                                                                                              kc.T @ yc)
    return k_mean, y_mean, coef


class KnowledgeToImportance(nn.Module):
    """Linear map knowledge [A] -> importance [N], a = k W + b (NIWT step 2), with an inverse map.

    ``fit`` trains it with the cosine loss on (knowledge, importance) pairs of seen classes with Adam, full
    batch, and keeps the epoch with the lowest cosine loss on held-out seen classes (the official code keeps
    the best rank correlation on held-out classes). With ``refit_all`` it then trains again from the same
    initialisation on every seen class for that many epochs, which helps when there are few seen classes.

    The inverse map importance -> knowledge (``importance_to_knowledge``) serves textual explanations: its
    largest entries name the attributes behind an importance vector. ``inverse="lstsq"``: closed-form ridge
    regression from L2-normalised importance to knowledge fitted on the same seen pairs (the paper's
    W_{a->K}); ``inverse="pinv"``: Moore-Penrose pseudo-inverse of the forward map, k = (a - b) W^+, needing
    nothing but the forward map (exact when a lies in its range, i.e. for importances on the map's own scale
    such as its predictions; for measured importances prefer lstsq, which ignores their scale).
    """

    def __init__(self, knowledge_dim: int, importance_dim: int, bias: bool = True, inverse: str = "lstsq",
                 inverse_ridge: float = 1e-3, init: str = "zero"):
        super().__init__()
        if inverse not in ("lstsq", "pinv"):
            raise ValueError(f"inverse must be 'lstsq' or 'pinv', got {inverse!r}")
        if init not in ("zero", "random"):
            raise ValueError(f"init must be 'zero' or 'random', got {init!r}")
        self.linear = nn.Linear(knowledge_dim, importance_dim, bias=bias)
        self.init = init
        self.inverse = inverse
        self.inverse_ridge = inverse_ridge
        self.register_buffer("inverse_matrix", torch.zeros(importance_dim, knowledge_dim))
        self.register_buffer("inverse_bias", torch.zeros(knowledge_dim))
        self.best_epoch = 0
        self.history: dict[str, list[float]] = {"train": [], "val": []}  # cosine loss per epoch

    @property
    def matrix(self) -> Tensor:
        """W_{K->a} as [A, N]: importance = knowledge @ matrix + bias."""
        return self.linear.weight.t()

    @property
    def bias(self) -> Tensor:
        return self.linear.bias if self.linear.bias is not None else torch.zeros_like(self.linear.weight[:, 0])

    def forward(self, knowledge: Tensor) -> Tensor:
        return self.linear(knowledge)

    def fit(self, knowledge: Tensor, importance: Tensor, pair_classes: Tensor | None = None, *,
            val_fraction: float = 0.2, epochs: int = 500, lr: float = 1e-2, weight_decay: float = 0.0,
            refit_all: bool = False, seed: int = 0) -> "KnowledgeToImportance":
        """Train on rows (knowledge[i], importance[i]); ``pair_classes[i]`` (default: i) is the class of row i.

        A ``val_fraction`` of the classes (at least one when there are 3 or more) is held out to pick the
        epoch; with fewer than 3 classes the last epoch is kept.
        """
        if knowledge.shape[0] != importance.shape[0]:
            raise ValueError(f"knowledge has {knowledge.shape[0]} rows but importance has {importance.shape[0]}; "
                             "pass one knowledge row per importance row.")
        if not torch.isfinite(knowledge).all() or not torch.isfinite(importance).all():
            raise ValueError("knowledge or importance contains NaN/inf; clean the inputs "
                             "(modnet.methods.knowledge.attribute_matrix handles missing attribute values).")
        device = self.linear.weight.device
        knowledge = knowledge.to(device=device, dtype=torch.float32)
        importance = importance.to(device=device, dtype=torch.float32)
        classes = torch.arange(knowledge.shape[0], device=device) if pair_classes is None else \
            torch.as_tensor(pair_classes, device=device)
        unique = torch.unique(classes)
        generator = torch.Generator().manual_seed(seed)
        n_val = int(round(val_fraction * len(unique))) if len(unique) >= 3 else 0
        n_val = min(max(n_val, 1 if len(unique) >= 3 and val_fraction > 0 else 0), len(unique) - 1)
        val_classes = unique[torch.randperm(len(unique), generator=generator)[:n_val].to(device)]
        is_val = torch.isin(classes, val_classes)

        if self.init == "zero":
            # With fewer seen classes than knowledge dimensions the fit is under-determined: gradient descent
            # never touches the directions of W that no seen class spans, so a random start would leave noise
            # there for the unseen classes. Zero weights (and the mean direction as bias) converge instead
            # toward the minimum-norm map. (The official code starts from random normal weights.)
            with torch.no_grad():
                self.linear.weight.zero_()
                if self.linear.bias is not None:
                    self.linear.bias.copy_(F.normalize(importance[~is_val], dim=1).mean(0))
        init_state = copy.deepcopy(self.linear.state_dict())
        best = self._train(knowledge[~is_val], importance[~is_val], knowledge[is_val], importance[is_val],
                           epochs, lr, weight_decay)
        if refit_all and n_val > 0:
            self.linear.load_state_dict(init_state)
            self._train(knowledge, importance, knowledge[:0], importance[:0], best + 1, lr, weight_decay,
                        record=False)
        self.best_epoch = best
        self.history = {k: [float(v) for v in torch.stack(vals).tolist()] if vals else []
                        for k, vals in self.history.items()}  # one host transfer after training
        self._fit_inverse(knowledge, importance)
        return self

    def fit_centered(self, knowledge: Tensor, importance: Tensor, ridge: float = 0.01) -> "KnowledgeToImportance":
        """Closed-form map of class DEVIATIONS: a(k) = (k - mean k) B with
            B = argmin sum_i ||(k_i - mean k) B - (a_i - mean a)||^2 + lam ||B||^2,   a_i L2-normalised,
        lam = ``ridge`` x the mean squared norm of the centred k_i (scale-free). The importance every seen class
        shares (mean a) is left out of the prediction: a softmax head's rows sum to little, so each class's
        importance points away from the mean of the others (digits: cos -0.5..-0.7) and a map that keeps the
        mean (the Adam fit's bias) predicts, for a class it has not seen, mostly that shared part. What tells
        classes apart is the deviation, which the deviation of the knowledge predicts. Needs the map's bias."""
        if self.linear.bias is None:
            raise ValueError("fit_centered needs a map with a bias (bias=True): a(k) = (k - mean k) B")
        device = self.linear.weight.device
        k = knowledge.to(device=device, dtype=torch.float32)
        a = F.normalize(importance.to(device=device, dtype=torch.float32), dim=1)
        k_mean, _, coef = centered_ridge(k, a, ridge)  # [A, N]
        with torch.no_grad():
            self.linear.weight.copy_(coef.T)
            self.linear.bias.copy_(-k_mean @ coef)
        self.best_epoch, self.history = 0, {"train": [], "val": []}
        self._fit_inverse(knowledge.to(device=device, dtype=torch.float32), importance.to(device=device,
                                                                                        dtype=torch.float32))
        return self

    def _train(self, k_train: Tensor, a_train: Tensor, k_val: Tensor, a_val: Tensor, epochs: int, lr: float,
               weight_decay: float, record: bool = True) -> int:
        """Full-batch Adam; returns the best held-out epoch and leaves its parameters in the map."""
        optimizer = torch.optim.Adam(self.linear.parameters(), lr=lr, weight_decay=weight_decay)
        params = list(self.linear.parameters())
        has_val = k_val.shape[0] > 0
        # The best epoch is tracked on the device (torch.where) so the loop never waits for the host.
        best_params = [p.detach().clone() for p in params]
        best_val = torch.full((), math.inf, device=params[0].device)
        best_epoch = torch.zeros((), dtype=torch.long, device=params[0].device)
        for epoch in range(epochs):
            optimizer.zero_grad(set_to_none=True)
            loss = cosine_distance(self.linear(k_train), a_train).mean()
            loss.backward()
            optimizer.step()
            if record:
                self.history["train"].append(loss.detach())
            if not has_val:
                continue
            with torch.no_grad():
                val = cosine_distance(self.linear(k_val), a_val).mean()
                improved = val < best_val
                best_val = torch.minimum(val, best_val)
                best_epoch = torch.where(improved, torch.full_like(best_epoch, epoch), best_epoch)
                for p, b in zip(params, best_params):
                    b.copy_(torch.where(improved, p, b))
            if record:
                self.history["val"].append(val)
        if not has_val:
            return epochs - 1
        with torch.no_grad():
            for p, b in zip(params, best_params):
                p.copy_(b)
        return int(best_epoch)

    def _fit_inverse(self, knowledge: Tensor, importance: Tensor) -> None:
        with torch.no_grad():
            if self.inverse == "pinv":
                self.inverse_matrix.copy_(torch.linalg.pinv(self.matrix))
                self.inverse_bias.zero_()
                return
            m, b = ridge_inverse(knowledge, importance, self.inverse_ridge)
            self.inverse_matrix.copy_(m)
            self.inverse_bias.copy_(b)

    def importance_to_knowledge(self, importance: Tensor) -> Tensor:
        """Inverse map: importance [N] or [B, N] -> knowledge [A] or [B, A] (textual explanations).

        Rank the attributes of the result (e.g. ``topk``) to name the attributes behind a class's or a
        sample's importance (the output of ``class_importance`` / ``sample_importance``). With the default
        ``inverse="lstsq"`` the input's scale does not matter (it is L2-normalised first).
        """
        importance = importance.to(self.inverse_matrix)
        if self.inverse == "pinv":
            return (importance - self.bias.detach()) @ self.inverse_matrix
        return F.normalize(importance, dim=-1) @ self.inverse_matrix + self.inverse_bias


def ridge_inverse(knowledge: Tensor, importance: Tensor, ridge: float) -> tuple[Tensor, Tensor]:
    """(M, b): ridge least squares k ~ normalize(a) M + b over the rows of (knowledge [C x A], importance [C x N]),
    on centred, L2-normalised importance (scale-free, like the cosine loss); the dual form when C < N."""
    a = F.normalize(importance, dim=1)
    a_mean, k_mean = a.mean(0), knowledge.mean(0)
    a_c, k_c = a - a_mean, knowledge - k_mean
    n = a_c.shape[1]
    if a_c.shape[0] < n:  # dual form: fewer pairs than units
        gram = a_c @ a_c.T + ridge * torch.eye(a_c.shape[0], device=a.device, dtype=a.dtype)
        m = a_c.T @ torch.linalg.solve(gram, k_c)
    else:
        gram = a_c.T @ a_c + ridge * torch.eye(n, device=a.device, dtype=a.dtype)
        m = torch.linalg.solve(gram, a_c.T @ k_c)
    return m, k_mean - a_mean @ m


def held_out_knowledge(knowledge: Tensor, importance: Tensor, ridge: float = 1e-3) -> Tensor:
    """Row c: class c's knowledge as predicted from its importance ``importance[c]`` by the inverse map
    (``ridge_inverse``) fitted on every other class (leave one class out).

    The textual explanation of a class must not be fitted on that class: with fewer classes than units the
    inverse map interpolates its own pairs, so mapping a fitted class's importance back returns its knowledge row
    whatever the network does (digits: each class's "explanation" was its own segment list, scaled to unit length).
    Held out, the prediction is what the network's importance for the class says, learned from the others; it can
    be compared with the class's knowledge (``knowledge_agreement``)."""
    c = knowledge.shape[0]
    if c < 3:
        raise ValueError(f"a held-out inverse map needs at least 3 classes (2 to fit, 1 held out), got {c}")
    knowledge, importance = knowledge.float(), importance.float()
    rows = []
    for i in range(c):
        keep = torch.arange(c, device=knowledge.device) != i
        m, b = ridge_inverse(knowledge[keep], importance[keep], ridge)
        rows.append(F.normalize(importance[i], dim=0) @ m + b)
    return torch.stack(rows)


def knowledge_agreement(predicted: Tensor, knowledge: Tensor) -> Tensor:
    """Per class, the cosine between its predicted and its own knowledge row, both centred on the classes' mean
    knowledge (0: the prediction says nothing about the class beyond the average class; 1: its deviations exactly)."""
    mean = knowledge.float().mean(0)
    return F.cosine_similarity(predicted.float() - mean, knowledge.float() - mean, dim=1)


# ----------------------------------------------------------------------------------------------------------
# Step 3: importance -> unseen classifier weights
# ----------------------------------------------------------------------------------------------------------
@dataclass
class UnseenWeights:
    """Output weights [U, D] and biases [U] of the unseen classes (rows in the order of the targets)."""

    weight: Tensor
    bias: Tensor
    n_iterations: int
    losses: list[float] = field(default_factory=list)


class _InputCapture:
    """Forward pre-hook keeping the classifier's input f (the penultimate features)."""

    def __init__(self) -> None:
        self.features: Tensor | None = None

    def __call__(self, module: nn.Module, inputs):
        self.features = inputs[0]


@torch.no_grad()
def _classifier_inputs(model: nn.Module, classifier: nn.Linear, x: Tensor, batch_size: int,
                       forward_fn: ForwardFn | None = None) -> Tensor:
    """The classifier's input f(x) [n, D] for every row of x (eval mode, batch by batch, on the model's device)."""
    forward, device, features = forward_fn or model, _model_device(model), _InputCapture()
    out = []
    with _eval_mode(model):
        handle = classifier.register_forward_pre_hook(features)
        try:
            for start in range(0, x.shape[0], batch_size):
                forward(x[start:start + batch_size].to(device))
                out.append(features.features)
        finally:
            handle.remove()
    return torch.cat(out)


def _seen_weight_statistics(classifier: nn.Linear, seen_columns: Sequence[int] | None):
    weight = classifier.weight.detach()
    bias = classifier.bias.detach() if classifier.bias is not None else torch.zeros_like(weight[:, 0])
    if seen_columns is not None:
        cols = torch.as_tensor(list(seen_columns), device=weight.device, dtype=torch.long)
        weight, bias = weight[cols], bias[cols]
    std = weight.std(0, unbiased=False) if weight.shape[0] > 1 else torch.zeros_like(weight[0])
    return weight.mean(0), std, bias.mean()


def _pair_scores(classifier: nn.Linear, features: Tensor, weight: Tensor) -> Tensor:
    """[B]: the score row ``weight[b]`` gives feature vector b through ``classifier``'s own scoring (w . f for a
    linear head, a cosine head's tau * cos(w, f)), without bias (no importance depends on it)."""
    if hasattr(classifier, "pair_scores"):
        return classifier.pair_scores(features, weight)
    return (features * weight).sum(-1)


_SKIP_HEAD_INPUT_FORWARD = True  # fit_unseen_weights at the head's input: no forward after the first (False: A/B)


def _head_input_loss(weight: Tensor, target_directions: Tensor, share: Tensor, w_mean: Tensor,
                     lam: float) -> tuple[Tensor, Tensor]:
    """Step 3's loss and its gradient at the head's input, where image b's induced importance is the row w_{u_b}
    itself: the batch's mean_b [1 - cos(w_{u_b}, t_{u_b})] is sum_u p_u (1 - cos(w_u, t_u)) with p_u the share of
    the batch paired with class u (``share``; match="batch": 1 / #present for each present class), so

        L = sum_u p_u (1 - c_u) + lam / 2 ||W - w_mean||^2,   c_u = w_u . t^_u / |w_u|,   t^_u = t_u / |t_u|
        dL/dw_u = p_u / |w_u| (c_u w_u / |w_u| - t^_u) + lam (w_u - w_mean)

    U rows instead of B and no autograd graph (no input requires a gradient): ~70 us against ~400 us for the batch's
    rows through autograd (a CPU core, U = 3, D = 256). ``target_directions``: t^ [U, N] (zero rows for zero targets,
    whose cosine is 0 as F.cosine_similarity's)."""
    norm = weight.norm(dim=1).clamp_min(1e-12)
    cos = (weight * target_directions).sum(1).div_(norm)
    coef = share / norm
    diff = weight - w_mean
    grad = weight * (coef * cos / norm)[:, None] - target_directions * coef[:, None]
    grad.add_(diff, alpha=lam)
    loss = (share * (1.0 - cos)).sum() + lam * 0.5 * diff.pow(2).sum()
    return loss, grad


UNSEEN_INITS = ("seen_centered", "seen_mean")
UNSEEN_BIASES = ("zero", "seen_mean")


def fit_unseen_weights(model: nn.Module, layer: nn.Module, classifier: nn.Linear, x_seen: Tensor,
                       target_importance: Tensor, *, seen_columns: Sequence[int] | None = None,
                       lr: float = 1e-3, lam: float = 1e-3, batch_size: int = 64, patience: int = 40,
                       min_improvement: float = 0.01, max_iterations: int = 5000,
                       forward_fn: ForwardFn | None = None, seed: int = 0, match: str = "sample",
                       init: str = "seen_centered", bias: str = "zero", progress: bool = False) -> UnseenWeights:
    """NIWT step 3: new output weights whose induced importance matches ``target_importance`` [U, N].

    Each iteration draws ``batch_size`` seen images and pairs each with one unseen class u_b (the classes in
    turn, shuffled), as the official code does; the importance that w_{u_b} induces on x_b at ``layer`` is
    alpha_b = d (w_{u_b} . f(x_b)) / d A(x_b) (one backward for the batch, kept differentiable w.r.t. W_U),
    and the loss is mean_b [1 - cos(alpha_b, target[u_b])] + lam * 0.5 * ||W_U - mean(w_seen)||^2.
    Adam on W_U; stops when the loss has not improved by ``min_improvement`` (relative, 1%) for ``patience``
    (40) iterations, or after ``max_iterations``. The importance does not depend on the biases, so they are
    set, not fitted: ``bias="zero"`` b_u = 0 (the official code: its new head's biases start at 0 and no loss
    reaches them), ``"seen_mean"`` b_u = mean(b_seen). The network and the seen weights are not modified.
    The loss is blind to the scale of w_u too (cosine); ``match_seen_scale`` puts the rows on the seen scale.

    ``seen_columns``: the classifier rows that hold trained seen classes (default: all rows).
    ``match="batch"`` compares each class's importance averaged over its samples in the batch with the target
    instead (the class importance of step 1 is such an average); ``"sample"`` is the official per-image loss.
    """
    from torch.optim.adam import adam

    if match not in ("sample", "batch"):
        raise ValueError(f"match must be 'sample' or 'batch', got {match!r}")
    if init not in UNSEEN_INITS:
        raise ValueError(f"init must be one of {', '.join(UNSEEN_INITS)}, got {init!r}")
    if bias not in UNSEEN_BIASES:
        raise ValueError(f"bias must be one of {', '.join(UNSEEN_BIASES)}, got {bias!r}")
    device = _model_device(model)
    if target_importance.dim() != 2:
        raise ValueError(f"target_importance must be [n_unseen, n_units], got {tuple(target_importance.shape)}")
    if not torch.isfinite(target_importance).all():
        raise ValueError("target_importance contains NaN/inf; check the knowledge vectors of the unseen classes.")
    if x_seen.shape[0] == 0:
        raise ValueError("fit_unseen_weights needs seen-class samples to measure the induced importance.")
    targets = target_importance.to(device=device, dtype=torch.float32)
    n_unseen = targets.shape[0]
    forward = forward_fn or model
    generator = torch.Generator().manual_seed(seed)

    w_mean, w_std, b_mean = _seen_weight_statistics(classifier, seen_columns)
    noise = torch.randn(n_unseen, w_mean.shape[0], generator=generator).to(device)
    if init == "seen_mean":
        noise.zero_()  # drawn all the same, so that the batches below do not depend on the init
    weight = (w_mean + w_std * noise).requires_grad_(True)
    unseen_bias = (b_mean if bias == "seen_mean" else torch.zeros_like(b_mean)).expand(n_unseen).clone()
    # torch.optim.Adam's own update (torch.optim.adam.adam, the function its step() calls, on the state its step()
    # would create), without step()'s per-call bookkeeping: ~55 us against ~110 us an iteration on a CPU core
    adam_state = ([torch.zeros_like(weight)], [torch.zeros_like(weight)], [torch.tensor(0.0)])

    # The stopping rule runs on the device; the host looks at it every iteration on CPU and every 10 on an
    # accelerator (one sync per 10 steps; the loop then stops at most 9 iterations after the rule fired).
    best_loss = torch.full((), math.inf, device=device)
    since_best = torch.zeros((), dtype=torch.long, device=device)
    check_every = 1 if device.type == "cpu" else 10
    losses: list[Tensor] = []
    iterator = range(max_iterations)
    if progress:
        from tqdm.auto import tqdm  # optional progress bar
        iterator = tqdm(iterator, desc="NIWT unseen weights", leave=False)
    features = _InputCapture()
    n_done = 0
    # When the captured layer is the linear head's input itself (niwt.layer=-1 on a modular network), the induced
    # importance is the row: d (w_u . f) / d f = w_u for every image, so after the first pass (which checks that
    # it is) no forward is run and the loss is the U rows' (_head_input_loss); the batches are still drawn, so the
    # generator's stream is the full loop's and every value is its value to rounding.
    head_input = None
    target_directions = targets / targets.norm(dim=1, keepdim=True).clamp_min(1e-12)
    with _eval_mode(model), _frozen(model), torch.enable_grad(), _capture(layer) as capture:
        handle = classifier.register_forward_pre_hook(features)
        try:
            for it in iterator:
                idx = torch.randint(0, x_seen.shape[0], (batch_size,), generator=generator)
                classes = torch.randperm(n_unseen, generator=generator).repeat(batch_size // n_unseen + 1)
                classes = classes[:batch_size]
                if head_input:
                    # the loss over the batch's rows w_{u_b} is a weighted loss over the U rows (each class's
                    # share of the batch), its gradient written out (_head_input_loss): the same values to rounding
                    counts = torch.bincount(classes, minlength=n_unseen).to(torch.float32)
                    share = counts / batch_size if match == "sample" else (counts > 0).float() / (counts > 0).sum()
                    loss, grad = _head_input_loss(weight.detach(), target_directions, share.to(device), w_mean, lam)
                else:
                    classes = classes.to(device)
                    capture.calls = 0
                    forward(x_seen[idx].to(device))
                    activation = _checked_activation(capture, layer)
                    if features.features is None:
                        raise ValueError("the classifier was not called by the model's forward; pass the nn.Linear "
                                         "that produces the class scores.")
                    if head_input is None:
                        head_input = (_SKIP_HEAD_INPUT_FORWARD and features.features is activation
                                      and activation.dim() == 2 and not hasattr(classifier, "pair_scores"))
                    score = _pair_scores(classifier, features.features, weight[classes]).sum()
                    (alpha,) = torch.autograd.grad(score, activation, create_graph=True)
                    alpha = _pool_units(alpha)
                    if match == "sample":
                        match_loss = cosine_distance(alpha, targets[classes]).mean()
                    else:  # the batch mean of each class's induced importance against its target
                        sums = torch.zeros_like(targets).index_add(0, classes, alpha)
                        counts = torch.bincount(classes, minlength=n_unseen)
                        present = (counts > 0).to(sums.dtype)   # classes absent from this batch do not count
                        distance = cosine_distance(sums / counts.clamp(min=1)[:, None], targets)
                        match_loss = (distance * present).sum() / present.sum()
                    loss = match_loss + lam * 0.5 * (weight - w_mean).pow(2).sum()
                    (grad,) = torch.autograd.grad(loss, weight)
                with torch.no_grad():
                    adam([weight], [grad], *adam_state[:2], [], adam_state[2], amsgrad=False,
                         beta1=0.9, beta2=0.999, lr=lr, weight_decay=0.0, eps=1e-8, maximize=False)
                value = loss.detach()
                losses.append(value)
                n_done = it + 1
                improved = value < best_loss * (1.0 - min_improvement)
                best_loss = torch.where(improved, value, best_loss)
                since_best = torch.where(improved, torch.zeros_like(since_best), since_best + 1)
                if n_done % check_every == 0 and bool(since_best >= patience):
                    break
        finally:
            handle.remove()
    history = torch.stack(losses).tolist() if losses else []
    return UnseenWeights(weight=weight.detach(), bias=unseen_bias, n_iterations=n_done, losses=history)


UNSEEN_SCALES = ("none", "norm", "negatives", "positives", "seen_budget")


def _check_seen_budget(seen_budget: float) -> None:
    if not 0.0 <= seen_budget < 1.0:
        raise ValueError(f"seen_budget is a share of the seen training images in [0, 1), got {seen_budget}")


def match_seen_scale(weight: Tensor, bias: Tensor, seen_weight: Tensor, seen_bias: Tensor, features: Tensor,
                     own: Tensor, mode: str, seen_knowledge: Tensor | None = None,
                     unseen_knowledge: Tensor | None = None, mean_ridge: float = 0.01,
                     seen_budget: float = 0.075) -> tuple[Tensor, Tensor]:
    """Unseen rows (``weight`` [U, D], ``bias`` [U]) put on the scale of the seen rows, from seen images only.

    Step 3's loss is a cosine: it fixes the direction of w_u, never its length, and no loss reaches b_u; how
    an unseen score compares with the seen scores is whatever the start and the lambda pull left. ``mode``:

    * ``none``: as fitted (the official code: the seen-centred start, the pull toward mean(w_seen), b_u = 0);
    * ``norm``: ||w_u|| = mean_c ||w_c|| (each unseen row as long as a seen row on average); b_u kept;
    * ``negatives``: w_u <- s_u w_u, b_u <- t_u so that over the seen training images (none of them of class u)
      the unseen scores s_u w_u . f(x) + t_u have the mean and the std that a seen row's scores have over the
      training images of the other seen classes,
          mean_c mean_{x: y(x) != c} (w_c . f(x) + b_c),   mean_c std_{x: y(x) != c} (w_c . f(x) + b_c),
      i.e. a row answers images of classes that are not its own as the trained rows do; what lifts it on its
      own class is only its direction;
    * ``positives``: w_u as ``negatives``, b_u so that the row scores its class's predicted mean feature as the
      trained rows score their own classes' means,
          s_u w_u . mu_u + b_u = mean_c (w_c . m_c + b_c),   mu_u = mean_c m_c + (k_u - mean_c k_c) B,
      with m_c the mean feature of seen class c's training images and B the ridge map from the centred seen
      knowledge to the centred class means (bias unpenalised; lam = ``mean_ridge`` x the mean squared norm of
      the centred k_c). Needs ``seen_knowledge`` [S, A] (rows of ``seen_weight``) and ``unseen_knowledge`` [U, A];
    * ``seen_budget``: w_u, b_u as ``negatives``, then one shift delta shared by every unseen row, the largest
      that sends at most a share ``seen_budget`` of the seen training images to an unseen row:
          m_i = max_c s_c(x_i) - max_u s_u(x_i),   delta = the floor(seen_budget n)-th smallest m_i (less a
          rounding hair, 1e-6 (1 + max |s_c|), so that the image at the boundary stays seen),
      so that #{i: m_i < delta} <= seen_budget n (image i goes to an unseen row when s_u + delta > max_c s_c).
      ``negatives`` leaves every unseen score below the seen maximum on nearly every image (uncalibrated U ~ 0:
      the head trained on the seen classes is sure of itself on any digit); this spends a stated share of the
      seen classes' images on the unseen rows, the trade Xian et al.'s uncalibrated protocol scores, chosen
      on seen training images, not on a test or validation split. Over images of the head's seen rows only.

    ``features`` [n, D]: the classifier's input on seen training images; ``own`` [n, S] bool: image i is of seen
    row c (``seen_weight`` [S, D], ``seen_bias`` [S]). Returns (weight, bias); nothing is measured on test data.
    """
    if mode not in UNSEEN_SCALES:
        raise ValueError(f"scale must be one of {', '.join(UNSEEN_SCALES)}, got {mode!r}")
    if mode == "none":
        return weight, bias
    if mode == "norm":
        length = seen_weight.norm(dim=1).mean()
        return weight * (length / weight.norm(dim=1).clamp(min=1e-12))[:, None], bias
    if not (~own).any(0).all():
        raise ValueError("scale=negatives needs, for every seen row, training images of other classes")
    seen_scores = features @ seen_weight.T + seen_bias
    others = (~own).to(seen_scores.dtype)
    count = others.sum(0)
    mean = (seen_scores * others).sum(0) / count
    std = (((seen_scores - mean) ** 2 * others).sum(0) / count).sqrt()
    unseen_scores = features @ weight.T
    factor = std.mean() / unseen_scores.std(0, unbiased=False).clamp(min=1e-12)
    weight = weight * factor[:, None]
    bias = mean.mean() - factor * unseen_scores.mean(0)
    if mode == "negatives":
        return weight, bias
    if mode == "seen_budget":
        _check_seen_budget(seen_budget)
        mine = own.any(1)
        if not mine.any():
            raise ValueError("scale=seen_budget needs training images of the head's seen rows")
        margin = (seen_scores[mine].max(1).values - (features[mine] @ weight.T + bias).max(1).values).sort().values
        # a hair below the boundary image's margin (a few float32 roundings of the scores): at the margin itself
        # that image's unseen and seen scores tie, and rounding sent it to either side (budget 0 sent one image)
        hair = 1e-6 * (1.0 + seen_scores[mine].abs().max())
        return weight, bias + margin[int(math.floor(seen_budget * margin.numel()))] - hair
    if seen_knowledge is None or unseen_knowledge is None:
        raise ValueError("scale=positives needs the seen and the unseen classes' knowledge")
    if not own.any(0).all():
        raise ValueError("scale=positives needs training images of every seen row")
    ownf = own.to(features.dtype)
    means = (ownf.T @ features) / ownf.sum(0)[:, None]  # m_c [S, D]
    own_score = ((means * seen_weight).sum(1) + seen_bias).mean()
    k = seen_knowledge.to(features.dtype)
    kc, mc = k - k.mean(0), means - means.mean(0)
    lam = mean_ridge * float((kc ** 2).sum(1).mean())
    b_map = torch.linalg.solve(kc.T @ kc + lam * torch.eye(kc.shape[1], dtype=kc.dtype, device=kc.device), kc.T @ mc)
    predicted = means.mean(0) + (unseen_knowledge.to(features.dtype) - k.mean(0)) @ b_map  # mu_u [U, D]
    return weight, own_score - (weight * predicted).sum(1)


class RoutingMap:
    """Knowledge -> module routing: which units of a layer a class's images switch on (module gate x mask).

    Module keys in the knowledge space: the routing of seen class c, r_c in [0, 1]^N (the share of c's images
    for which each unit is on), is regressed on its knowledge k_c by ridge least squares (bias unpenalised),
        r(k) = clip(mean_c r_c + (k - mean_c k_c) B, 0, 1),
        B = argmin sum_c ||(k_c - mean k) B - (r_c - mean r)||^2 + lam ||B||^2,
    lam = ``ridge`` x the mean squared norm of the centred k_c (scale-free; strong ridge -> the mean routing).
    Units of one module share their gate, so the map predicts, for an unseen class's knowledge, which modules
    should fire for it; a unit that no seen class switches on is predicted off.
    """

    def __init__(self, ridge: float = 0.1):
        self.ridge = ridge
        self.coef: Tensor | None = None

    def fit(self, knowledge: Tensor, routing: Tensor) -> "RoutingMap":
        if knowledge.shape[0] != routing.shape[0]:
            raise ValueError(f"one routing row per class: {knowledge.shape[0]} classes, {routing.shape[0]} rows")
        # dual form: few classes
        self.k_mean, self.r_mean, self.coef = centered_ridge(knowledge.float(), routing.float(), self.ridge, dual=True)
        return self

    def __call__(self, knowledge: Tensor) -> Tensor:
        if self.coef is None:
            raise RuntimeError("RoutingMap.fit first")
        return (self.r_mean + (knowledge.float() - self.k_mean) @ self.coef).clamp(0.0, 1.0)


# ----------------------------------------------------------------------------------------------------------
# The whole method
# ----------------------------------------------------------------------------------------------------------
class GZSLModel(nn.Module):
    """Seen network + NIWT unseen weights: scores [B, n_classes] indexed by dataset class id.

    Seen class ``seen_classes[i]`` takes the network's output column ``seen_columns[i]``; unseen class
    ``unseen_classes[j]`` scores ``unseen_weight[j] . f(x) + unseen_bias[j]`` with f the classifier's
    input. Classes that are neither get -inf. Differentiable end to end, so Grad-CAM works for any class.
    """

    def __init__(self, model: nn.Module, classifier: nn.Linear, seen_classes: Sequence[int],
                 seen_columns: Sequence[int], unseen_classes: Sequence[int], unseen_weight: Tensor,
                 unseen_bias: Tensor, n_classes: int, forward_fn: ForwardFn | None = None):
        super().__init__()
        self.model = model
        self.classifier = classifier
        self.forward_fn = forward_fn
        self.n_classes = n_classes
        self.register_buffer("seen_classes", torch.as_tensor(list(seen_classes), dtype=torch.long))
        self.register_buffer("seen_columns", torch.as_tensor(list(seen_columns), dtype=torch.long))
        self.register_buffer("unseen_classes", torch.as_tensor(list(unseen_classes), dtype=torch.long))
        self.unseen_weight = nn.Parameter(unseen_weight.detach().clone(), requires_grad=False)
        self.unseen_bias = nn.Parameter(unseen_bias.detach().clone(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        features = _InputCapture()
        handle = self.classifier.register_forward_pre_hook(features)
        try:
            logits = (self.forward_fn or self.model)(x)
        finally:
            handle.remove()
        scores = logits.new_full((logits.shape[0], self.n_classes), -math.inf)
        scores[:, self.seen_classes] = logits[:, self.seen_columns]
        if hasattr(self.classifier, "row_scores"):  # a cosine head (modnet.nets.models.CosineHead): no bias
            scores[:, self.unseen_classes] = self.classifier.row_scores(features.features, self.unseen_weight)
        else:
            scores[:, self.unseen_classes] = features.features @ self.unseen_weight.T + self.unseen_bias
        return scores


@dataclass(frozen=True)
class Head:
    """One output head of a network and the forward pass that ends in it.

    classifier  the nn.Linear producing the head's class scores (its input: the penultimate features f)
    classes     the class (a row of the knowledge matrix) of each trained row of the head
    rows        the classifier row of each of ``classes`` (None: 0, 1, ...)
    forward_fn  x -> the head's scores (None: the model's own forward)
    """

    classifier: nn.Linear
    classes: Sequence[int]
    rows: Sequence[int] | None = None
    forward_fn: ForwardFn | None = None


class NIWT:
    """Neuron Importance-aware Weight Transfer on a trained seen-class network.

    >>> niwt = NIWT(model, layer=model.features[2], classifier=model.head)
    >>> gzsl = niwt.fit(x_seen, y_seen, knowledge, seen_classes, unseen_classes).gzsl_model()
    >>> scores = gzsl(x_test)            # [B, n_classes], column = dataset class id

    ``knowledge`` is [n_classes, A] with row c the domain knowledge of dataset class c (attributes, word
    vectors, sentence embeddings; see modnet.methods.knowledge). ``y_seen`` are dataset class ids of seen classes;
    seen class ``seen_classes[i]`` is the classifier's row ``seen_columns[i]`` (default i).
    Hyper-parameters (defaults of the official code for AWA2): ``lr`` 1e-3, ``lam`` 1e-3 (CUB 1e-4, 1e-2),
    ``patience`` 40 iterations without a ``min_improvement`` of 1%, ``init`` seen_centered, ``bias`` zero,
    ``scale`` none (the rows as fitted; ``match_seen_scale`` for the others; ``seen_budget`` its share for
    ``scale='seen_budget'``).
    After ``fit``: ``seen_importance`` [S, N], ``knowledge_map`` (KnowledgeToImportance),
    ``unseen_importance`` [U, N] (predicted), ``unseen`` (UnseenWeights).

    A network with several heads (a HAT network: one head and one masked path per task) is extended with
    ``fit_heads`` (``classifier`` may then be None): every seen class's importance is measured through its
    own head's forward, one knowledge -> importance map is fitted over all of them (the layer's units are
    shared by the heads: the masks select units, they do not rename them), and unseen weights are fitted for
    every head through that head's forward (``unseen_by_head``).
    """

    def __init__(self, model: nn.Module, layer: nn.Module, classifier: nn.Linear | None, *,
                 forward_fn: ForwardFn | None = None, importance_batch_size: int = 256,
                 map_epochs: int = 500, map_lr: float = 1e-2, map_weight_decay: float = 0.0,
                 map_val_fraction: float = 0.2, map_refit_all: bool = False, map_bias: bool = True,
                 map_init: str = "zero", map_targets: str = "class", inverse: str = "lstsq",
                 map_fit: str = "adam", map_ridge: float = 0.01,
                 lr: float = 1e-3, lam: float = 1e-3, batch_size: int = 64, importance_match: str = "sample",
                 importance_samples: str = "class", init: str = "seen_centered", bias: str = "zero",
                 scale: str = "none", seen_budget: float = 0.075,
                 patience: int = 40, min_improvement: float = 0.01, max_iterations: int = 5000,
                 seed: int = 0, progress: bool = False):
        if classifier is not None:
            _check_head_layer(classifier, layer)
            _check_head_scale(classifier, scale)
        self.model, self.layer, self.classifier = model, layer, classifier
        self.forward_fn = forward_fn
        self.importance_batch_size = importance_batch_size
        self.map_kwargs = dict(epochs=map_epochs, lr=map_lr, weight_decay=map_weight_decay,
                               val_fraction=map_val_fraction, refit_all=map_refit_all, seed=seed)
        if map_targets not in ("class", "sample"):
            raise ValueError(f"map_targets must be 'class' or 'sample', got {map_targets!r}")
        if importance_samples not in ("class", "all"):
            raise ValueError(f"importance_samples must be 'class' or 'all', got {importance_samples!r}")
        self.map_bias, self.map_init, self.map_targets, self.inverse = map_bias, map_init, map_targets, inverse
        if map_fit not in MAP_FITS:
            raise ValueError(f"map_fit must be one of {', '.join(MAP_FITS)}, got {map_fit!r}")
        if map_fit == "centered" and not map_bias:
            raise ValueError("map_fit='centered' predicts (k - mean k) B: it needs map_bias=True")
        if not map_ridge >= 0:
            raise ValueError(f"map_ridge must be >= 0, got {map_ridge}")
        self.map_fit, self.map_ridge = map_fit, float(map_ridge)
        self.importance_samples = importance_samples
        for name, value, choices in (("init", init, UNSEEN_INITS), ("bias", bias, UNSEEN_BIASES),
                                     ("scale", scale, UNSEEN_SCALES)):
            if value not in choices:  # before any step runs
                raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
        _check_seen_budget(seen_budget)
        self.scale, self.seen_budget = scale, float(seen_budget)
        self.weight_kwargs = dict(lr=lr, lam=lam, batch_size=batch_size, patience=patience,
                                  min_improvement=min_improvement, max_iterations=max_iterations, seed=seed,
                                  match=importance_match, init=init, bias=bias, progress=progress)
        self.seen_importance: Tensor | None = None
        self.unseen_importance: Tensor | None = None
        self.knowledge_map: KnowledgeToImportance | None = None
        self.unseen: UnseenWeights | None = None
        self.unseen_by_head: list[UnseenWeights] = []

    def fit(self, x_seen: Tensor, y_seen: Tensor, knowledge: Tensor, seen_classes: Sequence[int],
            unseen_classes: Sequence[int], seen_columns: Sequence[int] | None = None,
            seen_routing: Tensor | None = None) -> "NIWT":
        """NIWT on the constructor's ``classifier`` (one head); ``gzsl_model()`` then scores every class."""
        if self.classifier is None:
            raise ValueError("this NIWT has no classifier: pass one to the constructor, or call fit_heads")
        head = Head(self.classifier, seen_classes, seen_columns, self.forward_fn)
        return self.fit_heads(x_seen, y_seen, knowledge, [head], unseen_classes, seen_routing=seen_routing)

    def fit_heads(self, x_seen: Tensor, y_seen: Tensor, knowledge: Tensor, heads: Sequence[Head],
                  unseen_classes: Sequence[int], seen_routing: Tensor | None = None) -> "NIWT":
        """NIWT on a network with one or more heads; every seen class belongs to exactly one head.

        ``seen_importance`` rows follow the heads' classes in order; ``unseen_by_head[h]`` holds the unseen
        weights of head h (``unseen`` those of the first head).

        ``seen_routing`` [S, N] (rows in the heads' class order, like ``seen_importance``): how often each unit
        of the importance layer is switched on (module gate x mask) for the images of each seen class. Given,
        the unseen importance is predicted per module (``RoutingMap``): a*_u <- a*_u * r_u with r_u the
        routing predicted from u's knowledge, so that units of modules that should not fire for u get none.
        """
        heads = [Head(h.classifier, [int(c) for c in h.classes],
                      list(range(len(h.classes))) if h.rows is None else [int(r) for r in h.rows], h.forward_fn)
                 for h in heads]
        unseen_classes = [int(c) for c in unseen_classes]
        self._validate(y_seen, knowledge, heads, unseen_classes)
        self.heads = heads
        self.seen_classes = [c for h in heads for c in h.classes]
        self.unseen_classes = unseen_classes
        self.n_classes = knowledge.shape[0]
        device = _model_device(self.model)
        knowledge = knowledge.to(device=device, dtype=torch.float32)
        y_seen = torch.as_tensor(y_seen, dtype=torch.long)
        y_cpu = y_seen.cpu()
        head_of = torch.full((self.n_classes,), -1, dtype=torch.long)
        row_of = torch.full((self.n_classes,), -1, dtype=torch.long)
        for i, h in enumerate(heads):
            head_of[torch.tensor(h.classes)] = i
            row_of[torch.tensor(h.classes)] = torch.tensor(h.rows)

        # Step 1: importance of each seen class at its own row, through its own head.
        importance, pairs = [], []
        for i, h in enumerate(heads):
            mine = head_of[y_cpu] == i
            x_mine, rows_mine = x_seen[mine.to(x_seen.device)], row_of[y_cpu[mine]]
            n_out = h.classifier.out_features
            if self.importance_samples == "class":
                per_row = class_importance(self.model, self.layer, x_mine, rows_mine, n_out,
                                           self.importance_batch_size, h.forward_fn)
                importance.append(per_row[torch.tensor(h.rows, device=per_row.device)])
            else:  # every seen class scored on all seen samples: the images step 3 measures unseen weights on
                n = x_seen.shape[0]
                importance.append(torch.stack([
                    class_importance(self.model, self.layer, x_seen, torch.full((n,), r), n_out,
                                     self.importance_batch_size, h.forward_fn)[r] for r in h.rows]))
            if self.map_targets == "sample":  # every image's importance, as the official code
                step = self.importance_batch_size
                pairs.append((y_cpu[mine], torch.cat([
                    sample_importance(self.model, self.layer, x_mine[s:s + step], rows_mine[s:s + step],
                                      h.forward_fn) for s in range(0, x_mine.shape[0], step)])))
        self.seen_importance = torch.cat(importance)

        # Step 2: knowledge -> importance on the seen classes (class means, or every sample as the official code).
        self.knowledge_map = KnowledgeToImportance(knowledge.shape[1], self.seen_importance.shape[1],
                                                   bias=self.map_bias, inverse=self.inverse,
                                                   init=self.map_init).to(device)
        if self.map_fit == "centered":
            if self.map_targets == "sample":
                y_pairs = torch.cat([y for y, _ in pairs]).to(device)
                self.knowledge_map.fit_centered(knowledge[y_pairs], torch.cat([a for _, a in pairs]), self.map_ridge)
            else:
                self.knowledge_map.fit_centered(knowledge[self.seen_classes], self.seen_importance, self.map_ridge)
        elif self.map_targets == "sample":
            y_pairs = torch.cat([y for y, _ in pairs]).to(device)
            self.knowledge_map.fit(knowledge[y_pairs], torch.cat([a for _, a in pairs]), pair_classes=y_pairs,
                                   **self.map_kwargs)
        else:
            self.knowledge_map.fit(knowledge[self.seen_classes], self.seen_importance, **self.map_kwargs)

        # Step 3: unseen weights from the predicted importance, for every head through its own forward.
        with torch.no_grad():
            self.unseen_importance = self.knowledge_map(knowledge[unseen_classes])
        self.routing_map = None
        if seen_routing is not None:  # routing-informed: importance only where u's modules should fire
            self.routing_map = RoutingMap().fit(knowledge[self.seen_classes], seen_routing.to(device))
            self.unseen_importance = self.unseen_importance * self.routing_map(knowledge[unseen_classes])
        self.unseen_by_head = []
        for i, h in enumerate(heads):
            fitted = fit_unseen_weights(self.model, self.layer, h.classifier, x_seen, self.unseen_importance,
                                        seen_columns=h.rows, forward_fn=h.forward_fn, **self.weight_kwargs)
            if self.scale != "none":  # on the head's scale, over the seen training images
                rows = torch.tensor(h.rows, device=device)
                features = _classifier_inputs(self.model, h.classifier, x_seen, self.importance_batch_size,
                                              h.forward_fn)
                own = row_of[y_cpu].to(device)[:, None] == rows[None]
                own[head_of[y_cpu].to(device) != i] = False
                seen_weight = h.classifier.weight.detach()
                seen_bias = h.classifier.bias.detach() if h.classifier.bias is not None else seen_weight[:, 0] * 0
                weight, bias = match_seen_scale(fitted.weight, fitted.bias, seen_weight[rows], seen_bias[rows],
                                                features, own, self.scale, knowledge[torch.tensor(h.classes)],
                                                knowledge[torch.tensor(unseen_classes)],
                                                seen_budget=self.seen_budget)
                fitted = UnseenWeights(weight, bias, fitted.n_iterations, fitted.losses)
            self.unseen_by_head.append(fitted)
        self.unseen = self.unseen_by_head[0]
        return self

    def gzsl_model(self) -> GZSLModel:
        """The network extended with the unseen classes (scores for all classes, see ``GZSLModel``)."""
        if self.unseen is None:
            raise ValueError("call NIWT.fit(...) before gzsl_model()")
        if len(self.heads) > 1:
            raise ValueError("NIWT was fitted on several heads: add unseen_by_head[h] to each head of the network "
                             "(HATNet.add_classes) instead of wrapping it")
        head = self.heads[0]
        return GZSLModel(self.model, head.classifier, head.classes, head.rows, self.unseen_classes,
                         self.unseen.weight, self.unseen.bias, self.n_classes, head.forward_fn)

    def importance_to_knowledge(self, importance: Tensor) -> Tensor:
        """Shortcut to ``knowledge_map.importance_to_knowledge`` (textual explanations)."""
        if self.knowledge_map is None:
            raise ValueError("call NIWT.fit(...) before importance_to_knowledge()")
        return self.knowledge_map.importance_to_knowledge(importance)

    def _validate(self, y_seen, knowledge, heads: Sequence[Head], unseen_classes) -> None:
        if knowledge.dim() != 2:
            raise ValueError(f"knowledge must be [n_classes, A], got shape {tuple(knowledge.shape)}")
        if not torch.isfinite(knowledge).all():
            bad = torch.nonzero(~torch.isfinite(knowledge).all(1)).flatten().tolist()
            raise ValueError(f"knowledge has NaN/inf in the rows of classes {bad}; fill or drop them first.")
        if not heads:
            raise ValueError("NIWT needs at least one head")
        seen_classes = [c for h in heads for c in h.classes]
        if len(set(seen_classes)) != len(seen_classes):
            raise ValueError("every seen class must belong to exactly one head")
        if set(seen_classes) & set(unseen_classes):
            raise ValueError(f"classes {sorted(set(seen_classes) & set(unseen_classes))} are both seen and unseen")
        if not unseen_classes:
            raise ValueError("NIWT needs at least one unseen class")
        all_classes = seen_classes + unseen_classes
        if min(all_classes) < 0 or max(all_classes) >= knowledge.shape[0]:
            raise ValueError(f"class ids must index the {knowledge.shape[0]} knowledge rows; got ids in "
                             f"[{min(all_classes)}, {max(all_classes)}]")
        for h in heads:
            _check_head_layer(h.classifier, self.layer)
            _check_head_scale(h.classifier, self.scale)
            if len(h.rows) != len(h.classes):
                raise ValueError("seen_columns must give one classifier row per seen class")
            if max(h.rows) >= h.classifier.out_features:
                raise ValueError(f"seen_columns go up to {max(h.rows)} but the classifier has "
                                 f"{h.classifier.out_features} outputs")
        labels = set(torch.unique(torch.as_tensor(y_seen)).tolist())
        if not labels <= set(seen_classes):
            raise ValueError(f"y_seen holds classes {sorted(labels - set(seen_classes))} that are not in "
                             "seen_classes; NIWT trains on seen-class samples only.")


def _check_head_scale(classifier: nn.Module, scale: str) -> None:
    if hasattr(classifier, "row_scores") and scale != "none":
        raise ValueError(f"scale={scale!r} rescales and shifts linear rows; a cosine head has no bias and ignores "
                         "row lengths, so its new rows are on the seen scale as fitted: use scale='none'")


def _check_head_layer(classifier: nn.Module, layer: nn.Module) -> None:
    if not isinstance(classifier, nn.Linear):
        raise ValueError(f"classifier must be the nn.Linear producing the class scores, got "
                         f"{type(classifier).__name__}")
    if layer is classifier:
        raise ValueError("the importance layer must lie before the classifier (one block before the "
                         "penultimate layer); at the classifier's input the importance is the weight itself.")
