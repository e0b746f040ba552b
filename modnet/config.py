"""Configs: Hydra composes ``configs/<job>.yaml`` with the user's overrides; we check them before any work.

Hydra/OmegaConf do composition, override parsing and struct mode (unknown keys); this module turns their
exceptions into one line that names the problem and the valid choices, and adds a type check of every value
against the type of its default (Hydra does not type-check plain YAML configs).

The data of every command is the config group ``benchmark`` (``configs/benchmark/<name>.yaml``), chosen with
``benchmark=<name>``. A benchmark file holds the keys of every command that takes it (each key's comment names
them); a command gets only the keys it reads, and an override of another command's key is an error. Which
command takes which benchmark and which keys it reads are declared by the benchmark's own file
(``scenarios/benchmarks/<name>.py``, ``scenarios.registry``), which imports nothing heavy: these checks run
before torch is imported.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict


def __getattr__(name: str):
    """The tables derived from the benchmark registry (``scenarios/benchmarks/<name>.py``):
    ``BENCHMARK_CHOICES`` (command -> the benchmarks it takes), ``BENCHMARK_KEYS`` (command -> the keys of a
    benchmark file it reads), ``BENCHMARK_LIMITS`` (benchmark -> what it gives, named in errors)."""
    from scenarios.registry import benchmark_entries, command_benchmarks, command_keys

    if name == "BENCHMARK_CHOICES":
        return command_benchmarks()
    if name == "BENCHMARK_KEYS":
        return command_keys()
    if name == "BENCHMARK_LIMITS":
        return {entry.name: entry.description for entry in benchmark_entries()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class ConfigError(ValueError):
    """A bad config key or value, reported as one line before any training starts."""


def compose(job: str, overrides: Sequence[str] = ()) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    overrides = list(overrides)
    _refuse_hydra_flags(job, overrides)
    _refuse_old_data_spelling(job, overrides)
    choice = _benchmark_choice(job, overrides)
    search = _benchmark_search_path()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="configs", version_base=None):
        base = hydra_compose(config_name=job, overrides=[*search, *([f"benchmark={choice}"] if choice else [])])
        keep_benchmark_keys(job, base)
        for override in overrides:  # Hydra's +key appends a key no option reads: refused as any unknown key
            if override.startswith("+") and OmegaConf.select(base, _override_key(override)) is None:
                raise ConfigError(_explain(KeyError(f"Key '{_override_key(override)}' is not in struct"), base))
            if override.startswith("~"):
                _refuse_deletion(override, base)
        try:
            cfg = hydra_compose(config_name=job, overrides=[*search, *overrides])
        except (HydraException, OmegaConfBaseException) as err:
            raise ConfigError(_explain(err, base)) from None
    OmegaConf.set_struct(cfg, True)
    check_types(cfg, base)
    _refuse_unread_benchmark_keys(job, overrides, base)
    _refuse_inert_overrides(job, overrides, cfg)
    return keep_benchmark_keys(job, cfg)


def _refuse_hydra_flags(job: str, overrides: list[str]) -> None:
    """Hydra's own command-line flags (``-m``, ``--multirun``, ``--cfg job``, ...): the jobs take overrides only."""
    flags = [o for o in overrides if o.startswith("-")]
    if not flags:
        return
    if any(f in ("-m", "--multirun") for f in flags):
        raise ConfigError(f"{flags[0]}: modnet {job} takes key=value overrides only; a multi-run is `modnet sweep "
                          f"key=a,b ...` (a modnet cl job per combination, aggregated)")
    raise ConfigError(f"{flags[0]}: modnet {job} takes key=value overrides only (Hydra's flags are not passed on); "
                      f"`modnet {job} --help` shows every option, and each run writes its resolved config.yaml")


def _refuse_deletion(override: str, base: DictConfig) -> None:
    """Hydra's ``~key`` deletes a key: every key of modnet's configs is read by its job, which then stopped on
    the missing key after its imports with a traceback. Refused here, with the key's default."""
    key = _override_key(override)
    default = OmegaConf.select(base, key, default="<absent>")
    if default == "<absent>":
        raise ConfigError(_explain(KeyError(f"Key '{key}' is not in struct"), base))
    shown = "null" if default is None else f"[{','.join(map(str, default))}]" if isinstance(
        default, ListConfig) else default
    raise ConfigError(f"{override} deletes config key {key}, which the job reads; set a value instead "
                      f"({key}={shown} is its default)" if not isinstance(default, DictConfig) else
                      f"{override} deletes the config group {key}, which the job reads; set its keys instead")


