"""Neuron semantic embedding and static knowledge distillation (seed 001), checked against hand-computed values,
planted structure and independent numpy references."""

import copy
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from modnet.methods.embedding import (
    ActivationRecorder,
    NeuronEmbedding,
    NeuronEmbeddingPlugin,
    additive_relation,
    cosine_matrix,
    embedding_loss,
    fit_neuron_embedding,
    nearest_units,
    similarity_cross_entropy,
    skd_loss,
)
from strategies.plugins.distill import KDPlugin, SKDPlugin, SPKDPlugin, kd_loss, sp_loss


def np_cos(rows):
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    unit = rows / np.where(norms == 0, 1.0, norms)
    return unit @ unit.T


def np_softmax(logits):
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def digits():
    images, labels = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(images / 16.0, labels, test_size=0.4, random_state=0, stratify=labels)
    as_t = lambda a, dt: torch.tensor(a, dtype=dt)  # noqa: E731
    return as_t(x_tr, torch.float32), as_t(x_te, torch.float32), as_t(y_tr, torch.long), as_t(y_te, torch.long)


@pytest.fixture(scope="module")
def trained_mlp(digits):
    x_tr, x_te, y_tr, y_te = digits
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(25):
        for idx in torch.randperm(len(x_tr)).split(64):
            optimizer.zero_grad()
            F.cross_entropy(model(x_tr[idx]), y_tr[idx]).backward()
            optimizer.step()
    assert (model(x_te).argmax(1) == y_te).float().mean() > 0.9
    return model


# ------------------------------------------------------------------------------------------- the loss (eq. 1)


