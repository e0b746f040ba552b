"""``modnet gzsl``: generalized zero-shot evaluation of NIWT next to ESZSL and ALE, on the modular network.

Per seed: load the GZSL data (scenarios.zsl); train THE modular network of ``modnet cl`` (``build_modular_network``
from the shared ``model``/``modules``/``hat`` blocks, configs/training.yaml) with the ``modnet`` strategy through
the one runner (``make_strategy`` + ``run_experiences``) on one experience holding every seen class (one task,
one head, task label 0); then every method of ``methods`` (registry: ``modnet.zsl``) scores all classes:
* niwt:  NIWT measures importance at one of the network's masked layers (``unit_taps[niwt.layer]``; null = the
         one of ``niwt.layers`` with the best validation H) and adds the unseen classes as new rows of the
         network's head (``HATNet.add_classes``);
* eszsl: ESZSL closed form, ale: ALE ranking, on the network's penultimate features (the head's input).
U, S, H and ZSL accuracy come from ``modnet.methods.gzsl``. With ``calibration.mode=validate`` every method
gets its calibrated-stacking gamma (and its hyper-parameters among its candidates, e.g. ESZSL's regularisers)
from a class-disjoint validation split of the training set (pseudo-unseen seen classes, a second modular
network trained without them), never from the test data. The table's headline is Xian et al.'s protocol
(uncalibrated: every class scored as the network scores it), the calibrated figures stand beside it; results.json
keeps both (``methods.<name>.{U,S,H}`` calibrated, ``methods.<name>.uncalibrated.{U,S,H}``), and with ``gate.enabled``
a third reading: ``methods.<name>.gated`` (``modnet.methods.novelty``: the network's own features call each test
image seen or unseen, the method predicts among those classes; the gate's layer and quantile chosen on the same
validation splits).

results.json records ``network`` (``describe_network`` of the first seed's extended network: its class is the
one ``modnet cl`` records for the same data), ``network_seen_accuracy`` (per seed, the network's own
accuracy on test-seen over the seen classes) and its mean ``seen_only_accuracy`` (with ``_std``), the bar a
method's S is read against; ``checkpoints/modnet_seed<S>_final.pt`` holds each seed's
extended network (``modnet.nets.record.load_network``).

Continual GZSL (``continual.enabled``, ``strategies``): ``modnet.jobs.continual_gzsl``.

Writes output_dir/results.json, results.csv and gzsl.png; prints a table.
"""
from __future__ import annotations

import copy
import csv
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import Tensor

from modnet.config import resolve_device, with_absolute_data_paths
from modnet.eval.metrics import shows_progress_bars
from modnet.eval.tables import SEED_STD_DDOF, aggregate_runs, markdown_table, mean_std_cell, seeds_note
from modnet.methods.gzsl import GZSLResult, gzsl_evaluate, restricted_accuracy, select_calibration
from modnet.rundir import results_json
from modnet.validate import check_gate_layer_index
from modnet.zsl.registry import get_zsl_method
from modnet.zsl.seen_network import SeenNetwork
from scenarios.zsl import ZSLData, class_disjoint_validation, load_zsl_from_config, pseudo_unseen_count

METRICS = ("U", "S", "H", "zsl_accuracy")
Scores = tuple[Tensor, Tensor]  # (scores on test-seen, scores on test-unseen), [n, C], column = dataset class


