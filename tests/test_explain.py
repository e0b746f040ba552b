"""Explanations against planted structure: hand-built bar detectors, planted attribute maps, PNG sizes, and
``modnet explain`` on the modular networks of tiny ``modnet cl`` runs.

The CNN below is built by hand: channels 0-1 detect horizontal bars, channels 2-3 vertical bars. For a
score that is a linear function of globally pooled activations, Grad-CAM has a closed form (Selvaraju et al.
2017, Sec. 3.1: it reduces to CAM of Zhou et al. 2016): alpha_k = w_k / (HW) and CAM = ReLU(sum_k w_k A_k)/(HW).
For a fully connected modular network, a module's gradient x input has one too (``hand_input_x_gradient``).
"""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib import image as mpimg
from torch import nn

from modnet.explain.gradcam import (ClassGradCAM, ModuleGradCAM, explain_in_words, module_attributes,
                                    save_attribution_bars, save_map_figure, save_overlay, save_overlay_grid,
                                    write_module_explanations_md)

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
    importance, modules, W, K, names = planted_modules()
    per_module = module_attributes(importance, modules, names, K, top_k=2)
    assert [ranked[0][0] for ranked in per_module.values()] == ["furry", "striped", "aquatic"]


def test_module_words_follow_the_classes_not_the_class_average_nor_the_module_s_size_alone():
    """Planted across 12 classes: module A's units are important for the classes with attribute 0, module B's for
    those without attribute 1 (it goes against it), module C's equally for every class, module D is A shrunk
    10^4-fold. A is named attribute 0 first; B is not named attribute 1; C, which tells no class apart, gets no
    words; D gets A's words at a fraction of A's scores (until stop 54 the class average and NIWT's inverse map's
    normalisation gave a module its words whatever its size and whichever classes used it)."""
    gen = torch.Generator().manual_seed(0)
    K = (torch.rand(12, 4, generator=gen) > 0.5).float()
    K[:6, 0], K[6:, 0] = 1.0, 0.0  # both values present
    modules = {"A": [0, 1, 2], "B": [3, 4, 5], "C": [6, 7, 8], "D": [9, 10, 11]}
    importance = 0.01 * torch.rand(12, 15, generator=gen)
    importance[:, 0:3] += K[:, 0:1] * (1.0 + torch.rand(12, 3, generator=gen))
    importance[:, 3:6] += (1 - K[:, 1:2]) * (1.0 + torch.rand(12, 3, generator=gen))
    importance[:, 6:9] += 1.0
    importance[:, 9:12] = 1e-4 * importance[:, 0:3]
    importance[:, 12:] += K[:, 2:4] @ torch.ones(2, 3)  # attributes 2, 3: units of no module
    names = ["a0", "a1", "a2", "a3"]
    words = module_attributes(importance, modules, names, K, top_k=4)
    assert words["A"] and words["A"][0][0] == "a0"
    assert "a1" not in [a for a, _ in words["B"]]
    assert words["C"] == [] or all(s < 1e-3 for _, s in words["C"])
    assert words["D"] and words["D"][0][0] == "a0" and words["D"][0][1] < 1e-2 * words["A"][0][1]
    # an attribute constant over the classes explains nothing: excluded, it is named by no module
    words = module_attributes(importance, modules, names, K, top_k=4, exclude=[0])
    assert all("a0" not in [a for a, _ in ranked] for ranked in words.values())


def test_tied_attribute_groups_find_planted_collinear_columns():
    from modnet.methods.knowledge import tied_attribute_groups

    gen = torch.Generator().manual_seed(3)
    a, c, f = torch.rand(6, generator=gen), torch.rand(6, generator=gen), torch.rand(6, generator=gen)
    # 0: a; 1: 2a + 1 (tied with 0); 2: c; 3: constant (uninformative, tied with nothing); 4: 1 - a (ordered
    # against a, not tied); 5: f; 6: 0.5 f (tied with 5)
    K = torch.stack([a, 2 * a + 1, c, torch.full((6,), 0.7), 1 - a, f, 0.5 * f], dim=1)
    assert tied_attribute_groups(K) == [[0, 1], [5, 6]]
    assert tied_attribute_groups(K[:, [0, 2, 5]]) == []


