"""``modnet gzsl``: generalized zero-shot evaluation of NIWT next to ESZSL and ALE.

Per seed: load the GZSL data (scenarios.zsl), train a network on the seen classes (an MLP on vectors or
features, a small CNN on images), then
* niwt:  NIWT (modnet.methods.niwt) adds the unseen classes to that network from their knowledge vectors;
* eszsl: ESZSL closed form, ale: ALE ranking, on the network's penultimate features (or the raw inputs);
and score U, S, H and ZSL accuracy (modnet.methods.gzsl). With ``calibration.mode=validate`` every method gets its
calibrated-stacking gamma (and ESZSL its regularisers) from a class-disjoint validation split of the
training set (pseudo-unseen seen classes, a second network trained without them), never from the test
data; the uncalibrated figures are reported beside the calibrated ones.

Continual GZSL (``continual.enabled``): the seen classes arrive over experiences (Avalanche ``nc_benchmark``
on TensorDatasets, a Naive/Replay/EWC/LwF strategy); after each experience NIWT adds the unseen classes to
the current network and U/S/H are recorded next to Avalanche's accuracy and forgetting.

Writes output_dir/results.json, results.csv and gzsl.png; prints a table.
"""
from __future__ import annotations

import csv
import json
import math
import time
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.nn import functional as F

from modnet.eval.tables import aggregate_runs, markdown_table, mean_std_cell
from modnet.methods.gzsl import ALE, ESZSL, GZSLResult, gzsl_evaluate, predict_scores, select_calibration
from modnet.methods.niwt import NIWT
from scenarios.zsl import ZSLData, class_disjoint_validation, load_zsl_from_config

METHODS = ("niwt", "eszsl", "ale")
METRICS = ("U", "S", "H", "zsl_accuracy")


