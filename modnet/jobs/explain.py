"""``modnet explain``: Grad-CAM maps and attribute names of the functional modules of a trained modular network.

Where the network comes from (configs/explain.yaml):
* ``run_dir=PATH``: the final network of a finished ``modnet cl`` run, or of a ``modnet gzsl`` run that
  saves it the same way: ``PATH/checkpoints/modnet_seed{S}_final.pt`` rebuilt by
  ``modnet.nets.record.load_network`` from the run's ``PATH/config.yaml``; its test inputs from the run's
  benchmark, rebuilt with the same seed (a cl run: ``scenarios.build_benchmark``; a gzsl run:
  ``scenarios.zsl.load_zsl_from_config``).
* no ``run_dir``: a modular network trained here with the ``modnet`` strategy (``make_strategy`` and
  ``run_experiences``, the network and strategy settings of configs/cl.yaml) on the seen classes of ``data``.

What is explained: the modules that one task's gates switch (``explain.task``, default the latest task),
per masked layer (``modnet.explain.network``), exactly as the run's results.json records them (checked):
1. a map per module, on the test input that drives the module most: Grad-CAM of its channels at a conv
   layer, gradient x input of the sum of its unit outputs at a fully connected layer; drawn as a picture
   when the input is an image (digit vectors are 8x8 images), as bars over the input's entries otherwise;
2. words: NIWT's knowledge -> importance map, fitted at the layer's output on the run's classes (class
   knowledge of the benchmark: digits' seven segments and loops, an npz's ``class_attributes``, xlsa17's
   attributes); its inverse (importance -> knowledge) names the attributes of the module's share of the
   class importance, the map's offset left out (``modnet.explain.gradcam.module_attributes``), and each class's
   attributes from the inverse fitted on the other classes, with its agreement with the class's own
   (``modnet.methods.niwt.held_out_knowledge``, ``knowledge_agreement``).
Writes explanations.md, explanations.json, one PNG per module, module_maps.npz (each map and its input).
"""
from __future__ import annotations

import difflib
import math
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from modnet.config import ConfigError, compose, resolve_device
from modnet.explain.gradcam import (TIE, module_attributes, rank_attributes, save_attribution_bars,
                                    save_map_figure, save_overlay_grid, write_module_explanations_md)
from modnet.explain.network import (GRAD_CAM, INPUT_X_GRADIENT, ClassMaps, ModuleMaps, TaskTest, gated_modules,
                                    gated_tasks, tap_class_importance)
from modnet.nets.models import HATNet
from modnet.rundir import check_run_dir, results_json, run_network_record

# the strategy whose final network a run folder holds (checkpoints/modnet_seed{S}_final.pt)
RUN_STRATEGY = "modnet"
# what a module's map is, at a conv layer (Grad-CAM) and at a fully connected one: (short name, description)
MAP_NAMES = {GRAD_CAM: ("Grad-CAM", "Grad-CAM of the module's channels"),
             INPUT_X_GRADIENT: ("gradient x input", "gradient x input of the sum of the module's unit outputs")}


@dataclass
class ClassKnowledge:
    """Class-level domain knowledge: ``matrix`` [C, A] (row = dataset class id), names of its columns and rows."""

    matrix: Tensor
    attribute_names: list[str]
    class_names: list[str]
    raw: Tensor | None = None  # the rows before their L2 normalisation, where kept: a column's spread over classes


@dataclass
class ExplainedNetwork:
    """A trained modular network with what explaining it needs: test inputs per task (head), the class
    knowledge (None: no words), the picture shape of an input (None: bar charts), the run's record of the
    network (results.json's ``network``) and where it came from."""

    model: HATNet
    tests: list[TaskTest | None]
    knowledge: ClassKnowledge | None
    picture_shape: tuple[int, ...] | None
    record: dict | None
    source: dict
    unseen_classes: tuple[int, ...] = ()  # a gzsl run's: NIWT built their head rows from their attributes


