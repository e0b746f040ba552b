"""The benchmark registry (scenarios/registry.py, one file per benchmark in scenarios/benchmarks/): the
configs match it, the command tables come from it, a new benchmark is one file plus its yaml, and MNIST-1D."""
from __future__ import annotations

import importlib
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from modnet.cli import main
from modnet.config import ConfigError, compose
from scenarios import build_benchmark
from scenarios.registry import (BENCHMARKS, benchmark_entries, command_benchmarks, command_keys, get_benchmark,
                                register_benchmark, unregister_benchmark)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "benchmark"

# the tables modnet.config kept by hand before the registry (the reference the derived ones must reproduce)
OLD_CHOICES = {
    "cl": ("digits", "npz", "mnist", "fmnist", "cifar10", "cifar100"),
    "gzsl": ("digits", "npz", "awa2", "cub"),
    "explain": ("digits", "npz"),
}
OLD_KEYS = {
    "cl": ("name", "path", "root", "download", "variant", "n_experiences", "test_fraction", "image", "class_order",
           "max_train_samples"),
    "gzsl": ("name", "path", "unseen_classes", "test_fraction", "image", "attributes", "resnet"),
    "explain": ("name", "path", "unseen_classes", "test_fraction"),
}
OLD_LIMITS = {name: "zero-shot image features, no images" for name in ("awa2", "cub")} | \
    {name: "continual-learning images without class attributes" for name in ("mnist", "fmnist", "cifar10", "cifar100")}
# what was added since: MNIST-1D, for cl; gzsl's backbone_features (baseline_features=auto) and hidden (the
# networks' width on the benchmark's inputs)
MNIST1D_KEYS = ("num_samples", "train_split", "seed")
ADDED_KEYS = {"cl": MNIST1D_KEYS, "gzsl": ("backbone_features", "hidden")}


def _one_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and not captured.out, captured
    return lines[0]


# -- the configs and the registry agree --------------------------------------------------------------------
def test_every_benchmark_config_has_an_entry_and_every_entry_a_config():
    files = {path.stem for path in CONFIGS.glob("*.yaml")}
    entries = {entry.name for entry in benchmark_entries() if entry.config_dir is None}
    assert files == entries
    for name in sorted(files):
        entry, cfg = get_benchmark(name), OmegaConf.load(CONFIGS / f"{name}.yaml")
        assert cfg.name == name and entry.module == f"scenarios.benchmarks.{name}"
        # every key of the file is read by some command of the benchmark, and every key it declares is there
        assert set(cfg) == {key for keys in entry.keys.values() for key in keys}, name


def test_the_derived_tables_are_the_old_hand_kept_ones():
    import modnet.config as config

    derived = command_benchmarks()
    assert derived == config.BENCHMARK_CHOICES
    assert {job: tuple(n for n in names if n != "mnist1d") for job, names in derived.items()} == OLD_CHOICES
    assert derived["cl"][-1] == "mnist1d"  # the only addition, last in cl's list
    keys = command_keys()
    assert keys == config.BENCHMARK_KEYS
    assert set(keys) == set(OLD_KEYS)
    for job, old in OLD_KEYS.items():
        assert set(keys[job]) == set(old) | set(ADDED_KEYS.get(job, ())), job
    for name, what in OLD_LIMITS.items():  # what a command that cannot use them says (the same words)
        assert what in config.BENCHMARK_LIMITS[name]


def test_each_command_gets_the_keys_its_benchmark_declares():
    for job, names in command_benchmarks().items():
        for name in names:
            assert set(compose(job, [f"benchmark={name}"]).benchmark) == set(get_benchmark(name).reads(job))


