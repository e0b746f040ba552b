"""Functional modules: SynC grouping of units, key-vector hard attention, task keys (MISSION.md 1.4)."""
import json
import types

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from modnet.cli import main
from modnet.nets.modules import ModuleGate, ModularGating, TaskKeys, cluster_units
from modnet.nets.models import HATCNN


def test_cluster_units_recovers_planted_modules():
    g = torch.Generator().manual_seed(0)
    latent = torch.randn(3, 200, generator=g)  # three independent signals over 200 samples
    planted = torch.arange(30) % 3
    profiles = latent[planted] + 0.2 * torch.randn(30, 200, generator=g)  # units: noisy copies of a signal
    labels, S = cluster_units(profiles, k=3, min_modules=2, max_modules=8)
    assert S.shape == (30, 16)
    assert adjusted_rand_score(planted.numpy(), labels.numpy()) == 1.0


def test_sync_tries_the_fallback_space_before_kmeans(monkeypatch):
    """Modules from SynC in the paper's space when it finds a count in range; else from SynC in the fallback
    principal components; k-means only after both (or after the one space when no fallback is set)."""
    import modnet.nets.modules as modules

    S = torch.nn.functional.normalize(torch.randn(60, 16, generator=torch.Generator().manual_seed(0)), dim=1)
    calls = []
    real = modules._sync_in_space

    def fake(S, k, lo, hi, seed, dims, size, algorithm, kmeans):
        calls.append((dims, kmeans))
        if dims is None:  # the first space finds no count in range
            return (real(S, k, lo, hi, seed, dims, size, algorithm, kmeans) if kmeans else (None, "none", 60))
        return torch.arange(60) % 3, "sync", 0

    monkeypatch.setattr(modules, "_sync_in_space", fake)
    labels, method, _ = modules.sync_modules(S, None, 2, 4, sync_dims=None, sync_dims_fallback=3)
    assert calls == [(None, False), (3, True)] and method == "sync" and torch.equal(labels, torch.arange(60) % 3)
    calls.clear()
    labels, method, _ = modules.sync_modules(S, None, 2, 4, sync_dims=None, sync_dims_fallback=None)
    assert calls == [(None, True)]
    monkeypatch.setattr(modules, "_sync_in_space", real)
    # the real search: a count in range, or k-means in range
    labels, method, _ = modules.sync_modules(S, None, 2, 4, sync_dims=None, sync_dims_fallback=3)
    assert method in ("sync", "kmeans") and 2 <= int(labels.max()) + 1 <= 4


def test_layers_clustered_together_equal_each_layer_clustered_alone():
    """cluster_layers fits equal-width layers in one batched loop: each layer's modules and semantic vectors are
    those cluster_units finds for it alone (planted modules, three layers, two of one width)."""
    from modnet.nets.modules import cluster_layers

    g = torch.Generator().manual_seed(0)
    profiles = []
    for n, m in [(30, 3), (30, 2), (24, 4)]:
        latent = torch.randn(m, 120, generator=g)
        profiles.append(latent[torch.arange(n) % m] + 0.2 * torch.randn(n, 120, generator=g))
    together = cluster_layers(profiles, steps=60, min_modules=2, max_modules=8)
    for p, (labels, S) in zip(profiles, together):
        alone_labels, alone_S = cluster_units(p, steps=60, min_modules=2, max_modules=8)
        assert torch.equal(labels, alone_labels)
        assert torch.allclose(S, alone_S, atol=1e-6)


@pytest.mark.parametrize("estimator", ["st", "gumbel"])
def test_gate_switches_exactly_k_modules_and_gradients_reach_keys_and_query(estimator):
    assignment = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 3])
    gate = ModuleGate(assignment, query_dim=5, key_dim=4, k=2, estimator=estimator).train()
    x = torch.randn(16, 5)
    torch.manual_seed(1)  # the same Gumbel noise for both calls below
    mg = gate.layer_module_gates(x)
    hard = mg.detach()
    assert hard.shape == (16, 4)
    assert torch.all((hard == 0) | (hard == 1))
    assert torch.all(hard.sum(1) == 2)  # exactly k modules on per input
    torch.manual_seed(1)
    (unit,) = gate(x)
    assert torch.equal(unit.detach(), hard[:, assignment])  # a unit follows its module
    (unit * torch.randn_like(unit)).sum().backward()
    assert gate.keys.grad is not None and gate.keys.grad.abs().sum() > 0
    assert gate.query.weight.grad is not None and gate.query.weight.grad.abs().sum() > 0


