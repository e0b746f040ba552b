"""NIWT (modnet/niwt.py), GZSL metrics and baselines (modnet/gzsl.py) and the gzsl job (modnet/gzsl_job.py).

References independent of the code: analytic gradients of small networks, a planted linear knowledge ->
importance structure that must be recovered, hand-computed GZSL figures, ESZSL's normal equations.
"""
from __future__ import annotations

import copy
import csv
import json
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from modnet.methods.gzsl import (ALE, ESZSL, ESZSLPath, gzsl_evaluate, harmonic_mean, per_class_accuracy,
                                 predict_scores, select_calibration)
from modnet.methods.niwt import (KnowledgeToImportance, NIWT, class_importance, fit_unseen_weights, match_seen_scale,
                                 sample_importance)


# ----------------------------------------------------------------------------------------------------------
# Step 1: importance
# ----------------------------------------------------------------------------------------------------------
def test_importance_at_the_classifier_input_is_the_class_weight():
    """Documented property: just before a linear classifier, d o_c / d f = w_c for every sample."""
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    x, y = torch.randn(40, 5), torch.arange(40) % 3
    imp = class_importance(model, model[1], x, y, n_classes=3)
    assert torch.allclose(imp, model[2].weight.detach(), atol=1e-6)


def test_conv_importance_is_averaged_over_space():
    """Conv map -> global average pool -> linear: the gradient is w_c / (H W) at every position."""
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3))
    x, y = torch.randn(12, 2, 5, 6), torch.arange(12) % 3
    imp = class_importance(model, model[1], x, y, n_classes=3, batch_size=5)
    assert imp.shape == (3, 4)
    assert torch.allclose(imp, model[4].weight.detach() / 30, atol=1e-7)


def test_importance_one_block_deeper_matches_the_hand_derived_gradient():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 5), nn.ReLU(), nn.Linear(5, 4))
    model.train()
    x, y = torch.randn(50, 6), torch.randint(0, 4, (50,))
    imp = class_importance(model, model[1], x, y, n_classes=4, batch_size=7)
    # d o_c / d h1 = W2^T (w_c * 1[z2 > 0]), averaged over the samples of each class
    with torch.no_grad():
        z2 = model[2](model[1](model[0](x)))
        per_sample = (model[4].weight[y] * (z2 > 0)) @ model[2].weight
        expected = torch.stack([per_sample[y == c].mean(0) for c in range(4)])
    assert torch.allclose(imp, expected, atol=1e-6)
    assert model.training                                          # the caller's mode is restored
    single = torch.stack([sample_importance(model, model[1], x[i:i + 1], y[i:i + 1])[0] for i in range(3)])
    assert torch.allclose(single, per_sample[:3], atol=1e-6)       # batching does not mix samples


def test_importance_errors():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="was not called"):
        class_importance(model, nn.ReLU(), torch.randn(4, 3), torch.zeros(4, dtype=torch.long), 2)
    with pytest.raises(ValueError, match=r"output columns in \[0, 2\)"):
        class_importance(model, model[1], torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), 2)
    with pytest.raises(ValueError, match="4 samples but y has 3"):
        class_importance(model, model[1], torch.randn(4, 3), torch.zeros(3, dtype=torch.long), 2)


# ----------------------------------------------------------------------------------------------------------
# Step 2: knowledge -> importance and back
# ----------------------------------------------------------------------------------------------------------
def test_knowledge_map_recovers_a_planted_linear_map_and_inverts_it():
    g = torch.Generator().manual_seed(0)
    n_classes, n_att, n_units = 30, 5, 40
    knowledge = torch.rand(n_classes, n_att, generator=g)
    true_map, offset = torch.randn(n_att, n_units, generator=g), torch.randn(n_units, generator=g)
    importance = knowledge @ true_map + offset
    seen, held_out = slice(0, 24), slice(24, 30)
    kmap = KnowledgeToImportance(n_att, n_units).fit(knowledge[seen], importance[seen], epochs=1500, lr=0.02)
    with torch.no_grad():
        predicted = kmap(knowledge[held_out])
    # the direction of the importance of classes never used in training is predicted
    assert F.cosine_similarity(predicted, importance[held_out], dim=1).min() > 0.99
    assert kmap.matrix.shape == (n_att, n_units)
    # inverse map: the knowledge of a held-out class is recovered from its importance (rank order)
    back = kmap.importance_to_knowledge(importance[held_out])
    assert back.shape == (6, n_att)
    for b, k in zip(back, knowledge[held_out]):
        assert torch.corrcoef(torch.stack([b, k]))[0, 1] > 0.95
    assert kmap.importance_to_knowledge(importance[24]).shape == (n_att,)
    pinv = KnowledgeToImportance(n_att, n_units, inverse="pinv").fit(knowledge[seen], importance[seen], epochs=1500,
                                                                     lr=0.02)
    assert torch.corrcoef(torch.stack([pinv.importance_to_knowledge(pinv(knowledge[25])), knowledge[25]]))[0, 1] > 0.99


# ----------------------------------------------------------------------------------------------------------
# Step 3 and the whole method on a planted problem
# ----------------------------------------------------------------------------------------------------------
def _planted_problem(n_seen=18, n_unseen=6, n_att=6, dim=20, per_class=60, seed=0):
    """Gaussian classes whose means are a fixed linear image of binary attribute codes."""
    g = torch.Generator().manual_seed(seed)
    codes = []
    while len(codes) < n_seen + n_unseen:
        k = (torch.rand(n_att, generator=g) < 0.5).float()
        if k.sum() >= 2 and not any(torch.equal(k, c) for c in codes):
            codes.append(k)
    knowledge = torch.stack(codes)
    mixing = torch.randn(dim, n_att, generator=g)
    y = torch.arange(n_seen + n_unseen).repeat_interleave(per_class)
    x = knowledge[y] @ mixing.T + 0.5 * torch.randn(len(y), dim, generator=g)
    first = torch.arange(len(y)) % per_class < int(0.75 * per_class)
    train, test_seen, test_unseen = (y < n_seen) & first, (y < n_seen) & ~first, y >= n_seen
    return x, y, F.normalize(knowledge, dim=1), list(range(n_seen)), list(range(n_seen, n_seen + n_unseen)), \
        train, test_seen, test_unseen


def _trained_mlp(x, y, n_out, epochs=30):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(x.shape[1], 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, n_out))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(epochs):
        order = torch.randperm(len(y))
        for i in range(0, len(y), 64):
            idx = order[i:i + 64]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def planted():
    x, y, knowledge, seen, unseen, train, test_seen, test_unseen = _planted_problem()
    model = _trained_mlp(x[train], y[train], len(seen))
    return x, y, knowledge, seen, unseen, train, test_seen, test_unseen, model