def _check_config(cfg: DictConfig) -> None:
    from modnet.validate import check_explain_options, check_explain_run_dir

    check_explain_options(cfg)  # modnet.validate's, also for a config passed to run_explain directly
    if cfg.run_dir:  # before the output folder is made
        check_explain_run_dir(cfg)
    import matplotlib  # before training: a colour map name matplotlib lacks stopped the run at its first plot

    for key in ("explain.cmap", "explain.signed_cmap"):
        name = OmegaConf.select(cfg, key)
        if name not in matplotlib.colormaps:
            close = difflib.get_close_matches(str(name), list(matplotlib.colormaps), n=3)
            raise ConfigError(f"{key}={name} is not a matplotlib colour map"
                              + (f"; did you mean {', '.join(close)}?" if close else
                                 "; see matplotlib.colormaps (e.g. jet, viridis, RdBu_r)"))


def _load_images(cfg: DictConfig):
    from scenarios.zsl import load_zsl_from_config

    data = load_zsl_from_config(cfg.benchmark, seed=cfg.seed, images=True)
    if data.x_train.dim() != 4:
        raise ValueError(f"Grad-CAM needs images [n, c, h, w]; {data.name} gives feature vectors of shape "
                         f"{tuple(data.x_train.shape)}. Use benchmark=digits, or benchmark=npz with images.")
    return data


# ---------------------------------------------------------------------------------------------------------
# The network: from a finished run, or trained here
# ---------------------------------------------------------------------------------------------------------
def load_run(cfg: DictConfig, device: torch.device) -> ExplainedNetwork:
    """The final modular network of the run in ``cfg.run_dir``, with its benchmark's test inputs."""
    from modnet.nets.record import load_network

    run_dir = check_run_dir(cfg.run_dir)
    run_cfg = OmegaConf.load(run_dir / "config.yaml")
    seed, results, record = run_network_record(run_dir, cfg.run_seed)
    checkpoint = run_dir / "checkpoints" / f"{RUN_STRATEGY}_seed{seed}_final.pt"
    if not checkpoint.is_file():
        found = sorted(p.name for p in (run_dir / "checkpoints").glob("*_final.pt"))
        raise FileNotFoundError(f"run_dir {run_dir} has no modnet checkpoint checkpoints/{checkpoint.name} (final "
                                f"networks there: {', '.join(found) or 'none'}); run the modnet strategy to the "
                                "end, or choose run_seed")
    model = load_network(checkpoint, run_cfg).to(device).eval()
    limit, bcfg = cfg.explain.max_test_samples, run_cfg.benchmark
    source = {"run_dir": str(run_dir), "checkpoint": str(checkpoint), "seed": seed}
    if "strategies" in results:  # a continual-learning run: its Avalanche benchmark
        from scenarios import build_benchmark

        info = build_benchmark(bcfg, run_cfg.scenario, seed)
        return ExplainedNetwork(model, stream_tests(info, model, limit, seed), benchmark_knowledge(bcfg),
                                picture_shape(bcfg.name, info.input_shape), record, source)
    data = zsl_run_data(bcfg, seed)  # a zero-shot run: its GZSL data, heads over dataset class ids
    knowledge = ClassKnowledge(data.attributes, data.attribute_names or
                               [f"attribute{a}" for a in range(data.attributes.shape[1])],
                               data.class_names or [str(c) for c in range(data.n_classes)], data.raw_attributes)
    return ExplainedNetwork(model, zsl_tests(data, model, limit, seed), knowledge,
                            picture_shape(bcfg.name, data.input_shape), record, source,
                            tuple(int(c) for c in data.unseen_classes))