# ----------------------------------------------------------------------------------------------------------
# The modular network on the seen classes
# ----------------------------------------------------------------------------------------------------------
def train_seen_network(cfg: DictConfig, data: ZSLData, seed: int, device, progress: bool) -> SeenNetwork:
    """The ``modnet`` strategy's network trained on ``data``'s seen classes: one experience (Avalanche
    ``nc_benchmark`` through ``scenarios.base.split_benchmark``), task-incremental with one head whose row i
    is seen class i, trained and evaluated by the runner."""
    from modnet.eval.metrics import build_evaluator
    from modnet.runner.evaluation import stream_evaluator
    from modnet.runner.runner import make_strategy, run_experiences, set_seed
    from scenarios.base import split_benchmark

    cfg = with_seen_network_hat(cfg)
    seen = list(data.seen_classes)
    row = torch.full((data.n_classes,), -1, dtype=torch.long)
    row[torch.tensor(seen)] = torch.arange(len(seen))
    arrays = (data.x_train, row[data.y_train], data.x_test_seen, row[data.y_test_seen])
    if cfg.train.data_on_device:
        arrays = tuple(a.to(device) for a in arrays)
    info = split_benchmark(f"seen-{data.name}", *arrays, n_experiences=1, scenario="task", seed=seed,
                           class_order=range(len(seen)))
    set_seed(seed)
    # Avalanche's progress bars on a terminal (build_evaluator drops them elsewhere)
    evaluator, accuracy = build_evaluator(["interactive"], Path(cfg.output_dir), progress)
    strategy = make_strategy("modnet", cfg, info, device, evaluator)
    if "niwt" in cfg.methods:  # a niwt.layer the network lacks is a config error, reported before training
        from modnet.zsl.niwt import candidates, importance_layer

        for setting in candidates(cfg):
            importance_layer(strategy.model, setting["niwt_layer"])
    if cfg.gate.enabled:  # the gate's layers too (an MLP's were checked against model.n_layers already)
        for layer in _gate_layers(cfg.gate):
            check_gate_layer_index(layer, len(strategy.model.unit_taps))
    bm = info.benchmark
    run_experiences(strategy, bm.train_stream, stream_evaluator(bm.test_stream, accuracy), seed=seed)
    net = SeenNetwork(strategy.model.eval(), data, seed, device, progress)
    # the bar S is read against: averaged per class as S is (Avalanche's accuracy is per sample; on AWA2's
    # unbalanced test-seen classes the two differ)
    x, y = net.split("test_seen")
    net.seen_accuracy = restricted_accuracy(net.scores(x), y, data.seen_classes)
    return net


def _with_value(cfg: DictConfig, block: str, key: str, value) -> DictConfig:
    """``cfg`` itself where ``value`` is None or already ``cfg[block][key]``; else a copy holding ``value`` there."""
    if value is None or value == cfg[block][key]:
        return cfg
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg[block][key] = value
    return cfg


def with_seen_network_hat(cfg: DictConfig) -> DictConfig:
    """``cfg`` with ``seen_network.hat_c`` as HAT's capacity regulariser weight (``hat.c``) where it is set: the
    seen-class network is one experience, and the regulariser only keeps units free for later experiences
    (configs/gzsl.yaml has the figures). Continual GZSL, whose experiences do follow, keeps ``hat.c``."""
    c = (cfg.get("seen_network") or {}).get("hat_c")
    return _with_value(cfg, "hat", "c", None if c is None else float(c))


def with_benchmark_width(cfg: DictConfig) -> DictConfig:
    """``cfg`` with ``benchmark.hidden`` as the width of every network of the run (``model.hidden``) where the
    benchmark sets one: awa2 and cub's 2048-d features need more than the 256 units sized for the 64-d digits
    (configs/benchmark/awa2.yaml has the figures)."""
    width = cfg.benchmark.get("hidden")
    return _with_value(cfg, "model", "hidden", None if width is None else int(width))


def with_large_train(cfg: DictConfig, data: ZSLData) -> DictConfig:
    """``cfg`` with ``large_train``'s batch_size / epochs / lr in its ``train`` block, its threads as ``threads``
    (null: torch's default, every core), and the keys of its
    ``clswgan`` and ``ale`` sub-blocks in those method blocks, when ``data`` has at least ``large_train.min_samples``
    training samples (configs/gzsl.yaml says why); ``cfg`` itself otherwise. Decided once on the full data, so
    the class-disjoint validation split (fewer samples) runs with the same settings as the final fit."""
    from modnet.validate import LARGE_METHOD_BLOCKS, check_large_method_blocks

    large = cfg.get("large_train")
    if large is None or large.get("min_samples") is None or data.x_train.shape[0] < int(large.min_samples):
        return cfg
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        if "threads" in large:
            cfg.threads = large.threads
        for key in ("batch_size", "epochs", "lr"):
            if large.get(key) is not None:
                cfg.train[key] = large[key]
        check_large_method_blocks(cfg)
        for block in LARGE_METHOD_BLOCKS:
            for key, value in (large.get(block) or {}).items():
                if value is not None:
                    cfg[block][key] = value
    return cfg