def test_routing_map_recovers_planted_module_routing_of_unseen_classes():
    """Routing linear in the knowledge (inside [0, 1], so the clip is idle): fitted on 8 classes, the map
    predicts the routing of 2 held-out classes; a unit no class switches on is predicted off for every class."""
    from modnet.methods.niwt import RoutingMap

    g = torch.Generator().manual_seed(0)
    knowledge = torch.rand(10, 4, generator=g)
    coef = torch.rand(4, 30, generator=g) * 0.2
    routing = 0.1 + knowledge @ coef                       # in [0.1, 0.9]
    routing[:, 5] = 0.0                                    # a unit of a module no class switches on
    fitted = RoutingMap(ridge=1e-8).fit(knowledge[:8], routing[:8])
    assert torch.allclose(fitted(knowledge[8:]), routing[8:], atol=1e-4)
    assert torch.all(fitted(torch.rand(5, 4, generator=g))[:, 5] == 0)
    shrunk = RoutingMap(ridge=10.0).fit(knowledge[:8], routing[:8])(knowledge[8:])
    assert (shrunk - routing[:8].mean(0)).abs().mean() < (routing[8:] - routing[:8].mean(0)).abs().mean()
    with pytest.raises(ValueError, match="one routing row per class"):
        RoutingMap().fit(knowledge[:8], routing[:7])


def test_unseen_weights_recover_a_class_weight_from_its_importance(planted):
    """Step 3 inverts step 1: the importance a known class weight induces on the seen images gives it back."""
    x, y, knowledge, seen, unseen, train, *_, model = planted
    target_classes, n = [3, 11], int(train.sum())
    # the importance w_c induces on ALL training images (the images step 3 measures new weights on)
    target = torch.stack([class_importance(model, model[1], x[train], torch.full((n,), c), len(seen))[c]
                          for c in target_classes])
    true_w = model[4].weight.detach()[target_classes]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = fit_unseen_weights(model, model[1], model[4], x[train], target, lr=1e-2, lam=0.0, patience=100,
                               max_iterations=1500, match="batch")
    assert F.cosine_similarity(batch.weight, true_w, dim=1).min() > 0.9
    assert batch.n_iterations < 1500 and batch.losses[-1] < batch.losses[0]
    # the official per-image loss aims at a slightly different optimum (per-image directions vary)
    per_image = fit_unseen_weights(model, model[1], model[4], x[train], target, lr=1e-2, lam=0.0, patience=100,
                                   max_iterations=1500, match="sample")
    assert F.cosine_similarity(per_image.weight, true_w, dim=1).min() > 0.8
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())   # network untouched
    # lambda pulls the new weights toward the seen weights' mean
    pulled = fit_unseen_weights(model, model[1], model[4], x[train], target, lr=1e-2, lam=10.0, patience=100,
                                max_iterations=1500)
    mean_w = model[4].weight.detach().mean(0)
    assert (pulled.weight - mean_w).norm() < (batch.weight - mean_w).norm()


def test_niwt_gives_far_above_chance_unseen_accuracy_on_a_planted_problem(planted):
    x, y, knowledge, seen, unseen, train, test_seen, test_unseen, model = planted
    niwt = NIWT(model, model[1], model[4], lr=1e-2, lam=1e-3, max_iterations=1000, seed=0)
    gzsl = niwt.fit(x[train], y[train], knowledge, seen, unseen).gzsl_model()
    scores_s, scores_u = predict_scores(gzsl, x[test_seen]), predict_scores(gzsl, x[test_unseen])
    result = gzsl_evaluate(scores_s, y[test_seen], scores_u, y[test_unseen], seen, unseen)
    chance = 1 / len(unseen)
    assert result.zsl_accuracy > 4 * chance                      # 6 unseen classes: chance 0.17
    assert result.U > 3 * chance and result.S > 0.3
    # seen columns are the network's own outputs; unseen ones come from f(x) . w_u + b_u
    with torch.no_grad():
        assert torch.allclose(scores_s[:, seen], model(x[test_seen]), atol=1e-5)
    assert niwt.seen_importance.shape == (18, 64) and niwt.unseen_importance.shape == (6, 64)
    # the predicted importance of unseen classes is close to what their fitted weights induce
    induced = class_importance(gzsl, model[1], x[train], torch.full((int(train.sum()),), unseen[0]), 24)[unseen[0]]
    assert F.cosine_similarity(induced, niwt.unseen_importance[0], dim=0) > 0.8
    # text explanation path: importance -> attributes of the unseen class
    assert niwt.importance_to_knowledge(niwt.unseen_importance[0]).shape == (knowledge.shape[1],)


def _negatives_statistics(scores, labels, rows):
    """Mean over rows c of the mean and of the std of column c's scores over the images not of class rows[c]."""
    means, stds = [], []
    for c, cls in enumerate(rows):
        s = scores[labels != cls, c]
        means.append(float(s.mean()))
        stds.append(float(s.std(unbiased=False)))
    return sum(means) / len(means), sum(stds) / len(stds)


def test_unseen_rows_are_put_on_the_seen_scale_whatever_scale_they_were_fitted_at(planted):
    """Step 3's cosine loss cannot see the length of w_u nor b_u: whatever the fit left, ``match_seen_scale``
    must give the same rows, with the documented statistics of the seen rows (computed here class by class)."""
    x, y, knowledge, seen, unseen, train, test_seen, test_unseen, model = planted
    head = model[4]
    with torch.no_grad():
        features = model[:4](x[train])
    w_s, b_s = head.weight.detach(), head.bias.detach()
    own = y[train][:, None] == torch.tensor(seen)[None]
    g = torch.Generator().manual_seed(3)
    direction = torch.randn(len(unseen), w_s.shape[1], generator=g)
    fitted = match_seen_scale(direction, torch.zeros(len(unseen)), w_s, b_s, features, own, "negatives")
    # negatives: on the seen training images (none of an unseen class) each unseen row scores with the mean and
    # std of a seen row over the images of other classes
    mean, std = _negatives_statistics(features @ w_s.T + b_s, y[train], seen)
    unseen_scores = features @ fitted[0].T + fitted[1]
    assert torch.allclose(unseen_scores.mean(0), torch.full((len(unseen),), mean), atol=1e-4)
    assert torch.allclose(unseen_scores.std(0, unbiased=False), torch.full((len(unseen),), std), atol=1e-4)
    assert torch.allclose(F.cosine_similarity(fitted[0], direction, dim=1), torch.ones(len(unseen)), atol=1e-6)
    # invariance: another length and another bias of the same directions give the same rows
    other = match_seen_scale(direction * torch.rand(len(unseen), 1, generator=g) * 50, torch.randn(len(unseen)),
                             w_s, b_s, features, own, "negatives")
    assert torch.allclose(other[0], fitted[0], atol=1e-4) and torch.allclose(other[1], fitted[1], atol=1e-4)
    # the match holds on images it never saw: test-seen scores of unseen rows follow the seen rows' negatives
    with torch.no_grad():
        held_out = model[:4](x[test_seen])
    mean_t, std_t = _negatives_statistics(held_out @ w_s.T + b_s, y[test_seen], seen)
    scores_t = held_out @ fitted[0].T + fitted[1]
    assert abs(float(scores_t.mean()) - mean_t) < 0.1 * std_t
    assert abs(float(scores_t.std(0, unbiased=False).mean()) - std_t) < 0.1 * std_t
    # norm: each row as long as a seen row on average, direction and bias kept; none: untouched
    bias = torch.randn(len(unseen), generator=g)
    w_n, b_n = match_seen_scale(direction, bias, w_s, b_s, features, own, "norm")
    assert torch.allclose(w_n.norm(dim=1), w_s.norm(dim=1).mean().expand(len(unseen)), atol=1e-5)
    assert torch.allclose(F.normalize(w_n, dim=1), F.normalize(direction, dim=1), atol=1e-6) and torch.equal(b_n, bias)
    assert match_seen_scale(direction, bias, w_s, b_s, features, own, "none") == (direction, bias)
    with pytest.raises(ValueError, match="scale must be one of none, norm, negatives"):
        match_seen_scale(direction, bias, w_s, b_s, features, own, "softmax")


