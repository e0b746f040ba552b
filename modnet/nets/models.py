"""The modular network (HAT masks + SynC modules + key-vector gates + heads that grow), and the same
backbones without masks for the baselines.

A ``HATNet`` keeps one output head per task (experience). With a task label (task-incremental) the head
and the task's masks are picked by the label. Without one (class-incremental) the network runs every
trained task's masked sub-network and keeps the most confident head (``task_inference``), then writes that
head's log-probabilities into a logit vector over all classes, so Avalanche's accuracy metrics apply as is.

What a forward does is given by its caller, as hypnettorch's ``forward(x, weights=None, condition=None)``:
``net(x, task_labels, condition=Condition(...))``. The condition names the task being trained (class-
incremental training), the HAT slope s, HAT's training settings, and whether to record the units'
activations; what the forward records (activations, HAT's capacity regulariser) is written into the
condition's ``trace``, never onto the network. Without a condition the network evaluates at s = smax.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from avalanche.models import MultiTaskModule
from torch import Tensor, nn
from torch.nn import functional as F

from modnet.nets.hat import HATConv2d, HATLinear, SlicedStrideConv2d, TrainingMasks, apply_unit_mask

# Logit given to classes outside the chosen head: finite so that cross-entropy and softmax stay finite.
_OFF_HEAD_LOGIT = -1e4


#: how a multi-head network picks its head without a task label (hat.task_inference, hnet.task_inference;
#: modnet.validate keeps a copy, checked by the tests)
HEAD_TASK_INFERENCE = ("maxprob", "entropy")


class CosineHead(nn.Linear):
    """Cosine-normalised head, no bias: score_c(f) = tau * cos(w_c, f) (Gidaris & Komodakis, CVPR 2018; a common
    remedy for the seen-class bias in GZSL). Every row scores on the same bounded scale whatever its length, so a
    row added later (NIWT's unseen classes) is comparable with the trained ones by construction."""

    def __init__(self, in_features: int, out_features: int, tau: float = 16.0):
        super().__init__(in_features, out_features, bias=False)
        self.tau = float(tau)

    def forward(self, x: Tensor) -> Tensor:
        return self.row_scores(x, self.weight)

    def row_scores(self, features: Tensor, weight: Tensor) -> Tensor:
        """[B, R]: every row of ``weight`` [R, D] on every feature vector [B, D]."""
        return self.tau * F.normalize(features, dim=-1) @ F.normalize(weight, dim=-1).T

    def pair_scores(self, features: Tensor, weight: Tensor) -> Tensor:
        """[B]: row b of ``weight`` on feature vector b."""
        return self.tau * F.cosine_similarity(features, weight, dim=-1, eps=1e-12)


def use_cosine_heads(net: "HATNet", tau: float) -> None:
    """Replace every head of a freshly built network by a ``CosineHead`` of the same shape (before training)."""
    net.heads = nn.ModuleList(CosineHead(h.in_features, h.out_features, tau).to(h.weight.device) for h in net.heads)


@dataclass(frozen=True)
class HATTraining:
    """HAT's training settings for a forward (Serra et al. 2018): the masks then carry the compensated
    embedding gradient and give the weighted capacity regulariser c R (``modnet.nets.hat.TrainingMasks``);
    ``free`` is c times the free capacity of the units, fixed per task."""

    smax: float
    thres_cosh: float
    free: Tensor


@dataclass
class ForwardTrace:
    """What a forward recorded, on request of its condition: every masked layer's unit outputs
    (``record=True``) and HAT's weighted capacity regulariser (under ``HATTraining``); always the heads' input
    of its last task forward and that task (a reference, no copy: the transform heads' loss reuses the
    untransformed rows instead of running them through the network again), and the heads' input of the
    condition's ``extra`` rows."""

    activations: list[Tensor] = field(default_factory=list)
    capacity: Tensor | None = None
    feature: Tensor | None = None
    feature_task: int | None = None
    extra_feature: Tensor | None = None


@dataclass
class Condition:
    """How one forward of a modular network runs (hypnettorch's ``condition``), set by its caller.

    task     training: the task whose head and masks train, one experience at a time (class-incremental: no
             label tells it; task-incremental: the rows are not split by label). None: infer the task
    s        HAT's mask slope (None: the network's smax, i.e. evaluation)
    hat      HAT's training settings (None: plain masks, no compensation, no regulariser)
    record   keep every masked layer's unit outputs in ``trace.activations`` (sync regulariser, analysis)
    train_gate  whether the task's module gate (query map, keys) takes a gradient in this forward; False: its
             parameters enter detached, so the backward computes nothing for them (``ModulesPlugin``'s settle
             epochs)
    compiled the ``torch.compile`` backend of the masked pass in training forwards (``train.compile``;
             ``HATNet.masked_pass``), None: eager
    extra    more inputs for the task's masked sub-network, run in the same pass as the batch (a network
             without batch norm: its rows are independent); their heads' input goes to
             ``trace.extra_feature``, the logits and the recorded activations are the batch's only. The
             transform heads' copies take this path: one pass instead of a second forward, its gate and its
             masks (``TaskOODPlugin``)
    trace    written by the forward
    """

    task: int | None = None
    s: float | None = None
    hat: HATTraining | None = None
    record: bool = False
    train_gate: bool = True
    compiled: str | None = None
    extra: Tensor | None = None
    trace: ForwardTrace = field(default_factory=ForwardTrace)


def has_batch_norm(module: nn.Module) -> bool:
    """Whether a batch norm couples the rows of a forward pass through ``module``."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def _reread_trained(net: "MultiHeadTaskNet", incompatible_keys) -> None:
    net._trained = int(net.n_trained)


class MultiHeadTaskNet(MultiTaskModule):
    """One output head per task (experience), with task inference when no task label is given.

    Subclasses implement ``task_logits(x, task, condition)``. ``task_classes[t]`` lists the class ids head t
    predicts. Task-incremental: the label picks the head (the batch is split by label, as Avalanche's
    ``MultiTaskModule`` does). Class-incremental: training uses ``condition.task`` (set by the strategy) and
    writes its head into a logit vector over all classes; evaluation lets every trained head score x and
    keeps the most confident one.
    """

    def __init__(self, task_classes: Sequence[Sequence[int]], class_incremental: bool,
                 task_inference: str = "maxprob"):
        super().__init__()
        if task_inference not in HEAD_TASK_INFERENCE:
            raise ValueError(f"task_inference must be 'maxprob' or 'entropy', got {task_inference!r}")
        self.task_classes = [list(map(int, c)) for c in task_classes]
        self.n_tasks = len(self.task_classes)
        self.n_classes = max(max(c) for c in self.task_classes) + 1
        self.class_incremental = class_incremental
        self.task_inference = task_inference
        for t, c in enumerate(self.task_classes):
            self.register_buffer(f"class_index_{t}", torch.tensor(c, dtype=torch.long))
        self.register_buffer("n_trained", torch.zeros((), dtype=torch.long))
        # the same count on the host, read by every evaluation batch (the buffer would be a device sync each
        # time); kept by mark_trained and re-read once when a state dict is loaded (a resumed run)
        self._trained = 0
        self.register_load_state_dict_post_hook(_reread_trained)

    def task_logits(self, x: Tensor, task: int, condition: Condition | None = None) -> Tensor:
        raise NotImplementedError

    def forward_single_task(self, x: Tensor, task_label: int, condition: Condition | None = None) -> Tensor:
        # float: the multi-task forward writes into a float32 buffer (bf16 under autocast otherwise)
        return self.task_logits(x, int(task_label), condition).float()

    def forward(self, x: Tensor, task_labels: Tensor | int | None = None,  # type: ignore[override]
                condition: Condition | None = None) -> Tensor:
        condition = Condition() if condition is None else condition
        if not self.class_incremental:
            if task_labels is None:
                raise ValueError(f"a task-incremental {type(self).__name__} needs task labels")
            if self.training and condition.task is not None:
                # training one experience: every row belongs to the task being trained (the HAT plugin sets
                # it), so no torch.unique over the labels, which would read them back to the host every step
                return self.forward_single_task(x, condition.task, condition)
            return self._forward_by_task(x, task_labels, condition)
        if self.training and condition.task is not None:
            return self._scatter(self.task_logits(x, condition.task, condition), condition.task)
        if self.training:
            raise ValueError(f"training a class-incremental {type(self).__name__} needs condition.task, the task "
                             "being trained (the HAT plugin sets it on its strategy)")
        return self.infer_task(x, condition)[0]

    def _forward_by_task(self, x: Tensor, task_labels: Tensor | int, condition: Condition) -> Tensor:
        """Split the batch by task label; every task's head answers its own rows (padded to the widest head
        with zeros, as Avalanche's ``MultiTaskModule``)."""
        if isinstance(task_labels, int):
            return self.forward_single_task(x, task_labels, condition)
        tasks = torch.unique(task_labels)
        if len(tasks) == 1:
            return self.forward_single_task(x, int(tasks), condition)
        outs = {int(t): self.forward_single_task(x[task_labels == t], int(t), condition) for t in tasks}
        out = x.new_zeros(x.shape[0], max(o.shape[1] for o in outs.values()), dtype=torch.float32)
        for t, o in outs.items():
            out[task_labels == t, :o.shape[1]] = o
        return out

    def local_labels(self, task: int, y: Tensor) -> Tensor:
        """Each global label of ``y`` as its position in task ``task``'s head (-1: not a class of the task), by
        comparing the labels with ``class_index_<task>`` (B x classes of the task): no table kept beside the
        module, so the lookup follows the buffer when it is replaced, loaded or moved, and it traces into a
        compiled training step as one fused kernel (a kept table's cache would break the graph; looked up eager
        before the step, in situ ~25 us a step)."""
        idx = getattr(self, f"class_index_{task}")
        match = y.to(idx.device).unsqueeze(-1) == idx
        return torch.where(match.any(-1), match.int().argmax(-1), -1)

    def _scatter(self, head_out: Tensor, task: int) -> Tensor:
        out = head_out.new_full((head_out.shape[0], self.n_classes), _OFF_HEAD_LOGIT)
        return out.index_copy(1, getattr(self, f"class_index_{task}"), head_out)

    def infer_task(self, x: Tensor, condition: Condition | None = None) -> tuple[Tensor, Tensor]:
        """Every trained task's head scores x, the most confident wins: (logits over all classes, task)."""
        n = max(self.trained, 1)
        outs, scores = [], []
        for t in range(n):
            logp = F.log_softmax(self.task_logits(x, t, condition), dim=1)
            if self.task_inference == "maxprob":
                scores.append(logp.max(dim=1).values)
            else:  # low entropy = confident; normalised by log(#classes) so head sizes compare
                ent = -(logp.exp() * logp).sum(1) / math.log(max(logp.shape[1], 2))
                scores.append(-ent)
            outs.append(self._scatter(logp, t))
        chosen = torch.stack(scores).argmax(dim=0)
        stacked = torch.stack(outs)  # T x B x C
        logits = stacked.gather(0, chosen.view(1, -1, 1).expand(1, *stacked.shape[1:])).squeeze(0)
        return logits, chosen

    @property
    def trained(self) -> int:
        """How many tasks are trained (``n_trained``, the buffer checkpoints keep), without reading the device."""
        return self._trained

    def mark_trained(self, task: int) -> None:
        self._trained = max(self._trained, task + 1)
        self.n_trained.fill_(self._trained)


class HATNet(MultiHeadTaskNet):
    """Base of the HAT modular networks: per-layer task masks, cumulative masks, one linear head per task.

    Subclasses define ``self.masked`` (the HAT layers, in forward order) and ``features(x, masks)``.
    """

    def __init__(self, task_classes: Sequence[Sequence[int]], feature_dim: int, class_incremental: bool,
                 smax: float = 400.0, task_inference: str = "maxprob", gate: nn.Module | None = None,
                 task_keys: nn.Module | None = None):
        super().__init__(task_classes, class_incremental, task_inference)
        self.smax = float(smax)
        self.heads = nn.ModuleList(nn.Linear(feature_dim, len(c)) for c in self.task_classes)
        # Functional-module gates (modnet.nets.modules.ModularGating): a callable (x, task, masks) -> masks.
        self.gate = gate
        # Closed-form task keys (modnet.nets.modules.TaskKeys) for class-incremental inference.
        self.task_keys = task_keys
        # Per head, how many of its classes own task keys: the classes it was built for. Rows added later by
        # ``add_classes`` (NIWT's unseen classes) have no samples, hence no keys: they are scored inside
        # every head they join, weighted by that head's task posterior.
        self.keyed_classes = [len(c) for c in self.task_classes]
        # Network-based task prediction (modnet.nets.task_inference.TaskOOD): per-task OOD heads on the masked
        # sub-networks; set by build_modular_network, takes precedence over the task keys.
        self.task_ood: nn.Module | None = None
        # whether task_ood picks the task (task_inference.method=ood); false where its transform heads are only
        # trained beside the task (model.transform_heads=always) or scored inside task_features
        self.task_ood_predicts_task = True
        # Network-based task prediction by per-task class Gaussians over masked features
        # (modnet.nets.task_inference.TaskFeatureGaussians); set by build_modular_network
        self.task_features: nn.Module | None = None

    masked: nn.ModuleList

    @property
    def rows_coupled(self) -> bool:
        """Whether a training pass mixes its rows (batch norm): then extra inputs cannot share the batch's pass."""
        return has_batch_norm(self)

    def _init_cumulative_masks(self) -> None:
        for i, layer in enumerate(self.masked):
            self.register_buffer(f"mask_pre_{i}", torch.zeros(layer.n_units))
        # identity taps on every masked layer's output (after its mask and gates): hook points for importance
        # (NIWT) and Grad-CAM that see exactly the units the masks and gates act on
        self.unit_taps = nn.ModuleList(nn.Identity() for _ in self.masked)

    def masks(self, task: int, s: float | None = None) -> list[Tensor]:
        """Task ``task``'s masks at slope s (default smax), without HAT's training compensation."""
        s = self.smax if s is None else s
        return [layer.mask(task, s) for layer in self.masked]

    def _training_masks(self, task: int, condition: Condition) -> TrainingMasks | None:
        """Under HAT training (``condition.hat``): the task's masks, still to be computed (by the gate when there
        is one, in the same autograd function), with the compensated gradient and the capacity regulariser."""
        hat = condition.hat
        if hat is None or not self.training or not torch.is_grad_enabled():
            return None
        # the whole embedding tables: the autograd function picks the task's rows (no select node per layer)
        return TrainingMasks([layer.task_embedding.weight for layer in self.masked],
                             self.smax if condition.s is None else condition.s, hat.smax, hat.thres_cosh, hat.free,
                             task=task)

    def cumulative_masks(self) -> list[Tensor]:
        return [getattr(self, f"mask_pre_{i}") for i in range(len(self.masked))]

    @torch.no_grad()
    def consolidate(self, task: int) -> None:
        """a^{<=t} = max(a^{<t}, a_t at smax): call once task t is trained."""
        for i, m in enumerate(self.masks(task, self.smax)):
            buf = getattr(self, f"mask_pre_{i}")
            buf.copy_(torch.maximum(buf, m))
        self.mark_trained(task)

    def input_masks(self) -> list[Tensor | None]:
        """For each masked layer, the cumulative mask of the units feeding it (None for the first)."""
        return [None] + self._expand_inputs(self.cumulative_masks()[:-1])

    def _expand_inputs(self, prev: list[Tensor]) -> list[Tensor]:
        return prev

    def features(self, x: Tensor, masks: list[Tensor], task: int = 0) -> Tensor:
        return self.forward_units(x, masks, task)[1]

    def unit_activations(self, x: Tensor, masks: list[Tensor], task: int = 0) -> list[Tensor]:
        """Output of every masked layer (B x units; conv maps averaged over space for the profiles) on task
        ``task``'s path (its batch norm, where a network has one per task)."""
        raise NotImplementedError

    def forward_units(self, x: Tensor, masks: list[Tensor], task: int = 0,
                      record: bool = True) -> tuple[list[Tensor], Tensor]:
        """(every masked layer's output, the heads' input): the last masked layer's output unless a subclass
        ends differently (a residual sum). A subclass may leave out outputs that cost a pass to summarise
        when ``record`` is off (HATCNN's conv maps): ``unit_activations`` always has them all."""
        acts = self.unit_activations(x, masks, task)
        return acts, acts[-1]

    def unit_masks(self, x: Tensor, task: int, condition: Condition | None = None) -> list[Tensor]:
        """Per masked layer, what multiplies its units for input x on task ``task``: the task's HAT mask
        (at the condition's s), times the module gates of that input when the network has gates."""
        condition = Condition() if condition is None else condition
        training = self._training_masks(task, condition)
        if self.gate is not None:
            masks = self.gate(x, task, self.masks(task, condition.s) if training is None else training,
                              train=condition.train_gate)
        else:
            masks = self.masks(task, condition.s) if training is None else training.compute()
        if training is not None:
            condition.trace.capacity = training.capacity
        return masks

    def masked_pass(self, x: Tensor, task: int, condition: Condition | None = None,
                    record: bool | None = None) -> tuple[list[Tensor], Tensor]:
        """``forward_units`` under the task's ``unit_masks``: (every masked layer's output, the heads' input)
        on task ``task``'s masked sub-network (``record`` None: the condition's). A training forward with
        ``condition.compiled`` runs it through ``torch.compile`` (``compiled_masked_pass``): the masks, the
        gates, HAT's compensation and the layers, forward and backward, are then one compiled graph."""
        condition = Condition() if condition is None else condition
        record = condition.record if record is None else record
        # (inside a compiled training loss, strategies.template.compiled_training_loss, it is part of that graph)
        if (condition.compiled is not None and self.training and torch.is_grad_enabled()
                and not torch.compiler.is_compiling()):
            return compiled_masked_pass(condition.compiled)(self, x, task, condition, record)
        return _masked_pass(self, x, task, condition, record)

    @torch.no_grad()
    def task_units(self, x: Tensor, task: int) -> list[Tensor]:
        """Every masked layer's output on task ``task``'s path at s = smax (its mask and its module gates
        applied), in eval mode: the representation HAT protects (conv maps averaged over space)."""
        was_training = self.training
        self.eval()
        try:
            return self.unit_activations(x, self.unit_masks(x, task), task)
        finally:
            self.train(was_training)

    def task_logits(self, x: Tensor, task: int, condition: Condition | None = None) -> Tensor:
        condition = Condition() if condition is None else condition
        n, extra = x.shape[0], condition.extra
        if extra is not None:
            if self.rows_coupled:
                raise ValueError(f"{type(self).__name__} has batch norm: rows of one pass are not independent, "
                                 "so condition.extra cannot share the batch's pass")
            x = torch.cat([x, extra.to(x.dtype)])
        acts, feature = self.masked_pass(x, task, condition)
        if extra is not None:
            # split, not two slices: its backward is one cat of the two gradients, where each slice's would
            # zero a full-size gradient and copy its part in
            feature, condition.trace.extra_feature = feature.split([n, feature.shape[0] - n])
            acts = [a[:n] for a in acts]
        if condition.record:
            condition.trace.activations = acts
        condition.trace.feature, condition.trace.feature_task = feature, task
        return self.heads[task](feature)

    def update_task_keys(self, x: Tensor, task: int, y: Tensor) -> None:
        """Add samples of task ``task`` (labels ``y``) to the running statistics of its class keys."""
        if self.task_keys is not None:
            self.task_keys.update(x, self.slot_of(task, y))

    def add_classes(self, task: int, class_ids: Sequence[int], weight: Tensor, bias: Tensor | None = None) -> None:
        """Grow head ``task`` by one output row per new class (NIWT's unseen classes): ``weight`` is
        (new classes x features), the bias 0 unless given (the official NIWT code keeps it at 0). The new
        classes get no task keys (``keyed_classes``); a class added to several heads is scored, without a
        task label, by its best head as any class (``infer_task``)."""
        head = self.heads[task]
        size = (head.in_features, head.out_features + len(class_ids))
        new = (CosineHead(*size, head.tau) if isinstance(head, CosineHead) else nn.Linear(*size)).to(head.weight.device)
        with torch.no_grad():  # a cosine head has no bias: its rows are compared by direction only
            new.weight.copy_(torch.cat([head.weight, weight.to(head.weight)]))
            if new.bias is not None:
                new.bias.copy_(torch.cat([head.bias, (bias if bias is not None else
                                                       torch.zeros(len(class_ids))).to(head.bias)]))
        self.heads[task] = new
        self.task_classes[task] = self.task_classes[task] + [int(c) for c in class_ids]
        self.n_classes = max(self.n_classes, max(int(c) for c in class_ids) + 1)
        self.register_buffer(f"class_index_{task}", torch.tensor(self.task_classes[task], dtype=torch.long,
                                                                 device=head.weight.device))

    def adaptation(self, experience) -> None:
        """Avalanche calls this before each experience (before the optimiser is rebuilt): new gates here."""
        super().adaptation(experience)
        task = experience.current_experience
        if self.training and self.gate is not None and not self.gate.has_task(task):
            ds = experience.dataset
            n = min(len(ds), self.gate.profile_samples)
            x = torch.stack([ds[i][0] for i in range(n)]).to(self.heads[0].weight.device)
            self.gate.add_task(self, task, x)  # units profiled through the new task's own batch norm, if any

    def key_slots(self, task: int) -> Tensor:
        """The task keys' rows for task ``task``: one per (task, class) pair, so that tasks sharing class ids
        (permuted / domain-incremental benchmarks) still get keys of their own."""
        start = sum(self.keyed_classes[:task])
        return torch.arange(start, start + self.keyed_classes[task], device=self.heads[0].weight.device)

    def slot_of(self, task: int, y: Tensor) -> Tensor:
        """Key row of each global label ``y`` of task ``task``: its position in the task's head (``local_labels``)
        after the earlier tasks' rows; classes added to the head later (``add_classes``) have no key."""
        pos = self.local_labels(task, y).to(y.device)
        unkeyed = (pos < 0) | (pos >= self.keyed_classes[task])
        if unkeyed.any():
            raise ValueError(f"labels {y[unkeyed].unique().tolist()} are not classes of task {task}")
        return pos + sum(self.keyed_classes[:task])

    @property
    def n_key_slots(self) -> int:
        return sum(self.keyed_classes)

    def task_ood_read_at_inference(self) -> bool:
        """Whether inference reads the transform heads (``task_ood``): they pick the task, or their score is
        one of the feature Gaussians'; otherwise they were only an auxiliary loss while training."""
        if self.task_ood is None:
            return False
        return bool(self.task_ood_predicts_task or
                    (self.task_features is not None and getattr(self.task_features, "ood_weight", 0.0) > 0))

    def infer_task(self, x: Tensor, condition: Condition | None = None) -> tuple[Tensor, Tensor]:
        # features first: with task_inference.feature_ood_weight the CSI heads (task_ood) are one of its scores
        if self.task_features is not None and self.trained > 0:
            return self._infer_task_features(x, condition)
        if self.task_ood is not None and self.task_ood_predicts_task and self.trained > 0:
            return self._infer_task_ood(x, condition)
        if self.task_keys is None or self.trained == 0:
            return super().infer_task(x, condition)
        # p(c | x) = p(t | x) p(c | x, t): task posterior from the keys, class from the task's masked head.
        n = self.trained
        idx = [getattr(self, f"class_index_{t}") for t in range(n)]
        log_pt = self.task_keys.task_log_posterior(x, [self.key_slots(t) for t in range(n)])
        out = x.new_full((x.shape[0], self.n_classes), _OFF_HEAD_LOGIT)
        for t in range(n):
            logp = F.log_softmax(self.task_logits(x, t, condition), dim=1) + log_pt[:, t:t + 1]
            out[:, idx[t]] = torch.maximum(out[:, idx[t]], logp)
        return out, log_pt.argmax(1)


    def _infer_task_features(self, x: Tensor, condition: Condition | None = None) -> tuple[Tensor, Tensor]:
        """The task of the highest standardised score z_t(x) (TaskFeatureGaussians) answers with its
        classification head's log-probabilities; every other task's classes get their own head's
        log-probabilities lowered by the off-head logit (-1e4): the argmax over all classes is the chosen head's,
        and the argmax over one task's classes is that task's head's (accuracy with the task known)."""
        n = self.trained
        chosen = self.task_features.task_scores(self, x, n).argmax(1)
        return self._chosen_head_log_probs(chosen, [self.task_logits(x, t, condition) for t in range(n)]), chosen

    def _chosen_head_log_probs(self, chosen: Tensor, logits: list[Tensor]) -> Tensor:
        """Every trained task's classes get its ``logits[t]``'s log-probabilities, lowered by the off-head logit
        (-1e4) where ``chosen`` is another task: the argmax over all classes is the chosen head's, and the
        argmax over one task's classes is that task's head's (accuracy with the task known)."""
        # below every head's lowered log-probabilities: classes of no trained head
        out = logits[0].new_full((logits[0].shape[0], self.n_classes), 2 * _OFF_HEAD_LOGIT, dtype=torch.float32)
        for t, z in enumerate(logits):
            logp = F.log_softmax(z.float(), dim=1)
            off = torch.where(chosen == t, 0.0, _OFF_HEAD_LOGIT).to(logp).unsqueeze(1)
            idx = getattr(self, f"class_index_{t}")
            out[:, idx] = torch.maximum(out[:, idx], logp + off)
        return out

    def _infer_task_ood(self, x: Tensor, condition: Condition | None = None) -> tuple[Tensor, Tensor]:
        """The task of the highest calibrated OOD score z_t(x) answers (modnet.nets.task_inference) with its
        log-probabilities (classification head, or the transforms' ensemble); every other task's classes get
        theirs lowered by the off-head logit, as in ``_infer_task_features``."""
        n = self.trained
        z, gs = self.task_ood.task_scores(self, x, n, condition)
        chosen = z.argmax(1)
        # a head that gained classes later (NIWT's unseen classes) has no joint outputs for them: its
        # classification head scores it
        joint = [self.task_ood.classify == "joint" and gs[t].shape[1] == len(self.task_classes[t]) for t in range(n)]
        logits = [gs[t] if joint[t] else self.task_logits(x, t, condition) for t in range(n)]
        return self._chosen_head_log_probs(chosen, logits), chosen


def _masked_pass(net: HATNet, x: Tensor, task: int, condition: Condition, record: bool):
    return net.forward_units(x, net.unit_masks(x, task, condition), task, record)


# torch.compile keeps a graph per task (its embedding rows and its gate are picked by the task's index); past
# dynamo's default limit of 8 graphs per function, later tasks would silently run eager
RECOMPILE_LIMIT = 256
_COMPILED: dict[tuple, object] = {}


def compile_once(fn, backend: str, trace_autograd: bool = False, options: dict | None = None):
    """``fn`` through ``torch.compile(backend=backend, dynamic=True, options=options)``, made once per function,
    backend and options for the process (dynamo keeps its graphs per compiled function: one wrapper, every network
    and every task); raises dynamo's recompile limit to ``RECOMPILE_LIMIT``. Dynamic from the first graph: the batch
    size and the floats that vary per step (HAT's slope s) are symbolic, where automatic dynamic shapes would
    specialise the first values and compile twice more. Only the batch size: every dimension of a tensor argument
    after its first is marked static on each call (``static_sample_dims``). ``trace_autograd``: each call runs with
    ``torch._dynamo.config.trace_autograd_ops`` on (``fn`` takes gradients with ``torch.autograd.grad``, which
    dynamo otherwise leaves out of the graph), set and restored around the call (~5 us), not for the process."""
    key = (fn, backend, trace_autograd, tuple(sorted((options or {}).items())))
    compiled = _COMPILED.get(key)
    if compiled is None:
        import functools

        import torch._dynamo

        config = torch._dynamo.config
        config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
        graph = torch.compile(fn, backend=backend, dynamic=True, **({"options": options} if options else {}))

        @functools.wraps(fn)
        def compiled(*args, **kwargs):
            for a in args:
                if isinstance(a, Tensor):
                    static_sample_dims(a)
            if not trace_autograd:
                return graph(*args, **kwargs)
            before = config.trace_autograd_ops
            config.trace_autograd_ops = True
            try:
                return graph(*args, **kwargs)
            finally:
                config.trace_autograd_ops = before

        _COMPILED[key] = compiled
    return compiled


def static_sample_dims(x: Tensor) -> Tensor:
    """Marks every dimension of batch-first ``x`` but the first static for ``torch.compile(dynamic=True)``
    (``torch._dynamo.mark_static``; returns ``x``). With a symbolic channel count, height and width inductor's
    CPU kernels lose their vectorised inner loops: the small CNN's compiled step (1 thread, channels_last) cost
    1.08x a plain eager step with every dimension symbolic, 0.98-1.02x with the sample's dimensions static (ReLU
    and max-pool by slices on a 64 x 32 x 32 x 32 map, forward and backward: 33 ms against 3.7 ms). A sample of
    another shape is a new graph (dynamo's guard), as a new task's is."""
    import torch._dynamo

    for d in range(1, x.dim()):
        torch._dynamo.mark_static(x, d)
    return x


def compiled_masked_pass(backend: str):
    """``_masked_pass`` through ``torch.compile(backend=backend, dynamic=True)``: what ``train.compile`` compiles
    where the step's losses are not in one graph with it (a forward through a data-parallel wrapper, whose
    forward runs outside ``strategies.template.compiled_training_loss``). One compiled function per
    backend for every network; dynamo guards on the network's modules, the task and the condition's fields.
    Dynamic from the first graph: the batch size (a last smaller batch, the transform heads' copies) and the
    slope s (annealed every step) are symbolic, so a task compiles once; with automatic dynamic shapes its
    first batch size and s would be specialised and compiled twice more. Same numbers as eager to rounding
    (inductor reorders float sums; dropout and Gumbel noise draw from its own generator)."""
    return compile_once(_masked_pass, backend)


def _dropout(drop: nn.Dropout, h: Tensor) -> Tensor:
    return drop(h) if drop.p else h


class HATMLP(HATNet):
    """MLP of ``n_layers`` HAT-masked hidden layers (ReLU), then one head per task."""

    def __init__(self, in_dim: int, task_classes, hidden: int = 256, n_layers: int = 2, dropout: float = 0.0,
                 class_incremental: bool = False, smax: float = 400.0, task_inference: str = "maxprob",
                 gate: nn.Module | None = None, task_keys: nn.Module | None = None, input_dropout: float = 0.0):
        super().__init__(task_classes, hidden, class_incremental, smax, task_inference, gate, task_keys)
        n_tasks = len(task_classes)
        dims = [in_dim] + [hidden] * n_layers
        self.masked = nn.ModuleList(HATLinear(a, b, n_tasks) for a, b in zip(dims[:-1], dims[1:]))
        self.drop = nn.Dropout(dropout)
        self.drop_in = nn.Dropout(input_dropout)  # HAT's reference MLP: 0.2 on the input, 0.5 on hidden layers
        self._init_cumulative_masks()

    def unit_activations(self, x: Tensor, masks: list[Tensor], task: int = 0) -> list[Tensor]:
        # dropout of rate 0 is the identity: not called (a module call and an op per layer on every step)
        h, acts = _dropout(self.drop_in, x if x.dim() == 2 else x.flatten(1)), []
        for layer, tap, m in zip(self.masked, self.unit_taps, masks):
            # HAT's reference order: ReLU (and dropout), then the mask. With hard module gates the order
            # matters: an off module's gate then gets the gradient of switching it on (the ReLU output),
            # which masking before the ReLU would zero.
            h = tap(apply_unit_mask(_dropout(self.drop, F.relu(layer(h))), m))
            acts.append(h)
        return acts


def max_pool2(x: Tensor) -> Tensor:
    """``F.max_pool2d(x, 2)``, the same values. Where no gradient is taken (evaluation, NIWT's frozen prefix) it is
    the elementwise maximum of the four strided slices: on CPU (torch 2.14, one thread) max_pool2d's kernel takes
    3.2 ms for a 64 x 32 x 16 x 16 map, the slices 0.34 ms; with a gradient max_pool2d's backward is the faster
    (fwd + bwd 4.5 ms vs 11 ms), so it stays there, except in a graph torch.compile traces: inductor fuses the
    slices and their backward with the ReLU and the mask, where its CPU lowering of max_pool2d's backward is
    slow (the small CNN's compiled step, 1 thread: 0.67x a plain eager step with the slices, 1.65x with
    max_pool2d). The gradients differ only where two positive inputs of a window tie (split, not first)."""
    if torch.is_grad_enabled() and x.requires_grad and not torch.compiler.is_compiling():
        return F.max_pool2d(x, 2)
    x = x[..., : x.shape[-2] // 2 * 2, : x.shape[-1] // 2 * 2]
    return torch.maximum(torch.maximum(x[..., ::2, ::2], x[..., 1::2, ::2]),
                         torch.maximum(x[..., ::2, 1::2], x[..., 1::2, 1::2]))


class MaxPool2(nn.Module):
    """``nn.MaxPool2d(2)`` through ``max_pool2``: the baselines' CNN pools as the modular network does."""

    def forward(self, x: Tensor) -> Tensor:
        return max_pool2(x)


class HATCNN(HATNet):
    """Small CNN: HAT-masked conv blocks (conv3x3-ReLU-maxpool2), a HAT-masked fc layer, heads per task.

    No batch norm: its running statistics would drift across tasks outside the masks' protection.
    """

    def __init__(self, in_shape: Sequence[int], task_classes, channels: Sequence[int] = (32, 64),
                 hidden: int = 256, dropout: float = 0.0, class_incremental: bool = False,
                 smax: float = 400.0, task_inference: str = "maxprob", gate: nn.Module | None = None,
                 task_keys: nn.Module | None = None):
        super().__init__(task_classes, hidden, class_incremental, smax, task_inference, gate, task_keys)
        c, h, w = in_shape
        n_tasks = len(task_classes)
        convs = []
        for ch in channels:
            convs.append(HATConv2d(c, ch, 3, n_tasks, padding=1))
            c, h, w = ch, h // 2, w // 2
        if h < 1 or w < 1:
            raise ValueError(f"input {tuple(in_shape)} is too small for {len(channels)} pooling blocks; "
                             "use fewer model.cnn_channels")
        self.spatial = h * w
        self.masked = nn.ModuleList(convs + [HATLinear(c * h * w, hidden, n_tasks)])
        self.drop = nn.Dropout(dropout)
        self._init_cumulative_masks()

    def _expand_inputs(self, prev: list[Tensor]) -> list[Tensor]:
        # The fc layer sees the last conv's channels flattened over space (channel-major, as flatten does).
        return prev[:-1] + [prev[-1].repeat_interleave(self.spatial)]

    def unit_activations(self, x: Tensor, masks: list[Tensor], task: int = 0) -> list[Tensor]:
        return self._run(x, masks, conv_profiles=True)[0]

    def forward_units(self, x: Tensor, masks: list[Tensor], task: int = 0,
                      record: bool = True) -> tuple[list[Tensor], Tensor]:
        # the conv maps' spatial means (a pass over each map) only when someone reads them
        return self._run(x, masks, conv_profiles=record)

    def _run(self, x: Tensor, masks: list[Tensor], conv_profiles: bool) -> tuple[list[Tensor], Tensor]:
        h, acts, last = x, [], len(self.masked) - 2
        for i, (conv, tap, m) in enumerate(zip(self.masked[:-1], self.unit_taps, masks[:-1])):
            # HAT's reference order: conv, ReLU, max-pool, then the mask (a per-channel factor >= 0 commutes
            # with both; on the pooled map it costs a quarter of the pass, and an off module's gate gets the
            # gradient of switching it on, see HATMLP)
            h = max_pool2(F.relu(conv(h)))
            if i == last:
                # the fc layer's flatten copies a channels_last map to the standard layout: copied before the
                # mask instead (flatten is then a view), the mask's backward multiplies two maps of one layout,
                # where a standard-layout gradient times a channels_last map took ~4x as long (128 x 64 x 8 x 8)
                h = h.contiguous()
            h = tap(apply_unit_mask(h, m))
            if conv_profiles:
                acts.append(h.mean(dim=(2, 3)))
        acts.append(self.unit_taps[-1](apply_unit_mask(_dropout(self.drop, F.relu(self.masked[-1](h.flatten(1)))),
                                                       masks[-1])))
        return acts, acts[-1]


# -- the same backbones without masks, for the baselines -----------------------------------------------
class MLPBackbone(nn.Sequential):
    def __init__(self, in_dim: int, hidden: int = 256, n_layers: int = 2, dropout: float = 0.0,
                 input_dropout: float = 0.0):
        layers: list[nn.Module] = [nn.Flatten()] + ([nn.Dropout(input_dropout)] if input_dropout > 0 else [])
        d = in_dim
        for _ in range(n_layers):
            layers += [nn.Linear(d, hidden), nn.ReLU(), nn.Dropout(dropout)]
            d = hidden
        super().__init__(*layers)
        self.out_dim = hidden


class CNNBackbone(nn.Sequential):
    def __init__(self, in_shape: Sequence[int], channels: Sequence[int] = (32, 64), hidden: int = 256,
                 dropout: float = 0.0):
        c, h, w = in_shape
        layers: list[nn.Module] = []
        for ch in channels:
            layers += [nn.Conv2d(c, ch, 3, padding=1), nn.ReLU(), MaxPool2()]
            c, h, w = ch, h // 2, w // 2
        if h < 1 or w < 1:
            raise ValueError(f"input {tuple(in_shape)} is too small for {len(channels)} pooling blocks; "
                             "use fewer model.cnn_channels")
        layers += [nn.Flatten(), nn.Linear(c * h * w, hidden), nn.ReLU(), nn.Dropout(dropout)]
        super().__init__(*layers)
        self.out_dim = hidden


class SingleHeadNet(nn.Module):
    """Backbone + one linear head over all classes: the baselines' class-incremental model."""

    def __init__(self, backbone: nn.Module, n_classes: int):
        super().__init__()
        self.backbone = backbone
        self.classifier = nn.Linear(backbone.out_dim, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.backbone(x))


def reaches_every_parameter(model: nn.Module, task_labels: Sequence[int]) -> bool:
    """Whether every training step on data of ``task_labels`` gives every trainable parameter of ``model`` a
    gradient, where that is known from the model's structure alone (False: it may not, or it is not known).

    Data-parallel training asks it (DDP's ``find_unused_parameters``, whose search of the autograd graph every
    step is only needed where a step can leave a parameter out): the baselines' ``SingleHeadNet`` reaches all
    of its parameters in every forward; a ``MultiHeadNet`` does where its heads are exactly one task's and the
    data holds that task alone (its first experience; later, the other tasks' heads get no gradient). The
    modular networks never do: the heads of other tasks and, while a gate settles, the gate's parameters."""
    if isinstance(model, SingleHeadNet):
        return True
    if isinstance(model, MultiHeadNet):
        heads = {int(t) for t in model.classifier.classifiers.keys()}
        return len(heads) == 1 and {int(t) for t in task_labels} == heads
    return False


def forward_known_tasks(model: nn.Module, x: Tensor, task_labels: Tensor, tasks: Sequence[int] | None) -> Tensor:
    """``model``'s output for ``x`` with per-row ``task_labels``, as Avalanche's ``avalanche_forward`` gives it:
    a multi-head network's ``forward_tasks`` when ``tasks``, the labels the batch holds, were read on the host
    (a replay buffer's or a memory loader's host copy; no ``torch.unique`` of the labels on the device), else
    Avalanche's forward. Not through a wrapper (DDP): a wrapped model has no ``forward_tasks``."""
    forward_tasks = getattr(model, "forward_tasks", None)
    if tasks and forward_tasks is not None:
        return forward_tasks(x, task_labels.to(x.device), tasks)
    from avalanche.models import avalanche_forward

    return avalanche_forward(model, x, task_labels)


class MultiHeadNet(MultiTaskModule):
    """Backbone + one head per task: the baselines' task-incremental model (Avalanche's
    ``MultiHeadClassifier`` grows a head for each new task label and its adaptation keeps which units of a
    head its task has trained, ``active_units_T<t>``; the others answer ``mask_value``).

    A head's inactive units are filled by ``masked_fill``, where Avalanche writes them through a boolean
    index (a ``nonzero``: on a GPU, a host sync in every step of every task-incremental baseline); the same
    logits and gradients. A batch of a tensor of task labels goes through the backbone once
    (``forward_tasks``; Avalanche's split ran it once per task label on that task's rows), over the task labels
    the loader read on the host (``modnet.runner.tensor_batches``: replay's and cumulative's batches mix
    tasks) or, when nobody did, those ``torch.unique`` reads (a host read, as Avalanche's)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        from avalanche.models import MultiHeadClassifier

        self.backbone = backbone
        self.classifier = MultiHeadClassifier(backbone.out_dim, initial_out_features=2)
        # batch norm couples the rows of a pass (per-task batches give other statistics): Avalanche's split
        self._rows_coupled = has_batch_norm(backbone)

    def forward_tasks(self, x: Tensor, task_labels: Tensor, tasks: Sequence[int]) -> Tensor:
        """``forward(x, task_labels)`` given ``tasks``, the task labels the batch holds (the loader read them
        on the host): the backbone once on the whole batch, each of those tasks' heads on every row, each row
        keeping its own task's (``torch.where``: a head takes no gradient from other tasks' rows, and the
        heads of tasks not in the batch none at all, as in Avalanche's split), zero logits past a head's
        width. No host read. Avalanche's split's numbers to float rounding (one product over the batch's rows
        instead of one per task) where the rows of a pass are independent; with batch norm the split runs; with
        dropout, other draws of the same distribution."""
        if self._rows_coupled:
            return super().forward(x, task_labels)
        features = self.backbone(x)
        heads = []
        for task in tasks:
            h = self.classifier.classifiers[f"{task}"](features)  # f-string: see forward_single_task
            heads.append((task, self._masked(h, features, task)))
        width = max([self.max_class_label] + [h.shape[1] for _, h in heads])
        out = features.new_zeros(x.shape[0], width, dtype=torch.get_default_dtype())
        for task, h in heads:
            out = torch.where((task_labels == task).unsqueeze(1), F.pad(h.to(out.dtype), (0, width - h.shape[1])),
                              out)
        return out

    def _masked(self, out: Tensor, features: Tensor, task_label: int) -> Tensor:
        """Head ``task_label``'s output ``out`` with its inactive units at Avalanche's mask value."""
        heads = self.classifier
        if not heads.masking:
            return out
        active = heads._buffers[f"active_units_T{task_label}"]
        if active.shape[0] != out.shape[-1]:  # Avalanche grows the mask in its forward: its path does it
            return heads.forward_single_task(features, task_label)
        return out.masked_fill(active == 0, heads.mask_value)

    def forward(self, x: Tensor, task_labels: Tensor | int | None = None) -> Tensor:  # type: ignore[override]
        if task_labels is None or isinstance(task_labels, int) or self._rows_coupled:
            return super().forward(x, task_labels)
        return self.forward_tasks(x, task_labels, torch.unique(task_labels).tolist())

    def forward_all_tasks(self, x: Tensor) -> dict[int, Tensor]:
        """Avalanche's ``forward_all_tasks`` (every head trained so far, by task label: LwF's distillation reads
        it for the current and the previous network each step) with the backbone run once for all the heads,
        where Avalanche's runs the whole network once per head (at the k-th task LwF ran the backbone 2k + 1
        times a step). The same logits (with dropout: one draw for all the heads); the gradient sums the heads'
        at the features, so the backbone's parameters get it to float rounding. With batch norm Avalanche's
        passes run (each updates the running statistics)."""
        if self._rows_coupled:
            return super().forward_all_tasks(x)
        features = self.backbone(x)
        return {task: self._head(features, task) for task in self.known_train_tasks_labels}

    def forward_single_task(self, x: Tensor, task_label: int) -> Tensor:
        return self._head(self.backbone(x), task_label)

    def _head(self, features: Tensor, task_label: int) -> Tensor:
        # an f-string, not str(): under train.compile the label may be a symbolic int, which dynamo formats into
        # the head's name (a graph per head) where str() breaks the graph
        return self._masked(self.classifier.classifiers[f"{task_label}"](features), features, task_label).float()


# -- ResNet-18 (CIFAR layout: 3x3 stem, no max-pool) -----------------------------------------------------
_RESNET18_STAGES = ((1, 1), (2, 2), (4, 2), (8, 2))  # (width multiple, stride of the first block) per stage


class HATResNet18(HATNet):
    """ResNet-18 (He et al. 2016, CIFAR layout) whose every convolution's output channels carry a HAT mask.

    Batch norm is per task (a ``ModuleList`` of one ``BatchNorm2d`` per task after each conv): its running
    statistics and affine parameters are then only ever touched by their own task, which HAT's masks cannot
    protect otherwise. Residual sums: a block's output channel is on where its second conv or its shortcut
    is on, so the cumulative mask of the units feeding the next conv is the elementwise max of the two
    (``input_masks``) and HAT's gradient conditioning 1 - min(a_out, a_in) stays exact across the sums.
    ``width`` sets the first stage's channels (64 in the paper; tests use a few).
    """

    def __init__(self, in_shape: Sequence[int], task_classes, width: int = 64, class_incremental: bool = False,
                 smax: float = 400.0, task_inference: str = "maxprob", gate: nn.Module | None = None,
                 task_keys: nn.Module | None = None):
        super().__init__(task_classes, 8 * width, class_incremental, smax, task_inference, gate, task_keys)
        n_tasks = len(task_classes)
        c_in = in_shape[0]
        layers: list[nn.Module] = [HATConv2d(c_in, width, 3, n_tasks, padding=1, bias=False)]
        # (conv1, conv2, shortcut or None) indices into ``layers`` per block, and each block's stride
        self._blocks: list[tuple[int, int, int | None]] = []
        self._strides: list[int] = []
        c = width
        for mult, stride in _RESNET18_STAGES:
            for b in range(2):
                s, out = (stride if b == 0 else 1), mult * width
                i1 = len(layers)
                layers.append(HATConv2d(c, out, 3, n_tasks, stride=s, padding=1, bias=False))
                layers.append(HATConv2d(out, out, 3, n_tasks, padding=1, bias=False))
                sc = None
                if s != 1 or c != out:
                    sc = len(layers)
                    layers.append(HATConv2d(c, out, 1, n_tasks, stride=s, bias=False))
                self._blocks.append((i1, i1 + 1, sc))
                self._strides.append(s)
                c = out
        self.masked = nn.ModuleList(layers)
        self.bn = nn.ModuleList(nn.ModuleList(nn.BatchNorm2d(layer.n_units) for _ in range(n_tasks))
                                for layer in layers)
        self._init_cumulative_masks()

    def _unit_masks(self, masks: list[Tensor]) -> tuple[list[Tensor | None], list[Tensor]]:
        """(mask of the units feeding each layer, mask of each block's output) from per-layer masks."""
        feeding: list[Tensor | None] = [None] * len(self.masked)
        out = masks[0]
        outs = []
        for i1, i2, sc in self._blocks:
            feeding[i1] = out
            feeding[i2] = masks[i1]
            if sc is not None:
                feeding[sc] = out
            out = torch.maximum(masks[i2], masks[sc] if sc is not None else out)
            outs.append(out)
        return feeding, outs

    def input_masks(self) -> list[Tensor | None]:
        return self._unit_masks(self.cumulative_masks())[0]

    def unit_activations(self, x: Tensor, masks: list[Tensor], task: int = 0) -> list[Tensor]:
        return self.forward_units(x, masks, task)[0]

    def forward_units(self, x: Tensor, masks: list[Tensor], task: int = 0,
                      record: bool = True) -> tuple[list[Tensor], Tensor]:
        """Every masked conv's output (after its task's batch norm and its mask, averaged over space) and the
        pooled output of the last block (the heads' input). Without ``record`` the per-conv means are left out
        (an empty list): each is a pass over a whole feature map, ~20 per step that nothing reads."""
        conv = self.masked

        def masked_bn(i, h):
            return self.unit_taps[i](apply_unit_mask(self.bn[i][task](conv[i](h)), masks[i]))

        acts: list[Tensor] = [x] * len(conv)
        h = F.relu(masked_bn(0, x))
        if record:
            acts[0] = h.mean(dim=(2, 3))
        for i1, i2, sc in self._blocks:
            a = F.relu(masked_bn(i1, h))
            b = masked_bn(i2, a)
            if record:
                acts[i1], acts[i2] = a.mean(dim=(2, 3)), b.mean(dim=(2, 3))
            if sc is not None:
                h = masked_bn(sc, h)
                if record:
                    acts[sc] = h.mean(dim=(2, 3))
            h = F.relu(b + h)
        return (acts if record else []), h.mean(dim=(2, 3))


class ResNet18Backbone(nn.Module):
    """The same ResNet-18 without masks, one batch norm per conv: the baselines' and the plain loop's."""

    def __init__(self, in_shape: Sequence[int], width: int = 64):
        super().__init__()
        c = width
        self.stem = nn.Sequential(nn.Conv2d(in_shape[0], width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU())
        blocks = []
        for mult, stride in _RESNET18_STAGES:
            for b in range(2):
                blocks.append(_BasicBlock(c, mult * width, stride if b == 0 else 1))
                c = mult * width
        self.blocks = nn.Sequential(*blocks)
        self.out_dim = c

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.stem(x)).mean(dim=(2, 3))


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            # SlicedStrideConv2d: the CPU's strided 1x1 backward corrupts memory on small channels_last maps
            self.shortcut = nn.Sequential(SlicedStrideConv2d(c_in, c_out, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.shortcut(x))
