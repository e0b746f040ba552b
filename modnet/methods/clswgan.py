"""f-CLSWGAN: feature-generating networks for (generalized) zero-shot learning (Xian, Lorenz, Schiele & Akata,
CVPR 2018). A conditional Wasserstein GAN learns to generate image features of a class from its knowledge
vector (attributes); a softmax classifier is then trained on the real seen-class features plus generated
features of the unseen classes, and scores every class. GZSL is uncalibrated: the classifier sees both.

Generator G(z, a): [z, a] -> Linear(ngh) -> LeakyReLU(0.2) -> Linear(d) -> ReLU, with z ~ N(0, I) of the
knowledge's size. Critic D(x, a): [x, a] -> Linear(ndh) -> LeakyReLU(0.2) -> Linear(1).

  L_D = E[D(x~, a)] - E[D(x, a)] + lambda E[(||grad_x^ D(x^, a)||_2 - 1)^2],  x^ = eps x + (1 - eps) x~
  L_G = -E[D(x~, a)] - beta E[log P(y | x~; theta)]

(WGAN-GP, Gulrajani et al. 2017; the second term of L_G is the classification loss of a softmax classifier
theta pre-trained on the real seen features and kept fixed). ``critic_iter`` critic steps per generator step,
Adam (lr, beta1 = 0.5, beta2 = 0.999) for both. The critic's step computes grad L_D in closed form
(``critic_gradients``: the penalty's double backward written out for this two-layer critic, one product for
its three row blocks), the generator's through autograd. As the official code: features min-max scaled to [0, 1] per
dimension with the training features' range (the generator's ReLU output lives there), knowledge rows as
given (xlsa17's are L2-normalised).

Paper defaults (the authors' scripts): ngh = ndh = 4096, lambda = 10, critic_iter = 5, batch 64,
beta (cls_weight) = 0.01, Adam lr 1e-5 (AWA) / 1e-4 (CUB), 30 (AWA) / 56 (CUB) epochs, 1800 (AWA) / 300 (CUB)
generated features per unseen class; final classifier Adam lr 1e-3, beta1 0.5, 25 epochs; pre-trained
classifier 100 epochs.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class FeatureGenerator(nn.Module):
    """G(z, a) -> features (ReLU output, as image features after a ReLU)."""

    def __init__(self, knowledge_dim: int, noise_dim: int, feature_dim: int, hidden: int = 4096):
        super().__init__()
        self.noise_dim = noise_dim
        self.net = nn.Sequential(nn.Linear(knowledge_dim + noise_dim, hidden), nn.LeakyReLU(0.2),
                                 nn.Linear(hidden, feature_dim), nn.ReLU())

    def forward(self, knowledge: Tensor, noise: Tensor | None = None, generator: torch.Generator | None = None):
        if noise is None:
            noise = torch.randn(knowledge.shape[0], self.noise_dim, device=knowledge.device, generator=generator)
        return self.net(torch.cat([noise, knowledge], dim=1))


class Critic(nn.Module):
    """D(x, a) -> a real score (no sigmoid: the Wasserstein critic)."""

    def __init__(self, feature_dim: int, knowledge_dim: int, hidden: int = 4096):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(feature_dim + knowledge_dim, hidden), nn.LeakyReLU(0.2),
                                 nn.Linear(hidden, 1))

    def forward(self, x: Tensor, knowledge: Tensor) -> Tensor:
        return self.net(torch.cat([x, knowledge], dim=1)).squeeze(1)


def gradient_penalty(critic: Critic, real: Tensor, fake: Tensor, knowledge: Tensor,
                     generator: torch.Generator | None = None) -> Tensor:
    """E[(||grad_x^ D(x^, a)||_2 - 1)^2] on random points x^ between real and generated features."""
    eps = torch.rand(real.shape[0], 1, device=real.device, generator=generator)
    mixed = (eps * real + (1 - eps) * fake).requires_grad_(True)
    grad, = torch.autograd.grad(critic(mixed, knowledge).sum(), mixed, create_graph=True)
    return ((grad.norm(2, dim=1) - 1) ** 2).mean()


def critic_gradients(critic: Critic, real: Tensor, fake: Tensor, knowledge: Tensor, gp_lambda: float,
                     eps: Tensor) -> None:
    """Set ``.grad`` of the critic's parameters to those of its loss L_D (module doc; ``eps``: B x 1, the
    interpolation weights of x^), in closed form: the same values as autograd's double backward through
    ``gradient_penalty`` (tests check it), at about half the time of a critic step on the CPU.

    Write z = W_1 [x; a] + b_1, m = LeakyReLU'(z) (1 where z > 0, else 0.2: constant almost everywhere),
    D = w_2 . (m * z) + b_2, and u = w_2 * m(x^). Then grad_x^ D = W_x' u with W_x the columns of W_1 that
    read x, and with g = W_x' u, r = lambda 2 (||g|| - 1) g / (B ||g||) (0 where g = 0, as torch's norm):

      dL/dW_1 = sum_rows G' [X; R],  G = [m * w_2 / B (x~ rows); -m * w_2 / B (x rows); u (x^ rows)],
                                      X the rows' [x; a], R = [r, 0] (the penalty reads only W_x)
      dL/dw_2 = sum_rows of [(m z) / B; -(m z) / B; m * (r W_x')],  dL/db_1 = sum over the x~ and x rows of G,
      dL/db_2 = 1 - 1 (the two means).

    The three row blocks share one forward product and one weight-gradient product; autograd runs three
    forwards, a double backward whose weight gradients come in two layouts, and sums them (two ~4 MB adds at
    the paper's width 4096)."""
    lin1, act, lin2 = critic.net
    slope = act.negative_slope
    b, d = real.shape
    mixed = eps * real + (1 - eps) * fake
    x = torch.cat([torch.cat([fake, real, mixed]), knowledge.repeat(3, 1)], dim=1)  # 3B x (d + A)
    z = F.linear(x, lin1.weight, lin1.bias)                                            # 3B x H
    # m * w_2 and m * (r W_x') in one op each: LeakyReLU's backward of a gradient, read at z
    u = torch.ops.aten.leaky_relu_backward(lin2.weight.expand_as(z), z, slope, False)  # dD/dz per row
    w_x = lin1.weight[:, :d]
    g = u[2 * b:] @ w_x                                                                # B x d: grad_x^ D
    norm = g.norm(dim=1, keepdim=True)
    r = torch.where(norm > 0, (2 * gp_lambda / b) * (norm - 1) / norm, 0.0) * g       # dL/dg
    sign = torch.cat([z.new_full((b, 1), 1.0 / b), z.new_full((b, 1), -1.0 / b)])
    lin2.weight.grad = sign.t() @ F.leaky_relu(z[:2 * b], slope) + \
        torch.ops.aten.leaky_relu_backward(r @ w_x.t(), z[2 * b:], slope, False).sum(0, keepdim=True)
    lin2.bias.grad = sign.sum(0)
    u[:2 * b] *= sign                                                                  # G, in place
    x[2 * b:, :d] = r                                                                  # [X; R], in place
    x[2 * b:, d:] = 0
    lin1.weight.grad = u.t() @ x
    lin1.bias.grad = u[:2 * b].sum(0)


def adam(params, lr: float, betas: tuple[float, float]) -> torch.optim.Adam:
    """Adam, its update fused into one kernel per step where torch has one for the parameters' device (the CPU
    since torch 2.4, CUDA): the same update as the per-tensor loop to rounding (1e-8 after 50 steps of the
    4096-wide critic), ~5x faster on the CPU, where that loop was a fifth of f-CLSWGAN's time (digits, seed 0:
    `modnet gzsl` 445 s -> 392 s; the GAN's results move as any rounding change moves them, H .371 -> .399)."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, betas=betas, fused=True)
    except (RuntimeError, ValueError):  # no fused kernel for this device in this torch
        return torch.optim.Adam(params, lr=lr, betas=betas)


def _train_softmax(features: Tensor, labels: Tensor, n_classes: int, lr: float, epochs: int, batch_size: int,
                   generator: torch.Generator) -> nn.Linear:
    """A linear softmax classifier (the paper's), Adam(lr, betas=(0.5, 0.999)), shuffled mini-batches."""
    clf = nn.Linear(features.shape[1], n_classes).to(features.device)
    opt = adam(clf.parameters(), lr, (0.5, 0.999))
    n = features.shape[0]
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator).to(features.device)
        for i in range(0, n, batch_size):
            idx = order[i:i + batch_size]
            loss = F.cross_entropy(clf(features[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return clf


class FCLSWGAN:
    """f-CLSWGAN (see the module doc). ``fit(features, labels, knowledge, seen, unseen)`` on the seen classes'
    training features (labels are dataset class ids, knowledge is [C, A] over every class); ``scores(x)``
    returns [n, C] logits of the final softmax classifier (column c = class c; classes in neither list get
    -inf)."""

    def __init__(self, *, hidden: int = 4096, critic_hidden: int = 4096, lr: float = 1e-4, beta1: float = 0.5,
                 gp_lambda: float = 10.0, cls_weight: float = 0.01, critic_iter: int = 5, batch_size: int = 64,
                 epochs: int = 30, syn_num: int = 300, classifier_lr: float = 1e-3, classifier_epochs: int = 25,
                 pretrain_epochs: int = 100, seed: int = 0):
        if min(hidden, critic_hidden, critic_iter, batch_size, syn_num, classifier_epochs) < 1 or epochs < 0:
            raise ValueError("clswgan sizes, iterations and counts must be positive")
        self.hidden, self.critic_hidden, self.lr, self.beta1 = hidden, critic_hidden, lr, beta1
        self.gp_lambda, self.cls_weight, self.critic_iter, self.batch_size = gp_lambda, cls_weight, critic_iter, batch_size
        self.epochs, self.syn_num = epochs, syn_num
        self.classifier_lr, self.classifier_epochs, self.pretrain_epochs = classifier_lr, classifier_epochs, pretrain_epochs
        self.seed = seed

    def _scale(self, x: Tensor) -> Tensor:
        return ((x - self._low) / self._range).clamp_(min=0.0)

    def fit(self, features: Tensor, labels: Tensor, knowledge: Tensor, seen_classes: Sequence[int],
            unseen_classes: Sequence[int]) -> "FCLSWGAN":
        device = features.device
        gen = torch.Generator().manual_seed(self.seed)
        torch.manual_seed(self.seed)  # the layers' initialisation
        seen = torch.as_tensor(list(seen_classes), dtype=torch.long, device=device)
        unseen = torch.as_tensor(list(unseen_classes), dtype=torch.long, device=device)
        knowledge = knowledge.to(device=device, dtype=torch.float32)
        labels = labels.to(device)
        self._low = features.min(dim=0).values
        self._range = (features.max(dim=0).values - self._low).clamp_min(1e-8)
        x = self._scale(features.float())
        n_classes, d, a_dim = knowledge.shape[0], x.shape[1], knowledge.shape[1]
        # seen-class softmax on real features, fixed: the classification loss of the generator
        seen_index = torch.full((n_classes,), -1, dtype=torch.long, device=device)
        seen_index[seen] = torch.arange(len(seen), device=device)
        pretrained = _train_softmax(x, seen_index[labels], len(seen), self.classifier_lr, self.pretrain_epochs,
                                    self.batch_size, gen).requires_grad_(False)
        self.generator = FeatureGenerator(a_dim, a_dim, d, self.hidden).to(device)
        critic = Critic(d, a_dim, self.critic_hidden).to(device)
        opt_g = adam(self.generator.parameters(), self.lr, (self.beta1, 0.999))
        opt_d = adam(critic.parameters(), self.lr, (self.beta1, 0.999))
        n = x.shape[0]
        steps = max(1, n // self.batch_size)

        def batch():
            idx = torch.randint(n, (self.batch_size,), generator=gen).to(device)
            return x[idx], knowledge[labels[idx]], seen_index[labels[idx]]

        # the critic's gradients are set in closed form (critic_gradients); autograd only carries L_G through it
        critic.requires_grad_(False)
        for _ in range(self.epochs):
            for _ in range(steps):
                for _ in range(self.critic_iter):
                    real, a, _ = batch()
                    with torch.no_grad():
                        fake = self.generator(a, generator=None)
                        eps = torch.rand(real.shape[0], 1, device=device)  # gradient_penalty's draw
                        critic_gradients(critic, real, fake, a, self.gp_lambda, eps)
                    opt_d.step()
                _, a, y = batch()
                fake = self.generator(a)
                loss_g = -critic(fake, a).mean() + self.cls_weight * F.cross_entropy(pretrained(fake), y)
                opt_g.zero_grad(set_to_none=True)
                loss_g.backward()
                opt_g.step()
        # final classifier: real seen features + syn_num generated features per unseen class
        with torch.no_grad():
            a = knowledge[unseen].repeat_interleave(self.syn_num, dim=0)
            synthetic = self.generator(a)
        y_syn = unseen.repeat_interleave(self.syn_num)
        self.classes = torch.cat([seen, unseen])
        column = torch.full((n_classes,), -1, dtype=torch.long, device=device)
        column[self.classes] = torch.arange(len(self.classes), device=device)
        self.classifier = _train_softmax(torch.cat([x, synthetic]), column[torch.cat([labels, y_syn])],
                                         len(self.classes), self.classifier_lr, self.classifier_epochs,
                                         self.batch_size, gen)
        self.n_classes = n_classes
        return self

    @torch.no_grad()
    def scores(self, features: Tensor) -> Tensor:
        logits = self.classifier(self._scale(features.float()))
        out = logits.new_full((features.shape[0], self.n_classes), float("-inf"))
        out[:, self.classes] = logits
        return out
