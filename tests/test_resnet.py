"""HAT ResNet-18 (CIFAR layout, per-task batch norm): topology of the masks across residual sums, protection."""
import json

import torch

from modnet.cli import main
from modnet.nets.models import HATResNet18, ResNet18Backbone


def test_resnet18_has_the_paper_layout_and_matches_its_plain_twin():
    net = HATResNet18((3, 32, 32), [[0, 1], [2, 3]], width=4)
    plain = ResNet18Backbone((3, 32, 32), width=4)
    convs = [m for m in plain.modules() if isinstance(m, torch.nn.Conv2d)]
    # stem + 8 blocks x 2 convs + 3 projection shortcuts (stages 2-4) = 20 convolutions in both
    assert len(net.masked) == len(convs) == 20
    assert [tuple(c.weight.shape) for c in net.masked] == [tuple(c.weight.shape) for c in convs]
    x = torch.rand(2, 3, 32, 32)
    assert plain(x).shape == (2, 32)
    assert net.task_logits(x, 1).shape == (2, 2)
    # the same function: the plain twin's conv and batch-norm weights (running statistics and affine drawn at
    # random) copied into task 0's path, its HAT masks fully on (embeddings 1: sigmoid(400) = 1 in float32);
    # a ReLU moved outside a residual sum, or a shortcut left out, on either side breaks this
    g = torch.Generator().manual_seed(0)
    bns = [m for m in plain.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 20
    with torch.no_grad():
        for conv, bn, hat_conv, hat_bns in zip(convs, bns, net.masked, net.bn):
            for t in (bn.running_mean, bn.bias):
                t.copy_(0.2 * torch.randn(t.shape, generator=g))
            for t in (bn.running_var, bn.weight):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            hat_conv.weight.copy_(conv.weight)
            hat_bns[0].load_state_dict(bn.state_dict())
            hat_conv.task_embedding.weight.fill_(1.0)
    plain.eval(), net.eval()
    masks = net.masks(0)
    assert all(torch.equal(m, torch.ones_like(m)) for m in masks)
    with torch.no_grad():
        torch.testing.assert_close(net.features(x, masks, 0), plain(x), rtol=1e-5, atol=1e-6)


def test_masked_maps_keep_the_autocast_dtype_and_unread_means_are_not_computed():
    """Under bf16 autocast every masked map stays bf16 (a float32 mask would promote it, and each layer after
    it, to float32), the features agree with the float32 forward to bf16 rounding (eval mode), and the mask's
    gradient is float32 as its embedding. Without ``record`` the per-conv spatial means are not computed (a pass each);
    with it, there is one per masked conv."""
    torch.manual_seed(0)
    net = HATResNet18((3, 8, 8), [[0, 1], [2, 3]], width=4).train()
    x = torch.rand(4, 3, 8, 8)
    dtypes, maps = [], {}

    def seen(module, inputs, out):
        dtypes.append(out.dtype)
        maps[module] = out

    hooks = [tap.register_forward_hook(seen) for tap in net.unit_taps]
    masks = [m.detach().requires_grad_() for m in net.masks(0, 50.0)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        acts, feature = net.forward_units(x, masks, 0, record=False)
    assert acts == [] and dtypes == [torch.bfloat16] * 20 and feature.dtype == torch.bfloat16
    feature.float().sum().backward()
    assert all(m.grad is not None and m.grad.dtype == torch.float32 for m in masks)
    dtypes.clear(), maps.clear()
    acts, _ = net.forward_units(x, [m.detach() for m in masks], 0, record=True)
    assert dtypes == [torch.float32] * 20 and len(acts) == 20
    assert [tuple(a.shape) for a in acts] == [(4, maps[tap].shape[1]) for tap in net.unit_taps]
    net.eval()  # batch norm over 4 inputs at 1 x 1 (the last stage of 8 x 8 inputs) amplifies any rounding
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = net.forward_units(x, masks, 0, record=False)[1]
    with torch.no_grad():
        reference = net.forward_units(x, masks, 0, record=False)[1]
    assert low.dtype == torch.bfloat16 and torch.allclose(low.float(), reference, rtol=0.03, atol=0.03)
    for h in hooks:
        h.remove()


def test_input_masks_follow_the_residual_sums():
    """The units feeding a conv after a residual sum are on where either summand is on: hand-written for the
    first stage (identity shortcuts) and the first block of stage 2 (1x1 projection shortcut)."""
    net = HATResNet18((3, 8, 8), [[0, 1], [2, 3]], width=2)
    g = torch.Generator().manual_seed(0)
    cum = net.cumulative_masks()
    for buf in cum:
        buf.copy_(torch.randint(0, 2, buf.shape, generator=g).float())
    feeding = net.input_masks()
    # layers: 0 stem | 1, 2 block 1 | 3, 4 block 2 | 5, 6 block 3 (stage 2) with shortcut 7 | ...
    assert feeding[0] is None
    assert torch.equal(feeding[1], cum[0])
    assert torch.equal(feeding[2], cum[1])
    out1 = torch.maximum(cum[2], cum[0])  # block 1: conv 2 + identity
    assert torch.equal(feeding[3], out1)
    assert torch.equal(feeding[4], cum[3])
    out2 = torch.maximum(cum[4], out1)  # block 2: conv 4 + identity
    assert torch.equal(feeding[5], out2) and torch.equal(feeding[7], out2)  # conv 5 and the shortcut
    assert torch.equal(feeding[6], cum[5])
    assert torch.equal(feeding[8], torch.maximum(cum[6], cum[7]))  # block 3: conv 6 + projection 7


def test_per_task_batch_norm_is_only_touched_by_its_task():
    net = HATResNet18((3, 8, 8), [[0, 1], [2, 3]], width=2).train()
    before = {k: v.clone() for k, v in net.state_dict().items() if k.startswith("bn.") and k.split(".")[2] == "1"}
    assert before and all("running_mean" not in k or v.abs().sum() == 0 for k, v in before.items())
    net.task_logits(torch.rand(4, 3, 8, 8), 0)  # task 0's forward in training mode updates task 0's stats
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # task 1's batch norms: untouched
    assert not torch.equal(after["bn.0.0.running_mean"], torch.zeros_like(after["bn.0.0.running_mean"]))
    # and the other way round: task 1's forward moves every layer's task-1 statistics, not task 0's
    task0 = {k: v.clone() for k, v in after.items() if k.startswith("bn.") and k.split(".")[2] == "0"}
    net.task_logits(torch.rand(4, 3, 8, 8), 1)
    again = net.state_dict()
    assert all(torch.equal(task0[k], again[k]) for k in task0)
    moved = [k for k in before if k.endswith("running_mean") and not torch.equal(before[k], again[k])]
    assert len(moved) == len(net.masked)


def test_hat_resnet18_forgets_nothing_in_task_incremental(tmp_path):
    assert main(["cl", "strategies=[modnet]", "model.arch=resnet18", "model.resnet_width=8", "model.gate=none",
                 "model.modules=none", "benchmark.image=true", "benchmark.n_experiences=2", "train.epochs=5",
                 f"output_dir={tmp_path}", "progress=false"]) == 0
    s = json.loads((tmp_path / "results.json").read_text())["strategies"]["modnet"]
    assert s["forgetting"] <= 0.01
    assert s["average_accuracy"] > 0.8  # measured 0.94 (chance 0.2)


def test_bench_runs_the_resnet18_comparison(tmp_path):
    """The GPU check of the bench (modnet vs plain on a ResNet-18), tiny and on the CPU, its loops in this process
    (isolate=false: no process start per loop, and no memory figure that would be this process's)."""
    assert main(["bench", "archs=[resnet18]", "samples.resnet18=64", "batch_size.resnet18=16", "resnet_width=4",
                 "image_shape=[3,16,16]", "epochs=2", "repeats=1", "ratio_rounds=1", "sync_sizes=[]", "niwt=false",
                 "isolate=false", f"output_dir={tmp_path}"]) == 0
    r = json.loads((tmp_path / "bench.json").read_text())["training"]["resnet18"]
    assert all(r[k]["samples_per_s"] > 0 and r[k]["peak_memory_mb"] is None for k in ("plain", "naive", "modnet"))
    assert "n/a (isolate=false)" in (tmp_path / "bench.md").read_text()
    assert r["modnet_time_ratio_vs_plain"] > 0
    # a fair comparison: the plain loop's network and modnet's are the same ResNet-18 at the width asked (a plain
    # network left at another width passed the checks above)
    from modnet.jobs import bench

    opts = {"resnet_width": 4}
    x, y = torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 0, 1])
    plain = bench._plain_model("resnet18", x, opts)
    strategy, _, _ = bench._build_avalanche("modnet", "resnet18", x, y, 2, 1, torch.device("cpu"), opts)
    plain_convs = [tuple(m.weight.shape) for m in plain.modules() if isinstance(m, torch.nn.Conv2d)]
    assert plain_convs == [tuple(c.weight.shape) for c in strategy.model.masked]
    assert plain_convs[0] == (4, 3, 3, 3)


