"""HAT against hand-computed cases (Serra et al. 2018; MISSION.md 1.1)."""
import math
from types import SimpleNamespace

import pytest
import torch

from modnet.nets.hat import annealed_s, capacity_regulariser, compensate_embedding_grad, weight_protection
from modnet.nets.models import HATCNN, HATMLP
from strategies.plugins.hat import HATPlugin
from strategies.update import update_step


def test_annealing_goes_from_inverse_smax_to_smax_linearly():
    smax, B = 400.0, 5
    assert annealed_s(0, B, smax) == pytest.approx(1 / 400)
    assert annealed_s(4, B, smax) == pytest.approx(400)
    assert annealed_s(2, B, smax) == pytest.approx(1 / 400 + (400 - 1 / 400) / 2)
    assert annealed_s(0, 1, smax) == smax  # a one-batch epoch trains at smax


def test_weight_protection_hand_case():
    out_prev = torch.tensor([1.0, 0.5, 0.0])
    in_prev = torch.tensor([1.0, 0.0])
    mult = weight_protection(out_prev, in_prev, torch.Size([3, 2]))
    # 1 - min(a_i, a_j)
    expected = torch.tensor([[0.0, 1.0], [0.5, 1.0], [1.0, 1.0]])
    assert torch.equal(mult, expected)
    first = weight_protection(out_prev, None, torch.Size([3, 4]))
    assert torch.equal(first, (1 - out_prev).view(3, 1).expand(3, 4))
    conv = weight_protection(out_prev, in_prev, torch.Size([3, 2, 3, 3]))
    assert torch.equal(conv[:, :, 1, 2], expected)


def test_compensation_formula():
    emb = torch.nn.Embedding(1, 3)
    e = torch.tensor([[0.5, -2.0, 0.1]])
    emb.weight.data.copy_(e)
    emb.weight.grad = torch.ones_like(e)
    s, smax = 2.0, 400.0
    compensate_embedding_grad(emb, s, smax, thres_cosh=50)
    for k, ek in enumerate(e[0].tolist()):
        want = smax / s * (math.cosh(s * ek) + 1) / (math.cosh(ek) + 1)
        assert emb.weight.grad[0, k].item() == pytest.approx(want, rel=1e-5)
    # the clamp: s*e beyond +-50 uses cosh(50)
    emb.weight.data.fill_(1.0)
    emb.weight.grad = torch.ones_like(e)
    compensate_embedding_grad(emb, 100.0, smax, thres_cosh=50)
    assert emb.weight.grad[0, 0].item() == pytest.approx(smax / 100 * (math.cosh(50) + 1) / (math.cosh(1) + 1),
                                                         rel=1e-5)


@pytest.mark.parametrize("given", ["rows", "tables"])
@pytest.mark.parametrize("s", [1 / 400, 2.0, 37.0, 400.0])
def test_compensated_masks_equal_autograd_then_compensation(s, given):
    """The fused masks (one autograd node, compensation in its backward, capacity regulariser beside) =
    sigmoid and regulariser through autograd followed by the compensation pass (the reference code's order),
    for every layer and only on the task's row; given the task's rows, or the whole tables and the task."""
    from modnet.nets.hat import CompensatedMasks, free_capacity

    torch.manual_seed(0)
    embs = [torch.nn.Embedding(3, 7), torch.nn.Embedding(3, 4)]
    for emb in embs:
        emb.weight.data.mul_(2.0)
    prev = [torch.rand(7).round(), torch.rand(4)]
    g = [torch.randn(7), torch.randn(4)]
    args = (None, *[e.weight[1] for e in embs]) if given == "rows" else (1, *[e.weight for e in embs])
    *masks, reg = CompensatedMasks.apply(s, 400.0, 50.0, free_capacity(prev), *args)
    (sum((m * gi).sum() for m, gi in zip(masks, g)) + 0.75 * reg).backward()
    fused = [e.weight.grad.clone() for e in embs]
    for e in embs:
        e.weight.grad = None
    ref_masks = [torch.sigmoid(s * e.weight[1]) for e in embs]
    ref_reg = capacity_regulariser(ref_masks, prev)
    (sum((m * gi).sum() for m, gi in zip(ref_masks, g)) + 0.75 * ref_reg).backward()
    for e in embs:
        compensate_embedding_grad(e, s, 400.0, thres_cosh=50)
    assert float(reg) == pytest.approx(float(ref_reg), rel=1e-6)
    for got, e in zip(fused, embs):
        assert torch.allclose(got, e.weight.grad, rtol=1e-5, atol=1e-30)
        assert torch.all(got[[0, 2]] == 0)
    assert all(torch.equal(m, r) for m, r in zip(masks, ref_masks))


