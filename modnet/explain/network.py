"""Explanations of a trained modular network's own functional modules (what ``modnet explain`` draws on).

The modules explained are the ones the network gates: task t's ``ModuleGate`` assigns every unit of every
masked layer to one module and switches modules on and off per input. Nothing is re-clustered here.

* ``TaskPath``: the network's forward on one task (its HAT masks, its module gates, its head), with the gates
  held at their value for the input. The hard gates are piecewise constant in the input (zero derivative
  almost everywhere); the straight-through gradient they carry in training is a training device, not part
  of the function explained.
* ``gated_modules``: per masked layer, ``{"module{id}": unit ids}`` of a task's gate (persistent module ids).
* ``ModuleMaps``: one map per module at a masked layer's tap (``HATNet.unit_taps``: the layer's output after
  its mask and gates): Grad-CAM of the module's channels at a conv layer, gradient x input of the sum of
  the module's unit outputs at a fully connected layer (``modnet.explain.gradcam.ModuleGradCAM``).
* ``tap_class_importance``: NIWT's class importance (step 1) at a layer's tap, each class measured through
  the path of the task whose head scores it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from modnet.explain.gradcam import ClassGradCAM, ModuleGradCAM
from modnet.nets.models import HATNet

GRAD_CAM, INPUT_X_GRADIENT = "grad_cam", "input_x_gradient"


@dataclass
class TaskTest:
    """Test inputs of one task (head): ``x`` [n, ...], ``column`` [n] the head output of each input's class,
    ``classes[j]`` the dataset class id of head output j (the row of the class knowledge)."""

    x: Tensor
    column: Tensor
    classes: list[int]


class TaskPath(nn.Module):
    """``model`` on task ``task``'s path: HAT masks at s = smax, the task's module gates (held fixed for the
    input, see the module doc), the task's head. Output: the head's logits [B, head width]. Puts the
    network in eval mode (explanations are of the deployed network)."""

    def __init__(self, model: HATNet, task: int):
        super().__init__()
        if not 0 <= task < len(model.heads):
            raise ValueError(f"task {task} does not exist: the network has {len(model.heads)} heads")
        self.model, self.task = model.eval(), int(task)

    def forward(self, x: Tensor) -> Tensor:
        masks = [m.detach() for m in self.model.unit_masks(x, self.task)]
        _, feature = self.model.forward_units(x, masks, self.task, record=False)
        return self.model.heads[self.task](feature)


def gated_tasks(model: HATNet) -> list[int]:
    """The tasks that have module gates, in order."""
    if getattr(model, "gate", None) is None:
        return []
    return sorted(int(name[1:]) for name in model.gate.gates.keys())


def gated_modules(model: HATNet, task: int) -> list[dict[str, list[int]]]:
    """Per masked layer, task ``task``'s modules: ``{"module{id}": unit ids}`` (the gate's assignment; the
    same lists as ``modnet.nets.record.describe_network``), each named by its persistent id (results.json's
    ``module_ids`` and ``module_sharing``): a module shared by several tasks has one name in every file."""
    tasks = gated_tasks(model)
    if task not in tasks:
        raise ValueError(f"task {task} has no module gates; tasks with gates: {tasks or 'none'} "
                         "(a network trained with model.gate=none has no modules to explain)")
    gate = model.gate.task_gate(task)
    layers = []
    for i in range(gate.n_layers):
        assignment, ids = gate.assignment(i).cpu(), gate.module_ids(i).cpu().tolist()
        layers.append({f"module{ids[m]}": torch.nonzero(assignment == m).flatten().tolist()
                       for m in range(int(assignment.max()) + 1)})
    return layers


class ModuleMaps:
    """The maps of one masked layer's modules, on task ``task``'s path (see the module doc).

    ``kind``: ``"grad_cam"`` at a conv layer (maps [B, H, W] at the input's size; raw values with the captum
    backend, min-max scaled with pytorch_grad_cam), ``"input_x_gradient"`` at a fully connected layer (maps
    of the input's shape, signed).
    """

    def __init__(self, model: HATNet, task: int, layer: int, modules: Mapping[str, Sequence[int]],
                 backend: str = "captum"):
        self.path = TaskPath(model, task)
        self.cam = ModuleGradCAM(self.path, model.unit_taps[layer], modules, backend=backend)
        self.kind = GRAD_CAM if isinstance(model.masked[layer], nn.Conv2d) else INPUT_X_GRADIENT

    @property
    def names(self) -> list[str]:
        return list(self.cam.target_names)

    @torch.no_grad()
    def scores(self, x: Tensor, batch_size: int = 512) -> Tensor:
        """Each module's score on each input [n, M]: its channels' spatial means summed (conv) or its units'
        outputs summed (fully connected); 0 where the gate switched the module off."""
        device = self.cam.device
        return torch.cat([self.cam.scores(x[i:i + batch_size].to(device)) for i in range(0, x.shape[0], batch_size)])

    def __call__(self, x: Tensor, targets: Sequence[str | int]) -> Tensor:
        """The map of module ``targets[b]`` on input ``x[b]``."""
        if self.kind == GRAD_CAM:
            return self.cam(x, list(targets), normalize=self.cam.backend != "captum")
        return self.cam.input_x_gradient(x, list(targets))


class ClassMaps(ModuleMaps):
    """The maps of task ``task``'s classes at one masked layer's tap, as ``ModuleMaps`` draws its modules': Grad-CAM
    of a class's logit at a conv layer (where the evidence for the class lies), gradient x input of it at a fully
    connected one. Targets: the head's output (column) of each class."""

    def __init__(self, model: HATNet, task: int, layer: int, class_names: Sequence[str], backend: str = "captum"):
        self.path = TaskPath(model, task)
        self.cam = ClassGradCAM(self.path, model.unit_taps[layer], class_names, backend=backend)
        self.kind = GRAD_CAM if isinstance(model.masked[layer], nn.Conv2d) else INPUT_X_GRADIENT


def tap_class_importance(model: HATNet, layer: int, tests: Sequence[TaskTest | None],
                         batch_size: int = 256) -> tuple[Tensor, list[int], list[int]]:
    """NIWT's class importance at masked layer ``layer``'s tap: for every task with test inputs and every
    class of its head that has some, the mean over those inputs of d logit / d tap output (averaged over
    space). Returns (importance [K, units], the class id of each row, the task of each row)."""
    from modnet.methods.niwt import class_importance

    rows, classes, tasks = [], [], []
    for t, test in enumerate(tests):
        if test is None or test.x.shape[0] == 0:
            continue
        importance = class_importance(TaskPath(model, t), model.unit_taps[layer], test.x, test.column,
                                      len(test.classes), batch_size)
        present = torch.unique(test.column).tolist()
        rows.append(importance[torch.as_tensor(present, device=importance.device)])
        classes += [test.classes[c] for c in present]
        tasks += [t] * len(present)
    if not rows:
        raise ValueError("no task has test inputs: class importance needs some")
    return torch.cat(rows), classes, tasks


__all__ = ["TaskTest", "TaskPath", "gated_tasks", "gated_modules", "ModuleMaps", "tap_class_importance",
           "GRAD_CAM", "INPUT_X_GRADIENT"]
