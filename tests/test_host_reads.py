"""No host reads in a training step: what would be a host sync per step on a GPU, checked on the CPU.

On a GPU every read of a tensor's value by the host (``.item()``, ``float(t)``, ``bool(t)``, ``.tolist()``,
``.cpu()``) and every op whose output size depends on the data (``nonzero``, ``unique``, boolean indexing,
``masked_select``) waits for the queued kernels: the host can no longer run ahead, and a small step pays the
device's time and the host's one after the other. CI has no GPU, so the step's ops are recorded on the CPU
(a ``TorchDispatchMode`` sees every aten op; the Python-level reads are wrapped) from
``before_training_iteration`` to ``after_training_iteration``: the forward, the losses every plugin adds, the
backward, HAT's gradient conditioning and clipping, the optimiser step.

On a CUDA machine (``MODNET_TEST_DEVICE=cuda``, as ``scripts/gpu_checks.sh`` runs it) the same tests train on
the GPU and count only reads of tensors on the device (a CPU tensor's read waits for nothing), and CUDA's own
sync detector (``torch.cuda.set_sync_debug_mode``) watches the same spans, catching syncs inside kernels too.

HAT's clipping reads the gradient norm on the CPU on purpose (no device to wait for; it skips a pass over
the gradients when the norm is within bounds): the step is recorded with ``clip_grad_norm``'s device path,
the one a GPU runs. Left out, with their reads: GEM's projection test (its quadratic program runs on the host),
A-GEM's memory (Avalanche's per-sample loader; its projection is checked alone below), and hnet's Adam (its step
counter is a CPU tensor on any device: not a device sync).
"""
import functools
import os
import warnings

import pytest
import torch
from avalanche.core import SupervisedPlugin
from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode_stack
from torch.utils._pytree import tree_leaves

from modnet.config import compose
from modnet.eval.metrics import build_evaluator
from modnet.runner.runner import make_strategy
from scenarios.base import split_benchmark
from strategies.memory import training_sizes

DEVICE = torch.device(os.environ.get("MODNET_TEST_DEVICE", "cpu"))
if DEVICE.type == "cuda" and not torch.cuda.is_available():
    pytest.skip("MODNET_TEST_DEVICE=cuda without a CUDA device", allow_module_level=True)
ON_DEVICE = DEVICE.type != "cpu"  # then only reads of tensors on the device count

aten = torch.ops.aten
# ops whose result the host reads, or whose output size depends on the data
READ_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
            aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default, aten.equal.default,
            aten.is_nonzero.default, aten.repeat_interleave.Tensor}


class HostReads(TorchDispatchMode):
    """Records the ops of its span that read a tensor's value on the host (``READ_OPS``, indexing by a
    boolean mask); ``python_reads`` adds the Python-level reads (``tolist``, ``numpy``, ``cpu``)."""

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        boolean_index = func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default) and any(
            i is not None and i.dtype == torch.bool for i in args[1])
        if (func in READ_OPS or boolean_index) and _reads_the_device(args):
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))


def _reads_the_device(args) -> bool:
    """On the CPU every read counts (it stands for the GPU run's), but of a tensor marked ``host_side`` (one
    that lives on the host on every device, as DER's slot draws); on a GPU, reads of device tensors."""
    tensors = [a for a in tree_leaves(args) if isinstance(a, torch.Tensor)]
    if not ON_DEVICE:
        return not tensors or not all(getattr(a, "host_side", False) for a in tensors)
    return any(a.device.type != "cpu" for a in tensors)


class RecordSteps:
    """``HostReads`` over every training iteration, from the first plugin's ``before_training_iteration``
    (``start``, placed first) to the last plugin's ``after_training_iteration`` (``stop``, placed last, after
    the evaluator); ``steps`` counts them. The same over evaluation iterations: ``eval_reads``, ``eval_steps``
    (the accuracy matrix's update included)."""

    def __init__(self):
        self.mode, self.reads, self.steps, self.eval_reads, self.eval_steps = None, [], 0, [], 0
        record = self

        def start(strategy, **kw):
            if ON_DEVICE:  # CUDA's own detector: a warning per synchronizing call, recorded as a read
                record.caught = warnings.catch_warnings(record=True)
                record.warned = record.caught.__enter__()
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
            record.mode = HostReads()
            record.mode.__enter__()

        def stop(strategy, **kw):
            record.close()
            if ON_DEVICE:
                torch.cuda.set_sync_debug_mode("default")
                record.caught.__exit__(None, None, None)
                record.mode.reads += [f"cuda sync: {w.message}" for w in record.warned
                                      if "synchroniz" in str(w.message)]
            if strategy.is_training:
                record.reads += record.mode.reads
                record.steps += 1
            else:
                record.eval_reads += record.mode.reads
                record.eval_steps += 1

        class Start(SupervisedPlugin):
            before_training_iteration = before_eval_iteration = staticmethod(start)

        class Stop(SupervisedPlugin):
            after_training_iteration = after_eval_iteration = staticmethod(stop)

        self.start, self.stop = Start(), Stop()

    def close(self) -> None:
        """Leave the recording (an iteration that raised leaves it open: the test then closes it)."""
        if self.mode is not None and self.mode in _get_current_dispatch_mode_stack():
            self.mode.__exit__(None, None, None)


