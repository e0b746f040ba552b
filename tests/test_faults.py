"""Fault injection (issue 14): every bad input is one clear line before any work: exit code 2, one stderr
line, no traceback, the key or file named, nothing written."""
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from modnet.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _rejected(capsys, argv, *words, out: Path | None = None):
    capsys.readouterr()
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err + captured.out, captured.err
    for w in words:
        assert w in lines[0], lines[0]
    if out is not None:
        assert not out.exists() or not any(out.iterdir())  # nothing written
    return lines[0]


@pytest.mark.parametrize("override, words", [
    ("strategies=[]", ["strategies", "empty"]),
    ("strategies=[naive,naive]", ["strategies", "naive", "more than once"]),
    ("seeds=[]", ["seeds", "empty"]),
    ("seeds=[0,0]", ["seeds", "more than once"]),
    ("train.epochs=0", ["train.epochs", "positive"]),
    ("train.epochs=-1", ["train.epochs", "positive"]),
    ("train.batch_size=0", ["train.batch_size", "positive"]),
    ("train.eval_batch_size=-4", ["train.eval_batch_size", "positive"]),
    ("benchmark.n_experiences=0", ["benchmark.n_experiences", "positive"]),
    ("loggers=[txt]", ["loggers", "txt", "text"]),
    ("model.arch=vgg", ["model.arch", "mlp"]),
    ("task_inference.transform_rows=0", ["task_inference.transform_rows", "(0, 1]"]),
    ("train.channels_last=yes", ["train.channels_last", "auto"]),
    ("task_inference.transform_rows=1.5", ["task_inference.transform_rows", "(0, 1]"]),
    ("threads=0", ["threads=0", "positive integer or null"]),  # 0 once meant "torch's default" silently
    ("task_inference.transform_copies=two", ["task_inference.transform_copies", "replace"]),
    # replace transforms every row of the batch: a share of the rows cannot be left out
    ("task_inference.transform_copies=replace task_inference.transform_rows=0.5",
     ["transform_copies=replace", "transform_rows=1", "0.5"]),
    # a deleted key or a null without a default to fall back on crashed after the imports, with a traceback
    ("~train.epochs", ["~train.epochs", "deletes", "train.epochs=20"]),
    ("~strategies", ["~strategies", "deletes", "strategies="]),
    ("~model", ["~model", "config group"]),
    ("train.epochs=null", ["train.epochs=null", "positive integer"]),
    ("strategies=null", ["strategies=null", "list"]),
    ("model.hidden=null", ["model.hidden=None", "integer"]),
    ("model.resnet_width=0", ["model.resnet_width=0", "integer"]),
    # Hydra's flags: a multi-run is modnet sweep
    ("-m seed=0,1", ["-m", "modnet sweep"]),
    ("--cfg job", ["--cfg", "--help"]),
    ("seed=3 seeds=[0]", ["seed is not read", "seeds=[0]"]),
    # hnet (in the default list) builds an MLP: refused before the other strategies train, with the list without it
    ("benchmark.image=true model.arch=cnn", ["hnet", "model.arch=cnn", "strategies=[modnet,naive,"]),
    # one class per task: every head right by construction (accuracy 1.0 for all, untrained experiences too)
    ("benchmark.n_experiences=10", ["one class per task", "at most 5", "scenario=class"]),
])
def test_bad_cl_values_are_one_line_before_work(tmp_path, capsys, override, words):
    _rejected(capsys, ["cl", *override.split(" "), f"output_dir={tmp_path / 'o'}"], *words, out=tmp_path / "o")


@pytest.mark.parametrize("override", ["benchmark.unseen_classes=[1,4]", "benchmark=npz", "train.epochs=3"])
def test_explain_with_run_dir_refuses_the_data_and_training_keys_it_does_not_read(tmp_path, capsys, override):
    """With run_dir the network and its data are the run's: benchmark.unseen_classes=[1,4] on an mnist1d run ran
    with rc 0 and recorded digits' classes in its config.yaml. One line naming the key, nothing written."""
    _rejected(capsys, ["explain", f"run_dir={tmp_path}", override, f"output_dir={tmp_path / 'o'}"],
              override.split("=")[0], "run_dir", out=tmp_path / "o")


def test_bench_threads_zero_is_one_line_before_work(capsys):
    _rejected(capsys, ["bench", "threads=0"], "threads=0", "positive integer or null")


def _npz(path, **change):
    rng = np.random.default_rng(0)
    arrays = dict(x_train=rng.normal(size=(40, 5)).astype(np.float32), y_train=np.arange(40) % 4,
                  x_test=rng.normal(size=(8, 5)).astype(np.float32), y_test=np.arange(8) % 4)
    arrays.update(change)
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("change, words", [
    (dict(y_train=(np.arange(40) % 4) + 0.5), ["y_train", "non-integer", "0.5"]),
    (dict(y_train=np.array(["cat", "dog", "owl", "elk"] * 10)), ["y_train", "strings", "'cat'"]),
    (dict(y_train=np.array([3, 7, 9, 3] * 10), y_test=np.array([3, 7, 9, 3] * 2)), ["y_train", "0..C-1", "[3, 7, 9]"]),
    (dict(x_test=np.zeros((8, 6), np.float32)), ["x_test", "(6,)", "(5,)"]),
    (dict(y_test=np.array([0, 1, 2, 3, 4, 0, 1, 2])), ["y_test", "[4]"]),
    # images with their channels last: "too small for 2 pooling blocks; use fewer model.cnn_channels" after the imports
    (dict(x_train=np.zeros((40, 12, 12, 3), np.float32), x_test=np.zeros((8, 12, 12, 3), np.float32)),
     ["x_train", "channels last", "np.transpose(x, (0, 3, 1, 2))"]),
    # one class trained to accuracy 1.0 with rc 0; complex inputs lost their imaginary part with a torch warning
    (dict(y_train=np.zeros(40, np.int64), y_test=np.zeros(8, np.int64)), ["y_train", "single class"]),
    (dict(x_train=np.ones((40, 5), np.complex64)), ["x_train", "complex"]),
])
def test_bad_npz_is_one_line_before_work(tmp_path, capsys, change, words):
    path = _npz(tmp_path / "d.npz", **change)
    _rejected(capsys, ["cl", "benchmark=npz", f"benchmark.path={path}", "benchmark.n_experiences=2",
                       f"output_dir={tmp_path / 'o'}"], "d.npz", *words, out=tmp_path / "o")