@pytest.mark.parametrize("read_norm", [None, False])  # the CPU's read norm, the device's scale without a read
@pytest.mark.parametrize("max_norm", [0.5, 1e4])
def test_clip_grad_norm_matches_torch(max_norm, read_norm):
    from modnet.nets.hat import clip_grad_norm

    torch.manual_seed(0)
    # small tensors (read in one concatenated dot) and a large one (its own dot)
    ps = [torch.nn.Parameter(torch.randn(*shape)) for shape in [(5, 3), (300, 300), (4,)]]
    grads = [torch.randn_like(p) * 3 for p in ps]
    for p, g in zip(ps, grads):
        p.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(ps, max_norm)
    ours = [g.clone() for g in grads]
    clip_grad_norm(ours, max_norm, read_norm)
    assert all(torch.allclose(o, p.grad, rtol=1e-6) for o, p in zip(ours, ps))
    norm = float(torch.linalg.vector_norm(torch.cat([o.reshape(-1) for o in ours])))
    assert norm == pytest.approx(0.5, rel=1e-5) if max_norm == 0.5 else norm < 1e4


def test_capacity_regulariser_hand_case():
    masks = [torch.tensor([0.5, 1.0]), torch.tensor([0.25, 0.25, 1.0])]
    prev = [torch.tensor([0.0, 1.0]), torch.tensor([0.0, 0.5, 1.0])]
    # num = 0.5*1 + 1*0 + 0.25*1 + 0.25*0.5 + 1*0 = 0.875 ; den = 1 + 0 + 1 + 0.5 + 0 = 2.5
    assert capacity_regulariser(masks, prev).item() == pytest.approx(0.875 / 2.5)


def _fake_strategy(model, task, s):
    from modnet.nets.models import Condition

    return SimpleNamespace(model=model, experience=SimpleNamespace(current_experience=task), is_training=True,
                           train_condition=Condition(s=s))


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_gradient_is_zero_exactly_where_both_units_are_fully_protected(arch):
    torch.manual_seed(0)
    if arch == "mlp":
        model = HATMLP(6, [[0, 1], [2, 3]], hidden=5, n_layers=2)
        x = torch.randn(8, 6)
    else:
        model = HATCNN((1, 4, 4), [[0, 1], [2, 3]], channels=(3,), hidden=5)
        x = torch.randn(8, 1, 4, 4)
    # Hand-set cumulative masks: some units fully used by task 0, some partly, some free; each layer its own
    # pattern, so that a layer's input mask (the layer below's, written out here) is not its own
    patterns = [torch.tensor(p) for p in ([1.0, 1.0, 0.0, 0.5, 0.0], [0.0, 0.5, 1.0, 1.0, 1.0],
                                          [1.0, 0.0, 0.5, 1.0, 1.0])]
    for i, buf in enumerate(model.cumulative_masks()):
        buf.copy_(patterns[i][: buf.numel()])
    if arch == "mlp":
        hand_ins = [None, patterns[0], patterns[1]]
    else:  # the fc layer reads the conv's 3 channels flattened over its 2 x 2 pooled map, channel-major
        hand_ins = [None, patterns[0][:3].repeat_interleave(4)]
    plugin = HATPlugin(smax=400)
    strat = _fake_strategy(model, 1, 10.0)
    plugin.before_training_exp(strat)
    out = model.forward_single_task(x, 1, strat.train_condition)
    out.sum().backward()
    raw = {id(l.weight): l.weight.grad.clone() for l in model.masked}
    # the plugin's terms as the template applies them around the step (lr 0: the gradients are what is read)
    update_step(torch.optim.SGD(model.parameters(), lr=0.0), plugin.update_terms(strat))
    for layer, in_m in zip(model.masked, hand_ins):
        g, g0 = layer.weight.grad, raw[id(layer.weight)]
        out_m = [b for b in model.cumulative_masks()][list(model.masked).index(layer)]
        g2 = g.reshape(g.shape[0], g.shape[1], -1)
        g02 = g0.reshape(g0.shape[0], g0.shape[1], -1)
        for i in range(g.shape[0]):
            for j in range(g.shape[1]):
                a_in = 0.0 if in_m is None else float(in_m[j])
                full = float(out_m[i]) == 1.0 and (in_m is None or a_in == 1.0)
                if full:
                    assert torch.all(g2[i, j] == 0), (i, j)
                else:
                    factor = 1 - (float(out_m[i]) if in_m is None else min(float(out_m[i]), a_in))
                    assert torch.allclose(g2[i, j], g02[i, j] * factor, atol=1e-7)
                    if factor == 1.0 and g02[i, j].abs().sum() > 0:
                        assert g2[i, j].abs().sum() > 0


