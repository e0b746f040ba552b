"""``train.compile``: the modular network's training step through ``torch.compile``
(``strategies.template.compiled_training_step``: masks, gates, HAT's compensation, the layers, the criterion and
the plugins' loss terms: HAT's capacity regulariser, the transform heads' loss; their gradients and the update with
HAT's and the gates' terms, one graph; where a plugin acts between the forward and the update, the forward and
losses, ``compiled_training_loss``, and the update, ``strategies.update.compiled_sgd_update``, two graphs).

The reference is the eager run of the same config. With the ``aot_eager`` backend (dynamo's capture and AOT
autograd's forward and backward graphs, each op then run as eager runs it) or ``eager`` (the capture alone)
training is the eager training to the bit; inductor fuses the ops and reorders float sums, so its trained weights match the eager ones to
rounding. A graph is compiled per task, not per step: their number does not grow with the epochs (the batch
size and the slope s, annealed every step, are symbolic)."""
import pytest
import torch
from avalanche.training.plugins import EvaluationPlugin

from modnet.config import ConfigError, compose
from modnet.runner.runner import make_strategy
from scenarios.base import split_benchmark

RUN = ["progress=false", "threads=1", "model.hidden=32", "model.cnn_channels=[4,8]", "modules.cluster.steps=50",
       "modules.profile_samples=64", "train.batch_size=32"]


def _train(compile_option, epochs: int = 1, n_experiences: int = 2, arch: str = "mlp", scenario: str = "task",
           overrides=(), plugins=()):
    """A modnet (HAT masks, SynC modules, gates; on the MLP the transform heads too: the defaults) trained on
    planted data: 2 classes per experience, 150 samples each (64 features, or the same as 1 x 8 x 8 images for the
    CNN), batches of 32 (a last batch of 22)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    g = torch.Generator().manual_seed(0)
    y = torch.arange(150 * n_experiences) % (2 * n_experiences)
    x = torch.randn(len(y), 64, generator=g) + torch.nn.functional.one_hot(y, 64).float() * 3
    if arch == "cnn":
        x = x.view(-1, 1, 8, 8)
    cfg = compose("cl", [*RUN, f"model.arch={arch}", f"train.epochs={epochs}", f"train.compile={compile_option}",
                         *overrides])
    info = split_benchmark("planted", x, y, x, y, n_experiences, scenario, 0)
    torch.manual_seed(0)
    strategy = make_strategy("modnet", cfg, info, torch.device("cpu"), EvaluationPlugin(loggers=[]),
                             plugins=plugins)
    for exp in info.benchmark.train_stream:
        strategy.train(exp)
    return strategy.model, compiled_graphs()


def compiled_graphs() -> tuple[int, int, int]:
    """(step graphs, training graphs, update graphs): the graphs dynamo holds for the whole training step
    (``strategies.template.training_step``), and, where the step is not one graph, for its forward and losses
    (``strategies.template.training_loss``) and for the optimiser's step with HAT's terms
    (``strategies.update.sgd_update``)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    from strategies.template import training_loss, training_step
    from strategies.update import sgd_update

    return tuple(len(_debug_get_cache_entry_list(f.__code__)) for f in (training_step, training_loss, sgd_update))


@pytest.mark.parametrize("arch,backend,scenario", [("mlp", "aot_eager", "task"), ("mlp", "aot_eager", "class"),
                                                   ("cnn", "eager", "task")])
