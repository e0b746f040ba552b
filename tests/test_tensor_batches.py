"""Batches sliced from tensors (modnet/runner/tensor_batches.py): an epoch is a permutation in batches of the
configured size, seeded; the same batches, and so the same training, as Avalanche's loaders; replay's batches
hold buffer samples; data-parallel shards as torch's DistributedSampler; other datasets keep Avalanche's."""
import pytest
import torch
from torch.utils.data import DistributedSampler

from modnet.config import compose
from modnet.runner.tensor_batches import TensorBatchLoader, _ShardOrder, convert_loader
from scenarios.tensors import resolve_tensors
from scenarios.base import permuted_benchmark, split_benchmark


def _data(n=600, d=12):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, d, generator=g)
    x[:, 0] = torch.arange(n, dtype=torch.float32)  # every sample carries its id
    return x, torch.arange(n) % 10


def _benchmark(kind="split", scenario="task", n=600):
    x, y = _data(n)
    make = split_benchmark if kind == "split" else permuted_benchmark
    return make("t", x, y, x.clone(), y.clone(), 5 if kind == "split" else 3, scenario, 0)


def _epoch(loader, seed):
    torch.manual_seed(seed)
    return [b for b in loader]


def test_an_epoch_is_a_seeded_permutation_in_batches_of_the_configured_size():
    info = _benchmark()
    ds = info.benchmark.train_stream[1].dataset.train()
    view = resolve_tensors(ds)
    assert view is not None
    loader = TensorBatchLoader([view], [32])
    batches = _epoch(loader, 0)
    ids = torch.cat([b[0][:, 0] for b in batches]).long()
    expected = torch.tensor(sorted(int(ds[i][0][0]) for i in range(len(ds))))
    assert torch.equal(ids.sort().values, expected)  # every sample once
    assert [len(b[0]) for b in batches[:-1]] == [32] * (len(batches) - 1)
    assert 0 < len(batches[-1][0]) <= 32 and len(batches) == len(loader) == -(-len(ds) // 32)
    for xb, yb, tb in batches:  # fields as Avalanche's mb_x, mb_y, mb_task_id
        assert xb.shape[1:] == (12,) and yb.dtype == torch.long and tb.dtype == torch.long
        assert set(tb.tolist()) == {1}
    again, other = _epoch(loader, 0), _epoch(loader, 1)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    assert not torch.equal(torch.cat([b[0] for b in batches]), torch.cat([b[0] for b in other]))
    torch.manual_seed(0)
    first, second = list(loader), list(loader)  # a new permutation every epoch
    assert not torch.equal(first[0][0], second[0][0])


@pytest.mark.parametrize("kind,scenario", [("split", "task"), ("split", "class"), ("permuted", "task")])
def test_same_batches_and_generator_state_as_avalanches_loaders(kind, scenario):
    from avalanche.benchmarks.utils.data_loader import (ReplayDataLoader, SingleDatasetDataLoader,
                                                        TaskBalancedDataLoader)

    info = _benchmark(kind, scenario)
    exps = list(info.benchmark.train_stream)
    ds = exps[2].dataset.train()
    memory = exps[0].dataset.train().subset(range(0, 90, 3)).concat(exps[1].dataset.train().subset(range(5, 60, 2)))
    cases = [TaskBalancedDataLoader(ds, batch_size=32, oversample_small_groups=True, shuffle=True),
             TaskBalancedDataLoader(ds.concat(exps[1].dataset.train()), batch_size=32,  # two task groups
                                    oversample_small_groups=True, shuffle=True),
             ReplayDataLoader(ds, memory, oversample_small_tasks=True, batch_size=32, batch_size_mem=24,
                              shuffle=True),
             SingleDatasetDataLoader(info.benchmark.test_stream[1].dataset.eval(), batch_size=50)]  # evaluation
    for avalanche_loader in cases:
        ours = convert_loader(avalanche_loader)
        assert ours is not None
        torch.manual_seed(3)
        theirs = [list(b) for b in avalanche_loader]
        after_theirs = torch.rand(1)
        torch.manual_seed(3)
        mine = list(ours)
        assert torch.equal(torch.rand(1), after_theirs)
        assert len(mine) == len(theirs)
        for a, b in zip(theirs, mine):
            for u, v in zip(a, b):
                assert u.dtype == v.dtype and torch.equal(u, v)


@pytest.mark.parametrize("shuffle", [False, True], ids=["in-order", "shuffled"])
def test_a_never_ending_loader_cycles_its_groups_as_avalanches(shuffle):
    """A-GEM's memory loader: one group per memory (sizes that leave a short last batch), batches cycled
    without end (in order, as A-GEM's, or reshuffled every pass): the same batches, and the same draws from
    the global generator, as Avalanche's ``GroupBalancedInfiniteDataLoader``, over several passes of each."""
    import itertools

    from avalanche.benchmarks.utils.data_loader import GroupBalancedInfiniteDataLoader

    exps = list(_benchmark().benchmark.train_stream)
    memories = [exps[0].dataset.train().subset(range(0, 75, 3)),  # 25 samples: batches of 12, 12, 1
                exps[2].dataset.train().subset(range(40))]
    for groups in (memories[:1], memories):
        avalanche_loader = GroupBalancedInfiniteDataLoader(groups, batch_size=12, shuffle=shuffle)
        ours = convert_loader(avalanche_loader)
        assert ours is not None and len(ours) == len(avalanche_loader)
        torch.manual_seed(5)
        theirs = [list(b) for b in itertools.islice(iter(avalanche_loader), 14)]
        after_theirs = torch.rand(1)
        torch.manual_seed(5)
        mine = list(itertools.islice(iter(ours), 14))
        assert torch.equal(torch.rand(1), after_theirs)
        assert [len(b[0]) for b in mine][:3] == ([12, 12, 1] if len(groups) == 1 else [24, 24, 13])
        for a, b in zip(theirs, mine, strict=True):
            for u, v in zip(a, b):
                assert u.dtype == v.dtype and torch.equal(u, v)
        # the task labels the loader names are those of the batch it yielded
        it = iter(ours)
        for _ in range(5):
            batch = next(it)
            assert ours.batch_tasks == sorted(set(batch[2].tolist()))


def _strategy(name, tensor_batches, info, epochs=2, extra=()):
    from avalanche.training.plugins import EvaluationPlugin

    from modnet.runner.runner import make_strategy

    cfg = compose("cl", ["progress=false", f"train.epochs={epochs}", "train.batch_size=32", "model.hidden=32",
                         f"train.tensor_batches={str(tensor_batches).lower()}", "gem.patterns_per_exp=32",
                         "agem.patterns_per_exp=32", "agem.sample_size=24", "replay.mem_size=60", "modules.profile_samples=64", *extra])
    return make_strategy(name, cfg, info, torch.device("cpu"), EvaluationPlugin(loggers=[]))


class _Losses:
    def __new__(cls):
        from avalanche.core import SupervisedPlugin

        class Losses(SupervisedPlugin):
            def __init__(self):
                super().__init__()
                self.losses, self.loaders = [], []

            def before_training_epoch(self, strategy, **kw):
                self.loaders.append(type(strategy.dataloader).__name__)
                for plugin in strategy.plugins:  # A-GEM's memory loader, once it holds a memory
                    if getattr(plugin, "buffers", None):
                        self.loaders.append(type(plugin.buffer_dataloader).__name__)

            def after_training_iteration(self, strategy, **kw):
                self.losses.append(float(strategy.loss))

        return Losses()


# modnet with HAT's reference validation loop: the held-out samples' loss every epoch, sliced from the tensors
VALIDATION = ("train.valid_fraction=0.2", "train.lr_patience=1", "train.restore_best=true")


@pytest.mark.parametrize("name,extra", [("naive", ()), ("replay", ()), ("gem", ()), ("agem", ()), ("modnet", ()),
                                        ("modnet", VALIDATION)])
def test_a_strategy_trains_and_evaluates_as_through_avalanches_loader(name, extra):
    """Every strategy on the tensor data path gives the numbers of Avalanche's loaders; modnet's plugins read
    their experience (task-OOD calibration, module profiles, validation loss) from the tensors too."""
    from modnet.runner.runner import run_experiences

    info = _benchmark(n=400)
    results = {}
    for tensor_batches in (True, False):
        torch.manual_seed(0)
        strategy = _strategy(name, tensor_batches, info, extra=extra)
        losses = _Losses()
        strategy.plugins.append(losses)
        exps = list(info.benchmark.train_stream)[:3]

        def evaluate(index, strategy):
            res = strategy.eval(info.benchmark.test_stream[:3])
            return [res[k] for k in sorted(res) if k.startswith("Top1_Acc_Exp")]

        rec = run_experiences(strategy, exps, evaluate, seed=0, log=lambda s: None)
        # every weight and buffer: the plugins' statistics too (task-OOD score calibration, module usage)
        results[tensor_batches] = (losses.losses, rec.rows, losses.loaders, strategy.model.state_dict())
    (l1, r1, kinds, w1), (l0, r0, kinds0, w0) = results[True], results[False]
    assert set(kinds) == {"TensorBatchLoader"} and "TensorBatchLoader" not in kinds0 and len(kinds) == len(kinds0)
    assert ("GroupBalancedInfiniteDataLoader" in kinds0) == (name == "agem")  # its memory batches, sliced too
    assert l1 == l0 and r1 == r0  # the same batches in the same order: the same numbers
    assert w1.keys() == w0.keys() and all(torch.equal(w1[k], w0[k]) for k in w1)


def test_ewc_fisher_pass_reads_the_tensors_and_gives_avalanches_importances(monkeypatch):
    """EWC's importances after each experience (Avalanche's compute_importances: a backward per mini-batch of
    the experience in order) from the tensors' slices: the same importances to the bit, the same losses after
    (the penalty reads them), and no torch DataLoader iterated on the tensor path (before: the Fisher pass
    fetched and collated every sample through Avalanche's dataset)."""
    from torch.utils.data import DataLoader

    from modnet.runner.runner import run_experiences

    iterated = []
    plain_iter = DataLoader.__iter__
    monkeypatch.setattr(DataLoader, "__iter__", lambda self: iterated.append(1) or plain_iter(self))
    info = _benchmark(n=400)
    results = {}
    for tensor_batches in (True, False):
        torch.manual_seed(0)
        iterated.clear()
        strategy = _strategy("ewc", tensor_batches, info)
        losses = _Losses()
        strategy.plugins.append(losses)
        run_experiences(strategy, list(info.benchmark.train_stream)[:3], lambda index, strategy: [], seed=0,
                        log=lambda s: None)
        ewc = next(p for p in strategy.plugins if type(p).__name__ == "StableEWCPlugin")
        results[tensor_batches] = (losses.losses, len(iterated), {
            (e, k): imp.data.clone() for e, per_exp in ewc.importances.items() for k, imp in per_exp.items()})
    (l1, n1, f1), (l0, n0, f0) = results[True], results[False]
    assert n1 == 0 and n0 >= 3  # Avalanche's path: at least the Fisher pass of each experience
    assert f1.keys() == f0.keys() and len({e for e, _ in f1}) == 3
    assert all(torch.equal(f1[k], f0[k]) for k in f1) and any(f1[k].abs().sum() > 0 for k in f1)
    assert l1 == l0


def test_replay_batches_hold_buffer_samples_after_the_first_experience():
    from avalanche.core import SupervisedPlugin

    info = _benchmark(n=400)
    strategy = _strategy("replay", True, info, epochs=1)
    seen = []

    class Tasks(SupervisedPlugin):
        def before_forward(self, strategy, **kw):
            seen.append((strategy.clock.train_exp_counter, type(strategy.dataloader).__name__,
                         len(strategy.mb_x), set(strategy.mb_task_id.tolist())))

    strategy.plugins.append(Tasks())
    for exp in list(info.benchmark.train_stream)[:3]:
        strategy.train(exp)
    assert all(loader == "TensorBatchLoader" for _, loader, _, _ in seen)
    assert all(tasks == {0} and n <= 32 for e, _, n, tasks in seen if e == 0)
    later = [(e, n, tasks) for e, _, n, tasks in seen if e > 0]
    assert later and all(e in tasks and len(tasks) > 1 and n > 32 for e, n, tasks in later)


def test_an_input_transform_keeps_avalanches_loader():
    from avalanche.benchmarks.utils.data_loader import SingleDatasetDataLoader

    info = _benchmark(n=400)
    exp = info.benchmark.test_stream[0]
    transformed = exp.dataset.replace_current_transform_group(lambda x: x * 2).eval()
    assert resolve_tensors(transformed) is None
    assert resolve_tensors(exp.dataset.eval()) is not None
    assert convert_loader(SingleDatasetDataLoader(transformed, batch_size=8)) is None
    strategy = _strategy("naive", True, info, epochs=1)
    assert type(strategy).__name__ == "TensorBatchesNaive"
    strategy.experience, strategy.adapted_dataset = exp, transformed
    strategy.make_eval_dataloader()
    assert type(strategy.dataloader).__name__ == "SingleDatasetDataLoader"
    strategy.adapted_dataset = exp.dataset.eval()
    strategy.make_eval_dataloader()
    assert type(strategy.dataloader).__name__ == "TensorBatchLoader"


@pytest.mark.parametrize("n,world,drop_last", [(10, 3, False), (10, 3, True), (200, 4, False), (7, 2, False)])
def test_data_parallel_shards_are_distributed_samplers(n, world, drop_last):
    for rank in range(world):
        sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, seed=11, drop_last=drop_last)
        order = _ShardOrder(n, rank, world, 11, True, drop_last)
        for epoch in (0, 2):
            sampler.set_epoch(epoch)
            order.set_epoch(epoch)
            assert order().tolist() == list(sampler) and order.length == len(sampler)