def test_seen_budget_scale_sends_the_stated_share_of_seen_images_to_unseen_rows_and_no_more(planted):
    """scale=seen_budget: the rows of ``negatives`` moved by one shared shift, the largest after which at most
    ``seen_budget`` of the seen training images score highest on an unseen row (counted here by argmax over all
    rows); a hair more shift sends one more image over, and budget 0 sends none."""
    x, y, knowledge, seen, unseen, train, *_, model = planted
    head = model[4]
    with torch.no_grad():
        features = model[:4](x[train])
    w_s, b_s = head.weight.detach(), head.bias.detach()
    own = y[train][:, None] == torch.tensor(seen)[None]
    direction = torch.randn(len(unseen), w_s.shape[1], generator=torch.Generator().manual_seed(5))
    w_neg, b_neg = match_seen_scale(direction, torch.zeros(len(unseen)), w_s, b_s, features, own, "negatives")
    n = features.shape[0]

    def sent_to_unseen(w, b):
        scores = torch.cat([features @ w_s.T + b_s, features @ w.T + b], 1)
        return int((scores.argmax(1) >= len(seen)).sum())

    for budget in (0.0, 0.1, 0.3):
        w, b = match_seen_scale(direction, torch.zeros(len(unseen)), w_s, b_s, features, own, "seen_budget",
                                seen_budget=budget)
        assert torch.equal(w, w_neg)
        shift = b - b_neg
        assert torch.allclose(shift, shift[0].expand_as(shift))  # one shift for every unseen row
        assert sent_to_unseen(w, b) <= budget * n
        assert sent_to_unseen(w, b + 1e-4) >= math.floor(budget * n) + 1  # the largest such shift
    with pytest.raises(ValueError, match="seen_budget"):
        match_seen_scale(direction, torch.zeros(len(unseen)), w_s, b_s, features, own, "seen_budget", seen_budget=1.0)


def test_unseen_weights_at_the_head_input_skip_the_forward_and_change_nothing(planted, monkeypatch):
    """At the head's input the induced importance is the row itself (d (w . f) / d f = w): after one checking pass
    the fit runs no forward, and its weights, biases and loss history are those of the full loop to rounding (its
    loss is the U rows' weighted by their share of the batch, not the batch's rows: another order of the same
    sums). At a deeper layer every iteration runs the network."""
    import modnet.methods.niwt as niwt_module

    x, y, knowledge, seen, unseen, train, *_, model = planted
    target = torch.randn(len(unseen), 32, generator=torch.Generator().manual_seed(1))
    calls = []
    handle = model[0].register_forward_hook(lambda *args: calls.append(1))
    try:
        def fit(layer, target):
            calls.clear()
            fitted = fit_unseen_weights(model, layer, model[4], x[train], target, max_iterations=60, patience=1000)
            return fitted, len(calls)

        fast, fast_calls = fit(model[3], target)
        monkeypatch.setattr(niwt_module, "_SKIP_HEAD_INPUT_FORWARD", False)
        full, full_calls = fit(model[3], target)
        assert torch.allclose(fast.weight, full.weight, rtol=1e-5, atol=1e-6) and torch.equal(fast.bias, full.bias)
        assert fast.losses == pytest.approx(full.losses, rel=1e-5) and fast.n_iterations == full.n_iterations == 60
        assert not torch.equal(fast.weight, fast.weight[0].expand_as(fast.weight))  # the rows were fitted apart
        assert (fast_calls, full_calls) == (1, 60)
        monkeypatch.setattr(niwt_module, "_SKIP_HEAD_INPUT_FORWARD", True)
        assert fit(model[1], torch.randn(len(unseen), 64, generator=torch.Generator().manual_seed(2)))[1] == 60
    finally:
        handle.remove()


@pytest.mark.parametrize("match", ["sample", "batch"])
def test_head_input_loss_and_gradient_are_the_batch_loss_and_its_autograd_gradient(match):
    """_head_input_loss's written-out loss and gradient against autograd through step 3's loss over the batch's
    rows (each image's induced importance w_{u_b}), in float64; one class absent from the batch, one zero target."""
    from modnet.methods.niwt import _head_input_loss, cosine_distance

    g = torch.Generator().manual_seed(0)
    n_unseen, dim, lam = 4, 9, 0.3
    weight = torch.randn(n_unseen, dim, generator=g, dtype=torch.float64)
    targets = torch.rand(n_unseen, dim, generator=g, dtype=torch.float64)
    targets[2] = 0.0
    w_mean = torch.randn(dim, generator=g, dtype=torch.float64)
    classes = torch.tensor([0, 1, 1, 2, 0, 1, 2])  # class 3 absent
    w = weight.clone().requires_grad_(True)
    alpha = w[classes]
    if match == "sample":
        match_loss = cosine_distance(alpha, targets[classes]).mean()
    else:  # the class means of the (identical) rows against the targets, over the present classes
        sums = torch.zeros_like(targets).index_add(0, classes, alpha)
        counts = torch.bincount(classes, minlength=n_unseen)
        present = (counts > 0).to(sums.dtype)
        match_loss = (cosine_distance(sums / counts.clamp(min=1)[:, None], targets) * present).sum() / present.sum()
    loss = match_loss + lam * 0.5 * (w - w_mean).pow(2).sum()
    (grad,) = torch.autograd.grad(loss, w)
    counts = torch.bincount(classes, minlength=n_unseen).double()
    share = counts / len(classes) if match == "sample" else (counts > 0).double() / (counts > 0).sum()
    directions = targets / targets.norm(dim=1, keepdim=True).clamp_min(1e-12)
    ours, our_grad = _head_input_loss(weight, directions, share, w_mean, lam)
    assert ours.item() == pytest.approx(loss.item(), rel=1e-12)
    assert torch.allclose(our_grad, grad, rtol=1e-10, atol=1e-12)
    assert our_grad[3].abs().max() > 0  # an absent class still feels the pull toward the seen mean


