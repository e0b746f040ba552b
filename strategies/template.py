"""The Avalanche template of strategies whose model takes an explicit condition (``modnet.nets.models``).

A modular network's forward is told what to do by its caller (hypnettorch's ``condition``): the task being
trained, HAT's slope s and training settings, what to record. The template owns that condition
(``train_condition``); plugins set its fields in their callbacks (HAT: task, s, HAT settings; the sync
regulariser: record) and read what the forward recorded (``train_condition.trace``). Evaluation uses a
fresh default condition (s = smax, nothing recorded). No plugin sets attributes on the model.

A plugin whose loss term is a function of the training forward is a ``ForwardLossTerm`` (HAT's capacity
regulariser, the transform heads' loss): eager, its ``before_backward`` adds the term after Avalanche's
criterion; with ``train.compile`` the template computes the forward, the criterion and every such term in
one compiled function (``compiled_training_loss``), so that their ops are one graph, forward and backward.

A plugin that conditions the gradients or bounds the parameters is an ``strategies.update.UpdateTerm`` (HAT, the
gates' frozen keys): the template's ``optimizer_step`` applies every such plugin's terms around the optimiser's
step, as one compiled function under ``train.compile``.

Under ``train.compile`` the whole step is one compiled function where it can be (``training_step``): the forward,
the criterion and the loss terms, their gradients (``torch.autograd.grad`` traced into the graph) and the update
with every plugin's terms. Each compiled call pays dynamo's guards, AOT autograd's wrappers and the autograd
engine's dispatch; one call a step instead of three (forward, backward, update) took the bench's Split-MNIST MLP
step from 1.34x to 1.13-1.17x Avalanche's naive step (``scripts/step_phases_probe.py``). Avalanche's loop still runs
every callback in its order; ``backward`` and ``optimizer_step`` then have nothing left to do. Where a plugin acts
on the gradients or adds to the loss after the forward (``step_fusable``), a data-parallel subclass adds to the
backward, or the optimiser is not torch's plain SGD, the step stays three calls (forward and losses, backward,
update), as before.
"""
from __future__ import annotations

import torch
from avalanche.core import SupervisedPlugin
from avalanche.training.templates import SupervisedTemplate
from torch import Tensor, nn

from modnet.nets.models import Condition, ForwardTrace, compile_once
from strategies.update import (UpdateTerm, UpdateTerms, fusable_sgd, keep_momentum, merge_terms, sgd_arguments,
                              sgd_update, update_step)

# the callbacks Avalanche runs between the forward and the end of the update: a plugin that answers one of them sees
# the loss, the gradients or the step, which a step computed in one graph (``training_step``) leaves no room for
STEP_CALLBACKS = ("before_backward", "after_backward", "before_update", "after_update")