def test_fused_layers_equal_one_gate_per_layer():
    """All layers in one gate (padded keys, one top-k) = each layer's gate on its own, values and gradients;
    a layer with fewer modules than k keeps them all on."""
    torch.manual_seed(0)
    assignments = [torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]), torch.tensor([0, 0, 1, 1, 1]),
                   torch.tensor([0, 1, 2, 0, 1, 2])]
    fused = ModuleGate(assignments, query_dim=6, key_dim=3, k=2)
    x = torch.randn(20, 6)
    units = fused(x)
    weights = [torch.randn_like(u) for u in units]
    sum((u * w).sum() for u, w in zip(units, weights)).backward()
    for i, a in enumerate(assignments):
        alone = ModuleGate(a, query_dim=6, key_dim=3, k=2)
        m = int(a.max()) + 1
        with torch.no_grad():  # the same parameters: layer i's key rows and query row block
            alone.keys.copy_(fused.keys[i:i + 1, :m])
            alone.query.weight.copy_(fused.query.weight[3 * i:3 * i + 3])
            alone.query.bias.copy_(fused.query.bias[3 * i:3 * i + 3])
        (u,) = alone(x)
        assert torch.equal(u.detach(), units[i].detach())
        assert torch.all(alone.layer_module_gates(x).detach().sum(1) == min(2, m))
        (u * weights[i]).sum().backward()
        assert torch.allclose(alone.keys.grad[0], fused.keys.grad[i, :m], atol=1e-6)
        assert torch.allclose(alone.query.weight.grad, fused.query.weight.grad[3 * i:3 * i + 3], atol=1e-6)
    assert torch.all(fused.keys.grad[1, 2:] == 0)  # padded keys (layer 1 has 2 modules) never learn


@pytest.mark.parametrize("estimator", ["st", "gumbel"])
def test_fused_gate_function_equals_the_autograd_reference(estimator):
    """forward() (one autograd function, backward written out) = module_gates() expanded to units times the
    layers' masks (plain autograd): values and gradients for keys, query, input and masks; uneven k per layer
    included."""
    torch.manual_seed(0)
    assignments = [torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]), torch.tensor([0, 0, 1, 1, 1])]
    gate = ModuleGate(assignments, query_dim=6, key_dim=3, k=3, tau=0.7, estimator=estimator).train()
    x = torch.randn(20, 6, requires_grad=True)
    masks = [torch.rand(8, requires_grad=True), torch.rand(5, requires_grad=True)]
    w = torch.randn(20, 13)
    leaves = (gate.keys, gate.query.weight, gate.query.bias, x, *masks)
    torch.manual_seed(5)
    fused = torch.cat(gate(x, masks), dim=1)
    (fused * w).sum().backward()
    got = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    torch.manual_seed(5)
    ref = (gate.module_gates(x).flatten(1) @ gate.to_units) * torch.cat(masks)
    (ref * w).sum().backward()
    assert torch.equal(fused.detach(), ref.detach())
    for g, t in zip(got, leaves):
        assert torch.allclose(g, t.grad, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="one vector per layer"):
        gate(x, [torch.rand(20, 8), masks[1]])  # per-input masks belong in the gate's output, not its input