def test_unseen_bias_is_zero_as_the_official_code_or_the_mean_seen_bias(planted):
    x, y, knowledge, seen, unseen, train, *_, model = planted
    target = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))
    official = fit_unseen_weights(model, model[1], model[4], x[train], target, max_iterations=5)
    assert torch.equal(official.bias, torch.zeros(2))
    mean = fit_unseen_weights(model, model[1], model[4], x[train], target, max_iterations=5, bias="seen_mean")
    assert torch.allclose(mean.bias, model[4].bias.detach().mean().expand(2))
    # seen_mean start: the mean seen row exactly (the seen-centred start adds the seen rows' spread)
    start = fit_unseen_weights(model, model[1], model[4], x[train], target, max_iterations=1, lr=1e-12,
                               init="seen_mean")
    assert torch.allclose(start.weight, model[4].weight.detach().mean(0).expand(2, -1), atol=1e-6)


def test_niwt_on_the_seen_scale_recovers_planted_unseen_classes_without_calibration(planted):
    """Planted classes (means a linear image of attribute codes): with the rows on the seen scale the
    uncalibrated GZSL figures show the unseen classes well above chance and the seen classes kept (the issue's
    bar: S >= 0.9 x the network's own seen accuracy; as fitted, the unseen rows take a third of the seen images)."""
    x, y, knowledge, seen, unseen, train, test_seen, test_unseen, model = planted
    niwt = NIWT(model, model[1], model[4], lr=1e-2, lam=1e-3, max_iterations=1000, seed=0, scale="negatives")
    gzsl = niwt.fit(x[train], y[train], knowledge, seen, unseen).gzsl_model()
    scores_s, scores_u = predict_scores(gzsl, x[test_seen]), predict_scores(gzsl, x[test_unseen])
    result = gzsl_evaluate(scores_s, y[test_seen], scores_u, y[test_unseen], seen, unseen)
    seen_only = float((model(x[test_seen]).argmax(1) == y[test_seen]).float().mean())
    assert result.zsl_accuracy > 4 / len(unseen)                  # among the unseen classes: chance 0.17
    assert result.U > 4 / (len(seen) + len(unseen))               # among all 24 classes: chance 0.04
    assert result.S >= 0.9 * seen_only
    # an unseen row scores its own class's images above the images of other classes
    own = scores_u[torch.arange(len(scores_u)), y[test_unseen]]
    assert float(own.mean()) > float(scores_s[:, unseen].mean())


def test_niwt_input_errors(planted):
    x, y, knowledge, seen, unseen, train, *_, model = planted
    niwt = NIWT(model, model[1], model[4])
    with pytest.raises(ValueError, match=r"y_seen holds classes \[18\]"):
        niwt.fit(x[:100], torch.full((100,), 18), knowledge, seen, unseen)
    bad = knowledge.clone()
    bad[20, 1] = math.nan
    with pytest.raises(ValueError, match=r"NaN/inf in the rows of classes \[20\]"):
        niwt.fit(x[train], y[train], bad, seen, unseen)
    with pytest.raises(ValueError, match="both seen and unseen"):
        niwt.fit(x[train], y[train], knowledge, seen, [0, 20])
    with pytest.raises(ValueError, match="nn.Linear"):
        NIWT(model, model[1], model[3])
    with pytest.raises(ValueError, match="before the classifier"):
        NIWT(model, model[4], model[4])
    with pytest.raises(ValueError, match="call NIWT.fit"):
        NIWT(model, model[1], model[4]).gzsl_model()


# ----------------------------------------------------------------------------------------------------------
# GZSL metrics and baselines
# ----------------------------------------------------------------------------------------------------------
def _one_hot_scores(pred, n_classes=3):
    return F.one_hot(torch.tensor(pred), n_classes).float()


def test_gzsl_metrics_by_hand():
    # seen {0, 1}, unseen {2}; test-seen: class 0 right 2/3, class 1 right 1/1 -> S = (2/3 + 1) / 2
    y_s, pred_s = torch.tensor([0, 0, 0, 1]), [0, 0, 1, 1]
    y_u, pred_u = torch.tensor([2, 2]), [2, 0]                   # U = 1/2
    r = gzsl_evaluate(_one_hot_scores(pred_s), y_s, _one_hot_scores(pred_u), y_u, [0, 1], [2])
    assert r.S == pytest.approx(5 / 6) and r.U == pytest.approx(0.5)
    assert r.H == pytest.approx(2 * 0.5 * (5 / 6) / (0.5 + 5 / 6)) == pytest.approx(0.625)
    assert r.zsl_accuracy == 1.0                                 # only one unseen class to choose from
    assert per_class_accuracy(torch.tensor([0, 0, 1, 1]), y_s) == pytest.approx(5 / 6)  # not 3/4
    assert harmonic_mean(0.0, 0.0) == 0.0
    # calibrated stacking: subtracting 1.5 from seen scores flips every sample to the unseen class
    scores_u = torch.tensor([[2.0, 0.0, 1.0], [0.0, 2.0, 1.0]])
    assert gzsl_evaluate(scores_u, torch.tensor([0, 1]), scores_u, torch.tensor([2, 2]), [0, 1], [2],
                         calibration=1.5).U == 1.0
    # columns outside seen + unseen never win
    scores = torch.tensor([[0.0, 1.0, 0.5, 9.0]])
    assert gzsl_evaluate(scores, torch.tensor([1]), scores, torch.tensor([2]), [0, 1], [2]).S == 1.0


def test_validation_splits_hold_out_enough_pseudo_unseen_classes():
    """val_splits null: ceil(val_min_classes / pseudo-unseen per split) splits: 8 seen classes hold out 2 a
    split -> 3 splits for 6 classes; AWA2's 40 hold out 10 -> 1; an explicit count is kept."""
    import types

    from modnet.config import compose
    from modnet.jobs.gzsl import validation_splits

    cfg = compose("gzsl", [])
    assert cfg.calibration.val_splits is None
    assert validation_splits(cfg, types.SimpleNamespace(seen_classes=list(range(8)))) == 3
    assert validation_splits(cfg, types.SimpleNamespace(seen_classes=list(range(40)))) == 1
    assert validation_splits(cfg, types.SimpleNamespace(seen_classes=list(range(150)))) == 1
    cfg = compose("gzsl", ["calibration.val_splits=2"])
    assert validation_splits(cfg, types.SimpleNamespace(seen_classes=list(range(40)))) == 2


