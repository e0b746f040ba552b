"""Explanations against planted structure: hand-built bar detectors, planted attribute maps, PNG sizes.

The CNN below is built by hand: channels 0-1 detect horizontal bars, channels 2-3 vertical bars. For a
score that is a linear function of globally pooled activations, Grad-CAM has a closed form (Selvaraju et al.
2017, Sec. 3.1: it reduces to CAM of Zhou et al. 2016): alpha_k = w_k / (HW) and CAM = ReLU(sum_k w_k A_k)/(HW).
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from matplotlib import image as mpimg
from torch import nn

from modnet.explain.gradcam import (ClassGradCAM, ModuleGradCAM, explain_in_words, module_attributes, save_overlay,
                            save_overlay_grid, write_explanations_md)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
MODULES = {"horizontal": [0, 1], "vertical": [2, 3]}


class BarNet(nn.Module):
    """conv3x3 (hand-set bar detectors) -> ReLU -> maxpool2 -> global mean -> linear."""

    def __init__(self, class_weights: torch.Tensor):
        super().__init__()
        horizontal = torch.tensor([[-1.0, -1.0, -1.0], [2.0, 2.0, 2.0], [-1.0, -1.0, -1.0]]) / 3
        self.conv = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.act = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(4, class_weights.shape[0], bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.stack([horizontal, 0.5 * horizontal, horizontal.T, 0.5 * horizontal.T])[:, None])
            self.head.weight.copy_(class_weights)

    def forward(self, x):
        return self.head(self.pool(self.act(self.conv(x))).mean(dim=(2, 3)))


def bar_image(size: int, horizontal_at: tuple[int, int], vertical_at: tuple[int, int], length: int = 5):
    """Image with a horizontal bar starting at (row, col) and a vertical one; returns image and bar masks."""
    img = torch.zeros(size, size)
    h_mask, v_mask = torch.zeros(size, size, dtype=torch.bool), torch.zeros(size, size, dtype=torch.bool)
    r, c = horizontal_at
    h_mask[r, c:c + length] = True
    r, c = vertical_at
    v_mask[r:r + length, c] = True
    img[h_mask | v_mask] = 1.0
    return img, h_mask, v_mask


def argmax_rc(cam: torch.Tensor) -> tuple[int, int]:
    flat = int(cam.flatten().argmax())
    return flat // cam.shape[-1], flat % cam.shape[-1]


def chebyshev_to_mask(rc: tuple[int, int], mask: torch.Tensor) -> int:
    rows, cols = torch.nonzero(mask, as_tuple=True)
    return int(torch.maximum((rows - rc[0]).abs(), (cols - rc[1]).abs()).min())


# -- (1) module Grad-CAM peaks in the region its module responds to ----------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_module_cam_peaks_in_the_quadrant_of_its_feature(device):
    net = BarNet(torch.eye(4)[:2]).to(device)
    # Image 0: horizontal bar top-left, vertical bar bottom-right; image 1: the other way round.
    img0, _, _ = bar_image(16, (3, 1), (9, 12))
    img1, _, _ = bar_image(16, (12, 9), (1, 3))
    x = torch.stack([img0, img1])[:, None].to(device)
    cam = ModuleGradCAM(net, net.pool, MODULES)
    h_maps, v_maps = cam(x, "horizontal"), cam(x, "vertical")
    assert h_maps.shape == (2, 16, 16) and h_maps.device.type == device

    def quadrant(rc):
        return ("top" if rc[0] < 8 else "bottom") + "-" + ("left" if rc[1] < 8 else "right")

    assert quadrant(argmax_rc(h_maps[0])) == "top-left"
    assert quadrant(argmax_rc(v_maps[0])) == "bottom-right"
    assert quadrant(argmax_rc(h_maps[1])) == "bottom-right"
    assert quadrant(argmax_rc(v_maps[1])) == "top-left"


def test_module_cam_equals_closed_form():
    """score = sum_{c in m} mean A_c  =>  Grad-CAM = ReLU(sum_{c in m} A_c) / (HW), at the layer's resolution."""
    torch.manual_seed(0)
    net = BarNet(torch.eye(4)[:2])
    x = torch.rand(3, 1, 16, 16)
    A = net.pool(net.act(net.conv(x))).detach()
    cam = ModuleGradCAM(net, net.pool, MODULES).layer_cam(x, ["vertical", "horizontal", 1])
    expected = torch.stack([A[0, 2:].sum(0), A[1, :2].sum(0), A[2, 2:].sum(0)]) / (8 * 8)
    torch.testing.assert_close(cam, expected.clamp_min(0))


