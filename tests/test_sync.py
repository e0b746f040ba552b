"""SynC clustering, the sync step / order parameter, the mini-batch sync loss and its diagnostics.

Expected values are computed here by hand (math.sin / math.exp / math.cos), or come from planted structure
(blobs that must be recovered, isolated points that must stay outliers).
"""
import math
import os
import time

import numpy as np
import pytest
import torch
from sklearn.datasets import make_blobs
from sklearn.metrics import adjusted_rand_score

from modnet.methods.sync import SynC, mdl_cost, order_parameter, sync_diagnostics, sync_loss, sync_step

# Five well-separated Gaussian blobs (centre gaps >= 7 standard deviations).
CENTERS = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0], [5.0, 5.0]])


def five_blobs(seed=0, n=600):
    return make_blobs(n_samples=n, centers=CENTERS, cluster_std=1.0, random_state=seed)


# ----------------------------------------------------------------------------------------------------------
# The dynamics on a case small enough to do by hand
# ----------------------------------------------------------------------------------------------------------

# x1 - x2 at distance 0.5, x2 - x3 at sqrt(0.29) ~ 0.539, x1 - x3 at sqrt(1.06) ~ 1.03. With eps = 0.6:
# Nb(x1) = {x1, x2}, Nb(x2) = {x1, x2, x3}, Nb(x3) = {x2, x3}.
THREE = [[0.0, 0.0], [0.3, 0.4], [0.5, 0.9]]
EPS3 = 0.6


def test_sync_step_three_points_by_hand():
    s = math.sin
    expected = [
        [0.0 + (s(0.0) + s(0.3)) / 2, 0.0 + (s(0.0) + s(0.4)) / 2],
        [0.3 + (s(-0.3) + s(0.0) + s(0.2)) / 3, 0.4 + (s(-0.4) + s(0.0) + s(0.5)) / 3],
        [0.5 + (s(-0.2) + s(0.0)) / 2, 0.9 + (s(-0.5) + s(0.0)) / 2],
    ]
    got = sync_step(torch.tensor(THREE, dtype=torch.float64), EPS3)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-12)


def test_order_parameter_three_points_by_hand():
    d12, d23 = 0.5, math.sqrt(0.29)
    e = math.exp
    expected = ((1 + e(-d12)) / 2 + (1 + e(-d12) + e(-d23)) / 3 + (1 + e(-d23)) / 2) / 3
    got = order_parameter(torch.tensor(THREE, dtype=torch.float64), EPS3)
    assert float(got) == pytest.approx(expected, abs=1e-12)


def test_order_parameter_is_one_for_collapsed_or_isolated_points():
    collapsed = torch.tensor([[0.2, 0.2]] * 4 + [[0.9, 0.9]] * 3, dtype=torch.float64)
    assert float(order_parameter(collapsed, 0.1)) == pytest.approx(1.0, abs=1e-12)


