"""Every benchmark by name, one self-registering file each (as ``strategies/registry.py`` for strategies).

A benchmark is a file ``scenarios/benchmarks/<name>.py`` plus its config ``configs/benchmark/<name>.yaml``
(the config group ``benchmark`` of every command). The file declares, with
``@register_benchmark(NAME, commands=..., keys=..., description=...)`` on a class holding its loaders:

commands     which commands can use it: ``cl`` (continual streams: the class has ``arrays``), ``gzsl``
             (zero-shot data: the class has ``zero_shot``), ``explain`` (zero-shot data as images: Grad-CAM
             needs a spatial layout, so only benchmarks that can give images)
keys         command -> the keys of the benchmark's file that command reads (``name`` is always read); a
             command gets only these, and an override of another command's key stops with one line
description  one line saying what the data are, named when a command cannot use the benchmark (e.g.
             "zero-shot image features, no images")
arrays       ``arrays(bcfg) -> (x_train, y_train, x_test, y_test)`` tensors for ``split_benchmark`` /
             ``permuted_benchmark`` (x: (N, D) vectors or (N, C, H, W) images, y: class ids)
zero_shot    ``zero_shot(path, *, seed, unseen_classes, test_fraction, images, attributes, resnet_arch,
             resnet_weights, allow_download, device, progress) -> scenarios.zsl.ZSLData`` (take what you use,
             ``**_`` the rest)
check        optional ``check(bcfg, command)``: the config's problems a loader would meet only after the
             command's imports and folder (a missing path, files absent with download off, class ids out of
             range), raised as one ValueError / FileNotFoundError line with numpy at most
             (``modnet.validate`` calls it before any heavy import)
N_CLASSES    optional class attribute: the number of classes when the benchmark fixes it (``benchmark.class_order``
             must then list 0..N_CLASSES-1 once, ``n_experiences`` divide it); absent: read from the data

The tables ``modnet.config`` checks a command line against (which command takes which benchmark, which keys
it reads) are derived from these declarations, and ``scenarios.build_benchmark`` /
``scenarios.zsl.load_zsl_benchmark`` dispatch through them. The entry files import nothing heavy at import
time (their loaders import torch, torchvision, ... when called): listing the benchmarks to check a config
costs no torch import.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

#: the commands that read a benchmark -> the loader they call
COMMANDS = {"cl": "arrays", "gzsl": "zero_shot", "explain": "zero_shot"}


@dataclass(frozen=True)
class BenchmarkEntry:
    """A registered benchmark (see the module docstring).

    order        position in listings and error messages (then the name)
    config_dir   a folder holding ``benchmark/<name>.yaml`` for a benchmark defined outside this repository
                 (added to Hydra's search path); None: ``configs/benchmark/<name>.yaml``
    module       the file that registered it
    check        the loaders' ``check(bcfg, command)`` (None: nothing to check before loading)
    n_classes    the loaders' ``N_CLASSES`` (None: the data decide)
    """

    name: str
    commands: tuple[str, ...]
    keys: Mapping[str, tuple[str, ...]]
    description: str
    arrays: Callable | None = None
    zero_shot: Callable | None = None
    order: int = 100
    config_dir: str | None = None
    module: str = ""
    check: Callable | None = None
    n_classes: int | None = None

    def reads(self, command: str) -> tuple[str, ...]:
        """The keys of this benchmark's file that ``command`` reads (empty if it cannot use it)."""
        return self.keys.get(command, ())


BENCHMARKS: dict[str, BenchmarkEntry] = {}


def register_benchmark(name: str, *, commands: Sequence[str], keys: Mapping[str, Sequence[str]],
                       description: str, order: int = 100, config_dir: str | None = None) -> Callable:
    """Decorator of a benchmark file's loader class: ``@register_benchmark("mine", commands=("cl",), ...)``."""
    commands = tuple(commands)
    unknown = [c for c in commands if c not in COMMANDS]
    if unknown or not commands:
        raise ValueError(f"benchmark {name!r}: commands must be some of {list(COMMANDS)}, got {list(commands)}")
    if set(keys) != set(commands):
        raise ValueError(f"benchmark {name!r}: keys must name the keys of each of its commands {list(commands)}, "
                         f"got keys for {list(keys)}")
    if not description or "\n" in description:
        raise ValueError(f"benchmark {name!r} needs a one-line description")
    read = {c: ("name", *(k for k in keys[c] if k != "name")) for c in commands}

    def register(loaders):
        for command in commands:
            if not callable(getattr(loaders, COMMANDS[command], None)):
                raise ValueError(f"benchmark {name!r} is declared for {command} but has no {COMMANDS[command]}() "
                                 "loader")
        entry = BenchmarkEntry(name, commands, read, description, getattr(loaders, "arrays", None),
                               getattr(loaders, "zero_shot", None), order,
                               str(config_dir) if config_dir is not None else None, loaders.__module__,
                               getattr(loaders, "check", None), getattr(loaders, "N_CLASSES", None))
        if name in BENCHMARKS and BENCHMARKS[name].module != entry.module:
            raise ValueError(f"benchmark {name!r} is registered twice ({BENCHMARKS[name].module}, {entry.module})")
        BENCHMARKS[name] = entry
        return loaders

    return register


def unregister_benchmark(name: str) -> None:
    """Forget a benchmark (tests that register one of their own)."""
    BENCHMARKS.pop(name, None)


def _load_entries() -> None:
    import scenarios.benchmarks as package

    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package.__name__}.{info.name}")


def benchmark_entries(command: str | None = None) -> list[BenchmarkEntry]:
    """The registered benchmarks (those ``command`` can use), in listing order."""
    _load_entries()
    entries = sorted(BENCHMARKS.values(), key=lambda e: (e.order, e.name))
    return [e for e in entries if command is None or command in e.commands]


def benchmark_names(command: str | None = None) -> list[str]:
    return [e.name for e in benchmark_entries(command)]


def get_benchmark(name: str) -> BenchmarkEntry | None:
    """The entry of ``name``, or None when no benchmark has that name."""
    _load_entries()
    return BENCHMARKS.get(name)


def command_benchmarks() -> dict[str, tuple[str, ...]]:
    """command -> the benchmarks it takes (``modnet.config.BENCHMARK_CHOICES``)."""
    return {command: tuple(benchmark_names(command)) for command in COMMANDS}


def command_keys() -> dict[str, tuple[str, ...]]:
    """command -> the keys of a benchmark file it reads, over all its benchmarks (``BENCHMARK_KEYS``)."""
    table = {}
    for command in COMMANDS:
        keys: dict[str, None] = {}
        for entry in benchmark_entries(command):
            keys.update(dict.fromkeys(entry.reads(command)))
        table[command] = tuple(keys)
    return table


def config_dirs() -> list[str]:
    """Folders of benchmarks defined outside this repository, for Hydra's search path."""
    return list(dict.fromkeys(e.config_dir for e in benchmark_entries() if e.config_dir))