CALIBRATION_NOTE = {"validate": "each method's gamma is chosen on the validation splits", "none": "no calibration"}


def _refuse_inert_overrides(job: str, overrides: list[str], cfg: DictConfig) -> None:
    """A key set on the command line that the run will not read, given the rest of the config: stop instead of
    running without it (gzsl ``calibration.gamma`` is read with ``calibration.mode=fixed`` only; ``strategies``
    and ``continual.*`` with ``continual.enabled=true`` only; explain's ``benchmark`` and ``train`` without
    ``run_dir`` only: with it, the network and its data are the run's)."""
    keys = {_override_key(o) for o in overrides}
    if "seed" in keys and cfg.get("seeds"):
        raise ConfigError(f"seed is not read when seeds={list(cfg.seeds)} is given (the run takes each seed of the "
                          "list); put the seed in seeds, or drop seeds")
    if job == "explain" and cfg.run_dir is not None:
        unread = sorted(k for k in keys if k.split(".")[0] in ("benchmark", "train"))
        if unread:
            raise ConfigError(f"{', '.join(unread)} {'is' if len(unread) == 1 else 'are'} not read with run_dir: the "
                              f"network and its data are the run's (its config.yaml); drop "
                              f"{'it' if len(unread) == 1 else 'them'}, or leave run_dir out to train a network here")
    if job != "gzsl":
        return
    if "calibration.gamma" in keys and cfg.calibration.mode != "fixed":
        raise ConfigError(f"calibration.gamma is read with calibration.mode=fixed only (now {cfg.calibration.mode}: "
                          f"{CALIBRATION_NOTE.get(cfg.calibration.mode, '')}); "
                          "add calibration.mode=fixed")
    unread = sorted(k for k in keys if k == "strategies" or (k.startswith("continual.") and k != "continual.enabled"))
    if unread and not cfg.continual.enabled:
        raise ConfigError(f"{', '.join(unread)} {'is' if len(unread) == 1 else 'are'} read by continual GZSL only, "
                          "which is off: add continual.enabled=true")


def _benchmark_search_path() -> list[str]:
    """A Hydra override adding the config folders of benchmarks registered from outside this repository."""
    from scenarios.registry import config_dirs

    dirs = config_dirs()
    return [f"hydra.searchpath=[{','.join('file://' + d for d in dirs)}]"] if dirs else []


def _override_key(override: str) -> str:
    return override.partition("=")[0].lstrip("+~")


def _refuse_old_data_spelling(job: str, overrides: list[str]) -> None:
    """``benchmark.name=X`` (gzsl) and ``data.*`` (explain) chose the data before ``benchmark`` became a config
    group in every command: stop with the new spelling of the same choice, in any command (``benchmark.name``:
    it would rename the chosen benchmark, not choose another; ``data.*``: no command has a ``data`` block)."""
    old = {_override_key(o): o.partition("=")[2] for o in overrides
           if _override_key(o) == "benchmark.name" or _override_key(o).startswith("data.")}
    if not old:
        return
    name = old.get("benchmark.name") or old.get("data.name") or ("npz" if "data.path" in old else None)
    new = [f"benchmark={name}"] if name else []
    new += [f"benchmark.{key.split('.', 1)[1]}={value}" for key, value in old.items()
            if key not in ("benchmark.name", "data.name")]
    if _takes_path(name) and "data.path" not in old:
        new.append(next((o for o in overrides if _override_key(o) == "benchmark.path"), "benchmark.path=F"))
    choose = f"choose the data with benchmark={name} (a config group)" if name else \
        "the data's keys are benchmark.<key> (benchmark=<name> is a config group)"
    raise ConfigError(f"{' and '.join(old)} {'is' if len(old) == 1 else 'are'} gone: {choose}, e.g. "
                      f"`modnet {job} {' '.join(new)}`")


def _takes_path(name: str | None) -> bool:
    """Whether benchmark ``name`` reads ``benchmark.path`` in some command."""
    from scenarios.registry import get_benchmark

    entry = get_benchmark(name) if name else None
    return entry is not None and any("path" in keys for keys in entry.keys.values())


