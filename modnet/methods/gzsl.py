"""Generalized zero-shot evaluation (Xian et al., "Zero-shot learning - the good, the bad and the ugly",
CVPR 2017 / TPAMI 2018) and two classic baselines working on feature vectors.

Protocol: every test sample is scored over ALL classes (seen and unseen);
    U = mean over unseen classes c of top-1 accuracy on the test-unseen samples of c,
    S = the same on the test-seen samples of the seen classes,
    H = 2 U S / (U + S),
and the (conventional) ZSL accuracy scores test-unseen samples over the unseen classes only.
Calibrated stacking (Chao et al. 2016) subtracts gamma from the seen-class scores before the argmax.

Baselines (fitted on seen classes, scoring a class by the compatibility of x with its knowledge s_c):
* ``ESZSL`` (Romera-Paredes & Torr, ICML 2015): closed form V = (X X^T + gamma I)^-1 X Y S^T (S S^T + lambda I)^-1,
  score(x, c) = x^T V s_c, Y in {-1, 1}.
* ``ALE`` (Akata et al., TPAMI 2016): bilinear F(x, c) = x^T W s_c trained by SGD on the weighted approximate
  ranking loss sum_{c'} beta_{r} / r * [Delta + F(x, c') - F(x, y)]_+ with beta_r = sum_{k<=r} 1/k.
* ``DeViSE`` (Frome et al., NIPS 2013, in Xian et al.'s bilinear form): ALE's compatibility on the plain hinge
  rank loss sum_{c'} [Delta + F(x, c') - F(x, y)]_+, unit-norm class knowledge.

``GZSLPluginMetric`` wraps the metric for Avalanche's EvaluationPlugin (imported lazily: Avalanche is slow
to import and only needed there).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
from torch import Tensor

__all__ = [
    "GZSLResult",
    "per_class_accuracy",
    "restricted_accuracy",
    "harmonic_mean",
    "calibrated_stacking",
    "gzsl_evaluate",
    "select_calibration",
    "predict_scores",
    "ESZSL",
    "ESZSLPath",
    "ALE",
    "DeViSE",
]  # + GZSLPluginMetric, built on first access (module __getattr__)


@dataclass
class GZSLResult:
    U: float
    S: float
    H: float
    zsl_accuracy: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def per_class_accuracy(pred: Tensor, y: Tensor, classes: Sequence[int] | Tensor | None = None) -> Tensor:
    """Mean over classes of the top-1 accuracy of that class's samples (0-d tensor, on pred's device).

    ``classes``: which classes to average over (default: those present in ``y``); classes of that list with
    no sample in ``y`` are left out of the mean (Xian et al. average over the test classes).
    """
    y = y.to(pred.device)
    present = torch.unique(y)
    if classes is not None:
        classes = torch.as_tensor(classes, device=pred.device, dtype=torch.long)
        present = present[torch.isin(present, classes)]
    if present.numel() == 0:
        return torch.zeros((), device=pred.device)
    n = int(torch.maximum(present.max(), y.max())) + 1
    correct = torch.bincount(y[pred == y], minlength=n).float()
    total = torch.bincount(y, minlength=n).float()
    return (correct[present] / total[present]).mean()


def harmonic_mean(u: float, s: float) -> float:
    """H = 2 U S / (U + S) (0 when both are 0)."""
    return 0.0 if u + s == 0 else 2.0 * u * s / (u + s)


def calibrated_stacking(scores: Tensor, seen_classes: Sequence[int], gamma: float) -> Tensor:
    """Scores with ``gamma`` subtracted from the seen-class columns (Chao et al. 2016)."""
    if gamma == 0:
        return scores
    out = scores.clone()
    out[:, torch.as_tensor(list(seen_classes), device=scores.device, dtype=torch.long)] -= gamma
    return out


def _restrict(scores: Tensor, classes: Sequence[int]) -> Tensor:
    """-inf outside ``classes`` so the argmax stays among them."""
    mask = torch.full_like(scores, -math.inf)
    cols = torch.as_tensor(list(classes), device=scores.device, dtype=torch.long)
    mask[:, cols] = 0.0
    return scores + mask


def restricted_accuracy(scores: Tensor, y: Tensor, classes: Sequence[int]) -> float:
    """Per-class accuracy of the argmax among ``classes`` only: the ZSL accuracy (unseen classes on unseen
    images), or the seen-only accuracy (seen classes on seen images, a perfect seen/unseen gate)."""
    return float(per_class_accuracy(_restrict(scores, classes).argmax(1), y, classes))


def gzsl_evaluate(scores_test_seen: Tensor, y_test_seen: Tensor, scores_test_unseen: Tensor,
                  y_test_unseen: Tensor, seen_classes: Sequence[int], unseen_classes: Sequence[int],
                  calibration: float = 0.0) -> GZSLResult:
    """U, S, H and ZSL accuracy from class scores [n, C] whose column c is dataset class c.

    Columns outside seen + unseen classes are ignored. ``calibration`` = gamma of calibrated stacking. A NaN
    score in those columns is an error (argmax would pick the NaN, or class 0 for a row of them: a diverged
    method credited with a number); -inf is a class ruled out (the gated reading's other side).
    """
    all_classes = list(seen_classes) + list(unseen_classes)
    for name, scores in (("test-seen", scores_test_seen), ("test-unseen", scores_test_unseen)):
        cols = torch.as_tensor(all_classes, device=scores.device, dtype=torch.long)
        if bool(torch.isnan(scores.index_select(1, cols)).any()):  # one host read per evaluation
            raise ValueError(f"GZSL scores on the {name} images hold NaN values (the method diverged); nothing "
                             "can be read from them")
    pred_s = _restrict(calibrated_stacking(scores_test_seen, seen_classes, calibration), all_classes).argmax(1)
    pred_u = _restrict(calibrated_stacking(scores_test_unseen, seen_classes, calibration), all_classes).argmax(1)
    s = float(per_class_accuracy(pred_s, y_test_seen, seen_classes))
    u = float(per_class_accuracy(pred_u, y_test_unseen, unseen_classes))
    zsl = restricted_accuracy(scores_test_unseen, y_test_unseen, unseen_classes)
    return GZSLResult(U=u, S=s, H=harmonic_mean(u, s), zsl_accuracy=zsl)


def select_calibration(scores_val_seen: Tensor, y_val_seen: Tensor, scores_val_unseen: Tensor,
                       y_val_unseen: Tensor, seen_classes: Sequence[int], unseen_classes: Sequence[int],
                       n_candidates: int = 256) -> tuple[float, float]:
    """Calibrated-stacking gamma that maximises H on a validation split -> (gamma, H at gamma).

    The validation split must be class-disjoint from training (pseudo-unseen classes taken out of the seen
    ones, as Xian et al. tune hyper-parameters). A sample's prediction only changes where gamma crosses its
    margin max_seen - max_unseen, so the candidates are midpoints between quantiles of those margins (and 0);
    all candidates are scored at once.
    """
    all_classes = list(seen_classes) + list(unseen_classes)
    scores = _restrict(torch.cat([scores_val_seen, scores_val_unseen]), all_classes)
    y = torch.cat([y_val_seen, y_val_unseen]).to(scores.device)
    seen_cols = torch.as_tensor(list(seen_classes), device=scores.device)
    unseen_cols = torch.as_tensor(list(unseen_classes), device=scores.device)
    best_seen, arg_seen = scores[:, seen_cols].max(1)
    best_unseen, arg_unseen = scores[:, unseen_cols].max(1)
    margin = best_seen - best_unseen
    finite = margin[torch.isfinite(margin)].float()
    q = torch.unique(torch.quantile(finite, torch.linspace(0, 1, n_candidates, device=finite.device)))
    candidates = torch.cat([q[:1] - 1e-3, (q[1:] + q[:-1]) / 2, q[-1:] + 1e-3, q.new_zeros(1)])
    # correct[g, i]: sample i right when gamma_g is subtracted from the seen scores
    goes_unseen = candidates[:, None] > margin[None, :]
    correct = torch.where(goes_unseen, (unseen_cols[arg_unseen] == y)[None, :], (seen_cols[arg_seen] == y)[None, :])
    n_classes = int(max(all_classes)) + 1
    totals = torch.bincount(y, minlength=n_classes).float()
    hits = torch.zeros(len(candidates), n_classes, device=scores.device).index_add_(1, y, correct.float())
    per_class = hits / totals.clamp(min=1)

    def mean_over(classes: Tensor) -> Tensor:
        present = classes[totals[classes] > 0]
        return per_class[:, present].mean(1) if len(present) else torch.zeros(len(candidates), device=scores.device)

    u, s = mean_over(unseen_cols), mean_over(seen_cols)
    h = torch.where(u + s > 0, 2 * u * s / (u + s).clamp(min=1e-12), torch.zeros_like(u))
    best = int(h.argmax())
    return float(candidates[best]), float(h[best])


@torch.no_grad()
def predict_scores(model: torch.nn.Module, x: Tensor, batch_size: int = 1024) -> Tensor:
    """Scores of ``model`` on ``x`` in batches, on the model's device."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = torch.cat([model(x[i:i + batch_size].to(device)) for i in range(0, x.shape[0], batch_size)])
    model.train(was_training)
    return out


def _check_fit_inputs(x: Tensor, y: Tensor, class_knowledge: Tensor, seen_classes: Sequence[int]) -> None:
    if x.dim() != 2:
        raise ValueError(f"the baselines work on feature vectors [n, d]; got shape {tuple(x.shape)} "
                         "(flatten images or use penultimate features)")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{x.shape[0]} samples but {y.shape[0]} labels")
    if not set(torch.unique(y).tolist()) <= set(int(c) for c in seen_classes):
        raise ValueError("training labels must all be seen classes")
    if not torch.isfinite(class_knowledge).all():
        raise ValueError("class knowledge contains NaN/inf")


class _Bilinear:
    """score(x, c) = x^T W s_c for a fitted compatibility matrix W (ESZSL's V, ALE's W)."""

    class_knowledge: Tensor | None

    def _bilinear_scores(self, W: Tensor | None, x: Tensor, class_knowledge: Tensor | None) -> Tensor:
        if W is None:
            raise ValueError(f"call {type(self).__name__}.fit first")
        k = self.class_knowledge if class_knowledge is None else class_knowledge.to(W)
        return x.to(W) @ W @ k.T


def _eszsl_products(x: Tensor, y: Tensor, class_knowledge: Tensor,
                    seen_classes: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
    """ESZSL's inputs in float64: (the features [m, d] = X^T, X Y [d, z] with Y in {-1, 1}, 1 at the true seen
    class, and S [a, z]).
    X Y is formed from per-class feature sums (Y = 2 onehot - 1), without the m x z matrix Y."""
    _check_fit_inputs(x, y, class_knowledge, seen_classes)
    device = x.device
    seen = torch.as_tensor(list(seen_classes), device=device, dtype=torch.long)
    xd = x.double()
    s = class_knowledge.to(device).double()[seen].T                           # [a, z]
    position = torch.full((class_knowledge.shape[0],), -1, dtype=torch.long, device=device)
    position[seen] = torch.arange(len(seen), device=device)
    class_sums = torch.zeros(len(seen), xd.shape[1], dtype=xd.dtype, device=device).index_add_(
        0, position[y.to(device)], xd)                                        # [z, d]
    return xd, (2.0 * class_sums - xd.sum(0, keepdim=True)).T, s


class ESZSL(_Bilinear):
    """Embarrassingly simple ZSL (Romera-Paredes & Torr 2015), closed form.

    V = (X X^T + gamma I)^-1 X Y S^T (S S^T + lam I)^-1 with X [d, m] the training features, Y [m, z] in
    {-1, 1} (1 at the true seen class), S [a, z] the seen classes' knowledge; score(x, c) = x^T V s_c.
    ``gamma``/``lam`` are the paper's gamma (feature side) and lambda (knowledge side); Xian et al.'s code
    writes them 10^alpha and 10^gamma and searches exponents in [-3, 3].
    """

    def __init__(self, gamma: float = 1.0, lam: float = 1.0):
        self.gamma, self.lam = float(gamma), float(lam)
        self.V: Tensor | None = None
        self.class_knowledge: Tensor | None = None

    def fit(self, x: Tensor, y: Tensor, class_knowledge: Tensor, seen_classes: Sequence[int]) -> "ESZSL":
        xd, xty, s = _eszsl_products(x, y, class_knowledge, seen_classes)
        d, a = xd.shape[1], s.shape[0]
        eye = lambda n: torch.eye(n, dtype=xd.dtype, device=xd.device)  # noqa: E731
        left = torch.linalg.solve(xd.T @ xd + self.gamma * eye(d), xty @ s.T)  # (X X^T + gI)^-1 X Y S^T
        self.V = torch.linalg.solve(s @ s.T + self.lam * eye(a), left.T).T.float()
        self.class_knowledge = class_knowledge.to(x.device).float()
        return self

    def scores(self, x: Tensor, class_knowledge: Tensor | None = None) -> Tensor:
        return self._bilinear_scores(self.V, x, class_knowledge)


class ESZSLPath:
    """ESZSL's closed form for any (gamma, lam) from one eigendecomposition of each side.

    With X^T X = U diag(l) U^T (features, d x d) and S S^T = Q diag(m) Q^T (knowledge, a x a),
        V(gamma, lam) = U [ (U^T X^T Y S^T Q) / ((l + gamma) (m + lam)^T) ] Q^T,
    the same V as ``ESZSL(gamma, lam).fit`` (both inverses are of symmetric matrices, so they share the
    eigenvectors). Searching Xian et al.'s 7 x 7 grid costs one d x d product and one d x d eigendecomposition
    instead of 49 of each (d = 2048 on the res101 features).
    """

    def __init__(self, x: Tensor, y: Tensor, class_knowledge: Tensor, seen_classes: Sequence[int]):
        xd, xty, s = _eszsl_products(x, y, class_knowledge, seen_classes)
        self.l, self.U = torch.linalg.eigh(xd.T @ xd)
        self.m, self.Q = torch.linalg.eigh(s @ s.T)
        self.core = self.U.T @ (xty @ s.T) @ self.Q                           # [d, a]
        self.class_knowledge = class_knowledge.to(x.device).float()

    def model(self, gamma: float, lam: float) -> ESZSL:
        """The fitted ESZSL at (``gamma``, ``lam``)."""
        eszsl = ESZSL(gamma, lam)
        scaled = self.core / ((self.l + float(gamma))[:, None] * (self.m + float(lam))[None, :])
        eszsl.V = (self.U @ scaled @ self.Q.T).float()
        eszsl.class_knowledge = self.class_knowledge
        return eszsl


class ALE(_Bilinear):
    """Attribute Label Embedding (Akata et al. 2016): F(x, c) = x^T W s_c, weighted approximate ranking loss.

    For a sample (x, y): violations v_c = [margin + F(x, c) - F(x, y)]_+ over the other seen classes, rank
    r = #{v_c > 0}, loss = beta_r / r * sum_c v_c with beta_r = sum_{k=1}^r 1/k. Minibatch SGD; W starts at
    small random values.
    """

    def __init__(self, lr: float = 0.1, epochs: int = 50, batch_size: int = 64, margin: float = 1.0,
                 weight_decay: float = 0.0, seed: int = 0):
        self.lr, self.epochs, self.batch_size = lr, epochs, batch_size
        self.margin, self.weight_decay, self.seed = margin, weight_decay, seed
        self.W: Tensor | None = None
        self.class_knowledge: Tensor | None = None

    def fit(self, x: Tensor, y: Tensor, class_knowledge: Tensor, seen_classes: Sequence[int]) -> "ALE":
        _check_fit_inputs(x, y, class_knowledge, seen_classes)
        device = x.device
        generator = torch.Generator().manual_seed(self.seed)
        seen = torch.as_tensor(list(seen_classes), device=device, dtype=torch.long)
        s = class_knowledge.to(device).float()[seen]                          # [z, a]
        position = torch.full((class_knowledge.shape[0],), -1, dtype=torch.long, device=device)
        position[seen] = torch.arange(len(seen), device=device)
        target = position[y.to(device)]
        W = (0.01 * torch.randn(x.shape[1], s.shape[1], generator=generator)).to(device)
        harmonic = torch.cumsum(1.0 / torch.arange(1, len(seen) + 1, device=device, dtype=torch.float32), 0)
        x = x.float()
        # The loss' gradient written out (SGD, as torch.optim.SGD with weight_decay): with f = x W s^T,
        # dloss/df_bc = w_b / B for the violating classes c, -w_b r_b / B for the true class (w_b held fixed,
        # as the paper's rank weight); dloss/dW = x^T (dloss/df) s. A step of a 64-sample batch is a few
        # small products, where autograd's graph cost several times more.
        for _ in range(self.epochs):
            order = torch.randperm(x.shape[0], generator=generator).to(device)
            x_epoch, t_epoch = x[order], target[order]            # one gather per epoch; batches are views
            for start in range(0, x.shape[0], self.batch_size):
                xb, tb = x_epoch[start:start + self.batch_size], t_epoch[start:start + self.batch_size, None]
                f = xb @ W @ s.T                                                # [b, z]
                violation = (self.margin + f - f.gather(1, tb)).scatter_(1, tb, 0.0)
                active = (violation > 0).to(f.dtype)
                rank = active.sum(1, keepdim=True)
                weight = self._rank_weight(rank, harmonic) / xb.shape[0]
                grad_f = (active * weight).scatter_(1, tb, -(weight * rank))  # rank 0: weight irrelevant, all 0
                grad = xb.T @ (grad_f @ s)
                if self.weight_decay:
                    grad += self.weight_decay * W
                W -= self.lr * grad
        self.W = W.detach()
        self.class_knowledge = class_knowledge.to(device).float()
        return self

    @staticmethod
    def _rank_weight(rank: Tensor, harmonic: Tensor) -> Tensor:
        """Weight of each violation of a sample with ``rank`` violations: beta_r / r (``harmonic[k-1]`` =
        sum_{i<=k} 1/i); the one override point of the ranking losses."""
        return harmonic[(rank.long() - 1).clamp(min=0)] / rank.clamp(min=1)

    def scores(self, x: Tensor, class_knowledge: Tensor | None = None) -> Tensor:
        return self._bilinear_scores(self.W, x, class_knowledge)


class DeViSE(ALE):
    """DeViSE (Frome et al., NIPS 2013), as Xian et al. 2018 evaluate it: the bilinear compatibility
    F(x, c) = x^T W s_c of ALE trained on the pairwise hinge rank loss
        loss(x, y) = sum_{c != y} [margin + F(x, c) - F(x, y)]_+,
    every violation weighted 1 (ALE weights them beta_r / r by the rank). The paper's margin is 0.1 and its
    label vectors have unit norm (``DeViSE.unit_knowledge``)."""

    @staticmethod
    def _rank_weight(rank: Tensor, harmonic: Tensor) -> Tensor:
        return torch.ones_like(rank)

    @staticmethod
    def unit_knowledge(class_knowledge: Tensor) -> Tensor:
        """Rows scaled to unit L2 norm (DeViSE's normalised label embeddings); zero rows stay zero."""
        return torch.nn.functional.normalize(class_knowledge.float(), dim=1)


# ----------------------------------------------------------------------------------------------------------
# Avalanche metric (built on first access: importing Avalanche costs seconds)
# ----------------------------------------------------------------------------------------------------------
def _build_plugin_metric():
    from avalanche.evaluation.metric_definitions import PluginMetric
    from avalanche.evaluation.metric_results import MetricValue

    class GZSLPluginMetric(PluginMetric[dict]):
        """Avalanche PluginMetric emitting GZSL U, S, H and ZSL accuracy after each evaluation phase.

        The evaluated model must output scores over all classes (column = class id), e.g. NIWT's
        ``GZSLModel``. Every eval minibatch (all eval streams together) is collected; after ``eval`` the
        samples whose label is seen feed S, unseen feed U. Emits ``GZSL_U``, ``GZSL_S``, ``GZSL_H``,
        ``ZSL_Acc`` (names prefixed by ``prefix``).
        """

        def __init__(self, seen_classes: Sequence[int], unseen_classes: Sequence[int], calibration: float = 0.0,
                     prefix: str = ""):
            super().__init__()
            self.seen_classes = [int(c) for c in seen_classes]
            self.unseen_classes = [int(c) for c in unseen_classes]
            self.calibration = calibration
            self.prefix = prefix
            self.reset()

        def reset(self) -> None:
            self._scores: list[Tensor] = []
            self._labels: list[Tensor] = []

        def update(self, scores: Tensor, labels: Tensor) -> None:
            self._scores.append(scores.detach())
            self._labels.append(labels.detach())

        def result(self) -> dict | None:
            if not self._scores:
                return None
            scores, labels = torch.cat(self._scores), torch.cat(self._labels).to(self._scores[0].device)
            unseen = torch.isin(labels, torch.as_tensor(self.unseen_classes, device=labels.device))
            return gzsl_evaluate(scores[~unseen], labels[~unseen], scores[unseen], labels[unseen],
                                 self.seen_classes, self.unseen_classes, self.calibration).as_dict()

        def before_eval(self, strategy) -> None:
            self.reset()

        def after_eval_iteration(self, strategy) -> None:
            super().after_eval_iteration(strategy)
            self.update(strategy.mb_output, strategy.mb_y)

        def after_eval(self, strategy):
            values = self.result()
            if values is None:
                return None
            step = strategy.clock.train_iterations
            names = {"U": "GZSL_U", "S": "GZSL_S", "H": "GZSL_H", "zsl_accuracy": "ZSL_Acc"}
            return [MetricValue(self, f"{self.prefix}{names[k]}", v, step) for k, v in values.items()]

        def __str__(self) -> str:
            return f"{self.prefix}GZSL"

    return GZSLPluginMetric


_LAZY: dict[str, type] = {}


def __getattr__(name: str):  # PEP 562: ``from modnet.methods.gzsl import GZSLPluginMetric`` builds it on demand
    if name == "GZSLPluginMetric":
        if name not in _LAZY:
            _LAZY[name] = _build_plugin_metric()
        return _LAZY[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
