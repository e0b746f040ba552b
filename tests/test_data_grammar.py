"""One data grammar in every command: ``benchmark=<name>`` (the config group configs/benchmark/) chooses the data
of modnet cl, gzsl and explain; old spellings and benchmarks a command cannot use stop with one line."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from modnet.cli import main
from modnet.config import BENCHMARK_CHOICES, BENCHMARK_KEYS, compose

ROOT = Path(__file__).resolve().parents[1]
GZSL_FAST = ["progress=false", "threads=1", "train.epochs=5", "niwt.map_epochs=30", "niwt.max_iterations=30",
             "ale.epochs=1", "eszsl.grid_log10=[0]", "calibration.mode=none",
             "clswgan.hidden=64", "clswgan.critic_hidden=64", "clswgan.epochs=1", "clswgan.syn_num=20",
             "clswgan.classifier_epochs=2", "clswgan.pretrain_epochs=2"]
EXPLAIN_FAST = ["train.epochs=3", "explain.module_grids=false",
                "train.cl_overrides=['model.hidden=16','model.cnn_channels=[4,8]']"]


def _zero_shot_npz(path: Path, images: bool) -> dict:
    """Six classes, each a mix of four prototypes weighted by its attribute row; classes 4 and 5 unseen
    (their samples only in x_test). ``images``: the prototypes are quadrants of a 1 x 8 x 8 image."""
    rng = np.random.default_rng(0)
    attributes = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [1, 1, 0, 0], [0, 0, 1, 1]],
                          dtype=np.float64)
    if images:
        prototypes = np.zeros((4, 1, 8, 8), np.float32)
        for q, (r, c) in enumerate([(0, 0), (0, 4), (4, 0), (4, 4)]):
            prototypes[q, 0, r:r + 4, c:c + 4] = 1.0
    else:
        prototypes = rng.normal(size=(4, 12)).astype(np.float32)
    labels = np.repeat(np.arange(6), 30)
    x = np.tensordot(attributes[labels], prototypes, axes=1).astype(np.float32)
    x += 0.1 * rng.normal(size=x.shape).astype(np.float32)
    unseen = [4, 5]
    is_train = ~np.isin(labels, unseen) & (np.arange(len(labels)) % 3 != 0)
    arrays = dict(x_train=x[is_train], y_train=labels[is_train], x_test=x[~is_train], y_test=labels[~is_train],
                  class_attributes=attributes, unseen_classes=np.array(unseen),
                  class_names=np.array(["ant", "bee", "cat", "dog", "antbee", "catdog"]),
                  attribute_names=np.array(["up_left", "up_right", "down_left", "down_right"]))
    np.savez(path, **arrays)
    return arrays


# -- the same word in every command -----------------------------------------------------------------------
def test_gzsl_on_a_zero_shot_npz_reports_its_classes(tmp_path, capsys):
    _zero_shot_npz(tmp_path / "animals.npz", images=False)
    assert main(["gzsl", "benchmark=npz", f"benchmark.path={tmp_path / 'animals.npz'}", *GZSL_FAST,
                 f"output_dir={tmp_path / 'out'}"]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["benchmark"] == "animals"
    assert (results["seen_classes"], results["unseen_classes"]) == ([0, 1, 2, 3], [4, 5])
    assert results["class_names"] == ["ant", "bee", "cat", "dog", "antbee", "catdog"]
    assert set(results["methods"]) == {"niwt", "niwt_positives", "eszsl", "ale", "clswgan"}
    assert "GZSL on animals: 4 seen / 2 unseen classes" in capsys.readouterr().out
    saved = (tmp_path / "out" / "config.yaml").read_text()
    gzsl_keys_only = r"^benchmark:\n  name: npz\n  path: \S+animals.npz\n  backbone_features: false\n  hidden: null\n(?!  )"
    assert re.search(gzsl_keys_only, saved, re.M)


def test_explain_on_an_image_npz(tmp_path):
    """explain trains the modular network on the npz's seen classes and names its modules with the npz's
    attribute names."""
    _zero_shot_npz(tmp_path / "quadrants.npz", images=True)
    # 80 training images: at EXPLAIN_FAST's 3 epochs (6 steps) and 4-channel CNN the network stayed at chance with
    # every HAT mask off, and its modules were "explained" anyway; the default widths learn it in 30 epochs
    assert main(["explain", "benchmark=npz", f"benchmark.path={tmp_path / 'quadrants.npz'}", "train.epochs=30",
                 "explain.module_grids=false", f"output_dir={tmp_path / 'out'}"]) == 0
    results = json.loads((tmp_path / "out" / "explanations.json").read_text())
    trained = results["source"]["trained_here"]
    assert trained["data"] == "quadrants" and trained["classes"] == [0, 1, 2, 3]  # the unseen 4, 5 held out
    assert trained["accuracy_matrix"][-1][0] > 0.9
    named = {name for layer in results["modules"].values() for module in layer.values()
             for name, _ in module["attributes"]}
    assert named and named <= {"up_left", "up_right", "down_left", "down_right"}


def test_explain_on_digits_reads_the_benchmark_keys(tmp_path, capsys):
    assert main(["explain", "benchmark=digits", "benchmark.unseen_classes=[1,4]", *EXPLAIN_FAST,
                 "train.experiences=2", "progress=false", f"output_dir={tmp_path}"]) == 0
    results = json.loads((tmp_path / "explanations.json").read_text())
    assert results["source"]["trained_here"]["classes"] == [0, 2, 3, 5, 6, 7, 8, 9]
    # progress (the key was refused): a line per experience trained, with the accuracy the source records, and
    # a line per explained layer with its module count
    out = capsys.readouterr().out
    rows = results["source"]["trained_here"]["accuracy_matrix"]
    for i, row in enumerate(rows):
        assert (f"[explain seed 0] modnet experience {i + 1}/2 trained: mean accuracy on the {i + 1} seen "
                f"{sum(row[:i + 1]) / (i + 1):.4f}") in out
    for layer, modules in results["modules"].items():
        assert f"[explain] task {results['task']}, {layer}: {len(modules)} modules explained (" in out


def test_gzsl_on_an_xlsa17_folder(tmp_path):
    """benchmark=awa2 benchmark.path=DIR reads the xlsa17 files there (the real split, synthetic features)."""
    from scenarios.zsl import load_zsl_from_config
    from tests.test_zsl_data import DATA, _synthetic_res101

    shutil.copy(DATA / "AWA2" / "att_splits.mat", tmp_path / "att_splits.mat")
    _synthetic_res101(DATA / "AWA2", tmp_path / "res101.mat")
    cfg = compose("gzsl", ["benchmark=awa2", f"benchmark.path={tmp_path}", "benchmark.attributes=att"])
    data = load_zsl_from_config(cfg.benchmark)
    assert data.name == "AWA2" and (len(data.seen_classes), len(data.unseen_classes)) == (40, 10)
    assert data.attributes.shape == (50, 85)


@pytest.mark.parametrize("job", sorted(BENCHMARK_CHOICES))
def test_every_benchmark_of_a_command_gives_it_exactly_its_keys(job):
    for name in BENCHMARK_CHOICES[job]:
        benchmark = compose(job, [f"benchmark={name}"]).benchmark
        assert benchmark.name == name and set(benchmark) <= set(BENCHMARK_KEYS[job])
    assert "unseen_classes" not in compose("cl").benchmark and "n_experiences" not in compose("gzsl").benchmark


def test_every_benchmark_key_is_commented_and_read_by_a_command_that_takes_it():
    for path in sorted((ROOT / "configs" / "benchmark").glob("*.yaml")):
        lines = path.read_text().splitlines()
        settings = [line for line in lines if re.match(r"^\s*\w+:\s*\S", line)]
        assert settings and all("#" in line for line in settings), path.name
        readers = [job for job, names in BENCHMARK_CHOICES.items() if path.stem in names]
        keys = {line.split(":")[0] for line in lines if re.match(r"^\w+:", line)}
        assert readers and keys <= {k for job in readers for k in BENCHMARK_KEYS[job]}, path.name


# -- one line, exit code 2, before any work ---------------------------------------------------------------
def _one_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and not captured.out, captured
    return lines[0]


@pytest.mark.parametrize("argv, new", [
    (["gzsl", "benchmark.name=npz"], "`modnet gzsl benchmark=npz benchmark.path=F`"),
    (["gzsl", "benchmark.name=npz", "benchmark.path=z.npz"], "`modnet gzsl benchmark=npz benchmark.path=z.npz`"),
    (["gzsl", "benchmark.name=awa2"], "`modnet gzsl benchmark=awa2 benchmark.path=F`"),
    (["explain", "data.name=npz"], "`modnet explain benchmark=npz benchmark.path=F`"),
    (["explain", "data.name=npz", "data.path=i.npz"], "`modnet explain benchmark=npz benchmark.path=i.npz`"),
    (["explain", "data.path=i.npz"], "`modnet explain benchmark=npz benchmark.path=i.npz`"),
    # the README promised the new spelling in every command; cl and gzsl said only "unknown config key"
    (["cl", "data.path=x.npz"], "`modnet cl benchmark=npz benchmark.path=x.npz`"),
    (["cl", "data.name=mnist"], "`modnet cl benchmark=mnist`"),
    (["gzsl", "data.name=awa2"], "`modnet gzsl benchmark=awa2 benchmark.path=F`"),
    (["explain", "data.unseen_classes=[1,4]"], "`modnet explain benchmark.unseen_classes=[1,4]`"),
    (["cl", "benchmark.name=mnist"], "`modnet cl benchmark=mnist`"),
])
def test_old_spellings_name_the_new_one(argv, new, capsys):
    assert main(argv) == 2
    line = _one_line(capsys)
    assert line.startswith(f"modnet {argv[0]}: error: ") and " gone: " in line and new in line


@pytest.mark.parametrize("job, name, choices", [
    ("cl", "awa2", "digits, npz, mnist, fmnist, cifar10, cifar100, mnist1d"),
    ("explain", "awa2", "digits, npz"),
    ("explain", "cub", "digits, npz"),
    ("explain", "mnist", "digits, npz"),
    ("gzsl", "cifar10", "digits, npz, awa2, cub"),
    ("gzsl", "nope", "digits, npz, awa2, cub"),
])
def test_a_benchmark_the_command_cannot_use_names_its_choices(job, name, choices, capsys):
    assert main([job, f"benchmark={name}"]) == 2
    line = _one_line(capsys)
    assert f"benchmark={name}" in line and line.endswith(f"choose one of benchmark={choices}")


def test_cl_refuses_awa2_before_importing_the_job():
    code = ("import sys; from modnet.cli import main; rc = main(['cl', 'benchmark=awa2']); "
            "print(rc, 'torch' in sys.modules, 'modnet.jobs.cl' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.stdout.split() == ["2", "False", "False"]
    assert len(run.stderr.strip().splitlines()) == 1 and "zero-shot" in run.stderr


@pytest.mark.parametrize("argv, words", [
    # the keys it names are those it reads: not benchmark.name (refused as gone: the data are benchmark=<name>)
    (["gzsl", "benchmark.n_experiences=3"], ["benchmark.n_experiences", "for other commands, not gzsl",
                                             "benchmark.{test_fraction,image,unseen_classes}", "benchmark=<name>"]),
    (["explain", "benchmark.image=true"], ["benchmark.image", "for other commands, not explain"]),
    (["cl", "benchmark.unseen_classes=[1]"], ["benchmark.unseen_classes", "for other commands, not cl"]),
    (["gzsl", "benchmark.images=true"], ["Did you mean 'benchmark.image'"]),
    (["gzsl", "benchmark=npz", "benchmark.pth=z.npz"], ["Did you mean 'benchmark.path'"]),
])
def test_keys_a_command_does_not_read_stop_in_one_line(argv, words, capsys):
    assert main(argv) == 2
    line = _one_line(capsys)
    assert all(w in line for w in words), line