def test_listing_the_benchmarks_imports_no_torch():
    code = ("import sys; from modnet.config import BENCHMARK_CHOICES; from scenarios.registry import "
            "benchmark_entries; n = len(benchmark_entries()); print(n, 'torch' in sys.modules, "
            "'numpy' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.stdout.split() == [str(len(list(CONFIGS.glob("*.yaml")))), "False", "False"], run.stderr


def test_dispatch_refuses_unknown_names():
    from scenarios.zsl import load_zsl_benchmark

    with pytest.raises(ValueError, match=r"unknown benchmark 'awa2'; choose one of \('digits', 'npz', 'mnist'"):
        build_benchmark(OmegaConf.create({"name": "awa2"}), "task", 0)
    with pytest.raises(ValueError, match="unknown benchmark 'mnist': choose digits, npz, awa2 or cub"):
        load_zsl_benchmark("mnist")


def test_a_declaration_without_its_loader_or_keys_is_refused():
    with pytest.raises(ValueError, match="no arrays"):
        register_benchmark("broken", commands=("cl",), keys={"cl": ()}, description="x")(type("B", (), {}))
    with pytest.raises(ValueError, match="keys must name"):
        register_benchmark("broken", commands=("cl", "gzsl"), keys={"cl": ()}, description="x")
    with pytest.raises(ValueError, match="commands must be"):
        register_benchmark("broken", commands=("train",), keys={"train": ()}, description="x")
    assert "broken" not in BENCHMARKS


# -- a new benchmark: one file and its yaml ----------------------------------------------------------------
TOY_ENTRY = '''
"""``toy``: two Gaussian blobs per class (a test's benchmark)."""
from scenarios.registry import register_benchmark

NAME = "toy"


@register_benchmark(NAME, commands=("cl", "gzsl"), config_dir=CONFIG_DIR,
                    description="toy blobs: no images",
                    keys={"cl": ("size", "n_experiences"), "gzsl": ("unseen",)})
class Toy:
    @staticmethod
    def arrays(bcfg):
        import torch

        g = torch.Generator().manual_seed(0)
        y = torch.arange(4).repeat_interleave(bcfg.size)
        x = torch.randn(len(y), 3, generator=g) + y[:, None].float()
        return x, y, x.clone(), y.clone()

    @staticmethod
    def zero_shot(path=None, *, unseen=None, seed=0, **_):
        from scenarios.zsl import load_digits_zsl

        data = load_digits_zsl((3,), seed=seed)
        data.name = "toy"
        return data
'''
TOY_YAML = """\
name: toy                 # all: the benchmark
size: 6                   # cl: samples per class
n_experiences: 2          # cl: experiences
unseen: [3]               # gzsl: unseen classes
"""


@pytest.fixture
def toy(tmp_path, monkeypatch):
    (tmp_path / "benchmark").mkdir()
    (tmp_path / "benchmark" / "toy.yaml").write_text(TOY_YAML)
    (tmp_path / "toy_benchmark_entry.py").write_text(f"CONFIG_DIR = {str(tmp_path)!r}\n{TOY_ENTRY}")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        importlib.import_module("toy_benchmark_entry")
        yield get_benchmark("toy")
    finally:
        unregister_benchmark("toy")
        sys.modules.pop("toy_benchmark_entry", None)


def test_a_new_benchmark_is_one_file_and_its_yaml(toy):
    assert command_benchmarks()["cl"][-1] == "toy" and "toy" in command_benchmarks()["gzsl"]
    cl = compose("cl", ["benchmark=toy", "benchmark.size=5"])
    assert dict(cl.benchmark) == {"name": "toy", "size": 5, "n_experiences": 2}
    info = build_benchmark(cl.benchmark, "task", 0)  # dispatched to its arrays()
    assert info.name == "split-toy" and info.input_shape == (3,) and info.n_experiences == 2
    assert len(info.benchmark.train_stream[0].dataset) == 2 * 5
    gzsl = compose("gzsl", ["benchmark=toy"])
    assert dict(gzsl.benchmark) == {"name": "toy", "unseen": [3]}
    from scenarios.zsl import load_zsl_from_config

    assert load_zsl_from_config(gzsl.benchmark).name == "toy"  # dispatched to its zero_shot()


def test_a_new_benchmark_is_refused_by_the_other_commands_in_one_line(toy, capsys):
    assert main(["explain", "benchmark=toy"]) == 2
    line = _one_line(capsys)
    assert line == "modnet explain: error: explain cannot use benchmark=toy (toy blobs: no images); choose one of " \
                   "benchmark=digits, npz"
    assert main(["gzsl", "benchmark=toy", "benchmark.size=3"]) == 2
    assert "benchmark.size is for other commands, not gzsl" in _one_line(capsys)
    with pytest.raises(ConfigError, match="benchmark.unseen is for other commands, not cl"):
        compose("cl", ["benchmark=toy", "benchmark.unseen=[1]"])


# -- MNIST-1D ----------------------------------------------------------------------------------------------
def test_mnist1d_is_generated_offline_balanced_and_deterministic():
    pytest.importorskip("mnist1d")
    from scenarios.benchmarks.mnist1d import generate

    random.seed(7)
    np.random.seed(7)
    before = random.random(), np.random.rand()
    random.seed(7)
    np.random.seed(7)
    x, y, xt, yt = generate(600, 0.8, seed=3)
    assert (random.random(), np.random.rand()) == before  # the global random state is left as it was
    assert x.shape == (480, 40) and xt.shape == (120, 40) and x.dtype == torch.float32 and y.dtype == torch.long
    assert torch.bincount(torch.cat([y, yt]), minlength=10).tolist() == [60] * 10  # num_samples // 10 each
    assert set(y.tolist()) == set(yt.tolist()) == set(range(10))
    again = generate(600, 0.8, seed=3)
    assert all(torch.equal(a, b) for a, b in zip((x, y, xt, yt), again))
    assert not torch.equal(generate(600, 0.8, seed=4)[0], x)
    with pytest.raises(ValueError, match="num_samples"):
        generate(10)


@pytest.mark.slow
def test_cl_on_mnist1d(tmp_path):
    pytest.importorskip("mnist1d")
    cfg = compose("cl", ["benchmark=mnist1d", "benchmark.num_samples=600"])
    assert dict(cfg.benchmark) == {"name": "mnist1d", "num_samples": 600, "train_split": 0.8, "seed": 42,
                                   "n_experiences": 5, "class_order": None}
    info = build_benchmark(cfg.benchmark, "class", 0)
    assert info.input_shape == (40,) and info.n_classes == 10 and not info.is_image
    assert [len(c) for c in info.global_task_classes] == [2] * 5
    assert sorted(c for cs in info.global_task_classes for c in cs) == list(range(10))
    assert main(["cl", "benchmark=mnist1d", "benchmark.num_samples=600", "strategies=[naive]", "train.epochs=1",
                 "progress=false", f"output_dir={tmp_path}"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["benchmark"] == "split-mnist1d" and results["n_experiences"] == 5
    assert [len(c) for c in results["classes_per_experience"]] == [2] * 5
    layers = results["strategies"]["naive"]["network"]["layers"]
    assert layers and re.search(r"^benchmark:\n  name: mnist1d\n", (tmp_path / "config.yaml").read_text(), re.M)