def test_pin_memory_follows_avalanche_except_for_data_already_on_the_gpu():
    from modnet.runner.tensor_batches import pin_memory_for

    host = [(torch.zeros(3), 0)]
    assert pin_memory_for("cpu", host) is False  # Avalanche: pinned on CUDA only
    assert pin_memory_for(torch.device("cuda"), host) is True
    assert pin_memory_for("cuda", host, pin_memory=False) is False  # a value given is kept
    assert pin_memory_for("cpu", host, pin_memory=True) is True


def test_a_single_task_batch_gives_what_avalanches_split_by_task_forward_gives():
    """A multi-head model on a batch whose labels are all one task: the single-task path (no torch.unique,
    no masks) returns Avalanche's split-by-task output, zero-padded to the widest head, gradients included."""
    from modnet.nets.models import MLPBackbone, MultiHeadNet
    from modnet.runner.tensor_batches import single_task_forward

    torch.manual_seed(0)
    model = MultiHeadNet(MLPBackbone(6, 8, 1))
    exps = split_benchmark("t", *(_data(90, 6) * 2), 1, "task", 0).benchmark.train_stream  # 10 classes
    model.adaptation(exps[0])  # head 0: 10 outputs
    model.classifier.classifiers["1"] = torch.nn.Linear(8, 3)  # head 1: 3 (pads to 10 columns)
    model.classifier.register_buffer("active_units_T1", torch.ones(3, dtype=torch.int8))
    x = torch.randn(5, 6)
    for task in (0, 1):
        labels = torch.full((5,), task)
        ref = model(x, labels)  # Avalanche's MultiTaskModule.forward: unique, masks, scatter into zeros
        out = single_task_forward(model, x, task)
        assert out.shape == ref.shape == (5, model.max_class_label) and torch.equal(out, ref)
        g_ref = torch.autograd.grad(ref.square().sum(), list(model.backbone.parameters()))
        g = torch.autograd.grad(single_task_forward(model, x, task).square().sum(), list(model.backbone.parameters()))
        assert all(torch.equal(a, b) for a, b in zip(g, g_ref))
    view = resolve_tensors(exps[0].dataset.train())
    assert TensorBatchLoader([view], [8]).single_task == 0