# ----------------------------------------------------------------------------------------------------------
# Every method on one data split
# ----------------------------------------------------------------------------------------------------------
def score_methods(cfg: DictConfig, data: ZSLData, seed: int, device, progress: bool,
                  params: dict[str, list[dict]] | None = None, stage: str = "test"
                  ) -> tuple[SeenNetwork, dict[str, list[tuple[dict, Scores]]]]:
    """Train the modular network on ``data``'s seen classes, then score every method of ``cfg.methods``.

    Returns the network (extended by NIWT when it ran) and {method: [(setting, scores), ...]}: one entry per
    candidate setting of the method (validation), or those of ``params[method]`` (a list) when given. One line per
    network and per method, prefixed with the seed and ``stage`` (on a terminal too: its progress bars show the
    network's training, not the methods).
    """
    def line(text: str, since: float) -> None:
        print(f"[gzsl seed {seed}, {stage}] {text} ({time.perf_counter() - since:.1f} s)", flush=True)

    torch.manual_seed(seed)
    start = time.perf_counter()
    net = train_seen_network(cfg, data, seed, device, progress)
    line(f"network trained on {len(data.seen_classes)} seen classes: seen accuracy {net.seen_accuracy:.3f}", start)
    from modnet.runner.runner import set_seed

    out: dict[str, list[tuple[dict, Scores]]] = {}
    for name in cfg.methods:
        start = time.perf_counter()
        method = get_zsl_method(name)
        settings = list(params[name]) if params is not None else method.candidates(cfg)
        out[name] = []
        for setting in settings:
            # every scoring from the seed: a method that draws from the global generators (a method registered
            # by a user; the shipped ones measured unaffected: the same 3-seed digits table either way) gets figures
            # that do not depend on which methods, or how many of their settings, were scored before it
            set_seed(seed)
            scores = method.score(cfg, net, setting)
            if any(bool(torch.isnan(part).any()) for part in scores):  # one host read per method and setting
                raise ValueError(f"gzsl method {name} gave NaN scores (seed {seed}, {stage}, setting "
                                 f"{dict(setting) or 'default'}): it diverged; change its settings or leave it out "
                                 "of methods")
            out[name].append((setting, scores))
        line(f"{name} scored" + (f", {len(settings)} settings" if len(settings) > 1 else ""), start)
    return net, out


def _evaluate(scores: Scores, data: ZSLData, gamma: float) -> GZSLResult:
    return gzsl_evaluate(scores[0], data.y_test_seen, scores[1], data.y_test_unseen, data.seen_classes,
                         data.unseen_classes, calibration=gamma)


def validation_splits(cfg: DictConfig, data: ZSLData) -> int:
    """``calibration.val_splits``, or when null as many splits as it takes to hold out at least
    ``calibration.val_min_classes`` pseudo-unseen classes in all (digits: 2 a split -> 3 splits; AWA2's 40 seen
    classes: 10 a split -> 1): a gamma chosen on two held-out classes is noisy, on ten it is not."""
    if cfg.calibration.val_splits is not None:
        return int(cfg.calibration.val_splits)
    per_split = pseudo_unseen_count(len(data.seen_classes), cfg.calibration.val_unseen_fraction)
    return max(1, math.ceil(int(cfg.calibration.val_min_classes) / per_split))