def train_here(cfg: DictConfig, device: torch.device) -> ExplainedNetwork:
    """A modular network trained here with the modnet strategy on the seen classes of ``cfg.benchmark``, split into
    ``train.experiences`` experiences; the network and strategy settings are configs/cl.yaml's, with
    ``train.cl_overrides``."""
    from modnet.eval.metrics import build_evaluator, shows_progress_bars
    from modnet.nets.record import describe_network
    from modnet.runner.evaluation import stream_evaluator
    from modnet.runner.runner import ExperienceLine, make_strategy, run_experiences, set_seed
    from scenarios.base import split_benchmark

    data = _load_images(cfg)
    t = cfg.train
    info = split_benchmark(f"{data.name}-seen", data.x_train, data.y_train, data.x_test_seen, data.y_test_seen,
                           t.experiences, t.scenario, cfg.seed, experiences_key="train.experiences")
    train_cfg = compose("cl", [f"scenario={t.scenario}", f"strategies=[{RUN_STRATEGY}]", f"seed={cfg.seed}",
                               f"train.epochs={t.epochs}", "progress=false", *t.cl_overrides])
    set_seed(cfg.seed)
    bars = shows_progress_bars(cfg.progress)
    # Avalanche's progress bars on a terminal (build_evaluator drops them elsewhere), else a line per experience
    evaluator, accuracy = build_evaluator(["interactive"], Path(cfg.output_dir), bars)
    strategy = make_strategy(RUN_STRATEGY, train_cfg, info, device, evaluator)
    bm = info.benchmark
    hooks = [] if bars else [ExperienceLine(f"[explain seed {cfg.seed}] {RUN_STRATEGY}", info.n_experiences)]
    run = run_experiences(strategy, bm.train_stream, stream_evaluator(bm.test_stream, accuracy), seed=cfg.seed,
                          hooks=hooks)
    model = strategy.model.eval()
    knowledge = ClassKnowledge(data.attributes, list(data.attribute_names), list(data.class_names),
                               data.raw_attributes)
    source = {"trained_here": {"data": data.name, "classes": data.seen_classes, "experiences": t.experiences,
                               "scenario": t.scenario, "epochs": t.epochs, "accuracy_matrix": run.rows,
                               "train_seconds": run.train_seconds}}
    return ExplainedNetwork(model, stream_tests(info, model, cfg.explain.max_test_samples, cfg.seed), knowledge,
                            picture_shape(data.name, info.input_shape), describe_network(model), source)


# ---------------------------------------------------------------------------------------------------------
# Test inputs per task, class knowledge, picture shape
# ---------------------------------------------------------------------------------------------------------
def _subset(n: int, limit: int, seed: int) -> Tensor:
    """All of n indices, or ``limit`` of them drawn without replacement (fixed by ``seed``)."""
    if n <= limit:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit].sort().values


def stream_tests(info, model: HATNet, limit: int, seed: int) -> list[TaskTest | None]:
    """Per head t, up to ``limit`` inputs of test experience t, each with its head output; head outputs are
    mapped back to dataset class ids through Avalanche's class mapping (task-incremental heads count from 0)."""
    bm = info.benchmark
    tests: list[TaskTest | None] = []
    for t, exp in enumerate(list(bm.test_stream)[:len(model.heads)]):
        ds = exp.dataset
        picked = _subset(len(ds), limit, seed).tolist()
        samples = [ds[i] for i in picked]
        x = torch.stack([s[0] for s in samples]).cpu()
        head = [int(c) for c in model.task_classes[t]]
        column_of = {c: j for j, c in enumerate(head)}
        column = torch.tensor([column_of[int(s[1])] for s in samples], dtype=torch.long)
        original = {}
        if hasattr(bm, "class_mapping") and hasattr(bm, "original_classes_in_exp"):
            original = {int(bm.class_mapping[c]): int(c) for c in bm.original_classes_in_exp[t]}
        tests.append(TaskTest(x, column, [original.get(c, c) for c in head]))
    return tests


def zsl_run_data(bcfg, seed: int):
    """The GZSL data of a zero-shot run, from its ``benchmark`` config (``scenarios.zsl.load_zsl_from_config``)."""
    from scenarios.zsl import load_zsl_from_config

    return load_zsl_from_config(bcfg, seed=seed)


