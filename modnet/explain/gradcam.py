"""Explanations of classes and of functional modules: Grad-CAM maps, overlays, and attributes named in words.

Visual (Selvaraju et al., "Grad-CAM", ICCV 2017). For a layer with activation A in R^{C x H x W} and a
scalar score y, Grad-CAM is

    alpha_c = mean_{h,w} dy / dA_c[h, w],        CAM = ReLU( sum_c alpha_c A_c ).

The score is the only thing that changes between explanations (the override point ``target_score``, in the
style of pytorch-grad-cam's ``base_cam.py``):

* class c:   y = logit_c (``ClassGradCAM``), the map of any class, seen or unseen (NIWT, seed 003, Sec. 5);
* module m:  y = sum_{c in m} mean_{h,w} A_c (``ModuleGradCAM``), the module's pooled activation. Then
  alpha_c = 1/(HW) on the module's channels and 0 elsewhere, so the map is ReLU(sum_{c in m} A_c) / (HW):
  where the module's channels fire together.

captum's ``LayerGradCam`` does the gradients and the weighting; pytorch-grad-cam (``grad-cam`` package) is
an alternative backend. A layer without space (a fully connected layer: B x units) has no Grad-CAM; its
score (for a module: the sum of its units' outputs) is attributed to the input instead, by gradient x input
(``input_x_gradient``, captum's ``InputXGradient``): x * dy/dx, one value per input entry. Figures are drawn
with matplotlib's Agg canvas (no pyplot state).

Textual (NIWT, seed 003, Sec. 5 "Explaining NIWT"). NIWT learns a linear map from a class's domain knowledge
k in R^A to its neuron importance a in R^N. Its inverse, importance -> knowledge, scores every attribute for
a decision; the highest-scoring attributes are the explanation. A module is explained the same way, from
the importance of its own units only.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Protocol, Sequence, Union, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

Target = Union[int, str, Sequence[Union[int, str]], Tensor]
RankedAttributes = list[tuple[str, float]]

BACKENDS = ("captum", "pytorch_grad_cam")
_INTERPOLATION = {1: "linear", 2: "bilinear", 3: "trilinear"}


# ---------------------------------------------------------------------------------------------------------
# Grad-CAM
# ---------------------------------------------------------------------------------------------------------
class TargetGradCAM:
    """Grad-CAM of a score chosen by ``target_score`` at one layer of ``model``; batched, on the model's device.

    Subclasses override ``target_score(logits, activation) -> Tensor[B, T]`` (one column per explainable
    target) and, for named targets, ``target_names``. ``layer`` must output a tensor with spatial dimensions
    (B, C, H, W), or (B, C, L) / (B, C, D, H, W). Pick a layer whose output is not changed in place later
    (e.g. an ``nn.ReLU()`` module rather than a conv followed by ``ReLU(inplace=True)``).

    backend: ``"captum"`` (``captum.attr.LayerGradCam``; raw maps available through ``layer_cam``) or
    ``"pytorch_grad_cam"`` (``pytorch_grad_cam.GradCAM``; 2-D/3-D images only, maps come back min-max
    normalised at the input size, computed on the CPU by that library).
    relu: keep only positive evidence, as in the Grad-CAM paper.
    """

    target_names: Sequence[str] | None = None

    def __init__(self, model: nn.Module, layer: nn.Module, backend: str = "captum", relu: bool = True):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if not any(sub is layer for sub in model.modules()):
            raise ValueError("layer is not a submodule of model: pass the module object, e.g. model.features[3]")
        self.model = model
        self.layer = layer
        self.backend = backend
        self.relu = relu

    # -- override point ------------------------------------------------------------------------------
    def target_score(self, logits: Tensor, activation: Tensor) -> Tensor:
        """Scores to explain, one column per target: Tensor[B, T]. ``activation`` is the layer's output."""
        raise NotImplementedError

    # -- scores through a hook on the layer -----------------------------------------------------------
    def scores(self, inputs: Tensor) -> Tensor:
        """Run the model once and return ``target_score`` of its logits and of the layer's activation."""
        logits, activation = self._forward(inputs)
        return self.target_score(logits, activation)

    def _spatial_scores(self, inputs: Tensor) -> Tensor:
        """``scores``, for Grad-CAM: the layer's output must have spatial dimensions."""
        logits, activation = self._forward(inputs)
        if activation.dim() < 3:
            raise ValueError(f"Grad-CAM needs a layer with spatial output (B, C, H, W); this layer gives "
                             f"{tuple(activation.shape)}. Use a convolutional layer (NIWT: one block before the "
                             "global pooling), or input_x_gradient for a layer without space.")
        return self.target_score(logits, activation)

    def _forward(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        """(the model's output, the layer's output) of one forward pass."""
        captured: list[Tensor] = []
        handle = self.layer.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            logits = self.model(inputs)
        finally:
            handle.remove()
        if not captured:
            raise ValueError("the layer was not called during model(inputs); pick a layer on the forward path")
        activation = captured[-1]
        if not isinstance(activation, Tensor):
            raise ValueError(f"the layer must output one tensor, got {type(activation).__name__}")
        return logits, activation

    @property
    def device(self) -> torch.device | None:
        param = next(self.model.parameters(), None)
        return None if param is None else param.device

    def target_indices(self, targets: Target, batch_size: int, device: torch.device) -> Tensor:
        """Targets (an index, a name, or one per example) as a LongTensor[B] of score columns."""
        if isinstance(targets, (Tensor, np.ndarray)):
            idx = torch.as_tensor(targets).to(device=device, dtype=torch.long).reshape(-1)
        else:
            many = isinstance(targets, Sequence) and not isinstance(targets, str)
            items = list(targets) if many else [targets]
            idx = torch.tensor([self._column(t) for t in items], dtype=torch.long, device=device)
        if idx.numel() == 1:
            idx = idx.expand(batch_size)
        if idx.numel() != batch_size:
            raise ValueError(f"got {idx.numel()} targets for a batch of {batch_size}: give one target, or one per "
                             "example")
        return idx

    def _column(self, target: int | str) -> int:
        if isinstance(target, str):
            if self.target_names is None or target not in self.target_names:
                raise ValueError(f"unknown target name {target!r}; known names: {self.target_names}")
            return list(self.target_names).index(target)
        return int(target)

    # -- Grad-CAM ---------------------------------------------------------------------------------------
    def layer_cam(self, inputs: Tensor, targets: Target) -> Tensor:
        """Grad-CAM at the layer's resolution, unnormalised: Tensor[B, *layer_spatial] (captum backend)."""
        if self.backend != "captum":
            raise ValueError("layer_cam returns raw layer-resolution maps, which only backend='captum' exposes; "
                             "use __call__ for pytorch_grad_cam")
        from captum.attr import LayerGradCam  # captum computes d(score)/dA and the weighted sum

        inputs = self._on_model_device(inputs)
        idx = self.target_indices(targets, inputs.shape[0], inputs.device)
        with _eval_mode(self.model):
            cam = LayerGradCam(self._spatial_scores, self.layer).attribute(inputs, target=idx,
                                                                          relu_attributions=self.relu)
        return cam.squeeze(1).detach()

    def input_x_gradient(self, inputs: Tensor, targets: Target) -> Tensor:
        """Gradient x input of the target score: x * d y / d x, Tensor of the inputs' shape (captum's
        ``InputXGradient``). Works at any layer, with or without space; signed (negative: the entry lowers
        the score)."""
        from captum.attr import InputXGradient

        inputs = self._on_model_device(inputs).detach().requires_grad_(True)
        idx = self.target_indices(targets, inputs.shape[0], inputs.device)
        with _eval_mode(self.model):
            return InputXGradient(self.scores).attribute(inputs, target=idx).detach()

    def __call__(self, inputs: Tensor, targets: Target, size: Sequence[int] | None = None,
                 normalize: bool = True) -> Tensor:
        """Grad-CAM upsampled to ``size`` (default: the input's spatial size): Tensor[B, *size].

        normalize: min-max scale each map to [0, 1] (always on for backend='pytorch_grad_cam').
        """
        inputs = self._on_model_device(inputs)
        size = tuple(inputs.shape[2:]) if size is None else tuple(int(s) for s in size)
        if self.backend == "pytorch_grad_cam":
            if not normalize:
                raise ValueError("pytorch_grad_cam returns min-max normalised maps only; use backend='captum' "
                                 "for raw values")
            cam = self._pytorch_grad_cam(inputs, targets)
        else:
            cam = self.layer_cam(inputs, targets)
        cam = upsample_cam(cam, size)
        return normalize_cam(cam) if normalize else cam

    def _pytorch_grad_cam(self, inputs: Tensor, targets: Target) -> Tensor:
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        if inputs.dim() not in (4, 5):
            raise ValueError("pytorch_grad_cam handles 2-D/3-D images (B, C, H, W[, D]) only; use backend='captum'")
        columns = self.target_indices(targets, inputs.shape[0], inputs.device).tolist()
        with _eval_mode(self.model), GradCAM(_ScoreModule(self), [self.layer]) as cam:
            maps = cam(input_tensor=inputs, targets=[ClassifierOutputTarget(c) for c in columns])
        return torch.from_numpy(maps).to(inputs.device)

    def _on_model_device(self, inputs: Tensor) -> Tensor:
        if not isinstance(inputs, Tensor) or inputs.dim() < 2:
            raise ValueError("inputs must be a batch Tensor (B, C, H, W) or (B, D); add the batch dimension "
                             "with x[None]")
        return inputs if self.device is None else inputs.to(self.device)


class ClassGradCAM(TargetGradCAM):
    """Grad-CAM of class logits: where the evidence for class c lies. Targets: class index or name."""

    def __init__(self, model: nn.Module, layer: nn.Module, class_names: Sequence[str] | None = None,
                 backend: str = "captum", relu: bool = True):
        super().__init__(model, layer, backend, relu)
        self.target_names = None if class_names is None else [str(c) for c in class_names]

    def target_score(self, logits: Tensor, activation: Tensor) -> Tensor:
        return logits


class ModuleGradCAM(TargetGradCAM):
    """Grad-CAM of functional modules (channel groups of ``layer``): score = sum_{c in m} mean_space A_c.

    modules: name -> channel indices of the layer output. Targets: module name or position in ``modules``.
    At a layer without space (B x units) the score is the sum of the module's unit outputs, explained by
    ``input_x_gradient``.
    """

    def __init__(self, model: nn.Module, layer: nn.Module, modules: Mapping[str, Sequence[int]],
                 backend: str = "captum", relu: bool = True):
        super().__init__(model, layer, backend, relu)
        self.modules = _check_modules(modules)
        self.target_names = list(self.modules)

    def membership(self, n_channels: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """0/1 matrix [C, M]: channel c belongs to module m."""
        member = torch.zeros(n_channels, len(self.modules), device=device, dtype=dtype)
        for m, channels in enumerate(self.modules.values()):
            if max(channels) >= n_channels:
                raise ValueError(f"module {self.target_names[m]!r} names channel {max(channels)} but the layer has "
                                 f"{n_channels} channels")
            member[torch.as_tensor(channels, device=device), m] = 1.0
        return member

    def target_score(self, logits: Tensor, activation: Tensor) -> Tensor:
        pooled = activation.flatten(2).mean(dim=2) if activation.dim() > 2 else activation  # B x C
        return pooled @ self.membership(activation.shape[1], activation.device, activation.dtype)


class _ScoreModule(nn.Module):
    """Presents ``TargetGradCAM.scores`` as a model, for pytorch-grad-cam's targets on model outputs."""

    def __init__(self, cam: TargetGradCAM):
        super().__init__()
        self.inner = cam.model  # registered so that the library finds the parameters' device
        self._scores = cam._spatial_scores

    def forward(self, x: Tensor) -> Tensor:
        return self._scores(x)


class _eval_mode:
    """Context: model in eval mode (Grad-CAM explains the deployed network), previous mode restored."""

    def __init__(self, model: nn.Module):
        self.model, self.was_training = model, model.training

    def __enter__(self):
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)


def _check_modules(modules: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
    if not modules:
        raise ValueError("modules is empty: give at least one {name: [channel indices]}")
    checked = {}
    for name, units in modules.items():
        units = [int(u) for u in (units.tolist() if isinstance(units, Tensor) else units)]
        if not units:
            raise ValueError(f"module {name!r} has no units; drop it (SynC outliers are label -1, not a module)")
        if min(units) < 0:
            raise ValueError(f"module {name!r} has a negative unit index {min(units)}")
        checked[str(name)] = units
    return checked


def upsample_cam(cam: Tensor, size: Sequence[int]) -> Tensor:
    """Interpolate maps [B, *spatial] to [B, *size] (linear / bilinear / trilinear, align_corners=False)."""
    size = tuple(int(s) for s in size)
    if tuple(cam.shape[1:]) == size:
        return cam
    mode = _INTERPOLATION.get(len(size))
    if mode is None or cam.dim() - 1 != len(size):
        raise ValueError(f"cannot upsample maps of shape {tuple(cam.shape)} to size {size}")
    return F.interpolate(cam.unsqueeze(1).float(), size=size, mode=mode, align_corners=False).squeeze(1)


def normalize_cam(cam: Tensor) -> Tensor:
    """Min-max scale each map of [B, ...] to [0, 1]; a constant map becomes 0."""
    flat = cam.flatten(1)
    low = flat.min(dim=1, keepdim=True).values
    span = (flat.max(dim=1, keepdim=True).values - low).clamp_min(1e-12)
    return ((flat - low) / span).view_as(cam)


# ---------------------------------------------------------------------------------------------------------
# Overlays
# ---------------------------------------------------------------------------------------------------------
def default_display_size(height: int, width: int, min_long_side: int = 224) -> tuple[int, int]:
    """Small images (8x8 digits) are shown enlarged by the integer factor that brings the long side to
    at least ``min_long_side`` pixels; larger images keep their size."""
    factor = max(1, math.ceil(min_long_side / max(height, width)))
    return height * factor, width * factor


def overlay_rgb(image: Tensor, cam: Tensor, size: Sequence[int] | None = None, alpha: float = 0.6,
                cmap: str = "jet") -> np.ndarray:
    """Blend a heat map over an image: float array [H', W', 3] in [0, 1].

    image: [H, W], [1, H, W] or [3, H, W] (any range; min-max scaled), upsampled with nearest neighbours so
    that pixels stay visible. cam: [h, w] (any size), bilinearly upsampled and min-max scaled to c in [0, 1].
    Each pixel is image * (1 - alpha c) + colour(c) * alpha c: cold regions show the image, hot ones the map.
    (pytorch-grad-cam's ``show_cam_on_image`` blends the colour map with one weight everywhere, which tints the
    cold regions too; weighting by the heat keeps the input readable where the map says nothing.)
    """
    from matplotlib import colormaps

    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    image = _as_chw(image)
    if cam.dim() != 2:
        raise ValueError(f"cam must be one map [h, w], got shape {tuple(cam.shape)}; index the batch first")
    size = default_display_size(*image.shape[1:]) if size is None else tuple(int(s) for s in size)
    picture = F.interpolate(image[None].float(), size=size, mode="nearest")[0]
    picture = normalize_cam(picture.flatten()[None]).view_as(picture).expand(3, *size)
    heat = normalize_cam(upsample_cam(cam[None].float().to(picture.device), size))[0]
    picture, heat = picture.permute(1, 2, 0).cpu().numpy(), heat.cpu().numpy()  # matplotlib wants numpy
    colour = colormaps[cmap](heat)[..., :3]
    weight = alpha * heat[..., None]
    return np.clip(picture * (1.0 - weight) + colour * weight, 0.0, 1.0)


def save_overlay(image: Tensor, cam: Tensor, path: str | Path, size: Sequence[int] | None = None,
                 alpha: float = 0.6, cmap: str = "jet") -> Path:
    """Write ``overlay_rgb(image, cam)`` as a PNG of exactly ``size`` pixels (default: ``default_display_size``)."""
    from matplotlib import image as mpimg

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mpimg.imsave(path, overlay_rgb(image, cam, size, alpha, cmap), format="png")
    return path


def save_overlay_grid(image: Tensor, cams: Mapping[str, Tensor], path: str | Path, ncols: int = 4,
                      size: Sequence[int] | None = None, alpha: float = 0.6, cmap: str = "jet",
                      panel_inches: float = 2.0, dpi: int = 100, title: str | None = None,
                      bar_label: str = "map, scaled to [0, 1] per panel") -> Path:
    """``overlay_grid_figure`` as a PNG. It is (ncols * panel_inches + 1) * dpi pixels wide (an inch for the colour
    bar and its label) and (nrows * panel_inches + 0.5) * dpi high with a title (0.15 without), with
    nrows = ceil((len(cams) + 1) / ncols)."""
    return _save(overlay_grid_figure(image, cams, ncols, size, alpha, cmap, panel_inches, dpi, title, bar_label),
                 path, dpi)


def overlay_grid_figure(image: Tensor, cams: Mapping[str, Tensor], ncols: int = 4,
                        size: Sequence[int] | None = None, alpha: float = 0.6, cmap: str = "jet",
                        panel_inches: float = 2.0, dpi: int = 100, title: str | None = None,
                        bar_label: str = "map, scaled to [0, 1] per panel"):
    """One matplotlib figure: the input, then one titled overlay (``overlay_rgb``) per map in ``cams`` (classes
    or modules), and a colour bar of the overlays' scale (``bar_label``)."""
    if not cams:
        raise ValueError("cams is empty: give at least one {title: map}")
    ncols = max(1, min(int(ncols), len(cams) + 1))
    nrows = math.ceil((len(cams) + 1) / ncols)
    # room beside the panels for the colour bar and its label, and above them for the title (the bar's label was
    # cut at the figure's edge and the title ran into the panels' titles)
    bar_in, title_in = 1.0, 0.5 if title else 0.15
    width, height = ncols * panel_inches + bar_in, nrows * panel_inches + title_in
    right, top = 1 - bar_in / width, 1 - title_in / height  # the panels' edges, as fractions of the figure
    fig = _figure(width, height, dpi)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    fig.subplots_adjust(left=0.01, right=right, bottom=0.02, top=top, wspace=0.08, hspace=0.25)
    image = _as_chw(image)
    display = default_display_size(*image.shape[1:]) if size is None else tuple(size)
    plain = F.interpolate(image[None].float(), size=display, mode="nearest")[0]
    shown = plain[0] if plain.shape[0] == 1 else plain.permute(1, 2, 0)
    axes[0].imshow(normalize_cam(shown.flatten()[None]).view_as(shown).cpu().numpy(), cmap="gray")
    axes[0].set_title("input", fontsize=8)
    for ax, (name, cam) in zip(axes[1:], cams.items()):
        ax.imshow(overlay_rgb(image, cam, display, alpha, cmap))
        ax.set_title(str(name), fontsize=8)
    for ax in axes:
        ax.axis("off")
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    # every overlay scales its own map to [0, 1] (normalize_cam): one colour bar reads them all
    import textwrap

    bar_ax = fig.add_axes((right + 0.12 / width, 0.06, 0.12 / width, top - 0.1))
    bar = fig.colorbar(ScalarMappable(Normalize(0.0, 1.0), cmap), cax=bar_ax)
    bar.set_label("\n".join(textwrap.wrap(bar_label, 30)), fontsize=7)
    bar.ax.tick_params(labelsize=6)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def _figure(width_inches: float, height_inches: float, dpi: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_inches, height_inches), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path, dpi: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=dpi)
    return path


def save_map_figure(image: Tensor, heat: Tensor, path: str | Path, title: str, signed: bool = False,
                    cmap: str = "jet", signed_cmap: str = "RdBu_r", alpha: float = 0.6,
                    size: Sequence[int] | None = None, panel_inches: float = 2.6, dpi: int = 100) -> Path:
    """``map_figure`` as a PNG of (3 panel_inches + 1.2) x (panel_inches + 0.5) inches at ``dpi``."""
    return _save(map_figure(image, heat, title, signed, cmap, signed_cmap, alpha, size, panel_inches, dpi), path,
                 dpi)


def map_figure(image: Tensor, heat: Tensor, title: str, signed: bool = False, cmap: str = "jet",
               signed_cmap: str = "RdBu_r", alpha: float = 0.6, size: Sequence[int] | None = None,
               panel_inches: float = 2.6, dpi: int = 100):
    """One map beside its input, a matplotlib figure of three panels: the input, the map with a colour bar (its
    own values), the map over the input (``overlay_rgb``) with a colour bar of its [0, 1] scale.

    image: [H, W], [1, H, W] or [3, H, W]. heat: [h, w] (any size). ``signed`` maps (gradient x input) are
    drawn with ``signed_cmap`` centred on 0, and the overlay shows their positive part (what raises the score).
    """
    image = _as_chw(image).float().cpu()
    heat = torch.as_tensor(heat).detach().float().cpu()
    if heat.dim() != 2:
        raise ValueError(f"heat must be one map [h, w], got shape {tuple(heat.shape)}")
    fig = _figure(3 * panel_inches + 1.2, panel_inches + 0.5, dpi)
    # constrained: each colour bar gets room for its tick labels (placed by hand, the map's bar ran under the
    # third panel and its labels were cut to "0.05", "-0.0")
    fig.set_layout_engine("constrained")
    axes = fig.subplots(1, 3)
    shown = image[0] if image.shape[0] == 1 else image.permute(1, 2, 0)
    axes[0].imshow(normalize_cam(shown.flatten()[None]).view_as(shown).numpy(), cmap="gray",
                   interpolation="nearest")
    axes[0].set_title("input", fontsize=8)
    if signed:
        bound = float(heat.abs().max().clamp_min(1e-12))
        drawn = axes[1].imshow(heat.numpy(), cmap=signed_cmap, vmin=-bound, vmax=bound, interpolation="nearest")
    else:
        drawn = axes[1].imshow(heat.numpy(), cmap=cmap, interpolation="nearest")
    bar = fig.colorbar(drawn, ax=axes[1], shrink=0.9)
    bar.ax.tick_params(labelsize=7)
    axes[1].set_title("gradient x input" if signed else "Grad-CAM", fontsize=8)
    axes[2].imshow(overlay_rgb(image, heat.clamp_min(0) if signed else heat, size, alpha, cmap))
    axes[2].set_title("over the input", fontsize=8)
    for ax in axes:
        ax.axis("off")
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    # the overlay's colours: the map (its positive part where signed) min-max scaled to [0, 1] (overlay_rgb)
    bar = fig.colorbar(ScalarMappable(Normalize(0.0, 1.0), cmap), ax=axes[2], shrink=0.9)
    bar.set_label("positive part, scaled to [0, 1]" if signed else "scaled to [0, 1]", fontsize=7)
    bar.ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=9)
    return fig