@pytest.mark.parametrize("given", ["rows", "tables"])
@pytest.mark.parametrize("widths", [(8, 5), (6, 6)])
@pytest.mark.parametrize("s", [1 / 400, 3.0, 400.0])
def test_gate_given_training_masks_equals_hat_then_gate_reference(widths, s, given):
    """Gates given a task's HAT ``TrainingMasks`` (masks computed inside the gate's autograd function) =
    the reference chain: sigmoid masks and capacity regulariser through autograd, module gates expanded to
    units (``module_gates``), then HAT's compensation pass on the embedding gradient. Values, the
    regulariser and all gradients, with layers of unequal (padded) and equal widths; the masks given as the
    task's embedding rows or as the whole tables and the task."""
    from modnet.nets.hat import TrainingMasks, capacity_regulariser, compensate_embedding_grad, free_capacity

    torch.manual_seed(0)
    assignments = [torch.arange(n) % m for n, m in zip(widths, (4, 2))]
    gate = ModuleGate(assignments, query_dim=6, key_dim=3, k=2).train()
    embs = [torch.nn.Embedding(3, n) for n in widths]
    for emb in embs:
        emb.weight.data.mul_(2.0)
    prev = [torch.rand(n).round() for n in widths]
    x = torch.randn(20, 6)
    w = [torch.randn(20, n) for n in widths]
    c = 0.75
    rows, task = ([e.weight[1] for e in embs], None) if given == "rows" else ([e.weight for e in embs], 1)
    training = TrainingMasks(rows, s, 400.0, 50.0, c * free_capacity(prev), task=task)
    units = gate(x, training)
    (sum((u * wi).sum() for u, wi in zip(units, w)) + training.capacity).backward()
    leaves = [gate.keys, gate.query.weight, gate.query.bias, *[e.weight for e in embs]]
    got = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    masks = [torch.sigmoid(s * e.weight[1]) for e in embs]
    ref = (gate.module_gates(x).flatten(1) @ gate.to_units) * torch.cat(masks)
    reg = c * capacity_regulariser(masks, prev)
    ((ref * torch.cat(w, 1)).sum() + reg).backward()
    for e in embs:
        compensate_embedding_grad(e, s, 400.0, thres_cosh=50.0)
    assert torch.equal(torch.cat(units, 1).detach(), ref.detach())
    assert float(training.capacity) == pytest.approx(float(reg), rel=1e-5)
    for g, t in zip(got, leaves):
        assert torch.allclose(g, t.grad, rtol=1e-4, atol=1e-6)
    assert all(torch.all(e.weight.grad[[0, 2]] == 0) for e in embs)  # only the task's row learns


@pytest.mark.parametrize("input_grad", [False, True])
def test_a_gate_run_without_training_gives_the_same_units_and_mask_gradients_and_none_for_itself(input_grad):
    """``train=False`` (the settle epochs): the same unit gates, the same compensated embedding gradients and
    (where the input takes one) the same input gradient as a training gate's; its own parameters get none."""
    from modnet.nets.hat import TrainingMasks, free_capacity

    torch.manual_seed(1)
    widths = (8, 5)
    gate = ModuleGate([torch.arange(n) % m for n, m in zip(widths, (4, 2))], query_dim=6, key_dim=3, k=2).train()
    embs = [torch.nn.Embedding(2, n) for n in widths]
    prev = [torch.rand(n).round() for n in widths]
    x = torch.randn(20, 6, requires_grad=input_grad)
    w = [torch.randn(20, n) for n in widths]
    runs = []
    for train in (True, False):
        training = TrainingMasks([e.weight for e in embs], 3.0, 400.0, 50.0, 0.75 * free_capacity(prev), task=1)
        units = gate(x, training, train=train)
        (sum((u * wi).sum() for u, wi in zip(units, w)) + training.capacity).backward()
        params = [gate.keys.grad, gate.query.weight.grad, gate.query.bias.grad]
        runs.append(([u.detach() for u in units], [e.weight.grad.clone() for e in embs],
                     x.grad.clone() if input_grad else None, params))
        for t in [gate.keys, gate.query.weight, gate.query.bias, *[e.weight for e in embs]]:
            t.grad = None
        if input_grad:
            x.grad = None
    (u1, e1, x1, p1), (u0, e0, x0, p0) = runs
    assert all(torch.equal(a, b) for a, b in zip(u1, u0)) and all(torch.equal(a, b) for a, b in zip(e1, e0))
    assert all(g is not None and bool(g.abs().sum() > 0) for g in p1) and all(g is None for g in p0)
    assert (x0 is None and x1 is None) or torch.equal(x1, x0)


def test_gate_loaded_from_a_state_dict_gates_like_the_saved_one():
    """The padded per-layer buffers the forward uses are derived, not saved: after load_state_dict a gate built
    on other assignments answers exactly as the gate that was saved."""
    torch.manual_seed(0)
    saved = ModuleGate([torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([0, 1, 1, 0])], query_dim=5, k=1)
    other = ModuleGate([torch.tensor([2, 1, 0, 2, 1, 0]), torch.tensor([1, 0, 0, 1])], query_dim=5, k=1)
    x = torch.randn(9, 5)
    other.load_state_dict(saved.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(other(x), saved(x)))