@pytest.fixture
def python_reads(monkeypatch):
    """Wraps Tensor.tolist / numpy / cpu: while a HostReads mode is active, a call is recorded in it."""
    def wrap(name):
        original = getattr(torch.Tensor, name)

        @functools.wraps(original)
        def recorded(self, *args, **kwargs):
            for mode in _get_current_dispatch_mode_stack():
                if isinstance(mode, HostReads) and _reads_the_device([self]):
                    mode.reads.append(f"Tensor.{name}")
            return original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, recorded)

    for name in ("tolist", "numpy", "cpu"):
        wrap(name)


RUN = ["progress=false", "threads=1", "model.hidden=32", "model.cnn_channels=[4,8]", "model.resnet_width=4",
       "modules.cluster.steps=50", "modules.profile_samples=64", "train.batch_size=32", "train.epochs=1"]


def _steps(strategy_name: str, scenario: str, overrides=(), extra_plugins=()) -> RecordSteps:
    """Two experiences (the second trains under HAT's protection of the first) of 2 planted classes, 150
    samples each; 64 features, or 1 x 8 x 8 images for the CNN and the ResNet."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(300) % 4
    x = torch.randn(len(y), 64, generator=g) + torch.nn.functional.one_hot(y, 64).float() * 3
    if any(o in overrides for o in ("model.arch=cnn", "model.arch=resnet18")):
        x = x.view(-1, 1, 8, 8)
    cfg = training_sizes(compose("cl", [*RUN, *overrides]))  # no modnet run whose bytes a buffer could match
    # the data on the device before the split, as the runner moves them (train.data_on_device)
    info = split_benchmark("planted", x.to(DEVICE), y.to(DEVICE), x.to(DEVICE), y.to(DEVICE), 2, scenario, 0)
    record = RecordSteps()
    evaluator, accuracy = build_evaluator([], "unused", progress=False)  # the runner's: the accuracy matrix
    strategy = make_strategy(strategy_name, cfg, info, DEVICE, evaluator, plugins=list(extra_plugins))
    strategy.plugins.insert(0, record.start)
    strategy.plugins.append(record.stop)
    try:
        for exp in info.benchmark.train_stream:
            strategy.train(exp)
            strategy.eval(info.benchmark.test_stream)  # every experience, trained or not, as the runner evaluates
    finally:
        record.close()
        if ON_DEVICE:
            torch.cuda.set_sync_debug_mode("default")
    record.accuracy = accuracy.matrix()
    return record


@pytest.fixture
def device_clip(monkeypatch):
    """HAT's plugin clips as on a GPU: the scale applied on the device, the norm never read."""
    from modnet.nets.hat import clip_grad_norm

    monkeypatch.setattr("strategies.update.clip_grad_norm", functools.partial(clip_grad_norm, read_norm=False))


class _ReadsTheLoss(SupervisedPlugin):
    def before_backward(self, strategy, **kw):
        if float(strategy.loss) > 1e9:  # a logging-style read: the host waits for the forward
            raise AssertionError


class _SplitsByLabel(SupervisedPlugin):
    def before_backward(self, strategy, **kw):
        strategy.loss = strategy.loss + 0 * strategy.mb_x[strategy.mb_y == strategy.mb_y[0]].sum()


class _ListsLabels(SupervisedPlugin):
    def before_backward(self, strategy, **kw):
        strategy.mb_y.tolist()


@pytest.mark.parametrize("plugin", [_ReadsTheLoss(), _SplitsByLabel(), _ListsLabels()],
                         ids=["item", "boolean index", "tolist"])
def test_the_recorder_sees_a_planted_read_in_every_step(plugin, python_reads, device_clip):
    record = _steps("naive", "class", extra_plugins=[plugin])
    assert record.steps == 10  # 2 experiences x 150 samples / batches of 32
    assert len(record.reads) >= record.steps


def test_hats_cpu_clip_reads_the_norm_and_its_device_clip_does_not(python_reads):
    """The CPU path is the one exception the other tests remove: without ``device_clip`` it is seen."""
    assert len(_steps("modnet", "task").reads) >= 10


