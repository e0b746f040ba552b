"""Data-parallel training of the ``modnet cl`` strategies with torch.distributed (DistributedDataParallel).

    torchrun --nproc_per_node=2 -m modnet.runner.distributed strategies=[modnet] train.epochs=5
    modnet ddp --nproc 2 strategies=[modnet] train.epochs=5          (starts torchrun itself)

One process per GPU (backend nccl) or per CPU worker (gloo). PyTorch does the communication, Avalanche the
continual-learning loop; this module only changes how a strategy feeds and differentiates its model:

- ``train.batch_size`` is the GLOBAL batch. Each of the W ranks draws ``batch_size / W`` samples per step
  from its ``DistributedSampler`` shard of the experience, so W ranks take the same steps, on the same
  global batches, as one process with the same sampler (``world_size=1``) does, except where a row's position
  in the batch matters: the transform heads' ``copies=replace`` transforms row i mod K of each rank's share
  (interleaved from the global batch), so other samples are transformed than in one process, the same share
  of each transform (``model.transform_heads=never``: step-identical). With ``train.tensor_batches``
  (tensor-backed experiences) the shard is the same, sliced from the tensors
  (``modnet.runner.tensor_batches.sharded_loader``). Plugins that read the batch
  size to go over unsharded data (EWC's Fisher, GEM's memory) still see the global one.
- The strategy's ``model`` stays the plain module: plugins read it (masks, gates, heads) and the
  condition of its forward lives on the strategy. Gradients are averaged over the ranks at the end of the
  backward, before ``after_backward``, so every plugin hook that edits gradients (HAT's conditioning
  1 - min(a_i, a_j), embedding compensation and clipping; SI's path integral; GEM's projection) sees the
  same averaged gradient on every rank: the gradient of the global batch. Two ways (``GRADIENT_SYNC``):
  ``ddp``: the training forward goes through a ``DistributedDataParallel`` wrapper, rebuilt at every
  experience (multi-head models grow; DDP broadcasts rank 0's parameters when built), whose backward hooks
  all-reduce gradient buckets while the backward still runs. Losses added to the forward's loss (HAT's
  capacity regulariser) are part of the same backward, so their gradients are averaged too.
  ``allreduce``: one flat all-reduce of ``.grad`` after ``backward()``, for strategies whose plugins
  backpropagate through parameters the DDP forward did not use (EWC/SI/LwF penalties on old heads, GEM's
  memory gradients, the hypernetwork regulariser): DDP's reducer counts each parameter once per backward
  and fails on those.
- Evaluation runs the whole test stream on every rank (unsharded: no padding duplicates, no metric
  reduction needed). Rank 0 writes the results folder (``modnet.eval.results``).
- After every experience the ranks' parameters are compared; a divergence stops the run with an error.
"""
from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

from modnet.config import ConfigError, check_choice, compose, run_as_script
from modnet.validate import check_ddp_config, precheck_ddp, split_nproc, with_default_ddp_output

# How the ranks of each strategy agree on a gradient (see the module docstring) is declared with the strategy
# in its registry file (``register_strategy(..., gradient_sync=...)``); every strategy that declares one keeps
# the ranks' parameters identical (test_scaleout; checked by max_param_divergence after every experience).


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: its rank among ``world_size`` processes, its device and backend."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # None: a single process, no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _device_for(name: str, local_rank: int, world_size: int) -> torch.device:
    if name == "cpu":
        return torch.device("cpu")
    if name in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device={name} but no CUDA device is available; use device=auto or device=cpu")
        if world_size > 1:
            raise ConfigError(f"device={name} would put every rank on one GPU; use device=auto or device=cuda "
                              "(rank r then uses GPU LOCAL_RANK)")
        return torch.device(name)
    return torch.device("cpu")