def _benchmark_choice(job: str, overrides: list[str]) -> str | None:
    """The ``benchmark=<name>`` the user chose, checked against the benchmarks of ``job``."""
    from scenarios.registry import COMMANDS, benchmark_names, get_benchmark

    choice = next((o.partition("=")[2] for o in overrides if _override_key(o) == "benchmark"), None)
    if choice is None or job not in COMMANDS:
        return choice
    choices = benchmark_names(job)
    if choice in choices:
        return choice
    entry = get_benchmark(choice)
    why = f" ({entry.description})" if entry is not None else ""
    raise ConfigError(f"{job} cannot use benchmark={choice}{why}; choose one of benchmark="
                      f"{', '.join(choices)}")


def _read_keys(job: str, name: str | None) -> tuple[str, ...] | None:
    """The keys of benchmark ``name``'s file that ``job`` reads (registry), or None for a job without a
    benchmark; a name the registry does not hold gets the keys ``job`` reads in any benchmark."""
    from scenarios.registry import COMMANDS, command_keys, get_benchmark

    if job not in COMMANDS:
        return None
    entry = get_benchmark(name) if name else None
    return entry.reads(job) if entry is not None and job in entry.commands else command_keys()[job]


def _refuse_unread_benchmark_keys(job: str, overrides: list[str], base: DictConfig) -> None:
    """An override of a benchmark key that ``job`` does not read would be ignored: stop instead."""
    keys = _read_keys(job, base.benchmark.get("name") if "benchmark" in base else None) or ()
    for override in overrides:
        key = _override_key(override)
        if key.startswith("benchmark.") and key.split(".")[1] not in keys:
            raise ConfigError(f"benchmark.{key.split('.')[1]} is for other commands, not {job}; "
                              f"{job} reads benchmark.{{{','.join(k for k in base.benchmark if k != 'name')}}} "
                              f"here (the data: benchmark=<name>)")


def keep_benchmark_keys(job: str, cfg: DictConfig) -> DictConfig:
    """Drop from ``cfg.benchmark`` the keys that ``job`` does not read (the benchmark file serves every command)."""
    keys = _read_keys(job, cfg.benchmark.get("name")) if "benchmark" in cfg else None
    if keys is not None:
        with open_dict(cfg.benchmark):
            for key in [k for k in cfg.benchmark if k not in keys]:
                del cfg.benchmark[key]
    return cfg


def _explain(err: Exception, base: DictConfig) -> str:
    msg = str(err).strip().splitlines()
    first = msg[0] if msg else repr(err)
    if "not in struct" in str(err) or "Could not override" in str(err) or "Key '" in str(err):
        key = _quoted(str(err))
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(base, parent) if parent else base
        while parent and not isinstance(node, DictConfig):  # a typo in a parent (trian.epochs): name that one
            parent, _, leaf = parent.rpartition(".")
            node = OmegaConf.select(base, parent) if parent else base
        valid = sorted(node.keys()) if isinstance(node, DictConfig) else []
        close = difflib.get_close_matches(leaf, valid, n=1)
        hint = f" Did you mean {(parent + '.' if parent else '') + close[0]!r}?" if close else ""
        return f"unknown config key {key!r}.{hint} Valid keys{' under ' + parent if parent else ' at the top'}: " \
               f"{', '.join(valid)}"
    if "Could not find" in str(err) or "Available options" in str(err):
        return " ".join(line.strip() for line in msg if line.strip())
    return f"bad override: {first}"


def _quoted(text: str) -> str:
    for q in ("'", '"'):
        parts = text.split(q)
        if len(parts) >= 3:
            return parts[1]
    return text


# keys (by their last name) that take a word besides a value of their type: (words, type)
NAMED_VALUES = {"mem_size": (("match",), int),  # a buffer sized to modnet's stored bytes (strategies/memory.py)
                "patterns_per_exp": (("match",), int)}
# keys whose default is the word "auto" that also take true / false
AUTO_OR_BOOL = ("channels_last",)
# keys whose default is a bool that also take a name (train.compile: a torch.compile backend)
BOOL_OR_NAME = ("compile",)