@pytest.mark.parametrize("scenario,overrides", [
    ("task", ()),  # the MLP default: SynC modules, gates, transform heads in the batch's pass
    ("class", ()),  # + task keys, the class Gaussians' features, the heads over every copy
    ("task", ("modules.sync_reg=0.01",)),
    ("task", ("train.amp=true",)),
    ("class", ("model.arch=cnn", "task_inference.method=ood")),  # the heads' own forward (batch norm)
    ("task", ("model.arch=resnet18",)),
    ("task", ("train.valid_fraction=0.2", "train.lr_patience=1")),  # HAT's reference loop
], ids=["mlp-task", "mlp-class", "sync-reg", "bf16", "cnn-class-ood", "resnet18", "reference-loop"])
def test_a_modnet_training_step_reads_nothing_on_the_host(scenario, overrides, python_reads, device_clip):
    """Evaluation batches neither (the accuracy matrix counts on the device and reads once per experience)."""
    record = _steps("modnet", scenario, overrides)
    assert record.steps >= 8 and record.eval_steps >= 4
    assert record.reads == [] and record.eval_reads == []
    assert len(record.accuracy) == 2 and all(0 <= a <= 1 for row in record.accuracy for a in row)  # counted


@pytest.mark.parametrize("name,scenario", [
    *[(name, "class") for name in ("naive", "ewc", "si", "lwf", "replay", "der", "derpp", "cumulative", "agem")],
    # a head per task; batches of one task label, or mixing tasks (replay, cumulative, A-GEM's memory: the
    # loader reads which)
    *[(name, "task") for name in ("naive", "ewc", "si", "lwf", "replay", "cumulative", "agem")],
    # DER's buffer batches mix tasks: their heads from the buffer's host copy of the task labels
    *[(name, "task") for name in ("der", "derpp")],
])
def test_a_baseline_step_reads_nothing_on_the_host(name, scenario, python_reads):
    record = _steps(name, scenario)
    assert record.steps >= 8 and record.eval_steps >= 4
    assert record.reads == [] and record.eval_reads == []


def test_der_with_a_full_buffer_reads_nothing_on_the_host(python_reads):
    """A buffer smaller than the stream: the reservoir's replacement draws (algorithm R's randint per sample
    once full) are host draws, and its slot draws mix both tasks (DER++: two buffer batches a step)."""
    record = _steps("derpp", "task", overrides=("derpp.mem_size=16",))
    assert record.steps >= 8 and record.eval_steps >= 4
    assert record.reads == [] and record.eval_reads == []


def test_agem_projects_without_reading_the_constraint_on_the_host(python_reads):
    """A-GEM's projection step alone, on a gradient that violates the constraint and on one that keeps it:
    Avalanche's plugin reads g . g_ref back each time (the recorder must see it), ours reads nothing."""
    from types import SimpleNamespace

    from avalanche.training.plugins import AGEMPlugin

    from strategies.plugins.agem import SyncFreeAGEMPlugin

    model = torch.nn.Linear(3, 2).to(DEVICE)
    reads = {}
    for cls in (AGEMPlugin, SyncFreeAGEMPlugin):
        plugin = cls(1, 1)
        plugin.buffers = [None]  # a memory is held: the projection runs
        plugin.reference_gradients = torch.ones(8, device=DEVICE)
        mode, reads[cls.__name__] = HostReads(), []
        for sign in (-1.0, 1.0):
            for p in model.parameters():
                p.grad = torch.full_like(p, sign)
            with mode:
                plugin.after_backward(SimpleNamespace(model=model, device=DEVICE))
        reads[cls.__name__] = mode.reads
    assert len(reads["AGEMPlugin"]) == 2 and reads["SyncFreeAGEMPlugin"] == []


def _three_task_multi_head_net():
    """A ``MultiHeadNet`` (MLP 8-16) adapted to three task-incremental experiences of 2 classes each, and the
    generator that made its data."""
    from avalanche.benchmarks import nc_benchmark
    from avalanche.models.utils import avalanche_model_adaptation
    from torch.utils.data import TensorDataset

    from modnet.nets.models import MLPBackbone, MultiHeadNet

    g = torch.Generator().manual_seed(0)
    y = torch.arange(180) % 6
    x = torch.randn(len(y), 8, generator=g)
    data = TensorDataset(x, y)
    data.targets = y  # global class ids in every task (not renumbered from 0): heads wider than their classes
    stream = nc_benchmark(data, data, 3, task_labels=True, fixed_class_order=list(range(6)), seed=0).train_stream
    torch.manual_seed(0)
    model = MultiHeadNet(MLPBackbone(8, 16, 1))
    for exp in stream:
        avalanche_model_adaptation(model, exp)
    return model, g


