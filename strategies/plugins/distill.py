"""Knowledge distillation as Avalanche 0.6.0 plugins: static KD (ours, seed 001) and two baselines.

All three add a term to `strategy.loss` in `before_backward`, after Avalanche has put the task loss there
(`SGDUpdate.training_epoch`: forward -> loss += criterion() -> before_backward -> backward), the way
`avalanche.training.plugins.EWCPlugin` and `LwFPlugin` do. So L = L_task + weight * L_distill.

- `SKDPlugin`: static knowledge distillation, L_SKD of seed 001 eq. 2 (`modnet.methods.embedding.skd_loss`). The target is
  the teacher's fitted neuron vectors, cos(S_T, S_T), computed once; only the student runs per batch.
- `KDPlugin`: Hinton et al. 2015, T^2 * KL(softmax(z_T / T) || softmax(z_S / T)); one teacher forward per batch.
- `SPKDPlugin`: similarity-preserving KD, Tung & Mori, ICCV 2019: per layer pair the batch x batch Gram matrices
  G = Q Q^T of the flattened activations, each row L2-normalised, and
  L_SP = 1/b^2 * sum_layers ||G_T - G_S||_F^2 (gamma = 3000 in the CRD benchmark). Widths may differ.

Hooks on the student are attached in `before_training_exp` and removed in `after_training_exp`, so evaluation
forwards keep no activations. Teachers are put in eval mode, moved to `strategy.device` and never updated.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avalanche.core import SupervisedPlugin
from modnet.methods.embedding import ActivationRecorder, NeuronEmbedding, skd_loss

__all__ = ["KDPlugin", "SKDPlugin", "SPKDPlugin", "kd_loss", "sp_loss"]


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """Hinton KD: T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over the batch.

    The T^2 factor keeps the gradient scale independent of T (Hinton et al. 2015, section 2).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            "differ; KD needs the same output classes in the same order"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_student = F.log_softmax(student_logits / temperature, dim=1)
    log_teacher = F.log_softmax(teacher_logits.detach() / temperature, dim=1)
    kl = F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)
    return temperature**2 * kl


def _normalised_gram(activation: Tensor) -> Tensor:
    flat = activation.flatten(1)
    return F.normalize(flat @ flat.transpose(0, 1), p=2, dim=1)


def sp_loss(student_acts: Sequence[Tensor], teacher_acts: Sequence[Tensor]) -> Tensor:
    """Tung & Mori 2019 eq. 3-4: 1/b^2 * sum over layer pairs of ||G_T - G_S||_F^2, G row-normalised Q Q^T."""
    if len(student_acts) != len(teacher_acts) or not student_acts:
        raise ValueError("give one teacher activation per student activation (at least one pair)")
    total = student_acts[0].new_zeros(())
    for student, teacher in zip(student_acts, teacher_acts):
        batch = student.shape[0]
        if teacher.shape[0] != batch:
            raise ValueError(f"teacher batch {teacher.shape[0]} != student batch {batch}")
        diff = _normalised_gram(teacher.detach()) - _normalised_gram(student)
        total = total + diff.pow(2).sum() / batch**2
    return total


def _layer_pairs(layers: Sequence[str] | Mapping[str, str]) -> dict[str, str]:
    """{student layer: teacher layer}; a plain list means the same names in both networks."""
    pairs = dict(layers) if isinstance(layers, Mapping) else {name: name for name in layers}
    if not pairs:
        raise ValueError("give at least one layer (name, or {student layer: teacher layer})")
    return pairs


class _StudentHooks(SupervisedPlugin):
    """Shared plumbing: record the student's `student_layers` during training forwards (graph kept)."""

    def __init__(self, student_layers: Sequence[str]):
        super().__init__()
        self._student_layers = list(student_layers)
        self._recorder: ActivationRecorder | None = None

    def before_training_exp(self, strategy, *args, **kwargs):
        self._remove_hooks()
        self._recorder = ActivationRecorder(strategy.model, self._student_layers)

    def after_training_exp(self, strategy, *args, **kwargs):
        self._remove_hooks()

    def _student_outputs(self) -> dict[str, Tensor]:
        if self._recorder is None or not self._recorder.outputs:
            raise RuntimeError("no student activations recorded: was before_training_exp called on this plugin?")
        return {name: self._recorder.outputs[name] for name in self._student_layers}

    def _remove_hooks(self) -> None:
        if self._recorder is not None:
            self._recorder.remove()
            self._recorder = None


