"""The ``modnet`` command: ``modnet <job> [hydra overrides]``.

Jobs: run (everything on the embedded default), cl (continual-learning comparison), gzsl (generalized
zero-shot evaluation), explain (Grad-CAM and textual explanations), bench (speed and memory). Each job has
its config in ``configs/<job>.yaml``; overrides use Hydra's syntax (``key=value``,
``strategies=[modnet,naive]``). Commands: sweep (Hydra multi-run of cl), aggregate DIR (mean +- std tables
of a sweep folder), ddp (data-parallel cl under torchrun).

``modnet <job> --help`` (or ``-h``) prints the job's options with their comments; ``modnet --version``.
"""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

from modnet.config import ConfigError, compose

# job -> (config name, "module:function" taking the composed config)
JOBS = {
    "cl": ("cl", "modnet.jobs.cl:run_cl"),
    "gzsl": ("gzsl", "modnet.jobs.gzsl:run_gzsl"),
    "explain": ("explain", "modnet.jobs.explain:run_explain"),
    "bench": ("bench", "modnet.jobs.bench:run_bench"),
}
# commands that parse their own arguments: name -> "module:function(argv) -> exit code"
COMMANDS = {"sweep": "modnet.jobs.sweep:main", "aggregate": "modnet.eval.aggregate:main", "ddp": "modnet.runner.distributed:main"}
USAGE = f"usage: modnet {{run,{','.join([*JOBS, *COMMANDS])}}} [key=value ...]   (Hydra override syntax)\n" + \
    (__doc__ or "")


def _call(job: str, overrides: list[str]):
    config_name, target = JOBS[job]
    cfg = compose(config_name, overrides)
    from modnet.validate import validate

    validate(job, cfg)  # before the job's heavy imports: a bad value is one line in about a second
    module, func = target.split(":")
    import torch

    # a job sets torch's threads for itself (cl: one); the next job of `modnet run` (gzsl's threads=null:
    # torch's default) and a caller in the same process find them as they were
    threads = torch.get_num_threads()
    try:
        return getattr(importlib.import_module(module), func)(cfg)
    finally:
        torch.set_num_threads(threads)


def run_default(overrides: list[str]) -> dict:
    """``modnet run``: the continual-learning comparison, then GZSL and explanations (of the modular network
    the comparison trained), on embedded data."""
    out = "outputs/run"
    for o in overrides:
        if o.startswith("output_dir="):
            out = o.split("=", 1)[1]
    rest = [o for o in overrides if not o.startswith("output_dir=")]
    results = {"cl": _call("cl", [f"output_dir={Path(out) / 'cl'}", *rest])}
    for job in ("gzsl", "explain"):
        if importlib.util.find_spec(JOBS[job][1].split(":")[0]) is not None:
            job_overrides = [f"output_dir={Path(out) / job}"]
            if job == "explain" and any((Path(out) / "cl" / "checkpoints").glob("modnet_seed*_final.pt")):
                job_overrides.append(f"run_dir={Path(out) / 'cl'}")  # the modular network the cl run trained
            results[job] = _call(job, job_overrides)
    return results


def job_help(job: str, overrides: list[str]) -> str:
    """``modnet <job> --help``: the job's config file (every option with its comment: the configs are the
    documentation), then the benchmarks it takes, or the chosen benchmark's file with ``benchmark=<name>``."""
    import configs
    from scenarios.registry import benchmark_entries, get_benchmark

    folder = Path(configs.__file__).parent
    own = (folder / f"{JOBS[job][0]}.yaml").read_text().rstrip()
    # the shared config files the job's defaults list pulls in (e.g. training.yaml: network, loop, strategies)
    shared = [line.strip()[2:].strip().split()[0] for line in own.splitlines()
              if line.startswith("  - ") and ":" not in line.split("#")[0] and "_self_" not in line]
    text = [f"usage: modnet {job} [key=value ...]   (Hydra override syntax; the options below, from "
            f"configs/{JOBS[job][0]}.yaml{''.join(f' and configs/{name}.yaml' for name in shared)})", "", own]
    for name in shared:
        text += ["", f"# configs/{name}.yaml (shared):", (folder / f"{name}.yaml").read_text().rstrip()]
    choice = next((o.partition("=")[2] for o in overrides if o.partition("=")[0] == "benchmark"), None)
    entry = get_benchmark(choice) if choice else None
    if entry is not None:
        path = Path(entry.config_dir) / "benchmark" if entry.config_dir else folder / "benchmark"
        text += ["", f"# benchmark={choice}: its keys are benchmark.<key>",
                 (path / f"{choice}.yaml").read_text().rstrip()]
    elif job in ("cl", "gzsl", "explain"):
        text += ["", f"# benchmarks of {job} (benchmark=<name>; `modnet {job} --help benchmark=<name>` shows its "
                 "keys):"]
        text += [f"#   {e.name:10s} {e.description}" for e in benchmark_entries(job)]
    return "\n".join(text)


def _print_to_reader(text: str) -> None:
    """Print help text; `modnet --help | head`: the reader closing the pipe early has what it wanted."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at interpreter exit


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        _print_to_reader(USAGE)
        return 0
    if argv[0] in ("--version", "-V", "version"):
        from modnet import __version__

        _print_to_reader(f"modnet {__version__}")
        return 0
    job, overrides = argv[0], argv[1:]
    if job in JOBS and any(o in ("-h", "--help") for o in overrides):
        _print_to_reader(job_help(job, overrides))
        return 0
    if job == "run" and any(o in ("-h", "--help") for o in overrides):
        _print_to_reader(f"usage: modnet run [key=value ...]\n{run_default.__doc__}\nThe overrides go to cl "
                         "(`modnet cl --help`); output_dir=<folder> holds cl/, gzsl/, explain/.")
        return 0
    from modnet.imports import defer_unused_imports

    defer_unused_imports()  # wandb and qpsolvers run at their first use, not at Avalanche's import (~2 s)
    try:
        if job == "run":
            run_default(overrides)
        elif job in COMMANDS:
            checked = {}
            if job == "ddp" and "LOCAL_RANK" not in os.environ and not any(o in ("-h", "--help") for o in overrides):
                # the launcher's checks before torch's import; their result goes to the launcher, which does not
                # check again
                from modnet.validate import precheck_ddp

                checked["prechecked"] = precheck_ddp(overrides)
            module, func = COMMANDS[job].split(":")
            return getattr(importlib.import_module(module), func)(overrides, **checked)
        elif job in JOBS:
            _call(job, overrides)
        else:
            print(f"modnet: unknown command {job!r}; choose one of run, {', '.join([*JOBS, *COMMANDS])}",
                  file=sys.stderr)
            return 2
    except (ConfigError, FileNotFoundError, ValueError, ConnectionError) as err:  # ConnectionError: offline download
        print(f"modnet {job}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: what finished is on disk (cl: checkpoints after every experience)
        again = "resume=true continues from its checkpoints" if job in ("cl", "run", "sweep", "ddp") else \
            "run it again to start over"
        print(f"\nmodnet {job}: interrupted; {again}", file=sys.stderr)
        return 130
    except RuntimeError as err:
        from modnet.runner.guards import NaNLossError, StrategyFailed  # StrategyFailed: the rest is written

        if not isinstance(err, (StrategyFailed, NaNLossError)):
            raise
        print(f"modnet {job}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