def test_chunked_step_matches_unchunked():
    X = torch.rand(300, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    full = sync_step(X, 0.4)
    chunked = sync_step(X, 0.4, chunk_elements=7 * 300)  # 7 rows per block
    np.testing.assert_allclose(chunked.numpy(), full.numpy(), atol=1e-12)


# ----------------------------------------------------------------------------------------------------------
# Clustering
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rule", ["knn", "mdl"])
def test_sync_recovers_five_blobs_with_automatic_eps(rule):
    X, y = five_blobs(seed=1)
    model = SynC(eps_rule=rule).fit(X)
    assert adjusted_rand_score(y, model.labels_) >= 0.95
    assert model.order_parameter_ >= 1 - 1e-3
    assert model.eps_ > 0
    # every found centre sits on a planted centre
    dists = np.linalg.norm(model.cluster_centers_[:, None, :] - CENTERS[None], axis=2).min(axis=1)
    big = np.bincount(model.labels_[model.labels_ >= 0]) >= 50
    assert np.all(dists[big] < 0.5)


def test_isolated_points_are_outliers():
    X, y = make_blobs(n_samples=300, centers=CENTERS[:3], cluster_std=1.0, random_state=3)
    lonely = np.array([[30.0, -20.0], [-25.0, 30.0], [35.0, 35.0]])
    model = SynC().fit(np.vstack([X, lonely]))
    labels = model.labels_
    assert np.all(labels[-3:] == -1)
    assert np.mean(labels[:-3] >= 0) >= 0.98
    assert adjusted_rand_score(y, labels[:-3]) >= 0.95


def test_fixed_eps_far_below_spacing_leaves_everything_alone():
    # three points farther apart than eps never interact: all are outliers, nothing moves
    X = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    model = SynC(eps=0.1, scale=None).fit(X)
    assert list(model.labels_) == [-1, -1, -1]
    np.testing.assert_allclose(model.X_sync_.cpu().numpy(), X, atol=1e-6)
    assert model.n_clusters_ == 0


def test_labels_invariant_to_affine_rescaling_of_the_data():
    # SynC works on min-max scaled data, so an axis-wise affine map of the input must not change the result
    X, _ = five_blobs(seed=2, n=300)
    a = SynC(eps=0.1).fit_predict(X)
    b = SynC(eps=0.1).fit_predict(X * np.array([3.0, 0.2]) + np.array([-7.0, 40.0]))
    assert adjusted_rand_score(a, b) == pytest.approx(1.0)


def test_torch_input_gives_same_clusters_and_stays_on_its_device():
    X, _ = five_blobs(seed=4, n=300)
    from_numpy = SynC(device="cpu").fit_predict(X)
    Xt = torch.as_tensor(X, dtype=torch.float32)
    model = SynC().fit(Xt)
    assert adjusted_rand_score(from_numpy, model.labels_) == pytest.approx(1.0)
    assert model.X_sync_.device == Xt.device


def test_mdl_cost_prefers_the_planted_partition():
    X, y = five_blobs(seed=5, n=300)
    Xs = (X - X.min(0)) / (X.max(0) - X.min(0))
    merged = np.where(y == 1, 0, y)                               # two blobs coded as one
    rng = np.random.default_rng(0)
    split = np.where(rng.random(len(y)) < 0.5, y, y + 5)          # every blob cut in random halves
    all_outliers = np.full_like(y, -1)
    truth = mdl_cost(Xs, y)
    assert truth < mdl_cost(Xs, merged)
    assert truth < mdl_cost(Xs, split)
    assert truth < mdl_cost(Xs, all_outliers)


@pytest.mark.parametrize("kwargs", [dict(eps=-1.0), dict(eps_rule="dbscan"), dict(scale="zscore"),
                                    dict(tol=0.0), dict(dtype="float16"), dict(algorithm="kdtree")])
def test_bad_parameters_raise(kwargs):
    with pytest.raises(ValueError):
        SynC(**kwargs).fit(np.random.default_rng(0).random((20, 2)))


def test_bad_data_raises():
    with pytest.raises(ValueError, match="2-D"):
        SynC().fit(np.zeros(10))
    with pytest.raises(ValueError, match="NaN"):
        SynC().fit(np.array([[0.0, 1.0], [np.nan, 2.0], [1.0, 1.0]]))


def test_benchmark_2k_points_dim16_cpu(capsys):
    """Benchmark-style timing print (no timed assert); the clustering itself must be right."""
    X, y = make_blobs(n_samples=2000, n_features=16, centers=8, cluster_std=1.0, random_state=0)
    start = time.perf_counter()
    model = SynC(device="cpu").fit(X)
    seconds = time.perf_counter() - start
    with capsys.disabled():
        print(f"\n[bench] SynC knn 2000 x 16 on CPU ({torch.get_num_threads()} threads): {seconds:.2f} s, "
              f"{model.n_iter_} iterations, {model.n_clusters_} clusters, eps={model.eps_:.4f}")
    assert adjusted_rand_score(y, model.labels_) >= 0.95


@pytest.mark.skipif(not os.environ.get("MODNET_BENCH"), reason="set MODNET_BENCH=1 for the 8k-point run")
def test_benchmark_8k_points_dim16_cpu(capsys):
    X, y = make_blobs(n_samples=8000, n_features=16, centers=8, cluster_std=1.0, random_state=0)
    start = time.perf_counter()
    model = SynC(device="cpu", chunk_elements=1 << 22).fit(X)
    seconds = time.perf_counter() - start
    with capsys.disabled():
        print(f"\n[bench] SynC knn 8000 x 16 on CPU ({torch.get_num_threads()} threads, 4M-entry blocks): "
              f"{seconds:.2f} s, {model.n_iter_} iterations, {model.n_clusters_} clusters")
    assert adjusted_rand_score(y, model.labels_) >= 0.95


# ----------------------------------------------------------------------------------------------------------
# The grid variant (SynC(algorithm="grid")): the exact variant's dynamics on k-d leaves
# ----------------------------------------------------------------------------------------------------------

def _lonely_blobs():
    X, _ = make_blobs(n_samples=300, centers=CENTERS[:3], cluster_std=1.0, random_state=3)
    return np.vstack([X, [[30.0, -20.0], [-25.0, 30.0], [35.0, 35.0]]])


@pytest.mark.parametrize("case", ["five_blobs", "lonely", "fixed_eps", "mdl", "16d_k5", "noise_16d"])
def test_grid_gives_the_exact_labels_on_small_cases(case):
    X, kwargs = {
        "five_blobs": (five_blobs(seed=0, n=500)[0], {}),
        "lonely": (_lonely_blobs(), {}),
        "fixed_eps": (five_blobs(seed=2, n=300)[0], dict(eps=0.1)),
        "mdl": (five_blobs(seed=3, n=300)[0], dict(eps_rule="mdl")),
        "16d_k5": (make_blobs(n_samples=400, n_features=16, centers=8, cluster_std=2.0, random_state=0)[0],
                   dict(k=5)),
        "noise_16d": (np.random.default_rng(0).normal(size=(500, 16)), dict(k=5)),
    }[case]
    exact = SynC(algorithm="exact", device="cpu", **kwargs).fit(X)
    grid = SynC(algorithm="grid", device="cpu", **kwargs).fit(X)
    np.testing.assert_array_equal(grid.labels_, exact.labels_)
    assert grid.eps_ == exact.eps_ and grid.n_iter_ == exact.n_iter_
    np.testing.assert_allclose(grid.X_sync_.numpy(), exact.X_sync_.numpy(), atol=1e-5)


def test_grid_iteration_is_the_sync_step_and_brackets_the_order_parameter():
    """Along a run on planted 16-d blobs (spread-out start, contracting, collapsed), the grid step equals the
    exact step, and its bounds of r_c contain the exact r_c; exact_r gives r_c itself."""
    from modnet.methods.sync import _grid_iteration

    X, _ = make_blobs(n_samples=1500, n_features=16, centers=6, cluster_std=1.0, random_state=7)
    X = torch.as_tensor((X - X.min(0)) / (X.max(0) - X.min(0)), dtype=torch.float32)
    eps = 0.3
    for _ in range(3):
        step, lo, hi = _grid_iteration(X, eps)
        r = float(order_parameter(X, eps))
        assert lo - 1e-6 <= r <= hi + 1e-6
        assert _grid_iteration(X, eps, exact_r=True)[1] == pytest.approx(r, abs=1e-6)
        torch.testing.assert_close(step, sync_step(X, eps), atol=1e-5, rtol=0)
        X = step


def test_grid_and_exact_agree_on_planted_16d_blobs():
    X, y = make_blobs(n_samples=2000, n_features=16, centers=8, cluster_std=1.0, random_state=0)
    exact = SynC(algorithm="exact", device="cpu").fit_predict(X)
    grid = SynC(algorithm="grid", device="cpu").fit_predict(X)
    assert adjusted_rand_score(y, exact) == adjusted_rand_score(y, grid) == pytest.approx(1.0)


def _timed_planted_fit(n, algorithm):
    """(seconds, ARI against the planted labels, iterations) of SynC on n planted 16-d points in 8 blobs."""
    X, y = make_blobs(n_samples=n, n_features=16, centers=8, cluster_std=1.0, random_state=0)
    start = time.perf_counter()
    model = SynC(algorithm=algorithm, device="cpu").fit(X)
    return time.perf_counter() - start, adjusted_rand_score(y, model.labels_), model.n_iter_


def test_grid_recovers_16k_planted_points_dim16(capsys):
    """The size the exact variant cannot afford on the CPU (16x the pairs of 4k points); timing printed only."""
    seconds, ari, n_iter = _timed_planted_fit(16000, "grid")
    with capsys.disabled():
        print(f"\n[bench] SynC grid 16000 x 16 on CPU ({torch.get_num_threads()} threads): {seconds:.2f} s, "
              f"{n_iter} iterations")
    assert ari == pytest.approx(1.0)


@pytest.mark.skipif(not os.environ.get("MODNET_BENCH"), reason="set MODNET_BENCH=1 for the exact 4k / grid 16k run")
def test_benchmark_grid_16k_against_exact_4k(capsys):
    """Same-process ratio (printed, not asserted): the grid variant on 16k points against the exact one on 4k."""
    t_exact, ari_exact, _ = _timed_planted_fit(4000, "exact")
    t_grid, ari_grid, _ = _timed_planted_fit(16000, "grid")
    with capsys.disabled():
        print(f"\n[bench] SynC exact 4000 x 16: {t_exact:.2f} s; grid 16000 x 16: {t_grid:.2f} s; "
              f"ratio {t_grid / t_exact:.2f} ({torch.get_num_threads()} threads)")
    assert ari_exact == ari_grid == pytest.approx(1.0)


def test_auto_picks_the_grid_by_size():
    small, large = torch.zeros(2999, 2), torch.zeros(3000, 2)
    assert not SynC()._use_grid(small) and SynC()._use_grid(large)
    assert SynC(algorithm="grid")._use_grid(small) and not SynC(algorithm="exact")._use_grid(large)


# ----------------------------------------------------------------------------------------------------------
# Mini-batch sync loss and diagnostics
# ----------------------------------------------------------------------------------------------------------

# a = (1, 0), b at angle 0.3, c = (0, 1): cosine distances d_ab = 1 - cos 0.3, d_bc = 1 - cos(pi/2 - 0.3),
# d_ac = 1. Norms differ on purpose: cosine distance ignores them.
D_AB = 1 - math.cos(0.3)
D_BC = 1 - math.cos(math.pi / 2 - 0.3)


def three_vectors():
    return torch.tensor([[2.0, 0.0], [math.cos(0.3), math.sin(0.3)], [0.0, 5.0]], dtype=torch.float64)


def test_sync_loss_by_hand():
    F = three_vectors()
    # eps = 0.1: a and b are each other's only neighbour, c has none (contributes 0, still counted in N = 3)
    assert float(sync_loss(F, 0.1)) == pytest.approx((D_AB + D_AB + 0.0) / 3, abs=1e-12)
    # eps = 0.8: Nb(a) = {b}, Nb(b) = {a, c}, Nb(c) = {b}
    assert float(sync_loss(F, 0.8)) == pytest.approx((D_AB + (D_AB + D_BC) / 2 + D_BC) / 3, abs=1e-12)


def test_sync_loss_gradient_pulls_neighbours_together():
    F = three_vectors().requires_grad_(True)
    loss = sync_loss(F, 0.1)
    loss.backward()
    assert torch.isfinite(F.grad).all()
    assert F.grad[:2].abs().sum() > 0
    assert F.grad[2].abs().sum() == 0  # c has no neighbour: no pull on it
    with torch.no_grad():
        stepped = F - 0.5 * F.grad
    assert float(sync_loss(stepped, 0.1)) < float(loss)


def test_sync_diagnostics_by_hand():
    F = three_vectors()
    wide = sync_diagnostics(F, 0.8)
    assert wide["n_with_neighbours"] == 3
    assert wide["share_with_neighbours"] == pytest.approx(1.0)
    assert wide["mean_neighbour_count"] == pytest.approx(4 / 3)
    assert wide["largest_cluster_size"] == 3  # a - b - c chain, single linkage
    assert wide["mean_neighbour_distance"] == pytest.approx((D_AB + (D_AB + D_BC) / 2 + D_BC) / 3)
    narrow = sync_diagnostics(F, 0.1, previous=F + 0.25)
    assert narrow["n_with_neighbours"] == 2
    assert narrow["share_with_neighbours"] == pytest.approx(2 / 3)
    assert narrow["mean_neighbour_count"] == pytest.approx(2 / 3)
    assert narrow["largest_cluster_size"] == 2
    assert narrow["mean_neighbour_distance"] == pytest.approx(D_AB)
    assert narrow["stability_l1"] == pytest.approx(0.25)


def test_sync_diagnostics_average_over_batches():
    F = three_vectors()
    batched = sync_diagnostics(torch.stack([F, F[[1, 0, 2]]]), 0.1)  # a permutation changes nothing
    assert batched["largest_cluster_size"] == 2
    assert batched["share_with_neighbours"] == pytest.approx(2 / 3)
    # a second batch of three vectors with no neighbour at eps 0.1 (cosine distances 1, 1, 2): the mean of
    # the two batches' figures, by hand: share (2/3 + 0) / 2, neighbours per item (2/3 + 0) / 2, largest (2 + 1) / 2
    lonely = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    mixed = sync_diagnostics(torch.stack([F, lonely]), 0.1)
    assert mixed["share_with_neighbours"] == pytest.approx(1 / 3)
    assert mixed["mean_neighbour_count"] == pytest.approx(1 / 3)
    assert mixed["largest_cluster_size"] == pytest.approx(1.5)


def test_sync_loss_rejects_bad_input():
    with pytest.raises(ValueError):
        sync_loss(torch.zeros(5), 0.1)
    with pytest.raises(ValueError):
        sync_loss(three_vectors(), 0.0)
    with pytest.raises(ValueError, match="offset"):
        sync_loss(three_vectors(), 0.1, stride=5, offset=3)  # row 3 of 3 items: no row to evaluate
    with pytest.raises(ValueError, match="items"):
        sync_loss(three_vectors(), 0.1, items="units")


def test_sync_loss_gradient_matches_finite_differences():
    g = torch.Generator().manual_seed(0)
    F = torch.randn(2, 9, 5, generator=g, dtype=torch.float64)
    d = 1 - torch.nn.functional.normalize(F, dim=-1) @ torch.nn.functional.normalize(F, dim=-1).mT
    eps = 0.9
    assert (d - eps).abs().min() > 1e-3  # no pair on the threshold: the neighbourhoods are locally constant
    for stride, offset in [(1, 0), (3, 1), (4, 3)]:
        assert torch.autograd.gradcheck(lambda f: sync_loss(f, eps, stride, offset), (F.clone().requires_grad_(),))
        # items as columns (a layer's batch x units activations as they come): the same loss of the same items
        assert torch.autograd.gradcheck(lambda f: sync_loss(f, eps, stride, offset, items="columns"),
                                        (F.mT.contiguous().requires_grad_(),))
        # zero columns (a ReLU unit silent on the whole batch) have no neighbours and get no gradient
        Z = F.mT.contiguous()
        Z[:, :, 2] = 0
        z = Z.clone().requires_grad_()
        sync_loss(z, eps, stride, offset, items="columns").backward()
        assert torch.isfinite(z.grad).all() and (z.grad[:, :, 2] == 0).all()


def test_sync_loss_rows_and_layers_by_hand():
    """Rows offset::stride of an (N, D) set, and L sets at once, against the per-item definition."""
    g = torch.Generator().manual_seed(1)
    F = torch.randn(2, 7, 4, generator=g, dtype=torch.float64)
    eps = 0.8

    def per_item(f):
        a = torch.nn.functional.normalize(f, dim=-1)
        d = 1 - a @ a.T
        out = []
        for i in range(len(f)):
            nb = [j for j in range(len(f)) if j != i and d[i, j] <= eps]
            out.append(sum(float(d[i, j]) for j in nb) / len(nb) if nb else 0.0)
        return out

    items = [per_item(F[0]), per_item(F[1])]
    for stride, offset in [(1, 0), (2, 1), (3, 0), (3, 2)]:
        want = [sum(it[offset::stride]) / len(it[offset::stride]) for it in items]
        assert float(sync_loss(F[0], eps, stride, offset)) == pytest.approx(want[0], abs=1e-12)
        assert float(sync_loss(F, eps, stride, offset)) == pytest.approx(sum(want) / 2, abs=1e-12)
        assert float(sync_loss(F.mT, eps, stride, offset, items="columns")) == pytest.approx(sum(want) / 2,
                                                                                              abs=1e-12)
    # every row once per cycle: the mean over a cycle of strides is the full loss (7 = 2 + 2 + 3 rows is not
    # even, so weight each call by its rows)
    cycle = sum(float(sync_loss(F[0], eps, 3, o)) * len(items[0][o::3]) for o in range(3)) / 7
    assert cycle == pytest.approx(float(sync_loss(F[0], eps)), abs=1e-12)


def test_lazy_sync_regulariser_adds_every_kth_step_with_weight_times_k_and_cycles_rows():
    """SyncRegPlugin(every=2, rows=3) on two 7-unit layers: steps 0 and 2 add 2 * weight * L_sync of the
    stacked layers' profiles on rows offset::3 (offset 0, then 1); steps 1 and 3 add nothing, and their
    forwards are not asked to record the units' activations."""
    from types import SimpleNamespace

    from modnet.nets.models import Condition, ForwardTrace
    from strategies.plugins.modular import SyncRegPlugin

    g = torch.Generator().manual_seed(0)
    acts = [torch.randn(10, 7, generator=g).relu(), torch.randn(10, 7, generator=g).relu()]
    plugin = SyncRegPlugin(weight=0.5, eps=0.9, rows=3, every=2)
    condition = Condition(trace=ForwardTrace(activations=acts))
    strat = SimpleNamespace(model=None, loss=torch.zeros(()), train_condition=condition)
    plugin.before_training_exp(strat)
    profiles = torch.stack([a.T for a in acts])
    added, recorded = [], []
    for _ in range(4):
        before = float(strat.loss)
        plugin.before_forward(strat)
        recorded.append(condition.record)  # the forward of an evaluated step records the units' activations
        plugin.before_backward(strat)
        added.append(float(strat.loss) - before)
    assert recorded == [True, False, True, False]
    assert added[1] == 0.0 and added[3] == 0.0
    assert added[0] == pytest.approx(2 * 0.5 * float(sync_loss(profiles, 0.9, 3, 0)), rel=1e-6)
    assert added[2] == pytest.approx(2 * 0.5 * float(sync_loss(profiles, 0.9, 3, 1)), rel=1e-6)


def test_sync_regulariser_is_the_mean_over_layers_of_any_widths():
    from types import SimpleNamespace

    from modnet.nets.models import Condition, ForwardTrace
    from strategies.plugins.modular import SyncRegPlugin

    g = torch.Generator().manual_seed(2)
    acts = [torch.randn(10, 7, generator=g), torch.randn(10, 5, generator=g), torch.randn(10, 7, generator=g)]
    strat = SimpleNamespace(model=None, loss=torch.zeros(()),
                            train_condition=Condition(trace=ForwardTrace(activations=acts)))
    plugin = SyncRegPlugin(weight=1.0, eps=0.9)
    plugin.before_training_exp(strat)
    plugin.before_forward(strat)
    plugin.before_backward(strat)
    want = sum(float(sync_loss(a.T, 0.9)) for a in acts) / 3
    assert float(strat.loss) == pytest.approx(want, rel=1e-6)


def test_modules_cluster_algorithm_reaches_sync(monkeypatch):
    """modules.cluster.algorithm (configs/training.yaml) goes through cluster_layers to SynC: the grid variant
    runs (its iteration is called: the grid and exact variants return the same clusters, so equal labels alone
    cannot tell that the option arrived) and finds the planted modules the exact one finds, and an unknown name
    stops."""
    from modnet.config import compose
    from modnet.methods import sync
    from modnet.nets.modules import cluster_layers

    assert compose("cl").modules.cluster.algorithm == "auto"
    grid_calls = []
    real = sync._grid_iteration
    monkeypatch.setattr(sync, "_grid_iteration", lambda *a, **kw: grid_calls.append(1) or real(*a, **kw))
    g = torch.Generator().manual_seed(0)
    latent = torch.randn(3, 120, generator=g)
    planted = torch.arange(30) % 3
    profiles = [latent[planted] + 0.2 * torch.randn(30, 120, generator=g)]
    (exact, _), = cluster_layers(profiles, steps=60, min_modules=2, max_modules=8, algorithm="exact")
    assert not grid_calls
    (grid, _), = cluster_layers(profiles, steps=60, min_modules=2, max_modules=8, algorithm="grid")
    assert grid_calls
    assert torch.equal(exact, grid) and adjusted_rand_score(planted.numpy(), grid.numpy()) == 1.0
    with pytest.raises(ValueError, match="algorithm"):
        cluster_layers(profiles, steps=1, algorithm="kdtree")
