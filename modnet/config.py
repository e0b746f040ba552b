"""Configs: Hydra composes ``configs/<job>.yaml`` with the user's overrides; we check them before any work.

Hydra/OmegaConf do composition, override parsing and struct mode (unknown keys); this module turns their
exceptions into one line that names the problem and the valid choices, and adds a type check of every value
against the type of its default (Hydra does not type-check plain YAML configs).

The data of every command is the config group ``benchmark`` (``configs/benchmark/<name>.yaml``), chosen with
``benchmark=<name>``. A benchmark file holds the keys of every command that takes it (each key's comment names
them); a command gets only the keys it reads, and an override of another command's key is an error.
"""
from __future__ import annotations

import difflib
from typing import Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

# command (config name) -> the benchmarks it takes
BENCHMARK_CHOICES = {
    "cl": ("digits", "npz", "mnist", "fmnist", "cifar10", "cifar100"),
    "gzsl": ("digits", "npz", "awa2", "cub"),
    "explain": ("digits", "npz"),
}
# command -> the keys of a benchmark file it reads
BENCHMARK_KEYS = {
    "cl": ("name", "path", "root", "download", "variant", "n_experiences", "test_fraction", "image", "class_order",
           "max_train_samples"),
    "gzsl": ("name", "path", "unseen_classes", "test_fraction", "image", "attributes", "resnet"),
    "explain": ("name", "path", "unseen_classes", "test_fraction"),
}
# what the benchmarks that some commands cannot use give (named in the error)
BENCHMARK_LIMITS = {name: "zero-shot image features, no images" for name in ("awa2", "cub")} | \
    {name: "continual-learning images without class attributes" for name in ("mnist", "fmnist", "cifar10", "cifar100")}


class ConfigError(ValueError):
    """A bad config key or value, reported as one line before any training starts."""


def compose(job: str, overrides: Sequence[str] = ()) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    overrides = list(overrides)
    _refuse_old_data_spelling(job, overrides)
    choice = _benchmark_choice(job, overrides)
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="configs", version_base=None):
        base = hydra_compose(config_name=job, overrides=[f"benchmark={choice}"] if choice else [])
        keep_benchmark_keys(job, base)
        try:
            cfg = hydra_compose(config_name=job, overrides=overrides)
        except (HydraException, OmegaConfBaseException) as err:
            raise ConfigError(_explain(err, base)) from None
    OmegaConf.set_struct(cfg, True)
    check_types(cfg, base)
    _refuse_unread_benchmark_keys(job, overrides, base)
    return keep_benchmark_keys(job, cfg)


def _override_key(override: str) -> str:
    return override.partition("=")[0].lstrip("+~")


def _refuse_old_data_spelling(job: str, overrides: list[str]) -> None:
    """``benchmark.name=X`` (gzsl) and ``data.*`` (explain) chose the data before ``benchmark`` became a config
    group in every command: stop with the new spelling of the same choice (``benchmark.name`` in any command:
    it would rename the chosen benchmark, not choose another)."""
    old = {_override_key(o): o.partition("=")[2] for o in overrides
           if _override_key(o) == "benchmark.name" or (job == "explain" and _override_key(o).startswith("data."))}
    if not old:
        return
    name = old.get("benchmark.name") or old.get("data.name") or ("npz" if "data.path" in old else None)
    new = [f"benchmark={name}"] if name else []
    new += [f"benchmark.{key.split('.', 1)[1]}={value}" for key, value in old.items()
            if key not in ("benchmark.name", "data.name")]
    if name in ("npz", "awa2", "cub") and "data.path" not in old:
        new.append(next((o for o in overrides if _override_key(o) == "benchmark.path"), "benchmark.path=F"))
    choose = f"choose the data with benchmark={name} (a config group)" if name else \
        "the data's keys are benchmark.<key> (benchmark=<name> is a config group)"
    raise ConfigError(f"{' and '.join(old)} {'is' if len(old) == 1 else 'are'} gone: {choose}, e.g. "
                      f"`modnet {job} {' '.join(new)}`")