def save_attribution_bars(vector: Tensor, attribution: Tensor, path: str | Path, title: str,
                          width_inches: float = 8.0, dpi: int = 100) -> Path:
    """An attribution over the entries of an input without spatial layout (a feature vector), as a PNG of
    two bar charts: the input's values above, the attribution per entry below (red raises the score,
    blue lowers it)."""
    vector = torch.as_tensor(vector).detach().float().cpu().flatten()
    attribution = torch.as_tensor(attribution).detach().float().cpu().flatten()
    if vector.numel() != attribution.numel():
        raise ValueError(f"{vector.numel()} input entries but {attribution.numel()} attributions")
    fig = _figure(width_inches, 4.4, dpi)
    top, bottom = fig.subplots(2, 1, sharex=True)
    entries = np.arange(vector.numel())
    top.bar(entries, vector.numpy(), color="0.4", width=0.9)
    top.set_ylabel("input", fontsize=8)
    values = attribution.numpy()
    bottom.bar(entries, values, color=np.where(values >= 0, "tab:red", "tab:blue"), width=0.9)
    bottom.axhline(0.0, color="black", linewidth=0.5)
    bottom.set_ylabel("gradient x input", fontsize=8)
    bottom.set_xlabel("input entry", fontsize=8)
    fig.suptitle(title, fontsize=9)
    return _save(fig, path, dpi)


