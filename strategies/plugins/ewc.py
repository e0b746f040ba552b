"""``StableEWCPlugin``: Avalanche's ``EWCPlugin`` with λ kept inside plain SGD's stability bound.

Avalanche's penalty is λ Σ_e Σ_i F_i^e (θ_i - θ*_i^e)²: its curvature along θ_i is 2 λ Σ_e F_i^e, so an SGD
step of size lr on it alone contracts only while lr · 2 λ max_i Σ_e F_i^e < 2. Past that the penalised
parameters oscillate with growing amplitude and the loss is NaN within the next experience (Split-MNIST-1D
task-incremental, λ 1000, lr 0.05: the shared layers' Σ F reaches ~0.05 by the fourth experience, lr 2 λ F ≈ 5;
Split-Digits class-incremental: the single head's bias, F ≈ 0.2 after one experience). A λ that large cannot be
trained with plain SGD at all, so after each experience the penalty's weight becomes

    λ_eff = min(λ, margin / (2 lr · max_i Σ_e F_i)),   i.e. lr · 2 λ_eff max F <= margin

(online mode: the decayed importance Avalanche keeps). ``margin`` < 2 leaves room for the task loss's own
curvature (default 1). The requested λ is used wherever it is stable; ``lambda_history`` records λ_eff per experience.

The Fisher pass after each experience (Avalanche's ``compute_importances``: the experience in order, a backward
per mini-batch, F += grad²) reads a tensor-backed experience in slices of its tensors when the strategy trains on
them (``train.tensor_batches``, ``scenarios.tensors.dataset_batches``), where Avalanche's loader
fetches and collates every sample (as long as a training epoch on a small network): the same batches, the same
random draw, the same importances.

The penalty's gradient is written out, 2 λ Σ_e F^e (θ - θ*^e): ``before_backward`` adds the penalty's value to
``strategy.loss`` (a constant to autograd) and keeps Σ_e F^e (θ - θ*^e), ``after_backward`` adds it to every
penalised parameter's gradient (one that the task loss left without one gets one, as when the penalty was in the
graph); foreach ops, a few per experience. Avalanche's builds the penalty in autograd, five ops per parameter and
experience each way: at the second task of the bench's MLP 3.0x a naive step. The same parameters, importances,
new-parameter and grown-shape rules (``ParamData.expand``) as Avalanche's; the gradient to float rounding.
"""
from __future__ import annotations

import torch
from avalanche.models import avalanche_forward
from avalanche.training.plugins import EWCPlugin
from avalanche.training.utils import zerolike_params_dict

from strategies.plugins.quadratic import add_to_gradients, weighted_distance


class StableEWCPlugin(EWCPlugin):
    def __init__(self, ewc_lambda: float, mode: str = "separate", decay_factor: float | None = None,
                 margin: float | None = 1.0):
        super().__init__(ewc_lambda, mode=mode, decay_factor=decay_factor)
        self.requested_lambda = float(ewc_lambda)
        self.margin = margin
        self.lambda_history: list[float] = []
        self._tensor_batches = False  # the strategy's train.tensor_batches, read at each experience's end
        self._penalty_grad: tuple[list, list] | None = None  # (parameters, Σ_e F^e (θ - θ*^e)) of this step

    def summed_importance_max(self) -> float:
        """max_i of the importance the penalty weights θ_i by (Σ_e F_i^e; online: the decayed sum)."""
        if not self.importances:
            return 0.0
        if self.mode == "online":
            kept = [self.importances[max(self.importances)]]
        else:
            kept = list(self.importances.values())
        summed: dict = {}
        for per_exp in kept:
            for name, imp in per_exp.items():
                summed[name] = summed[name] + imp.data if name in summed else imp.data.clone()
        return max((float(f.max()) for f in summed.values()), default=0.0)

    def before_backward(self, strategy, **kwargs):
        """Avalanche's penalty λ Σ_e Σ_i F_i^e (θ_i - θ*_i^e)² (separate: every earlier experience; online: the
        last one's decayed importance) added to the loss by value; its gradient waits for after_backward."""
        self._penalty_grad = None
        exp_counter = strategy.clock.train_exp_counter
        if exp_counter == 0:
            return
        if self.mode not in ("separate", "online"):
            raise ValueError("Wrong EWC mode.")
        experiences = range(exp_counter) if self.mode == "separate" else [exp_counter - 1]
        params = dict(strategy.model.named_parameters())
        penalty = torch.zeros((), device=strategy.device)
        total: dict[str, torch.Tensor] = {}  # Σ_e F^e (θ - θ*^e) per parameter
        for e in experiences:
            names = [k for k in params if k in self.saved_params[e]]  # new parameters do not count
            if not names:
                continue
            shapes = [params[k].shape for k in names]
            value, weighted = weighted_distance(
                [params[k] for k in names], [self.saved_params[e][k].expand(s) for k, s in zip(names, shapes)],
                [self.importances[e][k].expand(s) for k, s in zip(names, shapes)])
            penalty += value
            for k, w in zip(names, weighted):
                total[k] = total[k].add_(w) if k in total else w
        if total:
            self._penalty_grad = ([params[k] for k in total], list(total.values()))
            strategy.loss += self.ewc_lambda * penalty

    def after_backward(self, strategy, **kwargs):
        if self._penalty_grad is not None:
            add_to_gradients(*self._penalty_grad, alpha=2 * self.ewc_lambda)
            self._penalty_grad = None

    def compute_importances(self, model, criterion, optimizer, dataset, device, batch_size, num_workers=0):
        from scenarios.tensors import dataset_batches, resolve_tensors

        if not self._tensor_batches or resolve_tensors(dataset) is None:
            return super().compute_importances(model, criterion, optimizer, dataset, device, batch_size,
                                               num_workers=num_workers)
        model.eval()  # Avalanche's pass, step for step, on the tensors' slices
        importances = zerolike_params_dict(model)
        n_batches = 0
        for x, y, task_labels in dataset_batches(dataset, batch_size, loader_rng=True, task_labels=True):
            optimizer.zero_grad()
            loss = criterion(avalanche_forward(model, x.to(device), task_labels), y.to(device))
            loss.backward()
            for (k1, p), (k2, imp) in zip(model.named_parameters(), importances.items()):
                assert k1 == k2
                if p.grad is not None:
                    imp.data += p.grad.data.pow(2)
            n_batches += 1
        for imp in importances.values():
            imp.data /= float(n_batches)
        model.train()
        return importances

    def after_training_exp(self, strategy, **kwargs):
        self._tensor_batches = bool(getattr(strategy, "tensor_batches", False))
        super().after_training_exp(strategy, **kwargs)
        if self.margin is None:
            self.lambda_history.append(self.ewc_lambda)
            return
        lr = max(float(g["lr"]) for g in strategy.optimizer.param_groups)
        f_max = self.summed_importance_max()
        bound = self.margin / (2 * lr * f_max) if lr > 0 and f_max > 0 else float("inf")
        self.ewc_lambda = min(self.requested_lambda, bound)
        if self.ewc_lambda < self.requested_lambda and (not self.lambda_history
                                                        or self.lambda_history[-1] >= self.requested_lambda):
            print(f"[ewc] λ {self.requested_lambda:g} is past plain SGD's stability bound: lr {lr:g} x 2 λ x "
                  f"max Σ F {f_max:.3g} = {2 * lr * self.requested_lambda * f_max:.3g} > margin {self.margin:g} (diverges "
                  f"from 2): the penalty is weighted {self.ewc_lambda:.3g} from here (ewc.stability_margin=null "
                  "keeps λ)")
        self.lambda_history.append(self.ewc_lambda)
