"""GZSL on THE modular network: the network `modnet gzsl` trains is `modnet cl`'s, NIWT extends that network
itself (measured through its masks and gates), and continual GZSL runs the strategies of `modnet cl`'s registry."""
import json

import pytest
import torch
from torch.nn import functional as F

from modnet.cli import main
from modnet.config import ConfigError, compose

TINY = ["progress=false", "train.epochs=2", "niwt.max_iterations=30", "niwt.map_epochs=30", "ale.epochs=1",
        "eszsl.search=false", "calibration.mode=none",
        "clswgan.hidden=64", "clswgan.critic_hidden=64", "clswgan.epochs=1", "clswgan.syn_num=20",
        "clswgan.classifier_epochs=2", "clswgan.pretrain_epochs=2"]


@pytest.mark.parametrize("images", [False, True])
def test_gzsl_records_the_network_class_that_cl_records_for_the_same_data(tmp_path, images):
    cl_image = ["benchmark.image=true", "benchmark.n_experiences=2"] if images else ["benchmark.n_experiences=2"]
    assert main(["cl", "strategies=[modnet]", "train.epochs=1", "progress=false", f"output_dir={tmp_path / 'cl'}",
                 *cl_image]) == 0
    assert main(["gzsl", *TINY, f"benchmark.image={str(images).lower()}", f"output_dir={tmp_path / 'gzsl'}"]) == 0
    cl = json.loads((tmp_path / "cl" / "results.json").read_text())["strategies"]["modnet"]["network"]
    gzsl = json.loads((tmp_path / "gzsl" / "results.json").read_text())["network"]
    assert gzsl["class"] == cl["class"] == ("HATCNN" if images else "HATMLP")
    assert [layer["units"] for layer in gzsl["layers"]] == [layer["units"] for layer in cl["layers"]]


@pytest.fixture(scope="module")
def trained():
    from modnet.jobs.gzsl import train_seen_network
    from scenarios.zsl import load_zsl_benchmark

    torch.set_num_threads(1)
    cfg = compose("gzsl", [*TINY, "train.epochs=5"])
    data = load_zsl_benchmark("digits", seed=0, unseen_classes=[2, 7])
    return cfg, train_seen_network(cfg, data, 0, torch.device("cpu"), progress=False)


def test_niwt_grows_the_trained_network_and_leaves_its_trained_weights_alone(trained):
    from modnet.zsl.registry import get_zsl_method

    cfg, net = trained
    model, data = net.model, net.data
    n_seen, n_unseen = len(data.seen_classes), len(data.unseen_classes)
    masked_before = [layer.weight.detach().clone() for layer in model.masked]
    head_before = model.heads[0].weight.detach().clone()
    x_test = data.x_test_seen[:50]
    with torch.no_grad():
        logits_before = model.eval()(x_test, 0)
    scores_seen, scores_unseen = get_zsl_method("niwt").score(cfg, net, {})
    assert net.model is model                                   # the trained network, no wrapper
    assert model.heads[0].out_features == n_seen + n_unseen     # seen rows + NIWT's unseen rows
    assert model.task_classes[0] == list(range(n_seen + n_unseen))
    assert all(torch.equal(b, layer.weight) for b, layer in zip(masked_before, model.masked))
    assert torch.equal(model.heads[0].weight[:n_seen], head_before)
    # seen classes keep their logits; unseen classes score through the new rows; column = dataset class
    assert torch.allclose(scores_seen[:50][:, data.seen_classes], logits_before, atol=1e-5)
    with torch.no_grad():
        features = model.features(x_test, model.unit_masks(x_test, 0), 0)
    expected_unseen = features @ model.heads[0].weight[n_seen:].T + model.heads[0].bias[n_seen:]
    assert torch.allclose(scores_seen[:50][:, data.unseen_classes], expected_unseen, atol=1e-5)
    assert torch.isfinite(scores_unseen[:, data.unseen_classes]).all()


def test_niwt_importance_is_measured_through_the_masks_at_smax_and_the_gates(trained):
    """Importance at unit_taps[0] of the HAT MLP, from its formula: d (w_c . h1) / d h0 = W1^T (m1(x) * [z1 > 0] * w_c)
    with z1 = W1 h0 + b1 and m1(x) = sigmoid(smax * e1) times the module gates of x (eval mode)."""
    from modnet.methods.niwt import sample_importance

    _, net = trained
    model = net.model.eval()
    x = net.data.x_train[:64]
    c = torch.arange(64) % len(net.data.seen_classes)
    measured = sample_importance(model, model.unit_taps[0], x, c, forward_fn=net.forward)
    l0, l1 = model.masked
    hat = [torch.sigmoid(model.smax * layer.task_embedding.weight[0]).detach() for layer in (l0, l1)]
    with torch.no_grad():
        gates = model.gate(x, 0, [torch.ones_like(h) for h in hat])  # the module gates of each input
        h0 = F.relu(l0(x)) * hat[0] * gates[0]
        z1 = l1(h0)
        w = model.heads[0].weight[c]
        expected = (hat[1] * gates[1] * (z1 > 0) * w) @ l1.weight
    assert (gates[1] == 0).any()                                # the gates do switch modules off
    assert torch.allclose(measured, expected, atol=1e-5)


