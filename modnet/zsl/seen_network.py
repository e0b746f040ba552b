"""The modular network trained on the seen classes of a GZSL split: what every GZSL method works from.

``modnet gzsl`` trains the ``modnet`` strategy's network (HAT masks, SynC modules, key-vector gates; built by
``modnet.nets.build.build_modular_network`` from the ``model``/``modules``/``hat`` blocks shared with ``modnet
cl``) on one experience holding every seen class: one task, one head, whose row i predicts seen class
``seen_classes[i]``. Its forward for scoring is ``model(x, 0)`` in eval mode with the default condition:
masks at s = smax, module gates on. NIWT grows that head by the unseen classes (``add_classes``); ESZSL and
ALE work on its penultimate features, the head's input.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

from modnet.nets.models import HATNet
from scenarios.zsl import ZSLData

_BATCH = 1024
BASELINE_FEATURES = ("auto", "penultimate", "input")


def baseline_feature_kind(cfg, override: str | None = None) -> str:
    """What the feature-based methods (ESZSL, ALE, DeViSE, f-CLSWGAN) read: ``override`` (a method block's
    ``features``) when set, else ``baseline_features``; ``auto`` is ``input`` on a benchmark whose inputs are a
    pre-trained backbone's features (``benchmark.backbone_features``: awa2, cub; Xian et al.'s protocol scores
    every method on those res101 features) and ``penultimate`` (the modular network's head input) on pixels."""
    kind = override if override is not None else cfg.baseline_features
    if kind == "auto":
        return "input" if cfg.benchmark.get("backbone_features", False) else "penultimate"
    return str(kind)


@dataclass
class SeenNetwork:
    """``model`` trained on ``data``'s seen classes (task 0); ``classes[i]``: the dataset class of head row i.

    ``seen_accuracy``: the network's per-class accuracy on the test-seen samples over the seen classes (set after
    training, ``modnet.jobs.gzsl.train_seen_network``): the bar S, also a per-class mean, is read against.
    """

    model: HATNet
    data: ZSLData
    seed: int
    device: torch.device
    progress: bool = False
    seen_accuracy: float = math.nan
    classes: list[int] = field(default_factory=list)
    _inputs: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.classes:
            self.classes = list(self.data.seen_classes)

    @property
    def head(self) -> torch.nn.Linear:
        return self.model.heads[0]

    def forward(self, x: Tensor) -> Tensor:
        """The head's scores (one column per head row): the path of task 0 at s = smax, gates on."""
        return self.model(x, 0)

    def split(self, name: str) -> tuple[Tensor, Tensor]:
        """(x, y) of ``train``, ``test_seen`` or ``test_unseen`` on the network's device (y: dataset class ids)."""
        if name not in self._inputs:
            d = self.data
            x, y = {"train": (d.x_train, d.y_train), "test_seen": (d.x_test_seen, d.y_test_seen),
                    "test_unseen": (d.x_test_unseen, d.y_test_unseen)}[name]
            self._inputs[name] = (x.to(self.device), y.to(self.device))
        return self._inputs[name]

    @torch.no_grad()
    def scores(self, x: Tensor) -> Tensor:
        """[n, C]: column c is dataset class c's score (its head row), -inf for classes the head lacks."""
        self.model.eval()
        logits = torch.cat([self.forward(x[i:i + _BATCH]) for i in range(0, x.shape[0], _BATCH)])
        out = logits.new_full((x.shape[0], self.data.n_classes), -math.inf)
        out[:, torch.as_tensor(self.classes, device=out.device)] = logits
        return out

    @torch.no_grad()
    def penultimate(self, x: Tensor) -> Tensor:
        """The head's input (the last masked layer's output, gated) for every row of x."""
        self.model.eval()
        return torch.cat([self.model.features(xb, self.model.unit_masks(xb, 0), 0)
                          for xb in x.split(_BATCH)])

    @torch.no_grad()
    def layer_units(self, x: Tensor, layer: int) -> Tensor:
        """Masked layer ``layer``'s output (``unit_taps`` order; conv maps as their spatial means) for every row."""
        self.model.eval()
        return torch.cat([self.model.forward_units(xb, self.model.unit_masks(xb, 0), 0)[0][layer]
                          for xb in x.split(_BATCH)])

    def add_classes(self, classes: Sequence[int], weight: Tensor, bias: Tensor | None = None) -> None:
        """New rows of the head for dataset classes ``classes`` (NIWT's unseen classes)."""
        if "seen_model" not in self._inputs:  # the seen-class network, for methods that extend a copy of it
            self._inputs["seen_model"] = copy.deepcopy(self.model)
        start = len(self.classes)
        self.model.add_classes(0, range(start, start + len(classes)), weight, bias)
        self.classes += [int(c) for c in classes]

    def seen_copy(self) -> "SeenNetwork":
        """A copy of this network as trained on the seen classes (before any method added unseen rows), for a
        method that extends the network without touching the one the run keeps (e.g. ``niwt_routed``)."""
        model = copy.deepcopy(self._inputs.get("seen_model", self.model))
        inputs = {k: v for k, v in self._inputs.items() if k != "seen_model"}
        return SeenNetwork(model, self.data, self.seed, self.device, self.progress, self.seen_accuracy,
                           list(self.data.seen_classes), inputs)

    @torch.no_grad()
    def unit_routing(self, layer: int) -> Tensor:
        """[S, N]: for each seen class (``data.seen_classes`` order), the share of its training images for which
        each unit of masked layer ``layer`` is on (its module's gate times its mask, at s = smax)."""
        self.model.eval()
        x, y = self.split("train")
        on = torch.cat([(self.model.unit_masks(xb, 0)[layer] > 0.5).float() for xb in x.split(_BATCH)])
        seen = torch.as_tensor(list(self.data.seen_classes), device=y.device)
        member = (y[None, :] == seen[:, None]).float()            # S x n
        return (member @ on) / member.sum(1, keepdim=True).clamp(min=1)

    def cached(self, key: tuple, make):
        """``make()``, computed once per network for ``key`` (a method's work shared by its candidate settings,
        e.g. ESZSL's eigendecompositions)."""
        if key not in self._inputs:
            self._inputs[key] = make()
        return self._inputs[key]

    def baseline_inputs(self, kind: str, normalize: bool) -> tuple[Tensor, Tensor, Tensor]:
        """ESZSL's and ALE's inputs for train, test-seen, test-unseen: the penultimate features or the raw
        inputs (``kind``, as ``baseline_feature_kind`` resolves it), L2-normalised rows when ``normalize``; computed
        once per network."""
        if kind not in ("penultimate", "input"):
            raise ValueError(f"baseline inputs are 'penultimate' or 'input', got {kind!r}")

        def features(name: str) -> Tensor:
            x = self.split(name)[0]
            f = x.flatten(1) if kind == "input" else self.penultimate(x)
            return F.normalize(f, dim=1) if normalize else f

        return self.cached(("baseline", kind, normalize),
                           lambda: tuple(features(name) for name in ("train", "test_seen", "test_unseen")))
