"""The evaluation layer: the accuracy matrix metric, the evaluator's loggers, and the mean/std tables.

References independent of the code under test: accuracies computed here from the model's outputs (argmax
vs label over each test experience), Avalanche's own forgetting and BWT metrics, TensorBoard's event reader,
hand-computed means and stds of planted numbers, and numpy's std.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from modnet.config import ConfigError
from modnet.eval.metrics import LOGGERS, build_evaluator, close_loggers
from modnet.eval.results import aggregate_seeds, format_table, summarize
from modnet.eval.tables import SEED_STD_DDOF, aggregate_runs, mean_std_cell, seeds_note

N_CLASSES, DIM, N_EXP = 6, 10, 3


def _benchmark(task_labels: bool):
    """Six Gaussian blobs in 10-d, two classes per experience; 15 test samples per class."""
    from avalanche.benchmarks import nc_benchmark

    g = torch.Generator().manual_seed(0)
    centers = 0.7 * torch.randn(N_CLASSES, DIM, generator=g)

    def blobs(per_class):
        y = torch.arange(N_CLASSES).repeat_interleave(per_class)
        return TensorDataset(centers[y] + torch.randn(len(y), DIM, generator=g), y)

    # task-incremental as in scenarios.split_benchmark: labels 0, 1 within each task, one head per task
    return nc_benchmark(blobs(40), blobs(15), n_experiences=N_EXP, task_labels=task_labels,
                        fixed_class_order=list(range(N_CLASSES)), class_ids_from_zero_in_each_exp=task_labels)


def _model(multitask: bool) -> nn.Module:
    from avalanche.models import MTSimpleMLP

    torch.manual_seed(0)
    if multitask:
        return MTSimpleMLP(input_size=DIM, hidden_size=32)
    return nn.Sequential(nn.Linear(DIM, 32), nn.ReLU(), nn.Linear(32, N_CLASSES))


def _naive(model, evaluator):
    from avalanche.training import Naive

    # eval_mb_size 8: 30 test samples per experience arrive in 4 minibatches, the last one partial
    return Naive(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), train_mb_size=16,
                 train_epochs=2, eval_mb_size=8, device="cpu", evaluator=evaluator)


@torch.no_grad()
def _accuracy_by_hand(model, experience, multitask: bool) -> float:
    """argmax of the model's outputs (the task's head) vs the labels, over the whole experience in one batch."""
    x, y, t = (torch.stack([torch.as_tensor(item[k]) for item in experience.dataset]) for k in range(3))
    model.eval()
    out = model(x, t) if multitask else model(x)
    return (out.argmax(1) == y).double().mean().item()


@pytest.mark.parametrize("task_labels", [True, False], ids=["task-incremental", "class-incremental"])
def test_accuracy_matrix_equals_accuracies_computed_by_hand(task_labels):
    bm = _benchmark(task_labels)
    model = _model(multitask=task_labels)
    evaluator, accuracy = build_evaluator([], "unused", progress=False)
    strategy = _naive(model, evaluator)
    expected = []
    for exp in bm.train_stream:
        strategy.train(exp)
        strategy.eval(bm.test_stream)
        expected.append([_accuracy_by_hand(model, e, task_labels) for e in bm.test_stream])
    R = accuracy.matrix()
    np.testing.assert_allclose(R, expected, atol=1e-9)
    assert 0.6 < R[0][0] < 1  # trained (chance 0.5 within a task), and no constant row of ones
    if task_labels:
        assert {e.task_label for e in bm.test_stream} == set(range(N_EXP))
    accuracy.reset()
    assert accuracy.matrix() == []


def test_sliced_evaluation_leaves_nan_for_experiences_not_evaluated():
    bm = _benchmark(task_labels=False)
    model = _model(multitask=False)
    evaluator, accuracy = build_evaluator([], "unused", progress=False)
    strategy = _naive(model, evaluator)
    for i, exp in enumerate(bm.train_stream):
        strategy.train(exp)
        strategy.eval(bm.test_stream[:i + 1])  # the experiences seen so far only
        expected = [_accuracy_by_hand(model, e, False) for e in bm.test_stream[:i + 1]]
        row = accuracy.matrix()[-1]
        assert len(row) == N_EXP
        np.testing.assert_allclose(row[:i + 1], expected, atol=1e-9)
        assert all(math.isnan(v) for v in row[i + 1:])
    strategy.eval(bm.train_stream)  # another stream: no row
    assert len(accuracy.matrix()) == N_EXP


def test_summarize_bwt_equals_avalanches(tmp_path):
    """Naive, class-incremental: summarize() of the matrix vs Avalanche's bwt_metrics (Lopez-Paz & Ranzato's BWT)
    and forgetting_metrics (its forgetting is R[j][j] - R[T][j], -BWT; ours counts from each experience's peak,
    Chaudhry et al. 2018, so it is at least Avalanche's and equal where no accuracy rose after its training)."""
    bm = _benchmark(task_labels=False)
    model = _model(multitask=False)
    evaluator, accuracy = build_evaluator(["csv"], tmp_path, progress=False)
    strategy = _naive(model, evaluator)
    for exp in bm.train_stream:
        strategy.train(exp)
        metrics = strategy.eval(bm.test_stream)
    close_loggers(evaluator)
    s = summarize(accuracy.matrix())
    assert s["forgetting"] > 0.3  # fine-tuning forgets: a non-trivial comparison
    assert s["bwt"] == pytest.approx(metrics["StreamBWT/eval_phase/test_stream"], abs=1e-6)
    assert s["forgetting"] >= metrics["StreamForgetting/eval_phase/test_stream"] - 1e-6
    R = s["accuracy_matrix"]
    for j in range(N_EXP - 1):
        key = f"ExperienceForgetting/eval_phase/test_stream/Task000/Exp{j:03d}"
        assert R[j][j] - R[-1][j] == pytest.approx(metrics[key], abs=1e-6)


def test_tensorboard_logger_writes_event_file_offline(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    bm = _benchmark(task_labels=False)
    evaluator, accuracy = build_evaluator(["tensorboard"], tmp_path, progress=False)
    strategy = _naive(_model(multitask=False), evaluator)
    for exp in list(bm.train_stream)[:2]:
        strategy.train(exp)
        strategy.eval(bm.test_stream)
    close_loggers(evaluator)
    files = list((tmp_path / "tb").glob("events.out.tfevents*"))
    assert files
    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    stream_acc = events.Scalars("Top1_Acc_Stream/eval_phase/test_stream/Task000")
    assert len(stream_acc) == 2
    # the stream accuracy over equal-sized experiences is the mean of the matrix's row
    assert stream_acc[-1].value == pytest.approx(np.mean(accuracy.matrix()[-1]), abs=1e-6)
    assert "Time_Epoch/train_phase/train_stream/Task000" in events.Tags()["scalars"]


def test_csv_and_text_loggers_write_files(tmp_path, capsys):
    bm = _benchmark(task_labels=False)
    evaluator, _ = build_evaluator(["interactive", "csv", "text"], tmp_path, progress=True)
    strategy = _naive(_model(multitask=False), evaluator)
    for exp in list(bm.train_stream)[:2]:
        strategy.train(exp)
        strategy.eval(bm.test_stream)
    close_loggers(evaluator)
    eval_rows = (tmp_path / "csv" / "eval_results.csv").read_text().strip().splitlines()
    assert eval_rows[0] == "eval_exp,training_exp,eval_accuracy,eval_loss,forgetting"
    assert len(eval_rows) == 1 + 2 * N_EXP  # two evaluations of the three test experiences
    train_rows = (tmp_path / "csv" / "training_results.csv").read_text().strip().splitlines()
    assert len(train_rows) == 1 + 2 * 2  # two experiences of two epochs
    assert "Top1_Acc_Stream/eval_phase/test_stream" in (tmp_path / "log.txt").read_text()
    print("stdout stays open")  # close_loggers closed the files, not the interactive logger's stdout
    assert "stdout stays open" in capsys.readouterr().out


def test_wandb_logger_runs_offline_under_output_dir(tmp_path):
    bm = _benchmark(task_labels=False)
    evaluator, _ = build_evaluator(["wandb"], tmp_path / "run", progress=False)
    strategy = _naive(_model(multitask=False), evaluator)
    strategy.train(bm.train_stream[0])
    strategy.eval(bm.test_stream)
    close_loggers(evaluator)
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))