def _as_chw(image: Tensor) -> Tensor:
    image = torch.as_tensor(image)
    if image.dim() == 2:
        image = image[None]
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"image must be [H, W], [1, H, W] or [3, H, W], got shape {tuple(image.shape)}")
    return image.detach()


# ---------------------------------------------------------------------------------------------------------
# Textual explanations: importance -> attributes
# ---------------------------------------------------------------------------------------------------------
@runtime_checkable
class ImportanceToKnowledge(Protocol):
    """Anything with the inverse map of NIWT (e.g. ``modnet.methods.niwt.KnowledgeToImportance``)."""

    def importance_to_knowledge(self, importance: Tensor) -> Tensor: ...


KnowledgeMap = Union[ImportanceToKnowledge, Tensor, np.ndarray, nn.Linear]


def knowledge_scores(importance: Tensor, knowledge_of_importance: KnowledgeMap) -> Tensor:
    """Attribute scores of an importance vector: Tensor[N] -> Tensor[A] (or [B, N] -> [B, A]).

    knowledge_of_importance is one of
    * an object with ``importance_to_knowledge(importance) -> Tensor[A]`` (NIWT's own inverse);
    * a matrix W [A x N] of the linear map knowledge -> importance, a = W^T k. The inverse is the least-squares
      solution k = argmin ||W^T k - a||^2 = pinv(W^T) a (Moore-Penrose; the minimum-norm one when A > N);
    * an ``nn.Linear(A, N)``, a = weight k + bias: the same with W = weight^T after removing the bias.
    """
    importance = torch.as_tensor(importance)
    if importance.dim() not in (1, 2):
        raise ValueError(f"importance must be [N] or [B, N], got shape {tuple(importance.shape)}")
    if isinstance(knowledge_of_importance, ImportanceToKnowledge):
        rows = importance if importance.dim() == 2 else importance[None]
        scores = torch.stack([torch.as_tensor(knowledge_of_importance.importance_to_knowledge(r)).reshape(-1)
                              for r in rows])
        return scores if importance.dim() == 2 else scores[0]
    if isinstance(knowledge_of_importance, nn.Linear):
        bias = knowledge_of_importance.bias
        weight = knowledge_of_importance.weight.detach().T
        importance = importance if bias is None else importance - bias.detach().to(importance.device)
        knowledge_of_importance = weight
    W = torch.as_tensor(knowledge_of_importance)
    if W.dim() != 2 or W.shape[1] != importance.shape[-1]:
        raise ValueError(f"W must be the knowledge->importance matrix [A x N] with N = {importance.shape[-1]} "
                         f"units, got shape {tuple(W.shape)}; pass W.T if yours is [N x A]")
    dtype = torch.promote_types(torch.promote_types(W.dtype, importance.dtype), torch.float32)
    W = W.to(device=importance.device, dtype=dtype)
    inverse = torch.linalg.pinv(W.T)  # A x N
    return importance.to(dtype) @ inverse.T