def zsl_tests(data, model: HATNet, limit: int, seed: int) -> list[TaskTest | None]:
    """Per head, up to ``limit`` test inputs (seen and unseen) of the dataset classes it scores."""
    x = torch.cat([data.x_test_seen, data.x_test_unseen])
    y = torch.cat([data.y_test_seen, data.y_test_unseen])
    tests: list[TaskTest | None] = []
    for head in model.task_classes:
        head = [int(c) for c in head]
        picked = torch.nonzero(torch.isin(y, torch.tensor(head))).flatten()
        if picked.numel() == 0:
            tests.append(None)
            continue
        picked = picked[_subset(picked.numel(), limit, seed)]
        column_of = {c: j for j, c in enumerate(head)}
        tests.append(TaskTest(x[picked], torch.tensor([column_of[int(c)] for c in y[picked]]), head))
    return tests


def benchmark_knowledge(bcfg) -> ClassKnowledge | None:
    """Class knowledge of a continual-learning benchmark: digits' seven segments and closed loops, an npz's
    ``class_attributes`` (optional ``attribute_names``, ``class_names``); None where there is none."""
    from modnet.methods.knowledge import attribute_matrix
    from scenarios.zsl import digit_attributes

    if bcfg.name == "digits":
        attributes, names = digit_attributes()
        return ClassKnowledge(attribute_matrix(attributes, missing_value=None), names, [str(d) for d in range(10)],
                              attribute_matrix(attributes, missing_value=None, normalize=False))
    if bcfg.name == "npz" and bcfg.get("path"):
        with np.load(Path(bcfg.path).expanduser(), allow_pickle=False) as f:
            if "class_attributes" not in f.files:
                return None
            attributes = attribute_matrix(np.asarray(f["class_attributes"], dtype=np.float64))
            raw = attribute_matrix(np.asarray(f["class_attributes"], dtype=np.float64), normalize=False)
            names = [str(a) for a in f["attribute_names"]] if "attribute_names" in f.files else \
                [f"attribute{a}" for a in range(attributes.shape[1])]
            classes = [str(c) for c in f["class_names"]] if "class_names" in f.files else \
                [str(c) for c in range(attributes.shape[0])]
        return ClassKnowledge(attributes, names, classes, raw)
    return None


def picture_shape(benchmark: str, input_shape) -> tuple[int, ...] | None:
    """The image shape (C, H, W) an input is drawn in: its own when it is an image; 1x8x8 for the digits'
    64-d vectors (they are the 8x8 images flattened); None (bar charts) for other vectors."""
    input_shape = tuple(int(s) for s in input_shape)
    if len(input_shape) == 3:
        return input_shape
    if benchmark == "digits" and int(np.prod(input_shape)) == 64:
        return (1, 8, 8)
    return None


# ---------------------------------------------------------------------------------------------------------
# Explaining the modules
# ---------------------------------------------------------------------------------------------------------
def _explained_task(model: HATNet, task: int | None) -> int:
    tasks = gated_tasks(model)
    if not tasks:
        raise ValueError("the network has no module gates (trained with model.gate=none?): no modules to explain")
    if task is None:
        return tasks[-1]
    if int(task) not in tasks:
        raise ConfigError(f"config explain.task={task}: the tasks with module gates are {tasks}")
    return int(task)


def _explained_layers(layers, n_layers: int) -> list[int]:
    if layers is None:
        return list(range(n_layers))
    chosen = [int(layer) for layer in layers]
    if not chosen or any(not 0 <= layer < n_layers for layer in chosen):
        raise ConfigError(f"config explain.layers={list(layers)}: give masked layer indices in [0, {n_layers}) "
                          "or null for all")
    return sorted(set(chosen))


def _check_record(layer_modules: list[dict[str, list[int]]], record: dict | None, task: int, model: HATNet) -> None:
    """The modules about to be explained must be those the run recorded for the task (results.json)."""
    by_task = (record or {}).get("modules_by_task") or {}
    if str(task) in by_task:
        recorded = by_task[str(task)]
    elif record is not None and task == gated_tasks(model)[-1]:
        recorded = [layer["modules"] for layer in record["layers"]]
    else:
        return
    gated = [list(modules.values()) for modules in layer_modules]
    if recorded != gated:
        raise ValueError(f"the loaded network's task-{task} gates hold other modules than results.json records; "
                         "the checkpoint and results.json are from different runs")