def validate(cfg: DictConfig, data: ZSLData, seed: int, device, progress: bool) -> dict[str, dict]:
    """Each method's setting and calibration gamma, chosen on class-disjoint validation splits.

    Each of the table's three readings gets its own setting, chosen by its own criterion averaged over
    ``calibration.val_splits`` splits:
    * ``params``, ``validation_H``: the headline (Xian et al.'s protocol, uncalibrated): the candidate with the
      best mean uncalibrated H; it does not depend on ``calibration.mode``;
    * ``calibrated_params``, ``gamma``, ``validation_H_calibrated``: calibrated stacking: the candidate with the
      best mean H at its gamma (``calibration.mode=validate``: the gamma maximising H on each split, averaged;
      ``fixed`` / ``none``: the configured gamma / 0; ``none`` is the headline's candidate);
    * with the gate validated, ``gate_params``, ``gate`` (layer, quantile), ``gate_validation_H``,
      ``gate_validation_seen_kept``: the (candidate, gate setting) pair that ``choose_gate_setting`` prefers among
      all of them.
    A setting good for one reading can be poor for another (digits ESZSL: the regulariser with the best
    uncalibrated H gave the gate a gated H of 0.30 over 3 seeds), so none borrows another's.
    """
    # method -> candidate -> [(gamma, H at gamma, uncalibrated H) per split]
    found: dict[str, list[list[tuple[float, float, float]]]] = {}
    # method -> candidate -> per split: [(H, S / the method's seen-only S) at each gate setting]
    gated: dict[str, list[list[list[tuple[float, float]]]]] = {}
    settings: dict[str, list[dict]] = {}
    n_splits = validation_splits(cfg, data)
    for split in range(n_splits):
        val = class_disjoint_validation(data, cfg.calibration.val_unseen_fraction, cfg.calibration.val_test_fraction,
                                        seed=seed * 1000 + split)
        val_net, per_method = score_methods(cfg, val, seed, device, progress,
                                            stage=f"validation split {split + 1}/{n_splits}")
        novelty = ({layer: novelty_of_tests(cfg, val_net, layer) for layer in _gate_layers(cfg.gate)}
                   if gate_validated(cfg.gate) else None)
        # per gate setting, the side each test image goes to: the same for every method
        sides = [novelty[layer][0].sides(novelty[layer][1:], q) for layer, q in gate_settings(cfg.gate)] \
            if novelty is not None else None
        for name, candidates in per_method.items():
            settings[name] = [setting for setting, _ in candidates]
            found.setdefault(name, [[] for _ in candidates])
            gated.setdefault(name, [[] for _ in candidates])
            # the method's seen-only accuracy: its best candidate's (a candidate's own would let one that guesses
            # at chance "keep" all of its chance accuracy: a planted AWA2 run's gated ESZSL took lambda 10, H .03)
            seen_only = max((restricted_accuracy(scores[0], val.y_test_seen, val.seen_classes)
                             for _, scores in candidates), default=0.0) if sides is not None else 0.0
            for i, (_, scores) in enumerate(candidates):
                if sides is not None:
                    gated[name][i].append([_gated_h_and_kept(_evaluate_gated(scores, val, side), seen_only)
                                           for side in sides])
                uncalibrated = _evaluate(scores, val, 0.0).H
                if cfg.calibration.mode == "validate":
                    g, h = select_calibration(scores[0], val.y_test_seen, scores[1], val.y_test_unseen,
                                              val.seen_classes, val.unseen_classes)
                elif cfg.calibration.mode == "fixed":
                    g = float(cfg.calibration.gamma)
                    h = _evaluate(scores, val, g).H
                else:
                    g, h = 0.0, uncalibrated
                found[name][i].append((g, h, uncalibrated))
    chosen = {}
    for name, per_candidate in found.items():
        table = np.asarray(per_candidate, dtype=float)  # candidate x split x (gamma, H at gamma, uncalibrated H)
        mean = table.mean(axis=1)
        best = int(np.argmax(mean[:, 2]))  # the first of equals
        calibrated = best if cfg.calibration.mode == "none" else int(np.argmax(mean[:, 1]))
        chosen[name] = {"params": settings[name][best], "validation_H": float(mean[best, 2]),
                        "calibrated_params": settings[name][calibrated], "gamma": float(mean[calibrated, 0]),
                        "validation_H_calibrated": float(mean[calibrated, 1])}
        if gated[name][0]:
            # candidate x (layer, quantile) x (H, kept), averaged over the splits; one choice over all pairs
            pairs = np.asarray(gated[name], dtype=float).mean(axis=1)
            n_gate = pairs.shape[1]
            flat = pairs.reshape(-1, 2)
            pick = choose_gate_setting(flat[:, 0], flat[:, 1], cfg.gate.get("min_seen_ratio"))
            candidate, setting = divmod(pick, n_gate)
            chosen[name].update({"gate_params": settings[name][candidate],
                                 "gate": gate_settings(cfg.gate)[setting],
                                 "gate_validation_H": float(flat[pick, 0]),
                                 "gate_validation_seen_kept": float(flat[pick, 1])})
    return chosen


def _gated_h_and_kept(result: GZSLResult, seen_only: float) -> tuple[float, float]:
    return result.H, result.S / seen_only if seen_only > 0 else 0.0


def choose_gate_setting(h: np.ndarray, kept: np.ndarray, min_seen_ratio: float | None) -> int:
    """Index of the gate setting with the best validation H among those that keep ``min_seen_ratio`` of the
    method's seen-only accuracy (``kept`` = gated S / the seen-only S of the method's best candidate on the
    validation split); none keeps it ->
    the setting that keeps the most (the gate's cost to the seen classes is bounded first, H second).
    ``min_seen_ratio`` null: the best H."""
    if min_seen_ratio is None:
        return int(np.argmax(h))
    ok = kept >= float(min_seen_ratio)
    if not ok.any():
        return int(np.argmax(kept))
    return int(np.argmax(np.where(ok, h, -np.inf)))


# ----------------------------------------------------------------------------------------------------------
# The novelty gate (modnet.methods.novelty): seen or unseen from the network's own features
# ----------------------------------------------------------------------------------------------------------
def _gate_layers(gate) -> list[int]:
    return [int(gate.layer)] if gate.layer is not None else [int(v) for v in gate.layers]


def gate_settings(gate) -> list[tuple[int, float]]:
    """The (layer, quantile) pairs the gate may take: the configured ones, or every pair of ``layers`` x
    ``quantiles`` where ``layer`` / ``quantile`` is null (chosen on the validation splits)."""
    quantiles = [float(gate.quantile)] if gate.quantile is not None else [float(q) for q in gate.quantiles]
    return [(layer, q) for layer in _gate_layers(gate) for q in quantiles]


