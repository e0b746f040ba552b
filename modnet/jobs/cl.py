"""``modnet cl``: every configured strategy on one benchmark, in one process, with checkpoints and results.

Flow: scenario (``scenarios.build_benchmark``) -> model + strategy (``strategies.registry``) -> evaluation
on the test stream after every experience (``modnet.eval.metrics``: accuracy matrix, Avalanche metrics,
``loggers``) -> results folder (``modnet.eval.results``).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from modnet.config import check_choice, resolve_device
from modnet.eval.metrics import build_evaluator, check_loggers, close_loggers
from modnet.eval.results import aggregate_seeds, format_table, summarize, write_results
from modnet.runner.guards import NaNGuard
from scenarios import build_benchmark
from scenarios.base import SCENARIOS

# Strategies whose whole state is the model's state dict (plain SGD, modnet without module gates): they
# resume at the next experience.
# The others keep state in plugins (buffers, old models, importances) and re-run from their first
# experience; per-experience seeding makes both give the same final numbers as an uninterrupted run.
_RESUME_AT_EXPERIENCE = ("modnet", "naive")


def set_seed(seed: int) -> None:
    from avalanche.training.determinism.rng_manager import RNGManager

    RNGManager.set_random_seeds(seed)  # python, numpy and torch generators, as Avalanche's loaders use them


def run_strategy(name: str, cfg, info, seed: int, device, ckpt_path: Path) -> dict:
    """Train ``name`` over the experiences; evaluate on the whole test stream after each one."""
    from avalanche.models.dynamic_modules import avalanche_model_adaptation

    from strategies.registry import build_strategy

    state = torch.load(ckpt_path, weights_only=True) if cfg.resume and ckpt_path.exists() else None
    if state is not None and state.get("done"):
        print(f"[{name} seed {seed}] finished earlier: results taken from {ckpt_path}")
        return json.loads(state["result"])
    set_seed(seed)
    evaluator, accuracy = build_evaluator(cfg.loggers, ckpt_path.parent.parent / "logs" / f"{name}_seed{seed}",
                                          cfg.progress)
    common = dict(criterion=torch.nn.CrossEntropyLoss(), train_mb_size=cfg.train.batch_size,
                  train_epochs=cfg.train.epochs, eval_mb_size=cfg.train.eval_batch_size, device=device,
                  evaluator=evaluator, eval_every=-1)
    strategy = build_strategy(name, cfg, info, common)
    strategy.plugins.append(NaNGuard())
    if cfg.train.amp:
        from strategies.perf import AutocastPlugin

        strategy.plugins.append(AutocastPlugin(device.type))
    if cfg.train.channels_last and info.is_image:
        from strategies.perf import ChannelsLastPlugin

        strategy.plugins.append(ChannelsLastPlugin())
    bm = info.benchmark
    rows, seconds, start = [], 0.0, 0
    # Gates are created per task from a clustering of the data: their shapes live in the run, not the config.
    gated = getattr(strategy.model, "gate", None) is not None
    if state is not None and name in _RESUME_AT_EXPERIENCE and cfg.train.momentum == 0 and not gated:
        start = int(state["next_exp"])
        # Grow dynamic heads to the checkpoint's shape: training adapted the model to the experiences
        # trained so far, evaluation to the whole test stream.
        strategy.model.train()
        for exp in list(bm.train_stream)[:start]:
            avalanche_model_adaptation(strategy.model, exp)
        strategy.model.eval()
        for exp in bm.test_stream:
            avalanche_model_adaptation(strategy.model, exp)
        strategy.model.load_state_dict(state["model"])
        rows, seconds = [list(r) for r in state["rows"].tolist()], float(state["train_seconds"])
        print(f"[{name} seed {seed}] resumed from {ckpt_path} at experience {start}")
    elif state is not None:
        print(f"[{name} seed {seed}] keeps state in plugins: re-running it from its first experience")
    n = info.n_experiences
    out_dir = ckpt_path.parent.parent
    from modnet.methods.drift import plot_drift, snapshot

    first = None  # hidden representation of experience 0 right after training it (only seen without resume)
    if start == 0:
        probe_ds = bm.test_stream[0].dataset
        probe = torch.stack([probe_ds[i][0] for i in range(min(256, len(probe_ds)))]).to(device)
    for i, exp in enumerate(bm.train_stream):
        if i < start:
            continue
        set_seed(seed * 1000 + i)
        t0 = time.perf_counter()
        strategy.train(exp)
        seconds += time.perf_counter() - t0
        if i == 0:
            first = snapshot(strategy.model, probe)
        strategy.eval(bm.test_stream)
        rows.append(accuracy.matrix()[-1])
        torch.save({"next_exp": i + 1, "model": strategy.model.state_dict(), "rows": torch.tensor(rows),
                    "train_seconds": seconds, "done": False}, ckpt_path)
    close_loggers(evaluator)
    result = {**summarize(rows), "train_seconds": seconds}
    if first is not None and n > 1:
        last = snapshot(strategy.model, probe)
        result["first_experience_cka"] = plot_drift(first, last, out_dir / f"cka_{name}_seed{seed}.png", name)
    if getattr(strategy.model, "gate", None) is not None:
        from modnet.explain.module_plots import write_module_report

        report = write_module_report(strategy.model, bm.test_stream, out_dir / f"modules_seed{seed}")
        result["modules"] = {"folder": f"modules_seed{seed}", "sizes": report["module_sizes"]}
    torch.save({"done": True, "result": json.dumps(result)}, ckpt_path)
    return result


def run_cl(cfg) -> dict:
    from strategies.registry import ARCHS, STRATEGIES

    check_choice("scenario", cfg.scenario, SCENARIOS)
    check_choice("model.arch", cfg.model.arch, ARCHS)
    check_loggers(cfg.loggers)
    for name in cfg.strategies:
        check_choice("strategies", name, list(STRATEGIES))
    device = resolve_device(cfg.device)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    out = Path(cfg.output_dir)
    ckpt_dir = out / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    seeds = list(cfg.seeds) if cfg.get("seeds") else [cfg.seed]
    runs: dict[str, list[dict]] = {name: [] for name in cfg.strategies}
    info = None
    for seed in seeds:
        info = build_benchmark(cfg.benchmark, cfg.scenario, seed,
                               device=device if cfg.train.data_on_device else None)
        for name in cfg.strategies:
            print(f"=== {name} | {info.name} | {cfg.scenario}-incremental | seed {seed} ===")
            runs[name].append(run_strategy(name, cfg, info, seed, device, ckpt_dir / f"{name}_seed{seed}.pt"))
    results = {"benchmark": info.name, "scenario": cfg.scenario, "n_experiences": info.n_experiences,
               "seed": seeds[0], "seeds": seeds, "device": str(device),
               "classes_per_experience": info.global_task_classes,
               "strategies": {name: aggregate_seeds(r) for name, r in runs.items()}}
    write_results(out, results)
    print(f"\n{info.name}, {cfg.scenario}-incremental, seeds {seeds}\n{format_table(results['strategies'])}")
    print(f"results written to {out}/results.json")
    return results
