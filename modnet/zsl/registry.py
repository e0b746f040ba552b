"""Every GZSL method by name, one self-registering file each (the pattern of ``strategies/registry.py``).

A method turns the modular network trained on the seen classes (``SeenNetwork``) into class scores over all
classes, seen and unseen, for the test-seen and the test-unseen samples. Each lives in its own file
``modnet/zsl/<name>.py`` with its hyper-parameters documented beside it and its config block in
``configs/gzsl.yaml``; the file registers its scoring function

    @register_zsl_method(NAME, candidates=...)
    def score(cfg, net: SeenNetwork, params: dict) -> (scores on test-seen, scores on test-unseen)

with scores [n, C] whose column c is dataset class c. ``candidates(cfg)`` lists the hyper-parameter settings
that ``modnet gzsl`` chooses among on a class-disjoint validation split (default: the one setting ``{}``); the
chosen setting comes back as ``params`` and is written into results.json beside the method's U, S, H.

The entry files import nothing heavy at import time: listing the names (``zsl_method_names``) to check a
config runs no method.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable

from modnet.config import check_choice

# files of this package that are not methods
_NOT_ENTRIES = {"registry", "seen_network"}


def _one_setting(cfg) -> list[dict]:
    return [{}]


@dataclass(frozen=True)
class ZSLMethodEntry:
    """A registered GZSL method: ``score(cfg, net, params)`` and its hyper-parameter ``candidates(cfg)``."""

    name: str
    score: Callable
    candidates: Callable = _one_setting


ZSL_METHODS: dict[str, ZSLMethodEntry] = {}


def register_zsl_method(name: str, *, candidates: Callable = _one_setting) -> Callable:
    """Decorator of a method file's scoring function: ``@register_zsl_method("mine")``."""

    def register(score: Callable) -> Callable:
        if name in ZSL_METHODS and ZSL_METHODS[name].score is not score:
            raise ValueError(f"GZSL method {name!r} is registered twice")
        ZSL_METHODS[name] = ZSLMethodEntry(name, score, candidates)
        return score

    return register


def _load_entries() -> None:
    import modnet.zsl as zsl

    for info in pkgutil.iter_modules(zsl.__path__):
        if info.name not in _NOT_ENTRIES and not info.name.startswith("_"):
            importlib.import_module(f"modnet.zsl.{info.name}")


def zsl_method_names() -> list[str]:
    """The registered methods' names, sorted: the registry's order is the order their files were first imported
    (a process that imported one entry early listed it first)."""
    _load_entries()
    return sorted(ZSL_METHODS)


def get_zsl_method(name: str) -> ZSLMethodEntry:
    check_choice("methods", name, zsl_method_names())
    return ZSL_METHODS[name]