TIE = " = "  # joins the names of attributes reported as one entry (``tied_attribute_groups``)


def rank_attributes(scores: Tensor, attribute_names: Sequence[str], top_k: int = 5,
                    tied: Sequence[Sequence[int]] = ()) -> RankedAttributes:
    """The ``top_k`` highest scores as [(attribute name, score)], best first.

    ``tied``: groups of attribute indices the fitted classes cannot tell apart
    (``modnet.methods.knowledge.tied_attribute_groups``); each group is one entry named by its members joined
    with " = " (e.g. ``"segment_top = segment_bottom"``), scored by its best member."""
    if scores.dim() != 1 or scores.numel() != len(attribute_names):
        raise ValueError(f"got {scores.numel()} attribute scores but {len(attribute_names)} attribute names")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    group_of = {int(i): tuple(int(j) for j in g) for g in tied for i in g}
    ranked: RankedAttributes = []
    reported: set[tuple[int, ...]] = set()
    for i in torch.argsort(scores.detach().cpu(), descending=True, stable=True).tolist():
        group = group_of.get(i, (i,))
        if group in reported:
            continue
        reported.add(group)
        ranked.append((TIE.join(str(attribute_names[j]) for j in group), float(scores[i])))
        if len(ranked) == top_k:
            break
    return ranked