def test_select_calibration_finds_the_separating_gamma():
    # seen samples: the true seen class leads the unseen class by 3; unseen samples: seen leads by 1
    seen_scores = torch.tensor([[4.0, 0.0, 1.0], [0.0, 4.0, 1.0]])
    unseen_scores = torch.tensor([[2.0, 0.0, 1.0], [0.0, 2.0, 1.0]])
    gamma, h = select_calibration(seen_scores, torch.tensor([0, 1]), unseen_scores, torch.tensor([2, 2]), [0, 1], [2])
    assert 1.0 < gamma < 3.0 and h == 1.0
    # random scores: the chosen gamma is as good as any on a brute-force grid of gzsl_evaluate calls
    g = torch.Generator().manual_seed(0)
    s_scores, u_scores = torch.randn(60, 5, generator=g), torch.randn(40, 5, generator=g) + 0.3
    y_s, y_u = torch.randint(0, 3, (60,), generator=g), torch.randint(3, 5, (40,), generator=g)
    gamma, h = select_calibration(s_scores, y_s, u_scores, y_u, [0, 1, 2], [3, 4])
    h_at = lambda c: gzsl_evaluate(s_scores, y_s, u_scores, y_u, [0, 1, 2], [3, 4], calibration=c).H  # noqa: E731
    assert h == pytest.approx(h_at(gamma))
    assert h >= max(h_at(c) for c in torch.linspace(-4, 4, 801).tolist()) - 1e-9


def test_eszsl_closed_form_solves_its_normal_equations_and_recovers_a_planted_compatibility():
    g = torch.Generator().manual_seed(0)
    d, a, n_seen, n_unseen, m = 10, 8, 15, 5, 3000
    S = torch.randn(n_seen + n_unseen, a, generator=g)
    V_true = torch.randn(d, a, generator=g)
    x = torch.randn(m, d, generator=g)
    seen, unseen = list(range(n_seen)), list(range(n_seen, n_seen + n_unseen))
    y = (x @ V_true @ S[:n_seen].T).argmax(1)
    model = ESZSL(gamma=1.0, lam=0.5).fit(x, y, S, seen)
    # Romera-Paredes & Torr: (X X^T + gamma I) V (S S^T + lambda I) = X Y S^T, X = [d, m], Y in {-1, 1}
    X, Y = x.double().T, -torch.ones(m, n_seen, dtype=torch.float64)
    Y[torch.arange(m), y] = 1.0
    Ss = S[:n_seen].double().T
    eye = lambda n: torch.eye(n, dtype=torch.float64)  # noqa: E731
    lhs = (X @ X.T + eye(d)) @ model.V.double() @ (Ss @ Ss.T + 0.5 * eye(a))
    assert torch.allclose(lhs, X @ Y @ Ss.T, rtol=1e-3, atol=1e-2)
    # the planted compatibility matrix is recovered (up to scale), and unseen classes are ranked like it
    assert F.cosine_similarity(model.V.flatten(), V_true.flatten(), dim=0) > 0.85
    x_test = torch.randn(1000, d, generator=g)
    planted_unseen = (x_test @ V_true @ S[unseen].T).argmax(1)
    assert (model.scores(x_test)[:, unseen].argmax(1) == planted_unseen).float().mean() > 3 / n_unseen


def test_eszsl_path_solves_the_normal_equations_at_every_grid_point():
    """ESZSLPath (one eigendecomposition per side) against the paper's normal equations at each (gamma, lam) of a
    grid spanning 10^-3..10^3 on both sides, with uneven class sizes and seen classes that are not 0..z-1."""
    g = torch.Generator().manual_seed(1)
    d, a, m = 12, 7, 400
    S = torch.rand(20, a, generator=g)
    seen = [1, 4, 5, 9, 12, 17]
    x = torch.randn(m, d, generator=g) * torch.linspace(0.1, 5, d)   # badly conditioned on purpose
    y = torch.as_tensor(seen)[torch.multinomial(torch.tensor([1., 2., 3., 4., 5., 6.]), m, True, generator=g)]
    path = ESZSLPath(x, y, S, seen)
    X, Y = x.double().T, -torch.ones(m, len(seen), dtype=torch.float64)
    Y[torch.arange(m), torch.searchsorted(torch.as_tensor(seen), y)] = 1.0
    Ss = S[seen].double().T
    rhs = X @ Y @ Ss.T
    for gamma in (1e-3, 1.0, 1e3):
        for lam in (1e-3, 1e-1, 1e3):
            V = path.model(gamma, lam).V.double()
            lhs = (X @ X.T + gamma * torch.eye(d, dtype=torch.float64)) @ V @ (
                Ss @ Ss.T + lam * torch.eye(a, dtype=torch.float64))
            assert torch.allclose(lhs, rhs, rtol=1e-4, atol=1e-4 * float(rhs.abs().max())), (gamma, lam)


def test_ale_beats_chance_on_the_planted_problem(planted):
    x, y, knowledge, seen, unseen, train, test_seen, test_unseen, _ = planted
    ale = ALE(lr=0.05, epochs=20, seed=0).fit(x[train], y[train], knowledge, seen)
    r = gzsl_evaluate(ale.scores(x[test_seen]), y[test_seen], ale.scores(x[test_unseen]), y[test_unseen], seen, unseen)
    assert r.zsl_accuracy > 2 / len(unseen) and r.S > 0.5


def test_avalanche_plugin_metric_matches_the_direct_computation():
    from avalanche.benchmarks import nc_benchmark
    from avalanche.training import Naive
    from avalanche.training.plugins import EvaluationPlugin
    from torch.utils.data import TensorDataset

    from modnet.methods.gzsl import GZSLPluginMetric

    torch.manual_seed(0)
    x, y = torch.randn(90, 4), torch.arange(90) % 3
    model = nn.Linear(4, 3)
    scores = model(x).detach()
    expected = gzsl_evaluate(scores[y < 2], y[y < 2], scores[y == 2], y[y == 2], [0, 1], [2], calibration=0.2)
    bench = nc_benchmark(TensorDataset(x, y), TensorDataset(x, y), n_experiences=1, task_labels=False,
                         fixed_class_order=[0, 1, 2])
    metric = GZSLPluginMetric([0, 1], [2], calibration=0.2)
    evaluator = EvaluationPlugin(metric, loggers=[])
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), eval_mb_size=32,
                     evaluator=evaluator, device="cpu")
    out = strategy.eval(bench.test_stream)
    assert out["GZSL_H"] == pytest.approx(expected.H) and out["GZSL_U"] == pytest.approx(expected.U)
    assert out["ZSL_Acc"] == pytest.approx(expected.zsl_accuracy)