def test_wandb_missing_is_one_line_naming_pip_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    with pytest.raises(ConfigError, match="pip install wandb") as err:
        build_evaluator(["wandb"], tmp_path, progress=False)
    assert "\n" not in str(err.value)


def test_unknown_logger_names_the_valid_choices(tmp_path, capsys):
    with pytest.raises(ConfigError) as err:
        build_evaluator(["interactive", "mlflow"], tmp_path, progress=True)
    assert "mlflow" in str(err.value) and all(name in str(err.value) for name in LOGGERS)
    from modnet.cli import main

    assert main(["cl", "loggers=[tensorbord]", f"output_dir={tmp_path / 'o'}"]) == 2
    msg = capsys.readouterr().err
    assert "tensorbord" in msg and "tensorboard" in msg
    assert not (tmp_path / "o" / "results.json").exists()


def test_progress_false_drops_the_interactive_logger_and_the_unshown_metrics(tmp_path, monkeypatch):
    import sys

    from avalanche.logging import InteractiveLogger

    evaluator, accuracy = build_evaluator(["interactive"], tmp_path, progress=False)
    assert evaluator.loggers == [] and evaluator.metrics == [accuracy]
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)  # a log file or a pipe: no tqdm bars
    evaluator, accuracy = build_evaluator(["interactive"], tmp_path, progress=True)
    assert evaluator.loggers == [] and evaluator.metrics == [accuracy]
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)  # a terminal
    evaluator, accuracy = build_evaluator(["interactive"], tmp_path, progress=True)
    assert [type(lg) for lg in evaluator.loggers] == [InteractiveLogger] and len(evaluator.metrics) > 1