def explain_in_words(importance: Tensor, knowledge_of_importance: KnowledgeMap, attribute_names: Sequence[str],
                     top_k: int = 5, tied: Sequence[Sequence[int]] = ()) -> RankedAttributes:
    """Name the attributes behind a decision: the inverse map importance -> knowledge, best ``top_k`` first.

    importance: Tensor[N], a class's neuron importance (NIWT step 1, or predicted for an unseen class).
    See ``knowledge_scores`` for the accepted maps; ``tied`` as in ``rank_attributes``. Returns [(attribute name,
    score)], highest score first.
    """
    importance = torch.as_tensor(importance)
    if importance.dim() != 1:
        raise ValueError(f"importance must be one vector [N], got shape {tuple(importance.shape)}")
    return rank_attributes(knowledge_scores(importance, knowledge_of_importance), attribute_names, top_k, tied)


def module_attributes(importance_matrix: Tensor, modules: Mapping[str, Sequence[int]],
                      attribute_names: Sequence[str], knowledge: Tensor, top_k: int = 5, positive_only: bool = True,
                      tied: Sequence[Sequence[int]] = (), exclude: Sequence[int] = ()) -> dict[str, RankedAttributes]:
    """Per functional module, the attributes of the classes that rely on it more than the others do.

    importance_matrix: [C x N], class importance of the layer's N units (its positive part when
    ``positive_only``: units that raise a class score, the Grad-CAM convention); knowledge: [C x A], the same
    classes' attribute rows (unnormalised where there are: a column constant over the classes then stays
    constant). A module's importance in class c, as a share of the layer's mean importance per class,
    w_m(c) = sum over its units of importance_c / mean_c' (sum over all units of importance_c'), says how much
    class c's score rests on the module; its score for attribute a is how that follows the attribute over the
    classes:

        score_m(a) = mean_c (w_m(c) - mean_c w_m) * z_c[a],   z_c[a] = (k_c[a] - mean_c k[a]) / std_c k[a]

    (a covariance with the standardised attribute): positive where the classes having a rely on the module more,
    negative where they rely on it less, zero for a module every class relies on alike (it tells no class apart)
    and for an attribute constant over the classes (it explains no difference); small for a module with a small
    part of the layer's importance. (A share of each class's own total would move with the other modules: a
    module every class uses alike would follow what the others follow.) Only positive scores are listed; a module with none, or without importance, gets an empty
    list. ``exclude``: attribute indices left out; ``tied`` as in ``rank_attributes``. Until stop 54 a module was
    scored by NIWT's inverse map's response to its class-averaged importance, f(mean) - f(0): that drops the class
    dimension and, through the map's L2 normalisation of its input, the module's size, so its words could name
    what its units do not respond to (planted shapes); the inverse map names a class's attributes
    (``explain_in_words``), not a module's.
    """
    importance_matrix = torch.as_tensor(importance_matrix)
    if importance_matrix.dim() != 2:
        raise ValueError(f"importance_matrix must be [classes x units], got shape {tuple(importance_matrix.shape)}")
    knowledge = torch.as_tensor(knowledge, dtype=torch.float32, device=importance_matrix.device)
    if knowledge.dim() != 2 or knowledge.shape[0] != importance_matrix.shape[0] or \
            knowledge.shape[1] != len(attribute_names):
        raise ValueError(f"knowledge must be [classes x attributes] = [{importance_matrix.shape[0]} x "
                         f"{len(attribute_names)}], got shape {tuple(knowledge.shape)}")
    modules = _check_modules(modules)
    n_units = importance_matrix.shape[1]
    rows = (importance_matrix.clamp_min(0) if positive_only else importance_matrix.abs()).float()
    masks = torch.zeros(len(modules), n_units, dtype=rows.dtype, device=rows.device)
    for m, (name, units) in enumerate(modules.items()):
        if max(units) >= n_units:
            raise ValueError(f"module {name!r} names unit {max(units)} but the importance has {n_units} units")
        masks[m, torch.as_tensor(units, device=rows.device)] = 1.0
    mass = rows @ masks.T  # C x M: each module's importance in each class
    share = mass / rows.sum(1).mean().clamp_min(1e-12)
    spread = knowledge.std(0, unbiased=False)
    z = torch.where(spread > 1e-6, (knowledge - knowledge.mean(0)) / spread.clamp_min(1e-6),
                    torch.zeros_like(knowledge))
    scores = (share - share.mean(0)).T @ z / rows.shape[0]  # M x A
    if len(exclude):
        scores[:, torch.as_tensor(list(exclude), device=scores.device)] = 0.0
    out = {}
    for m, name in enumerate(modules):
        if not bool(mass[:, m].any()):
            out[name] = []
            continue
        ranked = rank_attributes(scores[m].cpu(), attribute_names, top_k, tied)
        out[name] = [(a, s) for a, s in ranked if s > 0]
    return out