def _draw(path: Path, x: Tensor, module_map: Tensor, kind: str, shape, title: str, cfg: DictConfig) -> None:
    """One module's PNG: a picture (input, map with colour bar, overlay) or, without an image shape, bars."""
    e = cfg.explain
    if shape is None:
        save_attribution_bars(x, module_map, path, title)
        return
    heat = module_map if kind != INPUT_X_GRADIENT else module_map.reshape(shape).sum(0)  # channels summed
    save_map_figure(x.reshape(shape), heat, path, title, signed=kind == INPUT_X_GRADIENT, cmap=e.cmap,
                    signed_cmap=e.signed_cmap, alpha=e.alpha,
                    size=tuple(e.display_size) if e.display_size else None)


def _grid_note(units_on: bool, gate_on: bool) -> str:
    """What a module's panel title adds in a layer's grid: masked off for the task (no unit of its HAT mask on),
    gate off on the grid's input, both or neither."""
    notes = [n for n, on in (("masked off", units_on), ("gate off", gate_on)) if not on]
    return f" ({', '.join(notes)})" if notes else ""


def _words(net: ExplainedNetwork, layer: int, task: int, modules: dict[str, list[int]], cfg: DictConfig):
    """(per module, per class of the task) attributes through NIWT's inverse map at the layer's tap, each class's
    agreement with its own knowledge, and the groups of attribute names the map's classes cannot tell apart
    (reported as one entry each). ``modules``: each module's units whose HAT mask is on for the task (a
    masked-off unit passes nothing on, whatever the score's gradient at the tap says; a module with none is left
    out). A class's attributes come from the inverse map fitted on the other classes (``held_out_knowledge``):
    fitted on the class itself, the map gave back its own knowledge row whatever the network does."""
    from modnet.methods.knowledge import tied_attribute_groups
    from modnet.methods.niwt import held_out_knowledge, knowledge_agreement

    importance, classes, tasks = tap_class_importance(net.model, layer, net.tests, cfg.niwt.importance_batch_size)
    knowledge = net.knowledge
    if max(classes) >= knowledge.matrix.shape[0]:
        raise ValueError(f"class {max(classes)} has no row in the class knowledge ({knowledge.matrix.shape[0]} rows)")
    k_rows = knowledge.matrix.to(importance.device)[classes]  # the fitted classes' knowledge, one row each
    own = [i for i, t in enumerate(tasks) if t == task]
    e = cfg.explain
    # attributes the map's classes cannot tell apart: one entry each, named together (not one picked at random)
    tied = tied_attribute_groups(knowledge.matrix[classes])
    # the task's classes' attribute rows as given (before the L2 normalisation of each row, where kept): an
    # attribute constant over them explains no difference between them (normalised, a column of ones followed
    # 1 / |k_c| and was named by modules and classes: digits' segment_lower_right, on for 8 of the 8 seen digits)
    given = (knowledge.raw if knowledge.raw is not None else knowledge.matrix).to(importance.device)[classes]
    constant = (given[own].std(0, unbiased=False) <= 1e-6).nonzero().flatten().tolist() if len(own) > 1 else []
    active = {m: units for m, units in modules.items() if units}
    per_module = module_attributes(importance[own], active, knowledge.attribute_names, given[own],
                                   e.top_k, positive_only=e.positive_only, tied=tied,
                                   exclude=constant) if active and len(own) > 1 else {}
    per_class, agreement = {}, {}
    if len(classes) >= 3:  # two classes to fit the map on, one held out
        held = held_out_knowledge(k_rows, importance, cfg.niwt.inverse_ridge)  # float32 inside
        fit = knowledge_agreement(held, k_rows)
        scores = held.clone()
        if constant:
            scores[:, torch.as_tensor(constant, device=scores.device)] = -math.inf  # named by no class either
        for i in own:
            name = knowledge.class_names[classes[i]]
            per_class[name] = [(a, s) for a, s in rank_attributes(scores[i].cpu(), knowledge.attribute_names,
                                                                   e.top_k, tied) if math.isfinite(s)]
            agreement[name] = float(fit[i])
    return (per_module, per_class, agreement, [[knowledge.attribute_names[j] for j in g] for g in tied],
            [knowledge.attribute_names[j] for j in constant])


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