def test_niwt_routed_extends_a_copy_of_the_seen_network_and_predicts_no_importance_where_no_module_fires(trained):
    """Routing-informed NIWT runs beside plain NIWT on the same trained network: it extends a copy made before
    any unseen row was added, whatever ran first, and units that no seen class switches on (HAT mask off or
    module never gated on) get no predicted importance for the unseen classes."""
    from modnet.methods.niwt import NIWT
    from modnet.zsl.niwt import importance_layer, niwt_arguments
    from modnet.zsl.registry import get_zsl_method

    cfg, net = trained
    data = net.data
    if net.classes == list(data.seen_classes):
        get_zsl_method("niwt").score(cfg, net, {})             # the run's network already holds unseen rows
    head_rows, classes = net.model.heads[0].out_features, list(net.classes)
    scores_seen, scores_unseen = get_zsl_method("niwt_routed").score(cfg, net, {})
    assert net.model.heads[0].out_features == head_rows and net.classes == classes   # left alone
    n_seen = len(data.seen_classes)
    with torch.no_grad():
        seen_logits = net.model.eval()(data.x_test_seen[:20], 0)[:, :n_seen]
    assert torch.allclose(scores_seen[:20][:, data.seen_classes], seen_logits, atol=1e-5)
    assert torch.isfinite(scores_unseen[:, data.unseen_classes]).all()

    copy = net.seen_copy()
    assert copy.model.heads[0].out_features == n_seen
    routing = copy.unit_routing(0)
    dead = routing.sum(0) == 0
    assert dead.any() and (~dead).any()
    x, y = copy.split("train")
    niwt = NIWT(copy.model, importance_layer(copy.model, -2), copy.head, forward_fn=copy.forward,
                **{**niwt_arguments(cfg), "max_iterations": 2})
    niwt.fit(x, y, data.attributes, data.seen_classes, data.unseen_classes, seen_routing=routing)
    assert torch.all(niwt.unseen_importance[:, dead] == 0)
    assert niwt.unseen_importance[:, ~dead].abs().sum() > 0


def test_niwt_positives_differs_from_niwt_by_one_bias_per_unseen_row_on_the_same_network(trained):
    """niwt_positives runs beside niwt on the same trained network (a copy): the same fitted directions and
    lengths, so on every image its unseen scores are niwt's plus a constant per unseen row (the bias that
    scale=positives sets instead of negatives'), and its seen scores are the network's own."""
    from modnet.zsl.registry import get_zsl_method

    cfg, net = trained
    data = net.data
    base = net.seen_copy()
    neg_seen, neg_unseen = get_zsl_method("niwt").score(cfg, base, {})
    pos_seen, pos_unseen = get_zsl_method("niwt_positives").score(cfg, base, {})
    unseen = data.unseen_classes
    shift = pos_unseen[:, unseen] - neg_unseen[:, unseen]
    assert torch.allclose(shift, shift[:1].expand_as(shift), atol=1e-4)
    assert torch.allclose(pos_seen[:, unseen] - neg_seen[:, unseen], shift[:1].expand(len(pos_seen), -1), atol=1e-4)
    assert torch.allclose(pos_seen[:, data.seen_classes], neg_seen[:, data.seen_classes], atol=1e-5)
    assert shift.abs().max() > 1e-3  # the two rules do differ