# ----------------------------------------------------------------------------------------------------------
# The job
# ----------------------------------------------------------------------------------------------------------
FAST = ["progress=false", "train.epochs=10", "niwt.max_iterations=150", "niwt.map_epochs=150", "ale.epochs=3",
        "eszsl.grid_log10=[-1,0,1]", "threads=1", "methods=[niwt,eszsl,ale]"]


def test_gzsl_job_writes_results_for_every_method_and_continual(tmp_path, capsys):
    from modnet.config import compose
    from modnet.jobs.gzsl import run_gzsl

    cfg = compose("gzsl", [f"output_dir={tmp_path}", *FAST, "seeds=[0,1]", "continual.enabled=true",
                           "continual.n_experiences=2", "strategies=[modnet,naive]"])
    results = run_gzsl(cfg)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["benchmark"] == "digits" and saved["unseen_classes"] == [2, 7]
    assert saved["seen_classes"] == [0, 1, 3, 4, 5, 6, 8, 9] and saved["seeds"] == [0, 1]
    assert set(saved["methods"]) == {"niwt", "eszsl", "ale"}
    for name, r in saved["methods"].items():
        assert all(0.0 <= r[k] <= 1.0 for k in ("U", "S", "H", "zsl_accuracy")) and "H_std" in r
        for seed_result in saved["per_seed"].values():
            s = seed_result[name]
            assert s["H"] == pytest.approx(harmonic_mean(s["U"], s["S"]))
    for seed_result in saved["per_seed"].values():  # the setting validation chose among ESZSL's candidates
        assert {seed_result["eszsl"]["eszsl_gamma"], seed_result["eszsl"]["eszsl_lambda"]} <= {0.1, 1.0, 10.0}
    assert saved["network"]["class"] == "HATMLP" and len(saved["network_seen_accuracy"]) == 2
    continual = saved["continual"]["strategies"]
    assert set(continual) == {"modnet", "naive"}
    for name, r in continual.items():
        assert len(r["per_seed"]) == 2 and len(r["experiences"]) == 2
        last = r["per_seed"][0]["experiences"][-1]
        assert len(last["seen_classes_so_far"]) == 8
        assert last["H"] == pytest.approx(harmonic_mean(last["U"], last["S"]))
        for k in ("U", "S", "H", "seen_accuracy", "forgetting", "class_incremental_forgetting"):
            assert k in r["experiences"][-1] and f"{k}_std" in r["experiences"][-1]
    assert continual["modnet"]["network"]["class"] == "HATMLP"
    # a log line per strategy, seed and experience, with the figures results.json records (it printed none)
    out = capsys.readouterr().out
    for name, r in continual.items():
        for seed_run in r["per_seed"]:
            for i, e in enumerate(seed_run["experiences"]):
                assert (f"[continual GZSL {name} seed {seed_run['seed']}] experience {i + 1}/2: U {e['U']:.3f}, "
                        f"S {e['S']:.3f}, H {e['H']:.3f}") in out
    # the CSV's U, S, H are the table's headline, uncalibrated (they were the calibrated ones under the same names)
    with open(tmp_path / "results.csv", newline="") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    for name, r in saved["methods"].items():
        for k in ("U", "S", "H"):
            assert float(rows[name][k]) == pytest.approx(r["uncalibrated"][k])
            assert float(rows[name][f"calibrated_{k}"]) == pytest.approx(r[k])
            assert float(rows[name][f"{k}_std"]) == pytest.approx(r["uncalibrated"][f"{k}_std"])
    assert (tmp_path / "gzsl.png").stat().st_size > 0
    assert (tmp_path / "checkpoints" / "modnet_seed1_final.pt").exists()
    assert results["methods"]["niwt"]["U"] == saved["methods"]["niwt"]["U"]


@pytest.mark.parametrize("seeds", [1, 2])
def test_continual_gzsl_table_shows_a_spread_only_over_several_seeds(seeds):
    """One seed has no spread: its cells give the value alone (they read "± 0.000"), as every other table."""
    from modnet.jobs.continual_gzsl import format_table

    keys = ("U", "S", "H", "seen_accuracy", "forgetting", "class_incremental_seen_accuracy",
            "class_incremental_forgetting")
    exp = {"experience": 1, **{k: 0.5 for k in keys}, **{f"{k}_std": 0.0 if seeds == 1 else 0.01 for k in keys}}
    table = format_table({"n_experiences": 1, "gamma": 0.0, "strategies": {
        "modnet": {"experiences": [exp], "per_seed": [{"seed": s} for s in range(seeds)]}}})
    row = table.splitlines()[-1]
    assert row.count("0.500") == 7 and ("±" in row) == (seeds > 1)


def test_gzsl_job_bad_data_is_reported_before_training(tmp_path):
    from modnet.config import compose
    from modnet.jobs.gzsl import run_gzsl

    with pytest.raises(ValueError, match="benchmark npz needs benchmark.path"):
        run_gzsl(compose("gzsl", [f"output_dir={tmp_path}", "benchmark=npz"]))


def test_cosine_head_scores_by_direction_and_keeps_its_kind_when_it_grows():
    """``CosineHead``: tau * cos(w_c, f) by hand, blind to the length of a row and of f; rows added by
    ``HATNet.add_classes`` score the same way (a row of any length), with no bias."""
    from modnet.config import compose
    from modnet.nets.build import build_modular_network
    from modnet.nets.models import CosineHead

    g = torch.Generator().manual_seed(0)
    head = CosineHead(5, 3, tau=10.0)
    f = torch.randn(4, 5, generator=g)
    w = head.weight.detach()
    by_hand = torch.tensor([[10.0 * float(fi @ wc / (fi.norm() * wc.norm())) for wc in w] for fi in f])
    assert torch.allclose(head(f), by_hand, atol=1e-5) and head.bias is None
    with torch.no_grad():
        head.weight[1] *= 7.0
    assert torch.allclose(head(3.0 * f), by_hand, atol=1e-5)
    assert torch.allclose(head.pair_scores(f, w[[0, 2, 1, 0]]), by_hand[torch.arange(4), [0, 2, 1, 0]], atol=1e-5)

    cfg = compose("gzsl", ["model.head=cosine", "model.head_tau=4", "niwt.scale=none"])
    net = build_modular_network(cfg, (64,), [list(range(3))], class_incremental=False).eval()
    assert isinstance(net.heads[0], CosineHead) and net.heads[0].tau == 4.0
    new = torch.randn(2, net.heads[0].in_features, generator=g)
    net.add_classes(0, [3, 4], 100.0 * new, torch.tensor([5.0, -5.0]))        # length and bias do not count
    x = torch.rand(6, 64, generator=g)
    feats = net.features(x, net.unit_masks(x, 0), 0)
    assert isinstance(net.heads[0], CosineHead) and net.heads[0].out_features == 5
    assert torch.allclose(net(x, 0)[:, 3:], 4.0 * F.cosine_similarity(feats[:, None], new[None], dim=-1), atol=1e-5)


