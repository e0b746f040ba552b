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
import pickle
from pathlib import Path

import torch
from torch import nn

from modnet.nets.models import HATNet


USED_SHARE = 0.05  # a task uses a module it switches on for at least 5% of its inputs and keeps units of


def _layer_modules(model: HATNet, task: int | None) -> list[dict]:
    from modnet.nets.modules import MODULE_METHODS

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
            methods = sorted({MODULE_METHODS[int(c)] for c in gate.module_methods(i).tolist()})
            entry["module_method"] = "+".join(methods)
            entry["module_ids"] = gate.module_ids(i).cpu().tolist()
            outliers = getattr(gate, f"outliers_{i}", None)
            entry["outliers"] = int(outliers) if outliers is not None else 0
        layers.append(entry)
    return layers


def module_sharing(model: HATNet) -> list[dict]:
    """Per masked layer: how many distinct modules the tasks' gates hold (``modules_total``), how many of
    them more than one task uses (``shared``: switched on for >= 5% of a task's inputs with units its mask
    keeps, as recorded after the task; a gate without that record counts its modules as used), which tasks
    use each module (``used_by``: global module id -> tasks), and how the modules were made
    (``module_method``: SynC, the k-means fallback or the few units left, with counts)."""
    from modnet.nets.modules import MODULE_METHODS

    out = []
    if model.gate is None or not len(model.gate.gates):
        return out
    for i in range(len(model.masked)):
        used_by: dict[int, list[int]] = {}
        made: dict[int, str] = {}
        for name, gate in model.gate.gates.items():
            task = int(name[1:])
            ids = gate.module_ids(i).cpu().tolist()
            usage, kept = getattr(gate, f"usage_{i}", None), getattr(gate, f"kept_{i}", None)
            for m, gid in enumerate(ids):
                made.setdefault(gid, MODULE_METHODS[int(gate.module_methods(i)[m])])
                used = usage is None or (float(usage[m]) >= USED_SHARE and int(kept[m]) > 0)
                if used:
                    used_by.setdefault(gid, []).append(task)
        counts = {meth: sum(1 for v in made.values() if v == meth) for meth in MODULE_METHODS}
        out.append({"modules_total": len(made), "shared": sum(1 for t in used_by.values() if len(t) > 1),
                    "used_by": {str(k): v for k, v in sorted(used_by.items())},
                    "module_method": "+".join(m for m in MODULE_METHODS if counts[m]),
                    "made_by": {m: c for m, c in counts.items() if c}})
    return out


def describe_network(model: nn.Module) -> dict:
    """``{"class", "layers": [{"units", "modules": [[unit ids], ...], "module_method", "outliers",
    "module_ids"}], "parameters", "module_sharing"}``. For a modular network the layers are its masked
    layers and the modules those of the latest task's gate (``modules_by_task`` holds every task's;
    ``module_sharing`` per layer the modules of all tasks, how many are shared, which method made them;
    ``transform_heads``, where it trains CSI's heads: how their batch was made, ``transform_copies`` as
    resolved, and whether they pick the task); for a plain network its hidden linear and conv layers, without
    modules."""
    out: dict = {"class": type(model).__name__, "parameters": int(sum(p.numel() for p in model.parameters()))}
    if isinstance(model, HATNet):
        out["layers"] = _layer_modules(model, None)
        if model.gate is not None and len(model.gate.gates) > 1:
            out["modules_by_task"] = {k[1:]: [layer["modules"] for layer in _layer_modules(model, int(k[1:]))]
                                      for k in model.gate.gates.keys()}
        sharing = module_sharing(model)
        if sharing:
            out["module_sharing"] = sharing
        ood = getattr(model, "task_ood", None)
        if ood is not None:
            out["transform_heads"] = {"copies": ood.copies, "transforms": list(ood.transforms), "labels": ood.labels,
                                      "rows": ood.rows,
                                      # inference reads them: they pick the task, or their score is one of the
                                      # feature Gaussians' (task_inference.method=features, the class-incremental
                                      # default): not only task_inference.method=ood
                                      "predicts_task": bool(model.task_ood_read_at_inference())}
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

    try:
        obj = torch.load(Path(path), map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as e:  # truncated, empty, or not torch.save's
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} is unreadable ({reason}): a truncated or foreign file; run the modnet strategy "
                         "of that run again, or choose another run_seed / run_dir") from None
    if not isinstance(obj, dict) or "structure" not in obj:
        raise ValueError(f"{path} holds no modular network (a baseline's weights?); explain a run of the modnet "
                         "strategy")
    if cfg is None or not hasattr(cfg, "model"):
        raise TypeError("load_network(path, cfg) rebuilds the network from the config it was built with (a run's "
                        "config.yaml via OmegaConf.load, or the config given to build_modular_network); a network "
                        "built by hand is reloaded by building it again and loading torch.load(path)['model']")
    st = json.loads(obj["structure"])
    model = build_modular_network(cfg, st["input_shape"], st["task_classes"], st["class_incremental"])
    if model.gate is not None:
        model.gate.rebuild_from_state(obj["model"], "gate.")
    model.load_state_dict(obj["model"])
    return model.eval()