@dataclass
class LayerExplanation:
    """One masked layer's explanation: per module its entry of explanations.json (units, attributes, PNG),
    the share of the task's test inputs its gate lets through and its units with the task's HAT mask on;
    the attributes of each class of the task; the kind of map; the maps and their inputs (module_maps.npz);
    the layer's width."""

    modules: dict[str, dict]
    gate_on: dict[str, float]
    units_on: dict[str, int]
    per_class: dict[str, list]
    agreement: dict[str, float]
    kind: str
    arrays: dict[str, np.ndarray]
    n_units: int
    tied: list[list[str]]
    constant: list[str] = field(default_factory=list)  # attributes constant over the task's classes: no words
    class_maps: dict[str, str] = field(default_factory=dict)  # class name -> the PNG of its logit's map

    @property
    def note(self) -> str:
        return (f"{self.n_units} units in {len(self.modules)} modules. Maps: {MAP_NAMES[self.kind][1]}, on the test "
                "input that drives the module most. Gate on (share of the task's test inputs): "
                + ", ".join(f"{m} {100 * v:.0f}%" for m, v in self.gate_on.items())
                + ". Units whose HAT mask is on for the task: "
                + ", ".join(f"{m} {self.units_on[m]}/{len(e['units'])}" for m, e in self.modules.items()) + ".")