@pytest.mark.parametrize("job", ["cl", "gzsl"])
def test_a_bare_npy_is_one_line(tmp_path, capsys, job):
    """A .npy (named .npy, or renamed .npz) ended in "TypeError: 'numpy.ndarray' object does not support the
    context manager protocol": np.load gives the array itself, which the loader's own check never saw."""
    for name in ("x.npy", "x.npz"):
        path = tmp_path / name
        with open(path, "wb") as f:
            np.save(f, np.zeros((4, 3), np.float32))
        _rejected(capsys, [job, "benchmark=npz", f"benchmark.path={path}", f"output_dir={tmp_path / 'o'}"],
                  name, "single .npy array", "numpy.savez", out=tmp_path / "o")


def test_npz_classes_that_do_not_split_into_the_experiences(tmp_path, capsys):
    path = _npz(tmp_path / "d.npz")
    _rejected(capsys, ["cl", "benchmark=npz", f"benchmark.path={path}", "benchmark.n_experiences=3",
                       f"output_dir={tmp_path / 'o'}"], "4 classes", "n_experiences=3", out=tmp_path / "o")


@pytest.mark.parametrize("args, words", [
    (["cl", "strategies=[nope]"], ("nope", "naive")),
    # gzsl's method names, calibration modes and explain's backends (rejected after 7-8 s of imports before)
    (["gzsl", "methods=[niwtt]"], ("niwtt", "niwt")),
    (["gzsl", "calibration.mode=foo"], ("calibration.mode", "validate")),
    (["explain", "explain.backend=gradcam"], ("explain.backend", "captum")),
])
def test_typo_rejected_fast_without_heavy_imports(tmp_path, args, words):
    """`modnet cl strategies=[nope]` and the like: exit 2 with one line, torch and Avalanche never imported (what
    makes the rejection fast; its time is printed, not asserted: timings belong in benchmarks, not tests)."""
    code = ("import sys, time; t = time.perf_counter(); from modnet.cli import main; "
            f"rc = main({args!r}); "
            "print(rc, 'torch' in sys.modules, 'avalanche' in sys.modules, time.perf_counter() - t)")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - t0
    rc, torch_loaded, avalanche_loaded, seconds = proc.stdout.split()
    assert (rc, torch_loaded, avalanche_loaded) == ("2", "False", "False"), proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and all(w in lines[0] for w in words), proc.stderr
    print(f"{args} rejected in {float(seconds):.2f} s in-process, {wall:.2f} s wall")


def test_choice_copies_match_their_modules():
    from modnet import validate
    from modnet.eval.metrics import LOGGERS
    from modnet.nets.build import ARCHS, HEADS, TASK_INFERENCE, TRANSFORM_COPIES, TRANSFORM_HEADS, TRANSFORM_ROWS
    from scenarios.base import SCENARIOS

    assert (validate.SCENARIOS, validate.ARCHS, validate.LOGGERS) == (SCENARIOS, ARCHS, LOGGERS)
    assert (validate.HEADS, validate.TASK_INFERENCE, validate.TRANSFORM_HEADS) == \
        (HEADS, TASK_INFERENCE, TRANSFORM_HEADS)
    assert (validate.TRANSFORM_ROWS, validate.TRANSFORM_COPIES) == (TRANSFORM_ROWS, TRANSFORM_COPIES)
    from modnet.jobs.bench import RATIO_LOOPS

    assert validate.BENCH_LOOPS == tuple(RATIO_LOOPS)
    from modnet.explain.gradcam import BACKENDS
    from modnet.zsl.registry import zsl_method_names

    assert (validate.ZSL_METHODS, validate.EXPLAIN_BACKENDS) == (tuple(zsl_method_names()), BACKENDS)
    from modnet.methods.niwt import MAP_FITS, UNSEEN_BIASES, UNSEEN_INITS, UNSEEN_SCALES
    from modnet.zsl.seen_network import BASELINE_FEATURES

    assert (validate.BASELINE_FEATURES, validate.NIWT_INITS, validate.NIWT_BIASES, validate.NIWT_SCALES,
            validate.NIWT_MAP_FITS) == (BASELINE_FEATURES, UNSEEN_INITS, UNSEEN_BIASES, UNSEEN_SCALES, MAP_FITS)
    assert set(validate.NIWT_METHODS) == {n for n in zsl_method_names() if n.startswith("niwt")}
    from modnet.nets.models import HEAD_TASK_INFERENCE
    from modnet.nets.modules import ESTIMATORS
    from strategies.plugins.hnet import INITS

    assert (validate.ESTIMATORS, validate.HEAD_TASK_INFERENCE, validate.HNET_INITS) == \
        (ESTIMATORS, HEAD_TASK_INFERENCE, INITS)


