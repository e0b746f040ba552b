"""Configs: Hydra composes ``configs/<job>.yaml`` with the user's overrides; we check them before any work.

Hydra/OmegaConf do composition, override parsing and struct mode (unknown keys); this module turns their
exceptions into one line that names the problem and the valid choices, and adds a type check of every value
against the type of its default (Hydra does not type-check plain YAML configs).
"""
from __future__ import annotations

import difflib
from typing import Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf


class ConfigError(ValueError):
    """A bad config key or value, reported as one line before any training starts."""


def compose(job: str, overrides: Sequence[str] = ()) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="configs", version_base=None):
        base = hydra_compose(config_name=job)
        try:
            cfg = hydra_compose(config_name=job, overrides=list(overrides))
        except (HydraException, OmegaConfBaseException) as err:
            raise ConfigError(_explain(err, base)) from None
    OmegaConf.set_struct(cfg, True)
    check_types(cfg, base)
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
