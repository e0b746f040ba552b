"""Continual GZSL: ``modnet gzsl continual.enabled=true strategies=[modnet,naive]``.

The seen classes arrive over ``continual.n_experiences`` experiences (``scenarios.base.split_benchmark`` on the
seen-class tensors, class order drawn with the seed), so every strategy of ``modnet cl``'s registry gets a
normal ``BenchmarkInfo`` and runs through the one runner (``make_strategy`` + ``run_experiences``). After each
experience's evaluation a runner hook (``ZeroShotProbe``) lets NIWT add the unseen classes to the current
network and scores U, S, H over all classes learned so far plus the unseen ones.

Scenario: class-incremental for every strategy (a baseline has one head over all seen classes, the modular network
infers the task). GZSL scores a test image over all classes without telling which classes it may belong to; the
test-seen images are scored the same way, so U, S and H come from one label-free score vector per image.

The modular network (``modnet``) has one head and one HAT-masked path per experience; without a task label its
``infer_task`` scores log p(c|x) = log p(t|x) + log p(c|x, t) with p(t|x) from the closed-form task keys.
NIWT on it (``NIWT.fit_heads``):
  step 1  each learned class's importance at ``unit_taps[niwt.layer]`` through its own task's path and head
          (that task's masks at s = smax and its module gates, eval mode);
  step 2  one knowledge -> importance map over all learned classes (the units are shared by the tasks: the
          masks select units, they do not rename them);
  step 3  unseen weights fitted through every task's path and added as new rows of every head
          (``HATNet.add_classes``), so an unseen class u scores max_t [log p(t|x) + log p(u|x, t)]: it
          competes inside the task the image resembles, as that task's own classes do, and no task label is
          needed. One head per task alone would not do: a head only knows its own task's classes, and the
          task keys hold no key for a class without samples.
The unseen rows go into a copy of the network (``copy.deepcopy``): the next experience trains the network
without them. HAT's masks keep every earlier task's path and head as they were: with the experience known the
network forgets nothing, without it the only loss is task inference (a new task's keys competing with the old).

Baselines (Avalanche strategies: one head over all seen classes): NIWT on that head (``NIWT.fit`` +
``GZSLModel``), importance at the backbone's ReLU ``niwt.layer`` (ResNet-18: its residual block).

NIWT's step 1 needs samples of the classes it maps: it uses the training samples of the classes learned so far
(a strict continual setting would keep a small buffer of them).

Recorded per strategy and experience i (mean and std over seeds, and per seed):
  U, S, H, zsl_accuracy   the GZSL figures above, at ``continual.gamma``, without any task label;
  seen_accuracy           mean_{j<=i} A[i][j], A[i][j] the network's accuracy (no unseen rows) on experience j's
                          test-seen images after experience i, each image's class chosen among experience j's
                          classes (the experience known: for the modular network, task j's own head);
  forgetting              mean_{j<i} (max_{j<=l<i} A[l][j] - A[i][j]) (Chaudhry et al. 2018, ``modnet cl``'s
                          definition, ``modnet.eval.results.forgetting``): what training the later experiences
                          destroyed of the earlier ones (the figures below, from stop 53, are mean_{j<i}
                          (A[j][j] - A[i][j]), the drop from the accuracy right after training);
  class_incremental_*     the same two from Avalanche's accuracy with no task label (R). For the modular network
                          their drop also counts the task-inference errors that a new task's keys add while no
                          weight of an old task changes (HAT). Digits, 4 experiences, 3 seeds, defaults: modnet
                          0.018 +- 0.005 without the label, exactly 0 with it; fine-tuning (naive) 0.995 +- 0.003
                          without the label, 0.035 +- 0.039 with it (its single head still separates the classes
                          of an old experience while their rows lose every comparison with the new classes);
  S_by_experience, S_forgetting   the GZSL S of each experience's classes and its drop: on digits NIWT's unseen
                          rows, refitted after every experience, move an experience's S by up to +-0.3, so this is
                          recorded but is not the forgetting.
The accuracy matrices (``accuracy_matrix``: A, lower triangle; ``class_incremental_accuracy_matrix``: R) are kept
per seed.
"""
from __future__ import annotations

import copy
import functools

import numpy as np
import torch
from torch import Tensor, nn

from modnet.config import ConfigError
from modnet.eval.results import forgetting
from modnet.eval.tables import SEED_STD_DDOF
from modnet.methods.gzsl import gzsl_evaluate, predict_scores
from modnet.runner.runner import RunnerHook
from modnet.zsl.niwt import fixed_layer
from scenarios.zsl import ZSLData