@pytest.mark.parametrize("flag", ["--help", "-h"])
@pytest.mark.parametrize("job", ["cl", "gzsl", "explain", "bench"])
def test_job_help_prints_its_options_with_their_comments(capsys, job, flag):
    assert main([job, flag]) == 0
    out = capsys.readouterr().out
    config = (ROOT / "configs" / f"{job}.yaml").read_text()
    assert out.startswith(f"usage: modnet {job}") and config.strip() in out
    if "  - training" in config:  # the shared network / loop / strategy options are documented too
        assert (ROOT / "configs" / "training.yaml").read_text().strip() in out


def test_sweep_help_shows_the_jobs_options_with_their_comments(capsys):
    """`modnet sweep --help` printed Hydra's bare config dump (no comments, keys cl does not read)."""
    assert main(["sweep", "--help"]) == 0
    out = capsys.readouterr().out
    assert "Hydra multi-run" in out and "usage: modnet cl" in out
    assert "# HAT paper: SGD lr 0.05" in out  # configs/training.yaml's comment on train.lr


@pytest.mark.parametrize("args", ["--help", "cl --help", "run --help", "--version"])
def test_help_piped_into_a_reader_that_stops_early_is_quiet(args):
    """`modnet --help | head -1` printed a BrokenPipeError traceback (only `modnet <job> --help` was guarded)."""
    proc = subprocess.run(["sh", "-c", f"'{sys.executable}' -m modnet.cli {args} | head -0"], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_help_of_a_benchmark_and_version(capsys):
    assert main(["cl", "--help", "benchmark=npz"]) == 0
    out = capsys.readouterr().out
    assert "benchmark=npz" in out and "n_experiences: 5" in out and "# cl: experiences" in out
    assert main(["cl", "-h"]) == 0 and "mnist1d" in capsys.readouterr().out  # the benchmark list
    from modnet import __version__

    assert main(["--version"]) == 0 and capsys.readouterr().out.strip() == f"modnet {__version__}"


def test_accuracy_curves_are_scaled_to_the_data_and_one_seed_has_no_std(tmp_path):
    from modnet.eval.results import aggregate_seeds, curve_limits, format_table, summarize, write_results

    lo, hi = curve_limits([[0.95, 0.97, 0.99], [0.93, 0.96, 1.0]])
    assert 0.9 < lo < 0.93 and 1.0 < hi <= 1.02
    assert curve_limits([[0.1, 0.9]]) == pytest.approx((0.02, 0.98))
    R = [[0.99, 0.5], [0.97, 0.98]]
    one = aggregate_seeds([{**summarize(R), "train_seconds": 1.0}])
    assert "±" not in format_table({"naive": one})
    write_results(tmp_path, {"benchmark": "b", "scenario": "task", "n_experiences": 2, "strategies": {"naive": one}})
    assert (tmp_path / "accuracy_curves.png").stat().st_size > 1000
    assert not list(tmp_path.glob("*.tmp"))  # written through temporary files, renamed


def test_progress_bars_only_on_a_terminal(tmp_path, capsys):
    """Not a terminal (pytest captures stdout): no tqdm, one line per experience."""
    assert main(["cl", "strategies=[naive]", "train.epochs=1", "benchmark.n_experiences=2",
                 f"output_dir={tmp_path}"]) == 0
    out = capsys.readouterr()
    lines = [line for line in out.out.splitlines() if "experience" in line and "trained" in line]
    assert len(lines) == 2 and "it/s" not in out.out + out.err and "\r" not in out.out + out.err


def _zsl_npz(path, **change):
    rng = np.random.default_rng(0)
    arrays = dict(x_train=rng.normal(size=(30, 5)).astype(np.float32), y_train=np.arange(30) % 3,
                  x_test=rng.normal(size=(20, 5)).astype(np.float32), y_test=np.arange(20) % 5,
                  class_attributes=rng.random((5, 4)), unseen_classes=np.array([3, 4]))
    arrays.update(change)
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("change, words", [
    (dict(class_attributes=np.random.default_rng(1).random((7, 4))), ["7 rows", "[5, 6]", "y_train"]),
    (dict(y_test=np.arange(20) % 4), ["unseen classes [4]", "y_test"]),
    (dict(y_train=(np.arange(30) % 3) + 0.25), ["y_train", "non-integer"]),
    (dict(y_test=np.array(["a"] * 20)), ["y_test", "strings"]),
    (dict(x_test=np.zeros((20, 6), np.float32)), ["x_test", "(6,)"]),
    # unseen_classes were truncated ([3.6, 4.2] ran as [3, 4]), repeats and a 2-d array taken silently
    (dict(unseen_classes=np.array([3.6, 4.2])), ["unseen_classes", "non-integer"]),
    (dict(unseen_classes=np.array([3, 3, 4])), ["unseen_classes", "[3]", "more than once"]),
    (dict(unseen_classes=np.array([[3, 4]])), ["unseen_classes", "1-d", "(1, 2)"]),
    # found after the imports (~7 s), by the data's own validation
    (dict(class_names=np.array(["a", "b", "c"])), ["class_names", "3 names for 5"]),
    (dict(attribute_names=np.array(["p", "q", "r", "s", "t"])), ["attribute_names", "5 names for 4"]),
    # the inputs were never checked: NaN test inputs gave a full table with rc 0, NaN training inputs failed after
    # training (in SynC's words), 1-d x in a traceback
    (dict(x_test=np.full((20, 5), np.nan, np.float32)), ["x_test", "NaN or infinite"]),
    (dict(x_train=np.where(np.arange(150).reshape(30, 5) == 7, np.inf, 0.0).astype(np.float32)),
     ["x_train", "NaN or infinite"]),
    (dict(x_train=np.zeros(30, np.float32), x_test=np.zeros(20, np.float32)), ["x_train", "(30,)", "(N, D)"]),
    # an unseen class with another class's attribute row: H = 0 with rc 0 (no method can tell them apart)
    (dict(class_attributes=np.array([[0, 0, 1, 1], [1, 0, 0, 1], [0, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 1.0]])),
     ["unseen class 4", "same class_attributes row", "[1]"]),
    # a seen class of one training sample failed in scikit-learn's words inside the validation split, seed-dependent
    (dict(y_train=np.array([0] + [1, 2] * 14 + [1])), ["seen classes [0]", "fewer than 2"]),
])
def test_bad_zero_shot_npz_is_one_line(tmp_path, change, words):
    """Zero-shot .npz (scenarios.zsl.load_npz_zsl, what gzsl and explain load): attribute rows = classes,
    every unseen class in the test set, integer labels, equal widths: otherwise one ValueError line."""
    from scenarios.zsl import load_npz_zsl

    assert load_npz_zsl(_zsl_npz(tmp_path / "good.npz")).unseen_classes == [3, 4]
    with pytest.raises(ValueError) as err:
        load_npz_zsl(_zsl_npz(tmp_path / "z.npz", **change))
    msg = str(err.value)
    assert "\n" not in msg and "z.npz" in msg
    for w in words:
        assert w in msg, msg


def test_sweep_with_one_bad_job_runs_no_job(tmp_path, capsys):
    """The bad value is in the second combination: nothing is launched, nothing written."""
    _rejected(capsys, ["sweep", "strategies=[naive],[naive,naive]", f"hydra.sweep.dir={tmp_path / 's'}"],
              "naive", "more than once", out=tmp_path / "s")


@pytest.mark.parametrize("job", ["gzsl", "explain"])
def test_bad_zero_shot_npz_stops_the_command_before_heavy_imports(tmp_path, job):
    """`modnet gzsl|explain benchmark=npz` with phantom attribute rows: exit 2, one line naming the file, and
    neither torch nor Avalanche imported (the check runs in modnet.validate, before the job)."""
    bad = _zsl_npz(tmp_path / "phantom.npz", class_attributes=np.random.default_rng(1).random((7, 4)))
    code = (f"import sys; from modnet.cli import main; rc = main([{job!r}, 'benchmark=npz', "
            f"'benchmark.path={bad}', 'output_dir={tmp_path / 'out'}']); "
            "print(rc, 'torch' in sys.modules, 'avalanche' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.split() == ["2", "False", "False"], proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "phantom.npz" in lines[0] and "7 rows" in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, words", [
    # a repeated unseen class ran with one unseen class fewer, recorded as listed (ZSL accuracy 1.000)
    (["gzsl", "benchmark.unseen_classes=[2,2]"], ("benchmark.unseen_classes", "[2]", "more than once")),
    (["explain", "benchmark.unseen_classes=[3,1,3]"], ("benchmark.unseen_classes", "[3]")),
    # scikit-learn's test_size message, without the key, after the imports
    (["gzsl", "benchmark.test_fraction=1.5"], ("benchmark.test_fraction=1.5", "(0, 1)")),
    (["cl", "benchmark.test_fraction=0"], ("benchmark.test_fraction=0", "(0, 1)")),
    # a repeated method was scored twice into one row
    (["gzsl", "methods=[niwt,eszsl,niwt]"], ("methods", "niwt", "more than once")),
    # matplotlib's multi-line message, after the network had trained
    (["explain", "explain.cmap=notacmap"], ("explain.cmap=notacmap", "colour map")),
    (["explain", "explain.signed_cmap=RdBu_rr"], ("explain.signed_cmap", "RdBu_r")),
])
def test_zero_shot_and_explain_values_are_one_line_before_work(tmp_path, capsys, args, words):
    _rejected(capsys, [*args, f"output_dir={tmp_path / 'o'}"], *words, out=tmp_path / "o")


def test_explain_names_its_own_experiences_key(tmp_path, capsys):
    """8 seen digits do not split into 3 experiences: the message named cl's benchmark.n_experiences."""
    line = _rejected(capsys, ["explain", "train.experiences=3", "train.epochs=1", f"output_dir={tmp_path / 'o'}"],
                     "train.experiences", "8 classes")
    assert "benchmark.n_experiences" not in line


def test_gzsl_gate_layer_beyond_the_network_stops_before_training(tmp_path, capsys):
    """gate.layers=[5] on the digits images' CNN (3 masked layers; an MLP's are counted from model.n_layers in
    the config): one line before the first network trains (it trained validation split 1 and scored its methods
    first)."""
    capsys.readouterr()
    assert main(["gzsl", "gate.layers=[5]", "methods=[eszsl]", "train.epochs=1", "progress=false",
                 "benchmark.image=true", f"output_dir={tmp_path / 'o'}"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "gate layer 5" in lines[0] and "3 masked layers" in lines[0], captured.err
    assert "network trained" not in captured.out


# Inputs that used to stop only after torch's and Avalanche's imports (~6 s) with the output folder already made,
# most with another library's words (torch's "Invalid learning rate", Avalanche's n_experiences message naming
# neither key, torchvision's "Dataset not found"): each is now one line from modnet.validate.
LATE_INPUTS = [
    # modnet ddp's launcher: its own options and the data-parallel settings (torch was imported with the launcher)
    (["ddp", "--nproc", "0"], ("--nproc", ">= 1")),
    (["ddp", "--nproc=abc"], ("--nproc", "'abc'")),
    (["ddp", "--nproc", "2", "strategies=[naive]", "train.batch_size=33"],
     ("train.batch_size=33", "divisible", "2 processes")),
    (["ddp", "strategies=[modnet,agem]"], ("agem", "data-parallel")),
    (["ddp", "train.lr=-1"], ("train.lr=-1", ">= 0")),
    (["cl", "benchmark=npz"], ("benchmark=npz", "benchmark.path")),
    (["gzsl", "benchmark=npz"], ("benchmark=npz", "benchmark.path")),
    (["cl", "benchmark=npz", "benchmark.path=/nonexistent/d.npz"], ("/nonexistent/d.npz", "not found")),
    (["cl", "benchmark=mnist", "benchmark.root={tmp}/nomnist"], ("MNIST", "nomnist", "benchmark.download=true")),
    (["cl", "benchmark=cifar100", "benchmark.root={tmp}"], ("CIFAR-100", "cifar-100-python", "benchmark.download")),
    (["gzsl", "benchmark=awa2"], ("benchmark=awa2", "benchmark.path")),
    (["gzsl", "benchmark=cub", "benchmark.path={tmp}"], ("res101.mat", "images/")),
    (["gzsl", "benchmark.unseen_classes=[3,12]"], ("benchmark.unseen_classes", "[3, 12]", "0..9")),
    (["explain", "benchmark.unseen_classes=[0,1,2,3,4,5,6,7,8,9]"], ("benchmark.unseen_classes", "not all")),
    (["gzsl", "methods=[]"], ("methods", "empty", "niwt")),
    (["cl", "device=tpu"], ("device='tpu'", "cuda:N")),
    (["cl", "train.lr=-0.1"], ("train.lr=-0.1", ">= 0")),
    (["cl", "train.cnn_lr=-1"], ("train.cnn_lr=-1", ">= 0")),
    (["gzsl", "niwt.lr=-0.5"], ("niwt.lr=-0.5", ">= 0")),
    (["gzsl", "clswgan.classifier_lr=-1"], ("clswgan.classifier_lr", ">= 0")),
    (["cl", "benchmark.class_order=[0,1,2]"], ("benchmark.class_order", "0..9")),
    (["cl", "benchmark.class_order=[0,1,2,3,4,5,6,7,8,10]"], ("benchmark.class_order", "0..9")),
    (["cl", "benchmark.class_order=[0,a]"], ("benchmark.class_order", "permutation")),
    (["cl", "benchmark=mnist1d", "benchmark.n_experiences=3"], ("10 classes", "benchmark.n_experiences=3")),
    (["cl", "benchmark.n_experiences=4"], ("10 classes", "benchmark.n_experiences=4", "divisor")),
    (["bench", "samples.mlp=0"], ("samples.mlp=0", "> 0")),
    # keys the run would not read: it ran without them, saying nothing
    (["gzsl", "calibration.gamma=2"], ("calibration.gamma", "calibration.mode=fixed", "validation splits")),
    (["gzsl", "calibration.mode=none", "calibration.gamma=2"], ("calibration.gamma", "now none")),
    (["gzsl", "strategies=[modnet,ewc]"], ("strategies", "continual.enabled=true")),
    (["gzsl", "continual.n_experiences=2"], ("continual.n_experiences", "continual.enabled=true")),
    # a TypeError traceback from list(0) in every command
    (["cl", "seeds=0"], ("seeds=0", "seeds=[0,1,2]")),
    (["gzsl", "seeds=3"], ("seeds=3", "a list")),
    (["cl", "seed=-1"], ("seed=-1", ">= 0")),
    # sklearn's make_blobs message after every timed loop; a header reporting a batch larger than the data
    (["bench", "sync_sizes=[0]"], ("sync_sizes", ">= 2")),
    (["bench", "sync_sizes=[-5,100]"], ("sync_sizes", ">= 2")),
    (["bench", "archs=[mlp]", "samples.mlp=10"], ("samples.mlp=10", "batch_size.mlp=128")),
    # 0 ran on all samples, -5 on all but the last 5
    (["cl", "benchmark.max_train_samples=0"], ("benchmark.max_train_samples=0", "> 0")),
    (["cl", "benchmark.max_train_samples=-5"], ("benchmark.max_train_samples=-5", "> 0")),
    (["cl", "benchmark.variant=permute"], ("benchmark.variant", "permuted")),
    (["cl", "modules.k=0"], ("modules.k=0", "> 0")),
    (["cl", "train.valid_fraction=1.0"], ("train.valid_fraction=1.0", "below 1")),
    (["bench", "batch_size.cnn=-2"], ("batch_size.cnn=-2", "> 0")),
    # stop 48's audit: each was a traceback, an error after other strategies had trained, or a silent run
    (["gzsl", "benchmark.unseen_classes=[0,1,2,3,4,5,6,7]"], ("benchmark.unseen_classes", "2 of the 10", "at least 3")),
    (["cl", "model.n_layers=0"], ("model.n_layers=0", "> 0")),
    (["cl", "model.hidden=-4"], ("model.hidden=-4", "> 0")),
    (["cl", "model.hidden=0", "strategies=[naive]"], ("model.hidden=0", "> 0")),  # chance accuracy with rc 0
    (["cl", "model.cnn_channels=[]", "benchmark.image=true"], ("model.cnn_channels", "positive channel count")),
    (["cl", "modules.k_share=-1"], ("modules.k_share=-1", "[0, 1]")),
    (["cl", "modules.k_share=1.5"], ("modules.k_share=1.5", "[0, 1]")),
    (["cl", "hnet.batch_size=0"], ("hnet.batch_size=0", "> 0")),
    (["cl", "hnet.init=foo"], ("hnet.init", "hyperfan")),
    (["cl", "hnet.task_inference=foo"], ("hnet.task_inference", "entropy")),
    (["cl", "modules.estimator=foo"], ("modules.estimator", "gumbel")),
    (["cl", "hat.task_inference=foo"], ("hat.task_inference", "maxprob")),
    (["cl", "derpp.beta=-5"], ("derpp.beta=-5", ">= 0")),
    (["cl", "train.lr=inf"], ("train.lr=inf", "finite")),
    (["cl", "seeds=[-1]"], ("seeds", ">= 0")),
    (["cl", "modules.cluster.min_modules=5", "modules.cluster.max_modules=2"], ("min_modules=5", "max_modules=2")),
    (["cl", "train.momentum=-1"], ("train.momentum=-1", ">= 0")),
    (["cl", "model.dropout=1.5"], ("model.dropout=1.5", "[0, 1)")),
    (["bench", "mlp.in_dim=0"], ("mlp.in_dim=0", "> 0")),
    # clear lines, but after the job's imports (~6 s)
    (["cl", "benchmark=mnist1d", "benchmark.train_split=1.5"], ("benchmark.train_split=1.5", "(0, 1)")),
    (["gzsl", "calibration.val_splits=0"], ("calibration.val_splits=0", "> 0")),
    (["explain", "run_dir={tmp}/no-run"], ("run_dir", "no-run", "does not exist")),
    # explain's task and layers were checked after the network it explains had trained (~10 s)
    (["explain", "explain.task=99"], ("explain.task=99", "1 task", "train.experiences=1")),
    (["explain", "explain.task=-1"], ("explain.task=-1", ">= 0")),
    (["explain", "explain.layers=[7]"], ("explain.layers=[7]", "3 masked layers", "0..2")),
    (["explain", "train.cl_overrides=['model.arch=mlp','model.n_layers=1']", "explain.layers=[1]"],
     ("explain.layers=[1]", "model.n_layers", "1 masked layers")),
    (["explain", "explain.layers=[]"], ("explain.layers=[]", "null")),
    (["explain", "explain.top_k=0"], ("explain.top_k=0", ">= 1")),
    (["explain", "niwt.inverse_ridge=0"], ("niwt.inverse_ridge=0", "> 0")),
    # the forward map's keys changed no explanation (stop 54): gone from explain's config
    (["explain", "niwt.map_epochs=30"], ("unknown config key", "niwt.map_epochs")),
    (["explain", "train.cl_overrides=['model.gate=none']"], ("model.gate=none", "no module gates")),
    # refused by modnet.nets.build when each strategy's network was built, after the imports
    (["cl", "benchmark=mnist1d", "model.arch=cnn"], ("model.arch=cnn", "benchmark=mnist1d", "vectors", "mlp")),
    (["cl", "model.arch=resnet18"], ("model.arch=resnet18", "benchmark.image=true")),
    (["gzsl", "model.arch=cnn"], ("model.arch=cnn", "vectors", "benchmark.image=true")),
    (["cl", "model.modules=none"], ("model.gate=topk", "model.modules=none", "model.modules=sync")),
    (["cl", "scenario=class", "task_inference.method=ood", "model.transform_heads=never"],
     ("task_inference.method=ood", "model.transform_heads=never", "inference")),
    (["cl", "scenario=class", "model.arch=mlp", "task_inference.method=features", "task_inference.feature_layer=5"],
     ("task_inference.feature_layer", "masked layer 5", "0..1")),
    (["cl", "benchmark=mnist1d", "scenario=class", "task_inference.feature_extra_layers=[[2,0.5]]"],
     ("feature_extra_layers", "masked layer 2", "0..1")),
    # gzsl's gate layer on the MLP: after the imports (on digits' vectors, model.arch=auto: after training)
    (["gzsl", "gate.layers=[0,9]"], ("gate layer 9", "2 masked layers", "-2..1")),
    (["gzsl", "benchmark.image=true", "gate.layer=-4"], ("gate layer -4", "3 masked layers")),
    # "hold none of classes", after the imports; a cap below the class count leaves some class out whatever the data
    (["cl", "benchmark.max_train_samples=5"], ("benchmark.max_train_samples=5", "10 classes", "at least 10")),
    # the bench's image loops: an unpacking error, or "too small for 2 pooling blocks; use fewer
    # model.cnn_channels" (a key the bench lacks), after minutes of MLP loops
    (["bench", "image_shape=[3,2]"], ("image_shape=[3, 2]", "[channels, height, width]")),
    (["bench", "image_shape=[3,2,2]"], ("image_shape=[3, 2, 2]", "at least 4")),
    (["bench", "archs=[mlp,vgg]"], ("archs", "'vgg'", "resnet18")),
    # modnet.jobs.gzsl's own config checks (_check), after the imports (~6 s)
    (["gzsl", "niwt.init=bogus"], ("niwt.init", "'bogus'", "seen_centered")),
    (["gzsl", "niwt.bias=bogus"], ("niwt.bias", "'bogus'", "seen_mean")),
    (["gzsl", "niwt.scale=bogus"], ("niwt.scale", "'bogus'", "seen_budget")),
    (["gzsl", "niwt.map_fit=bogus"], ("niwt.map_fit", "'bogus'", "centered")),
    (["gzsl", "niwt.layer=null", "niwt.layers=[]"], ("niwt.layer", "masked-layer indices")),
    (["gzsl", "niwt.map_ridge=-1"], ("niwt.map_ridge=-1", ">= 0")),
    (["gzsl", "niwt.seen_budget=1.5"], ("niwt.seen_budget=1.5", "[0, 1)", "niwt.seen_budget=0.075")),
    (["gzsl", "niwt.map_fit=centered", "niwt.map_bias=false"], ("niwt.map_fit=centered", "niwt.map_bias=true")),
    (["gzsl", "model.head=cosine"], ("model.head=cosine", "niwt_positives", "methods=")),
    (["gzsl", "model.head=cosine", "methods=[niwt]", "niwt.scale=norm"], ("model.head=cosine", "niwt.scale=none")),
    (["gzsl", "baseline_features=bogus"], ("baseline_features", "'bogus'", "penultimate")),
    (["gzsl", "clswgan.features=bogus"], ("clswgan.features", "'bogus'", "penultimate")),
    (["gzsl", "large_train.clswgan.features=bogus"], ("large_train.clswgan.features", "'bogus'", "penultimate")),
    # a deleted key (Hydra's ~) is refused whatever it is; the large_train check it reached: the test below
    (["gzsl", "~clswgan.syn_num"], ("~clswgan.syn_num", "deletes config key", "clswgan.syn_num=300")),
    (["gzsl", "seen_network.hat_c=-1"], ("seen_network.hat_c=-1", ">= 0", "hat.c")),
    (["gzsl", "calibration.val_min_classes=0"], ("calibration.val_min_classes=0", "> 0")),
    (["gzsl", "gate.quantile=1.5"], ("gate.quantile=1.5", "(0, 1]")),
    (["gzsl", "gate.quantiles=[0,0.5]"], ("gate.quantiles=[0, 0.5]", "(0, 1]")),
    (["gzsl", "gate.layer=a"], ("gate.layer", "masked-layer indices", "['a']")),
    (["gzsl", "gate.shrinkage=2"], ("gate.shrinkage=2", "[0, 1]")),
    (["gzsl", "gate.min_seen_ratio=0"], ("gate.min_seen_ratio=0", "(0, 1]")),
    (["gzsl", "model.arch=bogus"], ("model.arch", "'bogus'", "resnet18")),
] + ([(["cl", "device=mps"], ("device=mps", "device=cpu"))] if sys.platform != "darwin" else [])


@pytest.mark.parametrize("args, words", LATE_INPUTS, ids=[" ".join(a) for a, _ in LATE_INPUTS])
def test_late_failures_are_one_line_before_work(tmp_path, capsys, args, words):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    _rejected(capsys, [*args, f"output_dir={tmp_path / 'o'}"], *words, out=tmp_path / "o")


def test_a_large_train_key_missing_from_its_method_block_is_named():
    """large_train.<block> may override only the keys its method block has (a config file could hold any)."""
    from omegaconf import OmegaConf

    from modnet.config import ConfigError, compose
    from modnet.validate import check_large_method_blocks

    cfg = OmegaConf.to_container(compose("gzsl"))
    del cfg["clswgan"]["syn_num"]
    with pytest.raises(ConfigError, match="large_train.clswgan.syn_num is not a key of the clswgan block"):
        check_large_method_blocks(OmegaConf.create(cfg))


def test_late_failures_stop_before_heavy_imports(tmp_path):
    """All of LATE_INPUTS in one process: each exit 2, and torch never imported (they were its errors, or came after
    its import)."""
    runs = [[a.replace("{tmp}", str(tmp_path)) for a in args] + [f"output_dir={tmp_path / 'o'}"]
            for args, _ in LATE_INPUTS]
    code = (f"import sys; from modnet.cli import main; codes = [main(a) for a in {runs!r}]; "
            "print(*codes, 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.split() == ["2"] * len(LATE_INPUTS) + ["False"], proc.stderr


@pytest.mark.parametrize("overrides, words", [
    # the first 6 samples of the file's 4 classes hold classes 0 and 1 only (scenarios.build_benchmark said so
    # after the imports)
    (["benchmark.max_train_samples=6"], ["benchmark.max_train_samples=6", "none of classes [2, 3]"]),
    (["model.arch=cnn"], ["model.arch=cnn", "vectors", "(40, 5)"]),
])
def test_npz_sample_cap_and_cnn_on_vectors_are_one_line_before_the_imports(tmp_path, overrides, words):
    y = np.array([0, 1] * 4 + [2, 3] * 16)
    path = _npz(tmp_path / "d.npz", y_train=y)
    argv = ["cl", "benchmark=npz", f"benchmark.path={path}", "benchmark.n_experiences=2", *overrides,
            f"output_dir={tmp_path / 'o'}"]
    rejected_before_torch(argv, tmp_path, *words)


def rejected_before_torch(argv: list[str], cwd: Path, *words: str) -> None:
    """``modnet.cli.main(argv)`` in a fresh process: exit 2, one line on stderr holding every word, torch never
    imported."""
    code = f"import sys; from modnet.cli import main; rc = main({argv!r}); print(rc, 'torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.split() == ["2", "False"], proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and all(w in lines[0] for w in words), proc.stderr


def test_a_sample_cap_that_leaves_classes_out_names_itself(tmp_path, capsys):
    """benchmark.max_train_samples=12 keeps digits' first 12 training samples, 7 of the 10 classes: the error spoke
    of 7 classes not splitting into 5 experiences, not of the cap."""
    _rejected(capsys, ["cl", "benchmark.max_train_samples=12", "strategies=[naive]", f"output_dir={tmp_path / 'o'}"],
              "benchmark.max_train_samples=12", "none of classes")


def test_present_data_and_valid_values_pass_the_early_checks(tmp_path, monkeypatch):
    """The early checks reject only what the loaders would: torchvision's own folder under root passes (without
    download), as do unseen digits, a full class order, a zero learning rate and a valid device (cuda on a
    machine with a GPU driver's device file, planted here)."""
    import torchvision

    from modnet import validate as validate_module

    from modnet.config import compose
    from modnet.validate import validate
    from scenarios.benchmarks._torchvision import FOLDERS

    # the folders are torchvision's: MNIST / FashionMNIST keep theirs under root/<class name>/raw, CIFAR its base_folder
    dataset = {"mnist": torchvision.datasets.MNIST, "fmnist": torchvision.datasets.FashionMNIST,
               "cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}
    for name, cls in dataset.items():
        folder = getattr(cls, "base_folder", None) or cls.__name__
        assert FOLDERS[name][1] == folder
        assert FOLDERS[name][0] == len(getattr(cls, "classes", [])) or name.startswith("cifar")
        (tmp_path / folder).mkdir(exist_ok=True)
        # an empty folder is what a download that failed offline leaves: refused (below); one holding a file passes
        with pytest.raises(FileNotFoundError, match="no files under"):
            validate("cl", compose("cl", [f"benchmark={name}", f"benchmark.root={tmp_path}"]))
        (tmp_path / folder / "raw").mkdir()
        (tmp_path / folder / "raw" / "data").touch()
        validate("cl", compose("cl", [f"benchmark={name}", f"benchmark.root={tmp_path}"]))
    validate("cl", compose("cl", ["benchmark=mnist", f"benchmark.root={tmp_path / 'empty'}", "benchmark.download=true"]))
    validate("gzsl", compose("gzsl", ["benchmark.unseen_classes=[0,9]", "niwt.lr=0"]))
    validate("cl", compose("cl", ["hnet.batch_size=null"]))  # null: train.batch_size (configs/training.yaml)
    (tmp_path / "nvidiactl").touch()
    monkeypatch.setattr(validate_module, "GPU_DEVICE_FILES", (str(tmp_path / "nvidiactl"),))
    validate("cl", compose("cl", ["benchmark.class_order=[9,8,7,6,5,4,3,2,1,0]", "device=cuda:1", "train.lr=0"]))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the device files are Linux's")
def test_cuda_on_a_machine_without_a_gpu_is_one_line_before_torch_is_imported(tmp_path):
    """device=cuda where no GPU driver's device file exists (planted: the check reads a missing path): one line
    naming the fix, from the config check alone, torch never imported (it took 10-30 s before the line)."""
    code = ("import sys\n"
            "from modnet import validate as v\n"
            f"v.GPU_DEVICE_FILES = ({str(tmp_path / 'nvidia0')!r},)\n"
            "from modnet.config import ConfigError, compose\n"
            "try:\n"
            "    v.validate('cl', compose('cl', ['device=cuda']))\n"
            "except ConfigError as err:\n"
            "    print('refused:', err)\n"
            "print('torch imported:', 'torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "refused: device=cuda but this machine has no GPU" in out and "device=cpu" in out
    assert "torch imported: False" in out


@pytest.mark.parametrize("value, words", [
    ("null", ["output_dir=None", "name a folder"]),
    ("''", ["output_dir=''", "name a folder"]),  # wrote results.json and checkpoints/ into the current folder
    ("/proc/modnet-x", ["output_dir=/proc/modnet-x", "nothing can be created"]),
])
def test_an_output_dir_that_cannot_hold_the_run_is_one_line(tmp_path, capsys, value, words):
    """A null output_dir was a TypeError traceback, one under /proc or /sys a PermissionError / 'No such file'
    after the imports: each one line naming the key."""
    _rejected(capsys, ["cl", "strategies=[naive]", f"output_dir={value}"], *words)


def test_explain_refuses_its_run_dir_as_output_dir_and_a_truncated_checkpoint(tmp_path, capsys):
    """explain into its own run_dir dumped a config difference of 137 keys; a truncated checkpoint was torch's
    PytorchStreamReader traceback. Both one line."""
    from modnet.nets.record import load_network

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("seed: 0\n")
    (run / "results.json").write_text("{}")
    _rejected(capsys, ["explain", f"run_dir={run}", f"output_dir={run}"], "is the run_dir", "output_dir=")
    whole = tmp_path / "whole.pt"
    import torch

    torch.save({"structure": "{}", "model": {"w": torch.zeros(1000)}}, whole)
    data = whole.read_bytes()
    for name, content in (("cut.pt", data[:len(data) // 2]), ("empty.pt", b"")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError) as err:
            load_network(tmp_path / name, None)
        assert "unreadable" in str(err.value) and name in str(err.value) and "\n" not in str(err.value)


def test_an_xlsa17_folder_with_one_of_its_two_files_is_one_line(tmp_path, capsys):
    """A folder with res101.mat alone passed the early check (any of the two files) and failed after the imports."""
    (tmp_path / "res101.mat").write_bytes(b"")
    _rejected(capsys, ["gzsl", "benchmark=awa2", f"benchmark.path={tmp_path}", f"output_dir={tmp_path / 'o'}"],
              "res101.mat", "not att_splits.mat", out=tmp_path / "o")


def test_gzsl_on_a_zero_shot_npz_of_two_seen_classes_is_one_line(tmp_path, capsys):
    """Two seen classes: a ZeroDivisionError traceback in the count of validation splits after the imports (the
    class-disjoint validation holds one seen class out and keeps two). explain, which runs no validation split,
    still takes the file."""
    path = _zsl_npz(tmp_path / "two.npz", unseen_classes=np.array([2, 3, 4]), y_train=np.arange(30) % 2)
    _rejected(capsys, ["gzsl", "benchmark=npz", f"benchmark.path={path}", f"output_dir={tmp_path / 'o'}"],
              "two.npz", "2 seen classes", "at least 3", out=tmp_path / "o")
    from scenarios.zsl import load_npz_zsl

    assert load_npz_zsl(path).seen_classes == [0, 1]