def test_cumulative_mask_is_elementwise_max():
    model = HATMLP(4, [[0, 1], [2, 3]], hidden=3, n_layers=1, smax=400)
    with torch.no_grad():  # overlapping and soft masks, where a max and a sum (or a last-wins copy) differ
        model.masked[0].task_embedding.weight.copy_(torch.tensor([[-1.0, -1.0, 1.0], [0.001, 1.0, 1.0]]))
    model.consolidate(0)
    assert torch.allclose(model.cumulative_masks()[0], torch.tensor([0.0, 0.0, 1.0]), atol=1e-6)
    model.consolidate(1)
    soft = 1 / (1 + math.exp(-0.4))  # sigmoid(400 x 0.001) = 0.599
    assert torch.allclose(model.cumulative_masks()[0], torch.tensor([soft, 1.0, 1.0]), atol=1e-6)
    model.consolidate(0)  # task 0 again: the max keeps task 1's units
    assert torch.allclose(model.cumulative_masks()[0], torch.tensor([soft, 1.0, 1.0]), atol=1e-6)
    assert int(model.n_trained) == 2 and model.trained == 2
    # the host's count follows a loaded state dict (a resumed run): evaluation reads it, not the buffer
    fresh = HATMLP(4, [[0, 1], [2, 3]], hidden=3, n_layers=1, smax=400)
    assert fresh.trained == 0
    fresh.load_state_dict(model.state_dict())
    assert fresh.trained == 2


def test_clip_grad_norm_spreads_a_nan_norm_like_torch():
    from modnet.nets.hat import clip_grad_norm

    g = [torch.tensor([1.0, float("nan")]), torch.tensor([2.0])]
    clip_grad_norm(g, 1e4)
    p = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))]
    p[0].grad, p[1].grad = torch.tensor([1.0, float("nan")]), torch.tensor([2.0])
    torch.nn.utils.clip_grad_norm_(p, 1e4)
    assert all(torch.equal(a.isnan(), b.grad.isnan()) for a, b in zip(g, p))