def test_the_traced_training_is_the_eager_training_and_compiles_per_task_not_per_step(arch, backend, scenario):
    """MLP: through AOT autograd's graphs, task- and class-incremental (the transform heads' replaced rows: the
    criterion reads the identity rows). CNN: dynamo's capture only (its dynamic graph takes ~12 s through AOT
    autograd), where it pools by strided slices (``modnet.nets.models.max_pool2``) and still trains as eager.
    Bit for bit: a loss term added twice (in the graph and by its plugin's callback) or left out would show."""
    tasks = 2 if arch == "mlp" else 1
    eager, graphs = _train("false", arch=arch, n_experiences=tasks, scenario=scenario)
    assert graphs == (0, 0, 0)
    compiled, (step, training, update) = _train(backend, arch=arch, n_experiences=tasks, scenario=scenario)
    for (name, p), q in zip(eager.state_dict().items(), compiled.state_dict().values()):
        assert torch.equal(p, q), name
    # the whole step in one graph per task (its rows and gate are picked by its index), whatever the batch size
    # (the last batch, the transform heads' copies), the annealed slope s and the gates' settle epoch (their
    # gradients times a 0-d factor, 0 there)
    assert step == tasks and training == update == 0
    if arch == "mlp":  # more epochs (the settle epoch after others), then more again: no graph more per step
        three = _train("eager", epochs=3, arch=arch, scenario=scenario)[1]
        assert three[0] == tasks and three == _train("eager", epochs=4, arch=arch, scenario=scenario)[1]


def test_a_plugin_that_acts_on_the_gradients_keeps_the_step_in_three_calls_and_trains_as_eager():
    """The sync regulariser adds its loss in before_backward, on the recorded activations (a plugin the one-graph
    step leaves no room for: ``strategies.template.step_fusable``): the forward and losses are one graph per task,
    the update another, the backward eager in between; trained weights equal the eager run's to the bit."""
    sync = ["modules.sync_reg=0.01", "train.batch_size=30"]  # (a batch as wide as the layer, 32, would share its
    # symbol in the graph, dynamo's duck sizing, and the sync loss's pairwise products would specialise both)
    eager, graphs = _train("false", overrides=sync)
    assert graphs == (0, 0, 0)
    compiled, (step, training, update) = _train("aot_eager", overrides=sync)
    for (name, p), q in zip(eager.state_dict().items(), compiled.state_dict().values()):
        assert torch.equal(p, q), name
    # a training graph per task and record flag (the sync loss reads the activations every 16th step only,
    # modules.sync_every), an update graph per set of gradients
    assert step == 0 and training == 4 and 1 <= update <= 2


def test_a_step_in_one_graph_leaves_no_gradient_and_a_plugin_reading_them_gets_the_backward():
    """A plugin answering after_backward reads ``.grad`` there: with it the step keeps its eager backward (every
    trained parameter has its gradient); the same plugin declaring the callback fused-step safe
    (``fused_step_callbacks``) lets the step be one graph, which writes no gradient, and trains the same weights."""
    from avalanche.core import SupervisedPlugin

    from strategies.template import ForwardLossTerm, step_fusable

    class GradReader(SupervisedPlugin):
        def __init__(self):
            super().__init__()
            self.seen = []

        def after_backward(self, strategy, **kw):
            self.seen.append(sum(p.grad is not None for p in strategy.model.parameters()))

    class DeclaredGradReader(GradReader):
        fused_step_callbacks = ("after_backward",)

    class LossAfterTheForward(ForwardLossTerm):  # a subclass's own before_backward: not covered by its base's
        def loss_term(self, model, x, y, condition):
            return model.heads[condition.task].bias.sum() * 0

        def before_backward(self, strategy, **kw):
            super().before_backward(strategy, **kw)

    assert not step_fusable(GradReader()) and step_fusable(DeclaredGradReader())
    assert not step_fusable(LossAfterTheForward())
    reader, declared = GradReader(), DeclaredGradReader()
    with_backward, (step, training, _) = _train("aot_eager", n_experiences=1, plugins=[reader])
    assert step == 0 and training == 1 and min(reader.seen) > 0
    fused, (step, training, _) = _train("aot_eager", n_experiences=1, plugins=[declared])
    assert step == 1 and training == 0 and set(declared.seen) == {0}
    for (name, p), q in zip(with_backward.state_dict().items(), fused.state_dict().values()):
        assert torch.equal(p, q), name


