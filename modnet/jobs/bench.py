"""``modnet bench``: what modnet costs, measured side by side in one run (MISSION.md; issue "Performance").

Training throughput (samples/s) and peak memory of three loops on the same backbone and data:
  plain    a hand-written PyTorch loop (forward, cross-entropy, backward, SGD step): the practical limit;
  naive    Avalanche's ``Naive`` strategy (its template and callbacks; batches sliced from the tensors,
           ``train.tensor_batches``; the ratio run also times it on Avalanche's own loader);
  modnet   our strategy as configured by default (configs/training.yaml): HAT masks + SynC modules +
           key-vector gates (+ the transform heads on MLPs), on Avalanche.
Each loop runs in its own spawned process so that its peak memory (CUDA: max allocated; CPU: peak RSS
above the process's baseline) is its own. The step-cost ratios come from a separate run in which all loops
(and modnet with parts switched off: HAT only, HAT + gates, no transform heads; with the sync regulariser
on; on the second task of a two-task Permuted-X, where HAT conditions the gradients; and the plain loop on as
many rows per step as modnet's default trains, its batch and the transform heads' copies) live in one process
and train one epoch each per round, the median of the per-round ratios reported. On the CPU at one thread
(``ratio_clock=auto``) a round's epochs run side by side, ``lockstep_steps`` training steps of each loop in turn,
each timed on its own thread's CPU clock: the loops' steps share the machine's state block by block, where epochs
run one after another scattered by +-15% on these shared machines (wall clock, the choice on a GPU).
Then SynC time for n = 1k..8k units (and the fitted growth exponent), NIWT step times and GZSL
evaluation throughput. Writes ``bench.json`` and ``bench.md``.
"""
from __future__ import annotations

import functools
import itertools
import math
import multiprocessing as mp
import resource
import threading
import time
from pathlib import Path

import numpy as np
import torch

from modnet.rundir import results_json
from modnet.validate import BENCH_BASELINES


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


MLP_ARCHS = ("mlp", "mlp_small")


def _mlp_shape(arch: str, options: dict) -> dict:
    shapes = options.get("mlp_shapes") or {}
    if arch not in shapes:
        raise ValueError(f"bench arch {arch!r} needs its shape under {arch}: (in_dim, hidden, n_layers) in "
                         "configs/bench.yaml")
    return dict(shapes[arch])


def _data(arch: str, n: int, n_classes: int, device, image_shape=(3, 32, 32), options: dict | None = None):
    g = torch.Generator().manual_seed(0)
    shape = (n, *image_shape) if arch in ("cnn", "resnet18") else (n, _mlp_shape(arch, options or {})["in_dim"])
    x = torch.rand(shape, generator=g)
    y = torch.arange(n) % n_classes  # every class present, however few the samples
    y = y[torch.randperm(n, generator=g)]
    return x.to(device), y.to(device)  # data moves to the device once


def _cfg(arch: str, options: dict):
    from modnet.config import compose

    overrides = ["progress=false", "model.arch=" + ("mlp" if arch in MLP_ARCHS else arch)]
    if options.get("sync_reg") is not None:  # else the training config's (modules.sync_reg)
        overrides.append(f"modules.sync_reg={options['sync_reg']}")
    if arch == "resnet18":
        overrides.append(f"model.resnet_width={options.get('resnet_width', 64)}")
    if arch in MLP_ARCHS:
        shape = _mlp_shape(arch, options)
        overrides += [f"model.hidden={shape['hidden']}", f"model.n_layers={shape['n_layers']}"]
    from strategies.memory import training_sizes

    # the baselines' memories: configs/training.yaml's sizes where cl's say match (no modnet run to match here)
    return training_sizes(compose("cl", overrides + list(options.get("overrides", []))))


class _EpochTimer:
    """Avalanche plugin: the time of every training epoch on ``clock`` (wall by default; ``time.thread_time``:
    this thread's CPU time), and ``on_step`` called after every training step (the lockstep rounds' turn)."""

    def __new__(cls, device, clock=time.perf_counter, on_step=None):
        from avalanche.core import SupervisedPlugin

        class EpochTimer(SupervisedPlugin):
            def __init__(self):
                super().__init__()
                self.times, self.samples, self._t = [], [], 0.0
                self.clock, self.on_step = clock, on_step

            def before_training_epoch(self, strategy, **kw):
                _sync(device)
                self._t = self.clock()

            def after_training_iteration(self, strategy, **kw):
                if self.on_step is not None:
                    self.on_step()

            def after_training_epoch(self, strategy, **kw):
                _sync(device)
                self.times.append(self.clock() - self._t)
                # the samples the epoch trained (Cumulative's: every task's so far)
                adapted = getattr(strategy, "adapted_dataset", None)
                self.samples.append(len(strategy.experience.dataset if adapted is None else adapted))

        return EpochTimer()