def test_collinear_attributes_are_reported_as_one_tied_entry():
    """Two attributes equal on every fitted class get equal scores from NIWT's inverse map whatever the
    importance (the data cannot tell them apart): the explanation names them together, once."""
    from modnet.methods.knowledge import tied_attribute_groups
    from modnet.methods.niwt import KnowledgeToImportance

    importance, modules, W, K, names = planted_modules()
    K = torch.cat([K, K[:, 1:2]], dim=1)  # "stripes_twin" equals "striped" on all 8 classes
    names = names + ["stripes_twin"]
    k_map = KnowledgeToImportance(K.shape[1], importance.shape[1]).fit(K, importance, epochs=200, seed=0)
    tied = tied_attribute_groups(K)
    assert tied == [[1, 5]]
    plain = explain_in_words(importance[0], k_map, names, top_k=len(names))
    scores = dict(plain)
    assert scores["striped"] == pytest.approx(scores["stripes_twin"], rel=1e-4, abs=1e-6)  # the tie itself
    for ranked in [explain_in_words(importance[i], k_map, names, top_k=len(names), tied=tied) for i in range(8)] + \
            list(module_attributes(importance, modules, names, K, top_k=len(names), tied=tied).values()):
        entries = [name for name, _ in ranked]
        assert "striped" not in entries and "stripes_twin" not in entries
        assert len(entries) <= len(names) - 1  # one entry per group, every other attribute at most once
    per_module = module_attributes(importance, modules, names, K, top_k=1, tied=tied)
    assert per_module["m1"][0][0] == "striped = stripes_twin"  # the module striped drives still names it first


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
    assert png.shape[:2] == (207, 250)  # 2 x 2 panels (input + 3 maps) of 100 px, + 50 px for the bar, 7.5 above
    # what each panel shows: the input, then each map's own overlay under its name, in order (only the PNG's
    # size was checked: a grid drawing one map everywhere passed)
    from modnet.explain.gradcam import overlay_grid_figure, overlay_rgb

    image = torch.rand(8, 8)
    fig = overlay_grid_figure(image, cams, ncols=2)
    panels = [ax for ax in fig.axes if ax.get_images()][:4]
    assert [ax.get_title() for ax in panels] == ["input", *cams]
    for ax, cam in zip(panels[1:], cams.values()):
        np.testing.assert_allclose(np.asarray(ax.get_images()[0].get_array()), overlay_rgb(image, cam), atol=1e-6)


# -- (5) gradient x input of a module at a layer without space -----------------------------------------------
def test_module_input_x_gradient_equals_closed_form():
    """score = sum_{u in m} ReLU(W x + b)_u  =>  gradient x input = x * sum_{u in m, active} W_u."""
    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    x = torch.randn(4, 6)
    modules = {"a": [0, 1, 2], "b": [3, 4]}
    attribution = ModuleGradCAM(net, net[1], modules).input_x_gradient(x, ["a", "b", "b", "a"])
    W, active = net[0].weight.detach(), (net[0](x) > 0).float().detach()
    for i, name in enumerate(["a", "b", "b", "a"]):
        units = modules[name]
        expected = x[i] * (active[i, units, None] * W[units]).sum(0)
        torch.testing.assert_close(attribution[i], expected)
    with pytest.raises(ValueError, match="spatial"):
        ModuleGradCAM(net, net[1], modules)(x, "a")  # no Grad-CAM without space


def test_map_figure_and_attribution_bars(tmp_path):
    heat = torch.zeros(8, 8)
    heat[2, 3], heat[5, 5] = 1.0, -0.5
    png = mpimg.imread(save_map_figure(torch.rand(1, 8, 8), heat, tmp_path / "map.png", "module m", signed=True,
                                       panel_inches=2.0, dpi=50))
    assert png.shape[0] == 125 and png.shape[1] == 360  # (3 x 2 + 1.2) x (2 + 0.5) inches at 50 dpi
    # what the panels show (only the size was checked: an ignored `signed` and a blank overlay passed): a signed
    # map drawn as is on a colour scale centred on 0 (RdBu_r), the overlay of its positive part; an unsigned one
    # on the Grad-CAM colour map, overlaid whole
    from modnet.explain.gradcam import map_figure, overlay_rgb

    image = torch.rand(1, 8, 8)
    for signed in (True, False):
        fig = map_figure(image, heat, "m", signed=signed)
        _, drawn, over = [ax.get_images()[0] for ax in fig.axes if ax.get_images()][:3]
        np.testing.assert_allclose(np.asarray(drawn.get_array()), heat.numpy())
        assert drawn.get_cmap().name == ("RdBu_r" if signed else "jet")
        if signed:
            assert drawn.norm.vmin == -1.0 and drawn.norm.vmax == 1.0  # centred: +-max |heat|
        np.testing.assert_allclose(np.asarray(over.get_array()),
                                   overlay_rgb(image, heat.clamp_min(0) if signed else heat), atol=1e-6)
    bars = mpimg.imread(save_attribution_bars(torch.rand(10), torch.randn(10), tmp_path / "bars.png", "m",
                                              width_inches=4.0, dpi=50))
    assert bars.shape[:2] == (220, 200)
    with pytest.raises(ValueError, match="attributions"):
        save_attribution_bars(torch.rand(10), torch.randn(9), tmp_path / "bad.png", "m")