def test_lean_evaluation_skips_only_callbacks_nobody_listens_to():
    """The evaluator is skipped for a training-step callback when no metric implements it and no logger is
    attached; a metric that listens (minibatch accuracy), or a logger, keeps it answering."""
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.logging import TextLogger
    from avalanche.training.plugins import EvaluationPlugin

    from modnet.eval.metrics import AccuracyMatrix
    from modnet.runner.evaluation import lean_evaluation_class

    def lean(*metrics, loggers=()):
        ev = EvaluationPlugin(*metrics, loggers=list(loggers))
        ev.__class__ = lean_evaluation_class(EvaluationPlugin)
        return ev

    quiet = lean(AccuracyMatrix())
    assert not hasattr(quiet, "before_forward") and not hasattr(quiet, "after_training_iteration")
    assert hasattr(quiet, "after_eval_iteration") and not hasattr(quiet, "after_eval_exp")  # AccuracyMatrix's
    assert hasattr(quiet, "before_eval")  # defined by EvaluationPlugin itself: always answered
    assert hasattr(EvaluationPlugin(AccuracyMatrix(), loggers=[]), "before_forward")  # Avalanche's answers all
    listening = lean(*accuracy_metrics(minibatch=True))
    assert hasattr(listening, "after_training_iteration") and not hasattr(listening, "before_backward")
    import io
    logged = lean(loggers=[TextLogger(io.StringIO())])
    assert hasattr(logged, "before_backward")