FIGURES = ("U", "S", "H", "zsl_accuracy", "seen_accuracy", "forgetting", "class_incremental_seen_accuracy",
           "class_incremental_forgetting", "S_forgetting")


# ----------------------------------------------------------------------------------------------------------
# The benchmark and the strategies
# ----------------------------------------------------------------------------------------------------------
class ColumnSpace:
    """The continual benchmark's classes as network columns: the seen classes in experience order, then the
    unseen ones (``classes[k]`` is the dataset class of column k); data and knowledge re-indexed by column."""

    def __init__(self, data: ZSLData, seed: int, shuffle: bool):
        seen = list(data.seen_classes)
        order = [seen[i] for i in np.random.default_rng(seed).permutation(len(seen))] if shuffle else seen
        self.classes = order + list(data.unseen_classes)
        self.n_seen = len(order)
        self.unseen = list(range(self.n_seen, len(self.classes)))
        column = torch.full((data.n_classes,), -1, dtype=torch.long)
        column[torch.tensor(self.classes)] = torch.arange(len(self.classes))
        self.knowledge = data.attributes[torch.tensor(self.classes)]
        self.train = (data.x_train, column[data.y_train])
        self.test_seen = (data.x_test_seen, column[data.y_test_seen])
        self.test_unseen = (data.x_test_unseen, column[data.y_test_unseen])


def build_benchmark(cfg, data: ZSLData, seed: int, device):
    """(``ColumnSpace``, class-incremental ``BenchmarkInfo`` of the seen classes over the experiences)."""
    from scenarios.base import split_benchmark

    space = ColumnSpace(data, seed, cfg.continual.shuffle_classes)
    n_exp = cfg.continual.n_experiences
    if n_exp < 1 or space.n_seen % n_exp:
        raise ConfigError(f"continual.n_experiences={n_exp} must be a positive divisor of the {space.n_seen} seen "
                          "classes (they are split evenly into the experiences)")
    arrays = (*space.train, *space.test_seen)
    if cfg.train.data_on_device:
        arrays = tuple(a.to(device) for a in arrays)
    info = split_benchmark(f"continual-{data.name}", *arrays, n_experiences=n_exp, scenario="class", seed=seed,
                           class_order=range(space.n_seen))
    return space, info


def check_strategies(cfg, data: ZSLData, seed: int, device) -> None:
    """Build every strategy of ``cfg.strategies`` on the continual benchmark (no training) and check that NIWT
    can extend its network: one ConfigError line, before any training."""
    from modnet.eval.metrics import build_evaluator
    from modnet.runner.runner import make_strategy
    from strategies.memory import run_order, training_sizes

    run_order(cfg)  # a buffer sized to modnet's bytes (match) needs modnet among the strategies
    _, info = build_benchmark(cfg, data, seed, device)
    built = training_sizes(cfg)  # built only: a matched buffer's size is known once modnet has trained
    for name in cfg.strategies:
        model = make_strategy(name, built, info, device, build_evaluator([], None, False)[0]).model
        try:
            importance_layer_of(model, fixed_layer(cfg))
        except TypeError as err:
            raise ConfigError(f"strategy {name} cannot take part in continual GZSL: {err}") from None


# ----------------------------------------------------------------------------------------------------------
# NIWT on a strategy's network
# ----------------------------------------------------------------------------------------------------------
def importance_layer_of(model: nn.Module, index: int) -> nn.Module:
    """Where NIWT measures importance in a strategy's network: the modular network's ``unit_taps[index]``, a
    baseline backbone's ReLU ``index`` (ResNet-18: residual block ``index``)."""
    from modnet.zsl.niwt import importance_layer
    from modnet.nets.models import HATNet, ResNet18Backbone, SingleHeadNet

    if isinstance(model, HATNet):
        return importance_layer(model, index)
    if not isinstance(model, SingleHeadNet):
        raise TypeError(f"NIWT adds unseen classes as rows of a linear head; a {type(model).__name__} has none")
    backbone = model.backbone
    units = list(backbone.blocks) if isinstance(backbone, ResNet18Backbone) else \
        [m for m in backbone if isinstance(m, nn.ReLU)]
    if not -len(units) <= index < len(units):
        raise ConfigError(f"niwt.layer={index} but the baseline network has {len(units)} hidden layers; choose one "
                          f"of {-len(units)}..{len(units) - 1}")
    return units[index]