# -- (6) explanations.md ---------------------------------------------------------------------------------------
def test_explanations_md_names_attributes_per_module(tmp_path):
    importance, modules, W, K, names = planted_modules()
    per_module = module_attributes(importance, modules, names, K, top_k=3)
    entries = {"layer0": {m: {"units": modules[m], "attributes": per_module[m], "image": f"layer0_{m}.png"}
                          for m in modules}}
    per_class = {"layer0": {"zebra": explain_in_words(W[1], W, names, top_k=2)}}
    text = write_module_explanations_md(tmp_path / "explanations.md", entries, per_class,
                                        {"layer0": "30 units in 3 modules."}).read_text()
    sections = dict(re.findall(r"### Module `([^`]+)` \(\d+ units\)\n(.*?)(?=\n### |\n## |\Z)", text, re.S))
    assert set(sections) == {"m0", "m1", "m2"}
    for name, attribute in {"m0": "furry", "m1": "striped", "m2": "aquatic"}.items():
        rows = re.findall(r"^\| 1 \| (\S+) \| ([+-][0-9.]+) \|$", sections[name], re.M)
        assert rows and rows[0][0] == attribute
        assert f"layer0_{name}.png" in sections[name]
    assert "Units: 0, 1, 2" in sections["m0"] and "30 units in 3 modules." in text
    assert re.search(r"^\| zebra \| striped \(", text, re.M)
    assert "Attribute scores come from" in text
    # without class knowledge (a cl run on data with no attributes): modules and units, no note on scores
    bare = {"layer0": {m: {"units": modules[m]} for m in modules}}
    text = write_module_explanations_md(tmp_path / "bare.md", bare).read_text()
    assert "### Module `m0`" in text and "Attribute scores" not in text and "Explained by" not in text


# -- (7) `modnet explain` on the networks of `modnet cl` runs ---------------------------------------------------
# tiny runs: 2 experiences of digits, 1 epoch, small widths (the explanation, not the accuracy, is tested)
CL_RUN = ["benchmark=digits", "benchmark.n_experiences=2", "scenario=task", "strategies=[modnet]", "train.epochs=1",
          "progress=false", "threads=1", "model.hidden=32", "model.cnn_channels=[8,16]", "modules.cluster.steps=50",
          "modules.profile_samples=128"]
EXPLAIN = ["explain.max_test_samples=200", "explain.module_grids=false"]


@pytest.fixture(scope="module")
def cl_runs(tmp_path_factory):
    """{"image": run folder of a HATCNN on 1x8x8 digits, "vector": of a HATMLP on 64-d digit vectors}."""
    from modnet.config import compose
    from modnet.jobs.cl import run_cl

    runs = {}
    for kind, image in (("image", "true"), ("vector", "false")):
        out = tmp_path_factory.mktemp(f"cl_{kind}")
        run_cl(compose("cl", [*CL_RUN, f"benchmark.image={image}", f"output_dir={out}"]))
        runs[kind] = out
    return runs


@pytest.fixture(scope="module")
def explained(cl_runs, tmp_path_factory):
    """kind -> (explain output folder, explanations.json) of ``modnet explain run_dir=<the cl run>``."""
    from modnet.config import compose
    from modnet.jobs.explain import run_explain

    done = {}
    for kind, run_dir in cl_runs.items():
        out = tmp_path_factory.mktemp(f"explain_{kind}")
        grids = "true" if kind == "image" else "false"
        run_explain(compose("explain", [*EXPLAIN, f"run_dir={run_dir}", f"output_dir={out}",
                                        f"explain.module_grids={grids}"]))
        done[kind] = (out, json.loads((out / "explanations.json").read_text()))
    return done


def _recorded_network(run_dir):
    return json.loads((run_dir / "results.json").read_text())["strategies"]["modnet"]["network"]


