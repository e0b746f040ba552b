"""Synaptic Intelligence (Zenke, Poole & Ganguli, ICML 2017), our plugin.

Avalanche 0.6.0's ``SynapticIntelligencePlugin`` leaves its importances at zero on these networks (its
accuracy matrix is bit-identical to naive's at si_lambda 1 and 10000), so ``si`` uses this one.

For every parameter θ_k, while training task μ (step n, update Δθ_k(n) = θ_k(n+1) - θ_k(n)):

    path integral       ω_k^μ += -g_k(n) Δθ_k(n),     g_k = ∂L_μ/∂θ_k, the task loss's gradient only
    after the task      Ω_k   += ω_k^μ / ((Δ_k^μ)² + ξ),   Δ_k^μ = θ_k(end of μ) - θ_k(start of μ)
                        θ̃_k   = θ_k(end of μ),   ω_k^μ = 0
    surrogate loss      L̃_μ   = L_μ + c Σ_k Ω_k (θ_k - θ̃_k)²

(Zenke et al. eqs. 3-5; ξ the damping, c the strength ``si_lambda``). The surrogate's gradient is
2 c Ω_k (θ_k - θ̃_k), in closed form: the backward runs on the task loss alone (the surrogate's value is added
to ``strategy.loss`` as a constant, for what reads the loss), g_k is the gradient it leaves, and the
surrogate's gradient is added to it after the backward (every tracked parameter gets one, as when the
surrogate was in the graph). Until stop 43 the surrogate went through autograd and g_k was read back as
∂L̃/∂θ_k - 2 c Ω_k (θ_k - θ̃_k): the same gradients to float rounding, 2.7x a naive step on the bench's MLP
where one pass of foreach ops per hook costs less. A parameter that appears later (a new head) or changes
shape starts with Ω = 0 and θ̃ = its value then.
"""
from __future__ import annotations

import torch
from avalanche.core import SupervisedPlugin
from torch import Tensor, nn

from strategies.plugins.quadratic import add_to_gradients, weighted_distance


class SynapticIntelligence(SupervisedPlugin):
    """Adds c Σ Ω (θ - θ̃)² to ``strategy.loss`` (like Avalanche's ``EWCPlugin``); owns ω, Ω and θ̃.

    ``importance[name]`` is Ω, ``anchor[name]`` θ̃ (both per parameter name, kept between experiences),
    ``path_integral[name]`` the running ω of the experience being trained."""

    def __init__(self, si_lambda: float = 1.0, xi: float = 0.1):
        super().__init__()
        if si_lambda < 0 or xi <= 0:
            raise ValueError(f"SI needs si_lambda >= 0 and xi > 0, got si_lambda={si_lambda}, xi={xi}")
        self.c, self.xi = float(si_lambda), float(xi)
        self.importance: dict[str, Tensor] = {}
        self.anchor: dict[str, Tensor] = {}
        self.path_integral: dict[str, Tensor] = {}
        self._start: dict[str, Tensor] = {}  # θ at the start of the experience
        self._before_step: dict[str, Tensor] = {}  # θ(n)
        self._task_grad: dict[str, Tensor] = {}  # g(n)
        self._surrogate_grad: tuple[list, list] | None = None  # (parameters, Ω (θ - θ̃)) of this step

    @staticmethod
    def _params(model: nn.Module) -> dict[str, nn.Parameter]:
        return {n: p for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def before_training_exp(self, strategy, **kwargs):
        for name, p in self._params(strategy.model).items():
            if name not in self.importance or self.importance[name].shape != p.shape:
                self.importance[name] = torch.zeros_like(p)
                self.anchor[name] = p.detach().clone()
            self._start[name] = p.detach().clone()
            self.path_integral[name] = torch.zeros_like(p)

    def _tracked(self, model: nn.Module) -> tuple[list[str], list[nn.Parameter]]:
        """The parameters with an importance of their shape (the surrogate's terms)."""
        names, params = [], []
        for n, p in self._params(model).items():
            if n in self.importance and self.importance[n].shape == p.shape:
                names.append(n)
                params.append(p)
        return names, params

    @torch.no_grad()
    def before_training_iteration(self, strategy, **kwargs):
        self._before_step = {n: p.detach().clone() for n, p in self._params(strategy.model).items()}

    def before_backward(self, strategy, **kwargs):
        """c Σ_k Ω_k (θ_k - θ̃_k)² added to the loss by value (from the first experience on: Ω is 0 until a
        consolidation); its gradient waits for after_backward."""
        self._surrogate_grad = None
        names, params = self._tracked(strategy.model)
        if not params or self.c == 0:
            return
        value, weighted = weighted_distance(params, [self.anchor[n] for n in names],
                                            [self.importance[n] for n in names])
        self._surrogate_grad = (params, weighted)
        strategy.loss = strategy.loss + self.c * value

    @torch.no_grad()
    def after_backward(self, strategy, **kwargs):
        names, params = self._tracked(strategy.model)
        # g: the task loss's gradient, which the backward left (a copy: the surrogate's is added in place)
        self._task_grad = {n: p.grad.clone() for n, p in zip(names, params) if p.grad is not None}
        if self._surrogate_grad is not None:
            add_to_gradients(*self._surrogate_grad, alpha=2 * self.c)  # + 2 c Ω (θ - θ̃)
            self._surrogate_grad = None

    @torch.no_grad()
    def after_update(self, strategy, **kwargs):
        params = self._params(strategy.model)
        names = [n for n, g in self._task_grad.items() if n in params and n in self._before_step
                 and params[n].shape == g.shape]
        if not names:
            return
        steps = torch._foreach_sub([params[n].detach() for n in names], [self._before_step[n] for n in names])
        torch._foreach_mul_(steps, [self._task_grad[n] for n in names])
        torch._foreach_sub_([self.path_integral[n] for n in names], steps)  # ω += -g Δθ

    @torch.no_grad()
    def after_training_exp(self, strategy, **kwargs):
        for name, p in self._params(strategy.model).items():
            if name not in self._start or self._start[name].shape != p.shape:
                continue
            delta = p - self._start[name]
            self.importance[name] += self.path_integral[name] / (delta ** 2 + self.xi)
            self.anchor[name] = p.detach().clone()
            self.path_integral[name].zero_()
        self._before_step, self._task_grad = {}, {}

    def stored_tensors(self) -> list[Tensor]:
        """What SI keeps between experiences: Ω and θ̃ per parameter."""
        return [*self.importance.values(), *self.anchor.values()]