def test_masks_act_after_relu_and_pooling_as_in_the_reference_code():
    """HAT's reference applies a unit's mask after its ReLU (and after max-pooling on convs). For task masks
    in (0, 1] that equals masking first (a factor > 0 commutes with ReLU and max); with 0/1 module gates it
    does not: an off gate (0) must get the gradient of switching it on, the unit's ReLU output."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    mlp = HATMLP(6, [[0, 1]], hidden=5, n_layers=2)
    x = torch.randn(7, 6)
    masks = [torch.rand(5) + 0.01, torch.rand(5) + 0.01]
    acts = mlp.unit_activations(x, masks)
    h1 = F.relu(mlp.masked[0](x) * masks[0])  # mask first, then ReLU
    assert torch.allclose(acts[0], h1, atol=1e-6)
    assert torch.allclose(acts[1], F.relu(mlp.masked[1](h1) * masks[1]), atol=1e-6)
    gates = torch.tensor([[1.0, 0.0, 1.0, 0.0, 0.0]]).repeat(7, 1).requires_grad_()  # per input, 0/1
    mlp.unit_activations(x, [gates, torch.ones(5)])[0].sum().backward()
    assert torch.allclose(gates.grad, F.relu(mlp.masked[0](x)).detach())  # off units included

    cnn = HATCNN((1, 8, 8), [[0, 1]], channels=(3,), hidden=4)
    xi = torch.randn(5, 1, 8, 8)
    m = torch.rand(3) + 0.01
    got = cnn.unit_activations(xi, [m, torch.ones(4)])[0]
    want = F.max_pool2d(F.relu(cnn.masked[0](xi) * m.view(1, -1, 1, 1)), 2).mean(dim=(2, 3))
    assert torch.allclose(got, want, atol=1e-6)


def test_a_channels_last_cnn_masks_its_last_map_in_the_standard_layout_with_the_same_numbers():
    """On channels_last maps the fc layer's flatten copied the last conv block's masked map to the standard
    layout, and the mask's backward then multiplied a standard-layout gradient by a channels_last map (~4x the
    time of one layout). The map is now in the standard layout when the mask multiplies it (its tap sees it so),
    the first block's stays channels_last (the next conv reads it), and outputs and gradients are those of
    standard-layout inputs."""
    torch.manual_seed(0)
    cnn = HATCNN((3, 16, 16), [[0, 1]], channels=(4, 6), hidden=5)
    x = torch.randn(3, 3, 16, 16)
    masks = [torch.rand(4, requires_grad=True), torch.rand(6, requires_grad=True), torch.rand(5)]
    seen = {}
    hooks = [tap.register_forward_hook(lambda mod, a, out, i=i: seen.__setitem__(i, out))
             for i, tap in enumerate(cnn.unit_taps[:2])]
    grads = []
    cl = torch.channels_last
    for net, xin in ((cnn, x), (cnn.to(memory_format=cl), x.contiguous(memory_format=cl))):
        for m in masks[:2]:
            m.grad = None
        net.zero_grad()
        _, feature = net.forward_units(xin, masks, record=False)
        feature.square().sum().backward()
        grads.append((feature.detach(), masks[0].grad.clone(), masks[1].grad.clone(),
                      net.masked[0].weight.grad.clone()))
    for hook in hooks:
        hook.remove()
    assert seen[0].is_contiguous(memory_format=torch.channels_last) and not seen[0].is_contiguous()
    assert seen[1].is_contiguous()  # the last block's: flatten is a view of it
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-5)


def test_max_pool2_without_a_gradient_is_max_pool2d_and_with_one_keeps_its_gradient():
    """The HAT CNN's pooling: the strided-slice maximum it takes where no gradient flows must give max_pool2d's
    values exactly (odd sizes floored as max_pool2d does), and the gradient path is max_pool2d itself."""
    import torch.nn.functional as F

    from modnet.nets.models import max_pool2

    g = torch.Generator().manual_seed(0)
    for shape in [(3, 4, 8, 8), (2, 5, 7, 9), (1, 1, 2, 2)]:
        x = torch.relu(torch.randn(*shape, generator=g))
        with torch.no_grad():
            assert torch.equal(max_pool2(x), F.max_pool2d(x, 2))
        assert torch.equal(max_pool2(x), F.max_pool2d(x, 2))  # x needs no gradient: the same path
        leaf = torch.randn(*shape, generator=g).requires_grad_()
        weight = torch.randn(F.max_pool2d(leaf, 2).shape, generator=g)
        (grad,) = torch.autograd.grad((max_pool2(leaf) * weight).sum(), leaf)
        (expected,) = torch.autograd.grad((F.max_pool2d(leaf, 2) * weight).sum(), leaf)
        assert torch.equal(grad, expected)



_SUBNORMALS_SCRIPT = """
import torch
{prelude}
torch.set_num_threads(2)
(torch.randn(512, 512) @ torch.randn(512, 512)).sum()  # the first parallel op: torch's OpenMP workers start
{flush}
# the largest subnormal float32 from its bits (a float literal would itself be flushed to 0 under FTZ)
x = torch.full((1024, 1024), 0x007FFFFF, dtype=torch.int32).view(torch.float32)
y = x @ torch.ones(1024, 1024)  # two threads, each a block of rows: 1024 subnormals each, a normal sum
print(int((y != 0).sum()))
"""


def _nonzero_products(prelude: str, flush: str) -> int:
    import os
    import subprocess
    import sys

    script = _SUBNORMALS_SCRIPT.format(prelude=prelude, flush=flush)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "2", "MKL_DYNAMIC": "FALSE"})  # both threads work
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not torch.set_flush_denormal(True), reason="this CPU has no flush-to-zero mode (not x86)")
def test_importing_the_hat_module_flushes_subnormals_on_every_thread_torch_starts():
    """HAT's masks make subnormal floats, which x86 computes on ~100x slower, and torch's OpenMP workers keep
    the float mode they were started with. With modnet.nets.hat imported before the first parallel op, every
    thread reads a subnormal input as zero: all 2^20 entries of a two-thread product are 0. Controls: without
    the flush every entry is non-zero, and with the flush set after the workers started (what the HAT plugin
    alone did) the workers' rows still are."""
    n = 1024 * 1024
    assert _nonzero_products("", "") == n
    assert 0 < _nonzero_products("", "torch.set_flush_denormal(True)") < n
    assert _nonzero_products("import modnet.nets.hat", "") == 0