def _with_layer0_module_masked_off(run_dir, copy_to):
    """A copy of a cl run whose task-1 HAT embeddings of its largest layer-0 module are set far negative (mask ~ 0:
    the module passes nothing on); returns (the copy, that module's index in the layer)."""
    import shutil

    shutil.copytree(run_dir, copy_to)
    ckpt = copy_to / "checkpoints" / "modnet_seed0_final.pt"
    obj = torch.load(ckpt, weights_only=True)
    layer0 = _recorded_network(copy_to)["modules_by_task"]["1"][0]
    off = max(range(len(layer0)), key=lambda m: len(layer0[m]))
    obj["model"]["masked.0.task_embedding.weight"][1, layer0[off]] = -50.0
    torch.save(obj, ckpt)
    return copy_to, off


def test_a_module_whose_units_are_all_masked_off_gets_no_attributes(cl_runs, tmp_path):
    """Planted: task 1's HAT embeddings of one layer-0 module set far negative (mask ~ 0: the module passes nothing
    on). Its d score / d tap output is not 0, and explain named attributes for it; now it has none and a note, and
    every other module keeps its attributes."""
    from modnet.config import compose
    from modnet.jobs.explain import run_explain

    run, off = _with_layer0_module_masked_off(cl_runs["vector"], tmp_path / "run")
    run_explain(compose("explain", [*EXPLAIN, f"run_dir={run}", f"output_dir={tmp_path / 'e'}"]))
    result = json.loads((tmp_path / "e" / "explanations.json").read_text())
    names = list(result["modules"]["layer0"])
    entry = result["modules"]["layer0"][names[off]]
    assert result["units_on"]["layer0"][names[off]] == 0
    assert entry["attributes"] == [] and "HAT mask is off" in entry["note"]
    assert "HAT mask is off" in (tmp_path / "e" / "explanations.md").read_text()
    others = [result["modules"]["layer0"][n] for n in names if n != names[off] and result["units_on"]["layer0"][n]]
    assert others and all(len(e["attributes"]) == 3 for e in others)


def test_the_module_grid_names_a_module_masked_off_for_the_task(cl_runs, tmp_path, monkeypatch):
    """Planted as above, on the image run: the off module's panel in its layer's grid (every module on one input) was
    titled by its name alone, its flat map looking like a drawing fault beside the others; it now says masked off,
    and only it does."""
    from pathlib import Path

    import modnet.jobs.explain as explain_job
    from modnet.config import compose

    run, off = _with_layer0_module_masked_off(cl_runs["image"], tmp_path / "run")
    panels, draw = {}, explain_job.save_overlay_grid

    def keep_titles(image, cams, path, **kwargs):
        panels[Path(path).name] = list(cams)
        return draw(image, cams, path, **kwargs)

    monkeypatch.setattr(explain_job, "save_overlay_grid", keep_titles)
    explain_job.run_explain(compose("explain", [*EXPLAIN, f"run_dir={run}", f"output_dir={tmp_path / 'e'}",
                                                "explain.module_grids=true"]))
    result = json.loads((tmp_path / "e" / "explanations.json").read_text())
    names = list(result["modules"]["layer0"])
    assert result["units_on"]["layer0"][names[off]] == 0
    titles = panels["layer0_modules.png"]
    assert len(titles) == len(names) and titles[off].startswith(f"{names[off]} (masked off")
    assert [t for t in titles if "masked off" in t] == [titles[off]]