# -- (2) class Grad-CAM peaks where the class evidence is -----------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["captum", "pytorch_grad_cam"])
def test_class_cam_peaks_on_the_class_evidence(device, backend):
    # class 0 = "horizontal, not vertical", class 1 = the opposite.
    net = BarNet(torch.tensor([[1.0, 1.0, -1.0, -1.0], [-1.0, -1.0, 1.0, 1.0]])).to(device)
    gen = torch.Generator().manual_seed(1)
    images, h_masks, v_masks = [], [], []
    for _ in range(6):  # bars at random places, 12+ pixels apart, in 24x24 images
        while True:
            hr, hc, vr, vc = torch.randint(1, 18, (4,), generator=gen).tolist()
            if max(abs(hr - vr), abs(hc - vc)) >= 12:
                break
        img, hm, vm = bar_image(24, (hr, hc), (vr, vc))
        images.append(img), h_masks.append(hm), v_masks.append(vm)
    x = torch.stack(images)[:, None].to(device)
    cam = ClassGradCAM(net, net.pool, class_names=["horizontal", "vertical"], backend=backend)
    h_maps = cam(x, "horizontal")
    v_maps = cam(x, torch.ones(6, dtype=torch.long))
    for i in range(6):
        assert chebyshev_to_mask(argmax_rc(h_maps[i]), h_masks[i]) <= 2
        assert chebyshev_to_mask(argmax_rc(v_maps[i]), v_masks[i]) <= 2


def test_class_cam_equals_cam_and_backends_agree():
    torch.manual_seed(2)
    W = torch.randn(3, 4)
    net = BarNet(W)
    x = torch.rand(2, 1, 16, 16)
    A = net.pool(net.act(net.conv(x))).detach()
    targets = [2, 0]
    expected = torch.einsum("bk,bkhw->bhw", W[targets], A).clamp_min(0) / 64  # CAM of Zhou et al. / HW
    captum_cam = ClassGradCAM(net, net.pool)
    torch.testing.assert_close(captum_cam.layer_cam(x, targets), expected)
    other = ClassGradCAM(net, net.pool, backend="pytorch_grad_cam")
    torch.testing.assert_close(other(x, targets), captum_cam(x, targets), atol=1e-4, rtol=0)


def test_cam_keeps_training_mode_and_rejects_bad_input():
    net = BarNet(torch.eye(4)[:2]).train()
    x = torch.rand(1, 1, 8, 8)
    ClassGradCAM(net, net.pool)(x, 0)
    assert net.training
    with pytest.raises(ValueError, match="not a submodule"):
        ClassGradCAM(net, nn.ReLU())
    with pytest.raises(ValueError, match="spatial"):
        ClassGradCAM(net, net.head)(x, 0)
    with pytest.raises(ValueError, match="unknown target"):
        ModuleGradCAM(net, net.pool, MODULES)(x, "diagonal")
    with pytest.raises(ValueError, match="channel 9"):
        ModuleGradCAM(net, net.pool, {"m": [9]})(x, "m")
    with pytest.raises(ValueError, match="targets for a batch"):
        ClassGradCAM(net, net.pool)(torch.rand(3, 1, 8, 8), [0, 1])


# -- (3) textual: a class defined by one attribute gets that attribute named first --------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_one_attribute_class_names_its_attribute_first(device):
    gen = torch.Generator().manual_seed(3)
    n_attr, n_units = 12, 64
    names = [f"attr{j}" for j in range(n_attr)]
    W = torch.randn(n_attr, n_units, generator=gen).to(device)  # knowledge -> importance, a = W^T k
    for j in range(n_attr):
        importance = W[j] + 0.1 * torch.randn(n_units, generator=gen).to(device)
        ranked = explain_in_words(importance, W, names, top_k=3)
        assert ranked[0][0] == names[j]
        assert len(ranked) == 3 and ranked[0][1] > ranked[1][1] >= ranked[2][1]