def test_loss_is_minimal_at_target_entropy_when_vectors_reproduce_activation_cosines():
    # 4 units x 3 samples; cosines by hand: u0.u1 = 0, u0.u2 = u1.u2 = 1/sqrt(2), u3 orthogonal to all.
    profiles = np.array([[1.0, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 2]])
    r = 1 / np.sqrt(2)
    hand_cos = np.array([[1, 0, r, 0], [0, 1, r, 0], [r, r, 1, 0], [0, 0, 0, 1]])
    p = np_softmax(hand_cos)
    target_entropy = -(p * np.log(p)).sum(axis=1).mean()

    acts = torch.tensor(profiles.T, dtype=torch.float64)  # (samples, units), as a layer outputs them
    S_exact = torch.tensor(profiles, dtype=torch.float64, requires_grad=True)  # cos(S, S) = cos(A, A)
    loss = embedding_loss(acts, S_exact)
    assert loss.item() == pytest.approx(target_entropy, abs=1e-12)
    loss.backward()
    assert S_exact.grad.abs().max() < 1e-12  # a stationary point

    generator = torch.Generator().manual_seed(0)
    for _ in range(5):  # any other geometry costs more (Gibbs' inequality)
        S_other = torch.randn(4, 16, generator=generator, dtype=torch.float64)
        assert embedding_loss(acts, S_other).item() > target_entropy + 1e-4

    # Gradient descent from random vectors finds that minimum.
    S = torch.randn(4, 16, generator=generator, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([S], lr=0.05)
    for _ in range(600):
        optimizer.zero_grad()
        embedding_loss(acts, S).backward()
        optimizer.step()
    assert embedding_loss(acts, S).item() == pytest.approx(target_entropy, abs=1e-5)
    np.testing.assert_allclose(np_cos(S.detach().numpy()), hand_cos, atol=0.02)


def test_stacked_similarity_loss_is_the_sum_of_the_pairs_losses():
    torch.manual_seed(0)
    target, pred = torch.randn(3, 6, 6), torch.randn(3, 6, 6)
    each = sum(similarity_cross_entropy(t, q, temperature=0.5) for t, q in zip(target, pred))
    assert float(similarity_cross_entropy(target, pred, temperature=0.5)) == pytest.approx(float(each), rel=1e-6)
    probs = F.softmax(target / 0.5, dim=-1)
    assert float(similarity_cross_entropy(probs, pred, 0.5, target_is_softmax=True)) == pytest.approx(float(each),
                                                                                                    rel=1e-6)
    assert torch.allclose(cosine_matrix(pred), torch.stack([cosine_matrix(q) for q in pred]))


def test_conv_channels_are_reduced_by_spatial_mean():
    # Channel 1 is channel 0 spatially shuffled: same spatial mean, so the two units count as identical.
    torch.manual_seed(0)
    maps = torch.rand(8, 3, 4, 4)
    maps[:, 1] = maps[:, 0].flatten(1)[:, torch.randperm(16)].view(8, 4, 4)
    means = maps.mean(dim=(2, 3))  # (samples, channels)
    S = torch.randn(3, 16)
    assert embedding_loss(maps, S).item() == pytest.approx(embedding_loss(means, S).item(), abs=1e-6)


# ------------------------------------------------------------------------------------------- fitting


def test_fitted_similarities_match_activation_similarities_on_held_out_data(digits, trained_mlp):
    x_tr, x_te, _, _ = digits
    loader = torch.utils.data.DataLoader(x_tr, batch_size=64, shuffle=True)
    embedding = fit_neuron_embedding(trained_mlp, ["1"], loader, dim=16, epochs=50, lr=0.05, seed=0)

    # Held-out activations computed directly with numpy from the weights, not through the recorder.
    w, b = trained_mlp[0].weight.detach().numpy(), trained_mlp[0].bias.detach().numpy()
    held_out_profiles = np.maximum(x_te.numpy() @ w.T + b, 0).T  # units x samples
    cos_acts = np_cos(held_out_profiles)
    cos_vectors = np_cos(embedding["1"].detach().numpy())
    off_diagonal = ~np.eye(32, dtype=bool)
    rho = spearmanr(cos_acts[off_diagonal], cos_vectors[off_diagonal]).statistic
    assert rho >= 0.8, f"Spearman {rho:.3f} < 0.8"


def test_planted_duplicate_units_are_each_others_nearest_neighbours():
    torch.manual_seed(1)
    layer = nn.Linear(12, 10)
    with torch.no_grad():
        layer.weight[1] = layer.weight[0]
        layer.bias[1] = layer.bias[0]
        layer.weight[5] = layer.weight[4]
        layer.bias[5] = layer.bias[4]
    model = nn.Sequential(layer, nn.ReLU())
    data = torch.randn(512, 12)
    embedding = fit_neuron_embedding(model, ["1"], data.split(64), epochs=60, lr=0.05)
    S = embedding["1"]
    for unit, twin in [(0, 1), (1, 0), (4, 5), (5, 4)]:
        indices, similarities = nearest_units(S, unit, k=3)
        assert indices[0].item() == twin
        assert similarities[0] > 0.95
        assert unit not in indices.tolist()


def test_planted_sum_unit_is_recovered_by_the_additive_relation():
    # Linear units: u0 = x0, u1 = x1, u2 = x0 + x1, u3..u7 = x2..x6. Only u2 points along S_0 + S_1.
    weight = torch.zeros(8, 8)
    weight[0, 0] = weight[1, 1] = weight[2, 0] = weight[2, 1] = 1.0
    for unit in range(3, 8):
        weight[unit, unit - 1] = 1.0
    layer = nn.Linear(8, 8, bias=False)
    layer.weight.data.copy_(weight)
    model = nn.Sequential(layer)
    embedding = fit_neuron_embedding(model, ["0"], torch.randn(1024, 8).split(128), epochs=150, lr=0.05)
    indices, _ = additive_relation(embedding["0"], 0, 1, k=2)
    assert indices[0].item() == 2
    assert not {0, 1} & set(indices.tolist())


# ------------------------------------------------------------------------------------------- SKD (eq. 2-3)


def fake_strategy(model, x, y):
    """The attributes Avalanche's SupervisedTemplate exposes to a plugin in before_backward."""
    strategy = SimpleNamespace(model=model, mb_x=x, mb_y=y, device=torch.device("cpu"))
    strategy.mb_output = model(x)
    strategy.loss = F.cross_entropy(strategy.mb_output, y)
    return strategy


def test_skd_plugin_adds_the_eq2_penalty_with_gradient_to_student_only(digits):
    x_tr, _, y_tr, _ = digits
    x, y = x_tr[:64], y_tr[:64]
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    teacher_S = torch.randn(32, 16, requires_grad=True)  # would collect a gradient if one reached it
    plugin = SKDPlugin({"teacher.relu": teacher_S}, layers={"1": "teacher.relu"}, beta=0.5)

    strategy = SimpleNamespace(model=student, device=torch.device("cpu"))
    plugin.before_training_exp(strategy)
    strategy = fake_strategy(student, x, y)
    task_loss = strategy.loss.detach().clone()
    plugin.before_backward(strategy)

    # Independent numpy reference of eq. 2: teacher cos(S,S) rows as target, student activation cosines predicted.
    profiles = np.maximum(x.numpy() @ student[0].weight.detach().numpy().T + student[0].bias.detach().numpy(), 0).T
    target = np_softmax(np_cos(teacher_S.detach().numpy()))
    log_pred = np.log(np_softmax(np_cos(profiles)))
    expected = -(target * log_pred).sum(axis=1).mean()
    assert np.isfinite(plugin.last_penalty.item())
    assert plugin.last_penalty.item() == pytest.approx(expected, rel=1e-5)
    assert (strategy.loss - task_loss).item() == pytest.approx(0.5 * expected, rel=1e-5)

    strategy.loss.backward()
    assert teacher_S.grad is None
    # Gradient reaches the first layer (the distilled one) through the penalty, not only through the task loss.
    grad_with_skd = student[0].weight.grad.clone()
    student.zero_grad()
    F.cross_entropy(student(x), y).backward()
    assert torch.isfinite(grad_with_skd).all()
    assert (grad_with_skd - student[0].weight.grad).abs().max() > 1e-6
    plugin.after_training_exp(strategy)


def test_skd_refuses_layers_of_different_width():
    acts = {"fc": torch.randn(16, 8)}
    with pytest.raises(ValueError, match="8 units.*12 rows"):
        skd_loss(acts, {"fc": torch.randn(12, 16)})
    with pytest.raises(ValueError, match="not submodules"):
        ActivationRecorder(nn.Sequential(nn.Linear(2, 2)), ["missing"])


# ------------------------------------------------------------------------------------------- baselines


def test_kd_with_identical_teacher_gives_zero_gradient_and_matches_reference():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 5))
    x, y = torch.randn(32, 10), torch.randint(0, 5, (32,))
    plugin = KDPlugin(copy.deepcopy(student), temperature=4.0, alpha=0.9)
    plugin.before_training_exp(SimpleNamespace(model=student, device=torch.device("cpu")))
    strategy = fake_strategy(student, x, y)
    strategy.loss = torch.zeros(())  # keep only the KD term
    plugin.before_backward(strategy)
    strategy.loss.backward()
    assert plugin.last_penalty.abs().item() < 1e-6
    assert max(p.grad.abs().max().item() for p in student.parameters()) < 1e-6

    # A different teacher: T^2 * KL(p_T || p_S) against numpy, and a non-zero gradient.
    teacher_logits, student_logits = torch.randn(32, 5), torch.randn(32, 5, requires_grad=True)
    p_t, p_s = np_softmax(teacher_logits.numpy() / 4), np_softmax(student_logits.detach().numpy() / 4)
    expected = 16 * (p_t * (np.log(p_t) - np.log(p_s))).sum(axis=1).mean()
    value = kd_loss(student_logits, teacher_logits, 4.0)
    assert value.item() == pytest.approx(expected, rel=1e-5)
    value.backward()
    assert student_logits.grad.abs().max() > 1e-4