def test_unseen_weights_recover_a_class_direction_through_a_cosine_head(planted):
    """Step 3 through a cosine head: the importance of tau * cos(w_c, f) (not of w_c . f) is matched, so a known
    row's induced importance gives its direction back; scale='negatives' is refused (no bias to set)."""
    from modnet.nets.models import CosineHead

    x, y, knowledge, seen, unseen, train, *_, model = planted
    cosine = copy.deepcopy(model)
    cosine[4] = CosineHead(model[4].in_features, model[4].out_features, tau=8.0)
    with torch.no_grad():
        cosine[4].weight.copy_(model[4].weight)
    target_classes, n = [3, 11], int(train.sum())
    target = torch.stack([class_importance(cosine, cosine[1], x[train], torch.full((n,), c), len(seen))[c]
                          for c in target_classes])
    true_w = cosine[4].weight.detach()[target_classes]
    fitted = fit_unseen_weights(cosine, cosine[1], cosine[4], x[train], target, lr=1e-2, lam=0.0, patience=100,
                                max_iterations=1500, match="batch")
    assert F.cosine_similarity(fitted.weight, true_w, dim=1).min() > 0.9
    with pytest.raises(ValueError, match="scale='none'"):
        NIWT(cosine, cosine[1], cosine[4], scale="negatives")


def test_label_smoothing_is_the_smoothed_cross_entropy_by_hand():
    from omegaconf import OmegaConf

    from modnet.runner.runner import strategy_arguments

    cfg = OmegaConf.create({"train": {"batch_size": 8, "epochs": 1, "eval_batch_size": 8, "label_smoothing": 0.2}})
    criterion = strategy_arguments(cfg, torch.device("cpu"), None)["criterion"]
    logits, y = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]]), torch.tensor([0, 1])
    logp = logits.log_softmax(1)
    by_hand = (0.8 * -logp[torch.arange(2), y] + 0.2 * -logp.mean(1)).mean()
    assert torch.allclose(criterion(logits, y), by_hand)
    plain = OmegaConf.create({"train": {"batch_size": 8, "epochs": 1, "eval_batch_size": 8}})
    assert torch.allclose(strategy_arguments(plain, torch.device("cpu"), None)["criterion"](logits, y),
                          F.cross_entropy(logits, y))


def test_centered_map_predicts_the_deviation_from_the_seen_mean_by_its_normal_equations():
    """``fit_centered``: the class-mean knowledge maps to 0 (the shared importance is left out), each class's
    importance counts by its direction only, B solves the ridge normal equations on the centred, L2-normalised
    targets, and with no ridge and fewer classes than knowledge dimensions + 1 it interpolates them; a planted
    shared part that every class's importance carries does not reach an unseen class's prediction."""
    g = torch.Generator().manual_seed(0)
    k, a = torch.rand(6, 9, generator=g), torch.randn(6, 20, generator=g)
    fitted = KnowledgeToImportance(9, 20).fit_centered(k, a, ridge=0.1)
    with torch.no_grad():
        assert fitted(k.mean(0, keepdim=True)).abs().max() < 1e-5
        scaled = KnowledgeToImportance(9, 20).fit_centered(k, a * (torch.rand(6, 1, generator=g) * 5 + 0.1), 0.1)
        assert torch.allclose(scaled(k), fitted(k), atol=1e-5)
        kc, ac = k - k.mean(0), F.normalize(a, dim=1) - F.normalize(a, dim=1).mean(0)
        coef = fitted.matrix
        lam = 0.1 * (kc ** 2).sum() / 6
        assert torch.allclose(kc.T @ (kc @ coef - ac) + lam * coef, torch.zeros_like(coef), atol=1e-4)
        exact = KnowledgeToImportance(9, 20).fit_centered(k, a, ridge=0.0)
        assert torch.allclose(exact(k), ac, atol=1e-4)
        # planted: a_c = shared + (k_c - mean k) B; an unseen class's prediction points along its own deviation
        shared, b_true = 10.0 * torch.randn(20, generator=g), torch.randn(9, 20, generator=g)
        k_all = torch.rand(12, 9, generator=g)
        a_all = shared + (k_all - k_all[:10].mean(0)) @ b_true
        pred = KnowledgeToImportance(9, 20).fit_centered(k_all[:10], a_all[:10], ridge=1e-4)(k_all[10:])
        deviation = (k_all[10:] - k_all[:10].mean(0)) @ b_true
        assert F.cosine_similarity(pred, deviation, dim=1).min() > 0.9
        assert F.cosine_similarity(pred, shared[None], dim=1).abs().max() < 0.3
    with pytest.raises(ValueError, match="map_bias=True"):
        NIWT(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), None, None, map_fit="centered", map_bias=False)


def test_positives_scale_scores_an_unseen_class_mean_as_the_seen_rows_score_their_own():
    """scale=positives, planted: the class means are an exact affine map of the knowledge (m_c = m0 + k_c M), so
    the ridge map (tiny ridge) predicts an unseen class's mean exactly; each unseen row must then score its own
    class's true mean at the seen rows' average own-class-mean score (hand-computed here), keep the direction
    and the spread that ``negatives`` gives it, and raise ValueError without the knowledge."""
    g = torch.Generator().manual_seed(0)
    n_seen, n_unseen, a_dim, d = 6, 2, 3, 5
    knowledge = torch.randn(n_seen + n_unseen, a_dim, generator=g, dtype=torch.float64)
    m0, m_map = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(a_dim, d, generator=g, dtype=torch.float64)
    class_means = m0 + knowledge @ m_map
    y = torch.arange(n_seen).repeat_interleave(40)
    noise = torch.randn(len(y), d, generator=g, dtype=torch.float64)
    noise -= torch.stack([noise[y == c].mean(0) for c in range(n_seen)])[y]  # each class's sample mean exact
    features = class_means[y] + noise
    own = y[:, None] == torch.arange(n_seen)[None]
    w_s, b_s = torch.randn(n_seen, d, generator=g, dtype=torch.float64), torch.randn(n_seen, generator=g, dtype=torch.float64)
    direction = torch.randn(n_unseen, d, generator=g, dtype=torch.float64)
    w, b = match_seen_scale(direction, torch.zeros(n_unseen, dtype=torch.float64), w_s, b_s, features, own,
                            "positives", knowledge[:n_seen], knowledge[n_seen:], mean_ridge=1e-9)
    target = float(sum(w_s[c] @ class_means[c] + b_s[c] for c in range(n_seen)) / n_seen)
    unseen_at_own_mean = (w * class_means[n_seen:]).sum(1) + b
    assert torch.allclose(unseen_at_own_mean, torch.full((n_unseen,), target, dtype=torch.float64), atol=1e-6)
    w_neg, _ = match_seen_scale(direction, torch.zeros(n_unseen, dtype=torch.float64), w_s, b_s, features, own,
                                "negatives")
    assert torch.allclose(w, w_neg)
    with pytest.raises(ValueError, match="knowledge"):
        match_seen_scale(direction, torch.zeros(n_unseen), w_s, b_s, features, own, "positives")


