"""The continual-learning job end to end: the issue's targets on Split-Digits, results format, resume."""
import dataclasses
import json

import numpy as np
import pytest
import torch

from modnet.cli import main
from modnet.config import ConfigError, compose
from modnet.eval.results import summarize


def test_summary_hand_case():
    R = [[0.9, 0.1, 0.0], [0.8, 0.95, 0.2], [0.7, 0.85, 1.0]]
    s = summarize(R)
    assert s["average_accuracy"] == pytest.approx((0.7 + 0.85 + 1.0) / 3)
    assert s["forgetting"] == pytest.approx(((0.9 - 0.7) + (0.95 - 0.85)) / 2)
    assert s["bwt"] == pytest.approx(-s["forgetting"])  # every accuracy peaked when its experience was trained


def test_forgetting_counts_from_the_peak_and_bwt_from_the_diagonal():
    """Chaudhry et al. 2018's forgetting against Lopez-Paz & Ranzato's BWT, by hand: experience 0 is learned to
    0.6, a later experience lifts it to 0.9 (backward transfer), the last one drops it to 0.5."""
    R = [[0.6, 0.0, 0.0], [0.9, 0.8, 0.0], [0.5, 0.8, 0.7]]
    s = summarize(R)
    assert s["forgetting"] == pytest.approx(((0.9 - 0.5) + (0.8 - 0.8)) / 2)  # from the peak, 0.9
    assert s["bwt"] == pytest.approx(((0.5 - 0.6) + (0.8 - 0.8)) / 2)  # from R[j][j], 0.6


@pytest.fixture(scope="module")
def task_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("task")
    rc = main(["cl", "strategies=[modnet,naive,ewc]", f"output_dir={out}", "progress=false"])
    assert rc == 0
    return out, json.loads((out / "results.json").read_text())


def test_modnet_meets_split_digits_task_incremental_targets(task_run):
    out, res = task_run
    m = res["strategies"]["modnet"]
    assert m["forgetting"] <= 0.01
    assert m["average_accuracy"] >= 0.97
    # every named baseline runs in the same command, on the same benchmark
    assert set(res["strategies"]) == {"modnet", "naive", "ewc"}


def test_first_experience_representation_kept_by_hat_and_drifts_under_finetuning(task_run):
    """CKA (an invariance: 1 for an unchanged representation) of the first task's hidden layers, first vs last."""
    out, res = task_run
    s = res["strategies"]
    assert min(s["modnet"]["first_experience_cka"]) > 0.999
    assert min(s["naive"]["first_experience_cka"]) < 0.99
    assert (out / "cka_modnet_seed0.png").exists() and (out / "cka_naive_seed0.png").exists()


