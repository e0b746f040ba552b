"""A trained network as a record (results.json's ``network``) and as a file a later command can load.

``describe_network``: the class, every layer's units and the functional modules the network gates (unit ids
per module, how the modules were decided, SynC's outlier count), the parameter count. ``save_network`` /
``load_network``: the state dict (tensors only, loaded with ``weights_only=True``) with the structure that
is not in the config (heads grown by NIWT, the gates created per task from a clustering), so ``modnet
explain run_dir=PATH`` explains exactly the network a ``modnet cl`` or ``modnet gzsl`` run trained.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from modnet.nets.models import HATNet


def _layer_modules(model: HATNet, task: int | None) -> list[dict]:
    gate = None
    if model.gate is not None:
        tasks = sorted(int(k[1:]) for k in model.gate.gates.keys())
        if tasks:
            gate = model.gate.task_gate(tasks[-1] if task is None else task)
    layers = []
    for i, layer in enumerate(model.masked):
        entry = {"units": int(layer.n_units), "modules": [], "module_method": "none", "outliers": 0}
        if gate is not None:
            a = gate.assignment(i).cpu()
            entry["modules"] = [torch.nonzero(a == m).flatten().tolist() for m in range(int(a.max()) + 1)]
            fallback = getattr(gate, f"kmeans_fallback_{i}", None)
            entry["module_method"] = "kmeans" if fallback is not None and bool(fallback) else "sync"
            outliers = getattr(gate, f"outliers_{i}", None)
            entry["outliers"] = int(outliers) if outliers is not None else 0
        layers.append(entry)
    return layers


def describe_network(model: nn.Module) -> dict:
    """``{"class", "layers": [{"units", "modules": [[unit ids], ...], "module_method", "outliers"}],
    "parameters"}``. For a modular network the layers are its masked layers and the modules those of the
    latest task's gate (``modules_by_task`` holds every task's); for a plain network its hidden linear and
    conv layers, without modules."""
    out: dict = {"class": type(model).__name__, "parameters": int(sum(p.numel() for p in model.parameters()))}
    if isinstance(model, HATNet):
        out["layers"] = _layer_modules(model, None)
        if model.gate is not None and len(model.gate.gates) > 1:
            out["modules_by_task"] = {k[1:]: [layer["modules"] for layer in _layer_modules(model, int(k[1:]))]
                                      for k in model.gate.gates.keys()}
    else:
        hidden = [m for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
                  and "classifier" not in name and "head" not in name]
        out["layers"] = [{"units": int(m.out_features if isinstance(m, nn.Linear) else m.out_channels),
                          "modules": [], "module_method": "none", "outliers": 0} for m in hidden]
    return out


def _structure(model: HATNet, input_shape) -> dict:
    return {"class": type(model).__name__, "input_shape": list(input_shape),
            "task_classes": [list(c) for c in model.task_classes], "class_incremental": model.class_incremental}


def save_network(model: nn.Module, path: Path, input_shape=None) -> None:
    """The state dict and (for a modular network) its structure, written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    obj = {"model": model.state_dict()}
    if isinstance(model, HATNet):
        obj["structure"] = json.dumps(_structure(model, input_shape or []))
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_network(path: Path, cfg) -> HATNet:
    """The modular network saved by ``save_network``, rebuilt from ``cfg`` (the run's config: widths, gate
    settings) and the saved structure (heads, per-task gates), its weights loaded."""
    from modnet.nets.build import build_modular_network

    obj = torch.load(Path(path), map_location="cpu", weights_only=True)
    if "structure" not in obj:
        raise ValueError(f"{path} holds no modular network (a baseline's weights?); explain a run of the modnet "
                         "strategy")
    st = json.loads(obj["structure"])
    model = build_modular_network(cfg, st["input_shape"], st["task_classes"], st["class_incremental"])
    if model.gate is not None:
        model.gate.rebuild_from_state(obj["model"], "gate.")
    model.load_state_dict(obj["model"])
    return model.eval()