def init_distributed(device: str = "auto", rank: int | None = None, world_size: int | None = None,
                     init_method: str = "env://") -> DistContext:
    """Join the process group: nccl on GPU, gloo on CPU; rank and size from torchrun's environment
    (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) unless given. One process without a launcher:
    no group, ``world_size`` 1."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    dev = _device_for(device, local_rank, world_size)
    if world_size == 1 and not dist.is_initialized():
        return DistContext(0, 1, 0, dev, None)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    # Avalanche builds an InteractiveLogger at import time and refuses loggers on ranks > 0 once a group
    # exists: import it before joining.
    import avalanche.training  # noqa: F401

    if not dist.is_initialized():
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, dev, dist.get_backend())


def _rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def allreduce_gradients(params: Sequence[nn.Parameter]) -> None:
    """Average ``.grad`` over the ranks in place with one flat all-reduce (gradients and "has a gradient"
    flags in one buffer); a parameter that no rank gave a gradient keeps ``grad = None``, as in one process.

    Reading the flags is one host sync per step, the price DDP's find_unused_parameters pays too.
    """
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flags = torch.tensor([p.grad is not None for p in params], dtype=grads[0].dtype, device=grads[0].device)
    flat = torch.cat([g.reshape(-1) for g in grads] + [flags])
    dist.all_reduce(flat)
    averaged = (flat[:-len(params)] / dist.get_world_size()).split([g.numel() for g in grads])
    for p, g, used in zip(params, averaged, (flat[-len(params):] > 0).tolist()):
        if used:
            p.grad = g.view_as(p)


def _shared_seed(device: torch.device) -> int:
    """A sampler seed drawn from rank 0's generator and sent to all ranks (they must shard one permutation)."""
    seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.long).to(device)
    if dist.is_initialized():
        dist.broadcast(seed, src=0)
    return int(seed)