class SKDPlugin(_StudentHooks):
    """Static knowledge distillation (seed 001 eq. 2-3): strategy.loss += beta * L_SKD.

    `teacher_S` is the teacher's fitted neuron embedding ({teacher layer: (C, K)} or a `NeuronEmbedding`).
    `layers` pairs student layers with teacher layers: a list of names present in both, or
    {student layer: teacher layer}; by default the teacher's layer names. Student unit i mirrors teacher unit i,
    so a student layer must have exactly as many units (channels) as its teacher layer; otherwise ValueError.
    beta = 0.5 in the paper, 0.05 for VGG13 -> VGG8. The target cos(S_T, S_T) is a constant: no teacher
    forward, and no gradient ever reaches `teacher_S`.
    """

    def __init__(
        self,
        teacher_S: Mapping[str, Tensor] | NeuronEmbedding,
        layers: Sequence[str] | Mapping[str, str] | None = None,
        beta: float = 0.5,
        temperature: float = 1.0,
    ):
        vectors = teacher_S.as_dict() if isinstance(teacher_S, NeuronEmbedding) else dict(teacher_S)
        pairs = _layer_pairs(list(vectors) if layers is None else layers)
        missing = [t for t in pairs.values() if t not in vectors]
        if missing:
            raise ValueError(f"teacher_S has no vectors for layers {missing}; it has {sorted(vectors)}")
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        super().__init__(list(pairs))
        # Detached copies keyed by student layer: the static knowledge the student is pulled towards.
        self.teacher_S = {student: vectors[teacher].detach().clone() for student, teacher in pairs.items()}
        self.beta = beta
        self.temperature = temperature
        self.last_penalty: Tensor | None = None

    def before_training_exp(self, strategy, *args, **kwargs):
        super().before_training_exp(strategy, *args, **kwargs)
        self.teacher_S = {name: S.to(strategy.device) for name, S in self.teacher_S.items()}

    def before_backward(self, strategy, *args, **kwargs):
        penalty = skd_loss(self._student_outputs(), self.teacher_S, self.temperature)
        self.last_penalty = penalty.detach()
        strategy.loss += self.beta * penalty


class KDPlugin(SupervisedPlugin):
    """Hinton KD baseline: strategy.loss += alpha * T^2 * KL(p_T^T || p_S^T) on each mini-batch.

    Additive form as in Avalanche's LwF (the task loss keeps weight 1); alpha = 0.9, T = 4 are the CRD settings.
    Teacher and student must output the same classes.
    """

    def __init__(self, teacher_model: nn.Module, temperature: float = 4.0, alpha: float = 0.9):
        if temperature <= 0 or alpha < 0:
            raise ValueError(f"need temperature > 0 and alpha >= 0, got {temperature}, {alpha}")
        super().__init__()
        self.teacher = teacher_model
        self.temperature = temperature
        self.alpha = alpha
        self.last_penalty: Tensor | None = None

    def before_training_exp(self, strategy, *args, **kwargs):
        self.teacher.to(strategy.device).eval()  # no hooks needed: KD reads strategy.mb_output

    def before_backward(self, strategy, *args, **kwargs):
        with torch.no_grad():
            teacher_logits = self.teacher(strategy.mb_x)
        penalty = kd_loss(strategy.mb_output, teacher_logits, self.temperature)
        self.last_penalty = penalty.detach()
        strategy.loss += self.alpha * penalty


class SPKDPlugin(_StudentHooks):
    """Similarity-preserving KD baseline (Tung & Mori 2019): strategy.loss += gamma * L_SP.

    `layers`: names present in both networks, or {student layer: teacher layer}. gamma = 3000 in CRD's setup.
    Layer widths may differ (the loss compares batch x batch matrices). One teacher forward per batch.
    """

    def __init__(
        self,
        teacher_model: nn.Module,
        layers: Sequence[str] | Mapping[str, str],
        gamma: float = 3000.0,
    ):
        pairs = _layer_pairs(layers)
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        super().__init__(list(pairs))
        self.teacher = teacher_model
        self.pairs = pairs
        self.gamma = gamma
        self.last_penalty: Tensor | None = None
        self._teacher_recorder: ActivationRecorder | None = None
        teacher_modules = dict(teacher_model.named_modules())
        missing = [name for name in pairs.values() if name not in teacher_modules]
        if missing:  # checked now, before any training
            raise ValueError(f"teacher has no submodules {missing}; its named submodules: "
                             f"{[name for name in teacher_modules if name]}")

    def before_training_exp(self, strategy, *args, **kwargs):
        super().before_training_exp(strategy, *args, **kwargs)
        self.teacher.to(strategy.device).eval()
        self._teacher_recorder = ActivationRecorder(self.teacher, list(self.pairs.values()), detach=True)

    def _remove_hooks(self) -> None:
        super()._remove_hooks()
        if self._teacher_recorder is not None:
            self._teacher_recorder.remove()
            self._teacher_recorder = None

    def before_backward(self, strategy, *args, **kwargs):
        with torch.no_grad():
            self.teacher(strategy.mb_x)
        student = self._student_outputs()
        teacher = self._teacher_recorder.outputs
        penalty = sp_loss([student[s] for s in self.pairs], [teacher[t] for t in self.pairs.values()])
        self.last_penalty = penalty.detach()
        strategy.loss += self.gamma * penalty
