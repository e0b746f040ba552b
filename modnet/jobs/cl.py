"""``modnet cl``: every configured strategy on one benchmark, in one process, with checkpoints and results.

Flow: scenario (``scenarios.build_benchmark``) -> model + strategy (``strategies.registry``) -> the experience
runner (``modnet.runner.runner``) with evaluation on the test stream after every experience
(``modnet.eval.metrics``: accuracy matrix, Avalanche metrics, ``loggers``) -> results folder
(``modnet.eval.results``).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import OmegaConf

from modnet.config import ConfigError, check_choice, resolve_device, with_absolute_data_paths
from modnet.eval.results import add_forgetting_ratio, aggregate_seeds, format_table, write_results
from modnet.eval.tables import SEED_STD_DDOF, seeds_note
from modnet.runner.runner import RunnerHook
from scenarios import build_benchmark
from scenarios.base import SCENARIOS
from strategies.memory import MATCHABLE, matching, run_order, with_matched_memory


class _DriftProbe(RunnerHook):
    """Runner hook: the hidden representation of experience 0's test inputs right after experience 0 and at
    the end (CKA drift plot). The first snapshot is kept in the checkpoints, so that a run resumed after
    experience 0 plots the same drift as an uninterrupted one."""

    state_key = "drift_probe"

    def __init__(self, probe: torch.Tensor):
        self.probe, self.first = probe, None

    def after_training_exp(self, index, strategy):
        from modnet.eval.drift import snapshot

        if index == 0:
            self.first = snapshot(strategy.model, self.probe)

    def state_dict(self) -> dict:
        return {} if self.first is None else {"first": [a.cpu() for a in self.first]}

    def load_state_dict(self, state: dict) -> None:
        if "first" in state:
            self.first = [a.to(self.probe.device) for a in state["first"]]


def run_strategy(name: str, cfg, info, seed: int, device, ckpt_path: Path, run_fingerprint: dict | None = None
                 ) -> dict:
    """Train ``name`` over the experiences; evaluate on the whole test stream after each one.

    ``run_fingerprint`` (``modnet.rundir.fingerprint``) is stored in every checkpoint; a checkpoint
    with another one is not resumed from (one line naming the keys that differ)."""
    from modnet.eval.metrics import build_evaluator, close_loggers
    from modnet.nets.record import save_network
    from modnet.runner.evaluation import stream_evaluator
    from modnet.runner.runner import (ExperienceLine, finished_result, load_checkpoint, make_strategy,
                                      run_experiences, save_finished, set_seed, strategy_result)
    from strategies.registry import get_strategy

    state = load_checkpoint(ckpt_path) if cfg.resume else None
    meta = {"fingerprint": json.dumps(run_fingerprint, sort_keys=True)} if run_fingerprint is not None else {}
    if state is not None and run_fingerprint is not None and "fingerprint" in state:
        _check_checkpoint_fingerprint(ckpt_path, json.loads(state["fingerprint"]), run_fingerprint)
    done = finished_result(state)
    if done is not None:
        print(f"[{name} seed {seed}] finished earlier: results taken from {ckpt_path}")
        return done
    set_seed(seed)
    evaluator, accuracy = build_evaluator(cfg.loggers, ckpt_path.parent.parent / "logs" / f"{name}_seed{seed}",
                                          cfg.progress)
    strategy = make_strategy(name, cfg, info, device, evaluator)
    bm = info.benchmark
    # whole state in the model (no plugin state, no optimiser momentum): continue at the next experience
    resumable = get_strategy(name).resumes_at_experience and cfg.train.momentum == 0
    if state is not None and not resumable:
        print(f"[{name} seed {seed}] keeps state in plugins: re-running it from its first experience")
        state = None
    n = info.n_experiences
    out_dir = ckpt_path.parent.parent
    from modnet.eval.metrics import shows_progress_bars

    hooks = []
    if not (shows_progress_bars(cfg.progress) and "interactive" in cfg.loggers):
        hooks.append(ExperienceLine(f"[{name} seed {seed}]", n))
    # the drift plot needs experience 0's snapshot: taken in this run, or kept in the checkpoint resumed from
    probe_ds = bm.test_stream[0].dataset
    hooks.append(_DriftProbe(torch.stack([probe_ds[i][0] for i in range(min(256, len(probe_ds)))]).to(device)))
    record = run_experiences(strategy, bm.train_stream, stream_evaluator(bm.test_stream, accuracy), seed=seed,
                             checkpoint=ckpt_path, resume_state=state, test_stream=bm.test_stream, hooks=hooks,
                             log=lambda msg: print(f"[{name} seed {seed}] {msg} from {ckpt_path}"),
                             checkpoint_meta=meta)
    close_loggers(evaluator)
    result = strategy_result(name, strategy, info, record)
    drift = next((h for h in hooks if isinstance(h, _DriftProbe)), None)
    if drift is not None and drift.first is not None and n > 1:
        from modnet.eval.drift import plot_drift, snapshot

        last = snapshot(strategy.model, drift.probe)
        result["first_experience_cka"] = plot_drift(drift.first, last, out_dir / f"cka_{name}_seed{seed}.png",
                                                    name)
    if getattr(strategy.model, "gate", None) is not None:
        from modnet.explain.module_plots import write_module_report

        report = write_module_report(strategy.model, bm.test_stream, out_dir / f"modules_seed{seed}")
        result["modules"] = {"folder": f"modules_seed{seed}", "sizes": report["module_sizes"]}
    from modnet.nets.models import HATNet

    if isinstance(strategy.model, HATNet) and strategy.model.class_incremental:
        from modnet.eval.task_prediction import task_prediction

        result["task_prediction"] = task_prediction(strategy.model, bm.test_stream, device)
        tp = result["task_prediction"]
        print(f"[{name} seed {seed}] task prediction {tp['task_accuracy']:.4f}, within-task accuracy "
              f"{tp['within_task_accuracy']:.4f} (class-incremental accuracy ~ their product)")
    save_network(strategy.model, out_dir / "checkpoints" / f"{name}_seed{seed}_final.pt", info.input_shape)
    save_finished(ckpt_path, result, meta)
    return result


def run_cl(cfg) -> dict:
    """Every strategy of ``cfg.strategies`` on every seed, into ``cfg.output_dir``.

    The folder is locked for the run (``modnet.rundir.RunLock``); ``resume=true`` first checks the
    run fingerprint stored there (nothing in the folder is written before), and without resume a folder
    holding another run's results is refused; results.json is rewritten after
    every finished strategy (``"complete": false`` until the last), so a crash loses no finished result; a
    finished results.json of the same run, started again, is left as it is until the new run ends."""
    from modnet.eval.metrics import check_loggers
    from modnet.nets.build import ARCHS
    from modnet.runner.cpu import prepare_cpu
    from modnet.rundir import (RunLock, check_fresh_start, check_output_dir, check_resume, fingerprint,
                                      write_fingerprint)
    from modnet.rundir import write_text_atomic
    from modnet.runner.runner import compile_backend
    from strategies.registry import strategy_names

    check_choice("scenario", cfg.scenario, SCENARIOS)
    check_choice("model.arch", cfg.model.arch, ARCHS)
    for name in cfg.strategies:
        check_choice("strategies", name, strategy_names())
    check_loggers(cfg.loggers)
    backend = compile_backend(cfg.train.get("compile", False))  # one line before any strategy trains
    device = resolve_device(cfg.device)
    prepare_cpu()  # before the first parallel op starts torch's CPU threads (they inherit the mode)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    out = Path(cfg.output_dir)
    check_output_dir(out)
    run_fingerprint = fingerprint(cfg)
    with RunLock(out):
        if cfg.resume:
            check_resume(out, run_fingerprint)
            _check_checkpoint_fingerprints(out / "checkpoints", run_fingerprint)
        else:
            check_fresh_start(out, run_fingerprint)
        ckpt_dir = out / "checkpoints"
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "config.yaml", OmegaConf.to_yaml(with_absolute_data_paths(cfg), resolve=True))
        write_fingerprint(out, run_fingerprint)
        return _run_all(cfg, out, ckpt_dir, device, run_fingerprint, backend)


def _check_checkpoint_fingerprints(ckpt_dir: Path, run_fingerprint: dict) -> None:
    """resume=true: every checkpoint that holds a fingerprint must hold this run's (a folder without
    fingerprint.json, or one replaced by hand), checked before anything is written; unreadable checkpoints
    are left to ``load_checkpoint`` (a warning, that strategy restarts)."""
    for path in sorted(ckpt_dir.glob("*_seed*.pt")) if ckpt_dir.is_dir() else []:
        if path.name.endswith("_final.pt"):
            continue
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            stored = json.loads(state["fingerprint"]) if isinstance(state, dict) and "fingerprint" in state else None
        except Exception:
            continue
        if stored is not None:
            _check_checkpoint_fingerprint(path, stored, run_fingerprint)


def _check_checkpoint_fingerprint(path: Path, stored: dict, run_fingerprint: dict) -> None:
    """One line where checkpoint ``path``'s fingerprint ``stored`` is not this run's (keys added since it was
    written are taken as this run's: ``with_added_keys``)."""
    from modnet.rundir import describe_difference, with_added_keys

    stored = with_added_keys(stored, run_fingerprint)
    if stored != run_fingerprint:
        raise ConfigError(f"resume=true but checkpoint {path} is of a different run; differing keys: "
                          f"{describe_difference(stored, run_fingerprint)}. Run with the same settings, or "
                          "choose another output_dir")


def _run_all(cfg, out: Path, ckpt_dir: Path, device, run_fingerprint: dict, backend: str | None) -> dict:
    """``backend``: train.compile's torch.compile backend (``compile_backend``), None for eager."""
    seeds = list(cfg.seeds) if cfg.get("seeds") else [cfg.seed]
    runs: dict[str, list[dict]] = {name: [] for name in cfg.strategies}
    info = None

    def results_so_far(complete: bool) -> dict:
        done = {name: r for name, r in runs.items() if len(r) == len(seeds)}
        strategies = {name: aggregate_seeds(r) for name, r in done.items()}
        sizes = [len(c) for c in info.global_task_classes]  # chance: 1 / the classes a prediction picks from
        # class-incremental: one prediction among every class of the run (Permuted-X's experiences share theirs)
        add_forgetting_ratio(strategies, sizes if cfg.scenario == "task" else [info.n_classes] * len(sizes))
        return {"benchmark": info.name, "scenario": cfg.scenario, "n_experiences": info.n_experiences,
                "seed": seeds[0], "seeds": seeds, "std_ddof": SEED_STD_DDOF, "device": str(device),
                "classes_per_experience": info.global_task_classes,
                "strategies": strategies,
                "complete": complete,
                "finished": [[name, seed] for name, r in runs.items() for seed in seeds[:len(r)]],
                # a strategy that finished some of the seeds: their results as they are (the table and the mean
                # over seeds wait for all; an interrupted run kept them only in its checkpoints)
                "partial": {name: [{"seed": seed, **run} for seed, run in zip(seeds, r)]
                            for name, r in runs.items() if 0 < len(r) < len(seeds)}}

    from modnet.runner.guards import NaNLossError, StrategyFailed

    # a strategy whose training diverges (NaNLossError) is recorded and left out; the others still run
    failed: dict[str, dict] = {}
    order = run_order(cfg)  # modnet first when a buffer is sized to its stored bytes (mem_size=match)
    # The same run started again over its finished results (the fingerprint was checked): they stay as they are
    # until this run ends, so that a rerun stopped half-way does not leave the finished run as "complete": false.
    from modnet.rundir import holds_finished_results

    keep_finished = holds_finished_results(out)
    if keep_finished and not cfg.resume:
        print(f"{out}/results.json holds this run's finished results: kept until this run ends "
              "(resume=true reuses the finished strategies instead of training them again)")
    for seed in seeds:
        info = build_benchmark(cfg.benchmark, cfg.scenario, seed,
                               device=device if cfg.train.data_on_device else None)
        for name in order:
            if name in failed:
                continue
            if name in matching(cfg) and "modnet" in failed:
                failed[name] = {"seed": seed, "error": f"{MATCHABLE[name].option}=match needs modnet's "
                                                       "stored bytes, and modnet failed"}
                continue
            print(f"=== {name} | {info.name} | {cfg.scenario}-incremental | seed {seed} ===")
            modnet_bytes = runs["modnet"][-1].get("stored_bytes") if "modnet" in runs and runs["modnet"] else None
            try:
                strategy_cfg = with_matched_memory(cfg, name, info, modnet_bytes)
            except ConfigError as err:  # modnet's bytes hold no sample: left out, modnet's result kept
                failed[name] = {"seed": seed, "error": str(err)}
                print(f"[{name} seed {seed}] left out: {err}")
                continue
            try:
                runs[name].append(run_strategy(name, strategy_cfg, info,
                                               seed, device, ckpt_dir / f"{name}_seed{seed}.pt", run_fingerprint))
            except NaNLossError as err:
                failed[name] = {"seed": seed, "error": str(err)}
                print(f"[{name} seed {seed}] failed: {err}; left out of the comparison, the other strategies go on")
            if not (seed == seeds[-1] and name == order[-1]) and not keep_finished:
                write_results(out, {**results_so_far(False), "failed": failed}, plots=False)  # a crash loses nothing
    results = {**results_so_far(not failed), "failed": failed}
    write_results(out, results, plots=bool(results["strategies"]))
    if results["strategies"]:
        note = seeds_note(len(seeds), f"`modnet aggregate {out} --ddof 1` gives the sample std")
        print(f"\n{info.name}, {cfg.scenario}-incremental, seeds {seeds}\n{format_table(results['strategies'])}"
              + (f"\n{note}" if note else ""))
        if backend is not None:  # the train s column compares unlike loops: say so under the table
            ran = set(results["strategies"])
            parts = (["modnet's training step (forward, losses and update)"] * ("modnet" in ran)
                     + ["the baselines' forwards (their losses eager)"] * bool(ran - {"modnet", "hnet"}))
            print(f"train s: the training ran through torch.compile ({backend}), its compile included: "
                  + "; ".join(parts or ["nothing compiled"])
                  + ("; hnet, a forward of its own, trained eager, as its line above says" if "hnet" in ran else ""))
    print(f"results written to {out}/results.json")
    if failed:
        raise StrategyFailed("; ".join(f"{name} failed on seed {f['seed']}: {f['error']}" for name, f in failed.items())
                             + f". The other strategies' results are in {out}/results.json")
    return results