def test_a_step_in_one_graph_keeps_sgd_s_momentum_as_the_optimiser_does():
    """Momentum (train.momentum; HAT's own default is 0): the one-graph step's buffers, written back into the
    optimiser's state, give the eager run's weights to the bit over two tasks."""
    momentum = ["train.momentum=0.9"]
    eager, _ = _train("false", overrides=momentum)
    compiled, (step, _, _) = _train("aot_eager", overrides=momentum)
    assert step >= 2
    for (name, p), q in zip(eager.state_dict().items(), compiled.state_dict().values()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("compile_option", ["false", "aot_eager"])
def test_a_gradient_left_after_a_step_is_cleared_before_the_next_and_none_left_calls_no_zero_grad(
        compile_option, monkeypatch):
    """The template's epoch calls the optimiser's zero_grad only where a parameter holds a gradient. A plugin leaving
    a stale gradient of ones on every parameter after each step (after_training_iteration) changes nothing: the
    eager backward would add into it, so it is cleared first; the one-graph step takes its own gradients. Without
    it, the one-graph step leaves no gradient and zero_grad is never called; the eager step's is, every step."""
    from avalanche.core import SupervisedPlugin

    calls = []
    zero_grad = torch.optim.Optimizer.zero_grad
    monkeypatch.setattr(torch.optim.Optimizer, "zero_grad",
                        lambda self, *a, **kw: (calls.append(type(self)), zero_grad(self, *a, **kw))[1])

    class StaleGradients(SupervisedPlugin):
        def after_training_iteration(self, strategy, **kw):
            for p in strategy.model.parameters():
                p.grad = torch.ones_like(p)

    steps = 5  # one epoch of 150 samples in batches of 32: every step but the first follows one
    clean, _ = _train(compile_option, n_experiences=1)
    sgd_calls = calls.count(torch.optim.SGD)
    assert sgd_calls == (0 if compile_option == "aot_eager" else steps - 1)
    stale, _ = _train(compile_option, n_experiences=1, plugins=[StaleGradients()])
    assert calls.count(torch.optim.SGD) - sgd_calls == steps - 1
    for (name, p), q in zip(clean.state_dict().items(), stale.state_dict().values()):
        assert torch.equal(p, q), name


def test_the_compiled_graph_holds_the_step_s_losses_not_the_masked_pass_alone():
    """What the compiled graph computes, read from the graph dynamo hands its backend: the masks and gates (their
    autograd function), the layers, the classification criterion and the transform heads' cross-entropy, their
    gradients and the optimiser's step with HAT's and the gates' update terms (the clamp of the embeddings), one
    graph per task."""
    from torch._dynamo import register_backend

    graphs = []

    @register_backend(name="record_graph_test")
    def record_graph_test(gm, example_inputs):
        graphs.append([getattr(n.target, "__name__", str(n.target)) for n in gm.graph.nodes
                       if n.op in ("call_function", "call_method")])
        return gm.forward

    _, n = _train("record_graph_test", n_experiences=1, scenario="class")
    assert n == (1, 0, 0) and len(graphs) == 1
    ops = graphs[0]
    assert ops.count("cross_entropy") == 2, ops  # the criterion and the transform heads' loss
    assert "autograd_function_apply" in ops and "linear" in ops, ops
    assert "clamp_" in ops, ops  # the update's last term, after the step


def test_the_compiled_graph_is_dynamic_in_the_batch_size_alone():
    """The CNN's training graph as dynamo hands it to its backend: its input batch is (batch, 1, 8, 8) with only
    the batch size symbolic (one graph for every batch size). With the sample's dimensions symbolic too,
    inductor's CPU kernels lose their vectorised inner loops (``modnet.nets.models.static_sample_dims``)."""
    from torch._dynamo import register_backend

    inputs = []

    @register_backend(name="record_inputs_test")
    def record_inputs_test(gm, example_inputs):
        # training_loss's argument x (dynamo names a placeholder after its source, L['x'])
        inputs.extend(tuple(n.meta["example_value"].shape) for n in gm.graph.nodes
                      if n.op == "placeholder" and n.name.lower() == "l_x_")
        return gm.forward

    _, n = _train("record_inputs_test", n_experiences=1, arch="cnn")
    assert n == (1, 0, 0)
    assert len(inputs) == 1, inputs
    shape = inputs[0]
    assert len(shape) == 4 and isinstance(shape[0], torch.SymInt), shape
    assert all(type(d) is int for d in shape[1:]) and shape[1:] == (1, 8, 8), shape


@pytest.mark.slow  # inductor builds its C++ kernels: ~30 s with a cold cache, its C++ wrapper once more
def test_the_inductor_compiled_training_matches_the_eager_training_to_rounding(monkeypatch):
    """Inductor fuses and reorders float sums: the weights match the eager ones to rounding. On the CPU the one-graph
    step runs through inductor's C++ wrapper (``compiled_training_step``): the same kernels as through its Python
    wrapper, so the same weights to the bit."""
    import strategies.template as template
    from modnet.nets.models import _COMPILED

    eager, _ = _train("false", n_experiences=1)
    compiled, graphs = _train("true", n_experiences=1)
    assert graphs == (1, 0, 0)
    assert any(key[0] is template.training_step and key[3] == (("cpp_wrapper", True),) for key in _COMPILED)
    for (name, p), q in zip(eager.state_dict().items(), compiled.state_dict().values()):
        if p.is_floating_point():
            torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-4, msg=name)
        else:
            assert torch.equal(p, q), name
    monkeypatch.setattr(template, "compiled_training_step", lambda backend, device_type="cpu": template.compile_once(
        template.training_step, backend, trace_autograd=True))  # inductor's Python wrapper
    python_wrapper, graphs = _train("true", n_experiences=1)
    assert graphs == (1, 0, 0)
    for (name, p), q in zip(compiled.state_dict().items(), python_wrapper.state_dict().values()):
        assert torch.equal(p, q), name