class ConditionedTemplate(SupervisedTemplate):
    """``SupervisedTemplate`` whose forward calls ``model(x, task_labels, condition=...)``."""

    def __init__(self, **kwargs):  # keywords only, as Avalanche's templates are moving to
        super().__init__(**kwargs)
        self.train_condition = Condition()
        # the rows of a training batch the classification loss reads (None: all); a plugin that turns some of
        # the batch's rows into inputs for another loss sets it every step (the transform heads' replaced
        # rows, strategies.plugins.ood)
        self.classification_rows: slice | None = None
        # this step's criterion and ForwardLossTerm terms, computed with the forward (train.compile)
        self.loss_fused = False
        self._fused_loss: Tensor | None = None
        # this step's backward and update were done in the forward's graph (``training_step``)
        self.step_fused = False
        # (the plugins, their ForwardLossTerms, their UpdateTerms, whether they let the step be one graph): read
        # every step, decided again when the plugins change (_plugin_roles)
        self._roles: tuple | None = None
        self._static_ids: set[int] = set()  # the update terms' tensors marked static for the compiled step
        self._merged_terms: tuple | None = None  # (the plugins' terms, their merge), kept by _update_terms

    def training_epoch(self, **kwargs):
        """Avalanche's training epoch (``SGDUpdate.training_epoch``, avalanche-lib 0.6.0) step for step, but for
        the optimiser's ``zero_grad`` (to None, Avalanche's call), left out where no parameter holds a gradient,
        where it would set nothing: after a step taken in one graph (``training_step``) none does. Torch's
        zero_grad still enters a profiler range and walks every parameter: on the bench's MLP ~8 us warm, 60-90 us
        in situ, after the step's graph has left the caches cold (~2% of a step)."""
        for self.mbatch in self.dataloader:
            if self._stop_training:
                break

            self._unpack_minibatch()
            self._before_training_iteration(**kwargs)

            if not self._no_grads_to_clear():
                self.optimizer.zero_grad()
            self.loss = self._make_empty_loss()

            # Forward
            self._before_forward(**kwargs)
            self.mb_output = self.forward()
            self._after_forward(**kwargs)

            # Loss & Backward
            self.loss += self.criterion()

            self._before_backward(**kwargs)
            self.backward()
            self._after_backward(**kwargs)

            # Optimization step
            self._before_update(**kwargs)
            self.optimizer_step()
            self._after_update(**kwargs)

            self._after_training_iteration(**kwargs)

    def _no_grads_to_clear(self) -> bool:
        """Whether the optimiser's zero_grad would do nothing: torch's own zero_grad (to None) and no parameter
        holding a gradient (an optimiser with a zero_grad of its own is always called)."""
        opt = self.optimizer
        return (type(opt).zero_grad is torch.optim.Optimizer.zero_grad
                and all(p.grad is None for group in opt.param_groups for p in group["params"]))

    def criterion(self):
        if self.is_training and self._fused_loss is not None:
            loss, self._fused_loss = self._fused_loss, None
            return loss
        rows = self.classification_rows if self.is_training else None
        if rows is None:
            return super().criterion()
        return self._criterion(self.mb_output[rows], self.mb_y[rows])

    def backward(self):
        if self.step_fused and self.is_training:  # the forward's graph took the gradients and the step
            return
        super().backward()

    def optimizer_step(self):
        """The optimiser's step with every ``UpdateTerm`` plugin's gradient multipliers, norm clip and parameter
        bounds around it (``strategies.update.update_step``; one compiled function under ``train.compile``)."""
        if self.step_fused:  # taken in the forward's graph (training_step)
            self.step_fused = False
            return
        terms = self._update_terms()
        if terms is None:
            return super().optimizer_step()
        update_step(self.optimizer, terms, self.train_condition.compiled)

    def _plugin_roles(self) -> tuple:
        """(plugins, their ``ForwardLossTerm``s, their ``UpdateTerm``s, whether every one is ``step_fusable``),
        kept while the strategy holds the same plugins."""
        plugins, kept = self.plugins, self._roles
        if not _same_objects(kept, plugins):
            kept = self._roles = (tuple(plugins), tuple(p for p in plugins if isinstance(p, ForwardLossTerm)),
                                  tuple(p for p in plugins if isinstance(p, UpdateTerm)),
                                  all(step_fusable(p) for p in plugins))
        return kept

    def _update_terms(self) -> UpdateTerms | None:
        terms = tuple(p.update_terms(self) for p in self._plugin_roles()[2])
        if not terms:
            return None
        # the plugins return the same (immutable) terms step after step: their merge is kept while they do
        kept = self._merged_terms
        if not _same_objects(kept, terms):
            kept = self._merged_terms = (terms, merge_terms(terms))
        return kept[1]

    def step_fusable(self) -> bool:
        """Whether the training step can be one compiled graph (``training_step``): torch's plain SGD
        (``strategies.update.fusable_sgd``), ``backward`` and ``optimizer_step`` as this template has them (a
        data-parallel subclass all-reduces the gradients in its backward), and every plugin ``step_fusable``.
        Decided again when the plugins change."""
        cls = type(self)
        return (self._plugin_roles()[3] and cls.backward is ConditionedTemplate.backward
                and cls.optimizer_step is ConditionedTemplate.optimizer_step and fusable_sgd(self.optimizer))

    def _task_argument(self):
        # a batch whose task label the tensor loader knows (every label the same: evaluation of one experience)
        # goes as an int, so a task-incremental network needs no torch.unique of the labels (a host read)
        single = getattr(self.dataloader, "single_task", None)
        return self.mb_task_id if single is None else single

    def forward_through(self, model: nn.Module):
        """The current mini-batch through ``model`` (the strategy's model, or a data-parallel wrapper of it).
        Training: the batch as the ``ForwardLossTerm`` plugins make it (``training_input``) first, kept as the
        step's batch (``mbatch``), which their loss terms read."""
        self.loss_fused = False
        if self.is_training:
            condition = self.train_condition
            condition.trace = ForwardTrace()  # this step's records only
            x = self.mb_x
            for term in self._plugin_roles()[1]:
                x = term.training_input(self.model, x)
            self.mbatch[0] = x
        else:
            condition = Condition()
        return model(self.mb_x, self._task_argument(), condition=condition)

    def forward(self):
        condition = self.train_condition
        self.step_fused = False
        if not (self.is_training and condition.compiled is not None):
            return self.forward_through(self.model)
        condition.trace = ForwardTrace()
        # the criterion reads the graph's own logits: a plugin's after_forward that rewrites mb_output changes what
        # the callbacks after it see, not this step's loss (AutocastPlugin's float cast: the graph casts too)
        terms = self._plugin_roles()[1]
        args = (self.model, self.mb_x, self._task_argument(), condition, self.mb_y, self.classification_rows,
                self._criterion, terms)
        stepped = self._training_step(args) if self.step_fusable() else None
        if stepped is not None:
            (out, self._fused_loss), self.step_fused = stepped, True
        else:
            out, self._fused_loss = compiled_training_loss(condition.compiled)(*args)
        self.loss_fused = True
        return out

    def _training_step(self, loss_args: tuple) -> tuple[Tensor, Tensor] | None:
        """``training_step`` through ``compiled_training_step``: the optimiser's parameters that take a gradient,
        their momentum buffers (kept in the optimiser's state, as its own step does) and the plugins' terms. None
        where no parameter can take a step (the caller computes the loss alone, and the update has nothing to do)."""
        terms = self._update_terms() or UpdateTerms()
        frozen = set(map(id, terms.frozen))
        params = [p for p in self.optimizer.param_groups[0]["params"] if p.requires_grad and id(p) not in frozen]
        if not params:
            return None
        index = {id(p): i for i, p in enumerate(params)}
        buffers, rest = sgd_arguments(self.optimizer, params, terms)
        # the multipliers and buffers are plain tensors in lists: dynamo would size them symbolically, and give a
        # dimension equal to the batch size the batch's symbol (its duck sizing), then specialise both at the
        # update's broadcast: marked static once, as parameters are
        for t in (*(m for _, m in terms.grad_masks), *(buffers or ())):
            if t is not None and id(t) not in self._static_ids:
                import torch._dynamo

                for a in (t, t._base) if t._base is not None else (t,):  # a view's guards read its base too
                    torch._dynamo.mark_static(a)
                self._static_ids.add(id(t))
        out, loss = compiled_training_step(self.train_condition.compiled, self.mb_x.device.type)(
            *loss_args, params, buffers, [index[id(p)] for p, _ in terms.grad_masks if id(p) in index],
            [m for p, m in terms.grad_masks if id(p) in index], *rest)
        keep_momentum(self.optimizer, params, buffers)
        return out, loss