def test_the_multi_head_net_answers_as_avalanches_split_by_task():
    """``MultiHeadNet`` against Avalanche's own path (``MultiTaskModule.forward``: the batch split by
    ``torch.unique`` of its task labels, each part through the backbone and ``MultiHeadClassifier``'s head,
    whose inactive units are written through a boolean index): the same logits and gradients, to the bit on a
    batch of one task label (an int, or a tensor), to float rounding on batches mixing tasks (the backbone runs
    once over all rows); a head with no row in the batch gets no gradient in both. Task 1's head has 4 outputs
    of which its classes use 2 (the others answer Avalanche's mask value, -1000), task 2's 6; past a head's
    width the logits are zeros. ``forward_tasks`` with the batch's task labels given (as the tensor loader
    reads them on the host) is ``forward``."""
    from avalanche.models import MultiTaskModule

    model, g = _three_task_multi_head_net()
    heads = model.classifier
    assert [heads.classifiers[str(t)].classifier.out_features for t in range(3)] == [2, 4, 6]

    def avalanches(batch, labels):
        model.forward_single_task = lambda xs, t: heads.forward_single_task(model.backbone(xs), t).float()
        try:
            return MultiTaskModule.forward(model, batch, labels)
        finally:
            del model.forward_single_task

    def logits_and_grads(forward, batch, labels, targets):
        model.zero_grad()
        out = forward(batch, labels)
        torch.nn.functional.cross_entropy(out, targets).backward()
        return out.detach(), [p.grad for p in model.parameters()]

    batch = torch.randn(40, 8, generator=g)
    two_tasks = 2 * torch.randint(0, 2, (40,), generator=g)  # tasks 0 and 2: head 1 has no row
    cases = [(1, 0), (torch.ones(40, dtype=torch.long), 0), (torch.randint(0, 3, (40,), generator=g), 1e-6),
             (two_tasks, 1e-6)]
    for labels, tol in cases:
        targets = 2 * labels + torch.randint(0, 2, (40,), generator=g)  # task t's classes: 2t, 2t + 1
        ref, ref_grads = logits_and_grads(avalanches, batch, labels, targets)
        forwards = [model] if isinstance(labels, int) else \
            [model, lambda b, t: model.forward_tasks(b, t, sorted(set(t.tolist())))]
        for forward in forwards:
            ours, grads = logits_and_grads(forward, batch, labels, targets)
            if isinstance(labels, int):
                assert ours.shape == (40, 4) and (ours[:, :2] == -1000).all()  # masked
            else:
                assert ours.shape == (40, 6) and (ours[labels == 0, 2:] == 0).all()  # zeros past head 0
            torch.testing.assert_close(ours, ref, rtol=tol, atol=tol)
            for a, b in zip(grads, ref_grads):
                assert (a is None) == (b is None)
                if a is not None:
                    torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    assert heads.classifiers["1"].classifier.weight.grad is None  # the last case: no row of task 1


def test_the_multi_head_net_runs_every_head_on_one_backbone_pass():
    """``MultiHeadNet.forward_all_tasks`` (LwF's distillation reads it for the current and the previous network
    every step) against Avalanche's ``MultiTaskModule.forward_all_tasks`` (the whole network once per head): the
    same logits of every trained head, to the bit; the gradient of a loss over all the heads the same to float
    rounding; the backbone runs once instead of once per head (3 here)."""
    from avalanche.models import MultiTaskModule

    model, g = _three_task_multi_head_net()
    passes = []
    model.backbone.register_forward_hook(lambda *_: passes.append(1))
    batch = torch.randn(40, 8, generator=g)
    weights = {t: torch.randn(40, 2 * t + 2, generator=g) for t in range(3)}

    def outputs_and_grads(forward_all_tasks):
        model.zero_grad()
        passes.clear()
        out = forward_all_tasks(batch)
        sum((weights[t] * torch.log_softmax(o, 1)).sum() for t, o in out.items()).backward()
        return {t: o.detach() for t, o in out.items()}, [p.grad.clone() for p in model.parameters()], len(passes)

    ref, ref_grads, ref_passes = outputs_and_grads(lambda b: MultiTaskModule.forward_all_tasks(model, b))
    ours, grads, our_passes = outputs_and_grads(model.forward_all_tasks)
    assert sorted(ours) == sorted(ref) == [0, 1, 2] and (ref_passes, our_passes) == (3, 1)
    for t in ref:
        assert torch.equal(ours[t], ref[t])
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