@pytest.mark.parametrize("kind", ["image", "vector"])
def test_explain_run_dir_explains_exactly_the_gated_modules(kind, cl_runs, explained):
    from scenarios.zsl import DIGIT_ATTRIBUTE_NAMES

    out, result = explained[kind]
    network = _recorded_network(cl_runs[kind])
    assert network["class"] == {"image": "HATCNN", "vector": "HATMLP"}[kind] == result["network"]
    assert result["task"] == 1  # the latest task
    assert list(result["modules"]) == [f"layer{i}" for i in range(len(network["layers"]))]
    for i, layer in enumerate(network["layers"]):
        explained_layer = result["modules"][f"layer{i}"]
        # named by results.json's persistent module ids (they were numbered by their place in the gate)
        assert list(explained_layer) == [f"module{g}" for g in layer["module_ids"]]
        assert [entry["units"] for entry in explained_layer.values()] == layer["modules"]
        assert [entry["units"] for entry in explained_layer.values()] == network["modules_by_task"]["1"][i]
        for module, entry in explained_layer.items():
            assert mpimg.imread(out / entry["image"]).shape[0] > 100  # one PNG per module
            if result["units_on"][f"layer{i}"][module] == 0:  # passes nothing on: no attributes, a note says why
                assert set(entry) == {"units", "attributes", "image", "note"} and entry["attributes"] == []
                assert "HAT mask is off" in entry["note"]
                continue
            if "note" in entry:  # gate off on every input, or no attribute its importance follows: no attributes
                assert entry["attributes"] == []
                assert "gate is off on every test input" in entry["note"] or "no attribute tracks" in entry["note"]
                continue
            assert set(entry) == {"units", "attributes", "image"}
            # only attributes its importance follows (positive scores), at most top_k
            assert 1 <= len(entry["attributes"]) <= 3 and all(s > 0 for _, s in entry["attributes"])
            assert {a for a, _ in entry["attributes"]} <= set(DIGIT_ATTRIBUTE_NAMES)
    expected_kinds = (["grad_cam", "grad_cam", "input_x_gradient"] if kind == "image"
                      else ["input_x_gradient", "input_x_gradient"])
    assert list(result["maps"]["kind"].values()) == expected_kinds
    text = (out / "explanations.md").read_text()
    assert text.count("### Module `") == sum(len(layer["modules"]) for layer in network["layers"])
    # each class explained by the map fitted on the other classes: fitted on itself, every class's prediction was its
    # own knowledge row (agreement ~1 for all)
    agreement = [v for layer in result["per_class_agreement"].values() for v in layer.values()]
    assert agreement and all(-1.0 <= v <= 1.0 for v in agreement) and min(agreement) < 0.99
    assert "held out" in text
    if kind == "image":
        assert (out / "layer0_modules.png").is_file()


def _loaded(run_dir):
    from omegaconf import OmegaConf

    from modnet.nets.record import load_network

    return load_network(run_dir / "checkpoints" / "modnet_seed0_final.pt", OmegaConf.load(run_dir / "config.yaml"))


def hand_input_x_gradient(model, task, layer, units, x):
    """Gradient x input of sum_{u in units} h_layer(x)_u for a HATMLP, by the chain rule on its weights:
    h_l = m_l * ReLU(W_l h_{l-1} + b_l), m_l the task's mask times the module gates for x (held fixed)."""
    with torch.no_grad():
        masks = [m.reshape(-1) for m in model.unit_masks(x[None], task)]
        h, pre = x.reshape(-1), []
        for linear, m in zip(model.masked[:layer + 1], masks):
            z = linear.weight @ h + linear.bias
            pre.append(z)
            h = m * z.clamp_min(0)
        grad = torch.zeros_like(pre[layer])
        grad[units] = 1.0
        for i in range(layer, -1, -1):  # d/dh_{i-1} of the sum, layer by layer
            grad = model.masked[i].weight.T @ (grad * masks[i] * (pre[i] > 0).float())
        return (grad * x.reshape(-1)).reshape(x.shape)


def test_mlp_module_map_is_gradient_x_input_of_its_summed_units(cl_runs, explained):
    out, result = explained["vector"]
    model = _loaded(cl_runs["vector"])
    maps = np.load(out / "module_maps.npz")
    for layer, modules in result["modules"].items():
        for module, entry in modules.items():
            x = torch.as_tensor(maps[f"{layer}/{module}/input"])
            expected = hand_input_x_gradient(model, result["task"], int(layer[5:]), entry["units"], x)
            torch.testing.assert_close(torch.as_tensor(maps[f"{layer}/{module}/map"]), expected, atol=1e-5, rtol=0)


def test_cnn_module_cam_is_its_masked_channels_summed(cl_runs, explained):
    """On the trained HATCNN, a conv module's Grad-CAM at the layer's resolution is ReLU(sum_{c in m} A_c) / (HW)
    (its score: the channels' spatial means summed), with A the layer's output written out here: every conv
    block m_l * maxpool(ReLU(conv_l h)), m_l the task's mask times the input's module gates (a module the gate
    switched off has A_c = 0, so a zero map). The maps' other tests compare modules with each other: a path
    without the masks and gates passed them, not this one."""
    from modnet.explain.network import ModuleMaps, gated_modules

    out, result = explained["image"]
    model, task = _loaded(cl_runs["image"]), result["task"]
    maps = np.load(out / "module_maps.npz")
    x = torch.as_tensor(maps[next(k for k in maps.files if k.startswith("layer0/") and k.endswith("/input"))])[None]
    x = torch.cat([x, x.flip(-1), x.flip(-2)])  # three inputs: the gates may switch other modules on
    with torch.no_grad():
        masks = model.unit_masks(x, task)
        h, outputs = x, []
        for conv, m in zip(model.masked[:-1], masks[:-1]):
            h = m.reshape(*m.shape[:2] if m.dim() == 2 else (1, -1), 1, 1) * F.max_pool2d(F.relu(conv(h)), 2)
            outputs.append(h)
    checked = {"on": 0, "off": 0}  # modules with some output on an input, and without
    for layer, modules in enumerate(gated_modules(model, task)[:len(outputs)]):
        maps = ModuleMaps(model, task, layer, modules)
        A = outputs[layer]
        for name, units in modules.items():
            cam = maps.cam.layer_cam(x, [name] * x.shape[0])
            expected = A[:, units].sum(1).clamp_min(0) / (A.shape[2] * A.shape[3])
            torch.testing.assert_close(cam, expected, atol=1e-6, rtol=1e-4)
            for b in range(x.shape[0]):
                checked["off" if A[b, units].abs().sum() == 0 else "on"] += 1
    assert checked["on"] > 0