def _same_objects(kept: tuple | None, items) -> bool:
    """Whether ``kept`` (a (objects, derived...) tuple, or None) was derived from these very ``items``, one by one
    (identity: the kept tuple holds them, so no id is reused while it does)."""
    return (kept is not None and len(kept[0]) == len(items)
            and all(a is b for a, b in zip(kept[0], items)))


def step_fusable(plugin) -> bool:
    """Whether ``plugin`` lets the training step be one compiled graph: it answers none of ``STEP_CALLBACKS``, or
    only those a class declares in its own ``fused_step_callbacks`` (what it does there needs neither the
    gradients in ``.grad`` nor a loss added after the forward: e.g. it reads ``strategy.loss`` or the outputs). A
    declaration covers the callback as the declaring class has it, its own or inherited, not a subclass's
    override of it (a ``ForwardLossTerm`` whose subclass adds a loss in its own ``before_backward`` is not
    fusable). Avalanche's evaluation plugin passes: its metrics and loggers read the loss and the outputs, which a
    fused step sets as the eager one does (a metric reading the parameters' ``.grad`` would see None)."""
    from avalanche.training.plugins import EvaluationPlugin

    if isinstance(plugin, EvaluationPlugin):
        return True
    mro = type(plugin).__mro__
    for name in STEP_CALLBACKS:
        if getattr(type(plugin), name, None) is getattr(SupervisedPlugin, name, None):
            continue  # Avalanche's no-op
        owner = next(i for i, k in enumerate(mro) if name in vars(k))  # the class whose callback runs
        if not any(name in vars(k).get("fused_step_callbacks", ()) for k in mro[:owner + 1]):
            return False
    return True