def test_gzsl_table_gives_each_seeds_choice_a_spread_and_drops_calibration_it_did_not_run():
    """The gamma and the gate quantile chosen per seed read mean ± std as every cell (0.99 and 0.9 printed '0.95'
    with no spread); calibration.mode=none leaves out the calibrated columns (they repeated the uncalibrated ones
    at gamma 0). Fixed decimals, mean and std alike (the 3 significant digits read "3.34 ± 1.08" beside
    "0.313 ± 0.0206")."""
    from modnet.jobs.gzsl import format_table

    calibrated = {"U": 0.3, "S": 0.5, "H": 0.375, "zsl_accuracy": 0.6}
    uncalibrated = {"U": 0.2, "S": 0.6, "H": 0.3, "zsl_accuracy": 0.6}
    gated = {"U": 0.4, "S": 0.55, "H": 0.463, "zsl_accuracy": 0.6}
    std = {f"{k}_std": 0.01 for k in calibrated}
    entry = {**calibrated, **std, "gamma": 1.5, "gamma_std": 0.5, "uncalibrated": {**uncalibrated, **std},
             "gated": {**gated, **std, "quantile": 0.945, "quantile_std": 0.045}}
    header, _, row = format_table({"niwt": entry}, 2).splitlines()
    cells = dict(zip([c.strip() for c in header.split("|")], [c.strip() for c in row.split("|")]))
    assert cells["gamma"] == "1.50 ± 0.50" and cells["gate q"] == "0.945 ± 0.045"
    # each figure in its own column: the headline uncalibrated, then calibrated, then gated
    assert [cells[k] for k in ("U", "S", "H")] == ["0.200 ± 0.010", "0.600 ± 0.010", "0.300 ± 0.010"]
    assert [cells[f"{k} (calibrated)"] for k in ("U", "S", "H")] == ["0.300 ± 0.010", "0.500 ± 0.010",
                                                                       "0.375 ± 0.010"]
    assert [cells[f"{k} (gated)"] for k in ("U", "S", "H")] == ["0.400 ± 0.010", "0.550 ± 0.010", "0.463 ± 0.010"]
    header, _, row = format_table({"niwt": entry}, 2, calibrated=False).splitlines()
    assert "calibrated" not in header and "gamma" not in header and "H (gated)" in header


@pytest.mark.parametrize("mode", ["none", "validate"])
def test_gzsl_csv_has_the_tables_columns(tmp_path, mode):
    """results.csv has the printed table's columns: with calibration.mode=none no calibrated_* columns (they were
    written, repeating the uncalibrated figures at gamma 0, where the table drops them)."""
    from modnet.jobs.gzsl import _write_outputs, format_table

    calibrated = {"U": 0.3, "S": 0.5, "H": 0.375, "zsl_accuracy": 0.6, "gamma": 0.0}
    uncalibrated = {"U": 0.2, "S": 0.6, "H": 0.3, "zsl_accuracy": 0.6}
    std = {f"{k}_std": 0.01 for k in calibrated}
    results = {"benchmark": "digits", "seeds": [0, 1], "calibration": mode,
               "methods": {"eszsl": {**calibrated, **std, "uncalibrated": {**uncalibrated, **std}}}}
    _write_outputs(tmp_path, results)
    with open(tmp_path / "results.csv", newline="") as f:
        header = next(csv.reader(f))
    table_header = format_table(results["methods"], 2, calibrated=mode != "none").splitlines()[0]
    assert any(c.startswith("calibrated_") for c in header) == (mode != "none") == ("calibrated" in table_header)
    assert header[:5] == ["method", "U", "S", "H", "zsl_accuracy"]


def test_a_class_explained_by_a_map_fitted_without_it_and_not_its_own_row_echoed_back():
    """Textual explanations of classes. With fewer classes than units the inverse map interpolates its own pairs:
    fitted on every class, mapping a class's importance back gives its knowledge row whatever the importance is
    (digits: each class 'explained' by its own segment list). Held out (fitted on the other classes), the
    prediction follows the importance. Planted, 12 classes, 6 attributes, 40 units: importance linear in the
    knowledge (+ 5% noise) -> held-out agreement > 0.9 for every class; importance unrelated to the knowledge ->
    the in-sample map still agrees ~1 (the echo), the held-out one does not (mean |agreement| < 0.5)."""
    from modnet.methods.niwt import held_out_knowledge, knowledge_agreement, ridge_inverse

    g = torch.Generator().manual_seed(0)
    knowledge = torch.rand(12, 6, generator=g)
    linear = knowledge @ torch.randn(6, 40, generator=g)
    linear = linear + 0.05 * linear.std() * torch.randn(linear.shape, generator=g)
    assert knowledge_agreement(held_out_knowledge(knowledge, linear), knowledge).min() > 0.9
    unrelated = torch.randn(12, 40, generator=g)
    m, b = ridge_inverse(knowledge, unrelated, 1e-3)
    in_sample = F.normalize(unrelated, dim=1) @ m + b
    assert knowledge_agreement(in_sample, knowledge).min() > 0.99  # the echo
    assert knowledge_agreement(held_out_knowledge(knowledge, unrelated), knowledge).abs().mean() < 0.5
    with pytest.raises(ValueError, match="at least 3 classes"):
        held_out_knowledge(knowledge[:2], linear[:2])


def test_a_module_is_named_by_the_attribute_its_importance_follows_and_without_importance_by_none():
    """Module A's unit 2 is important for the classes that have attribute 2 (as much as they have it), module B's
    units for none: A is named attribute 2 first, B gets no attributes (with NIWT's map offset in the old
    scoring, a module without importance was named by the attributes the offset favoured)."""
    from modnet.explain.gradcam import module_attributes

    names = ["a0", "a1", "a2", "a3"]
    knowledge = torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, 1], [0, 1, 1, 0]])
    importance = torch.full((3, 6), 0.1)
    importance[:, 2] += knowledge[:, 2]
    importance[:, 4:] = 0.0
    ranked = module_attributes(importance, {"A": [1, 2], "B": [4, 5]}, names, knowledge, top_k=2)
    assert ranked["A"][0][0] == "a2" and ranked["A"][0][1] > 0
    assert ranked["B"] == []