@pytest.mark.parametrize("kind", ["image", "vector"])
def test_module_maps_differ_between_modules(kind, cl_runs, explained):
    from modnet.explain.network import ModuleMaps, gated_modules

    model = _loaded(cl_runs[kind])
    task = explained[kind][1]["task"]
    maps = np.load(explained[kind][0] / "module_maps.npz")
    x = torch.as_tensor(maps[next(k for k in maps.files if k.startswith("layer0/") and k.endswith("/input"))])[None]
    gates = model.gate.task_gate(task)
    pairs = 0
    for layer, modules in enumerate(gated_modules(model, task)):
        on = [m for j, m in enumerate(modules) if gates.layer_module_gates(x.flatten(1), layer)[0, j] > 0]
        maps = ModuleMaps(model, task, layer, modules)
        scores = maps.scores(x)[0]
        live = [m for m in on if scores[list(modules).index(m)] > 0]  # switched on, and some unit fires
        drawn = maps(x.expand(len(live), *x.shape[1:]), live)
        for a in range(len(live)):
            for b in range(a + 1, len(live)):
                assert not torch.allclose(drawn[a], drawn[b], atol=1e-6), (layer, live[a], live[b])
                pairs += 1
    assert pairs >= 1


def test_explain_an_earlier_task(cl_runs, tmp_path):
    from modnet.config import compose
    from modnet.jobs.explain import run_explain

    result = run_explain(compose("explain", [*EXPLAIN, f"run_dir={cl_runs['vector']}", f"output_dir={tmp_path}",
                                             "explain.task=0", "explain.layers=[1]"]))
    recorded = _recorded_network(cl_runs["vector"])["modules_by_task"]["0"][1]
    assert result["task"] == 0 and list(result["modules"]) == ["layer1"]
    assert [entry["units"] for entry in result["modules"]["layer1"].values()] == recorded