def test_knowledge_map_forms():
    # Hand-solved: W^T k = a with W = [[1,0,1],[0,2,0]] and a = [3,4,3] gives k = (3, 2).
    W = torch.tensor([[1.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    ranked = explain_in_words(torch.tensor([3.0, 4.0, 3.0]), W, ["wings", "beak"], top_k=2)
    assert [a for a, _ in ranked] == ["wings", "beak"]
    np.testing.assert_allclose([s for _, s in ranked], [3.0, 2.0], atol=1e-5)

    # nn.Linear(A, N): a = weight k + bias; the bias must not leak into the explanation.
    lin = nn.Linear(2, 3)
    with torch.no_grad():
        lin.weight.copy_(W.T)
        lin.bias.fill_(5.0)
    ranked = explain_in_words(torch.tensor([8.0, 9.0, 8.0]), lin, ["wings", "beak"], top_k=2)
    np.testing.assert_allclose([s for _, s in ranked], [3.0, 2.0], atol=1e-5)

    class NIWTLike:  # anything with the inverse map is used as is
        def importance_to_knowledge(self, importance):
            return torch.tensor([0.1, 0.7, 0.4])

    ranked = explain_in_words(torch.zeros(5), NIWTLike(), ["a", "b", "c"], top_k=3)
    assert [a for a, _ in ranked] == ["b", "c", "a"]
    with pytest.raises(ValueError, match="pass W.T"):
        explain_in_words(torch.zeros(3), W.T, ["wings", "beak"])
    with pytest.raises(ValueError, match="attribute names"):
        explain_in_words(torch.zeros(3), W, ["wings"])


def planted_modules(seed: int = 4):
    """3 modules of 10 units; attribute j drives module j; attributes 3-4 are spread over all units."""
    gen = torch.Generator().manual_seed(seed)
    n_units, modules = 30, {"m0": list(range(0, 10)), "m1": list(range(10, 20)), "m2": list(range(20, 30))}
    W = 0.05 * torch.randn(5, n_units, generator=gen)
    for j, units in enumerate(modules.values()):
        W[j, units] += 0.5 + torch.rand(len(units), generator=gen)
    W[3:] += 0.3 * torch.randn(2, n_units, generator=gen)
    K = (torch.rand(8, 5, generator=gen) > 0.5).float()  # 8 classes' attribute vectors
    importance = K @ W + 0.02 * torch.randn(8, n_units, generator=gen)
    return importance, modules, W, K, ["furry", "striped", "aquatic", "large", "noisy"]


def test_module_attributes_recover_planted_attribute():
    importance, modules, W, _, names = planted_modules()
    per_module = module_attributes(importance, modules, W, names, top_k=2)
    assert [ranked[0][0] for ranked in per_module.values()] == ["furry", "striped", "aquatic"]


# -- (4) overlay PNGs -------------------------------------------------------------------------------------------
def test_overlay_png_size_and_content(tmp_path):
    image = torch.linspace(0, 1, 64).view(8, 8)  # grayscale ramp
    cam = torch.zeros(4, 4)
    cam[0, 0] = 1.0  # hot only in the top-left corner
    path = save_overlay(image, cam, tmp_path / "overlay.png", size=(64, 96))
    png = mpimg.imread(path)
    assert png.shape[:2] == (64, 96)
    top_left, bottom_right = png[0, 0, :3], png[-1, -1, :3]
    assert top_left[0] > top_left[2] + 0.2  # jet's hot end is red
    np.testing.assert_allclose(bottom_right, bottom_right[0], atol=1e-2)  # cold: the gray image shows through
    assert bottom_right[0] > 0.9  # the ramp's brightest pixel, unchanged

    default = mpimg.imread(save_overlay(torch.rand(3, 8, 8), cam, tmp_path / "rgb.png"))
    assert default.shape[:2] == (224, 224)  # 8x8 enlarged by the integer factor 28


def test_overlay_grid_png(tmp_path):
    cams = {f"class {c}": torch.rand(4, 4) for c in range(3)}
    png = mpimg.imread(save_overlay_grid(torch.rand(8, 8), cams, tmp_path / "grid.png", ncols=2,
                                         panel_inches=2.0, dpi=50))
    assert png.shape[:2] == (200, 200)  # 2 x 2 panels (input + 3 maps) of 100 px


# -- (5) explanations.md ---------------------------------------------------------------------------------------
def test_explanations_md_names_attributes_per_class_and_module(tmp_path):
    importance, modules, W, K, names = planted_modules()
    classes = {"zebra": 1, "otter": 2}
    per_class = {c: explain_in_words(W[j], W, names, top_k=3) for c, j in classes.items()}
    per_module = module_attributes(importance, modules, W, names, top_k=3)
    path = write_explanations_md(tmp_path / "explanations.md", per_class, per_module, module_units=modules,
                                 class_images={"zebra": "zebra.png"})
    text = path.read_text()
    sections = dict(re.findall(r"### (?:Class|Module) `([^`]+)`\n(.*?)(?=\n### |\n## |\Z)", text, re.S))
    assert set(sections) == {"zebra", "otter", "m0", "m1", "m2"}
    expected_first = {"zebra": "striped", "otter": "aquatic", "m0": "furry", "m1": "striped", "m2": "aquatic"}
    for name, attribute in expected_first.items():
        rows = re.findall(r"^\| 1 \| (\S+) \| ([+-][0-9.]+) \|$", sections[name], re.M)
        assert rows and rows[0][0] == attribute
    assert "zebra.png" in sections["zebra"] and "Units: 0, 1, 2" in sections["m0"]


# -- the explain job end to end on the embedded digits ------------------------------------------------------
def test_explain_job_on_digits(tmp_path):
    from modnet.config import compose
    from modnet.jobs.explain import run_explain
    from scenarios.zsl import DIGIT_ATTRIBUTE_NAMES

    cfg = compose("explain", [f"output_dir={tmp_path}", "threads=1", "train.epochs=10", "niwt.map_epochs=100",
                              "niwt.max_iterations=60", "explain.module_grids=false"])
    result = run_explain(cfg)
    assert result["gzsl"]["S"] > 0.8  # a CNN on 8x8 digits separates the seen classes

    modules = result["modules"]
    units = [u for members in modules.values() for u in members]
    assert modules and len(units) == len(set(units)) and set(units) <= set(range(cfg.model.channels[-1]))

    # Digit 1 is the two right-hand segments and nothing else: the inverse map must name exactly those first.
    top_two = {name for name, _ in result["per_class"]["1 (seen)"][:2]}
    assert top_two == {"segment_upper_right", "segment_lower_right"}

    text = (tmp_path / "explanations.md").read_text()
    sections = dict(re.findall(r"### (?:Class|Module) `([^`]+)`\n(.*?)(?=\n### |\n## |\Z)", text, re.S))
    classes = [f"{d} ({'unseen' if d in (2, 7) else 'seen'})" for d in range(10)]
    assert set(sections) == set(classes) | set(modules)
    for section in sections.values():
        named = re.findall(r"^\| \d+ \| (\S+) \| [+-][0-9.]+ \|$", section, re.M)
        assert len(named) == cfg.explain.top_k and set(named) <= set(DIGIT_ATTRIBUTE_NAMES)
    for png in [f"class_{d}.png" for d in range(10)] + [f"{m}.png" for m in modules]:
        assert mpimg.imread(tmp_path / png).shape[:2] == (224, 224)


def test_explain_job_rejects_bad_config(tmp_path):
    from modnet.config import ConfigError, compose
    from modnet.jobs.explain import run_explain

    with pytest.raises(ConfigError, match="modules.method"):
        run_explain(compose("explain", [f"output_dir={tmp_path}", "modules.method=kmeans"]))
    with pytest.raises(ConfigError, match="choose one of benchmark=digits, npz"):
        compose("explain", [f"output_dir={tmp_path}", "benchmark=awa2"])  # features: no images for Grad-CAM


def test_every_explain_setting_is_commented():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "configs" / "explain.yaml").read_text()
    settings = [line for line in text.splitlines() if re.match(r"^\s*\w+:\s*\S", line)]
    assert settings and all("#" in line for line in settings)