def zero_shot_network(model: nn.Module, cfg, space: ColumnSpace, learned: list[int], x_seen: Tensor,
                      y_seen: Tensor, seed: int) -> nn.Module:
    """The current network with the unseen classes added by NIWT: a module whose eval forward scores every
    column (seen columns not learned yet excluded by the evaluation). The strategy's network is not changed."""
    from modnet.methods.niwt import NIWT, Head
    from modnet.zsl.niwt import niwt_arguments
    from modnet.nets.models import HATNet

    knowledge = space.knowledge.to(x_seen.device)
    if isinstance(model, HATNet):
        net = copy.deepcopy(model).eval()
        tasks = range(net.trained)
        heads = [Head(net.heads[t], net.task_classes[t], forward_fn=functools.partial(net.task_logits, task=t))
                 for t in tasks]
        niwt = NIWT(net, importance_layer_of(net, fixed_layer(cfg)), None, seed=seed, **niwt_arguments(cfg))
        niwt.fit_heads(x_seen, y_seen, knowledge, heads, space.unseen)
        for t, unseen in zip(tasks, niwt.unseen_by_head):
            net.add_classes(t, space.unseen, unseen.weight, unseen.bias)
        return net
    niwt = NIWT(model, importance_layer_of(model, fixed_layer(cfg)), model.classifier, seed=seed,
                **niwt_arguments(cfg))
    niwt.fit(x_seen, y_seen, knowledge, learned, space.unseen, seen_columns=learned)
    return niwt.gzsl_model().eval()


class ZeroShotProbe(RunnerHook):
    """Runner hook: after each experience's evaluation (``row``: the strategy's class-incremental accuracy on
    every test experience), NIWT extends the current network and the figures of the module doc are recorded."""

    def __init__(self, cfg, space: ColumnSpace, info, seed: int, device):
        self.cfg, self.space, self.seed, self.device = cfg, space, seed, device
        self.experience_classes = [torch.tensor(c) for c in info.global_task_classes]
        self.task_aware_rows: list[list[float]] = []
        self.class_incremental_rows: list[list[float]] = []
        self.s_rows: list[list[float]] = []
        self.records: list[dict] = []

    def after_eval_exp(self, index: int, strategy, row: list[float]) -> None:
        space, device = self.space, self.device
        experiences = self.experience_classes[:index + 1]
        learned = torch.cat(experiences).sort().values
        x_train, y_train = space.train
        is_learned = torch.isin(y_train.cpu(), learned)
        x_seen, y_seen = x_train[is_learned.to(x_train.device)].to(device), y_train[is_learned.to(y_train.device)]
        x_ts, y_ts = space.test_seen
        test_learned = torch.isin(y_ts.cpu(), learned).to(y_ts.device)
        x_ts, y_ts = x_ts[test_learned].to(device), y_ts[test_learned].to(device)
        x_tu, y_tu = space.test_unseen[0].to(device), space.test_unseen[1].to(device)

        # seen accuracy of the trained network itself (no unseen rows), with and without the experience known
        scores = predict_scores(strategy.model, x_ts)
        task_aware = []
        for exp in experiences:
            cols = exp.to(device)
            mine = torch.isin(y_ts, cols)
            task_aware.append(float((cols[scores[mine][:, cols].argmax(1)] == y_ts[mine]).float().mean()))
        self.task_aware_rows.append(task_aware)
        self.class_incremental_rows.append(list(row))

        # GZSL: NIWT's unseen classes added to (a copy of) the network, every class scored without a task label
        learned_list = learned.tolist()
        zero_shot = zero_shot_network(strategy.model, self.cfg, space, learned_list, x_seen, y_seen.to(device),
                                      self.seed)
        s_scores, u_scores = predict_scores(zero_shot, x_ts), predict_scores(zero_shot, x_tu)
        gamma = float(self.cfg.continual.gamma)
        result = gzsl_evaluate(s_scores, y_ts, u_scores, y_tu, learned_list, space.unseen, calibration=gamma)
        s_row = []
        for exp in experiences:
            mine = torch.isin(y_ts, exp.to(device))
            s_row.append(gzsl_evaluate(s_scores[mine], y_ts[mine], u_scores, y_tu, learned_list, space.unseen,
                                       calibration=gamma).S)
        self.s_rows.append(s_row)
        self.records.append({
            "experience": index, "seen_classes_so_far": [space.classes[c] for c in learned_list],
            **result.as_dict(),
            "seen_accuracy": float(np.mean(task_aware)), "forgetting": forgetting(self.task_aware_rows),
            "class_incremental_seen_accuracy": float(np.mean(row[:index + 1])),
            "class_incremental_forgetting": forgetting(self.class_incremental_rows),
            "S_by_experience": s_row, "S_forgetting": forgetting(self.s_rows)})