def test_a_bad_compile_option_is_one_config_error_line(monkeypatch):
    from modnet.runner.runner import compile_backend
    from modnet.validate import validate

    with pytest.raises(ConfigError, match="train.compile must be true, false or a torch.compile backend's name"):
        compose("cl", ["train.compile=3"])
    with pytest.raises(ConfigError, match="train.channels_last must be true, false or auto"):
        compose("cl", ["train.channels_last=3"])
    with pytest.raises(ConfigError, match="not a torch.compile backend"):
        compile_backend("no_such_backend")
    monkeypatch.setattr("shutil.which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(ConfigError, match="needs a C\\+\\+ compiler"):
        validate("cl", compose("cl", ["train.compile=true"]))
    validate("cl", compose("cl", ["train.compile=aot_eager"]))  # no C++: the ops run as eager's


def test_a_backend_torch_lacks_stops_cl_before_any_strategy_trains(tmp_path, capsys):
    """train.compile names a backend only torch can list (after its import): `modnet cl` checks it before the
    first strategy, so a baseline listed before modnet does not train first; one line, nothing written."""
    from modnet.cli import main

    out = tmp_path / "o"
    assert main(["cl", "strategies=[naive,modnet]", "train.compile=no_such_backend", "train.epochs=1",
                 f"output_dir={out}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no_such_backend" in err[0] and "not a torch.compile backend" in err[0], err
    assert not out.exists()


def test_a_compiled_cl_run_says_what_its_train_seconds_compiled(tmp_path, capsys):
    """train.compile reaches modnet's step and the baselines' forwards, not hnet's own forward: each strategy says
    which at its start, and the table's note says what the "train s" column holds; an eager run says nothing."""
    from modnet.cli import main

    line = "train s: the training ran through torch.compile (eager), its compile included"
    common = ["cl", "strategies=[naive,modnet,hnet]", "train.epochs=1", "benchmark.n_experiences=2", *RUN,
              "hnet.iterations=2"]
    assert main([*common, "train.compile=eager", f"output_dir={tmp_path / 'compiled'}"]) == 0
    out = capsys.readouterr().out
    assert line + ": modnet's training step (forward, losses and update); the baselines' forwards (their losses " \
        "eager); hnet, a forward of its own, trained eager" in out  # what ran: the note names hnet only where it ran
    for name in ("naive", "modnet"):
        assert f"[{name}] train.compile=eager: each experience's first training step compiles its graph" in out
    assert "[hnet] train.compile=eager: not compiled (its own forward), it trains eager" in out
    assert main([*common, f"output_dir={tmp_path / 'eager'}"]) == 0
    assert "torch.compile" not in capsys.readouterr().out


@pytest.mark.parametrize("backend", ["false", "aot_eager"])
def test_a_plugin_s_forward_loss_term_is_added_once_eager_and_compiled(backend):
    """A user's ``ForwardLossTerm``, k * sum(head bias), changes one SGD step's head bias by exactly -lr * k
    per unit against the same step without it (its gradient is k on every bias unit, and the bias enters no
    other term's gradient differently in one step from the same start): added once, eager (by the base class's
    before_backward) and compiled (in the template's graph), not twice and not dropped."""
    from strategies.template import ForwardLossTerm

    k = 0.25

    class BiasTerm(ForwardLossTerm):
        def loss_term(self, model, x, y, condition):
            return k * model.heads[condition.task].bias.sum()

    def one_step(plugins):
        torch._dynamo.reset()
        g = torch.Generator().manual_seed(0)
        y = torch.arange(64) % 2
        x = torch.randn(64, 64, generator=g) + torch.nn.functional.one_hot(y, 64).float() * 3
        cfg = compose("cl", [*RUN, "train.batch_size=64", "train.epochs=1", f"train.compile={backend}"])
        info = split_benchmark("planted", x, y, x, y, 1, "task", 0)
        torch.manual_seed(0)
        strategy = make_strategy("modnet", cfg, info, torch.device("cpu"), EvaluationPlugin(loggers=[]),
                                 plugins=plugins)
        strategy.train(info.benchmark.train_stream[0])
        return strategy.model.heads[0].bias.detach().clone(), float(cfg.train.lr)

    without, lr = one_step([])
    with_term, _ = one_step([BiasTerm()])
    torch.testing.assert_close(with_term - without, torch.full_like(without, -lr * k), rtol=0, atol=1e-6)


def _train_baseline(name: str, compile_option, scenario: str, n_experiences: int = 2):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    g = torch.Generator().manual_seed(0)
    y = torch.arange(60 * n_experiences) % (2 * n_experiences)
    x = torch.randn(len(y), 64, generator=g) + torch.nn.functional.one_hot(y, 64).float() * 3
    cfg = compose("cl", [*RUN, "train.epochs=1", f"train.compile={compile_option}", "replay.mem_size=40"])
    info = split_benchmark("planted", x, y, x, y, n_experiences, scenario, 0)
    torch.manual_seed(0)
    strategy = make_strategy(name, cfg, info, torch.device("cpu"), EvaluationPlugin(loggers=[]))
    for exp in info.benchmark.train_stream:
        strategy.train(exp)
    return strategy.model, int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


@pytest.mark.parametrize("name,scenario", [("naive", "task"), ("naive", "class"), ("replay", "task"),
                                           ("ewc", "task"), ("lwf", "class")])
def test_a_baseline_s_traced_training_forward_trains_as_eager(name, scenario):
    """train.compile on a baseline: its training forward through dynamo and AOT autograd's graphs (``aot_eager``)
    trains to the bit as eager, task- and class-incremental, with replay's batches that mix tasks (one graph
    per head set, not per step) and EWC's and LwF's penalties (eager, on the compiled forward's output)."""
    eager, graphs = _train_baseline(name, "false", scenario)
    assert graphs == 0
    compiled, graphs = _train_baseline(name, "aot_eager", scenario)
    assert 1 <= graphs <= 4, graphs  # 2 experiences: a graph per head set (replay: task 1 alone, tasks 0 and 1)
    for (key, p), q in zip(eager.state_dict().items(), compiled.state_dict().values()):
        assert torch.equal(p, q), key