def test_gates_compose_with_hat_masks_multiplicatively():
    net = HATCNN((1, 8, 8), [[0, 1], [2, 3]], channels=(4,), hidden=6)
    net.gate = ModularGating(query_dim=64, k=1, cluster=dict(steps=20, min_modules=2, max_modules=2))
    x = torch.rand(12, 1, 8, 8)
    net.gate.add_task(net, 0, x)
    masks = net.masks(0, 400.0)
    gated = net.gate(x, 0, masks)
    gate = net.gate.task_gate(0)
    for i, (m, g) in enumerate(zip(masks, gated)):
        assert g.shape == (12, m.numel())
        unit = gate.layer_module_gates(x.flatten(1), i).detach()[:, gate.assignment(i)]
        assert torch.equal(g, m * unit)
    assert net.task_logits(x, 0).shape == (12, 2)


def test_task_keys_match_linear_discriminant_analysis_and_ignore_batching():
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    rng = np.random.default_rng(0)
    means = rng.normal(scale=2.0, size=(4, 6))
    y = rng.integers(0, 4, size=800)
    x = means[y] + rng.normal(size=(800, 6)) @ np.diag([1, 0.5, 2, 1, 1, 0.3])
    xt, yt = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    one, streamed = TaskKeys(4, 6, shrinkage=0.0), TaskKeys(4, 6, shrinkage=0.0)
    one.update(xt, yt)
    for chunk in range(0, 800, 97):  # statistics, not samples: any batching gives the same keys
        streamed.update(xt[chunk:chunk + 97], yt[chunk:chunk + 97])
    K1, b1 = one.keys()
    K2, b2 = streamed.keys()
    assert torch.allclose(K1, K2, atol=1e-8) and torch.allclose(b1, b2, atol=1e-8)
    lda = LinearDiscriminantAnalysis(solver="lsqr", priors=np.full(4, 0.25)).fit(x, y)
    ours = one.class_scores(xt).argmax(1).numpy()
    assert (ours == lda.predict(x)).mean() >= 0.995
    post = one.task_log_posterior(xt, [torch.tensor([0, 1]), torch.tensor([2, 3])])
    assert torch.allclose(post.exp().sum(1), torch.ones(800, dtype=post.dtype), atol=1e-5)
    assert ((post.argmax(1) == yt // 2).float().mean()) > 0.9


def test_task_incremental_with_modules_and_gates_forgets_nothing(tmp_path):
    assert main(["cl", "strategies=[modnet]", "model.modules=sync", "model.gate=topk", f"output_dir={tmp_path}",
                 "progress=false"]) == 0
    m = json.loads((tmp_path / "results.json").read_text())["strategies"]["modnet"]
    assert m["forgetting"] <= 0.01
    assert m["average_accuracy"] >= 0.97
    # module maps and gate usage are drawn for every task
    pictures = tmp_path / m["modules"]["folder"]
    assert (pictures / "gate_usage.png").stat().st_size > 1000
    assert len(list(pictures.glob("module_map_task*.png"))) == 5
    # the first task's modules: SynC's count within [min_modules, max_modules]; later tasks keep them
    # (the units earlier tasks claimed) and add SynC modules of the free units
    assert all(2 <= len(sizes) <= 4 for sizes in m["modules"]["sizes"]["task0"])
    sharing = m["network"]["module_sharing"]
    assert [layer["module_method"] for layer in sharing] == ["sync", "sync"]  # no k-means fallback
    assert sum(layer["shared"] for layer in sharing) >= 1  # a module used by two or more tasks
    # gate usage by persistent module id (its columns were each gate's own order: another module in each task):
    # each task's share of inputs per module, read from its gate, lands in the column of that module's id
    from omegaconf import OmegaConf

    from modnet.explain.module_plots import gate_usage
    from modnet.nets.record import load_network

    net = load_network(tmp_path / "checkpoints" / "modnet_seed0_final.pt", OmegaConf.load(tmp_path / "config.yaml"))
    xs = [torch.rand(16, 64, generator=torch.Generator().manual_seed(t)) for t in range(5)]
    # planted: task 4's layer-0 modules renumbered 2 x their ids (a gate holding some modules and not others: its
    # own order then names other modules, as in the default run's task 4, ids [0, 2, 3, 4, 5])
    planted = net.gate.task_gate(4)
    planted.module_ids_0 = planted.module_ids(0) * 2
    usage = gate_usage(net, xs)
    for t in range(5):
        gate = net.gate.task_gate(t)
        for i in range(gate.n_layers):
            ids = gate.module_ids(i).tolist()
            with torch.no_grad():
                share = gate.layer_module_gates(xs[t], i).mean(0).numpy()
            np.testing.assert_allclose(usage[i][t, ids], share, rtol=1e-6)
            assert np.isnan(np.delete(usage[i][t], ids)).all()
            if (t, i) != (4, 0):  # the same ids as results.json's module_sharing (a task's used: some of its gate's)
                assert {int(g) for g, tasks in sharing[i]["used_by"].items() if t in tasks} <= set(ids)


def test_class_incremental_modnet_beats_naive_lwf_and_replay(tmp_path):
    """Issue target: without storing samples, at least replay with 200 stored samples."""
    assert main(["cl", "scenario=class", "strategies=[modnet,naive,lwf,replay]", "replay.mem_size=200",
                 f"output_dir={tmp_path}", "progress=false"]) == 0
    s = json.loads((tmp_path / "results.json").read_text())["strategies"]
    acc = {k: v["average_accuracy"] for k, v in s.items()}
    assert acc["modnet"] >= acc["naive"] + 0.3
    assert acc["modnet"] >= acc["lwf"] + 0.3
    assert acc["modnet"] >= acc["replay"]


def test_gate_config_needs_modules(tmp_path, capsys):
    assert main(["cl", "strategies=[modnet]", "model.modules=none", "model.gate=topk",
                 f"output_dir={tmp_path}"]) == 2
    assert "model.modules=sync" in capsys.readouterr().err


def test_task_keys_have_a_row_per_task_and_class_so_shared_class_ids_stay_apart():
    net = HATCNN((1, 8, 8), [[0, 1], [0, 1], [3, 5]], channels=(4,), hidden=6, class_incremental=True)
    assert net.n_key_slots == 6
    assert net.key_slots(1).tolist() == [2, 3]
    assert net.slot_of(2, torch.tensor([5, 3, 5])).tolist() == [5, 4, 5]
    with pytest.raises(ValueError, match="not classes of task"):
        net.slot_of(0, torch.tensor([3]))


def test_domain_incremental_permuted_digits_task_is_found_without_label(tmp_path):
    """Permutations share the class ids; the (task, class) keys still tell them apart."""
    assert main(["cl", "scenario=class", "benchmark.variant=permuted", "benchmark.n_experiences=3",
                 "strategies=[modnet,naive]", f"output_dir={tmp_path}", "progress=false"]) == 0
    s = json.loads((tmp_path / "results.json").read_text())["strategies"]
    assert s["modnet"]["average_accuracy"] >= s["naive"]["average_accuracy"] + 0.1


def _planted_net(hidden=48, groups=3, seed=0):
    """One masked layer whose units are noisy copies of ``groups`` planted directions (unit i: group i // 16):
    units of a group respond alike, so SynC must find the groups as modules."""
    from modnet.nets.models import HATMLP

    g = torch.Generator().manual_seed(seed)
    net = HATMLP(8, [[0, 1], [2, 3]], hidden=hidden, n_layers=1)
    planted = torch.arange(hidden) // (hidden // groups)
    directions = torch.randn(groups, 8, generator=g)
    with torch.no_grad():
        net.masked[0].weight.copy_(directions[planted] + 0.05 * torch.randn(hidden, 8, generator=g))
        net.masked[0].bias.zero_()
    net.gate = ModularGating(query_dim=8, k=3, cluster=dict(steps=100, min_modules=2, max_modules=4))
    return net, planted, torch.randn(256, 8, generator=g)


def test_modules_persist_across_tasks_and_a_module_is_shared_by_two_tasks():
    """Planted groups: SynC recovers them for task 0; once task 0 has claimed group 0's units, task 1's gate
    keeps that module (same global id, same key, frozen) and SynC makes new modules of the free units only;
    both tasks keep group 0's units and switch its module on, so it is shared; the gates round-trip through a
    state dict."""
    from modnet.nets.record import describe_network, module_sharing
    from strategies.plugins.modular import ModulesPlugin

    net, planted, x = _planted_net()
    net.gate.add_task(net, 0, x)
    g0 = net.gate.task_gate(0)
    assert adjusted_rand_score(planted.numpy(), g0.assignment(0).numpy()) == 1.0
    assert g0.module_methods(0).tolist() == [0, 0, 0]  # all made by SynC
    group0 = planted == 0
    with torch.no_grad():
        net.mask_pre_0.copy_(group0.float())  # task 0 claimed group 0's units
        net.masked[0].task_embedding.weight[:, :] = -6.0
        net.masked[0].task_embedding.weight[:, group0] = 6.0  # both tasks keep group 0's units
    net.gate.add_task(net, 1, x)
    g1 = net.gate.task_gate(1)
    m0 = int(g0.assignment(0)[group0][0])
    assert g1.n_inherited == [1]
    assert torch.equal(g1.assignment(0)[group0], torch.zeros(16, dtype=torch.long))  # the inherited module
    assert int(g1.module_ids(0)[0]) == int(g0.module_ids(0)[m0])
    assert torch.equal(g1.keys[0, 0], g0.keys[0, m0]) and g1.key_frozen[0, 0].item() == 1
    free = ~group0
    assert adjusted_rand_score(planted[free].numpy(), g1.assignment(0)[free].numpy()) == 1.0
    assert set(g1.module_ids(0)[1:].tolist()).isdisjoint(g0.module_ids(0).tolist())  # new modules, new ids
    # the inherited key gets no update while task 1 trains
    plugin, strategy = ModulesPlugin(), types.SimpleNamespace(model=net, experience=types.SimpleNamespace(
        current_experience=1))
    plugin.before_training_exp(strategy)
    net.train()
    sum(o.sum() for o in net.gate(x, 1, net.masks(1))).backward()
    from strategies.update import update_step

    update_step(torch.optim.SGD(net.parameters(), lr=0.0), plugin.update_terms(strategy))
    assert torch.all(g1.keys.grad[0, 0] == 0) and g1.keys.grad[0, 1:].abs().sum() > 0
    net.eval()
    for t in (0, 1):
        net.gate.record_usage(net, t, x)
    sharing = module_sharing(net)[0]
    assert sharing["shared"] >= 1 and sharing["used_by"][str(int(g0.module_ids(0)[m0]))] == [0, 1]
    assert sharing["module_method"] == "sync"
    assert describe_network(net)["module_sharing"] == [sharing]
    # round trip: a fresh network rebuilt from the state dict gates exactly as this one
    fresh, _, _ = _planted_net()
    fresh.gate.rebuild_from_state(net.state_dict(), "gate.")
    fresh.load_state_dict(net.state_dict())
    fresh.eval()
    for t in (0, 1):
        assert all(torch.equal(a, b) for a, b in zip(fresh.gate(x, t, fresh.masks(t)), net.gate(x, t, net.masks(t))))
    assert fresh.gate.task_gate(1).n_inherited == [1]
    assert module_sharing(fresh) == module_sharing(net)


def test_a_layer_with_two_free_units_gets_one_rest_module_that_the_record_can_name():
    """A later task on a layer whose units earlier tasks have (almost) all claimed: the two free units form one
    module made by no clustering ("rest", one of MODULE_METHODS, which the gate stores as a code and the results'
    record names). The small CNN's 32-channel first layer reached this on Split-Digits images (a crash before)."""
    from modnet.nets.modules import MODULE_METHODS, cluster_layers

    g = torch.Generator().manual_seed(0)
    profiles = [torch.randn(32, 50, generator=g), torch.randn(16, 50, generator=g)]
    free = [torch.zeros(32, dtype=torch.bool), torch.ones(16, dtype=torch.bool)]
    free[0][[3, 17]] = True
    (labels0, _, method0, _), (labels1, _, method1, _) = cluster_layers(
        profiles, steps=20, min_modules=1, max_modules=8, with_method=True, select=free)
    assert method0 == "rest" and method0 in MODULE_METHODS
    assert labels0.tolist() == [0, 0]  # one module of both free units
    assert method1 in MODULE_METHODS and labels1.shape == (16,)


def test_gate_gets_no_update_in_the_settle_epochs_while_the_layers_go_on_training():
    """modules.settle_epochs=1 of 3: the task's gate (query map, keys) moves in epochs 0-1 and not at all in epoch
    2, where the masked layers and the head still train, and no gradient is computed for it there; with
    settle_epochs=0 the gate moves in epoch 2 too."""
    from avalanche.core import SupervisedPlugin
    from avalanche.training.plugins import EvaluationPlugin

    from modnet.config import compose
    from modnet.runner.runner import make_strategy
    from scenarios import build_benchmark

    class Snapshots(SupervisedPlugin):
        def __init__(self):
            super().__init__()
            self.at_epoch_start, self.computed = [], []

        def before_training_epoch(self, strategy, **kw):
            gate = strategy.model.gate.task_gate(strategy.experience.current_experience)
            self.at_epoch_start.append(({k: v.detach().clone() for k, v in gate.named_parameters()},
                                        strategy.model.masked[0].weight.detach().clone()))
            self.computed.append(set())

        def after_backward(self, strategy, **kw):  # which gate parameters the backward computed a gradient for
            gate = strategy.model.gate.task_gate(strategy.experience.current_experience)
            self.computed[-1].update(k for k, v in gate.named_parameters() if v.grad is not None)

    moved = {}
    for settle in (1, 0):
        cfg = compose("cl", ["train.epochs=3", "progress=false", f"modules.settle_epochs={settle}"])
        info = build_benchmark(cfg.benchmark, "task", 0)
        snaps = Snapshots()
        strategy = make_strategy("modnet", cfg, info, torch.device("cpu"), EvaluationPlugin(loggers=[]),
                                 plugins=[snaps])
        exp = info.benchmark.train_stream[0]
        strategy.train(exp)
        gate = strategy.model.gate.task_gate(0)
        end = {k: v.detach() for k, v in gate.named_parameters()}
        first, last = snaps.at_epoch_start[0], snaps.at_epoch_start[2]
        assert any(not torch.equal(first[0][k], last[0][k]) for k in end)  # the gate trained before
        moved[settle] = [k for k in end if not torch.equal(last[0][k], end[k])]
        # eager: the settle epoch's backward computes nothing for the gate (its parameters enter detached)
        assert "query.weight" in snaps.computed[0] and (snaps.computed[2] == set()) == (settle == 1)
        assert not torch.equal(last[1], strategy.model.masked[0].weight)  # the layer trained in the last epoch
    assert moved[1] == [] and "query.weight" in moved[0]


def test_an_early_stop_waits_for_the_settle_epoch_and_the_gate_stays_in_it():
    """A plugin asks Avalanche to stop after epoch 1 of 10 (as train.lr_patience's schedule does): with
    settle_epochs=1 one more epoch runs, in which the gate gets no update and the layers still train; with 0
    the experience ends after epoch 1."""
    from avalanche.core import SupervisedPlugin
    from avalanche.training.plugins import EvaluationPlugin

    from modnet.config import compose
    from modnet.runner.runner import make_strategy
    from scenarios import build_benchmark

    class StopAfterEpochOne(SupervisedPlugin):
        def __init__(self):
            super().__init__()
            self.starts = []

        def before_training_epoch(self, strategy, **kw):
            gate = strategy.model.gate.task_gate(0)
            self.starts.append(({k: v.detach().clone() for k, v in gate.named_parameters()},
                                strategy.model.masked[0].weight.detach().clone()))

        def after_training_epoch(self, strategy, **kw):
            if len(self.starts) == 2:  # epoch 1 has ended
                strategy.stop_training()

    for settle, epochs in ((1, 3), (0, 2)):
        cfg = compose("cl", ["train.epochs=10", "progress=false", f"modules.settle_epochs={settle}"])
        info = build_benchmark(cfg.benchmark, "task", 0)
        stopper = StopAfterEpochOne()
        strategy = make_strategy("modnet", cfg, info, torch.device("cpu"), EvaluationPlugin(loggers=[]),
                                 plugins=[stopper])
        strategy.train(info.benchmark.train_stream[0])
        assert len(stopper.starts) == epochs + 1  # the epochs run, and the start the stop ended
        gate_start, layer_start = stopper.starts[-2]  # the last epoch that ran
        gate_end, layer_end = stopper.starts[-1]
        assert not torch.equal(layer_start, layer_end)
        assert all(torch.equal(gate_start[k], gate_end[k]) for k in gate_end) == (settle == 1)


def test_settle_epochs_refused_below_zero():
    from strategies.plugins.modular import ModulesPlugin

    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="settle_epochs must be a non-negative integer"):
            ModulesPlugin(bad)
    assert main(["cl", "modules.settle_epochs=-2"]) == 2