# -- mean and std over runs --------------------------------------------------------------------------
def _run(acc, forgetting, seconds, matrix=None):
    return {"accuracy_matrix": matrix or [[acc]], "average_accuracy": acc, "forgetting": forgetting,
            "bwt": -forgetting, "train_seconds": seconds}


def test_aggregate_runs_matches_hand_computed_mean_and_std():
    records = [{"benchmark": "digits", "strategy": "naive", "acc": a, "sec": s}
               for a, s in ((0.6, 10.0), (0.8, 14.0), (1.0, 12.0))]
    records.append({"benchmark": "digits", "strategy": "ewc", "acc": 0.5, "sec": math.nan})
    stats = aggregate_runs(records, by=["benchmark", "strategy"], metrics=["acc", "sec"])
    rows = {r["strategy"]: r for r in stats.to_dict("records")}
    assert list(stats["strategy"]) == ["ewc", "naive"]  # sorted by setting
    naive = rows["naive"]
    # acc 0.6, 0.8, 1.0: mean 0.8, squared deviations 0.04, 0, 0.04 -> population variance 0.08 / 3
    assert naive["n"] == 3 and naive["acc_mean"] == pytest.approx(0.8)
    assert naive["acc_std"] == pytest.approx(math.sqrt(0.08 / 3))
    # sec 10, 14, 12: mean 12, squared deviations 4, 4, 0 -> variance 8 / 3
    assert naive["sec_mean"] == pytest.approx(12.0) and naive["sec_std"] == pytest.approx(math.sqrt(8 / 3))
    ewc = rows["ewc"]
    assert ewc["n"] == 1 and ewc["acc_mean"] == 0.5 and ewc["acc_std"] == 0.0
    assert ewc["sec_count"] == 0 and math.isnan(ewc["sec_mean"])  # a NaN value is left out
    sample = aggregate_runs(records, by=["strategy"], metrics=["acc"], ddof=1).set_index("strategy")
    assert sample.loc["naive", "acc_std"] == pytest.approx(0.2)  # sqrt(0.08 / 2)
    assert math.isnan(sample.loc["ewc", "acc_std"])  # one run has no sample std


def test_ddof1_std_equals_numpys():
    values = np.random.default_rng(3).normal(size=7)
    stats = aggregate_runs([{"v": v} for v in values], by=(), metrics=["v"], ddof=1).iloc[0]
    assert stats["v_std"] == pytest.approx(np.std(values, ddof=1), abs=1e-12)
    assert stats["v_mean"] == pytest.approx(np.mean(values), abs=1e-12)
    population = aggregate_runs([{"v": v} for v in values], by=(), metrics=["v"]).iloc[0]
    assert population["v_std"] == pytest.approx(np.std(values), abs=1e-12)