def test_niwt_on_every_head_of_a_class_incremental_network_keeps_its_task_keys():
    """fit_heads gives each head of a multi-task HAT network unseen rows; the task keys still index the trained
    classes only, so the task posterior is the one before the rows were added."""
    from modnet.methods.niwt import NIWT, Head
    from modnet.nets.build import build_modular_network

    torch.manual_seed(0)
    cfg = compose("cl", ["model.gate=none", "task_inference.method=gauss"])  # the input-space task keys
    model = build_modular_network(cfg, (6,), [[0, 1], [2, 3]], class_incremental=True)
    x, y = torch.randn(80, 6), torch.arange(80) % 4
    for t in (0, 1):
        model.update_task_keys(x[y // 2 == t], t, y[y // 2 == t])
        model.consolidate(t)
    model.eval()
    posterior = model.task_keys.task_log_posterior(x, [model.key_slots(t) for t in (0, 1)])
    knowledge = F.normalize(torch.randn(6, 5), dim=1)
    heads = [Head(model.heads[t], model.task_classes[t], forward_fn=lambda v, t=t: model.task_logits(v, t))
             for t in (0, 1)]
    niwt = NIWT(model, model.unit_taps[0], None, map_epochs=20, max_iterations=20).fit_heads(
        x, y, knowledge, heads, [4, 5])
    assert len(niwt.unseen_by_head) == 2 and niwt.seen_importance.shape[0] == 4
    # step 1 by hand, per head through its own classifier: a_c = mean over class c's inputs of d o_c / d h_0,
    # h_0 the first masked layer's output m_0 ReLU(W_0 x + b_0), the rest of task t's path written out
    # (measuring every head through head 0, or giving every head head 0's rows, passed the checks below)
    masks = [[m.detach() for m in model.masks(t)] for t in (0, 1)]
    for t in (0, 1):
        for row, c in enumerate(model.task_classes[t]):
            xc = x[y == c]
            h = (masks[t][0] * torch.relu(model.masked[0](xc))).detach().requires_grad_()
            out = h
            for layer, m in zip(model.masked[1:], masks[t][1:]):
                out = m * torch.relu(layer(out))
            model.heads[t](out)[:, row].sum().backward()
            torch.testing.assert_close(niwt.seen_importance[c], h.grad.mean(0), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(niwt.unseen_by_head[0].weight, niwt.unseen_by_head[1].weight)
    for t, unseen in enumerate(niwt.unseen_by_head):
        model.add_classes(t, [4, 5], unseen.weight, unseen.bias)
    assert [h.out_features for h in model.heads] == [4, 4] and model.n_key_slots == 4
    assert torch.allclose(model.task_keys.task_log_posterior(x, [model.key_slots(t) for t in (0, 1)]), posterior)
    with torch.no_grad():
        scores = model(x)
    assert scores.shape == (80, 6) and torch.isfinite(scores).all()
    with pytest.raises(ValueError, match="several heads"):
        niwt.gzsl_model()


def test_continual_gzsl_modnet_forgets_nothing_and_fine_tuning_does(tmp_path):
    """Digits, seen classes over 2 experiences: with the experience known (task j's head / the argmax over
    experience j's classes) HAT keeps the first experience, fine-tuning does not."""
    assert main(["gzsl", *TINY, "methods=[eszsl]", "train.epochs=10", "continual.enabled=true",
                 "continual.n_experiences=2", "strategies=[modnet,naive]", f"output_dir={tmp_path}"]) == 0
    res = json.loads((tmp_path / "results.json").read_text())["continual"]["strategies"]
    modnet, naive = res["modnet"], res["naive"]
    assert modnet["forgetting"] <= 0.02 < naive["forgetting"]
    assert naive["class_incremental_forgetting"] > 0.5           # no task label: fine-tuning forgets everything
    assert modnet["class_incremental_forgetting"] < naive["class_incremental_forgetting"]
    matrix = modnet["per_seed"][0]["accuracy_matrix"]
    assert matrix[1][0] == pytest.approx(matrix[0][0], abs=1e-6)  # the first experience's accuracy, unchanged
    # the continual figures beside results.json too (they were only there): a row per strategy and experience
    import csv

    with open(tmp_path / "continual.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["strategy"], r["after_exp"]) for r in rows] == [("modnet", "0"), ("modnet", "1"), ("naive", "0"),
                                                               ("naive", "1")]
    for r in rows:
        e = res[r["strategy"]]["experiences"][int(r["after_exp"])]
        assert float(r["H"]) == pytest.approx(e["H"]) and float(r["forgetting"]) == pytest.approx(e["forgetting"])
    from matplotlib import image as mpimg

    assert mpimg.imread(tmp_path / "continual_gzsl.png").shape[0] > 200


def test_continual_gzsl_sizes_a_matched_buffer_to_modnets_bytes_and_reports_them(tmp_path, capsys):
    """replay.mem_size=match in continual GZSL: modnet runs first (listed last), replay keeps floor(B_modnet /
    272) digits samples, within one sample of modnet's bytes; both strategies' bytes are in results.json and
    under the table."""
    assert main(["gzsl", *TINY, "methods=[eszsl]", "train.epochs=2", "continual.enabled=true",
                 "continual.n_experiences=2", "strategies=[replay,modnet]", "replay.mem_size=match",
                 f"output_dir={tmp_path}"]) == 0
    res = json.loads((tmp_path / "results.json").read_text())["continual"]["strategies"]
    assert list(res) == ["replay", "modnet"]
    modnet, replay = res["modnet"]["per_seed"][0], res["replay"]["per_seed"][0]
    assert replay["settings"] == {"mem_size": modnet["stored_bytes"] // 272}
    assert replay["stored_bytes"] == replay["settings"]["mem_size"] * 272
    assert 0 <= modnet["stored_bytes"] - replay["stored_bytes"] < 272
    assert f"stored bytes: replay {replay['stored_bytes']}, modnet {modnet['stored_bytes']}" in capsys.readouterr().out


def test_continual_gzsl_leaves_out_a_buffer_that_modnets_bytes_cannot_hold(tmp_path, capsys, monkeypatch):
    """match giving no sample (planted: the size computed as 0) leaves replay out with one line, under the
    table and in results.json's continual.failed; modnet's continual figures and the methods' are kept (the
    job used to stop there, losing every result)."""
    from strategies import memory

    monkeypatch.setattr(memory, "matched_size", lambda name, info, stored: 0)
    assert main(["gzsl", *TINY, "methods=[eszsl]", "train.epochs=2", "continual.enabled=true",
                 "continual.n_experiences=2", "strategies=[modnet,replay]", "replay.mem_size=match",
                 f"output_dir={tmp_path}"]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert list(res["continual"]["strategies"]) == ["modnet"] and "eszsl" in res["methods"]
    assert res["continual"]["failed"]["replay"]["seed"] == 0
    assert "hold no sample" in res["continual"]["failed"]["replay"]["error"]
    assert "left out: replay (seed 0): replay.mem_size=match" in capsys.readouterr().out


@pytest.mark.parametrize("overrides, words", [
    (["methods=[niwt,cada_vae]"], ["methods", "cada_vae", "niwt", "eszsl", "ale", "devise"]),
    (["methods=[]"], ["methods", "empty"]),
    (["continual.enabled=true", "strategies=[modnet,foo]"], ["strategies", "foo", "naive", "replay"]),
    (["continual.enabled=true", "strategies=[hnet]"], ["hnet", "linear head"]),
    (["continual.enabled=true", "strategies=[naive,replay]", "replay.mem_size=match"],
     ["replay.mem_size=match", "add modnet"]),
    (["continual.enabled=true", "continual.n_experiences=3"], ["continual.n_experiences=3", "8 seen classes"]),
    (["niwt.layer=5"], ["niwt.layer=5", "2 masked layers"]),
    (["niwt.layers=[-2,9]"], ["niwt.layer=9", "niwt.layers", "2 masked layers"]),
    (["niwt.layers=[]"], ["niwt.layer / niwt.layers", "indices"]),
    (["gate.min_seen_ratio=1.5"], ["gate.min_seen_ratio=1.5", "(0, 1]"]),
    (["calibration.mode=sometimes"], ["calibration.mode", "validate"]),
    (["niwt.scale=softmax"], ["niwt.scale", "negatives"]),
    (["model.head=dense"], ["model.head", "cosine"]),
    (["model.head=cosine", "niwt.scale=none", "model.head_tau=0", "methods=[niwt]"], ["model.head_tau=0", "> 0"]),
    (["model.head=cosine", "methods=[niwt]"], ["model.head=cosine", "niwt.scale=none"]),
    (["model.head=cosine", "niwt.scale=none"], ["model.head=cosine", "niwt_positives", "leave it out of methods"]),
    (["train.label_smoothing=1.5"], ["train.label_smoothing=1.5", "[0, 1)"]),
    (["niwt.map_fit=lstsq"], ["niwt.map_fit", "centered"]),
    (["niwt.map_fit=centered", "niwt.map_bias=false"], ["niwt.map_fit=centered", "map_bias=true"]),
    (["niwt.map_ridge=-1"], ["niwt.map_ridge=-1", ">= 0"]),
    (["niwt.seen_budget=1.0"], ["niwt.seen_budget=1.0", "[0, 1)"]),
    (["calibration.val_splits=0"], ["calibration.val_splits=0", "> 0"]),
    (["calibration.val_min_classes=0"], ["calibration.val_min_classes=0", "> 0"]),
    (["gate.shrinkage=2"], ["gate.shrinkage=2", "[0, 1]"]),
    (["baseline_features=bogus"], ["baseline_features", "penultimate"]),
    (["+large_train.clswgan.width=8"], ["large_train.clswgan.width", "hidden", "syn_num"]),
    (["seen_network.hat_c=-1"], ["seen_network.hat_c=-1", ">= 0"]),
])
def test_bad_gzsl_config_is_one_config_error_line_before_training(tmp_path, monkeypatch, overrides, words):
    import modnet.runner.runner as runner

    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(runner, "run_experiences", no_training)
    with pytest.raises(ConfigError) as err:
        from modnet.jobs.gzsl import run_gzsl

        run_gzsl(compose("gzsl", [*TINY, f"output_dir={tmp_path}", *overrides]))
    msg = str(err.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_explain_run_dir_of_a_gzsl_run_explains_that_seeds_network(tmp_path):
    """`modnet explain run_dir=` on a `modnet gzsl` folder: the modules explained are those the second seed's
    network gates, as its results.json records them (not the first seed's)."""
    assert main(["gzsl", *TINY, "seeds=[0,1]", f"output_dir={tmp_path / 'gzsl'}"]) == 0
    assert main(["explain", f"run_dir={tmp_path / 'gzsl'}", "run_seed=1", "explain.module_grids=false",
                 f"output_dir={tmp_path / 'explain'}"]) == 0
    recorded = json.loads((tmp_path / "gzsl" / "results.json").read_text())["network_per_seed"]["1"]
    explained = json.loads((tmp_path / "explain" / "explanations.json").read_text())["modules"]
    expected = {f"layer{i}": {f"module{g}": units for g, units in zip(layer["module_ids"], layer["modules"])}
                for i, layer in enumerate(recorded["layers"]) if layer["modules"]}
    assert {layer: {m: v["units"] for m, v in modules.items()} for layer, modules in explained.items()} == expected
    assert all((tmp_path / "explain" / v["image"]).exists() for modules in explained.values() for v in modules.values())
    # the unseen classes' attributes agree partly by construction (NIWT built their rows from them): said once
    notes = json.loads((tmp_path / "explain" / "explanations.json").read_text())["notes"]
    assert [n for n in notes if n.startswith("Unseen classes 2, 7:")] and "by construction" in " ".join(notes)


def test_niwt_layer_null_runs_every_candidate_layer_through_validation_and_records_the_choice_per_seed(tmp_path):
    """niwt.layer=null: each of niwt.layers is fitted on the same validation network (the second on a seen-class
    copy of it, next test) and the layer validation chose is recorded per seed."""
    from modnet.jobs.gzsl import run_gzsl

    cfg = compose("gzsl", [*TINY, "methods=[niwt]", f"output_dir={tmp_path}", "niwt.layer=null",
                           "niwt.layers=[-2,-1]", "gate.enabled=false", "calibration.val_splits=1"])
    run_gzsl(cfg)
    res = json.loads((tmp_path / "results.json").read_text())
    chosen = res["per_seed"]["0"]["niwt"]
    assert chosen["setting"] == {"niwt_layer": chosen["niwt_layer"]} and chosen["niwt_layer"] in (-2, -1)
    assert res["methods"]["niwt"]["setting_per_seed"] == [chosen["setting"]]
    assert 0 <= chosen["uncalibrated"]["U"] <= 1


def test_a_second_niwt_layer_candidate_fits_on_the_seen_class_network_not_on_the_first_ones_rows(trained):
    from modnet.zsl.registry import get_zsl_method

    cfg, net = trained
    net = net.seen_copy()
    n_seen, n_unseen = len(net.data.seen_classes), len(net.data.unseen_classes)
    niwt = get_zsl_method("niwt")
    first = niwt.score(cfg, net, {"niwt_layer": -2})
    second = niwt.score(cfg, net, {"niwt_layer": -1})
    assert net.model.heads[0].out_features == n_seen + n_unseen  # extended by the first candidate only
    unseen = net.data.unseen_classes
    assert torch.isfinite(second[1][:, unseen]).all()
    # the seen columns of both candidates are the trained network's; the unseen columns come from each layer
    assert torch.allclose(first[0][:, net.data.seen_classes], second[0][:, net.data.seen_classes], atol=1e-5)
    assert not torch.allclose(first[1][:, unseen], second[1][:, unseen])


def test_the_seen_network_takes_its_own_capacity_weight_and_continual_gzsl_keeps_hats():
    """seen_network.hat_c replaces hat.c for the one-experience seen-class network only (null keeps hat.c), on a
    copy: the config continual GZSL reads still has hat.c. A network trained at c = 0 keeps more units on than
    at HAT's 0.75 (the regulariser's job is to free them for later experiences, which this network has none of)."""
    from modnet.jobs.gzsl import with_seen_network_hat

    cfg = compose("gzsl", ["hat.c=0.75", "seen_network.hat_c=0.0"])
    own = with_seen_network_hat(cfg)
    assert own.hat.c == 0.0 and cfg.hat.c == 0.75
    assert with_seen_network_hat(compose("gzsl", ["hat.c=0.5", "seen_network.hat_c=null"])).hat.c == 0.5
    from modnet.jobs.gzsl import train_seen_network
    from scenarios.zsl import load_digits_zsl

    data = load_digits_zsl()
    units_on = {}
    for c in (0.0, 0.75):
        net = train_seen_network(compose("gzsl", [*TINY, "train.epochs=5", f"seen_network.hat_c={c}"]), data, 0,
                                 torch.device("cpu"), False)
        units_on[c] = sum(int((m > 0.5).sum()) for m in net.model.masks(0))
    assert units_on[0.0] > units_on[0.75], units_on


def test_clswgan_trains_on_its_own_threads_and_gives_the_job_its_threads_back(tmp_path, monkeypatch):
    """clswgan.threads: f-CLSWGAN's fit and scores run on that many torch threads, the rest of the job on
    ``threads``; null (the default) is torch's default as the job found it when it started (here 2, set by
    the caller). After the method, and after the job, the threads are as they were. 0 is one config line."""
    from modnet.methods.clswgan import FCLSWGAN
    from modnet.validate import validate

    ran_on, fit = [], FCLSWGAN.fit

    def recording_fit(self, *args, **kwargs):
        ran_on.append(torch.get_num_threads())
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(FCLSWGAN, "fit", recording_fit)
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the process's default, as the job finds it
    try:
        for extra, expected in ((["clswgan.threads=null"], 2), (["clswgan.threads=1"], 1)):
            ran_on.clear()
            assert main(["gzsl", *TINY, "methods=[clswgan,eszsl]", "threads=1", *extra,
                         f"output_dir={tmp_path / str(expected)}"]) == 0
            assert ran_on and set(ran_on) == {expected}  # each fit (validation splits, test)
            assert torch.get_num_threads() == 2
            saved = (tmp_path / str(expected) / "config.yaml").read_text()
            assert f"  threads: {expected}\n" in saved  # the count it ran on, null resolved
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ConfigError, match="clswgan.threads"):
        validate("gzsl", compose("gzsl", ["clswgan.threads=0"]))


def test_validation_picks_the_setting_with_the_best_mean_h_over_the_splits(monkeypatch):
    """``validate``: every candidate setting of a method is scored on every class-disjoint split, and the one
    with the best H averaged over the splits is chosen (planted H per candidate and split: candidate 0 0.3 / 0.4 /
    0.5, mean 0.4; candidate 1 0.6 / 0.5 / 0.4, mean 0.5 -> candidate 1, validation H 0.5; a min, or the first
    candidate only, picks candidate 0). NIWT's candidates with niwt.layer=null: every index of niwt.layers."""
    from types import SimpleNamespace

    from modnet.config import compose
    from modnet.jobs import gzsl
    from modnet.zsl.niwt import candidates
    from scenarios.zsl import load_digits_zsl

    cfg = compose("gzsl", ["calibration.mode=fixed", "calibration.gamma=0.0", "gate.enabled=false",
                           "niwt.layer=null", "niwt.layers=[-2,-1]"])
    assert candidates(cfg) == [{"niwt_layer": -2}, {"niwt_layer": -1}]
    planted = {-2: [0.3, 0.4, 0.5], -1: [0.6, 0.5, 0.4]}
    calls = []

    def fake_scores(cfg, val, seed, device, progress, stage):
        split = len(calls)
        calls.append(stage)
        per_method = {"niwt": [(setting, (setting["niwt_layer"], split)) for setting in candidates(cfg)]}
        return None, per_method

    monkeypatch.setattr(gzsl, "score_methods", fake_scores)
    monkeypatch.setattr(gzsl, "_evaluate", lambda scores, val, g: SimpleNamespace(H=planted[scores[0]][scores[1]]))
    data = load_digits_zsl(seed=0)
    chosen = gzsl.validate(cfg, data, 0, torch.device("cpu"), False)
    assert len(calls) == gzsl.validation_splits(cfg, data) == 3
    assert chosen["niwt"]["params"] == {"niwt_layer": -1}
    assert chosen["niwt"]["validation_H"] == pytest.approx(0.5) and chosen["niwt"]["gamma"] == 0.0


@pytest.mark.parametrize("mode", ["validate", "fixed", "none"])
def test_the_headline_setting_is_chosen_on_uncalibrated_h_whatever_the_calibration(monkeypatch, mode):
    """The table's headline is uncalibrated (Xian et al.); its setting was chosen by H at the mode's gamma, so the
    "uncalibrated" figures changed with calibration.mode (digits ESZSL H .434 validate, .484 none). Planted: the
    uncalibrated H prefers candidate 1 (0.5 vs 0.3), H after calibration candidate 0 (0.9 vs 0.6): candidate 1 in
    every mode. The calibrated reading chooses its own: candidate 0 where calibration runs (validate: with that
    candidate's gamma), the headline's with calibration.mode=none (its figures are the uncalibrated ones)."""
    from types import SimpleNamespace

    from modnet.config import compose
    from modnet.jobs import gzsl
    from modnet.zsl.niwt import candidates
    from scenarios.zsl import load_digits_zsl

    cfg = compose("gzsl", [f"calibration.mode={mode}", *(["calibration.gamma=2.0"] if mode == "fixed" else []),
                           "gate.enabled=false", "niwt.layer=null", "niwt.layers=[-2,-1]"])
    uncalibrated, calibrated = {-2: 0.3, -1: 0.5}, {-2: 0.9, -1: 0.6}
    gammas = {-2: 5.0, -1: 1.0}

    def fake_scores(cfg, val, seed, device, progress, stage):
        return None, {"niwt": [(setting, (setting["niwt_layer"],) * 2) for setting in candidates(cfg)]}

    monkeypatch.setattr(gzsl, "score_methods", fake_scores)
    monkeypatch.setattr(gzsl, "_evaluate", lambda scores, val, g: SimpleNamespace(
        H=uncalibrated[scores[0]] if g == 0.0 else calibrated[scores[0]]))
    monkeypatch.setattr(gzsl, "select_calibration", lambda s, ys, u, yu, sc, uc: (gammas[s], calibrated[s]))
    chosen = gzsl.validate(cfg, load_digits_zsl(seed=0), 0, torch.device("cpu"), False)["niwt"]
    assert chosen["params"] == {"niwt_layer": -1} and chosen["validation_H"] == pytest.approx(0.5)
    assert chosen["calibrated_params"] == {"niwt_layer": -1 if mode == "none" else -2}
    assert chosen["gamma"] == {"validate": 5.0, "fixed": 2.0, "none": 0.0}[mode]
    assert chosen["validation_H_calibrated"] == pytest.approx(0.5 if mode == "none" else 0.9)


def _validate_planted(monkeypatch, quantiles, uncalibrated, seen_only, gated):
    """``gzsl.validate`` of NIWT's candidates layer -2 and -1 on planted figures, the same on every split: per layer
    its uncalibrated H and seen-only accuracy, per (layer, gate quantile) its gated (H, S). Returns NIWT's choice."""
    from types import SimpleNamespace

    from modnet.config import compose
    from modnet.jobs import gzsl
    from modnet.zsl.niwt import candidates
    from scenarios.zsl import load_digits_zsl

    cfg = compose("gzsl", ["calibration.mode=none", "gate.enabled=true", "gate.layer=0", "gate.quantile=null",
                           f"gate.quantiles=[{','.join(map(str, quantiles))}]", "gate.min_seen_ratio=0.9",
                           "niwt.layer=null", "niwt.layers=[-2,-1]"])

    class Gate:
        def sides(self, novelties, q):
            return q

    def fake_scores(cfg, val, seed, device, progress, stage):  # a candidate's scores: its layer, twice
        return object(), {"niwt": [(setting, (setting["niwt_layer"],) * 2) for setting in candidates(cfg)]}

    monkeypatch.setattr(gzsl, "score_methods", fake_scores)
    monkeypatch.setattr(gzsl, "novelty_of_tests", lambda cfg, net, layer: (Gate(), None, None))
    monkeypatch.setattr(gzsl, "restricted_accuracy", lambda scores, y, classes: seen_only[scores])
    monkeypatch.setattr(gzsl, "_evaluate_gated", lambda scores, val, q: SimpleNamespace(
        H=gated[scores[0], q][0], S=gated[scores[0], q][1]))
    monkeypatch.setattr(gzsl, "_evaluate", lambda scores, val, g: SimpleNamespace(H=uncalibrated[scores[0]]))
    return gzsl.validate(cfg, load_digits_zsl(seed=0), 0, torch.device("cpu"), False)["niwt"]


def test_the_gate_chooses_its_own_candidate_with_its_layer_and_quantile(monkeypatch):
    """The gated reading chooses (candidate, gate setting) jointly: it used the headline's candidate, and on digits
    ESZSL's best uncalibrated regulariser gave the gate H 0.30 (3 seeds). Planted per (candidate, quantile), the
    same on every split: gated H / share of the seen-only accuracy kept. Candidate -1 has the best uncalibrated H
    (the headline); among the pairs that keep min_seen_ratio 0.9, (-2, 0.7) has the best gated H."""
    gated = {(-2, 0.5): (0.9, 0.5), (-2, 0.7): (0.8, 0.95), (-1, 0.5): (0.85, 0.6), (-1, 0.7): (0.6, 0.97)}
    chosen = _validate_planted(monkeypatch, [0.5, 0.7], {-2: 0.3, -1: 0.5}, {-2: 1.0, -1: 1.0}, gated)
    assert chosen["params"] == {"niwt_layer": -1}
    assert chosen["gate_params"] == {"niwt_layer": -2} and chosen["gate"] == (0, 0.7)
    assert chosen["gate_validation_H"] == pytest.approx(0.8)
    assert chosen["gate_validation_seen_kept"] == pytest.approx(0.95)


def test_the_gate_s_seen_bar_is_the_method_s_best_seen_accuracy_not_a_chance_candidate_s_own(monkeypatch):
    """A candidate that guesses at chance kept "all" of its own chance seen accuracy, passed min_seen_ratio and won
    the gated reading (a planted AWA2 run: ESZSL lambda 10, gated H 0.03 against 0.96 for lambda 0.001). Planted:
    layer -2 at chance among the seen classes (0.1 seen-only, gated S 0.1) with the better planted gated H, layer
    -1 at 0.9 (gated S 0.85, 94% of it). The bar is 0.9 of the method's best seen-only accuracy: layer -1."""
    gated = {(layer, q): hs for q in (0.8, 0.9) for layer, hs in ((-2, (0.75, 0.1)), (-1, (0.7, 0.85)))}
    chosen = _validate_planted(monkeypatch, [0.8, 0.9], {-2: 0.5, -1: 0.5}, {-2: 0.1, -1: 0.9}, gated)
    assert chosen["gate_params"] == {"niwt_layer": -1}
    assert chosen["gate_validation_seen_kept"] == pytest.approx(0.85 / 0.9)


def test_each_reading_is_evaluated_on_its_own_settings_scores_and_a_shared_setting_is_scored_once(monkeypatch):
    """run_seed: the headline (uncalibrated), calibrated and gated figures each come from the scores of their own
    validated setting; the headline's setting is scored first (NIWT extends the network it is given, and that
    network is the one the checkpoint keeps) and a setting two readings share is scored once. Planted scores that
    hold their setting's id; the readings' U are read back as that id."""
    from types import SimpleNamespace

    from modnet.config import compose
    from modnet.jobs import gzsl
    from scenarios.zsl import load_digits_zsl

    cfg = compose("gzsl", ["methods=[eszsl]", "gate.enabled=true", "gate.layer=0", "gate.quantile=0.9"])
    chosen = {"eszsl": {"params": {"id": 1}, "calibrated_params": {"id": 2}, "gamma": 0.5,
                        "gate_params": {"id": 1}, "gate": (0, 0.9), "gate_validation_H": 0.0,
                        "gate_validation_seen_kept": 1.0}}
    scored_settings = []

    def fake_scores(cfg, data, seed, device, progress, params):
        scored_settings.extend(params["eszsl"])
        return object(), {"eszsl": [(s, (s["id"], s["id"])) for s in params["eszsl"]]}

    def figures(u):
        return SimpleNamespace(as_dict=lambda: {"U": float(u), "S": 1.0, "H": 0.0, "zsl_accuracy": 0.0})

    class Gate:
        def sides(self, novelties, q):
            return torch.zeros(1, dtype=torch.bool), torch.ones(1, dtype=torch.bool)

    monkeypatch.setattr(gzsl, "validate", lambda *a: chosen)
    monkeypatch.setattr(gzsl, "score_methods", fake_scores)
    monkeypatch.setattr(gzsl, "_evaluate", lambda scores, data, g: figures(scores[0] + 10 * g))
    monkeypatch.setattr(gzsl, "_evaluate_gated", lambda scores, data, sides: figures(scores[0]))
    monkeypatch.setattr(gzsl, "novelty_of_tests", lambda cfg, net, layer: (Gate(), None, None))
    results, _ = gzsl.run_seed(cfg, load_digits_zsl(seed=0), 0, torch.device("cpu"), False)
    r = results["eszsl"]
    assert scored_settings == [{"id": 1}, {"id": 2}]
    assert r["uncalibrated"]["U"] == 1.0 and r["setting"] == {"id": 1}
    assert r["U"] == 2.0 + 10 * 0.5 and r["calibrated_setting"] == {"id": 2} and r["gamma"] == 0.5
    assert r["gated"]["U"] == 1.0 and r["gated"]["setting"] == {"id": 1}


def test_a_methods_scores_do_not_depend_on_the_methods_scored_before_it(monkeypatch):
    """Every scoring starts from the seed, so that a method drawing from the global generators (one a user
    registers) does not depend on the methods, or their settings, scored before it; scoring more settings per
    method (each reading's own) must not move another method's figures. Planted: method "eszsl" draws 1 or 3
    numbers per setting, "ale" returns its first draw; ale's scores are the same alone, after eszsl with one setting and after eszsl with
    two, and equal to a draw right after seeding."""
    from types import SimpleNamespace

    from modnet.jobs import gzsl

    def drawing(n_of):
        return SimpleNamespace(candidates=lambda cfg: [{}],
                               score=lambda cfg, net, setting: (torch.rand(n_of(setting)), torch.rand(1)))

    methods = {"eszsl": drawing(lambda s: s.get("n", 1)), "ale": drawing(lambda s: 2)}
    monkeypatch.setattr(gzsl, "get_zsl_method", lambda name: methods[name])
    monkeypatch.setattr(gzsl, "train_seen_network", lambda *a: SimpleNamespace(seen_accuracy=1.0))
    runs = []
    for names, params in ((["ale"], {"ale": [{}]}), (["eszsl", "ale"], {"eszsl": [{"n": 1}], "ale": [{}]}),
                          (["eszsl", "ale"], {"eszsl": [{"n": 1}, {"n": 3}], "ale": [{}]})):
        cfg = compose("gzsl", [f"methods=[{','.join(names)}]"])
        data = SimpleNamespace(seen_classes=[0, 1])
        _, out = gzsl.score_methods(cfg, data, 7, torch.device("cpu"), False, params=params)
        runs.append(out["ale"][0][1][0])
    torch.manual_seed(7)
    assert all(torch.equal(r, runs[0]) for r in runs) and torch.equal(runs[0], torch.rand(2))


def test_a_method_that_gives_nan_scores_is_named(monkeypatch):
    """The job names the method (and seed, stage, setting) whose scores hold NaN, as soon as it has scored."""
    from types import SimpleNamespace

    from modnet.jobs import gzsl

    fine = SimpleNamespace(candidates=lambda cfg: [{}], score=lambda cfg, net, setting: (torch.zeros(2, 3),
                                                                                          torch.zeros(1, 3)))
    diverged = SimpleNamespace(candidates=lambda cfg: [{}],
                               score=lambda cfg, net, setting: (torch.zeros(2, 3), torch.full((1, 3), float("nan"))))
    monkeypatch.setattr(gzsl, "get_zsl_method", lambda name: {"eszsl": fine, "ale": diverged}[name])
    monkeypatch.setattr(gzsl, "train_seen_network", lambda *a: SimpleNamespace(seen_accuracy=1.0))
    cfg = compose("gzsl", ["methods=[eszsl,ale]"])
    with pytest.raises(ValueError, match="gzsl method ale gave NaN scores \\(seed 3, test"):
        gzsl.score_methods(cfg, SimpleNamespace(seen_classes=[0, 1]), 3, torch.device("cpu"), False)


def test_nan_scores_are_an_error_not_a_number():
    """A diverged method's NaN scores: argmax picked a NaN entry, or class 0 for an all-NaN row, and the run printed
    S = 1/3 for it (4 test-seen images of classes 0, 0, 1, 2)."""
    import torch

    from modnet.methods.gzsl import gzsl_evaluate

    nan = torch.full((4, 5), float("nan"))
    y_seen, y_unseen = torch.tensor([0, 0, 1, 2]), torch.tensor([3, 4])
    with pytest.raises(ValueError, match="NaN"):
        gzsl_evaluate(nan, y_seen, torch.zeros(2, 5), y_unseen, [0, 1, 2], [3, 4])
    ruled_out = torch.zeros(4, 5)
    ruled_out[:, 3:] = -float("inf")  # a class ruled out (the gate's other side) is a score, not an error
    unseen = torch.zeros(2, 5)
    unseen[0, 3] = unseen[1, 4] = 1.0
    result = gzsl_evaluate(ruled_out, y_seen, unseen, y_unseen, [0, 1, 2], [3, 4])
    assert result.U == 1.0 and result.S == pytest.approx(1 / 3)  # ties go to class 0: right on class 0 only


def test_niwt_s_shifted_rows_are_named_as_a_calibration():
    """niwt.scale=seen_budget shifts every unseen row by one constant chosen on seen training images: calibrated
    stacking in effect. The table's uncalibrated columns must say so for niwt (and niwt_routed), not for the
    methods scored as trained, and not under another scale."""
    from modnet.config import compose
    from modnet.jobs.gzsl import uncalibrated_caveats

    methods = {"niwt": {}, "niwt_routed": {}, "eszsl": {}, "ale": {}}
    caveats = uncalibrated_caveats(compose("gzsl"), methods)
    assert set(caveats) == {"niwt", "niwt_routed"} and "calibrated stacking" in caveats["niwt"]
    assert uncalibrated_caveats(compose("gzsl", ["niwt.scale=negatives"]), methods) == {}