@functools.cache
def distributed_class(cls: type) -> type:
    """A subclass of an Avalanche SGD template's class with data-parallel training: sharded training data,
    DDP training forward, unsharded evaluation data. Works in one process too (no wrapper, same sampler).

    Built per class because the registry's strategies have many (SupervisedTemplate, Naive, EWC, ...);
    a subclass adds no instance layout, so a built strategy can switch to it (``make_distributed``).
    """

    class Distributed(cls):
        gradient_sync = "ddp"  # or "allreduce"; set per strategy by make_distributed
        _ddp: nn.Module | None = None
        _train_sampler = None

        def _before_training_exp(self, **kwargs):
            # train_mb_size is the global batch. The training loaders built here (ours, Replay's) shard the
            # data, so they get the per-rank batch; whatever reads train_mb_size later (EWC's Fisher batches,
            # GEM's memory batches, over the whole unsharded data) sees the global batch, as one process does.
            global_mb = self.train_mb_size
            self.train_mb_size = global_mb // _rank_world()[1]
            try:
                super()._before_training_exp(**kwargs)
            finally:
                self.train_mb_size = global_mb

        def make_train_dataloader(self, num_workers=0, shuffle=True, pin_memory=None, persistent_workers=False,
                                  drop_last=False, **kwargs):
            from avalanche.benchmarks.utils.data_loader import collate_from_data_or_kwargs
            from torch.utils.data import DataLoader, DistributedSampler

            from modnet.runner.tensor_batches import pin_memory_for

            rank, world = _rank_world()
            seed = _shared_seed(self.device)
            repeated = -len(self.adapted_dataset) % world
            if repeated and not drop_last and rank == 0:
                print(f"[ddp] {len(self.adapted_dataset)} training samples do not split evenly over {world} "
                      f"processes: as torch's DistributedSampler, every epoch repeats {repeated} of them in its last "
                      f"global batch (one process would not)", flush=True)
            if getattr(self, "tensor_batches", False):  # the same shards, sliced from the tensors
                from modnet.runner.tensor_batches import sharded_loader

                loader, order = sharded_loader(self.adapted_dataset, self.train_mb_size, rank, world, seed,
                                               shuffle=shuffle, drop_last=drop_last)
                if loader is not None:
                    self.dataloader, self._train_sampler = loader, order
                    return
            # Avalanche's own loaders also shard when a process group exists, but their DistributedSampler
            # keeps seed 0 and epoch 0, i.e. one fixed order for every epoch and every run seed.
            self._train_sampler = DistributedSampler(self.adapted_dataset, num_replicas=world, rank=rank,
                                                     shuffle=shuffle, seed=seed, drop_last=drop_last)
            args = dict(batch_size=self.train_mb_size, sampler=self._train_sampler, num_workers=num_workers,
                        pin_memory=pin_memory_for(self.device, self.adapted_dataset, pin_memory),
                        persistent_workers=persistent_workers and num_workers > 0, drop_last=drop_last)
            collate_from_data_or_kwargs(self.adapted_dataset, args)
            self.dataloader = DataLoader(self.adapted_dataset, **args)

        def make_eval_dataloader(self, num_workers=0, shuffle=False, pin_memory=None, persistent_workers=False,
                                 **kwargs):
            from avalanche.benchmarks.utils.data_loader import SingleDatasetDataLoader, collate_from_data_or_kwargs

            from modnet.runner.tensor_batches import pin_memory_for

            if getattr(self, "tensor_batches", False):  # unsharded, in order, sliced from the tensors
                from modnet.runner.tensor_batches import TensorBatchLoader
                from scenarios.tensors import resolve_tensors

                view = resolve_tensors(self.adapted_dataset)
                if view is not None:
                    self.dataloader = TensorBatchLoader([view], [self.eval_mb_size], shuffle=False)
                    return
            args = self._obtain_common_dataloader_parameters(
                batch_size=self.eval_mb_size, num_workers=num_workers, shuffle=False,
                pin_memory=pin_memory_for(self.device, self.adapted_dataset, pin_memory),
                persistent_workers=persistent_workers)
            collate_from_data_or_kwargs(self.adapted_dataset, args)
            self.dataloader = SingleDatasetDataLoader(self.adapted_dataset, distributed_sampling=False, **args)

        def check_model_and_optimizer(self, **kwargs):
            super().check_model_and_optimizer(**kwargs)  # heads grow here: wrap afterwards
            self._ddp = None
            if self.gradient_sync == "ddp" and dist.is_initialized() and dist.get_world_size() > 1:
                from torch.nn.parallel import DistributedDataParallel

                from modnet.nets.models import reaches_every_parameter

                # find_unused_parameters: the heads of other tasks get no gradient in a multi-head model. Where
                # every step reaches every parameter (a single head; a multi-head model's first experience) the
                # flag is off: its search of the graph each step is wasted there, and DDP warns about it
                self._ddp = DistributedDataParallel(
                    self.model, device_ids=[self.device] if self.device.type == "cuda" else None,
                    find_unused_parameters=not reaches_every_parameter(
                        self.model, getattr(self.experience, "task_labels", ())))

        def _before_training_epoch(self, **kwargs):
            if self._train_sampler is not None:
                self._train_sampler.set_epoch(self.clock.train_exp_epochs)  # a new shuffle every epoch
            super()._before_training_epoch(**kwargs)

        def forward(self):
            if not (self.is_training and self._ddp is not None):
                return super().forward()
            from avalanche.models.utils import avalanche_forward

            if hasattr(self, "forward_through"):  # a model that takes its condition (ConditionedTemplate)
                return self.forward_through(self._ddp)
            if hasattr(self.experience, "task_labels"):
                return avalanche_forward(self._ddp, self.mb_x, self.mb_task_id)
            return self._ddp(self.mb_x)

        def backward(self):
            super().backward()
            if self.gradient_sync == "allreduce" and dist.is_initialized() and dist.get_world_size() > 1:
                allreduce_gradients([p for p in self.model.parameters() if p.requires_grad])

        def _after_training_exp(self, **kwargs):
            super()._after_training_exp(**kwargs)
            self._ddp = None  # drops the reducer and its autograd hooks before the next experience re-wraps

    Distributed.__name__ = Distributed.__qualname__ = f"Distributed{cls.__name__}"
    return Distributed


def make_distributed(strategy, gradient_sync: str = "ddp"):
    """Switch a built strategy to its data-parallel class (``distributed_class``); returns it."""
    if gradient_sync not in ("ddp", "allreduce"):
        raise ValueError(f"gradient_sync must be 'ddp' or 'allreduce', got {gradient_sync!r}")
    strategy.__class__ = distributed_class(type(strategy))
    strategy.gradient_sync = gradient_sync
    for plugin in strategy.plugins:
        plugin.supports_distributed = True  # silences Avalanche's check: DDP_STRATEGIES are verified
    return strategy