# ----------------------------------------------------------------------------------------------------------
# Seen-class networks
# ----------------------------------------------------------------------------------------------------------
class SeenMLP(nn.Module):
    """Hidden blocks Linear -> ReLU, then a linear classifier over the seen classes.

    ``blocks[-1]`` outputs the penultimate features (the classifier's input); NIWT takes importance at an
    earlier block (default ``blocks[-2]``), since at the penultimate layer importance = class weight.
    """

    def __init__(self, in_features: int, hidden: Sequence[int], n_classes: int, dropout: float = 0.0):
        super().__init__()
        if len(hidden) < 2:
            raise ValueError("network.hidden needs at least two layers: NIWT measures importance one block "
                             "before the penultimate layer")
        self.input = nn.Identity()  # a hook point for importance / Grad-CAM w.r.t. the inputs
        blocks, width = [], in_features
        for h in hidden:
            blocks.append(nn.Sequential(nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)))
            width = h
        self.blocks = nn.ModuleList(blocks)
        self.classifier = nn.Linear(width, n_classes)

    def features(self, x: Tensor) -> Tensor:
        x = self.input(x.flatten(1))
        for block in self.blocks:
            x = block(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class SeenCNN(nn.Module):
    """Conv blocks (3x3 conv -> ReLU, 2x2 max-pool after the first), global average pooling, classifier.

    NIWT's layer is a conv block (channels are the units, importance averaged over space), e.g. the one
    before the last, as VGG16's conv5_3 / ResNet-101's layer4[0] in the paper.
    """

    def __init__(self, in_channels: int, channels: Sequence[int], n_classes: int):
        super().__init__()
        if len(channels) < 2:
            raise ValueError("network.channels needs at least two conv layers for NIWT")
        self.input = nn.Identity()
        blocks, width = [], in_channels
        for i, c in enumerate(channels):
            layers = [nn.Conv2d(width, c, 3, padding=1), nn.ReLU()]
            if i == 0:
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            blocks.append(nn.Sequential(*layers))
            width = c
        self.blocks = nn.ModuleList(blocks)
        self.classifier = nn.Linear(width, n_classes)

    def features(self, x: Tensor) -> Tensor:
        x = self.input(x)
        for block in self.blocks:
            x = block(x)
        return x.mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def build_network(cfg: DictConfig, input_shape: tuple[int, ...], n_classes: int) -> nn.Module:
    arch = cfg.network.arch
    if arch == "auto":
        arch = "cnn" if len(input_shape) == 3 else "mlp"
    if arch == "mlp":
        return SeenMLP(int(np.prod(input_shape)), list(cfg.network.hidden), n_classes, cfg.network.dropout)
    if arch == "cnn":
        if len(input_shape) != 3:
            raise ValueError(f"network.arch=cnn needs images [c, h, w]; the data has shape {input_shape} "
                             "(use network.arch=mlp, or benchmark.image=true for digits)")
        return SeenCNN(input_shape[0], list(cfg.network.channels), n_classes)
    raise ValueError(f"network.arch must be auto, mlp or cnn, got {arch!r}")


def fit_classifier(model: nn.Module, x: Tensor, y: Tensor, *, epochs: int, batch_size: int, lr: float,
                   weight_decay: float, seed: int, progress: bool = False) -> nn.Module:
    """Cross-entropy, Adam, mini-batches drawn on the data's device (the seen-class network of GZSL and of
    the explanations)."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    rounds = range(epochs)
    if progress:
        from tqdm.auto import tqdm
        rounds = tqdm(rounds, desc="seen network", leave=False)
    for _ in rounds:
        order = torch.randperm(x.shape[0], generator=generator).to(x.device)
        for start in range(0, x.shape[0], batch_size):
            idx = order[start:start + batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval()


def _columns(seen: Sequence[int], n_classes: int, device) -> Tensor:
    col = torch.full((n_classes,), -1, dtype=torch.long, device=device)
    col[torch.as_tensor(list(seen), device=device)] = torch.arange(len(seen), device=device)
    return col


# ----------------------------------------------------------------------------------------------------------
# One run of every method on one data split
# ----------------------------------------------------------------------------------------------------------
def _niwt_layer(model: nn.Module, index: int) -> nn.Module:
    try:
        return model.blocks[index]
    except IndexError:
        raise ValueError(f"niwt.layer={index} but the network has {len(model.blocks)} blocks") from None


def _niwt_kwargs(cfg: DictConfig) -> dict:
    kw = OmegaConf.to_container(cfg.niwt, resolve=True)
    kw.pop("layer")
    return kw


@torch.no_grad()
def _features(model: nn.Module, x: Tensor, kind: str, batch_size: int = 2048) -> Tensor:
    if kind == "input":
        return x.flatten(1)
    return torch.cat([model.features(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)])


def _eszsl_candidates(cfg: DictConfig) -> list[tuple[float, float]]:
    if cfg.eszsl.search:
        grid = [10.0 ** e for e in cfg.eszsl.grid_log10]
        return [(g, l) for g in grid for l in grid]
    return [(cfg.eszsl.gamma, cfg.eszsl.lam)]


def score_methods(cfg: DictConfig, data: ZSLData, seed: int, device, progress: bool,
                  eszsl_params: tuple[float, float] | None = None) -> dict[str, tuple[Tensor, Tensor]]:
    """Train the seen network on ``data`` and return {method: (scores on test-seen, scores on test-unseen)}.

    ``eszsl_params``: fixed (gamma, lambda); None = every candidate i of ``_eszsl_candidates``, keyed "eszsl@i".
    """
    torch.manual_seed(seed)
    seen, unseen = data.seen_classes, data.unseen_classes
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    x_ts, x_tu = data.x_test_seen.to(device), data.x_test_unseen.to(device)
    attributes = data.attributes.to(device)
    model = build_network(cfg, data.input_shape, len(seen)).to(device)
    n = cfg.network
    fit_classifier(model, x_train, _columns(seen, data.n_classes, device)[y_train], epochs=n.epochs,
                   batch_size=n.batch_size, lr=n.lr, weight_decay=n.weight_decay, seed=seed, progress=progress)

    out: dict[str, tuple[Tensor, Tensor]] = {}
    if "niwt" in cfg.methods:
        niwt = NIWT(model, _niwt_layer(model, cfg.niwt.layer), model.classifier, seed=seed, progress=progress,
                    **_niwt_kwargs(cfg))
        gzsl = niwt.fit(x_train, y_train, attributes, seen, unseen).gzsl_model()
        out["niwt"] = (predict_scores(gzsl, x_ts), predict_scores(gzsl, x_tu))

    f_train, f_ts, f_tu = (_features(model, x, cfg.baseline_features) for x in (x_train, x_ts, x_tu))
    if cfg.baseline_normalize:  # L2-normalised features, as is common for ESZSL/ALE on CNN features
        f_train, f_ts, f_tu = (F.normalize(f, dim=1) for f in (f_train, f_ts, f_tu))
    if "eszsl" in cfg.methods:
        candidates = [eszsl_params] if eszsl_params else _eszsl_candidates(cfg)
        for i, (g, l) in enumerate(candidates):
            es = ESZSL(gamma=g, lam=l).fit(f_train, y_train, attributes, seen)
            out["eszsl" if eszsl_params else f"eszsl@{i}"] = (es.scores(f_ts), es.scores(f_tu))
    if "ale" in cfg.methods:
        ale = ALE(lr=cfg.ale.lr, epochs=cfg.ale.epochs, batch_size=cfg.ale.batch_size, margin=cfg.ale.margin,
                  weight_decay=cfg.ale.weight_decay, seed=seed).fit(f_train, y_train, attributes, seen)
        out["ale"] = (ale.scores(f_ts), ale.scores(f_tu))
    return out


def _evaluate(scores: tuple[Tensor, Tensor], data: ZSLData, gamma: float) -> GZSLResult:
    return gzsl_evaluate(scores[0], data.y_test_seen, scores[1], data.y_test_unseen, data.seen_classes,
                         data.unseen_classes, calibration=gamma)


def validate(cfg: DictConfig, data: ZSLData, seed: int, device, progress: bool) -> dict:
    """Calibration gammas (and ESZSL's regularisers) chosen on class-disjoint validation splits.

    Returns {"gamma": {method: gamma}, "eszsl": (gamma, lambda), "validation_H": {method: H}}; gammas are
    averaged over ``calibration.val_splits`` splits, ESZSL's pair is the one with the best mean H.
    """
    gammas: dict[str, list[float]] = {}
    hs: dict[str, list[float]] = {}
    for split in range(cfg.calibration.val_splits):
        val = class_disjoint_validation(data, cfg.calibration.val_unseen_fraction, cfg.calibration.val_test_fraction,
                                        seed=seed * 1000 + split)
        for name, scores in score_methods(cfg, val, seed, device, progress).items():
            if cfg.calibration.mode == "validate":
                g, h = select_calibration(scores[0], val.y_test_seen, scores[1], val.y_test_unseen,
                                          val.seen_classes, val.unseen_classes)
            else:
                g = cfg.calibration.gamma if cfg.calibration.mode == "fixed" else 0.0
                h = _evaluate(scores, val, g).H
            gammas.setdefault(name, []).append(g)
            hs.setdefault(name, []).append(h)
    out = {"gamma": {}, "validation_H": {}, "eszsl": None}
    eszsl_keys = [k for k in hs if k.startswith("eszsl@")]
    if eszsl_keys:
        best = max(eszsl_keys, key=lambda k: float(np.mean(hs[k])))
        out["eszsl"] = _eszsl_candidates(cfg)[int(best.split("@")[1])]
        gammas["eszsl"], hs["eszsl"] = gammas[best], hs[best]
    for name in cfg.methods:
        out["gamma"][name] = float(np.mean(gammas[name]))
        out["validation_H"][name] = float(np.mean(hs[name]))
    return out


def run_seed(cfg: DictConfig, data: ZSLData, seed: int, device, progress: bool) -> dict:
    """All methods on one seed -> {method: {U, S, H, zsl_accuracy, gamma, uncalibrated: {...}}}."""
    mode = cfg.calibration.mode
    chosen = {"gamma": {m: 0.0 for m in cfg.methods}, "eszsl": None, "validation_H": {}}
    if mode == "validate" or ("eszsl" in cfg.methods and cfg.eszsl.search):
        chosen = validate(cfg, data, seed, device, progress)
    if mode == "fixed":
        chosen["gamma"] = {m: float(cfg.calibration.gamma) for m in cfg.methods}
    elif mode == "none":
        chosen["gamma"] = {m: 0.0 for m in cfg.methods}
    eszsl_params = chosen["eszsl"] or (cfg.eszsl.gamma, cfg.eszsl.lam)
    scores = score_methods(cfg, data, seed, device, progress, eszsl_params=eszsl_params)
    results = {}
    for name in cfg.methods:
        calibrated = _evaluate(scores[name], data, chosen["gamma"][name]).as_dict()
        raw = _evaluate(scores[name], data, 0.0).as_dict()
        results[name] = {**calibrated, "gamma": chosen["gamma"][name], "uncalibrated": raw}
        if name in chosen["validation_H"]:
            results[name]["validation_H"] = chosen["validation_H"][name]
        if name == "eszsl":
            results[name]["eszsl_gamma"], results[name]["eszsl_lambda"] = (float(v) for v in eszsl_params)
    return results


# ----------------------------------------------------------------------------------------------------------
# Continual GZSL
# ----------------------------------------------------------------------------------------------------------
def _make_strategy(cfg: DictConfig, model: nn.Module, evaluator, device):
    from avalanche.training import EWC, LwF, Naive, Replay

    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.continual.lr)
    common = dict(model=model, optimizer=optimizer, criterion=nn.CrossEntropyLoss(),
                  train_mb_size=cfg.continual.batch_size, train_epochs=cfg.continual.epochs,
                  eval_mb_size=1024, device=device, evaluator=evaluator)
    name = cfg.continual.strategy
    if name == "naive":
        return Naive(**common)
    if name == "replay":
        return Replay(mem_size=cfg.continual.replay_mem_size, **common)
    if name == "ewc":
        return EWC(ewc_lambda=cfg.continual.ewc_lambda, **common)
    if name == "lwf":
        return LwF(alpha=cfg.continual.lwf_alpha, temperature=cfg.continual.lwf_temperature, **common)
    raise ValueError(f"continual.strategy must be naive, replay, ewc or lwf, got {name!r}")


def run_continual(cfg: DictConfig, data: ZSLData, seed: int, device, progress: bool,
                  strategy_factory: Callable | None = None) -> dict:
    """Seen classes over ``continual.n_experiences`` experiences; NIWT adds the unseen classes after each.

    Output columns follow the experience order of the seen classes. NIWT's importance (step 1) needs
    samples of the classes it maps: it uses the training samples of the classes learned so far (a strict
    continual setting would keep a small buffer of them). ``strategy_factory(model, evaluator, device)``
    replaces the configured Avalanche strategy.
    """
    from avalanche.benchmarks import nc_benchmark
    from avalanche.evaluation.metrics import accuracy_metrics, forgetting_metrics
    from avalanche.training.plugins import EvaluationPlugin
    from torch.utils.data import TensorDataset

    torch.manual_seed(seed)
    seen = list(data.seen_classes)
    rng = np.random.default_rng(seed)
    order = [seen[i] for i in rng.permutation(len(seen))] if cfg.continual.shuffle_classes else seen
    n_exp = cfg.continual.n_experiences
    if not 1 <= n_exp <= len(order):
        raise ValueError(f"continual.n_experiences={n_exp} must be between 1 and the {len(order)} seen classes")
    col = _columns(order, data.n_classes, "cpu")
    train_ds = TensorDataset(data.x_train, col[data.y_train])
    test_ds = TensorDataset(data.x_test_seen, col[data.y_test_seen])
    benchmark = nc_benchmark(train_ds, test_ds, n_experiences=n_exp, task_labels=False,
                             fixed_class_order=list(range(len(order))))
    model = build_network(cfg, data.input_shape, len(order)).to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no loggers" warning: results are collected here
        evaluator = EvaluationPlugin(accuracy_metrics(experience=True, stream=True),
                                     forgetting_metrics(experience=True, stream=True), loggers=[])
        strategy = strategy_factory(model, evaluator, device) if strategy_factory else \
            _make_strategy(cfg, model, evaluator, device)

    x_ts, x_tu = data.x_test_seen.to(device), data.x_test_unseen.to(device)
    attributes = data.attributes.to(device)
    records, learned_cols = [], []
    experiences = list(benchmark.train_stream)
    if progress:
        from tqdm.auto import tqdm
        experiences = tqdm(experiences, desc="continual GZSL")
    for exp in experiences:
        strategy.train(exp, num_workers=0)
        metrics = strategy.eval(benchmark.test_stream[:exp.current_experience + 1], num_workers=0)
        learned_cols += list(exp.classes_in_this_experience)
        learned = [order[c] for c in learned_cols]
        model.eval()
        is_learned = torch.isin(data.y_train, torch.as_tensor(learned))
        x_seen, y_seen = data.x_train[is_learned].to(device), data.y_train[is_learned].to(device)
        niwt = NIWT(model, _niwt_layer(model, cfg.niwt.layer), model.classifier, seed=seed, **_niwt_kwargs(cfg))
        gzsl = niwt.fit(x_seen, y_seen, attributes, learned, data.unseen_classes, seen_columns=learned_cols)
        gzsl = gzsl.gzsl_model()
        test_learned = torch.isin(data.y_test_seen, torch.as_tensor(learned))
        s_scores = predict_scores(gzsl, x_ts[test_learned.to(device)])
        r = gzsl_evaluate(s_scores, data.y_test_seen[test_learned], predict_scores(gzsl, x_tu),
                          data.y_test_unseen, learned, data.unseen_classes, calibration=cfg.continual.gamma)
        stream_acc = [v for k, v in metrics.items() if k.startswith("Top1_Acc_Stream")]
        stream_fgt = [v for k, v in metrics.items() if k.startswith("StreamForgetting")]
        records.append({"experience": int(exp.current_experience), "seen_classes_so_far": learned,
                        **r.as_dict(), "seen_accuracy": float(stream_acc[0]) if stream_acc else math.nan,
                        "forgetting": float(stream_fgt[0]) if stream_fgt else 0.0})
        model.train()
    return {"strategy": cfg.continual.strategy if strategy_factory is None else "custom",
            "class_order": order, "experiences": records}


# ----------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------
def _aggregate(per_seed: list[dict]) -> dict:
    """Mean over seeds of every metric, with ``<metric>_std`` (population std) beside it."""
    keys = (*METRICS, "gamma")
    records = [{"method": name, **{k: r[k] for k in keys},
                **{f"uncalibrated_{k}": r["uncalibrated"][k] for k in METRICS}}
               for seed in per_seed for name, r in seed.items()]
    stats = aggregate_runs(records, by=["method"], metrics=[*keys, *[f"uncalibrated_{k}" for k in METRICS]])
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
        out[name] = entry
    return out


def format_table(methods: dict, n_seeds: int) -> str:
    def cell(r: dict, k: str) -> str:
        return mean_std_cell(r[k], r[f"{k}_std"], n_seeds, "{:.3f}")

    rows = [[name, *[cell(r, k) for k in METRICS], f"{r['gamma']:.3g}", cell(r["uncalibrated"], "H")]
            for name, r in methods.items()]
    return markdown_table(["method", "U", "S", "H", "ZSL acc", "gamma", "H (uncalibrated)"], rows)


def _write_outputs(out_dir: Path, results: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(out_dir / "results.json")
    with open(out_dir / "results.csv", "w", newline="") as f:
        writer = csv.writer(f)
        keys = [*METRICS, "gamma"]
        writer.writerow(["method", *keys, *[f"{k}_std" for k in keys], *[f"uncalibrated_{k}" for k in METRICS]])
        for name, r in results["methods"].items():
            writer.writerow([name, *[r[k] for k in keys], *[r[f"{k}_std"] for k in keys],
                             *[r["uncalibrated"][k] for k in METRICS]])
    _plot(out_dir / "gzsl.png", results)


def _plot(path: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = results["methods"]
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
    ax.set_title(f"GZSL on {results['benchmark']} ({n_seeds} seed{'s' if n_seeds > 1 else ''})")
    ax.legend(ncol=3, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------
def _check(cfg: DictConfig) -> None:
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown or not cfg.methods:
        raise ValueError(f"methods {list(unknown) or '[]'} not valid; choose among {list(METHODS)}")
    if cfg.calibration.mode not in ("none", "fixed", "validate"):
        raise ValueError(f"calibration.mode must be none, fixed or validate, got {cfg.calibration.mode!r}")
    if cfg.baseline_features not in ("penultimate", "input"):
        raise ValueError(f"baseline_features must be penultimate or input, got {cfg.baseline_features!r}")
    if cfg.continual.enabled and cfg.continual.strategy not in ("naive", "replay", "ewc", "lwf"):
        raise ValueError(f"continual.strategy must be naive, replay, ewc or lwf, got {cfg.continual.strategy!r}")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name} but no CUDA device is available; use device=auto or device=cpu")
    return torch.device(name)


def run_gzsl(cfg: DictConfig, strategy_factory: Callable | None = None) -> dict:
    """Run the GZSL comparison described by ``cfg`` (configs/gzsl.yaml) and write its outputs."""
    _check(cfg)
    device = _device(cfg.device)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    seeds = [int(s) for s in cfg.seeds] if cfg.get("seeds") else [int(cfg.seed)]
    progress = bool(cfg.progress)
    out_dir = Path(cfg.output_dir)
    t0 = time.perf_counter()
    b = cfg.benchmark
    per_seed, continual, data = [], [], None
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
        per_seed.append(run_seed(cfg, data, seed, device, progress))
        if cfg.continual.enabled:
            continual.append(run_continual(cfg, data, seed, device, progress, strategy_factory))
    assert data is not None
    results = {"benchmark": data.name, "seen_classes": data.seen_classes, "unseen_classes": data.unseen_classes,
               "class_names": data.class_names, "seeds": seeds, "device": str(device),
               "calibration": cfg.calibration.mode, "methods": _aggregate(per_seed),
               "per_seed": {str(s): r for s, r in zip(seeds, per_seed)}}
    if continual:
        results["continual"] = continual[0] if len(continual) == 1 else {"per_seed": continual}
    results["seconds"] = time.perf_counter() - t0
    _write_outputs(out_dir, results)
    OmegaConf.save(cfg, out_dir / "config.yaml")
    print(f"GZSL on {data.name}: {len(data.seen_classes)} seen / {len(data.unseen_classes)} unseen classes, "
          f"seeds {seeds}, calibration={cfg.calibration.mode}, {results['seconds']:.1f}s")
    print(format_table(results["methods"], len(seeds)))
    if continual:
        for run in continual:
            for rec in run["experiences"]:
                print(f"  continual exp {rec['experience']}: U={rec['U']:.3f} S={rec['S']:.3f} H={rec['H']:.3f} "
                      f"forgetting={rec['forgetting']:.3f}")
    print(f"results: {out_dir / 'results.json'}")
    return results