def _run_loop(kind: str, arch: str, n: int, batch: int, epochs: int, device_name: str, options: dict) -> dict:
    from modnet.runner.cpu import prepare_cpu

    prepare_cpu()  # a spawned process: before its first parallel op, for every loop alike
    torch.set_num_threads(options.get("threads", 1) or torch.get_num_threads())
    device = torch.device(device_name)
    torch.manual_seed(0)
    x, y = _data(arch, n, 10, device, tuple(options.get("image_shape", (3, 32, 32))), options)
    base_rss = _rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    amp = options.get("amp", False) and device.type == "cuda"
    channels_last = options.get("channels_last", False) and x.dim() == 4
    if kind == "plain":
        model, opt, x = _plain_setup(arch, x, options, device, channels_last)
        times = [_plain_epoch(model, opt, x, y, batch, device, amp) for _ in range(epochs)]
    else:
        times = _run_avalanche(kind, arch, x, y, batch, epochs, device, options)
    steady = times[1:] if len(times) > 1 else times
    out = {"samples_per_s": n * len(steady) / sum(steady), "epoch_seconds": steady}
    if device.type == "cuda":
        out["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        out["peak_memory_mb"] = max(_rss_mb() - base_rss, 0.0)
    return out


def _plain_setup(arch, x, options, device, channels_last):
    model = _plain_model(arch, x, options).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    return model, torch.optim.SGD(model.parameters(), lr=0.05), x


def _plain_model(arch: str, x: torch.Tensor, options: dict):
    from modnet.nets.models import CNNBackbone, MLPBackbone, ResNet18Backbone, SingleHeadNet

    if arch == "resnet18":  # the CIFAR layout modnet's HATResNet18 masks (torchvision's is ImageNet's)
        return SingleHeadNet(ResNet18Backbone(tuple(x.shape[1:]), options.get("resnet_width", 64)), 10)
    if arch == "cnn":
        return SingleHeadNet(CNNBackbone(tuple(x.shape[1:])), 10)
    shape = _mlp_shape(arch, options)
    return SingleHeadNet(MLPBackbone(x.shape[1], shape["hidden"], shape["n_layers"]), 10)


def _build_avalanche(kind, arch, x, y, batch, epochs, device, options, overrides=(), second_task: bool = False):
    """(strategy, the experience to time, its epoch timer). ``second_task``: the experience is the second of a
    two-task Permuted-X of the same data (all classes, its own pixel permutation), after one untimed epoch of
    the first: what a step costs once a task is consolidated (HAT's gradient conditioning on, the gate's
    inherited modules chosen apart), not only on the first task."""
    from avalanche.training.plugins import EvaluationPlugin

    from modnet.runner.runner import make_strategy
    from scenarios.base import permuted_benchmark, split_benchmark

    cfg = _cfg(arch, {**options, "overrides": list(options.get("overrides", [])) + list(overrides)})
    cfg.train.epochs, cfg.train.batch_size, cfg.train.eval_batch_size = epochs, batch, batch
    # Every timed experience is one epoch, which modules.settle_epochs (1) would make a settle epoch, whose gate
    # takes no gradient: the step of the last epoch of a run's train.epochs (20), not of the others. The bench
    # times the others' (until stop 41 it timed the settle step eagerly, and the gate-training step compiled,
    # which always computes the gate's gradients: the compiled loop was charged for work the eager one skipped).
    cfg.modules.settle_epochs = 0
    # the same speed options as the plain loop (bf16 autocast on CUDA, channels_last on images)
    cfg.train.amp = bool(options.get("amp", False) and device.type == "cuda")
    cfg.train.channels_last = bool(options.get("channels_last", False) and x.dim() == 4)
    # the test set is never evaluated here
    info = permuted_benchmark("bench", x, y, x, y, 2, "task", 0) if second_task else \
        split_benchmark("bench", x, y, x, y, 1, "task", 0)
    timer = _EpochTimer(device)
    strategy = make_strategy(kind, cfg, info, device, EvaluationPlugin(loggers=[]), plugins=[timer])
    if second_task:
        strategy.train(info.benchmark.train_stream[0])
    return strategy, info.benchmark.train_stream[int(second_task)], timer


def _run_avalanche(kind, arch, x, y, batch, epochs, device, options) -> list[float]:
    from modnet.runner.runner import run_experiences

    strategy, exp, timer = _build_avalanche(kind, arch, x, y, batch, epochs, device, options)
    run_experiences(strategy, [exp], lambda index, strategy: [], seed=0)  # timed training only, no evaluation
    return timer.times


# The loops of the same-process comparison: name -> (strategy, config overrides). naive and modnet feed
# batches sliced from the tensors (train.tensor_batches); the "(Avalanche loader)" loops are the same strategies
# on Avalanche's per-sample loaders, the cost that data path removes.
RATIO_LOOPS = {
    "plain": ("plain", ()),
    "naive": ("naive", ()),
    "naive (Avalanche loader)": ("naive", ("train.tensor_batches=false",)),
    "modnet (Avalanche loader)": ("modnet", ("train.tensor_batches=false",)),
    "modnet (HAT only)": ("modnet", ("model.gate=none", "model.modules=none", "modules.sync_reg=0",
                                     "model.transform_heads=never")),
    "modnet (HAT + gates)": ("modnet", ("modules.sync_reg=0", "model.transform_heads=never")),
    # + the sync regulariser where the bench's config has one (bench.sync_reg; the training default is off)
    "modnet (no transform heads)": ("modnet", ("model.transform_heads=never",)),
    # the default: the transform heads (model.transform_heads, on MLPs by default) add the batch's transformed
    # copies to the training pass (task_inference.transform_rows of its rows, one copy each)
    "modnet": ("modnet", ()),
    # the default on the second task of a two-task Permuted-X of the same data, after one epoch of the first
    # (_build_avalanche's second_task): HAT's gradient conditioning and the gate's inherited modules at work
    "modnet (second task)": ("modnet_second_task", ()),
    # the sync regulariser (seed 000's "Sync in mini-batch") at the weight this bench timed by default until stop 24
    "modnet + sync regulariser": ("modnet", ("modules.sync_reg=0.01",)),
    # the plain loop on as many rows per step as modnet's default trains (its batch and the transform heads'
    # copies, counted at its first masked layer in the warm-up epoch): modnet / this is the method's cost per
    # row, the rest of modnet / plain is the heads' extra arithmetic
    "plain (modnet's rows)": ("plain_rows", ()),
    # the default with its training pass through torch.compile (train.compile; bench.compile adds this loop): its
    # warm-up epoch holds the compile, reported as compile seconds and the steps after which it pays back
    "modnet (compiled)": ("modnet", ("train.compile=true",)),
    # Avalanche's Naive with its training forward through torch.compile (train.compile on a baseline)
    "naive (compiled)": ("naive", ("train.compile=true",)),
    # the plain loop's model through torch.compile (inductor), the reference a compiled modnet meets
    "plain (compiled)": ("plain_compiled", ()),
}
# the baselines on the second task of the two-task Permuted-X (as "modnet (second task)"): their penalties,
# memories and distillation at work (on a first task most are naive). The bench's ``baselines`` picks them;
# "naive (second task)" is their reference.
SECOND_TASK = "_second_task"
RATIO_LOOPS.update({f"{name} (second task)": (name + SECOND_TASK, ()) for name in BENCH_BASELINES})
SECOND_TASK_REFERENCE = "naive (second task)"  # the baselines' column of the ratio table
COMPILED_LOOP, PLAIN_COMPILED_LOOP = "modnet (compiled)", "plain (compiled)"
COMPILED_LOOPS = (COMPILED_LOOP, "naive (compiled)", PLAIN_COMPILED_LOOP)


def _plain_epoch(model, opt, x, y, batch, device, amp, rows_per_step: int | None = None, clock=time.perf_counter,
                 on_step=None):
    """One epoch of the plain loop, its time on ``clock``; ``rows_per_step`` > batch: each step also trains on
    the first rows_per_step - batch rows of its batch again (the same arithmetic as a batch grown by copies);
    ``on_step`` is called after every step."""
    _sync(device)
    t0 = clock()
    n = x.shape[0]
    perm = torch.randperm(n, device=device)
    extra = max((rows_per_step or batch) - batch, 0)
    for i in range(0, n, batch):
        idx = perm[i:i + batch]
        if extra:
            idx = torch.cat([idx, idx[:extra]])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if on_step is not None:
            on_step()
    _sync(device)
    return clock() - t0


def _interleaved_epochs(arch: str, n: int, batch: int, rounds: int, device_name: str, options: dict,
                        loops: dict) -> tuple[dict[str, list[float]], int | None, dict[str, float],
                                              dict[str, list[int]]]:
    """Every loop in this one process, one training epoch each per round; returns each loop's epoch times after
    one warm-up epoch (gate creation, allocator warm-up, compile), the rows per step modnet's default trained on
    in its warm-up (None without the "modnet" loop), each loop's warm-up epoch time (wall), and the minor page
    faults of each loop's epochs (its own thread's; lockstep rounds on Linux only, else empty).

    ``options["ratio_clock"]``: ``wall`` runs the loops' epochs one after another (order rotated every round),
    timed on the wall clock (with a device sync); ``thread_cpu`` (the CPU on one thread) runs each round's
    epochs side by side in lockstep, ``options["lockstep_steps"]`` training steps of each loop in turn
    (``_lockstep_round``), each epoch timed on its own thread's CPU clock: a step's cost is compared with the
    other loops' steps of the same moment, not with their epochs seconds apart, and time the process is not
    running is not counted."""
    from modnet.runner.cpu import prepare_cpu

    prepare_cpu()  # a spawned process: before its first parallel op, for every loop alike
    torch.set_num_threads(options.get("threads", 1) or torch.get_num_threads())
    device = torch.device(device_name)
    clock = ratio_clock(options.get("ratio_clock", "wall"), device, torch.get_num_threads())
    if clock == "thread_cpu":  # the loops' threads allocate as a job's main thread does
        from modnet.runner.cpu import one_malloc_arena

        one_malloc_arena()
    torch.manual_seed(0)
    x, y = _data(arch, n, 10, device, tuple(options.get("image_shape", (3, 32, 32))), options)
    amp = options.get("amp", False) and device.type == "cuda"
    channels_last = options.get("channels_last", False) and x.dim() == 4
    run, warmup, builders, fresh = {}, {}, {}, []
    rows_per_step = None
    for name, (kind, overrides) in loops.items():
        if kind in ("plain", "plain_rows", "plain_compiled"):
            if kind == "plain_rows" and "modnet" not in loops:
                raise ValueError("the bench loop 'plain (modnet's rows)' needs the 'modnet' loop beside it")
            model, opt, xp = _plain_setup(arch, x, options, device, channels_last)
            if kind == "plain_compiled":
                model = torch.compile(model)
            # rows_per_step is read when the epoch runs: it is counted in modnet's warm-up below
            run[name] = (lambda clock=time.perf_counter, on_step=None, model=model, opt=opt, xp=xp,
                         matched=kind == "plain_rows":
                         _plain_epoch(model, opt, xp, y, batch, device, amp, rows_per_step if matched else None,
                                      clock, on_step))
        else:
            second = kind.endswith(SECOND_TASK)
            builders[name] = functools.partial(_build_avalanche, kind.removesuffix(SECOND_TASK), arch, x, y, batch,
                                               1, device, options, overrides, second_task=second)
            if second and kind != "modnet" + SECOND_TASK:
                # a baseline's state grows with every experience it trains (EWC's penalties, GEM's memories and
                # constraints, Cumulative's data): each round times it anew after one first task
                fresh.append(name)
            strategy, exp, timer = builders[name]()
            run[name] = one_epoch = _strategy_epoch(strategy, exp, timer)
            if name == "modnet":  # its warm-up epoch, counting the rows its first masked layer trains on
                rows = []  # (forwards with a gradient: not the gate's clustering pass, which runs without)
                hook = strategy.model.masked[0].register_forward_pre_hook(
                    lambda m, a: rows.append(a[0].shape[0]) if torch.is_grad_enabled() else None)
                warmup[name] = _timed(one_epoch, device)
                hook.remove()
                rows_per_step = round(sum(rows) / -(-n // batch))
    for name, f in run.items():
        if name != "modnet":  # modnet warmed up above
            warmup[name] = _timed(f, device)
    names = list(run)
    times: dict[str, list[float]] = {k: [] for k in names}
    faults: dict[str, list[int]] = {}
    for r in range(rounds):
        for name in fresh:  # built outside the round: not timed
            run[name] = _strategy_epoch(*builders[name]())
        order = names[r % len(names):] + names[:r % len(names)]
        if clock == "thread_cpu":
            seconds, round_faults = _lockstep_round(run, order, options.get("lockstep_steps", 1))
            for k in names:
                times[k].append(seconds[k])
                if k in round_faults:
                    faults.setdefault(k, []).append(round_faults[k])
        else:
            for k in order:
                times[k].append(run[k]())
    # the samples an epoch trained, where not the bench's n (the ratios compare steps: epoch time x n / samples)
    samples = {k: getattr(run[k], "samples", n) for k in names}
    return times, rows_per_step, {k: warmup[k] for k in names}, faults, {k: v for k, v in samples.items() if v != n}


def _strategy_epoch(strategy, exp, timer):
    """A loop's epoch: ``strategy`` trains ``exp`` once, ``timer`` (its _EpochTimer) times the epoch on ``clock``
    and calls ``on_step`` after each step; ``one_epoch.samples`` holds the samples the epoch trained (Cumulative's
    second task: both tasks')."""
    def one_epoch(clock=time.perf_counter, on_step=None) -> float:
        timer.clock, timer.on_step = clock, on_step
        strategy.train(exp)
        one_epoch.samples = timer.samples[-1]
        return timer.times[-1]
    return one_epoch


class _Turns:
    """One turn handed round the loops in a fixed order; a loop that has finished its epoch leaves the round."""

    def __init__(self, order: list[str]):
        self._order = list(order)
        self._events = {k: threading.Event() for k in order}
        self._lock = threading.Lock()

    def start(self) -> None:
        self._events[self._order[0]].set()

    def wait(self, name: str) -> None:
        self._events[name].wait()

    def pass_on(self, name: str) -> None:
        """After a step of ``name``: the turn to the next loop, and back here when the round comes back."""
        with self._lock:
            nxt = self._order[(self._order.index(name) + 1) % len(self._order)]
            if nxt == name:  # the last loop still training keeps the turn
                return
            self._events[name].clear()
            self._events[nxt].set()
        self._events[name].wait()

    def leave(self, name: str) -> None:
        with self._lock:
            if name not in self._order:
                return
            nxt = self._order[(self._order.index(name) + 1) % len(self._order)]
            self._order.remove(name)
            self._events[name].clear()
            if nxt != name:
                self._events[nxt].set()


def _lockstep_round(run: dict, order: list[str], steps_per_turn: int = 1) -> tuple[dict[str, float], dict[str, int]]:
    """One epoch of each loop of ``run`` ({name: epoch(clock, on_step) -> seconds}), side by side: every loop in
    a thread of its own that holds the one turn for ``steps_per_turn`` training steps, then hands it to the next
    loop in ``order`` (so no two steps overlap, and a loop's steps alternate with the others' through the epoch).
    One step per turn starts every step on caches the other loops' steps have just filled: measured (stop 37,
    Split-MNIST MLP, 5 rounds) it adds 15% to the plain loop's step and 28% to modnet's, whose step touches more
    memory (masks, gates, heads); from 8 steps a turn the ratios equal those of whole epochs in turn (wall clock,
    quiet machine) to 0.003, the cost a training run, whose steps follow each other, pays.
    Returns each loop's epoch time on its own thread's CPU clock (``time.thread_time``: its forward, backward
    and callbacks, including the kernel's time for its page faults; not the other loops' steps, nor the time the
    process waits for the machine), and the minor page faults its thread took in the epoch (Linux; else {}).
    For the CPU on one torch thread, where the thread does all the step's work."""
    turns = _Turns(order)
    threads_n = torch.get_num_threads()
    out: dict[str, float] = {}
    faults: dict[str, int] = {}
    errors: list[BaseException] = []
    per_thread = getattr(resource, "RUSAGE_THREAD", None)  # Linux

    def loop(name: str) -> None:
        try:
            torch.set_num_threads(threads_n)
            turns.wait(name)
            before = resource.getrusage(per_thread).ru_minflt if per_thread is not None else 0
            steps = itertools.count(1)
            out[name] = run[name](time.thread_time,
                                  lambda: None if next(steps) % steps_per_turn else turns.pass_on(name))
            if per_thread is not None:
                faults[name] = resource.getrusage(per_thread).ru_minflt - before
        except BaseException as e:  # raised below, in the calling thread, once every loop has stopped
            errors.append(e)
        finally:
            turns.leave(name)

    workers = [threading.Thread(target=loop, args=(k,), name=f"bench loop {k}") for k in order]
    for w in workers:
        w.start()
    turns.start()
    for w in workers:
        w.join()
    if errors:
        raise errors[0]
    return out, faults


def _timed(fn, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def compile_payback(times: dict[str, list[float]], warmup: dict[str, float], steps_per_epoch: int) -> dict:
    """What ``train.compile`` costs and saves, from the same-process loops "modnet" and "modnet (compiled)":
    the compile seconds (the compiled loop's warm-up epoch beyond its median epoch, less the same excess of the
    eager loop's warm-up: gate creation, allocator), the seconds saved per step (median epochs), and the
    training steps after which the compile has paid for itself (None: it does not, the compiled step is not
    faster). One graph per task: a run pays it once per experience."""
    eager, compiled = float(np.median(times["modnet"])), float(np.median(times[COMPILED_LOOP]))
    compile_s = (warmup[COMPILED_LOOP] - compiled) - (warmup["modnet"] - eager)
    saved = (eager - compiled) / steps_per_epoch
    out = {"compile_seconds": compile_s, "seconds_saved_per_step": saved,
           "pays_after_steps": math.ceil(max(compile_s, 0.0) / saved) if saved > 0 else None}
    if PLAIN_COMPILED_LOOP in times:  # compiled against compiled: what fusing leaves of the method's cost
        out["step_cost_vs_plain_compiled"] = step_cost_ratios(times, PLAIN_COMPILED_LOOP)[COMPILED_LOOP]["median"]
    return out


def step_cost_ratios(times: dict[str, list[float]], reference: str) -> dict[str, dict]:
    """Per loop: median and spread over rounds of (its epoch time / the reference's epoch time, same round)."""
    out = {}
    ref = np.asarray(times[reference])
    for name, t in times.items():
        r = np.asarray(t) / ref
        out[name] = {"median": float(np.median(r)), "q25": float(np.quantile(r, 0.25)),
                     "q75": float(np.quantile(r, 0.75)), "rounds": len(r)}
    return out


def _in_process(fn, *args, isolate: bool = True):
    """Run ``fn(*args)`` in a fresh spawned process (its own peak memory), return its result. ``isolate=False``
    runs it here instead: no process start (each imports torch and Avalanche again, ~10 s on these CPUs), and
    no peak memory of its own (``peak_memory_mb`` is then None)."""
    if not isolate:
        out = fn(*args)
        if isinstance(out, dict) and "peak_memory_mb" in out:
            out["peak_memory_mb"] = None  # this process's peak, not the loop's
        return out
    from modnet.imports import defer_unused_imports

    ctx = mp.get_context("spawn")
    with ctx.Pool(1, initializer=defer_unused_imports) as pool:  # the process imports as `modnet bench` does
        return pool.apply(fn, args)


def ratio_loops(kinds, options: dict) -> dict:
    """The loops of ``RATIO_LOOPS`` the ratio run times for the strategies ``kinds``: those of the kinds, the
    plain loop on modnet's rows (beside plain and modnet), modnet on a second task (beside modnet, unless
    ``options["second_task"]`` is False), the baselines ``options["baselines"]`` on a second task (naive's with
    them) and the compiled loops (``options["compile"]``); of those, only the ones named in
    ``options["loops"]`` when it is given (a GPU run leaving out the slow ones)."""
    beside = {"plain", "modnet"} <= set(kinds)  # the loops that only make sense beside plain and modnet
    chosen = options.get("loops")
    baselines = list(options.get("baselines") or [])
    second_tasks = {f"{name}{SECOND_TASK}" for name in baselines + ["naive"] * bool(baselines)}
    return {k: v for k, v in RATIO_LOOPS.items()
            if (v[0] in kinds or (v[0] in ("plain_rows", "plain_compiled") and beside) or v[0] in second_tasks
                or (v[0] == "modnet_second_task" and "modnet" in kinds and options.get("second_task", True)))
            and (k not in COMPILED_LOOPS or options.get("compile", False))
            and (chosen is None or k in chosen)}


def bench_training(arch: str, n: int, batch: int, epochs: int, device: str, options: dict,
                   kinds=("plain", "naive", "modnet"), repeats: int = 1, rounds: int = 0,
                   isolate: bool = True) -> dict:
    """Samples/s and peak memory: each loop ``repeats`` times in its own process, interleaved (plain, naive,
    modnet, plain, ...), the best run of each kept (as timeit does). Step-cost ratios: ``rounds`` rounds of
    one epoch per loop in one process (``RATIO_LOOPS``), the median per-round ratio."""
    runs: dict[str, list[dict]] = {k: [] for k in kinds}
    for _ in range(max(repeats, 1)):
        for k in kinds:
            runs[k].append(_in_process(_run_loop, k, arch, n, batch, epochs, device, options, isolate=isolate))
    res: dict = {}
    for k, rs in runs.items():
        best = max(rs, key=lambda r: r["samples_per_s"])
        res[k] = {**best, "all_samples_per_s": [r["samples_per_s"] for r in rs]}
    if "modnet" in res:
        for ref in ("naive", "plain"):
            if ref in res:
                res[f"separate_runs_time_ratio_vs_{ref}"] = res[ref]["samples_per_s"] / res["modnet"]["samples_per_s"]
    if rounds > 0:
        loops = ratio_loops(kinds, options)
        times, rows, warmup, faults, samples = _in_process(_interleaved_epochs, arch, n, batch, rounds, device,
                                                           options, loops, isolate=isolate)
        res["interleaved_epoch_seconds"] = times
        if samples:  # epochs over more (or fewer) samples than n: their times scaled to n samples for the ratios
            res["epoch_samples"], res["samples"] = samples, n
            times = {k: [t * n / samples[k] for t in v] if k in samples else v for k, v in times.items()}
        if faults:  # median minor page faults per epoch (glibc's trimmed heap showed here: modnet.runner.cpu)
            res["page_faults_per_epoch"] = {k: int(np.median(v)) for k, v in faults.items()}
        res["warmup_epoch_seconds"] = warmup
        if rows is not None:
            res["modnet_rows_per_step"] = rows
        if COMPILED_LOOP in times and "modnet" in times:
            res["compile"] = compile_payback(times, warmup, -(-n // batch))
        for ref in ("naive", "plain", SECOND_TASK_REFERENCE):
            if ref in times:
                res[f"step_cost_vs_{ref}"] = step_cost_ratios(times, ref)
                if "modnet" in times:
                    res[f"modnet_time_ratio_vs_{ref}"] = res[f"step_cost_vs_{ref}"]["modnet"]["median"]
    return res


def bench_sync(sizes=(1000, 2000, 4000, 8000), dim: int = 16, device: str = "cpu") -> dict:
    from sklearn.datasets import make_blobs

    from modnet.methods.sync import SynC

    def blobs(n):
        X, _ = make_blobs(n_samples=n, centers=8, n_features=dim, random_state=0)
        return torch.tensor(X, dtype=torch.float32, device=device)

    # one untimed fit first: a process's first CUDA kernels pay the context's and the libraries' start-up
    # (cuBLAS handles, module loading), which is not SynC's cost and would land on the first size timed
    SynC().fit(blobs(min(sizes)))
    out = {}
    for n in sizes:
        X = blobs(n)
        _sync(torch.device(device))
        t0 = time.perf_counter()
        model = SynC().fit(X)
        _sync(torch.device(device))
        out[n] = {"seconds": time.perf_counter() - t0, "iterations": int(model.n_iter_),
                  "clusters": int(model.n_clusters_)}
    ns = np.array(sorted(out))
    per_iter = np.array([out[k]["seconds"] / max(out[k]["iterations"], 1) for k in ns])
    # one size has no growth: null (JSON has no NaN)
    exponent = float(np.polyfit(np.log(ns), np.log(per_iter), 1)[0]) if len(ns) > 1 else None
    return {"sizes": {int(k): v for k, v in out.items()}, "dim": dim,
            "growth_exponent_per_iteration": exponent}


def bench_niwt_gzsl(device: str = "cpu") -> dict:
    """NIWT's three steps and GZSL scoring on the embedded digits default, timed."""
    from modnet.methods.gzsl import gzsl_evaluate, predict_scores
    from modnet.methods.niwt import KnowledgeToImportance, class_importance, fit_unseen_weights
    from scenarios.zsl import load_digits_zsl

    dev = torch.device(device)
    data = load_digits_zsl()
    seen, unseen = list(data.seen_classes), list(data.unseen_classes)
    n_classes = data.attributes.shape[0]
    x, y = data.x_train.to(dev), data.y_train.to(dev)
    torch.manual_seed(0)
    hidden = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 128), torch.nn.ReLU(),
                                 torch.nn.Linear(128, 64), torch.nn.ReLU())
    head = torch.nn.Linear(64, n_classes)
    model = torch.nn.Sequential(hidden, head).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    layer = hidden[1]
    times = {}
    t0 = time.perf_counter()
    imp = class_importance(model, layer, x, y, n_classes)
    _sync(dev)
    times["class_importance_s"] = time.perf_counter() - t0
    k = data.attributes.to(dev).float()
    t0 = time.perf_counter()
    kmap = KnowledgeToImportance(k.shape[1], imp.shape[1]).to(dev)
    kmap.fit(k[seen], imp[seen])
    _sync(dev)
    times["knowledge_map_fit_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    fit_unseen_weights(model, layer, head, x, kmap(k[unseen]).detach(), seen_columns=seen)
    _sync(dev)
    times["unseen_weights_fit_s"] = time.perf_counter() - t0
    xs, xu = data.x_test_seen.to(dev), data.x_test_unseen.to(dev)
    reps = 20
    xt = torch.cat([xs, xu]).repeat(reps, 1)
    t0 = time.perf_counter()
    scores = predict_scores(model, xt)
    _sync(dev)
    times["gzsl_scoring_samples_per_s"] = xt.shape[0] / (time.perf_counter() - t0)
    ys, yu = data.y_test_seen.to(dev).repeat(reps), data.y_test_unseen.to(dev).repeat(reps)
    seen_rows = torch.cat([torch.ones(len(xs), dtype=torch.bool), torch.zeros(len(xu), dtype=torch.bool)])
    seen_rows = seen_rows.repeat(reps).to(dev)
    t0 = time.perf_counter()
    gzsl_evaluate(scores[seen_rows], ys, scores[~seen_rows], yu, seen, unseen)
    times["gzsl_metric_samples_per_s"] = xt.shape[0] / (time.perf_counter() - t0)
    return times


def bench_niwt_features(device: str = "cpu", samples: int = 23527, dim: int = 2048, classes: int = 40,
                        attributes: int = 85, hidden: int = 1024, batch_size: int = 4096) -> dict:
    """NIWT's steps 1 and 2 at the xlsa17 scale: class importance at the hidden layer of a 2048-d feature MLP
    (AWA2: 23,527 trainval features of 40 seen classes, 85 attributes) and the knowledge -> importance map fit.
    Synthetic features (class means a random linear map of random attributes): only the time is reported."""
    from modnet.methods.niwt import KnowledgeToImportance, class_importance

    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    knowledge = torch.rand(classes, attributes, generator=g)
    y = torch.arange(samples) % classes
    x = knowledge[y] @ torch.randn(attributes, dim, generator=g) + torch.randn(samples, dim, generator=g)
    x, y, knowledge = x.to(dev), y.to(dev), knowledge.to(dev)  # data moves to the device once
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, classes))
    model = model.to(dev)
    class_importance(model, model[1], x[:batch_size], y[:batch_size], classes, batch_size)  # warm-up
    _sync(dev)
    t0 = time.perf_counter()
    imp = class_importance(model, model[1], x, y, classes, batch_size)
    _sync(dev)
    importance_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    KnowledgeToImportance(attributes, hidden).to(dev).fit(knowledge, imp)
    _sync(dev)
    return {"samples": samples, "dim": dim, "classes": classes, "hidden_units": hidden,
            "class_importance_s": importance_s, "class_importance_samples_per_s": samples / importance_s,
            "knowledge_map_fit_s": time.perf_counter() - t0}


def _device_facts(device: torch.device) -> dict:
    facts = {"torch": torch.__version__}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        facts.update(device_name=props.name, device_memory_gb=round(props.total_memory / 2**30, 1),
                     cuda=torch.version.cuda)
    else:
        import platform

        facts["device_name"] = _cpu_model() or platform.processor() or platform.machine()
    # the vector kernels torch's CPU ops ran (DEFAULT / AVX2 / AVX512): the same code's ratios differ between machines
    # (stop 33, AVX2: MLP HAT only 1.31x, against 1.20x on stop 32's faster machine, kernels not recorded), and so do
    # some bugs (nets.hat.SlicedStrideConv2d)
    facts["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    return facts


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:  # not Linux
        return None


def _markdown(res: dict) -> str:
    lines = [f"# modnet bench ({res['device']}: {res.get('device_name', '')}, {res['threads']} CPU threads, "
             f"CPU kernels {res.get('cpu_capability', '?')})", ""]
    for arch, r in res["training"].items():
        lines += [f"## training, {arch} backbone ({r['config']})", "",
                  "Separate processes (throughput and memory of each loop on its own):" if res.get("isolate", True)
                  else "One loop after another in this process (isolate=false: throughput; no memory figures):", "",
                  "| loop | samples/s | peak memory (MB) |", "|---|---|---|"]
        for kind in ("plain", "naive", "modnet"):
            if kind in r:
                memory = r[kind]["peak_memory_mb"]
                lines.append(f"| {kind} | {r[kind]['samples_per_s']:.0f} | "
                             f"{'n/a (isolate=false)' if memory is None else f'{memory:.1f}'} |")
        if "step_cost_vs_naive" in r or "step_cost_vs_plain" in r:
            refs = [ref for ref in ("naive", "plain", SECOND_TASK_REFERENCE) if f"step_cost_vs_{ref}" in r]
            rounds = next(iter(r[f"step_cost_vs_{refs[0]}"].values()))["rounds"]
            turn = res.get("lockstep_steps", 1)
            how = (f"one epoch per loop side by side, {turn} step{'s' * (turn > 1)} of each in turn, timed on each "
                   "loop's thread CPU clock" if res.get("ratio_clock") == "thread_cpu"
                   else "one epoch per loop in turn, wall clock")
            faults = r.get("page_faults_per_epoch", {})
            lines += ["", f"Step cost relative to a reference, same process, median [quartiles] over {rounds} "
                      f"rounds ({how}):", "",
                      "| loop | " + " | ".join(f"step cost / {ref}" for ref in refs)
                      + (" | page faults / epoch" if faults else "") + " |",
                      "|---|" + "---|" * (len(refs) + bool(faults))]
            for name in r[f"step_cost_vs_{refs[0]}"]:
                cells = []
                for ref in refs:
                    q = r[f"step_cost_vs_{ref}"][name]
                    cells.append(f"{q['median']:.2f}x [{q['q25']:.2f}, {q['q75']:.2f}]")
                if faults:
                    cells.append(str(faults.get(name, "")))
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
        for name, count in r.get("epoch_samples", {}).items():
            lines.append(f"\n{name}: its epoch trains {count} samples, its time is counted per {r['samples']} "
                         "(the same steps as the others)")
        for ref in ("naive", "plain"):
            key = f"modnet_time_ratio_vs_{ref}"
            if key in r:
                lines.append(f"\nmodnet step cost / {ref} step cost: **{r[key]:.2f}x**")
        if "compile" in r:
            c = r["compile"]
            pays = "never (the compiled step is not faster)" if c["pays_after_steps"] is None else \
                f"after {c['pays_after_steps']} steps"
            lines.append(f"\ntrain.compile: {c['compile_seconds']:.1f} s to compile (per task), "
                         f"{1000 * c['seconds_saved_per_step']:.3f} ms saved per step: pays {pays}")
            if "step_cost_vs_plain_compiled" in c:
                lines.append(f"\nmodnet (compiled) step cost / plain (compiled) step cost: "
                             f"{c['step_cost_vs_plain_compiled']:.2f}x")
        lines.append("")
    if "sync" in res:
        s = res["sync"]
        lines += [f"## SynC (dim {s['dim']})", "", "| units | seconds | iterations | clusters |", "|---|---|---|---|"]
        for n, v in s["sizes"].items():
            lines.append(f"| {n} | {v['seconds']:.2f} | {v['iterations']} | {v['clusters']} |")
        growth = s["growth_exponent_per_iteration"]
        lines += ["", "one size: no growth exponent" if growth is None else f"time per iteration grows as n^{growth:.2f}",
                  ""]
    if "niwt_gzsl" in res:
        lines += ["## NIWT and GZSL (digits default)", "", "| step | figure |", "|---|---|"]
        lines += [f"| {k} | {v:.3g} |" for k, v in res["niwt_gzsl"].items()]
    if "niwt_features" in res:
        f = res["niwt_features"]
        lines += ["", f"## NIWT at the xlsa17 scale ({f['samples']} x {f['dim']} features, {f['classes']} classes, "
                  f"{f['hidden_units']} hidden units)", "", "| step | figure |", "|---|---|"]
        lines += [f"| {k} | {f[k]:.3g} |" for k in ("class_importance_s", "class_importance_samples_per_s",
                                                   "knowledge_map_fit_s")]
    return "\n".join(lines) + "\n"


def ratio_clock(setting: str, device: torch.device, threads: int) -> str:
    """The clock of the step-cost ratios: ``auto`` = ``thread_cpu`` (lockstep rounds, each loop's thread CPU
    time) on the CPU with one torch thread, where a step is all one thread's work, else ``wall``."""
    from modnet.validate import RATIO_CLOCKS

    if setting not in RATIO_CLOCKS:
        raise ValueError(f"bench ratio_clock={setting!r}: choose among {', '.join(RATIO_CLOCKS)}")
    one_cpu_thread = device.type == "cpu" and threads == 1
    if setting == "auto":
        return "thread_cpu" if one_cpu_thread else "wall"
    if setting == "thread_cpu" and not one_cpu_thread:
        raise ValueError(f"bench ratio_clock=thread_cpu times one thread's CPU, but the loops run on {device} with "
                         f"{threads} threads: set threads=1 and device=cpu, or ratio_clock=wall")
    return setting


def run_bench(cfg) -> dict:
    from modnet.config import resolve_device

    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    res = {"device": str(device), **_device_facts(device), "threads": torch.get_num_threads(), "training": {}}
    clock = ratio_clock(cfg.get("ratio_clock", "auto"), device, torch.get_num_threads())
    res["ratio_clock"] = clock
    steps_per_turn = int(cfg.get("lockstep_steps", 1))
    if clock == "thread_cpu":
        res["lockstep_steps"] = steps_per_turn
    from modnet.runner.runner import channels_last as resolve_channels_last

    res["channels_last"] = resolve_channels_last(cfg.channels_last, device)  # the image loops' layout
    opts = {"lockstep_steps": steps_per_turn, "threads": cfg.threads, "amp": cfg.amp,
            "channels_last": res["channels_last"], "compile": cfg.compile,
            "second_task": cfg.get("second_task", True), "baselines": list(cfg.get("baselines") or []),
            "loops": None if cfg.get("loops") is None else list(cfg.loops),
            "ratio_clock": clock, "sync_reg": cfg.sync_reg, "image_shape": list(cfg.image_shape),
            "mlp_shapes": {a: dict(cfg[a]) for a in MLP_ARCHS if a in cfg}, "resnet_width": cfg.resnet_width}
    res["isolate"] = bool(cfg.get("isolate", True))
    known = set(MLP_ARCHS) | {"cnn", "resnet18"}
    for arch in cfg.archs:
        if arch not in known or arch not in cfg.samples or arch not in cfg.batch_size:
            raise ValueError(f"bench arch {arch!r}: choose from {sorted(known)}, each with an entry in samples "
                             "and batch_size")
    for arch in cfg.archs:
        n, batch = cfg.samples[arch], cfg.batch_size[arch]
        print(f"[bench] training loops, {arch}, {n} samples, batch {batch} ...", flush=True)
        r = bench_training(arch, n, batch, cfg.epochs, str(device), opts,
                           kinds=("plain", "naive", "modnet"),
                           repeats=cfg.repeats, rounds=cfg.ratio_rounds, isolate=res["isolate"])
        shape = ""
        if arch in MLP_ARCHS:
            m = opts["mlp_shapes"][arch]
            shape = f"{m['in_dim']}-" + "-".join([str(m["hidden"])] * m["n_layers"]) + ", "
        else:
            shape = "channels_last maps, " if opts["channels_last"] else "contiguous maps, "
        r["config"] = (f"{shape}{n} samples, batch {batch}, {cfg.epochs} epochs (first is warm-up), "
                       f"best of {cfg.repeats} runs{' each in its own process' if res['isolate'] else ' in this process'}")
        res["training"][arch] = r
    if cfg.sync_sizes:
        print("[bench] SynC ...", flush=True)
        res["sync"] = bench_sync(tuple(cfg.sync_sizes), cfg.sync_dim, str(device))
    if cfg.niwt:
        print("[bench] NIWT and GZSL ...", flush=True)
        res["niwt_gzsl"] = bench_niwt_gzsl(str(device))
    if cfg.niwt_features.enabled:
        print("[bench] NIWT importance on xlsa17-sized features ...", flush=True)
        f = cfg.niwt_features
        res["niwt_features"] = bench_niwt_features(str(device), f.samples, f.dim, f.classes, f.attributes, f.hidden,
                                                   f.batch_size)
    (out / "bench.json").write_text(results_json(res))
    md = _markdown(res)
    (out / "bench.md").write_text(md)
    print(md)
    return res
