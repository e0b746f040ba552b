"""CKA (reference values of Kornblith's public demo, invariances), mini-batch CKA, neuron matching, plots."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

from modnet.methods.analysis import (MiniBatchCKA, cka_matrix, collect_activations, compare_models, cross_correlation,
                             debiased_linear_cka, linear_cka, match_units, plot_cka_heatmap, rbf_cka)


@pytest.fixture(scope="module")
def demo_xy():
    np.random.seed(1337)
    X = np.random.randn(100, 10)
    Y = np.random.randn(100, 10) + X
    return X, Y


def random_orthogonal(d, seed):
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q * np.sign(np.diag(r))


# ----------------------------------------------------------------------------------------------------------
# Reference values and invariances
# ----------------------------------------------------------------------------------------------------------

def test_reference_values_of_the_public_cka_demo(demo_xy):
    X, Y = demo_xy
    assert float(linear_cka(X, Y)) == pytest.approx(0.55761, abs=1e-4)
    assert float(rbf_cka(X, Y, threshold=0.5)) == pytest.approx(0.65483, abs=1e-4)
    assert float(debiased_linear_cka(X, Y)) == pytest.approx(0.51346, abs=1e-4)


def test_torch_and_numpy_inputs_agree(demo_xy):
    X, Y = demo_xy
    Xt, Yt = torch.as_tensor(X, dtype=torch.float32), torch.as_tensor(Y, dtype=torch.float32)
    assert float(linear_cka(Xt, Yt)) == pytest.approx(0.55761, abs=1e-4)
    assert float(debiased_linear_cka(Xt, Yt)) == pytest.approx(0.51346, abs=1e-4)


@pytest.mark.parametrize("fn", [linear_cka, rbf_cka, debiased_linear_cka])
def test_cka_of_a_representation_with_itself_is_one(demo_xy, fn):
    X, _ = demo_xy
    assert float(fn(X, X)) == pytest.approx(1.0, abs=1e-10)


@pytest.mark.parametrize("fn", [linear_cka, rbf_cka, debiased_linear_cka])
def test_invariant_to_orthogonal_transform_and_isotropic_scaling(demo_xy, fn):
    X, Y = demo_xy
    reference = float(fn(X, Y))
    Q = random_orthogonal(10, seed=0)
    assert float(fn(X @ Q, Y)) == pytest.approx(reference, abs=1e-10)
    assert float(fn(X, 3.7 * Y)) == pytest.approx(reference, abs=1e-10)
    assert float(fn(0.01 * X @ Q, Y @ random_orthogonal(10, seed=1))) == pytest.approx(reference, abs=1e-10)


@pytest.mark.parametrize("fn", [linear_cka, debiased_linear_cka])
def test_not_invariant_to_a_general_invertible_linear_map(demo_xy, fn):
    X, Y = demo_xy
    # invertible (det != 0) but stretches one direction 30x: CKA must notice (CCA would not)
    A = random_orthogonal(10, seed=2) @ np.diag(np.linspace(1.0, 30.0, 10)) @ random_orthogonal(10, seed=3)
    assert abs(np.linalg.det(A)) > 1
    assert abs(float(fn(X @ A, Y)) - float(fn(X, Y))) > 0.05


# ----------------------------------------------------------------------------------------------------------
# Mini-batch CKA and the layer x layer matrix
# ----------------------------------------------------------------------------------------------------------

def test_minibatch_cka_converges_to_full_cka():
    gen = torch.Generator().manual_seed(0)
    n_batches, batch = 200, 64
    X = torch.randn(n_batches * batch, 12, generator=gen, dtype=torch.float64)
    W = torch.randn(12, 8, generator=gen, dtype=torch.float64)
    Y = torch.tanh(X @ W) + 0.5 * torch.randn(n_batches * batch, 8, generator=gen, dtype=torch.float64)
    full = float(linear_cka(X, Y))  # 12,800 examples: the full-data estimate is essentially unbiased
    acc = MiniBatchCKA()
    averaged_biased = []
    for i in range(n_batches):
        rows = slice(i * batch, (i + 1) * batch)
        acc.update(X[rows], Y[rows])
        averaged_biased.append(float(linear_cka(X[rows], Y[rows])))
    assert float(acc.compute()) == pytest.approx(full, abs=0.01)
    # the naive average of per-batch (biased) CKA is visibly off with 64-example batches
    assert abs(np.mean(averaged_biased) - full) > 2 * abs(float(acc.compute()) - full)


def test_minibatch_cka_layer_matrix_matches_scalar_runs():
    gen = torch.Generator().manual_seed(1)
    layers_a = [torch.randn(200, 5, generator=gen), torch.randn(200, 7, generator=gen)]
    layers_b = [layers_a[0] @ torch.randn(5, 4, generator=gen), torch.randn(200, 3, generator=gen)]
    matrix_acc = MiniBatchCKA()
    pair_accs = [[MiniBatchCKA() for _ in layers_b] for _ in layers_a]
    for rows in (slice(0, 100), slice(100, 200)):
        matrix_acc.update([a[rows] for a in layers_a], [b[rows] for b in layers_b])
        for i, a in enumerate(layers_a):
            for j, b in enumerate(layers_b):
                pair_accs[i][j].update(a[rows], b[rows])
    matrix = matrix_acc.compute()
    assert matrix.shape == (2, 2)
    for i in range(2):
        for j in range(2):
            assert float(matrix[i, j]) == pytest.approx(float(pair_accs[i][j].compute()), abs=1e-12)


def test_cka_matrix_entries_symmetry_and_diagonal():
    gen = torch.Generator().manual_seed(2)
    acts = [torch.randn(80, 6, generator=gen), torch.randn(80, 2, 3, 3, generator=gen),
            torch.randn(80, 4, generator=gen)]
    M = cka_matrix(acts, acts)
    assert torch.allclose(M, M.T, atol=1e-12)
    assert torch.allclose(M.diagonal(), torch.ones(3, dtype=M.dtype), atol=1e-10)
    assert float(M[0, 2]) == pytest.approx(float(linear_cka(acts[0], acts[2])), abs=1e-12)
    assert float(M[1, 0]) == pytest.approx(float(linear_cka(acts[1].reshape(80, -1), acts[0])), abs=1e-12)


def test_mismatched_examples_raise():
    with pytest.raises(ValueError, match="same examples"):
        linear_cka(np.zeros((10, 3)), np.zeros((11, 3)))
    with pytest.raises(ValueError, match="more than 3"):
        MiniBatchCKA().update(torch.randn(3, 4), torch.randn(3, 4))


# ----------------------------------------------------------------------------------------------------------
# Models: hooks, permuted copies, matching
# ----------------------------------------------------------------------------------------------------------

def mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def permuted_copy(model, perm):
    """Same function, hidden units reordered: unit i of the copy is unit perm[i] of the original."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        other[0].weight.copy_(model[0].weight[perm])
        other[0].bias.copy_(model[0].bias[perm])
        other[2].weight.copy_(model[2].weight[:, perm])
    return other