class _ProbeLine(RunnerHook):
    """Runner hook after a ``ZeroShotProbe``: one line per experience with the GZSL figures just recorded (on a
    terminal too: the progress bars show the training, not these)."""

    def __init__(self, probe: ZeroShotProbe, prefix: str, n: int):
        self.probe, self.prefix, self.n = probe, prefix, n

    def after_eval_exp(self, index: int, strategy, row: list[float]) -> None:
        r = self.probe.records[-1]
        print(f"{self.prefix} experience {index + 1}/{self.n}: U {r['U']:.3f}, S {r['S']:.3f}, H {r['H']:.3f}, "
              f"seen accuracy {r['seen_accuracy']:.3f} (class-incremental "
              f"{r['class_incremental_seen_accuracy']:.3f})", flush=True)


# ----------------------------------------------------------------------------------------------------------
# One seed, every strategy; seeds together
# ----------------------------------------------------------------------------------------------------------
def run_continual(cfg, data: ZSLData, seed: int, device, progress: bool) -> dict:
    """Every strategy of ``cfg.strategies`` over the experiences of one seed -> {"seed", "class_order",
    "strategies": {name: {"experiences": [...], "accuracy_matrix", "network"}}}."""
    from modnet.eval.metrics import build_evaluator
    from modnet.nets.record import describe_network
    from modnet.runner.evaluation import stream_evaluator
    from modnet.runner.runner import make_strategy, run_experiences, set_seed
    from strategies.memory import run_order, with_matched_memory
    from strategies.registry import get_strategy

    space, info = build_benchmark(cfg, data, seed, device)
    bm = info.benchmark
    out, failed = {}, {}
    for name in run_order(cfg):  # modnet first when a buffer is sized to its stored bytes (match)
        print(f"=== continual GZSL | {name} | {info.name} | seed {seed} ===", flush=True)
        try:
            strategy_cfg = with_matched_memory(cfg, name, info, out.get("modnet", {}).get("stored_bytes"))
        except ConfigError as err:  # modnet's bytes hold no sample: left out, the job's other results kept
            failed[name] = str(err)
            print(f"[continual GZSL {name} seed {seed}] left out: {err}", flush=True)
            continue
        set_seed(seed)
        # Avalanche's progress bars on a terminal (build_evaluator drops them elsewhere)
        evaluator, accuracy = build_evaluator(["interactive"], cfg.output_dir, progress)
        strategy = make_strategy(name, strategy_cfg, info, device, evaluator)
        probe = ZeroShotProbe(cfg, space, info, seed, device)
        run_experiences(strategy, bm.train_stream, stream_evaluator(bm.test_stream, accuracy), seed=seed,
                        hooks=[probe, _ProbeLine(probe, f"[continual GZSL {name} seed {seed}]", info.n_experiences)])
        entry = get_strategy(name)  # what it keeps besides the network (as in modnet cl's results)
        out[name] = {"experiences": probe.records, "accuracy_matrix": probe.task_aware_rows,
                     "class_incremental_accuracy_matrix": probe.class_incremental_rows,
                     "stored_bytes": None if entry.stored_bytes is None else int(entry.stored_bytes(strategy, info)),
                     **({"settings": entry.settings(strategy)} if entry.settings is not None else {}),
                     "network": describe_network(strategy.model)}
    return {"seed": seed, "class_order": space.classes[:space.n_seen],
            "strategies": {name: out[name] for name in cfg.strategies if name in out}, "failed": failed}


def aggregate(runs: list[dict], cfg) -> dict:
    """Per strategy and experience: the mean and (population) std over seeds of every figure; the per-seed runs.
    A strategy left out on some seed (``failed``) is left out of the table, named under ``failed``."""
    failed = {name: {"seed": r["seed"], "error": err} for r in reversed(runs) for name, err in r.get("failed", {}).items()}
    names = [name for name in runs[0]["strategies"] if name not in failed and all(name in r["strategies"] for r in runs)]
    strategies = {}
    for name in names:
        per_seed = [r["strategies"][name] for r in runs]
        experiences = []
        for i in range(len(per_seed[0]["experiences"])):
            entry: dict = {"experience": i}
            for k in FIGURES:
                vals = [run["experiences"][i][k] for run in per_seed]
                entry[k], entry[f"{k}_std"] = float(np.mean(vals)), float(np.std(vals, ddof=SEED_STD_DDOF))
            experiences.append(entry)
        final = experiences[-1]
        stored = [run.get("stored_bytes") for run in per_seed]
        strategies[name] = {**{k: final[k] for k in FIGURES}, **{f"{k}_std": final[f"{k}_std"] for k in FIGURES},
                            "stored_bytes": None if None in stored else float(np.mean(stored)),
                            "experiences": experiences, "network": per_seed[0]["network"],
                            "per_seed": [{"seed": r["seed"], "class_order": r["class_order"],
                                          **{k: v for k, v in r["strategies"][name].items() if k != "network"}}
                                         for r in runs]}
    return {"n_experiences": int(cfg.continual.n_experiences), "gamma": float(cfg.continual.gamma),
            "scenario": "class", "strategies": strategies, **({"failed": failed} if failed else {})}