def test_sp_loss_vanishes_for_same_similarities_and_ignores_activation_scale():
    torch.manual_seed(0)
    feats = torch.rand(16, 6, 3, 3)
    assert sp_loss([feats], [feats.clone()]).item() == pytest.approx(0.0, abs=1e-12)
    # G rows are L2-normalised (Tung & Mori eq. 2), so scaling the student leaves the loss unchanged,
    # and widths may differ between the paired layers.
    teacher = torch.rand(16, 40)
    assert sp_loss([3.0 * feats], [teacher]).item() == pytest.approx(sp_loss([feats], [teacher]).item(), rel=1e-5)
    # by hand: student I (its G is I), teacher rows both [1, 0] (G rows [1, 1] / sqrt 2):
    # ||G_T - G_S||^2 = 2 (1/sqrt2 - 1)^2 + 2 (1/2) = 4 - 2 sqrt2, over b^2 = 4: (2 - sqrt2) / 2
    student = torch.eye(2, requires_grad=True)
    loss = sp_loss([student], [torch.tensor([[1.0, 0.0], [1.0, 0.0]])])
    assert loss.item() == pytest.approx((2 - 2 ** 0.5) / 2, rel=1e-6)
    loss.backward()
    assert student.grad.abs().sum() > 0  # the student is pulled towards the teacher's similarities
    with pytest.raises(ValueError, match="no submodules"):
        SPKDPlugin(nn.Sequential(nn.Linear(2, 2)), {"0": "nope"})