def gate_validated(gate) -> bool:
    return bool(gate.enabled) and len(gate_settings(gate)) > 1


def novelty_of_tests(cfg: DictConfig, net: SeenNetwork, layer: int):
    """(gate fitted on the seen training images' units of masked layer ``layer``, novelty of test-seen, of
    test-unseen)."""
    from modnet.methods.novelty import SeenNoveltyGate

    check_gate_layer_index(layer, len(net.model.unit_taps))

    def units(split: str) -> Tensor:
        return net.layer_units(net.split(split)[0], layer)

    gate = SeenNoveltyGate(float(cfg.gate.shrinkage)).fit(units("train"), net.split("train")[1],
                                                          net.data.seen_classes)
    return gate, gate.novelty(units("test_seen")), gate.novelty(units("test_unseen"))


def _evaluate_gated(scores: Scores, data: ZSLData, sides: list[Tensor]) -> GZSLResult:
    """U, S, H with each test image's classes restricted to the side the gate sent it to (``sides``: unseen
    flags of test-seen, of test-unseen). The ZSL accuracy (test-unseen over the unseen classes alone) does not
    involve the gate: the method's own (on the gated scores, an image sent to the seen side has no unseen class
    left, and the restricted argmax fell on the first one: it read as U)."""
    import dataclasses

    from modnet.methods.novelty import gated_scores

    s, u = (gated_scores(sc, side, data.seen_classes, data.unseen_classes) for sc, side in zip(scores, sides))
    result = gzsl_evaluate(s, data.y_test_seen, u, data.y_test_unseen, data.seen_classes, data.unseen_classes)
    return dataclasses.replace(result, zsl_accuracy=restricted_accuracy(scores[1], data.y_test_unseen,
                                                                        data.unseen_classes))


def run_seed(cfg: DictConfig, data: ZSLData, seed: int, device, progress: bool) -> tuple[dict, SeenNetwork]:
    """All methods on one seed -> ({method: {U, S, H, zsl_accuracy, gamma, uncalibrated: {...}, setting}}, the
    extended network)."""
    mode = cfg.calibration.mode
    searched = any(len(get_zsl_method(m).candidates(cfg)) > 1 for m in cfg.methods)
    if mode == "validate" or searched or gate_validated(cfg.gate):
        chosen = validate(cfg, data, seed, device, progress)
    else:
        chosen = {m: {"params": get_zsl_method(m).candidates(cfg)[0], "gamma": 0.0} for m in cfg.methods}
    for m in cfg.methods:
        if mode == "fixed":
            chosen[m]["gamma"] = float(cfg.calibration.gamma)
        elif mode == "none":
            chosen[m]["gamma"] = 0.0
    # each reading's own setting (validate): the headline's first, so that the network NIWT extends and the
    # checkpoint keeps is the headline's; a setting two readings share is scored once
    readings = {m: {"headline": chosen[m]["params"],
                    "calibrated": chosen[m].get("calibrated_params", chosen[m]["params"]),
                    "gated": chosen[m].get("gate_params", chosen[m]["params"])} for m in cfg.methods}
    net, scored = score_methods(cfg, data, seed, device, progress,
                                params={m: _distinct(list(readings[m].values())) for m in cfg.methods})
    novelty: dict[int, tuple] = {}  # layer -> the gate fitted there, test novelties (fitted once per layer)
    results = {}
    for name in cfg.methods:
        by_setting = {_setting_key(setting): scores for setting, scores in scored[name]}
        setting = readings[name]["headline"]
        scores = by_setting[_setting_key(setting)]
        calibrated_setting = readings[name]["calibrated"]
        c = chosen[name]
        results[name] = {**_evaluate(by_setting[_setting_key(calibrated_setting)], data, c["gamma"]).as_dict(),
                         "gamma": c["gamma"], "calibrated_setting": dict(calibrated_setting),
                         "uncalibrated": _evaluate(scores, data, 0.0).as_dict(), **setting, "setting": dict(setting)}
        for key in ("validation_H", "validation_H_calibrated"):
            if key in c:
                results[name][key] = c[key]
        if cfg.gate.enabled:
            gated_setting = readings[name]["gated"]
            scores = by_setting[_setting_key(gated_setting)]
            layer, q = c["gate"] if gate_validated(cfg.gate) else gate_settings(cfg.gate)[0]
            if layer not in novelty:
                novelty[layer] = novelty_of_tests(cfg, net, layer)
            gate, nu_seen, nu_unseen = novelty[layer]
            sides = gate.sides((nu_seen, nu_unseen), q)
            results[name]["gated"] = {**_evaluate_gated(scores, data, sides).as_dict(), "layer": layer,
                                      "quantile": q, "setting": dict(gated_setting),
                                      "seen_called_unseen": float(sides[0].float().mean()),
                                      "unseen_called_unseen": float(sides[1].float().mean()),
                                      **({"validation_H": c["gate_validation_H"],
                                          "validation_seen_kept": c["gate_validation_seen_kept"]}
                                         if "gate" in c else {})}
    return results, net