class ForwardLossTerm(SupervisedPlugin):
    """A plugin whose loss term is computed from the training forward (the batch, the condition's trace):
    ``loss_term`` is its one override point. Eager, ``before_backward`` adds the term to ``strategy.loss``
    (after Avalanche's criterion, in the plugins' order); when the template has computed it with the forward
    (``ConditionedTemplate.loss_fused``, ``train.compile``), it adds nothing."""

    def loss_term(self, model: nn.Module, x: Tensor, y: Tensor, condition: Condition) -> Tensor:
        raise NotImplementedError

    def training_input(self, model: nn.Module, x: Tensor) -> Tensor:
        """The training batch as the forward and every loss term read it (default: as it is; the transform heads
        replace rows of it). Eager, the template applies it before the forward; compiled, inside the graph."""
        return x

    # its before_backward adds nothing when the loss was computed with the forward (a fused step's always is)
    fused_step_callbacks = ("before_backward",)

    def before_backward(self, strategy, **kw):
        if getattr(strategy, "loss_fused", False):
            return
        strategy.loss = strategy.loss + self.loss_term(strategy.model, strategy.mb_x, strategy.mb_y,
                                                       train_condition(strategy))


def training_loss(model: nn.Module, x: Tensor, task, condition: Condition, y: Tensor, rows: slice | None,
                  criterion, terms) -> tuple[Tensor, Tensor]:
    """(logits, loss) of a training step: each ``ForwardLossTerm``'s ``training_input`` on the batch ``x``, the
    forward under ``condition``, ``criterion`` on the ``rows`` the
    classification loss reads, plus each ``ForwardLossTerm``'s term in the plugins' order, as the eager
    callbacks sum them. The losses are computed in float32 outside autocast, as the eager loop computes them
    after ``AutocastPlugin`` has closed it."""
    for term in terms:
        x = term.training_input(model, x)
    out = model(x, task, condition=condition)
    with torch.autocast(x.device.type, enabled=False):
        out = out.float()
        loss = criterion(out, y) if rows is None else criterion(out[rows], y[rows])
        for term in terms:
            loss = loss + term.loss_term(model, x, y, condition)
    return out, loss


def _detach_trace(trace: ForwardTrace) -> None:
    """Every tensor of the trace detached, once the step's losses have read them: a compiled graph returns what
    it leaves in the trace, and an output with a gradient would make the step's graph one with a backward of its
    own (AOT autograd's wrapper, a zero tangent the size of the heads' input filled each step), where nothing can
    differentiate it after a step that has taken its gradients."""
    for name in ("feature", "extra_feature", "capacity"):
        value = getattr(trace, name)
        if value is not None:
            setattr(trace, name, value.detach())
    trace.activations = [a.detach() for a in trace.activations]