def _benchmark_choice(job: str, overrides: list[str]) -> str | None:
    """The ``benchmark=<name>`` the user chose, checked against the benchmarks of ``job``."""
    choice = next((o.partition("=")[2] for o in overrides if _override_key(o) == "benchmark"), None)
    choices = BENCHMARK_CHOICES.get(job)
    if choice is None or choices is None or choice in choices:
        return choice
    why = f" ({BENCHMARK_LIMITS[choice]})" if choice in BENCHMARK_LIMITS else ""
    raise ConfigError(f"{job} cannot use benchmark={choice}{why}; choose one of benchmark="
                      f"{', '.join(choices)}")


def _refuse_unread_benchmark_keys(job: str, overrides: list[str], base: DictConfig) -> None:
    """An override of a benchmark key that ``job`` does not read would be ignored: stop instead."""
    keys = BENCHMARK_KEYS.get(job, ())
    for override in overrides:
        key = _override_key(override)
        if key.startswith("benchmark.") and key.split(".")[1] not in keys:
            raise ConfigError(f"benchmark.{key.split('.')[1]} is for other commands, not {job}; "
                              f"{job} reads benchmark.{{{','.join(base.benchmark)}}} here")


def keep_benchmark_keys(job: str, cfg: DictConfig) -> DictConfig:
    """Drop from ``cfg.benchmark`` the keys that ``job`` does not read (the benchmark file serves every command)."""
    if job in BENCHMARK_KEYS and "benchmark" in cfg:
        with open_dict(cfg.benchmark):
            for key in [k for k in cfg.benchmark if k not in BENCHMARK_KEYS[job]]:
                del cfg.benchmark[key]
    return cfg


def _explain(err: Exception, base: DictConfig) -> str:
    msg = str(err).strip().splitlines()
    first = msg[0] if msg else repr(err)
    if "not in struct" in str(err) or "Could not override" in str(err) or "Key '" in str(err):
        key = _quoted(str(err))
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(base, parent) if parent else base
        valid = sorted(node.keys()) if isinstance(node, DictConfig) else []
        close = difflib.get_close_matches(leaf, valid, n=1)
        hint = f" Did you mean {(parent + '.' if parent else '') + close[0]!r}?" if close else ""
        return f"unknown config key {key!r}.{hint} Valid keys{' under ' + parent if parent else ''}: " \
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


def check_types(cfg: DictConfig, base: DictConfig, path: str = "") -> None:
    """Each value must have its default's type (ints are accepted where a float is expected)."""
    for key in cfg.keys():
        where = f"{path}{key}"
        if key not in base:
            continue  # a config group the user switched to: its own defaults define it
        new, old = cfg[key], base[key]
        if isinstance(old, DictConfig) and isinstance(new, DictConfig):
            check_types(new, old, where + ".")
            continue
        if old is None or new is None:
            continue
        if isinstance(old, ListConfig):
            if not isinstance(new, ListConfig):
                raise ConfigError(f"config {where} must be a list like {OmegaConf.to_container(old)}, got {new!r}")
            continue
        expected = type(old)
        ok = isinstance(new, expected) and not (expected is int and isinstance(new, bool))
        if expected is float and isinstance(new, int) and not isinstance(new, bool):
            ok = True
        if not ok:
            raise ConfigError(f"config {where} must be {expected.__name__} (default {old!r}), got "
                              f"{type(new).__name__} {new!r}")


def check_choice(name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ConfigError(f"config {name}={value!r} is not valid; choose one of {', '.join(map(str, choices))}")


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but no CUDA device is available; use device=auto or device=cpu")
    return torch.device(name)


def run_as_script(main, prog: str) -> None:
    """``python -m`` entry of a command: exit with main()'s code, or 2 and one line on a config error."""
    import sys

    try:
        sys.exit(main())
    except ConfigError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        sys.exit(2)