def _setting_key(setting: dict) -> str:
    return json.dumps(setting, sort_keys=True)


def _distinct(settings: list[dict]) -> list[dict]:
    """The settings in order, each once."""
    out: dict[str, dict] = {}
    for setting in settings:
        out.setdefault(_setting_key(setting), setting)
    return list(out.values())


# ----------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------
def _aggregate(per_seed: list[dict]) -> dict:
    """Mean over seeds of every metric, with ``<metric>_std`` (population std) beside it."""
    keys = (*METRICS, "gamma")
    gated_keys = (*METRICS, "quantile", "seen_called_unseen", "unseen_called_unseen")
    gated = all("gated" in r for seed in per_seed for r in seed.values())
    records = [{"method": name, **{k: r[k] for k in keys},
                **{f"uncalibrated_{k}": r["uncalibrated"][k] for k in METRICS},
                **({f"gated_{k}": r["gated"][k] for k in gated_keys} if gated else {})}
               for seed in per_seed for name, r in seed.items()]
    stats = aggregate_runs(records, by=["method"], metrics=[*keys, *[f"uncalibrated_{k}" for k in METRICS],
                                                           *([f"gated_{k}" for k in gated_keys] if gated else [])])
    stats = stats.set_index("method")
    out = {}
    for name in per_seed[0]:
        s = stats.loc[name]
        entry = {}
        for k in keys:
            entry[k] = float(s[f"{k}_mean"])
            entry[f"{k}_std"] = float(s[f"{k}_std"])
        entry["uncalibrated"] = {k: float(s[f"uncalibrated_{k}_mean"]) for k in METRICS}
        entry["uncalibrated"].update({f"{k}_std": float(s[f"uncalibrated_{k}_std"]) for k in METRICS})
        if gated:
            entry["gated"] = {k: float(s[f"gated_{k}_mean"]) for k in gated_keys}
            entry["gated"].update({f"{k}_std": float(s[f"gated_{k}_std"]) for k in gated_keys})
            entry["gated"]["layer_per_seed"] = [seed[name]["gated"]["layer"] for seed in per_seed]
        if any("setting" in seed[name] for seed in per_seed):  # the settings chosen on validation, per seed
            entry["setting_per_seed"] = [seed[name].get("setting", {}) for seed in per_seed]
            entry["calibrated_setting_per_seed"] = [seed[name].get("calibrated_setting", {}) for seed in per_seed]
            if gated:
                entry["gated"]["setting_per_seed"] = [seed[name]["gated"].get("setting", {}) for seed in per_seed]
        out[name] = entry
    return out


# methods whose unseen rows take niwt.scale's rule; seen_budget adds one shift to every unseen row, chosen on the
# seen training images: the same argmax as calibrated stacking at gamma = the shift (Chao et al. 2016)
SHIFTED_BY_SCALE = ("niwt", "niwt_routed")


def uncalibrated_caveats(cfg, methods) -> dict[str, str]:
    """Per method whose "uncalibrated" reading is not Xian et al.'s as-trained one, why: NIWT's rows under
    ``niwt.scale=seen_budget`` are shifted by a constant chosen on seen training images (no test or unseen data),
    which is calibrated stacking in effect. ESZSL, ALE, DeViSE and f-CLSWGAN score as trained (gamma 0)."""
    if OmegaConf.select(cfg, "niwt.scale") != "seen_budget":
        return {}
    text = (f"unseen rows shifted by one constant chosen on the seen training images (niwt.scale=seen_budget: at "
            f"most {cfg.niwt.seen_budget} of them sent to an unseen row): calibrated stacking in effect, not Xian et "
            "al.'s as-trained reading, which niwt.scale=negatives gives")
    return {name: text for name in methods if name in SHIFTED_BY_SCALE}