def test_collect_activations_shapes_and_cleanup():
    model = mlp(0).train()
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(50, 8), torch.zeros(50)),
                                       batch_size=16)
    acts = collect_activations(model, data, ["0", model[2]])
    assert list(acts) == ["0", "2"]
    assert acts["0"].shape == (50, 16) and acts["2"].shape == (50, 4)
    x = torch.cat([b[0] for b in data])
    assert torch.allclose(acts["2"], model(x))
    assert model.training  # mode restored
    assert all(len(m._forward_hooks) == 0 for m in model.modules())
    with pytest.raises(ValueError, match="no submodule"):
        collect_activations(model, x, ["missing"])


def test_match_units_recovers_the_permutation_of_a_permuted_network():
    model = mlp(3)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(4))
    other = permuted_copy(model, perm)
    x = torch.randn(300, 8, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(model(x), other(x), atol=1e-6)  # truly the same function
    a = collect_activations(model, x, ["0"])["0"]
    b = collect_activations(other, x, ["0"])["0"]
    permutation, correlations = match_units(a, b)
    # unit j of A reappears as the unit i of B with perm[i] = j
    expected = torch.argsort(perm).numpy()
    np.testing.assert_array_equal(permutation, expected)
    np.testing.assert_allclose(correlations, 1.0, atol=1e-9)
    # two independently initialised networks do not match perfectly
    _, unrelated = match_units(a, collect_activations(mlp(7), x, ["0"])["0"])
    assert unrelated.mean() < 0.95


def test_match_units_on_conv_channels():
    torch.manual_seed(6)
    conv = nn.Conv2d(3, 6, 3)
    perm = torch.tensor([2, 0, 5, 1, 4, 3])
    other = copy.deepcopy(conv)
    with torch.no_grad():
        other.weight.copy_(conv.weight[perm])
        other.bias.copy_(conv.bias[perm])
    x = torch.randn(20, 3, 8, 8)
    permutation, correlations = match_units(conv(x), other(x))
    np.testing.assert_array_equal(permutation, torch.argsort(perm).numpy())
    assert cross_correlation(conv(x), other(x)).shape == (6, 6)


def test_compare_models_permuted_copy_has_cka_one_and_streaming_matches_full():
    model = mlp(8)
    other = permuted_copy(model, torch.randperm(16, generator=torch.Generator().manual_seed(9)))
    x = torch.randn(256, 8, generator=torch.Generator().manual_seed(10))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=64)
    streamed = compare_models(model, other, loader, ["0", "2"], ["0", "2"], minibatch=True)
    full = compare_models(model, other, x, ["0", "2"], ["0", "2"], minibatch=False)
    # a permutation is orthogonal: CKA of matching layers is exactly 1
    assert torch.allclose(streamed.diagonal(), torch.ones(2, dtype=streamed.dtype), atol=1e-10)
    assert torch.allclose(full.diagonal(), torch.ones(2, dtype=full.dtype), atol=1e-10)
    assert float(full[0, 1]) < 1.0
    # an unrelated network (a copy of the first passes whether or not the second model is read): every entry is
    # linear CKA written out here in numpy on the layers' own outputs, ||Yc' Xc||^2 / (||Xc' Xc|| ||Yc' Yc||)
    # (Kornblith et al. 2019 eq. 5); the streamed estimate (4 batches of 64, unbiased HSIC per batch) is near it
    unrelated = mlp(7)
    full = compare_models(model, unrelated, x, ["0", "2"], ["0", "2"], minibatch=False)
    streamed = compare_models(model, unrelated, loader, ["0", "2"], ["0", "2"], minibatch=True)

    def linear_cka_np(X, Y):
        X, Y = X - X.mean(0), Y - Y.mean(0)
        return np.linalg.norm(Y.T @ X) ** 2 / (np.linalg.norm(X.T @ X) * np.linalg.norm(Y.T @ Y))

    with torch.no_grad():
        outs_a = [model[0](x).double().numpy(), model(x).double().numpy()]
        outs_b = [unrelated[0](x).double().numpy(), unrelated(x).double().numpy()]
    expected = np.array([[linear_cka_np(a, b) for b in outs_b] for a in outs_a])
    np.testing.assert_allclose(full.numpy(), expected, rtol=1e-6)
    assert (expected < 0.9).all()  # far from the permuted copy's 1
    np.testing.assert_allclose(streamed.numpy(), expected, atol=0.05)


def test_plot_cka_heatmap_writes_a_png(tmp_path):
    path = plot_cka_heatmap(torch.rand(3, 4), tmp_path / "sub" / "cka.png",
                            labels_a=["a1", "a2", "a3"], labels_b=["b1", "b2", "b3", "b4"])
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    with pytest.raises(ValueError):
        plot_cka_heatmap(np.zeros((2, 2)), tmp_path / "x.png", labels_a=["only one"])