@torch.no_grad()
def max_param_divergence(model: nn.Module) -> float:
    """max over ranks and parameters of |theta_rank - theta_rank0| (0.0 in a single process)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return 0.0
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    ref = flat.clone()
    dist.broadcast(ref, src=0)
    diff = (flat - ref).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return float(diff)


class _SameParameters:
    """Runner hook: after each experience the ranks' parameters must be equal."""

    def __init__(self, name: str):
        self.name = name

    def after_training_exp(self, index, strategy):
        drift = max_param_divergence(strategy.model)
        if drift > 1e-6:
            raise RuntimeError(f"{self.name}: ranks' parameters diverged by {drift:.3g} after experience {index}; "
                               "a plugin edits gradients or parameters from rank-local data")

    def after_eval_exp(self, index, strategy, row):
        pass


def train_strategy(name: str, cfg, info, seed: int, ctx: DistContext) -> tuple[dict, nn.Module]:
    """One strategy over all experiences on this rank: (accuracy matrix and metrics, trained model)."""
    from modnet.eval.metrics import build_evaluator, close_loggers
    from modnet.runner.evaluation import stream_evaluator
    from modnet.eval.metrics import shows_progress_bars
    from modnet.runner.runner import ExperienceLine, make_strategy, run_experiences, set_seed, strategy_result
    from strategies.registry import get_strategy

    set_seed(seed)  # the same seed on every rank: identical initial models (DDP also broadcasts rank 0's)
    # Loggers on rank 0 only: the ranks evaluate the same data, and Avalanche refuses loggers elsewhere.
    evaluator, accuracy = build_evaluator(cfg.loggers if ctx.is_main else [],
                                          Path(cfg.output_dir) / "logs" / f"{name}_seed{seed}", cfg.progress)
    strategy = make_strategy(name, cfg, info, ctx.device, evaluator)
    sync = get_strategy(name).gradient_sync
    make_distributed(strategy, sync(strategy) if callable(sync) else sync)
    bm = info.benchmark
    hooks = [_SameParameters(name)]
    if ctx.is_main and not (shows_progress_bars(cfg.progress) and "interactive" in cfg.loggers):
        hooks.append(ExperienceLine(f"[{name} seed {seed}]", info.n_experiences))  # a line per experience, as cl
    record = run_experiences(strategy, bm.train_stream, stream_evaluator(bm.test_stream, accuracy),
                             seed=seed, hooks=hooks)
    close_loggers(evaluator)
    return strategy_result(name, strategy, info, record), strategy.model


def run_ddp(cfg, ctx: DistContext | None = None) -> dict:
    """``modnet cl`` on every rank, data-parallel; rank 0 writes ``cfg.output_dir``. Returns the results."""
    from omegaconf import OmegaConf

    from modnet.eval.results import aggregate_seeds, format_table, write_results
    from modnet.eval.tables import SEED_STD_DDOF, seeds_note
    from modnet.runner.cpu import prepare_cpu
    from scenarios import build_benchmark
    from scenarios.base import SCENARIOS
    from strategies.memory import run_order, with_matched_memory

    prepare_cpu()  # every rank, before its first parallel op (torch's threads inherit the mode)
    ctx = ctx or init_distributed(cfg.device)
    check_choice("scenario", cfg.scenario, SCENARIOS)
    check_ddp_config(cfg, ctx.world_size)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    seeds = list(cfg.seeds) if cfg.get("seeds") else [cfg.seed]
    runs: dict[str, list[dict]] = {name: [] for name in cfg.strategies}
    info = None
    order = run_order(cfg)  # modnet first when a buffer is sized to its stored bytes (mem_size=match)
    for seed in seeds:
        info = _build_main_first(build_benchmark, cfg, seed, ctx)
        for name in order:
            if ctx.is_main:
                print(f"=== {name} | {info.name} | {cfg.scenario}-incremental | seed {seed} | "
                      f"{ctx.world_size} x {ctx.backend or 'single'} on {ctx.device} ===")
            modnet_bytes = runs["modnet"][-1]["stored_bytes"] if "modnet" in runs and runs["modnet"] else None
            matched = with_matched_memory(cfg, name, info, modnet_bytes, verbose=ctx.is_main)
            runs[name].append(train_strategy(name, matched, info, seed, ctx)[0])
    results = {"benchmark": info.name, "scenario": cfg.scenario, "n_experiences": info.n_experiences,
               "seed": seeds[0], "seeds": seeds, "std_ddof": SEED_STD_DDOF, "device": str(ctx.device),
               "world_size": ctx.world_size,
               "backend": ctx.backend, "per_rank_batch_size": cfg.train.batch_size // ctx.world_size,
               "classes_per_experience": info.global_task_classes,
               "strategies": {name: aggregate_seeds(r) for name, r in runs.items()}}
    if ctx.is_main:
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        write_results(out, results)
        print(f"\n{info.name}, {cfg.scenario}-incremental, seeds {seeds}, {ctx.world_size} processes\n"
              f"{format_table(results['strategies'])}\n"
              + (f"{seeds_note(len(seeds))}\n" if len(seeds) > 1 else "") + f"results written to {out}/results.json")
    if dist.is_initialized():
        dist.barrier()  # nobody leaves (and tears the group down) before rank 0 has written
    return results


