"""``modnet sweep``: Hydra multi-run sweeps of ``modnet cl`` over seeds, strategies, benchmarks, hyper-parameters.

Hydra does the work: it expands the sweep (``seed=0,1,2 strategies=[modnet],[naive]`` -> 6 jobs) and hands
the jobs to a launcher plugin: Hydra's basic launcher (one after the other, in this process),
hydra-joblib-launcher (``hydra/launcher=joblib hydra.launcher.n_jobs=N``: local processes) or
hydra-submitit-launcher (``hydra/launcher=slurm``: a Slurm job array, ``configs/hydra/launcher/slurm.yaml``).
Each job is one ``modnet.jobs.cl.run_cl`` whose results folder is its Hydra job folder
``<hydra.sweep.dir>/<job number>`` (``configs/sweep.yaml``). When every job has finished,
``AggregateCallback`` turns the sweep folder into mean +- std tables and a plot (``modnet.eval.aggregate``).

    modnet sweep seed=0,1,2 strategies=[modnet],[naive] hydra/launcher=joblib hydra.launcher.n_jobs=2
    python -m modnet.jobs.sweep -m seed=0,1 strategies=[modnet],[naive]      (the same app, Hydra's own CLI)

Launcher plugins stay optional: Hydra loads one only when it is chosen, and a missing one is reported with
its ``pip install`` line before any job starts.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any, Sequence

import hydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from modnet.config import ConfigError, compose, keep_benchmark_keys, run_as_script

# hydra/launcher choice -> (plugin module, pip package). Our slurm.yaml extends the submitit plugin's config.
_LAUNCHER_PLUGINS = {
    "joblib": ("hydra_plugins.hydra_joblib_launcher", "hydra-joblib-launcher"),
    "slurm": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
    "submitit_slurm": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
    "submitit_local": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
}


def _plugin_installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # the hydra_plugins namespace itself is absent
        return False


def expand_sweep(overrides: Sequence[str]) -> list[list[str]]:
    """The job-level override lists a sweep expands to (Hydra's own parser and basic-sweeper product);
    ``hydra.*`` and ``hydra/*`` overrides are left out: they configure Hydra, not the job."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
        job = [o for o in parsed if not o.is_hydra_override()]
        return BasicSweeper.split_arguments(job, None)[0]
    except HydraException as err:
        raise ConfigError(f"bad sweep override: {str(err).strip().splitlines()[0]}") from None


def validate_sweep(overrides: Sequence[str]) -> int:
    """Check every job's config and the chosen launcher before anything is launched; returns the job count.

    A typo in the tenth combination of a Slurm sweep should fail here, in one line, not an hour later.
    """
    for o in overrides:
        key, _, value = o.partition("=")
        if key.lstrip("+~") == "hydra/launcher" and value in _LAUNCHER_PLUGINS:
            module, package = _LAUNCHER_PLUGINS[value]
            if not _plugin_installed(module):
                raise ConfigError(f"hydra/launcher={value} needs the {package} plugin: pip install {package} "
                                  "(or pip install 'modnet[sweep]')")
        if key.lstrip("+") == "output_dir":
            raise ConfigError("output_dir is set per job by the sweep (its Hydra job folder); choose the "
                              "sweep's folder with hydra.sweep.dir=PATH instead")
    from modnet.validate import validate

    _check_sweep_dir(overrides)
    jobs = expand_sweep(overrides)
    for job in jobs:
        validate("cl", compose("cl", job))  # raises ConfigError naming the bad key/value and the valid ones
    return len(jobs)


#: the errors of this process's jobs (Hydra's basic launcher runs them here; a joblib or Slurm worker's are
#: printed by the worker, and its failed strategies found in its results.json)
JOB_ERRORS: list[str] = []


def _check_sweep_dir(overrides: Sequence[str]) -> None:
    """``hydra.sweep.dir`` naming a folder that holds another sweep (its multirun.yaml's overrides differ in a key
    that decides the numbers): its job folders would get other jobs under the same numbers, each stopped by its
    folder's fingerprint after the first had started, and multirun.yaml rewritten. The same sweep again may
    (resume=true finishes it)."""
    from omegaconf import OmegaConf

    from modnet.rundir import IGNORED_KEYS

    given = [o.partition("=")[2] for o in overrides if o.partition("=")[0] == "hydra.sweep.dir"]
    previous_file = Path(given[-1]).expanduser() / "multirun.yaml" if given else None
    if previous_file is None or not previous_file.is_file():
        return

    def deciding(items) -> list[str]:
        """The overrides that decide the numbers: the plain ones sorted, then the swept ones in their order
        (Hydra numbers the jobs by it: reordered, job 1 of the new sweep is job 2 of the old, whose folder
        then held a result under another job's .hydra/overrides.yaml, and a seed was aggregated twice)."""
        from hydra.core.override_parser.overrides_parser import OverridesParser

        kept = [str(o) for o in items if not str(o).startswith(("hydra.", "hydra/"))
                and str(o).partition("=")[0].lstrip("+~") not in IGNORED_KEYS]
        swept = [p.is_sweep_override() for p in OverridesParser.create().parse_overrides(kept)]
        return sorted(o for o, s in zip(kept, swept) if not s) + [o for o, s in zip(kept, swept) if s]

    try:
        previous = deciding(OmegaConf.select(OmegaConf.load(previous_file), "hydra.overrides.task") or [])
    except Exception:  # noqa: BLE001 - an unreadable multirun.yaml: Hydra rewrites it, the jobs' fingerprints decide
        return
    now = deciding(overrides)
    if previous != now:
        raise ConfigError(f"hydra.sweep.dir={given[-1]} holds another sweep (its overrides: {' '.join(previous) or '-'}; "
                          f"now: {' '.join(now) or '-'}); choose another hydra.sweep.dir, or give the same overrides, "
                          "the swept ones in the same order (resume=true finishes that sweep)")


class AggregateCallback(Callback):
    """Hydra callback: after the last job of a multi-run, aggregate its sweep folder (mean +- std)."""

    #: the jobs whose strategies failed in the last multi-run (job folder -> their names), for ``main``'s exit code
    failed: dict[str, list[str]] = {}
    #: how many jobs the sweep launches (``main`` sets it), and how many of them left no results.json: a job that
    #: stopped before any result (a ConfigError in a joblib or Slurm worker, which prints it there: this process
    #: never sees it) counts as failed
    expected: int | None = None
    missing: int = 0

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from modnet.eval.aggregate import aggregate, format_markdown

        sweep_dir = Path(config.hydra.sweep.dir)
        AggregateCallback.failed = failed_jobs(sweep_dir)
        found = list(sweep_dir.rglob("results.json"))
        expected = AggregateCallback.expected
        AggregateCallback.missing = max(0, expected - len(found)) if expected is not None else 0
        if AggregateCallback.missing:
            print(f"[modnet sweep] {AggregateCallback.missing} of {expected} job(s) wrote no results.json: they "
                  "stopped before any result (the worker's output, or its log, says why)", file=sys.stderr)
        if not found:
            print(f"[modnet sweep] no results.json under {sweep_dir}: nothing to aggregate")
            return
        try:
            summary = aggregate(sweep_dir)
        except ValueError as err:  # the jobs' results are kept: report, and let the user aggregate by hand
            print(f"[modnet sweep] aggregation failed: {err}\nfix it, then run: modnet aggregate {sweep_dir}")
            return
        print(f"\n{format_markdown(summary)}\naggregate tables and plot written to {sweep_dir}")
        for job, names in AggregateCallback.failed.items():
            print(f"[modnet sweep] job {job}: {', '.join(names)} failed and are not in the tables (its sweep.log "
                  "says why)")


def failed_jobs(sweep_dir: Path) -> dict[str, list[str]]:
    """Job folder -> the strategies its results.json lists as failed (``modnet cl`` records them beside the rest)."""
    import json

    out = {}
    for path in sorted(Path(sweep_dir).rglob("results.json")):
        try:
            failed = json.loads(path.read_text()).get("failed") or {}
        except (ValueError, AttributeError):
            continue
        if failed:
            out[str(path.parent)] = list(failed)
    return out


@hydra.main(config_path="pkg://configs", config_name="sweep", version_base=None)
def sweep_app(cfg: DictConfig) -> dict:
    """One sweep job: a ``modnet cl`` run in the job's folder (Hydra sets ``output_dir`` to it)."""
    from modnet.imports import defer_unused_imports

    defer_unused_imports()  # a launcher's worker process imports Avalanche here, as `modnet cl` would
    from modnet.jobs.cl import run_cl
    from modnet.runner.guards import NaNLossError, StrategyFailed

    try:
        return run_cl(keep_benchmark_keys("cl", cfg))  # as compose("cl") gives it
    except (StrategyFailed, NaNLossError, ConfigError) as err:
        # the job wrote what finished (its failed strategies listed in results.json), or nothing (its folder in use
        # or another run's): the other jobs go on and the sweep is aggregated; `modnet sweep` exits 1 (Hydra
        # stopped the sweep with a traceback, unaggregated)
        print(f"[modnet sweep] job {cfg.output_dir}: error: {err}", file=sys.stderr)
        JOB_ERRORS.append(f"{cfg.output_dir}: {err}")
        return None


def main(argv: list[str] | None = None) -> int:
    """``modnet sweep [hydra options] [overrides]``: always a multi-run (``-m`` is added when missing)."""
    from hydra._internal.utils import get_args_parser

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):  # each job is `modnet cl`: its options with their comments
        from modnet.cli import _print_to_reader, job_help

        _print_to_reader(f"{__doc__.strip()}\n\nEach job is `modnet cl`; Hydra's own options: `modnet sweep "
                         f"--hydra-help`.\n\n{job_help('cl', [o for o in argv if o not in ('-h', '--help')])}")
        return 0
    args = get_args_parser().parse_args(argv)
    inspect_only = args.help or args.hydra_help or args.info or args.cfg or args.shell_completion
    if not inspect_only:
        if not args.multirun:
            argv.insert(0, "--multirun")
        n_jobs = validate_sweep(args.overrides)
        print(f"[modnet sweep] {n_jobs} job(s)")
        AggregateCallback.expected = n_jobs
    saved = sys.argv
    sys.argv = ["modnet sweep", *argv]  # hydra.main reads its command line from sys.argv
    AggregateCallback.failed, AggregateCallback.missing = {}, 0
    JOB_ERRORS.clear()
    try:
        sweep_app()
    finally:
        sys.argv = saved
        AggregateCallback.expected = None
    return 1 if AggregateCallback.failed or AggregateCallback.missing or JOB_ERRORS else 0


if __name__ == "__main__":
    run_as_script(main, "modnet sweep")