def write_outputs(out_dir, continual: dict) -> None:
    """``continual.csv`` (a row per strategy and experience: the table's figures, mean and ``_std`` over seeds;
    ``after_exp`` is Avalanche's experience id, from 0, as in ``modnet cl``'s results.csv) and
    ``continual_gzsl.png`` (H and the seen accuracy with and without the experience known, per experience)."""
    import csv
    from pathlib import Path

    out_dir = Path(out_dir)
    tmp = out_dir / "continual.csv.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["strategy", "seeds", "after_exp", *[c for k in FIGURES for c in (k, f"{k}_std")]])
        for name, r in continual["strategies"].items():
            n_seeds = len(r.get("per_seed") or [r])
            for e in r["experiences"]:
                writer.writerow([name, n_seeds, e["experience"], *[v for k in FIGURES for v in (e[k], e[f"{k}_std"])]])
    tmp.replace(out_dir / "continual.csv")
    _plot(out_dir / "continual_gzsl.png", continual)


def _plot(path, continual: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from modnet.eval.results import save_figure

    panels = (("H", "GZSL H (no task label)"), ("seen_accuracy", "seen accuracy, experience known"),
              ("class_incremental_seen_accuracy", "seen accuracy, no task label"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8))
    n = continual["n_experiences"]
    for ax, (key, label) in zip(axes, panels):
        for name, r in continual["strategies"].items():
            xs = [e["experience"] + 1 for e in r["experiences"]]  # counted from 1, as the table
            ax.errorbar(xs, [e[key] for e in r["experiences"]], yerr=[e[f"{key}_std"] for e in r["experiences"]],
                        marker="o", capsize=3, label=name)
        ax.set_xticks(range(1, n + 1))
        ax.set_xlabel("experiences trained")
        ax.set_ylabel(label)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    seeds = len(next(iter(continual["strategies"].values())).get("per_seed") or [None])
    fig.suptitle(f"continual GZSL, {n} experiences, class-incremental, gamma {continual['gamma']:g}"
                 + (f", mean of {seeds} seeds" if seeds > 1 else ""))
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def format_table(continual: dict) -> str:
    lines = [f"continual GZSL ({continual['n_experiences']} experiences, class-incremental, gamma "
             f"{continual['gamma']:g}): figures after each experience, mean ± std over seeds",
             "| strategy | exp | U | S | H | seen acc | forgetting | seen acc (no task label) | forgetting (no task "
             "label) |", "|---|---|---|---|---|---|---|---|---|"]
    from modnet.eval.tables import mean_std_cell

    for name, r in continual["strategies"].items():
        runs = len(r.get("per_seed", [])) or 1
        for e in r["experiences"]:
            # one seed has no spread to show: the value alone, as the other tables give it
            cell = lambda k: mean_std_cell(e[k], e.get(k + "_std"), runs, "{:.3f}")  # noqa: E731
            # experience counted from 1, as the progress lines (results.json: Avalanche's id, from 0)
            lines.append(f"| {name} | {e['experience'] + 1} | {cell('U')} | {cell('S')} | {cell('H')} | "
                         f"{cell('seen_accuracy')} | {cell('forgetting')} | "
                         f"{cell('class_incremental_seen_accuracy')} | {cell('class_incremental_forgetting')} |")
    stored = [f"{name} {r['stored_bytes']:.0f}" for name, r in continual["strategies"].items()
              if r.get("stored_bytes") is not None]
    if stored:  # what each keeps besides its network (mean over seeds): the memory the comparison is at
        lines.append(f"stored bytes: {', '.join(stored)}")
    for name, f in continual.get("failed", {}).items():
        lines.append(f"left out: {name} (seed {f['seed']}): {f['error']}")
    return "\n".join(lines)