def check_types(cfg: DictConfig, base: DictConfig, path: str = "") -> None:
    """Each value must have its default's type (ints are accepted where a float is expected), or for a key of
    ``NAMED_VALUES`` be one of its words or a value of its type (whichever the default is)."""
    for key in cfg.keys():
        where = f"{path}{key}"
        if key not in base:
            continue  # a config group the user switched to: its own defaults define it
        new, old = cfg[key], base[key]
        if isinstance(old, DictConfig) and isinstance(new, DictConfig):
            check_types(new, old, where + ".")
            continue
        words, named_type = NAMED_VALUES.get(str(key), ((), None))
        if old is None or new is None or new in words:
            continue
        if str(key) in AUTO_OR_BOOL and isinstance(new, bool):
            continue
        if str(key) in BOOL_OR_NAME and isinstance(new, str):
            continue
        if isinstance(old, ListConfig):
            if not isinstance(new, ListConfig):
                raise ConfigError(f"config {where} must be a list like {OmegaConf.to_container(old)}, got {new!r}")
            continue
        expected = named_type if named_type is not None and old in words else type(old)
        ok = isinstance(new, expected) and not (expected is int and isinstance(new, bool))
        if expected is float and isinstance(new, int) and not isinstance(new, bool):
            ok = True
        if not ok:
            forms = ("true, false or auto" if str(key) in AUTO_OR_BOOL else
                     "true, false or a torch.compile backend's name" if str(key) in BOOL_OR_NAME else
                     f"{expected.__name__} or {' / '.join(words)}" if words else expected.__name__)
            raise ConfigError(f"config {where} must be {forms} (default {old!r}), got {type(new).__name__} {new!r}")


def check_choice(name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ConfigError(f"config {name}={value!r} is not valid; choose one of {', '.join(map(str, choices))}")


# choices of the network's config keys, read by the early checks (modnet.validate) and by the network builder
# (modnet.nets.build): defined here, below both
GATES = ("topk", "none")     # model.gate
MODULES = ("sync", "none")   # model.modules
TRANSFORM_COPIES = ("auto", "all", "one", "replace")  # task_inference.transform_copies


def transform_copies(copies, rows: float, heads_for_inference: bool) -> str:
    """``task_inference.transform_copies`` checked and resolved: ``auto`` is CSI's full batch (``all``) where
    the heads pick the task, else ``replace`` (the batch's own rows; measured: the accuracy of ``one`` at
    the batch's size, configs/training.yaml), or ``one`` where ``transform_rows`` < 1 (``replace`` transforms
    every row of the batch, so it takes rows = 1 only)."""
    copies = str(copies)
    check_choice("task_inference.transform_copies", copies, TRANSFORM_COPIES)
    if copies == "replace" and rows < 1.0:
        raise ConfigError(f"task_inference.transform_copies=replace feeds every row of the batch to the transform "
                          f"heads: it needs task_inference.transform_rows=1 (got {rows}), or transform_copies=one")
    if copies == "auto":
        return "all" if heads_for_inference else "replace" if rows >= 1.0 else "one"
    return copies


def check_share(name: str, value, meaning: str) -> float:
    """A config share in (0, 1]: the value as a float, else one ConfigError line naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
        raise ConfigError(f"config {name}={value!r} must be a number in (0, 1] ({meaning})")
    return float(value)


def with_absolute_data_paths(cfg: DictConfig) -> DictConfig:
    """A copy of ``cfg`` with ``benchmark.path`` and ``benchmark.root`` made absolute (against the working
    directory): what a run's config.yaml records, so that ``modnet explain run_dir=`` finds the data from any
    directory (a relative npz path was read against the explain command's directory)."""
    import copy

    bcfg = cfg.get("benchmark")
    if not isinstance(bcfg, DictConfig):
        return cfg
    out = copy.deepcopy(cfg)
    for key in ("path", "root"):
        value = out.benchmark.get(key)
        if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
            out.benchmark[key] = str(Path(value).expanduser().absolute())
    return out


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but no CUDA device is available; use device=auto or device=cpu")
    for kind in ("mps", "xpu"):  # torch.device() accepts both; the first tensor put there raised a traceback
        backend = getattr(torch.backends, kind, None) if kind == "mps" else getattr(torch, kind, None)
        if name.startswith(kind) and not (backend is not None and backend.is_available()):
            raise ConfigError(f"device={name} but this torch build or machine has no {kind.upper()} device; use "
                              "device=auto or device=cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device={name!r} is not a device torch knows; use auto, cpu, cuda or cuda:N") from None


def run_as_script(main, prog: str) -> None:
    """``python -m`` entry of a command: exit with main()'s code, or 2 and one line on a config error."""
    import sys

    try:
        sys.exit(main())
    except ConfigError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        sys.exit(2)