@pytest.mark.parametrize("method", ["features", "gauss"])
def test_class_incremental_modnet_trains_as_through_avalanches_loader(method):
    """Class-incremental modnet, whose plugins read each experience again after training it (task keys, the
    features' Gaussians, the transform heads' calibration): the same losses, the same weights and statistics on
    either data path, so the passes draw the loader's seed on the tensor path too (the next experience's
    shuffles come from the same generator state)."""
    info = _benchmark(scenario="class", n=300)
    results = {}
    for tensor_batches in (True, False):
        torch.manual_seed(0)
        strategy = _strategy("modnet", tensor_batches, info, epochs=1, extra=(f"task_inference.method={method}",))
        losses = _Losses()
        strategy.plugins.append(losses)
        for exp in list(info.benchmark.train_stream)[:3]:
            strategy.train(exp)
        results[tensor_batches] = (losses.losses, strategy.model.state_dict())
    (l1, w1), (l0, w0) = results[True], results[False]
    assert l1 == l0
    assert w1.keys() == w0.keys() and all(torch.equal(w1[k], w0[k]) for k in w1)


def test_task_keys_gather_the_same_statistics_from_the_tensors():
    """Class-incremental modnet: the task keys' running statistics after two experiences are the same whether
    the plugin slices the experience's tensors or runs Avalanche's loader over it (same batches, same order)."""
    info = _benchmark(scenario="class", n=300)
    stats = {}
    for tensor_batches in (True, False):
        torch.manual_seed(0)
        strategy = _strategy("modnet", tensor_batches, info, epochs=1, extra=("task_inference.method=gauss",))
        assert strategy.model.task_keys is not None
        for exp in list(info.benchmark.train_stream)[:2]:
            strategy.train(exp)
        keys = strategy.model.task_keys
        stats[tensor_batches] = [t.clone() for _, t in sorted(keys.named_buffers())]  # sums, counts, scatter(s)
    assert all(torch.equal(a, b) for a, b in zip(stats[True], stats[False]))
    counts = dict(strategy.model.task_keys.named_buffers())["counts"]
    assert int(counts.sum()) == sum(len(e.dataset) for e in list(info.benchmark.train_stream)[:2])


@pytest.mark.parametrize("shuffle", [True, False])
def test_the_loader_names_the_task_labels_of_every_batch_it_yields(shuffle):
    """``batch_tasks`` (read from the host's copy of the labels) is the set of the batch's own task labels:
    a current task's group (one label) with a memory of three earlier tasks, oversampled as Replay's loader."""
    from scenarios.tensors import TensorView

    g = torch.Generator().manual_seed(0)
    current = TensorView(torch.randn(50, 3), None, torch.zeros(50, dtype=torch.long), torch.full((50,), 3))
    t_memory = torch.randint(0, 3, (20,), generator=g)
    memory = TensorView(torch.randn(20, 3), None, torch.zeros(20, dtype=torch.long), t_memory)
    loader = TensorBatchLoader([current, memory], [8, 4], termination=0, oversample=True, shuffle=shuffle)
    assert loader.single_task is None
    seen = 0
    for x, y, t in loader:
        assert loader.batch_tasks == sorted(set(t.tolist()))
        seen += 1
    assert seen == 7 and TensorBatchLoader([current], [8]).single_task == 3