def format_table(methods: dict, n_seeds: int, calibrated: bool = True) -> str:
    """Xian et al.'s protocol first (uncalibrated U, S, H, ZSL accuracy), calibrated stacking beside it (not with
    ``calibrated`` false: calibration.mode=none, where its columns repeat the uncalibrated ones at gamma 0), then
    the gated figures. The gamma and the gate's quantile chosen per seed: their mean ± std, as every cell."""
    def cell(r: dict, k: str, fmt: str = "{:.3f}") -> str:
        return mean_std_cell(r[k], r[f"{k}_std"], n_seeds, fmt)

    gated = all("gated" in r for r in methods.values())
    rows = [[name, *[cell(r["uncalibrated"], k) for k in METRICS],
             *([cell(r, k) for k in ("U", "S", "H")] + [cell(r, "gamma", "{:.2f}")] if calibrated else []),
             *([cell(r["gated"], k) for k in ("U", "S", "H")] + [cell(r["gated"], "quantile", "{:.3f}")]
               if gated else [])] for name, r in methods.items()]
    return markdown_table(["method", "U", "S", "H", "ZSL acc",
                           *(["U (calibrated)", "S (calibrated)", "H (calibrated)", "gamma"] if calibrated else []),
                           *(["U (gated)", "S (gated)", "H (gated)", "gate q"] if gated else [])], rows)


def _write_outputs(out_dir: Path, results: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "results.json.tmp"
    tmp.write_text(results_json(results))
    tmp.replace(out_dir / "results.json")
    # the columns as the printed table's: U, S, H, zsl_accuracy are the headline's, uncalibrated (Xian et al.),
    # then the calibrated ones with gamma, then the gated ones where the gate ran; mean and _std over seeds
    # (results.json keeps its layout: a method's top-level U, S, H are the calibrated ones); with
    # calibration.mode=none no calibrated columns, as the table (they would repeat the uncalibrated ones)
    def figures(prefix: str, r: dict, keys) -> dict:
        return {**{prefix + k: r[k] for k in keys}, **{f"{prefix}{k}_std": r[f"{k}_std"] for k in keys}}

    calibrated = results.get("calibration") != "none"
    rows = {name: {**figures("", r["uncalibrated"], METRICS),
                   **(figures("calibrated_", r, ("U", "S", "H", "gamma")) if calibrated else {}),
                   **(figures("gated_", r["gated"], ("U", "S", "H", "quantile")) if "gated" in r else {})}
            for name, r in results["methods"].items()}
    columns = list(dict.fromkeys(k for row in rows.values() for k in row))
    with open(out_dir / "results.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", *columns])
        for name, row in rows.items():
            writer.writerow([name, *[row.get(k, "") for k in columns]])
    _plot(out_dir / "gzsl.png", results)
    if "continual" in results:
        from modnet.jobs.continual_gzsl import write_outputs

        write_outputs(out_dir, results["continual"])


def _plot(path: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = {name: r["uncalibrated"] for name, r in results["methods"].items()}  # the headline: Xian et al.
    names = list(methods)
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(names), 3.6))
    width = 0.25
    for i, metric in enumerate(("U", "S", "H")):
        xs = np.arange(len(names)) + (i - 1) * width
        ax.bar(xs, [methods[n][metric] for n in names], width, yerr=[methods[n][f"{metric}_std"] for n in names],
               label=metric, capsize=3)
    ax.set_xticks(np.arange(len(names)), names)
    ax.set_ylim(0, 1)
    ax.set_ylabel("per-class top-1 accuracy")
    n_seeds = len(results["seeds"])
    ax.set_title(f"GZSL on {results['benchmark']}, uncalibrated ({n_seeds} seed{'s' if n_seeds > 1 else ''})")
    ax.legend(ncol=3, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)



# ----------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------
def _check(cfg: DictConfig) -> None:
    """Every name and choice of the config, before any data is loaded or network trained (one ConfigError line):
    ``modnet.validate``'s gzsl checks, which ``modnet gzsl`` ran before this module's imports (torch)."""
    from modnet.validate import check_gzsl_gate_layers, check_gzsl_options

    check_gzsl_options(cfg)
    check_gzsl_gate_layers(cfg)


def run_gzsl(cfg: DictConfig) -> dict:
    """Run the GZSL comparison described by ``cfg`` (configs/gzsl.yaml) and write its outputs."""
    from modnet.rundir import fingerprint, fresh_run

    _check(cfg)
    out_dir = Path(cfg.output_dir)
    # as modnet cl: one run at a time in a folder, and a folder holding another run's results is not written over
    # (its results.json, and its seeds' checkpoints beside this run's)
    with fresh_run(out_dir, fingerprint(cfg), "gzsl"):
        return _run_gzsl(cfg, out_dir)