def explain_layer(net: ExplainedNetwork, task: int, layer: int, modules: dict[str, list[int]], cfg: DictConfig,
                  out: Path) -> LayerExplanation:
    """Maps (one PNG per module, and the grid) and words of one masked layer's modules of task ``task``."""
    model, test, e = net.model, net.tests[task], cfg.explain
    name = f"layer{layer}"
    device = next(model.parameters()).device
    with torch.no_grad():
        gates = model.gate.task_gate(task).layer_module_gates(test.x.flatten(1).to(device), layer).cpu()
        hat_on = (model.masks(task)[layer] > 0.5).cpu()  # the task's HAT mask at s = smax
    maps = ModuleMaps(model, task, layer, modules, e.backend)
    examples = maps.scores(test.x).argmax(dim=0).cpu()  # per module, the test input driving it most
    inputs = test.x[examples]
    module_maps = maps(inputs, maps.names).cpu()
    units_on = {m: [u for u in units if hat_on[u]] for m, units in modules.items()}
    # a module whose gate is off on every test input of the task passes nothing on for it, as a masked-off one:
    # no words (its units' tap gradients, taken after the gate, still gave it importance and attributes)
    gate_never = {m: not bool(gates[:, j].any()) for j, m in enumerate(maps.names)}
    words_units = {m: [] if gate_never[m] else units for m, units in units_on.items()}
    per_module, per_class, agreement, tied, constant = (_words(net, layer, task, words_units, cfg)
                                                        if net.knowledge else ({}, {}, {}, [], []))
    entries, arrays = {}, {}
    for j, module in enumerate(maps.names):
        png = f"{name}_{_slug(module)}.png"
        off = not units_on[module]
        title = (f"task {task}, {name}, {module}: {len(modules[module])} units ({MAP_NAMES[maps.kind][0]})"
                 + (", every unit masked off for the task" if off else ""))
        _draw(out / png, inputs[j], module_maps[j], maps.kind, net.picture_shape, title, cfg)
        entries[module] = {"units": modules[module], "attributes": [[a, s] for a, s in per_module.get(module, [])],
                           "image": png}
        if off:
            entries[module]["note"] = (f"every unit's HAT mask is off for task {task}: the module passes nothing on, "
                                       "so it has no attributes and its map is flat")
        elif gate_never[module]:
            entries[module]["note"] = (f"the module's gate is off on every test input of task {task}: it passes "
                                       "nothing on for the task, so it has no attributes and its map is flat")
        elif net.knowledge and not per_module.get(module):
            entries[module]["note"] = (f"no attribute tracks this module's importance over task {task}'s classes "
                                       "(none scores above zero: its importance is the same for every class, "
                                       "nil, or goes against each attribute): no attributes")
        arrays[f"{name}/{module}/map"] = module_maps[j].numpy()
        arrays[f"{name}/{module}/input"] = inputs[j].numpy()
    class_maps = {}
    if e.class_maps:  # per class of the task, where the evidence for its logit lies on one of its test inputs
        cams = ClassMaps(model, task, layer, [str(c) for c in test.classes], e.backend)
        columns = sorted(set(test.column.tolist()))
        first = [int((test.column == j).nonzero()[0]) for j in columns]  # each class's first test input
        class_heat = cams(test.x[first], columns).cpu()
        for j, i, heat in zip(columns, first, class_heat):
            cname = net.knowledge.class_names[test.classes[j]] if net.knowledge else str(test.classes[j])
            png = f"{name}_class_{_slug(cname)}.png"
            _draw(out / png, test.x[i], heat, cams.kind, net.picture_shape,
                  f"task {task}, {name}: class {cname}'s logit ({MAP_NAMES[cams.kind][0]}) on a test input of it", cfg)
            class_maps[cname] = png
            arrays[f"{name}/class_{cname}/map"] = heat.numpy()
            arrays[f"{name}/class_{cname}/input"] = test.x[i].numpy()
    if e.module_grids and net.picture_shape is not None:
        # every module on the one test input on which most of them are switched on
        index = int(gates.sum(1).argmax())
        shared = test.x[index]
        grid = maps(shared[None].expand(len(maps.names), *shared.shape), maps.names).cpu()
        # a module masked off for the task passes nothing on: its flat map is named so, not left to look like a
        # drawing fault beside the others
        heat = {m + _grid_note(bool(units_on[m]), bool(gates[index, j])):
                g if maps.kind != INPUT_X_GRADIENT else g.reshape(net.picture_shape).sum(0).clamp_min(0)
                for j, (m, g) in enumerate(zip(maps.names, grid))}
        save_overlay_grid(shared.reshape(net.picture_shape), heat, out / f"{name}_modules.png",
                          ncols=e.grid_columns, alpha=e.alpha, cmap=e.cmap,
                          title=f"task {task}, {name}: every module on one test input",
                          # gradient x input is signed: the overlays show its positive part (what raises the score)
                          bar_label="map, scaled to [0, 1] per panel" if maps.kind != INPUT_X_GRADIENT else
                          "gradient x input, positive part, scaled to [0, 1] per panel")
    return LayerExplanation(entries, {m: float(gates[:, j].mean()) for j, m in enumerate(maps.names)},
                            {m: len(units_on[m]) for m in maps.names},
                            {c: [[a, s] for a, s in ranked] for c, ranked in per_class.items()}, agreement,
                            maps.kind, arrays,
                            int(model.masked[layer].n_units), tied, constant, class_maps)


@contextmanager
def one_cpu_thread():
    """Run the block on one CPU thread, then restore the caller's count. A multi-threaded BLAS sums in an order
    that depends on the thread count; training and the map's Adam epochs carry those last-bit differences into
    every score. On one thread a network and its explanations are the same whatever the caller's count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def explain_network(net: ExplainedNetwork, cfg: DictConfig, out: Path) -> dict:
    """Maps and words of the modules of the explained task's gates, layer by layer; writes the outputs and
    returns explanations.json's content. Runs on one CPU thread (``one_cpu_thread``)."""
    with one_cpu_thread():
        return _explain_network(net, cfg, out)