def compiled_training_loss(backend: str):
    """``training_loss`` through ``torch.compile(backend=backend, dynamic=True)``, one per backend: the
    network's masks, gates, HAT's compensation, the layers, the criterion and the plugins' terms are one
    graph, forward and backward (the masked pass alone, ``modnet.nets.models.compiled_masked_pass``, leaves
    the heads and losses eager: the Split-MNIST MLP's step cost 1.57x a plain step that way, 1.38x this way,
    ``scripts/step_floor_probe.py``). A graph per task (``modnet.nets.models.compile_once``)."""
    return compile_once(training_loss, backend)


def training_step(model: nn.Module, x: Tensor, task, condition: Condition, y: Tensor, rows: slice | None, criterion,
                  terms, params: list[Tensor], buffers: list | None, masked: list[int], multipliers: list[Tensor],
                  clip_norm: float | None, clamped: list[Tensor], bounds: list[float], lr: float, weight_decay: float,
                  momentum: float, dampening: float, nesterov: bool, maximize: bool) -> tuple[Tensor, Tensor]:
    """A whole training step: ``training_loss``, its gradients with respect to ``params``
    (``torch.autograd.grad``; a parameter the loss does not reach has none and takes no step, as with the eager
    backward, where its ``.grad`` stays None), then ``strategies.update.sgd_update`` with the plugins' terms
    (``masked``: positions in ``params`` of the gradients multiplied by ``multipliers``). The gradients are the
    step's own: ``.grad`` is not written. Returns (logits, loss), detached. ``buffers``: momentum buffers aligned
    with ``params``, a new one written into the list where the step made it. The gradients are taken outside
    autocast: the backward of a custom autograd function runs its products in float32, as after the eager
    loop's forward."""
    out, loss = training_loss(model, x, task, condition, y, rows, criterion, terms)
    _detach_trace(condition.trace)
    with torch.autocast(x.device.type, enabled=False):
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    live = [i for i, g in enumerate(grads) if g is not None]
    live_buffers = None if buffers is None else [buffers[i] for i in live]
    sgd_update([params[i] for i in live], [grads[i] for i in live], live_buffers,
               [grads[i] for i in masked if grads[i] is not None],
               [m for i, m in zip(masked, multipliers) if grads[i] is not None],
               clip_norm, clamped, bounds, lr, weight_decay, momentum, dampening, nesterov, maximize)
    if buffers is not None:
        for i, buf in zip(live, live_buffers):
            buffers[i] = buf
    return out.detach(), loss.detach()


def compiled_training_step(backend: str, device_type: str = "cpu"):
    """``training_step`` through ``torch.compile(backend=backend, dynamic=True)``, one per backend
    (``modnet.nets.models.compile_once``): forward, backward and update are one graph, a graph per task and
    learning rate (``strategies.update.compiled_sgd_update``). Dynamo traces ``torch.autograd.grad`` only with
    ``torch._dynamo.config.trace_autograd_ops`` on (off by default: a graph break), so the call turns it on.
    Inductor on the CPU: its C++ wrapper (``cpp_wrapper``), the graph's ~50 buffer allocations and ~40 kernel calls
    run as C++ instead of Python, the same kernels and numbers: on the bench's MLP ~3% of the step on average, the
    C++ wrapper's step 0.93-1.02x the Python wrapper's over five same-process A/B runs
    (``scripts/inductor_option_ab.py``, 10-20 rounds each; ``scripts/bench_results/history.md``, stop 58)."""
    options = {"cpp_wrapper": True} if backend == "inductor" and device_type == "cpu" else None
    return compile_once(training_step, backend, trace_autograd=True, options=options)


def train_condition(strategy) -> Condition:
    """The training condition of a strategy built on ``ConditionedTemplate`` (a clear error otherwise)."""
    condition = getattr(strategy, "train_condition", None)
    if condition is None:
        raise TypeError(f"this plugin needs a strategy built on strategies.template.ConditionedTemplate "
                        f"(its model takes a condition), got {type(strategy).__name__}")
    return condition