def _run_gzsl(cfg: DictConfig, out_dir: Path) -> dict:
    from modnet.jobs import continual_gzsl
    from modnet.runner.cpu import prepare_cpu
    from modnet.nets.record import describe_network, save_network

    cfg = with_benchmark_width(cfg)
    device = resolve_device(cfg.device)
    prepare_cpu()  # before the first parallel op starts torch's CPU threads (they inherit the mode)
    all_threads = torch.get_num_threads()  # torch's default (OMP_NUM_THREADS, else the cores), for threads=null
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    if "clswgan" in cfg and cfg.clswgan.get("threads") is None:  # null: torch's default, as counted above
        cfg = copy.deepcopy(cfg)
        with open_dict(cfg):
            cfg.clswgan.threads = all_threads
    seeds = [int(s) for s in cfg.seeds] if cfg.get("seeds") else [int(cfg.seed)]
    progress = shows_progress_bars(cfg.progress)  # tqdm bars only on a terminal (logs stay readable)
    t0 = time.perf_counter()
    b = cfg.benchmark
    per_seed, continual, networks, data = [], [], [], None
    seed_iter = seeds
    if progress and len(seeds) > 1:
        from tqdm.auto import tqdm
        seed_iter = tqdm(seeds, desc="seeds")
    for seed in seed_iter:
        torch.manual_seed(seed)
        np.random.seed(seed)
        # The digits split follows each seed; xlsa17 / npz splits are fixed by their files and image features
        # are extracted once (split drawn with the first seed): those are loaded once.
        if data is None or b.name.lower() == "digits":
            data = load_zsl_from_config(b, seed=seed, device=str(device), progress=progress)
            cfg = with_large_train(cfg, data)
            # large_train may change threads (threads started now inherit the flushed float mode)
            torch.set_num_threads(int(cfg.threads) if cfg.get("threads") else all_threads)
        if cfg.continual.enabled and not per_seed:  # every strategy's network can take NIWT's rows
            continual_gzsl.check_strategies(cfg, data, seed, device)
        methods, net = run_seed(cfg, data, seed, device, progress)
        per_seed.append(methods)
        networks.append(net)
        save_network(net.model, out_dir / "checkpoints" / f"modnet_seed{seed}_final.pt", data.input_shape)
        if cfg.continual.enabled:
            continual.append(continual_gzsl.run_continual(cfg, data, seed, device, progress))
    assert data is not None
    results = {"benchmark": data.name, "seen_classes": data.seen_classes, "unseen_classes": data.unseen_classes,
               "class_names": data.class_names, "seeds": seeds, "std_ddof": SEED_STD_DDOF, "device": str(device),
               "calibration": cfg.calibration.mode, "methods": _aggregate(per_seed),
               "per_seed": {str(s): r for s, r in zip(seeds, per_seed)},
               "network": describe_network(networks[0].model),
               "network_per_seed": {str(s): describe_network(net.model) for s, net in zip(seeds, networks)},
               "network_seen_accuracy": [net.seen_accuracy for net in networks],
               # the bar for S: the same network's accuracy on test-seen over the seen classes alone
               "seen_only_accuracy": float(np.mean([net.seen_accuracy for net in networks])),
               "seen_only_accuracy_std": float(np.std([net.seen_accuracy for net in networks], ddof=SEED_STD_DDOF))}
    if continual:
        results["continual"] = continual_gzsl.aggregate(continual, cfg)
    caveats = uncalibrated_caveats(cfg, results["methods"])
    if caveats:
        results["uncalibrated_caveats"] = caveats
    results["seconds"] = time.perf_counter() - t0
    _write_outputs(out_dir, results)
    OmegaConf.save(with_absolute_data_paths(cfg), out_dir / "config.yaml")  # explain run_dir= from any folder
    print(f"GZSL on {data.name}: {len(data.seen_classes)} seen / {len(data.unseen_classes)} unseen classes, "
          f"seeds {seeds}, calibration={cfg.calibration.mode}, {results['seconds']:.1f}s")
    print(f"modular network {results['network']['class']}: seen accuracy {results['seen_only_accuracy']:.3f} "
          "(over the seen classes, before NIWT)")
    print(format_table(results["methods"], len(seeds), calibrated=cfg.calibration.mode != "none"))
    for name, why in results.get("uncalibrated_caveats", {}).items():
        print(f"{name}'s U, S, H (the uncalibrated columns): {why}")
    if len(seeds) > 1:
        print(seeds_note(len(seeds), "results.json's per_seed holds each seed's figures"))
    if continual:
        print(continual_gzsl.format_table(results["continual"]))
    print(f"results: {out_dir / 'results.json'}")
    return results
