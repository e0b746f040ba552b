"""f-CLSWGAN (the feature-generating GZSL baseline) against planted structure: class feature means are a fixed
random linear map of the class attributes plus noise, so an unseen class's features are predictable from its
attributes; a generator conditioned on attributes must produce features the final classifier recognises."""
from __future__ import annotations

import torch

from modnet.methods.clswgan import Critic, FCLSWGAN, gradient_penalty
from modnet.methods.gzsl import gzsl_evaluate


def planted(seed: int = 0, n_classes: int = 8, n_unseen: int = 2, attr_dim: int = 6, feat_dim: int = 24,
            per_class: int = 120):
    gen = torch.Generator().manual_seed(seed)
    attributes = torch.rand(n_classes, attr_dim, generator=gen)
    mapping = torch.randn(attr_dim, feat_dim, generator=gen)
    means = attributes @ mapping
    y = torch.arange(n_classes).repeat_interleave(per_class)
    x = (means[y] + 0.15 * torch.randn(len(y), feat_dim, generator=gen)).relu()  # non-negative, as CNN features
    seen, unseen = list(range(n_classes - n_unseen)), list(range(n_classes - n_unseen, n_classes))
    test = torch.rand(len(y), generator=gen) < 0.3
    is_seen = y < n_classes - n_unseen
    train = is_seen & ~test
    return x, y, attributes, seen, unseen, train, test & is_seen, ~is_seen


def test_clswgan_recovers_unseen_classes_from_their_attributes():
    x, y, attributes, seen, unseen, train, test_seen, test_unseen = planted()
    model = FCLSWGAN(hidden=128, critic_hidden=128, lr=1e-3, epochs=40, syn_num=200, classifier_epochs=25,
                     pretrain_epochs=30, seed=0).fit(x[train], y[train], attributes, seen, unseen)
    s_seen, s_unseen = model.scores(x[test_seen]), model.scores(x[test_unseen])
    assert torch.isinf(model.scores(x[:3])).sum() == 0  # every class here is seen or unseen: all columns scored
    # unseen classes only (ZSL): chance is 1/2
    zsl = s_unseen[:, unseen].argmax(1)
    assert (torch.as_tensor(unseen)[zsl] == y[test_unseen]).float().mean() > 0.8
    # generalized (all 8 classes, uncalibrated): unseen accuracy and H well above chance (1/8)
    res = gzsl_evaluate(s_seen, y[test_seen], s_unseen, y[test_unseen], seen, unseen)
    assert res.U > 0.5 and res.H > 0.3


def test_without_the_generator_the_unseen_classes_are_not_found():
    """The control: zero generator steps leave the unseen classes to an untrained generator's features, and
    the unseen accuracy falls to about chance, so the recovery above is the generator's work."""
    x, y, attributes, seen, unseen, train, _, test_unseen = planted()
    model = FCLSWGAN(hidden=128, critic_hidden=128, lr=1e-3, epochs=0, syn_num=200, classifier_epochs=25,
                     pretrain_epochs=30, seed=0).fit(x[train], y[train], attributes, seen, unseen)
    zsl = model.scores(x[test_unseen])[:, unseen].argmax(1)
    assert (torch.as_tensor(unseen)[zsl] == y[test_unseen]).float().mean() < 0.6


def test_gradient_penalty_is_zero_for_a_unit_slope_critic():
    """WGAN-GP: a critic linear in x with a unit-norm weight has ||grad|| = 1 everywhere, so the penalty is 0;
    doubling the weight gives (2 - 1)^2 = 1."""
    critic = Critic(4, 2, hidden=3)
    with torch.no_grad():
        first, second = critic.net[0], critic.net[2]
        first.weight.zero_()
        first.weight[0, 0] = 0.6
        first.weight[0, 1] = 0.8
        first.bias.fill_(10.0)  # keeps the LeakyReLU in its linear part
        second.weight.zero_()
        second.weight[0, 0] = 1.0
    real, fake, k = torch.rand(5, 4), torch.rand(5, 4), torch.rand(5, 2)
    assert float(gradient_penalty(critic, real, fake, k)) == pytest_approx(0.0)
    with torch.no_grad():
        second.weight[0, 0] = 2.0
    assert float(gradient_penalty(critic, real, fake, k)) == pytest_approx(1.0)


def pytest_approx(v):
    import pytest

    return pytest.approx(v, abs=1e-5)


def test_its_adam_is_torchs_per_tensor_adam_to_rounding():
    """``adam`` fuses the update where torch has a kernel for the device (the CPU since torch 2.4): the same
    parameters as torch's default per-tensor Adam after many steps of a critic-shaped network, to rounding."""
    from modnet.methods.clswgan import adam

    def train(make):
        torch.manual_seed(0)
        critic = Critic(24, 6, hidden=256)
        opt = make(critic.parameters())
        gen = torch.Generator().manual_seed(1)
        for _ in range(100):
            x, a = torch.rand(32, 24, generator=gen), torch.rand(32, 6, generator=gen)
            loss = critic(x, a).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return [p.detach() for p in critic.parameters()], opt

    reference, _ = train(lambda ps: torch.optim.Adam(ps, lr=1e-3, betas=(0.5, 0.999)))
    ours, opt = train(lambda ps: adam(ps, 1e-3, (0.5, 0.999)))
    moved = max((r - p).abs().max().item() for r, p in zip(reference, ours))
    assert moved < 1e-5
    if tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 4):
        assert opt.defaults["fused"]


def test_critic_gradients_are_autograds_through_the_gradient_penalty():
    """The closed-form critic step (``critic_gradients``) against autograd's double backward of
    L_D = E[D(x~)] - E[D(x)] + lambda GP with the same interpolation weights, in float64: both LeakyReLU
    branches are hit, and the penalty's term matters (without it the weight gradients differ)."""
    from modnet.methods.clswgan import critic_gradients

    torch.manual_seed(0)
    critic = Critic(6, 3, hidden=32).double()
    gen = torch.Generator().manual_seed(1)
    real, fake = torch.rand(7, 6, generator=gen, dtype=torch.float64), torch.rand(7, 6, generator=gen, dtype=torch.float64)
    a = torch.rand(7, 3, generator=gen, dtype=torch.float64)
    z = critic.net[0](torch.cat([real, a], 1))
    assert (z > 0).any() and (z < 0).any()
    lam = 10.0
    eps = torch.rand(7, 1, generator=torch.Generator().manual_seed(2))
    loss = critic(fake, a).mean() - critic(real, a).mean() + \
        lam * gradient_penalty(critic, real, fake, a, generator=torch.Generator().manual_seed(2))
    reference = torch.autograd.grad(loss, list(critic.parameters()))
    no_penalty = torch.autograd.grad(critic(fake, a).mean() - critic(real, a).mean(), list(critic.parameters()))
    with torch.no_grad():
        critic_gradients(critic, real, fake, a, lam, eps)
    ours = [p.grad for p in critic.parameters()]
    for name, r, o in zip(("W1", "b1", "w2", "b2"), reference, ours):
        assert o.shape == r.shape and o.dtype == r.dtype, name
        assert torch.allclose(o, r, rtol=1e-9, atol=1e-12), (name, (o - r).abs().max())
    assert (ours[0] - no_penalty[0]).abs().max() > 1e-3 and (ours[2] - no_penalty[2]).abs().max() > 1e-3