def test_local_labels_give_each_global_label_its_position_in_the_tasks_head_and_follow_the_heads_classes():
    """Task 1 of [[7, 3, 9], [2, 5]]: labels 9, 7, 3 sit at 2, 0, 1 of its head; a class of another task reads -1.
    Adding classes to a head (a new class_index buffer) or rewriting its buffer in place (a loaded state) is seen at
    once; a label past every class reads -1."""
    model = HATMLP(4, [[7, 3, 9], [2, 5]], hidden=3, n_layers=1)
    assert model.local_labels(0, torch.tensor([9, 7, 3, 2])).tolist() == [2, 0, 1, -1]
    assert model.local_labels(1, torch.tensor([5, 2, 2])).tolist() == [1, 0, 0]
    assert model.local_labels(0, torch.tensor([3, 99])).tolist() == [1, -1]
    model.add_classes(1, [11], torch.zeros(1, 3))
    assert model.local_labels(1, torch.tensor([11, 5, 2])).tolist() == [2, 1, 0]
    assert model.local_labels(0, torch.tensor([11])).tolist() == [-1]
    model.class_index_0.copy_(torch.tensor([9, 3, 7]))  # same storage, new order (load_state_dict copies in place)
    assert model.local_labels(0, torch.tensor([9, 7, 3])).tolist() == [0, 2, 1]


def test_a_task_that_ends_with_a_layer_shut_is_named_on_stderr(capsys):
    """A task whose HAT mask is off in every unit of a layer passes nothing (chance accuracy) and nothing said so
    while training. Planted: task 0 keeps one unit of each layer on (no line); task 1's second layer is shut, its
    first keeps a unit (one line, naming layer 1 and its width)."""
    from strategies.plugins.hat import masked_off_layers, warn_masks_off

    model = HATMLP(4, [[0, 1], [2, 3]], hidden=3, n_layers=2, smax=400)
    with torch.no_grad():
        for layer in model.masked:
            layer.task_embedding.weight.fill_(-6.0)
            layer.task_embedding.weight[0, 2] = 6.0
        model.masked[0].task_embedding.weight[1, 0] = 0.01  # sigmoid(400 x 0.01) = 0.98: on
    assert masked_off_layers(model, 0) == []
    warn_masks_off(model, 0)
    assert capsys.readouterr().err == ""
    assert masked_off_layers(model, 1) == [(1, 3)]
    warn_masks_off(model, 1)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "task 2" in err and "layer(s) 1 (3 units)" in err and "hat.c" in err