def test_strided_pointwise_conv_is_the_strided_kernel_and_trains_on_small_channels_last_maps():
    """``SlicedStrideConv2d``'s CPU path for strided 1 x 1 convolutions (the shortcut's) gives nn.Conv2d's outputs
    and gradients (a contiguous-map reference), odd sizes included, and its backward runs on the channels_last
    shapes that crash torch's oneDNN kernel on AVX2 machines (fewer than 8 input channels: a crash there takes
    the test process down)."""
    from modnet.nets.hat import SlicedStrideConv2d

    torch.manual_seed(0)
    for n, c_in, c_out, size, stride in [(32, 4, 8, 8, 2), (8, 2, 4, 7, 2), (4, 3, 5, 9, 3)]:
        ours = SlicedStrideConv2d(c_in, c_out, 1, stride=stride, bias=True)
        ref = torch.nn.Conv2d(c_in, c_out, 1, stride=stride, bias=True)
        ref.load_state_dict(ours.state_dict())
        x = torch.randn(n, c_in, size, size)
        x_ours = x.contiguous(memory_format=torch.channels_last).requires_grad_()
        x_ref = x.clone().requires_grad_()
        out, out_ref = ours.to(memory_format=torch.channels_last)(x_ours), ref(x_ref)
        assert out.shape == out_ref.shape == (n, c_out, -(-size // stride), -(-size // stride))
        torch.testing.assert_close(out, out_ref)
        g = torch.randn_like(out_ref)
        out.backward(g)
        out_ref.backward(g)
        torch.testing.assert_close(x_ours.grad, x_ref.grad)
        torch.testing.assert_close(ours.weight.grad, ref.weight.grad)
        torch.testing.assert_close(ours.bias.grad, ref.bias.grad)
    # the non-strided and padded cases are nn.Conv2d's own forward
    conv = SlicedStrideConv2d(4, 8, 3, stride=2, padding=1)
    x = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(conv(x), torch.nn.functional.conv2d(x, conv.weight, conv.bias, 2, 1))