# ------------------------------------------------------------------------------------------- inside Avalanche


def test_embedding_plugin_trains_vectors_without_touching_the_model_and_skd_runs_in_naive(digits):
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
    from avalanche.benchmarks.utils import as_classification_dataset
    from avalanche.training.plugins import EvaluationPlugin
    from avalanche.training.supervised import Naive

    x_tr, _, y_tr, _ = digits
    dataset = torch.utils.data.TensorDataset(x_tr[:512], y_tr[:512])
    dataset.targets = y_tr[:512].tolist()
    experience = benchmark_from_datasets(train=[as_classification_dataset(dataset)]).train_stream[0]

    def train(plugins):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, 10))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "No loggers specified"
            strategy = Naive(model=model, optimizer=optimizer, train_mb_size=64, train_epochs=3,
                             evaluator=EvaluationPlugin(loggers=[]), plugins=plugins, device="cpu")
        strategy.train(experience, num_workers=0)
        return model

    plain = train([])
    plugin = NeuronEmbeddingPlugin(["1"], dim=16, lr=0.05, seed=3)
    with_plugin = train([plugin])
    for a, b in zip(plain.parameters(), with_plugin.parameters()):
        assert torch.equal(a, b)  # the plugin never touches the model's gradients or weights
    assert plugin._recorder is None  # hooks removed after the experience

    # The online vectors fit the final network's activation geometry better than their initialisation did.
    with torch.no_grad():
        acts = {"1": with_plugin[1](with_plugin[0](x_tr[:512]))}
    fresh = NeuronEmbedding({"1": 24}, 16, generator=torch.Generator().manual_seed(3))
    target_entropy = embedding_loss(acts, {"1": with_plugin[0](x_tr[:512]).clamp_min(0).T.detach()})
    excess_fitted = plugin.embedding.loss(acts) - target_entropy
    excess_fresh = fresh.loss(acts) - target_entropy
    assert excess_fitted < 0.5 * excess_fresh

    # SKD inside a real Naive run: a finite penalty is added at every step.
    skd = SKDPlugin(plugin.embedding, layers=["1"], beta=0.5)
    train([skd])
    assert torch.isfinite(skd.last_penalty) and skd.last_penalty > 0