def test_results_format_and_files(task_run):
    out, res = task_run
    assert res["benchmark"] == "split-digits" and res["scenario"] == "task" and res["n_experiences"] == 5
    assert isinstance(res["seed"], int)
    for name, r in res["strategies"].items():
        R = np.asarray(r["accuracy_matrix"])
        assert R.shape == (5, 5)
        assert r["average_accuracy"] == pytest.approx(R[-1].mean())
        assert r["forgetting"] == pytest.approx(np.mean([R[j:4, j].max() - R[-1, j] for j in range(4)]))
        assert r["bwt"] == pytest.approx(np.mean([R[-1, j] - R[j, j] for j in range(4)]))
        assert r["train_seconds"] > 0
        assert (out / f"accuracy_matrix_{name}.png").stat().st_size > 1000
    assert (out / "accuracy_curves.png").exists() and (out / "config.yaml").exists()
    rows = (out / "results.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 3 * 5


def test_later_task_leaves_earlier_outputs_unchanged():
    """HAT's guarantee: after task 0, training task 1 changes no task-0 logit (MLP: max |change| < 1e-3),
    with the default modules and gates on, while the shared weights do move."""
    from avalanche.training.plugins import EvaluationPlugin

    from modnet.runner.runner import make_strategy
    from scenarios import build_benchmark

    cfg = compose("cl", ["train.epochs=5", "progress=false"])
    info = build_benchmark(cfg.benchmark, "task", 0)
    strategy = make_strategy("modnet", cfg, info, torch.device("cpu"), EvaluationPlugin(loggers=[]))
    exps = list(info.benchmark.train_stream)
    strategy.train(exps[0])
    x0 = torch.stack([exps[0].dataset[i][0] for i in range(64)])
    model = strategy.model.eval()
    with torch.no_grad():
        before = model.forward_single_task(x0, 0).clone()
    weights_before = model.masked[0].weight.detach().clone()
    strategy.train(exps[1])
    model.eval()
    with torch.no_grad():
        after = model.forward_single_task(x0, 0)
    assert (after - before).abs().max().item() < 1e-3
    assert (model.masked[0].weight - weights_before).abs().max().item() > 1e-3  # task 1 did learn


def test_class_incremental_modnet_runs_and_infers_the_task(tmp_path):
    rc = main(["cl", "scenario=class", "strategies=[modnet,naive]", "train.epochs=5", f"output_dir={tmp_path}",
               "progress=false"])
    assert rc == 0
    res = json.loads((tmp_path / "results.json").read_text())
    R = np.asarray(res["strategies"]["modnet"]["accuracy_matrix"])
    assert R.shape == (5, 5)
    # no task label at test time, 10 classes: above chance, and better than fine-tuning's last-task-only
    assert R[-1].mean() > 0.2
    assert R[-1].mean() > res["strategies"]["naive"]["average_accuracy"]


def test_resume_continues_to_the_same_final_numbers(tmp_path, monkeypatch, capsys):
    import strategies.registry as reg

    # modnet with its default gates: the gates made per task are rebuilt from the checkpoint
    args = ["cl", "strategies=[modnet,naive,lwf]", "train.epochs=2", "progress=false"]
    assert main(args + [f"output_dir={tmp_path / 'full'}"]) == 0
    full = json.loads((tmp_path / "full" / "results.json").read_text())

    from avalanche.core import SupervisedPlugin

    class Crash(SupervisedPlugin):
        def before_training_exp(self, strategy, **kw):
            if strategy.experience.current_experience == 3:
                raise KeyboardInterrupt("simulated interruption")

    original = dict(reg.STRATEGIES)
    for name in ("modnet", "naive", "lwf"):
        def crashing(cfg, info, common, _b=original[name].build):
            s = _b(cfg, info, common)
            s.plugins.append(Crash())
            return s
        monkeypatch.setitem(reg.STRATEGIES, name, dataclasses.replace(original[name], build=crashing))
    assert main(args + [f"output_dir={tmp_path / 'cut'}"]) == 130  # one line, no traceback (Ctrl-C's exit code)
    assert "interrupted; resume=true continues" in capsys.readouterr().err
    assert not (tmp_path / "cut" / "results.json").exists()
    monkeypatch.setattr(reg, "STRATEGIES", original)
    assert main(args + [f"output_dir={tmp_path / 'cut'}", "resume=true"]) == 0
    resumed = json.loads((tmp_path / "cut" / "results.json").read_text())
    for name in ("modnet", "naive", "lwf"):
        np.testing.assert_allclose(resumed["strategies"][name]["accuracy_matrix"],
                                   full["strategies"][name]["accuracy_matrix"], atol=1e-6)
        # experience 0's snapshot is kept in the checkpoint: the same drift (a resumed run had no CKA, nor its plot)
        np.testing.assert_allclose(resumed["strategies"][name]["first_experience_cka"],
                                   full["strategies"][name]["first_experience_cka"], atol=1e-5)
        assert (tmp_path / "cut" / f"cka_{name}_seed0.png").exists()


def test_checkpoints_load_with_weights_only(tmp_path):
    assert main(["cl", "strategies=[modnet]", "train.epochs=1", "benchmark.n_experiences=2",
                 f"output_dir={tmp_path}", "progress=false"]) == 0
    state = torch.load(tmp_path / "checkpoints" / "modnet_seed0.pt", weights_only=True)
    assert state["done"] is True and json.loads(state["result"])["accuracy_matrix"]


def test_permuted_and_image_variants_build(tmp_path):
    assert main(["cl", "strategies=[modnet,naive]", "train.epochs=1", "benchmark.variant=permuted",
                 "benchmark.n_experiences=3", f"output_dir={tmp_path / 'p'}", "progress=false"]) == 0
    res = json.loads((tmp_path / "p" / "results.json").read_text())
    assert res["benchmark"] == "permuted-digits" and res["n_experiences"] == 3
    assert main(["cl", "strategies=[modnet,naive]", "train.epochs=1", "benchmark.image=true",
                 "benchmark.n_experiences=2", f"output_dir={tmp_path / 'i'}", "progress=false"]) == 0


@pytest.mark.parametrize("scenario, data", [("task", "benchmark.variant=permuted"),
                                            ("class", "benchmark.variant=permuted"),
                                            ("task", "benchmark.image=true")])
def test_every_strategy_trains_on_permuted_experiences_and_on_images(tmp_path, scenario, data):
    """Permuted-X experiences carry what Avalanche's plugins read of a dataset (LwF's post_adapt reads
    ``task_set``), and images train on channels_last maps: every registered strategy trains two experiences of
    each and evaluates (failed for lwf on permuted ones: bare ClassificationDatasets without task_set; for agem
    on images: its flat gradient viewed a channels_last conv weight's gradient as one run)."""
    from strategies.registry import strategy_names

    names = strategy_names()
    assert main(["cl", f"strategies=[{','.join(names)}]", f"scenario={scenario}", "train.epochs=1", data,
                 "train.channels_last=true", "benchmark.n_experiences=2", "hnet.iterations=5",
                 f"output_dir={tmp_path}", "progress=false"]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    for name in names:
        matrix = np.asarray(res["strategies"][name]["accuracy_matrix"])
        assert matrix.shape == (2, 2) and np.isfinite(matrix).all(), name


# -- bad input: one clear line, before any training ---------------------------------------------------
@pytest.mark.parametrize("override, words", [
    (["strategie=[naive]"], ["unknown config key", "strategies"]),
    (["train.epoch=3"], ["unknown config key", "train.epochs"]),
    (["train.epochs=abc"], ["train.epochs", "int"]),
    (["train.lr=[1]"], ["train.lr", "float"]),
    (["benchmark=nope"], ["benchmark", "digits"]),
])
def test_config_errors_are_one_clear_line(override, words):
    with pytest.raises(ConfigError) as err:
        compose("cl", override)
    msg = str(err.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg


@pytest.mark.parametrize("override, words", [
    ("model.gate=foo", ["model.gate", "topk"]),                # ran as gate=none before
    ("model.modules=foo", ["model.modules", "sync"]),          # idem, as modules=none
    ("ewc.mode=foo", ["ewc.mode", "separate"]),                # Avalanche's assert, after the others trained
    ("ewc.mode=online", ["ewc.decay_factor"]),
    ("hat.smax=0", ["hat.smax", "> 0"]),                       # a ZeroDivisionError in the slope's annealing
    ("hat.smax=-1", ["hat.smax", "> 0"]),                      # trained, and forgot
    ("ewc.ewc_lambda=-1", ["ewc.ewc_lambda", ">= 0"]),         # a negative penalty
    ("replay.mem_size=-5", ["replay.mem_size", "match"]),      # an error in Avalanche's storage policy
    ("gem.patterns_per_exp=0", ["gem.patterns_per_exp"]),
    ("agem.sample_size=0", ["agem.sample_size"]),              # a ZeroDivisionError in the memory loader
    ("hnet.iterations=0", ["hnet.iterations"]),                # ran whole epochs anyway
    ("benchmark.class_order=[0,0,1,2,3,4,5,6,7,8]", ["benchmark.class_order"]),  # an IndexError in training
    ("task_inference.method=foo", ["task_inference.method", "features"]),  # once met at modnet's build
    ("device=tpu", ["device", "cuda"]),                        # torch's own error
    ("trian.epochs=1", ["trian.epochs", "Did you mean 'train'", "Valid keys at the top", "strategies"]),
    ("+foo=1", ["unknown config key 'foo'"]),                  # Hydra's append: ran, reading nothing
    ("+train.epoch=1", ["unknown config key 'train.epoch'", "train.epochs"]),
])
def test_strategy_and_network_options_are_checked_before_anything_trains(tmp_path, capsys, override, words):
    """A bad value of a network or strategy option stops the run with one line naming it, before the first
    strategy trains (each of these crashed with a traceback, or ran something else, when met at its build)."""
    out = tmp_path / "out"
    assert main(["cl", override, "strategies=[naive,modnet,ewc]", f"output_dir={out}", "progress=false"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and all(w in err[0] for w in words), err
    assert not (out / "results.json").exists()


def test_unknown_strategy_and_scenario_name_the_choices(tmp_path, capsys):
    assert main(["cl", "strategies=[naive,foo]", f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "foo" in err and "modnet" in err and "replay" in err
    assert main(["cl", "scenario=domain", f"output_dir={tmp_path}"]) == 2
    assert "task" in capsys.readouterr().err


def _save(path, **arrays):
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("case, words", [
    ("missing_key", ["y_test", "missing"]),
    ("label_mismatch", ["y_train", "rows"]),
    ("nan", ["NaN"]),
    ("corrupt", ["not a readable .npz"]),
    ("absent", ["not found"]),
])
def test_npz_problems_are_reported_before_training(tmp_path, capsys, case, words):
    rng = np.random.default_rng(0)
    good = dict(x_train=rng.normal(size=(40, 5)).astype(np.float32), y_train=np.arange(40) % 4,
                x_test=rng.normal(size=(8, 5)).astype(np.float32), y_test=np.arange(8) % 4)
    path = tmp_path / "d.npz"
    if case == "missing_key":
        good.pop("y_test")
        _save(path, **good)
    elif case == "label_mismatch":
        good["y_train"] = good["y_train"][:30]
        _save(path, **good)
    elif case == "nan":
        good["x_train"][3, 2] = np.nan
        _save(path, **good)
    elif case == "corrupt":
        path.write_bytes(b"PK\x03\x04 this is not a zip")
    rc = main(["cl", "benchmark=npz", f"benchmark.path={path}", "benchmark.n_experiences=2",
               f"output_dir={tmp_path / 'o'}"])
    assert rc == 2
    err = capsys.readouterr().err
    for w in words:
        assert w in err
    assert not (tmp_path / "o" / "results.json").exists()


def test_npz_path_runs(tmp_path):
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = (d.data / 16).astype(np.float32), d.target
    path = _save(tmp_path / "digits.npz", x_train=x[:1200], y_train=y[:1200], x_test=x[1200:], y_test=y[1200:])
    assert main(["cl", "benchmark=npz", f"benchmark.path={path}", "strategies=[modnet,naive]", "train.epochs=2",
                 f"output_dir={tmp_path / 'o'}", "progress=false"]) == 0
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert res["benchmark"] == "split-npz"


def test_offline_torchvision_gives_clear_error(tmp_path):
    from scenarios import load_torchvision_arrays

    with pytest.raises(FileNotFoundError, match="download=true"):
        load_torchvision_arrays("mnist", tmp_path, download=False)


@pytest.mark.parametrize("image", [True, False])  # the CNN on channels_last maps; the MLP with its transform heads
def test_bf16_autocast_and_channels_last_keep_hat_protection(tmp_path, image):
    layout = ["train.channels_last=true", "benchmark.image=true"] if image else []
    assert main(["cl", "strategies=[modnet,naive]", "train.epochs=2", "train.amp=true", *layout,
                 "benchmark.n_experiences=2", f"output_dir={tmp_path}", "progress=false"]) == 0
    s = json.loads((tmp_path / "results.json").read_text())["strategies"]
    assert np.isfinite(np.asarray(s["modnet"]["accuracy_matrix"])).all()
    assert s["modnet"]["forgetting"] <= 0.01


def test_the_cnn_takes_train_cnn_lr_and_every_other_backbone_train_lr():
    """Hand-computed cases of the rule: images with model.arch auto or cnn -> cnn_lr; an MLP on images or on
    vectors -> lr; cnn_lr null -> lr."""
    from types import SimpleNamespace

    from modnet.config import compose
    from strategies.common import learning_rate

    images, vectors = SimpleNamespace(input_shape=(1, 8, 8)), SimpleNamespace(input_shape=(64,))
    cfg = compose("cl", ["train.lr=0.03", "train.cnn_lr=0.3"])
    assert learning_rate(cfg, images) == pytest.approx(0.3)
    assert learning_rate(compose("cl", ["train.lr=0.03", "train.cnn_lr=0.3", "model.arch=cnn"]), images) == 0.3
    assert learning_rate(compose("cl", ["train.lr=0.03", "train.cnn_lr=0.3", "model.arch=mlp"]), images) == 0.03
    assert learning_rate(cfg, vectors) == pytest.approx(0.03)
    assert learning_rate(compose("cl", ["train.lr=0.03", "train.cnn_lr=null"]), images) == pytest.approx(0.03)


def test_modnet_cnn_learns_every_split_digits_image_task(tmp_path):
    """The masked CNN fits each task as it trains (at lr 0.05 three of five tasks stayed at chance, 0.51-0.55):
    the diagonal of the accuracy matrix, each task right after its training, well above chance (0.5)."""
    out = tmp_path / "img"
    rc = main(["cl", "benchmark=digits", "benchmark.image=true", "scenario=task", "strategies=[modnet]",
               f"output_dir={out}", "progress=false"])
    assert rc == 0
    m = json.loads((out / "results.json").read_text())["strategies"]["modnet"]
    R = np.asarray(m["accuracy_matrix"])
    assert R.diagonal().min() >= 0.9, R.diagonal()
    assert m["forgetting"] <= 0.01


def test_forgetting_ratio_of_a_permuted_class_incremental_run_takes_chance_over_its_own_classes(tmp_path):
    """Permuted-Digits, class-incremental: both experiences hold the same 10 classes, so a random classifier's
    accuracy is 1/10, not 1/20 (the classes summed over the experiences, as a split's are). rho by hand."""
    out = tmp_path / "p"
    rc = main(["cl", "benchmark.variant=permuted", "scenario=class", "strategies=[naive,cumulative]",
               "benchmark.n_experiences=2", "train.epochs=1", "progress=false", f"output_dir={out}"])
    assert rc == 0
    s = json.loads((out / "results.json").read_text())["strategies"]
    last, joint = np.asarray(s["naive"]["accuracy_matrix"])[-1], np.asarray(s["cumulative"]["accuracy_matrix"])[-1]
    assert s["naive"]["rho"] == pytest.approx(np.mean((last - 0.1) / (joint - 0.1)) - 1)
    assert s["naive"]["rho"] != pytest.approx(np.mean((last - 0.05) / (joint - 0.05)) - 1)