def test_aggregate_seeds_means_the_matrices_and_the_scalars():
    runs = [_run(0.6, 0.2, 10.0, [[0.9, 0.1], [0.7, 0.5]]), _run(0.8, 0.1, 14.0, [[0.8, 0.3], [0.7, 0.9]]),
            _run(1.0, 0.0, 12.0, [[1.0, 0.2], [1.0, 1.0]])]
    out = aggregate_seeds(runs)
    np.testing.assert_allclose(out["accuracy_matrix"], [[0.9, 0.2], [0.8, 0.8]], atol=1e-12)
    assert out["average_accuracy"] == pytest.approx(0.8)
    assert out["average_accuracy_std"] == pytest.approx(math.sqrt(0.08 / 3))
    assert out["forgetting"] == pytest.approx(0.1) and out["bwt_std"] == pytest.approx(math.sqrt(0.02 / 3))
    assert out["per_seed"] == runs


def test_the_seeds_std_is_named_population_and_its_factor_to_the_sample_std_is_right():
    """Two seeds at 0.1 and 0.3: population std 0.1, sample std 0.1414 (by hand); the line under the tables
    names the population std and its ratio to the sample one, sqrt((n - 1) / n)."""
    out = aggregate_seeds([_run(0.1, 0.0, 1.0), _run(0.3, 0.0, 1.0)])
    assert out["average_accuracy_std"] == pytest.approx(0.1)
    assert SEED_STD_DDOF == 0
    note = seeds_note(2)
    assert "population (ddof 0)" in note and "0.71x the sample std" in note  # 0.1 / 0.1414
    assert "0.82x" in seeds_note(3) and seeds_note(1) == ""


def test_single_seed_table_has_no_plus_minus():
    one = format_table({"naive": aggregate_seeds([_run(0.6, 0.2, 10.0)])})
    assert "±" not in one and "| naive | 0.6000 | 0.2000 | -0.2000 | 10.0 |" in one
    two = format_table({"naive": aggregate_seeds([_run(0.6, 0.2, 10.0), _run(0.8, 0.0, 12.0)])})
    assert "| naive | 0.7000 ± 0.1000 | 0.1000 ± 0.1000 | -0.1000 ± 0.1000 | 11.0 ± 1.0 |" in two
    assert mean_std_cell(0.5, 0.0, 1) == "0.5000" and mean_std_cell(None, None, 0) == "n/a"


def test_gzsl_aggregate_keeps_its_keys_and_single_seed_table_has_no_plus_minus():
    from modnet.jobs.gzsl import _aggregate
    from modnet.jobs.gzsl import format_table as gzsl_table

    def seed(u, s, h, gamma):  # the uncalibrated figures differ from the calibrated ones (U - 0.1, S + 0.1)
        metrics = {"U": u, "S": s, "H": h, "zsl_accuracy": u}
        uncal = {"U": u - 0.1, "S": s + 0.1, "H": h - 0.05, "zsl_accuracy": u}
        return {"niwt": {**metrics, "gamma": gamma, "uncalibrated": uncal}}

    out = _aggregate([seed(0.2, 0.6, 0.3, 0.5), seed(0.4, 0.8, 0.5, 1.5)])
    niwt = out["niwt"]
    # each kind averaged from its own inputs, by hand
    assert niwt["U"] == pytest.approx(0.3) and niwt["uncalibrated"]["U"] == pytest.approx(0.2)
    assert niwt["uncalibrated"]["H"] == pytest.approx(0.35) and niwt["uncalibrated"]["S"] == pytest.approx(0.8)
    assert list(niwt) == ["U", "U_std", "S", "S_std", "H", "H_std", "zsl_accuracy", "zsl_accuracy_std", "gamma",
                          "gamma_std", "uncalibrated"]
    assert list(niwt["uncalibrated"]) == ["U", "S", "H", "zsl_accuracy", "U_std", "S_std", "H_std",
                                          "zsl_accuracy_std"]
    assert niwt["H"] == pytest.approx(0.4) and niwt["H_std"] == pytest.approx(0.1)
    assert niwt["gamma"] == pytest.approx(1.0) and niwt["uncalibrated"]["S_std"] == pytest.approx(0.1)
    json.dumps(out)  # plain floats
    assert "±" in gzsl_table(out, 2)
    single = gzsl_table(_aggregate([seed(0.2, 0.6, 0.3, 0.5)]), 1)
    # the headline's uncalibrated U, S, H (0.1, 0.7, 0.25), ZSL accuracy, then the calibrated ones and gamma
    assert "±" not in single and "| niwt | 0.100 | 0.700 | 0.250 | 0.200 | 0.200 | 0.600 | 0.300 | 0.50 |" in single