def test_run_dir_errors_are_one_line(cl_runs, tmp_path, capsys):
    from modnet.cli import main

    assert main(["explain", f"run_dir={tmp_path / 'missing'}", f"output_dir={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not exist" in err
    (tmp_path / "a_file").write_text("not a run")  # it said "does not exist"
    assert main(["explain", f"run_dir={tmp_path / 'a_file'}", f"output_dir={tmp_path / 'out2'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a file, not a folder" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()  # nothing made
    baseline = tmp_path / "baseline_run"
    (baseline / "checkpoints").mkdir(parents=True)
    for name in ("config.yaml", "results.json"):
        (baseline / name).write_text((cl_runs["vector"] / name).read_text())
    assert main(["explain", f"run_dir={baseline}", f"output_dir={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no modnet checkpoint" in err
    assert main(["explain", f"run_dir={cl_runs['vector']}", f"output_dir={tmp_path / 'out'}", "explain.task=5"]) == 2
    assert "tasks with module gates are [0, 1]" in capsys.readouterr().err
    # modnet ddp's run (results.json with its world_size) keeps no checkpoint: "run the modnet strategy to the end"
    # could not help there
    ddp = tmp_path / "ddp_run"
    ddp.mkdir()
    (ddp / "config.yaml").write_text((cl_runs["vector"] / "config.yaml").read_text())
    results = json.loads((cl_runs["vector"] / "results.json").read_text())
    (ddp / "results.json").write_text(json.dumps({**results, "world_size": 2, "backend": "gloo"}))
    assert main(["explain", f"run_dir={ddp}", f"output_dir={tmp_path / 'out_ddp'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "`modnet ddp` run" in err and "checkpoint" in err
    assert not (tmp_path / "out_ddp").exists()


def test_explanations_are_the_same_for_any_thread_count(tmp_path):
    """A network trained here and its explanations do not depend on the caller's CPU thread count. Without the
    job's one-thread rule they do at these widths (the 256-unit layer's BLAS sums in a thread-dependent order;
    measured: explanations.json differed between 1 and 2 threads after one epoch)."""
    from modnet.config import compose
    from modnet.jobs.explain import run_explain

    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            result = run_explain(compose("explain", [*EXPLAIN, "train.epochs=1", f"output_dir={tmp_path / str(threads)}",
                                                     "train.cl_overrides=['model.cnn_channels=[8,16]']"]))
            assert torch.get_num_threads() == threads  # the caller's count is restored
            results.append({k: v for k, v in result.items() if k not in ("seconds", "source")})
    finally:
        torch.set_num_threads(before)
    assert results[0] == results[1]
    assert (tmp_path / "1" / "module_maps.npz").read_bytes() == (tmp_path / "2" / "module_maps.npz").read_bytes()


def test_explain_a_zero_shot_run_folder(tmp_path):
    """A ``modnet gzsl`` folder: a top-level ``network`` in results.json, a GZSL ``benchmark`` block, heads over
    dataset class ids. Made here from a class-incremental cl run (its heads hold dataset class ids)."""
    import shutil

    import yaml

    from modnet.config import compose
    from modnet.jobs.cl import run_cl
    from modnet.jobs.explain import run_explain

    cl_dir, gzsl_dir = tmp_path / "cl", tmp_path / "gzsl"
    run_cl(compose("cl", [*CL_RUN, "scenario=class", f"output_dir={cl_dir}"]))
    shutil.copytree(cl_dir / "checkpoints", gzsl_dir / "checkpoints")
    run_cfg = yaml.safe_load((cl_dir / "config.yaml").read_text())
    run_cfg["benchmark"] = {"name": "digits", "path": None, "unseen_classes": [2, 7], "test_fraction": 0.3,
                            "images": False}
    (gzsl_dir / "config.yaml").write_text(yaml.safe_dump(run_cfg))
    network = _recorded_network(cl_dir)
    (gzsl_dir / "results.json").write_text(json.dumps({"seed": 0, "network": network}))
    result = run_explain(compose("explain", [*EXPLAIN, f"run_dir={gzsl_dir}", f"output_dir={tmp_path / 'out'}"]))
    for i, layer in enumerate(network["layers"]):
        assert [entry["units"] for entry in result["modules"][f"layer{i}"].values()] == layer["modules"]
    task_classes = json.loads((cl_dir / "results.json").read_text())["classes_per_experience"][result["task"]]
    assert set(result["per_class"]["layer0"]) == {str(c) for c in task_classes}  # named by dataset class id


# -- (8) without run_dir: a modular network trained here ------------------------------------------------------
def test_explain_trains_a_modular_network_here(tmp_path):
    from modnet.config import compose
    from modnet.jobs.explain import run_explain

    cfg = compose("explain", [*EXPLAIN, f"output_dir={tmp_path}", "train.epochs=1",
                              "train.cl_overrides=['model.hidden=32','model.cnn_channels=[8,16]']"])
    result = run_explain(cfg)
    assert result["network"] == "HATCNN" and result["source"]["trained_here"]["classes"] == [0, 1, 3, 4, 5, 6, 8, 9]
    for layer, units in zip(result["modules"].values(), (8, 16, 32)):
        members = [u for entry in layer.values() for u in entry["units"]]
        assert sorted(members) == list(range(units))  # the gate's modules partition the layer's units
        assert all((tmp_path / entry["image"]).is_file() for entry in layer.values())
    # digits' seen classes (2 and 7 held out) have segment_top and segment_bottom on exactly the same digits: the
    # explanations say so instead of naming one of them
    assert ["segment_top", "segment_bottom"] in result["tied_attributes"]
    assert any("segment_top, segment_bottom" in note for note in result["notes"])
    named = {a for layer in result["modules"].values() for entry in layer.values() for a, _ in entry["attributes"]}
    named |= {a for layer in result["per_class"].values() for ranked in layer.values() for a, _ in ranked}
    assert not named & {"segment_top", "segment_bottom"}


def test_explain_job_rejects_bad_config(tmp_path):
    from modnet.config import ConfigError, compose
    from modnet.jobs.explain import run_explain

    with pytest.raises(ConfigError, match="explain.backend"):
        run_explain(compose("explain", [f"output_dir={tmp_path}", "explain.backend=shap"]))
    with pytest.raises(ConfigError, match="train.scenario"):
        run_explain(compose("explain", [f"output_dir={tmp_path}", "train.scenario=domain"]))
    with pytest.raises(ConfigError, match="choose one of benchmark=digits, npz"):
        compose("explain", [f"output_dir={tmp_path}", "benchmark=awa2"])  # features: no images for Grad-CAM


def test_every_explain_setting_is_commented():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "configs" / "explain.yaml").read_text()
    settings = [line for line in text.splitlines() if re.match(r"^\s*\w+:\s*\S", line)]
    assert settings and all("#" in line for line in settings)


def test_explain_finds_a_relative_npz_path_of_a_run_from_another_folder(tmp_path, monkeypatch):
    """A cl run on benchmark.path=d.npz (relative) recorded the relative path, and `modnet explain run_dir=` from
    any other folder stopped with "npz file not found: d.npz". The run's config.yaml records the absolute path."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from modnet.cli import main

    rng = np.random.default_rng(0)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    y = np.arange(120) % 4
    np.savez(tmp_path / "a" / "d.npz", x_train=(rng.normal(size=(120, 16)) + y[:, None]).astype(np.float32),
             y_train=y, x_test=(rng.normal(size=(40, 16)) + y[:40, None]).astype(np.float32), y_test=y[:40])
    monkeypatch.chdir(tmp_path / "a")
    assert main(["cl", "benchmark=npz", "benchmark.path=d.npz", "benchmark.n_experiences=2", "strategies=[modnet]",
                 "train.epochs=1", "progress=false", "model.hidden=32", f"output_dir={tmp_path / 'run'}"]) == 0
    saved = OmegaConf.load(tmp_path / "run" / "config.yaml").benchmark.path
    assert Path(saved) == tmp_path / "a" / "d.npz"
    monkeypatch.chdir(tmp_path / "b")
    assert main(["explain", f"run_dir={tmp_path / 'run'}", *EXPLAIN, f"output_dir={tmp_path / 'e'}"]) == 0
    assert (tmp_path / "e" / "explanations.json").exists()


def test_gated_modules_are_named_by_their_persistent_ids(cl_runs):
    """Planted: task 1's layer-0 modules renumbered 2 x id + 1 (a gate holding some modules and not others, as the
    default run's task 4 with ids [0, 2, 3, 4, 5]): the names follow the ids, the units stay each module's (they
    were named by the gate's own order: "module1" was another module in results.json)."""
    from modnet.explain.network import gated_modules

    model = _loaded(cl_runs["vector"])
    gate = model.gate.task_gate(1)
    before = gated_modules(model, 1)[0]
    ids = gate.module_ids(0).tolist()
    gate.module_ids_0 = gate.module_ids(0) * 2 + 1
    after = gated_modules(model, 1)[0]
    assert list(after) == [f"module{2 * g + 1}" for g in ids]
    assert list(after.values()) == list(before.values())


@pytest.mark.parametrize("kind", ["image", "vector"])
def test_class_maps_are_drawn_for_every_class_and_change_when_the_weights_are_randomised(kind, cl_runs, explained):
    """Every class of the explained task gets its logit's map at every layer (the README's "Grad-CAM of classes");
    and, Adebayo et al. 2018's model-randomisation check, a class's map on the same input is not the same once
    the network's weights are replaced by random ones (a map that survived it would show the input, not the
    network's evidence)."""
    from modnet.explain.network import ClassMaps

    out, result = explained[kind]
    task = result["task"]
    model = _loaded(cl_runs[kind])
    n_classes = len(model.task_classes[task])
    for layer, pngs in result["class_maps"].items():
        assert len(pngs) == n_classes
        assert all(mpimg.imread(out / png).shape[0] > 100 for png in pngs.values())
    arrays = np.load(out / "module_maps.npz")
    layer_name, cname = "layer0", next(iter(result["class_maps"]["layer0"]))
    x = torch.as_tensor(arrays[f"{layer_name}/class_{cname}/input"])[None]
    names = [str(c) for c in range(n_classes)]
    column = list(result["class_maps"]["layer0"]).index(cname)
    trained = ClassMaps(model, task, 0, names)(x, [column])[0].flatten()
    np.testing.assert_allclose(trained.numpy(), arrays[f"{layer_name}/class_{cname}/map"].ravel(), atol=1e-5)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn_like(p) * p.std())
    randomised = ClassMaps(model, task, 0, names)(x, [column])[0].flatten()
    similarity = torch.nn.functional.cosine_similarity(trained - trained.mean(), randomised - randomised.mean(), 0)
    assert similarity < 0.9, float(similarity)