def describe(ranked: RankedAttributes) -> str:
    """One line of text, e.g. ``'stripes (+0.91), black (+0.52)'``."""
    return ", ".join(f"{name} ({score:+.3f})" for name, score in ranked)


def write_module_explanations_md(path: str | Path, modules: Mapping[str, Mapping[str, Mapping]],
                                 per_class: Mapping[str, Mapping[str, RankedAttributes]] | None = None,
                                 layer_notes: Mapping[str, str] | None = None, title: str = "Explanations",
                                 notes: Sequence[str] = (),
                                 class_agreement: Mapping[str, Mapping[str, float]] | None = None) -> Path:
    """Write a readable markdown report of a network's functional modules, layer by layer.

    modules: layer -> module -> {"units": [unit ids], "attributes": [(name, score)], "image": PNG path
    relative to the markdown file, optionally "note": one line shown under the module's heading}; per_class: layer -> class -> ranked attributes (optional);
    layer_notes: layer -> one line shown under the layer's heading; class_agreement: layer -> class -> the
    cosine of its predicted and its own knowledge (``modnet.methods.niwt.knowledge_agreement``; optional).
    """
    lines = [f"# {title}", ""]
    lines += [f"> {note}" for note in notes] + ([""] if notes else [])
    scored = any(entry.get("attributes") for layer_modules in modules.values() for entry in layer_modules.values()) \
        or any((per_class or {}).values())
    if scored:  # without class knowledge (a cl run on data with no attributes) there are no scores to explain
        lines += ["Attribute scores come from the inverse of the knowledge -> importance map (NIWT): higher means "
                  "the attribute explains more of the importance of the module's units.", ""]
    for layer, layer_modules in modules.items():
        lines += [f"## {layer}", ""]
        if layer_notes and layer in layer_notes:
            lines += [layer_notes[layer], ""]
        for name, entry in layer_modules.items():
            units = [int(u) for u in entry["units"]]
            ranked = [(str(a), float(v)) for a, v in entry.get("attributes", [])]
            lines += [f"### Module `{name}` ({len(units)} units)", "", f"Units: {', '.join(map(str, units))}", ""]
            if entry.get("note"):
                lines += [f"Note: {entry['note']}.", ""]
            if ranked:
                lines += [f"Explained by: {', '.join(a for a, _ in ranked)}", "",
                          "| rank | attribute | score |", "|---:|---|---:|"]
                lines += [f"| {r} | {a} | {v:+.4f} |" for r, (a, v) in enumerate(ranked, start=1)]
                lines.append("")
            if entry.get("image"):
                lines += [f"![{layer} {name}]({entry['image']})", ""]
        if per_class and per_class.get(layer):
            agree = (class_agreement or {}).get(layer) or {}
            lines += [f"### Classes at {layer}", ""]
            if agree:
                mean = sum(agree.values()) / len(agree)
                lines += ["Each class's attributes are predicted from its importance by the inverse map fitted on the "
                          "other classes (held out: fitted on the class itself, the map returns its own attribute "
                          "list). Agreement: cosine between the predicted and the class's own attributes, both "
                          f"centred on the mean class (0: nothing beyond the average class); mean {mean:+.3f}.", "",
                          "| class | attributes | agreement |", "|---|---|---:|"]
                lines += [f"| {c} | {describe(ranked)} | {agree.get(c, float('nan')):+.3f} |"
                          for c, ranked in per_class[layer].items()]
            else:
                lines += ["| class | attributes |", "|---|---|"]
                lines += [f"| {c} | {describe(ranked)} |" for c, ranked in per_class[layer].items()]
            lines.append("")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


__all__ = [
    "TargetGradCAM", "ClassGradCAM", "ModuleGradCAM", "upsample_cam", "normalize_cam",
    "default_display_size", "overlay_rgb", "save_overlay", "save_overlay_grid", "save_map_figure",
    "save_attribution_bars",
    "ImportanceToKnowledge", "knowledge_scores", "rank_attributes", "explain_in_words", "module_attributes",
    "describe", "write_module_explanations_md",
]