def _explain_network(net: ExplainedNetwork, cfg: DictConfig, out: Path) -> dict:
    model = net.model
    task = _explained_task(model, cfg.explain.task)
    if task >= len(net.tests) or net.tests[task] is None:
        raise ValueError(f"task {task} has no test inputs to explain its modules on")
    layer_modules = gated_modules(model, task)
    _check_record(layer_modules, net.record, task, model)
    layers = {}
    for i in _explained_layers(cfg.explain.layers, len(layer_modules)):
        start = time.perf_counter()
        layers[f"layer{i}"] = explain_layer(net, task, i, layer_modules[i], cfg, out)
        print(f"[explain] task {task}, layer{i}: {len(layer_modules[i])} modules explained "
              f"({time.perf_counter() - start:.1f} s)", flush=True)
    np.savez_compressed(out / "module_maps.npz", **{k: v for x in layers.values() for k, v in x.arrays.items()})
    notes = [_source_note(net.source), f"Modules of task {task}'s gates, as the network switches them."]
    if net.knowledge is None:
        notes.append("The benchmark has no class knowledge (attributes): modules are explained by maps only.")
    tied = next((x.tied for x in layers.values()), [])  # the same classes fit every layer's map
    for group in tied:
        notes.append(f"Tied attributes: {', '.join(group)} take the same values (up to scale and offset) on every "
                     f"class the map was fitted on, so no explanation can tell them apart; they are reported as "
                     f"one entry, '{TIE.join(group)}'.")
    constant = next((x.constant for x in layers.values()), [])
    if constant:
        notes.append(f"Constant attributes: {', '.join(constant)} take one value on every class of the task, so "
                     "they explain no difference between its classes and are named by no module and no class.")
    if net.unseen_classes and net.knowledge is not None:
        names = [str(net.knowledge.class_names[c]) for c in net.unseen_classes]
        notes.append(f"Unseen classes {', '.join(names)}: NIWT built their head rows from their attributes, so the "
                     "attributes predicted for them agree partly by construction (their agreement is no evidence of "
                     "what the network learned from images).")
    modules = {name: x.modules for name, x in layers.items()}
    per_class = {name: x.per_class for name, x in layers.items()}
    agreement = {name: x.agreement for name, x in layers.items()}
    write_module_explanations_md(out / "explanations.md", modules, per_class,
                                 {name: x.note for name, x in layers.items()},
                                 title=f"Modules of the {type(model).__name__}, task {task}", notes=notes,
                                 class_agreement=agreement)
    return {"modules": modules, "task": task, "network": type(model).__name__, "source": net.source,
            "maps": {"file": "module_maps.npz", "kind": {name: x.kind for name, x in layers.items()}},
            "gate_on": {name: x.gate_on for name, x in layers.items()},
            "units_on": {name: x.units_on for name, x in layers.items()}, "per_class": per_class,
            "per_class_agreement": agreement,
            "class_maps": {name: x.class_maps for name, x in layers.items()},
            "tied_attributes": tied, "constant_attributes": constant, "notes": notes}


def _source_note(source: dict) -> str:
    if "run_dir" in source:
        return f"Network of the run {source['run_dir']} (seed {source['seed']})."
    trained = source["trained_here"]
    final = trained["accuracy_matrix"][-1] if trained["accuracy_matrix"] else []
    return (f"Network trained here on the seen classes of {trained['data']} ({trained['experiences']} "
            f"experience(s), {trained['scenario']}-incremental, {trained['epochs']} epochs); test accuracy per "
            f"experience: {', '.join(f'{a:.3f}' for a in final)}.")


def run_explain(cfg: DictConfig) -> dict:
    from modnet.rundir import fingerprint, fresh_run

    _check_config(cfg)
    # as modnet cl: one run at a time in a folder, and another run's explanations are not written over
    with fresh_run(Path(cfg.output_dir), fingerprint(cfg), "explain"):
        with one_cpu_thread():  # the network trained here and its explanations, the same for any thread count
            return _run_explain(cfg)


def _run_explain(cfg: DictConfig) -> dict:
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    net = load_run(cfg, device) if cfg.run_dir else train_here(cfg, device)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    results = explain_network(net, cfg, out)
    results["seconds"] = time.perf_counter() - t0
    (out / "explanations.json").write_text(results_json(results))
    n_modules = sum(len(m) for m in results["modules"].values())
    print(f"explanations written to {out}/explanations.md ({n_modules} modules in {len(results['modules'])} "
          f"layers, task {results['task']})")
    return results