def _build_main_first(build_benchmark, cfg, seed, ctx: DistContext):
    """Rank 0 builds (and, with benchmark.download=true, downloads) first; the others then read the files."""
    if dist.is_initialized() and not ctx.is_main:
        dist.barrier()
    info = build_benchmark(cfg.benchmark, cfg.scenario, seed,
                           device=ctx.device if cfg.train.data_on_device else None)
    if dist.is_initialized() and ctx.is_main:
        dist.barrier()
    return info


def main(argv: list[str] | None = None, prechecked: tuple | None = None) -> int:
    """Under torchrun: one rank of the run. Otherwise (``modnet ddp [--nproc N] overrides``): check the
    config, lock ``output_dir`` and record the run's fingerprint there (``modnet.rundir``), then start
    torchrun with N processes (default: one per GPU, or 2 on CPU). A run started by hand with torchrun is not
    locked. ``prechecked``: what ``modnet.validate.precheck_ddp(argv)`` returned (``modnet.cli`` runs it before
    this module's import), so that the launcher does not compose and check the config twice."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print("usage: modnet ddp [--nproc N] [key=value ...]   (the keys of `modnet cl`)\n" + (__doc__ or ""))
        return 0
    if "LOCAL_RANK" in os.environ:  # started by torchrun
        from modnet.imports import defer_unused_imports

        defer_unused_imports()  # a rank's process is the command's, as `modnet cl`'s
        cfg = compose("cl", with_default_ddp_output(split_nproc(argv)[1]))
        ctx = init_distributed(cfg.device)
        try:
            run_ddp(cfg, ctx)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        return 0
    # the launcher checks what `modnet cl` checks and the data-parallel settings, before torchrun starts any process
    nproc, overrides, cfg = precheck_ddp(argv) if prechecked is None else prechecked
    if nproc is None:  # the default count, then the batch against it
        nproc = torch.cuda.device_count() if cfg.device != "cpu" and torch.cuda.is_available() else 2
        check_ddp_config(cfg, nproc)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    from modnet.rundir import RunLock, check_fresh_start, check_output_dir, fingerprint, write_fingerprint

    out = Path(cfg.output_dir)
    check_output_dir(out)
    # the folder is held for the whole run, as `modnet cl` holds it: a second run into it stops at once
    with RunLock(out):
        current = fingerprint(cfg)
        # rank 0 writes results.json there: another run's (a cl run's, or a ddp run of other settings) is kept
        check_fresh_start(out, current, "ddp")
        write_fingerprint(out, current)
        try:
            torchrun(["--standalone", f"--nproc-per-node={nproc}", "-m", "modnet.runner.distributed", *overrides])
        except ChildFailedError as err:  # the ranks' tracebacks are already on stderr
            print(f"modnet ddp: {len(err.failures)} of {nproc} processes failed (see their errors above)",
                  file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    run_as_script(main, "modnet ddp")