def test_no_forgetting_prints_bwt_without_a_minus_sign():
    """A run that forgets nothing printed BWT "-0.0000" (bwt = -forgetting gave -0.0); a negative that rounds to zero
    reads 0 too, a real negative keeps its sign."""
    from modnet.eval.results import summarize

    r = summarize([[0.9, 0.1], [0.7, 0.8]])  # experience 0: 0.9 -> 0.7, forgetting 0.2
    assert r["bwt"] == pytest.approx(-0.2)
    flat = summarize([[0.9, 0.1], [0.9, 0.8]])
    assert flat["forgetting"] == 0.0 and math.copysign(1.0, flat["bwt"]) == 1.0
    assert mean_std_cell(flat["bwt"], None, 1) == "0.0000" and mean_std_cell(-0.00004, 0.00001, 2) == "0.0000 ± 0.0000"
    assert mean_std_cell(-0.2, None, 1) == "-0.2000" and mean_std_cell(-0.04, None, 1, "{:.1f}") == "0.0"


def test_results_csv_of_several_seeds_has_the_tables_spread(tmp_path):
    """A seeds=[0,1] run printed mean ± std but results.csv held the means alone: it now has each scalar's _std
    (hand-computed here: population std of 0.6 and 0.8 is 0.1) and the seed count; one seed has std 0."""
    import csv

    from modnet.eval.results import write_results

    two = aggregate_seeds([_run(0.6, 0.2, 10.0, [[0.9, 0.1], [0.7, 0.6]]), _run(0.8, 0.0, 12.0, [[0.9, 0.1], [0.9, 0.7]])])
    one = aggregate_seeds([_run(0.5, 0.1, 3.0, [[0.6, 0.1], [0.5, 0.5]])])
    write_results(tmp_path, {"benchmark": "digits", "scenario": "task", "n_experiences": 2, "seeds": [0, 1],
                             "strategies": {"naive": two, "ewc": one}}, plots=False)
    with open(tmp_path / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    naive = [r for r in rows if r["strategy"] == "naive"]
    assert len(naive) == 2 and naive[0]["seeds"] == "2"
    assert float(naive[0]["average_accuracy"]) == pytest.approx(0.7)
    assert float(naive[0]["average_accuracy_std"]) == pytest.approx(0.1)
    assert float(naive[0]["forgetting_std"]) == pytest.approx(0.1) and float(naive[0]["train_seconds_std"]) == 1.0
    assert [float(naive[1][f"acc_exp{j}"]) for j in range(2)] == pytest.approx([0.8, 0.65])  # the mean matrix
    ewc = next(r for r in rows if r["strategy"] == "ewc")
    assert ewc["seeds"] == "1" and float(ewc["average_accuracy_std"]) == 0.0
    assert {r["run_complete"] for r in rows} == {"true"}
    # an interrupted run's file says so in every row (its finished strategies' rows looked like a whole run's)
    write_results(tmp_path, {"benchmark": "digits", "scenario": "task", "n_experiences": 2, "seeds": [0, 1],
                             "strategies": {"naive": two}, "complete": False}, plots=False)
    with open(tmp_path / "results.csv", newline="") as f:
        assert {r["run_complete"] for r in csv.DictReader(f)} == {"false"}


def test_experiences_are_counted_from_1_in_what_is_printed_and_drawn(tmp_path, monkeypatch):
    """The progress lines say "experience 1/2" for Avalanche's experience 0; the continual GZSL table said "0" and
    the accuracy-matrix pictures' axes 0..N-1 for the same experience. Printed and drawn: from 1; results.json and
    results.csv keep Avalanche's ids (from 0)."""
    from modnet.eval import results as results_mod
    from modnet.jobs.continual_gzsl import format_table

    keys = ("U", "S", "H", "seen_accuracy", "forgetting", "class_incremental_seen_accuracy",
            "class_incremental_forgetting")
    continual = {"n_experiences": 2, "gamma": 0.0,
                 "strategies": {"naive": {"experiences": [{"experience": i, **{k: 0.5 for k in keys}}
                                                          for i in range(2)]}}}
    rows = [line for line in format_table(continual).splitlines() if line.startswith("| naive |")]
    assert [row.split("|")[2].strip() for row in rows] == ["1", "2"]

    figures = []
    monkeypatch.setattr(results_mod, "save_figure", lambda fig, path, dpi=120: figures.append((Path(path).name, fig)))
    import matplotlib.pyplot as plt

    monkeypatch.setattr(plt, "close", lambda fig=None: None)
    results_mod.plot_results(tmp_path, {"benchmark": "b", "scenario": "task", "n_experiences": 2, "seeds": [0],
                                        "strategies": {"naive": {"accuracy_matrix": [[0.9, 0.0], [0.8, 0.7]]}}})
    (name, fig), = [(n, f) for n, f in figures if n.startswith("accuracy_matrix")]
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["1", "2"]
    (_, curves), = [(n, f) for n, f in figures if n == "accuracy_curves.png"]
    assert [t.get_text() for t in curves.axes[0].get_xticklabels()] == ["1", "2"]


def test_twelve_strategies_get_twelve_distinct_curves_and_a_small_matrix_keeps_its_labels(tmp_path, monkeypatch):
    """accuracy_curves.png drew an 11th and 12th strategy in the colour and marker of the 1st and 2nd
    (matplotlib's ten-colour cycle; the README's MNIST-1D command runs twelve); a 2 x 2 accuracy matrix's title and
    y-axis label ran off its picture. Read from the figures: every curve's (colour, marker, line style) differs,
    and every text of the matrix figure lies inside the figure's canvas."""
    from modnet.eval import results as results_mod

    figures = {}
    monkeypatch.setattr(results_mod, "save_figure", lambda fig, path, dpi=120: figures.__setitem__(Path(path).name, fig))
    import matplotlib.pyplot as plt

    monkeypatch.setattr(plt, "close", lambda fig=None: None)
    names = ["modnet", "naive", "ewc", "si", "lwf", "gem", "agem", "replay", "der", "derpp", "cumulative", "hnet"]
    matrix = [[0.9, 0.0], [0.8, 0.7]]
    results_mod.plot_results(tmp_path, {"benchmark": "b", "scenario": "task", "n_experiences": 2, "seeds": [0, 1, 2],
                                        "strategies": {n: {"accuracy_matrix": matrix, "per_seed": [{}] * 3}
                                                       for n in names}})
    lines = figures["accuracy_curves.png"].axes[0].get_lines()
    assert [line.get_label() for line in lines] == names
    styles = {(tuple(plt.matplotlib.colors.to_rgb(line.get_color())), line.get_marker(), line.get_linestyle())
              for line in lines}
    assert len(styles) == len(names)
    fig = figures["accuracy_matrix_cumulative.png"]
    fig.canvas.draw()
    renderer, canvas = fig.canvas.get_renderer(), fig.bbox
    ax = fig.axes[0]
    for text in (ax.title, ax.xaxis.label, ax.yaxis.label, *fig.axes[1].get_yticklabels()):
        box = text.get_window_extent(renderer)
        assert text.get_text() and canvas.x0 - 1 <= box.x0 and box.x1 <= canvas.x1 + 1, text.get_text()
        assert canvas.y0 - 1 <= box.y0 and box.y1 <= canvas.y1 + 1, text.get_text()


def test_the_drift_picture_counts_the_first_experience_as_1(tmp_path, monkeypatch):
    """cka_<strategy>_seed<S>.png was titled "CKA of experience 0's hidden layers", its rows "after experience 0",
    where every other picture counts experiences from 1 (README)."""
    from modnet.eval import drift

    drawn = {}
    monkeypatch.setattr(drift, "plot_cka_heatmap", lambda m, path, xl, yl, **kw: drawn.update(kw))
    acts = [torch.randn(20, 5), torch.randn(20, 4)]
    diagonal = drift.plot_drift(acts, acts, tmp_path / "cka.png", "naive")
    assert diagonal == pytest.approx([1.0, 1.0])  # a representation against itself
    assert "experience 1" in drawn["title"] and drawn["ylabel"] == "after experience 1"
    assert "experience 0" not in " ".join(drawn.values())
