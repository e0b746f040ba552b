"""Checks of a composed config that run before any job module (torch, Avalanche) is imported.

``modnet.cli`` calls ``validate(job, cfg)`` between composing the config and importing the job (``modnet ddp``'s
launcher and ``modnet sweep`` call it with ``cl`` before starting any process), so that a
typo or an impossible value is one line (``ConfigError`` / ``ValueError``, exit code 2) in about a second,
not after 10-30 s of imports or, worse, after training has started. Only numpy and the light registries
(``strategies.registry``, ``scenarios.registry``) are imported here.

What is checked (where the config has the key):
* ``strategies``: non-empty, no repeats, every name registered; ``seeds``: null or a non-empty list of
  distinct integers; ``scenario``, ``model.arch``, ``loggers``: among their choices;
* ``train.epochs``, ``train.batch_size``, ``train.eval_batch_size``, ``benchmark.n_experiences``: positive;
  ``modules.settle_epochs``: a non-negative integer;
  ``threads`` (and in ``gzsl`` ``large_train.threads``, ``clswgan.threads``): a positive integer or null (torch's
  default);
* ``output_dir``: a non-empty string, not a file (nor below one), somewhere a folder can be created;
  ``task_inference.transform_rows``: in (0, 1];
  ``task_inference.transform_copies``: among its choices, ``replace`` only with transform_rows 1;
  ``train.channels_last``: true, false or auto; ``train.compile``: a bool or a backend's name, and a C++
  compiler on the PATH for inductor;
* ``replay.mem_size`` / ``der.mem_size`` / ``derpp.mem_size`` / ``gem.patterns_per_exp`` /
  ``agem.patterns_per_exp`` = ``match`` in ``cl``: modnet among the strategies (the buffer is sized to its
  stored bytes, ``strategies.memory``);
* ``benchmark.unseen_classes`` without repeats, ``benchmark.test_fraction`` in (0, 1); in ``gzsl`` ``methods``
  (known names, no repeats) and ``calibration.mode``, in ``explain`` ``explain.backend``, among their choices;
* in ``gzsl`` (``check_gzsl_options``, which ``modnet.jobs.gzsl`` calls too): ``baseline_features`` and the
  ``features`` of clswgan / large_train.clswgan among their choices, ``seen_network.hat_c`` >= 0, every key of
  ``large_train.clswgan`` / ``large_train.ale`` a key of its block, the gate's quantiles, layers, shrinkage and
  ``min_seen_ratio``, ``calibration.val_min_classes`` >= 1; where a NIWT method runs the niwt block's choices
  (``init``, ``bias``, ``scale``, ``map_fit``), layers, ``map_ridge`` >= 0, ``seen_budget`` in [0, 1),
  ``map_fit=centered`` with ``map_bias``, and no ``niwt_positives`` or ``niwt.scale`` on a cosine head;
  ``model.arch`` among its choices; with ``continual.enabled`` the strategies;
* the chosen benchmark's own check (``scenarios.registry``'s ``check``: npz, awa2 and cub a ``path`` that is
  there, torchvision's data sets their folder under ``root`` unless ``download``, digits' ``unseen_classes``
  some of 0..9) and in ``cl`` ``benchmark.class_order`` every class id once and ``n_experiences`` a divisor of
  the class count where the benchmark fixes it; ``device``: auto, cpu, cuda[:N], mps or xpu[:N]; every learning
  rate (``lr``, ``*_lr`` at any depth) >= 0 or null;
* ``benchmark=npz`` in ``cl``: the file's arrays (``scenarios.sources.check_npz_arrays``: integer labels,
  class ids 0..C-1, equal feature widths, ...) and that its classes split into ``n_experiences``;
* ``benchmark=npz`` in ``gzsl`` / ``explain`` (without ``run_dir``): the zero-shot arrays
  (``scenarios.sources.check_zsl_npz``: one attribute row per class with samples, unseen classes absent from
  training and present in the test set, integer labels, equal feature widths);
* ``ratio_clock`` in ``bench``: auto, wall or thread_cpu, the last only with ``threads=1`` on the CPU;
  ``lockstep_steps`` a positive integer; ``loops``: null or distinct names of the bench's loops; ``baselines``:
  distinct names of the strategies it can time on a second task; ``samples.<arch>`` and ``batch_size.<arch>``
  positive integers, samples at least a batch; ``sync_sizes`` unit counts >= 2; ``repeats`` >= 1, ``epochs`` >= 2 (the first
  is a warm-up), ``ratio_rounds`` >= 0;
* the network's and the strategies' choices and numbers where a job has them (``model.gate``, ``model.modules``,
  ``model.head``, ``model.transform_heads``, ``task_inference.method``, ``ewc.mode`` with its ``decay_factor``,
  ``hat.smax`` > 0, penalty weights >= 0, memory sizes > 0, ``benchmark.class_order`` without repeats), before
  the first strategy trains; ``modules.estimator``, ``hat.task_inference``, ``hnet.task_inference``, ``hnet.init``
  among their choices; layer widths and counts (``model.hidden``, ``model.n_layers``, ``model.cnn_channels``,
  the bench's ``mlp*.in_dim/hidden/n_layers``, ``hnet.batch_size``, ``modules.cluster.min_modules`` <=
  ``max_modules``) positive; ``modules.k_share`` in [0, 1], dropouts in [0, 1), momentum, shrinkages and DER's
  weights >= 0; every number finite; ``seeds`` >= 0; in ``gzsl`` at least 3 seen classes and
  ``calibration.val_splits`` null or positive; in ``explain`` a ``run_dir`` holding a finished run's files, not
  its ``output_dir``, a ``run_seed`` of its seeds, and ``explain.task`` / ``explain.layers`` within the network
  its results.json records;
* where the modular network is built: ``model.gate=topk`` with ``model.modules=sync``, and
  ``task_inference.method=ood`` (class-incremental) not with ``model.transform_heads=never``; ``model.arch=cnn`` /
  ``resnet18`` in cl and gzsl not on vectors (mnist1d, digits without ``image``, an npz of 2-d x); in cl
  ``benchmark.max_train_samples`` at least the class count (an npz's: its first samples hold every class);
* in ``explain``: ``explain.task`` / ``explain.layers`` indices >= 0, its counts >= 1 and choices; without ``run_dir``
  the network it trains (configs/cl.yaml with ``train.cl_overrides``) has module gates, the task
  (< ``train.experiences``) and the masked layers (MLP: ``model.n_layers``, small CNN: its conv blocks + 1);
* in ``bench``: ``archs`` among its networks, ``image_shape`` [C, H, W] with H, W >= 2 ** the CNN's conv blocks.
"""
from __future__ import annotations

import math
import os
import re
import sys
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf

from modnet.config import (GATES, MODULES, TRANSFORM_COPIES, ConfigError, check_choice, check_share,  # noqa: F401
                           transform_copies)

# copies of the choices whose modules import torch / Avalanche (tests/test_faults.py checks they agree)
SCENARIOS = ("task", "class")                                       # scenarios.base.SCENARIOS
ARCHS = ("auto", "mlp", "cnn", "resnet18")                           # modnet.nets.build.ARCHS
LOGGERS = ("interactive", "text", "csv", "tensorboard", "wandb")     # modnet.eval.metrics.LOGGERS

HEADS = ("linear", "cosine")                                         # modnet.nets.build.HEADS
TASK_INFERENCE = ("auto", "gauss", "keys", "ood", "features", "heads")  # modnet.nets.build.TASK_INFERENCE
TRANSFORM_HEADS = ("auto", "inference", "always", "never")           # modnet.nets.build.TRANSFORM_HEADS
EWC_MODES = ("separate", "online")
ESTIMATORS = ("st", "gumbel")                 # modnet.nets.modules.ModuleGate
HEAD_TASK_INFERENCE = ("maxprob", "entropy")  # modnet.nets.models.MultiHeadTaskNet (hat.* and hnet.*)
HNET_INITS = ("xavier", "hyperfan")           # strategies.plugins.hnet.HNetModel

TRANSFORM_ROWS = "the share of each batch in the transform heads' loss; 1 = all"   # modnet.nets.build

POSITIVE = ("train.epochs", "train.batch_size", "train.eval_batch_size", "benchmark.n_experiences")
# null: torch's default (every core, or OMP_NUM_THREADS); 0, which cl and bench once read as that, is refused
# modnet gzsl's method names and calibration modes, modnet explain's map backends: checked here, before the
# 7-8 s of imports their registries take (modnet.zsl.registry, modnet.jobs.gzsl, modnet.explain.gradcam)
ZSL_METHODS = ("ale", "clswgan", "devise", "eszsl", "niwt", "niwt_positives", "niwt_routed")
CALIBRATION_MODES = ("none", "fixed", "validate")  # calibration.mode (modnet.jobs.gzsl reads it from here)
BASELINE_FEATURES = ("auto", "penultimate", "input")                # modnet.zsl.seen_network.BASELINE_FEATURES
NIWT_INITS = ("seen_centered", "seen_mean")                          # modnet.methods.niwt.UNSEEN_INITS
NIWT_BIASES = ("zero", "seen_mean")                                  # modnet.methods.niwt.UNSEEN_BIASES
NIWT_SCALES = ("none", "norm", "negatives", "positives", "seen_budget")  # modnet.methods.niwt.UNSEEN_SCALES
NIWT_MAP_FITS = ("adam", "centered")                                 # modnet.methods.niwt.MAP_FITS
NIWT_METHODS = ("niwt", "niwt_routed", "niwt_positives")  # the gzsl methods that read the niwt block
LARGE_METHOD_BLOCKS = ("clswgan", "ale")  # method blocks that large_train may override key by key (modnet.jobs.gzsl)
EXPLAIN_BACKENDS = ("captum", "pytorch_grad_cam")

NON_NEGATIVE = ("modules.settle_epochs",)
POSITIVE_OR_NULL = {"gzsl": ("threads", "large_train.threads", "clswgan.threads"), "cl": ("threads",),
                    "bench": ("threads",)}


RATIO_CLOCKS = ("auto", "wall", "thread_cpu")
# the names of modnet.jobs.bench.RATIO_LOOPS, the bench's ``loops`` choices
BENCH_LOOPS = ("plain", "naive", "naive (Avalanche loader)", "modnet (Avalanche loader)", "modnet (HAT only)",
               "modnet (HAT + gates)", "modnet (no transform heads)", "modnet", "modnet (second task)",
               "modnet + sync regulariser", "plain (modnet's rows)", "modnet (compiled)", "naive (compiled)",
               "plain (compiled)")
# the baselines the bench times on a second task (``baselines``), each a loop "<name> (second task)"
BENCH_BASELINES = ("naive", "ewc", "si", "lwf", "gem", "agem", "replay", "cumulative", "der", "derpp")
BENCH_LOOPS += tuple(f"{name} (second task)" for name in BENCH_BASELINES)
BENCH_ARCHS = ("mlp", "mlp_small", "cnn", "resnet18")  # modnet.jobs.bench.MLP_ARCHS and its image networks


def _check_ratio_clock(cfg: DictConfig) -> None:
    clock = cfg.get("ratio_clock", "auto")
    check_choice("ratio_clock", clock, RATIO_CLOCKS)
    steps = cfg.get("lockstep_steps", 1)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"config lockstep_steps={steps!r} must be a positive integer (training steps a loop takes "
                          f"per turn in thread_cpu rounds; 8 by default)")
    if clock == "thread_cpu" and (cfg.get("threads") != 1 or cfg.get("device") == "cuda"):
        raise ConfigError("config ratio_clock=thread_cpu times one thread's CPU: it needs threads=1 on the CPU "
                          "(device=cpu); use ratio_clock=wall, or auto")
    baselines = cfg.get("baselines") or []
    names = list(baselines) if isinstance(baselines, (list, ListConfig)) else None
    if names is None or len(set(names)) != len(names) or any(n not in BENCH_BASELINES for n in names):
        raise ConfigError(f"config baselines={baselines!r} must be a list of distinct strategies among: "
                          f"{', '.join(BENCH_BASELINES)} (each timed on the second task of two, beside naive's)")
    loops = cfg.get("loops")
    if loops is not None:
        names = list(loops) if isinstance(loops, (list, ListConfig)) else None
        if not names or len(set(names)) != len(names) or any(n not in BENCH_LOOPS for n in names):
            raise ConfigError(f"config loops={loops!r} must be null (every loop) or a list of distinct loop names "
                              f"among: {', '.join(BENCH_LOOPS)} (quote names with spaces: "
                              f"'loops=[plain,modnet,\"modnet (HAT only)\"]')")


def validate(job: str, cfg: DictConfig) -> None:
    """Every check of the module docstring that applies to ``cfg``; the first problem is raised."""
    for key in POSITIVE:
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is None or (isinstance(value, int) and value <= 0):  # null: no default to fall back on
            raise ConfigError(f"config {key}={'null' if value is None else value} must be a positive integer")
    for key in NON_NEGATIVE:
        value = OmegaConf.select(cfg, key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ConfigError(f"config {key}={value!r} must be a non-negative integer (0 = off)")
    for key in POSITIVE_OR_NULL.get(job, ()):
        value = OmegaConf.select(cfg, key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"config {key}={value!r} must be a positive integer or null (torch's default: every core)")
    if "strategies" in cfg or job == "cl":  # cl's list of strategies is its run; null or deleted: one line
        _check_strategies(cfg.get("strategies"))
    if "seeds" in cfg:
        _check_seeds(cfg.seeds)
    _number(cfg, "seed", minimum=0, strict=False, integer=True)  # numpy's generators take seeds >= 0
    _check_benchmark_classes(cfg)
    _check_benchmark(job, cfg)
    _check_device(cfg.get("device"))
    _check_learning_rates(cfg)
    if job == "gzsl":
        check_gzsl_options(cfg)
    if job == "explain":
        check_explain_options(cfg)
        if cfg.get("run_dir"):  # it was checked after the job's imports (~6 s)
            _check_explained_run(cfg)
    for key in ("train.channels_last",) + (("channels_last",) if job == "bench" else ()):
        value = OmegaConf.select(cfg, key)
        if value not in (None, True, False, "auto"):
            raise ConfigError(f"config {key}={value!r} must be true, false or auto")
    if OmegaConf.select(cfg, "train.compile") is not None:
        _check_compile(cfg.train.compile)
    if OmegaConf.select(cfg, "task_inference.transform_rows") is not None:
        rows = check_share("task_inference.transform_rows", cfg.task_inference.transform_rows, TRANSFORM_ROWS)
        transform_copies(OmegaConf.select(cfg, "task_inference.transform_copies", default="auto"), rows, False)
    if job == "bench":
        _check_ratio_clock(cfg)
        _check_bench_counts(cfg)
    if job == "cl":
        check_choice("scenario", cfg.scenario, SCENARIOS)
        check_choice("model.arch", cfg.model.arch, ARCHS)
        from strategies.memory import run_order

        run_order(cfg)
    _check_strategy_options(cfg)  # the keys a job has (gzsl and explain train the modular network too)
    if job == "cl":
        _check_arch_inputs(cfg)
        if "modnet" in cfg.strategies:
            _check_modular_network(cfg, cfg.scenario == "class", _gives_images(cfg.benchmark))
    if job == "gzsl":  # the seen network (task-incremental), and continual GZSL's (class-incremental)
        _check_arch_inputs(cfg)
        continual_modnet = bool(OmegaConf.select(cfg, "continual.enabled")) \
            and "modnet" in (OmegaConf.select(cfg, "strategies") or [])
        _check_modular_network(cfg, continual_modnet, _gives_images(cfg.benchmark))
        check_gzsl_gate_layers(cfg)
    if job == "explain":
        _check_explain(cfg)
    if "loggers" in cfg and isinstance(cfg.loggers, ListConfig):
        unknown = [name for name in cfg.loggers if name not in LOGGERS]
        if unknown:
            raise ConfigError(f"config loggers: unknown logger(s) {', '.join(map(repr, unknown))}; choose among "
                              f"{', '.join(LOGGERS)}")
    if "output_dir" in cfg:
        out = cfg.get("output_dir")
        if not isinstance(out, str) or not out.strip():
            raise ConfigError(f"config output_dir={out!r} must name a folder (the run writes its results, "
                              "checkpoints and plots there), e.g. output_dir=outputs/run1")
        from modnet.rundir import check_output_dir

        check_output_dir(Path(out))
    if job == "cl" and "benchmark" in cfg and cfg.benchmark.get("name") == "npz" and cfg.benchmark.get("path"):
        _check_cl_npz(cfg.benchmark, cfg.model.arch)
    if job in ("gzsl", "explain") and "benchmark" in cfg and cfg.benchmark.get("name") == "npz" \
            and cfg.benchmark.get("path") and not cfg.get("run_dir"):
        _check_zsl_npz(cfg.benchmark, job)
    if job == "cl":  # after the data's checks: model.arch=cnn on vectors is named as such first
        _check_hnet_arch(cfg)


_ABSENT = object()


def _number(cfg: DictConfig, key: str, *, minimum: float, strict: bool, integer: bool = False,
            allow: tuple = (), maximum: float | None = None, below: bool = False, meaning: str = "",
            nullable: bool = True) -> None:
    """``key`` (when the config has it) a number >= ``minimum`` (> when ``strict``), <= ``maximum`` when given
    (< when ``below``), an integer when ``integer``, or one of ``allow``, or null unless not ``nullable``;
    ``meaning`` ends the message."""
    value = OmegaConf.select(cfg, key, default=_ABSENT)
    # null: the option's own default (e.g. class_ewc_lambda = ewc_lambda)
    if value is _ABSENT or (value is None and nullable) or (value is not None and value in allow):
        return
    kind = "an integer" if integer else "a finite number"
    ok = (not isinstance(value, bool) and isinstance(value, int if integer else (int, float))
          and math.isfinite(value) and (value > minimum if strict else value >= minimum)
          and (maximum is None or (value < maximum if below else value <= maximum)))
    if not ok:
        extra = f" or {' / '.join(map(str, allow))}" if allow else ""
        bound = (f"{'>' if strict else '>='} {minimum:g}" if maximum is None else
                 f"in {'(' if strict else '['}{minimum:g}, {maximum:g}{')' if below else ']'}")
        why = f" ({meaning})" if meaning else ""
        raise ConfigError(f"config {key}={value!r} must be {kind} {bound}{extra}{why}")


def _check_strategy_options(cfg: DictConfig) -> None:
    """The network's and the strategies' option values that their builders would otherwise meet only when a
    strategy is built (after the ones before it have trained) or not at all (an unknown gate ran as none)."""
    for key, choices in (("model.gate", GATES), ("model.modules", MODULES), ("model.head", HEADS),
                         ("model.transform_heads", TRANSFORM_HEADS), ("task_inference.method", TASK_INFERENCE),
                         ("ewc.mode", EWC_MODES)):
        value = OmegaConf.select(cfg, key)
        if value is not None:
            check_choice(key, value, choices)
    if OmegaConf.select(cfg, "ewc.mode") == "online" and OmegaConf.select(cfg, "ewc.decay_factor") is None:
        raise ConfigError("config ewc.mode=online needs ewc.decay_factor (the importance's decay per experience, "
                          "in (0, 1], e.g. ewc.decay_factor=0.9)")
    _number(cfg, "ewc.decay_factor", minimum=0, strict=True)
    for key in ("hat.smax", "si.xi", "lwf.temperature"):
        _number(cfg, key, minimum=0, strict=True)
    for key in ("hat.c", "ewc.ewc_lambda", "ewc.class_ewc_lambda", "si.si_lambda", "lwf.alpha",
                "gem.memory_strength"):
        _number(cfg, key, minimum=0, strict=False)
    for key in ("agem.sample_size", "hnet.iterations"):
        _number(cfg, key, minimum=0, strict=True, integer=True)
    for key in ("replay.mem_size", "der.mem_size", "derpp.mem_size", "gem.patterns_per_exp", "agem.patterns_per_exp"):
        if OmegaConf.select(cfg, key, default="absent") is None:  # no default to fall back on: a buffer needs a size
            raise ConfigError(f"config {key}=null: a buffer needs a size; give a number of samples or match")
        _number(cfg, key, minimum=0, strict=True, integer=True, allow=("match",))
    for key, choices in (("modules.estimator", ESTIMATORS), ("hat.task_inference", HEAD_TASK_INFERENCE),
                         ("hnet.task_inference", HEAD_TASK_INFERENCE), ("hnet.init", HNET_INITS)):
        value = OmegaConf.select(cfg, key)
        if value is not None:
            check_choice(key, value, choices)
    # network sizes: a layer of 0 units trained to chance with exit 0, negative ones crashed after the imports
    for key in ("model.hidden", "model.n_layers", "mlp.in_dim", "mlp.hidden", "mlp.n_layers",
                "mlp_small.in_dim", "mlp_small.hidden", "mlp_small.n_layers", "modules.cluster.min_modules",
                "modules.cluster.max_modules", "model.resnet_width"):
        _number(cfg, key, minimum=0, strict=True, integer=True, nullable=False)
    _number(cfg, "hnet.batch_size", minimum=0, strict=True, integer=True)  # null: train.batch_size
    channels = OmegaConf.select(cfg, "model.cnn_channels")
    if channels is not None and (not isinstance(channels, ListConfig) or not len(channels) or
                                 any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in channels)):
        raise ConfigError(f"config model.cnn_channels={channels!r} must list one positive channel count per "
                          "convolution, e.g. [32, 64]")
    low, high = (OmegaConf.select(cfg, f"modules.cluster.{k}") for k in ("min_modules", "max_modules"))
    if isinstance(low, int) and isinstance(high, int) and low > high:
        raise ConfigError(f"config modules.cluster.min_modules={low} is above max_modules={high}; make "
                          f"min_modules <= max_modules")
    for key in ("der.alpha", "derpp.alpha", "derpp.beta", "train.momentum", "train.weight_decay",
                "task_inference.shrinkage", "task_inference.feature_shrinkage", "modules.key_shrinkage"):
        _number(cfg, key, minimum=0, strict=False)
    # k_share 1 lets every inherited module on, 0 none (an ablation); dropout 1 would drop every unit
    _number(cfg, "modules.k_share", minimum=0, strict=False, maximum=1,
            meaning="the share of inherited modules a task may switch on")
    for key in ("model.dropout", "model.input_dropout"):
        _number(cfg, key, minimum=0, strict=False, maximum=1, below=True, meaning="a dropout probability")
    _number(cfg, "benchmark.max_train_samples", minimum=0, strict=True, integer=True)  # 0 meant all, -5 all but 5
    _number(cfg, "modules.k", minimum=0, strict=True, integer=True)
    _number(cfg, "train.valid_fraction", minimum=0, strict=False)
    fraction = OmegaConf.select(cfg, "train.valid_fraction")
    if isinstance(fraction, (int, float)) and not isinstance(fraction, bool) and fraction >= 1:
        raise ConfigError(f"config train.valid_fraction={fraction} must be below 1 (the share of each experience's "
                          "training data held out for validation; 0 = none)")
    variant = OmegaConf.select(cfg, "benchmark.variant")
    if variant is not None:
        from scenarios import VARIANTS

        check_choice("benchmark.variant", variant, VARIANTS)
    order = OmegaConf.select(cfg, "benchmark.class_order")
    if order is not None:
        values = list(order) if isinstance(order, (list, ListConfig)) else None
        if values is None or any(isinstance(c, bool) or not isinstance(c, int) for c in values) or \
                len(set(values)) != len(values):
            raise ConfigError(f"config benchmark.class_order={order!r} must list every class id once (a permutation "
                              "of the benchmark's classes), or be null")


def _check_bench_counts(cfg: DictConfig) -> None:
    """``repeats`` >= 1 (the best of them is reported), ``epochs`` >= 2 (the first is a warm-up, not counted),
    ``ratio_rounds`` >= 0 (0: no same-process ratios). ``archs=[]`` times no training loop (SynC and NIWT only)."""
    _number(cfg, "repeats", minimum=1, strict=False, integer=True)
    _number(cfg, "epochs", minimum=2, strict=False, integer=True)
    _number(cfg, "ratio_rounds", minimum=0, strict=False, integer=True)
    for group in ("samples", "batch_size"):
        if isinstance(cfg.get(group), DictConfig):
            for arch in cfg[group]:
                _number(cfg, f"{group}.{arch}", minimum=0, strict=True, integer=True)
    archs = cfg.get("archs") or []
    for arch in archs:  # an unknown one stopped after the imports, and after the archs before it were timed
        if arch not in BENCH_ARCHS or arch not in (cfg.get("samples") or {}) or arch not in (cfg.get("batch_size")
                                                                                             or {}):
            raise ConfigError(f"config archs lists {arch!r}: choose among {', '.join(BENCH_ARCHS)}, each with an "
                              "entry in samples and batch_size")
    if any(arch in ("cnn", "resnet18") for arch in archs):
        _check_bench_image_shape(cfg.get("image_shape"), "cnn" in archs)
    for arch in archs:  # fewer samples than a batch: one short step an epoch, reported as the batch
        n, batch = OmegaConf.select(cfg, f"samples.{arch}"), OmegaConf.select(cfg, f"batch_size.{arch}")
        if isinstance(n, int) and isinstance(batch, int) and n < batch:
            raise ConfigError(f"config samples.{arch}={n} is fewer than batch_size.{arch}={batch}: give at least a "
                              "batch of samples")
    sizes = cfg.get("sync_sizes")
    if sizes is not None and (not isinstance(sizes, ListConfig) or
                              any(isinstance(n, bool) or not isinstance(n, int) or n < 2 for n in sizes)):
        raise ConfigError(f"config sync_sizes={sizes!r} must be a list of unit counts >= 2 (e.g. [1000,2000,4000]), "
                          "or [] for no SynC timing")


def check_explain_options(cfg: DictConfig) -> None:
    """explain's choices and counts (``modnet.jobs.explain`` calls it too, for a config passed to ``run_explain``);
    ``explain.task`` null or an index >= 0, ``explain.layers`` null or indices >= 0 (an index the network lacks
    stopped after it had trained)."""
    check_choice("explain.backend", cfg.explain.backend, EXPLAIN_BACKENDS)
    check_choice("train.scenario", cfg.train.scenario, SCENARIOS)
    _number(cfg, "niwt.inverse_ridge", minimum=0, strict=True, nullable=False)
    for key in ("explain.top_k", "explain.max_test_samples", "train.experiences", "niwt.importance_batch_size"):
        _number(cfg, key, minimum=1, strict=False, integer=True)
    _number(cfg, "explain.task", minimum=0, strict=False, integer=True,
            meaning="the task whose gates' modules are explained; null = the latest")
    layers = cfg.explain.layers
    values = list(layers) if isinstance(layers, ListConfig) else None
    if layers is not None and (not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 0
                                                 for v in values)):
        raise ConfigError(f"config explain.layers={layers!r} must list masked-layer indices >= 0, e.g. [0, 2], or be "
                          "null (every masked layer)")


def _check_explain(cfg: DictConfig) -> None:
    """Without ``run_dir``, the network explain trains here (the modnet strategy on configs/cl.yaml with
    ``train.cl_overrides``, as ``modnet.jobs.explain.train_here`` composes it): its settings, module gates to
    explain, ``explain.task`` one of its ``train.experiences`` tasks and ``explain.layers`` among its masked layers
    (the MLP's ``model.n_layers``; the small CNN's conv blocks and its fc layer). Each stopped after the network
    had trained. With ``run_dir``: ``_check_explained_run``, against the network the run recorded."""
    if cfg.get("run_dir"):
        return
    from modnet.config import compose

    t = cfg.train
    net = compose("cl", [f"scenario={t.scenario}", "strategies=[modnet]", f"seed={cfg.seed}",
                         f"train.epochs={t.epochs}", "progress=false", *t.cl_overrides])
    check_choice("model.arch", net.model.arch, ARCHS)
    _check_strategy_options(net)
    _check_modular_network(net, t.scenario == "class", images=True)
    if net.model.gate != "topk":
        raise ConfigError(f"train.cl_overrides sets model.gate={net.model.gate}: the network trained here would have "
                          "no module gates, so no modules to explain; leave model.gate=topk")
    task = cfg.explain.task
    if isinstance(task, int) and task >= t.experiences:
        raise ConfigError(f"config explain.task={task}: the network trained here has {t.experiences} task(s) "
                          f"(train.experiences={t.experiences}); choose 0..{t.experiences - 1}, or null (the latest)")
    n_layers = _masked_layers(net.model, images=True)  # explain's data are images: auto is the small CNN
    beyond = [v for v in (cfg.explain.layers or []) if n_layers is not None and v >= n_layers]
    if beyond:
        what = ("MLP (model.n_layers)" if net.model.arch == "mlp" else
                "small CNN (its model.cnn_channels conv blocks and fc layer)")
        raise ConfigError(f"config explain.layers={list(cfg.explain.layers)}: the {what} trained here has {n_layers} "
                          f"masked layers; choose among 0..{n_layers - 1}, or null (every masked layer)")


def check_explain_run_dir(cfg: DictConfig) -> Path:
    """explain's ``run_dir``: a finished run's folder (``check_run_dir``), not its own ``output_dir`` (explain would
    write its config.yaml and fingerprint over the run's, which could then be neither explained nor resumed)."""
    from modnet.rundir import check_run_dir

    run_dir = check_run_dir(cfg.run_dir)
    if Path(cfg.output_dir).expanduser().resolve() == run_dir.resolve():
        raise ConfigError(f"output_dir={cfg.output_dir} is the run_dir: explain writes its own results.json "
                          "and config.yaml; choose another folder, e.g. output_dir="
                          f"{Path(cfg.output_dir) / 'explain'}")
    return run_dir


def _check_explained_run(cfg: DictConfig) -> None:
    """``run_dir`` a finished run, ``run_seed`` one of its seeds with a recorded network (results.json), and
    ``explain.task`` / ``explain.layers`` among that network's gated tasks and masked layers, as results.json records
    them (each was refused after the imports, the last two once the network had loaded)."""
    from modnet.rundir import run_network_record

    run_dir = check_explain_run_dir(cfg)
    seed, _, record = run_network_record(run_dir, cfg.get("run_seed"))
    tasks = sorted(int(t) for t in record.get("modules_by_task") or {})  # recorded where it has several gates
    task = cfg.explain.task
    if isinstance(task, int) and tasks and task not in tasks:
        raise ConfigError(f"config explain.task={task}: the tasks with module gates are {tasks} in the network of "
                          f"{run_dir} (seed {seed}); choose one of them, or null (the latest)")
    n_layers = len(record.get("layers") or [])
    beyond = [v for v in (cfg.explain.layers or []) if n_layers and v >= n_layers]
    if beyond:
        raise ConfigError(f"config explain.layers={list(cfg.explain.layers)}: the network of {run_dir} (seed {seed}) "
                          f"has {n_layers} masked layers; choose among 0..{n_layers - 1}, or null (every masked layer)")


def _gives_images(bcfg) -> bool | None:
    """Whether the benchmark's inputs are images (N, C, H, W) (False: vectors), where its config says so: digits
    by ``image``, MNIST-1D's sequences, torchvision's data sets; None: the data decide (an npz file)."""
    from scenarios.benchmarks._torchvision import FOLDERS

    name = bcfg.get("name") if isinstance(bcfg, DictConfig) else None
    if name == "digits":
        return bool(bcfg.get("image", False))
    return False if name == "mnist1d" else True if name in FOLDERS else None


def _masked_layers(model: DictConfig, images: bool | None) -> int | None:
    """The modular network's masked layers (``modnet.nets.models``): the MLP's ``model.n_layers``, the small CNN's
    conv blocks and its fc layer; ``model.arch=auto`` is the CNN on images. None: not known here (ResNet-18, auto
    on data of an unknown kind)."""
    arch = model.arch if model.arch != "auto" or images is None else "cnn" if images else "mlp"
    return {"mlp": model.n_layers, "cnn": len(model.cnn_channels) + 1}.get(arch)


def _check_modular_network(cfg: DictConfig, class_incremental: bool, images: bool | None) -> None:
    """What ``modnet.nets.build.build_modular_network`` refuses when the modnet strategy is built (after the
    imports; in cl after the strategies before it trained): gates over modules that are not made; class-incremental
    with task keys, the task picked by the transform heads (``task_inference.method=ood``) that
    ``model.transform_heads=never`` leaves out, and the feature Gaussians (``features``, auto's choice on an MLP) of
    a masked layer the network lacks."""
    m = cfg.get("model")
    if not isinstance(m, DictConfig):
        return
    if m.get("gate") == "topk" and m.get("modules") != "sync":
        raise ConfigError(f"config model.gate=topk switches functional modules on and off, and model.modules="
                          f"{m.get('modules')} makes none: set model.modules=sync, or model.gate=none")
    method = OmegaConf.select(cfg, "task_inference.method")
    if not (class_incremental and m.get("task_keys")):
        return
    if method == "ood" and m.get("transform_heads") == "never":
        raise ConfigError("config task_inference.method=ood picks the task with the transform heads, which "
                          "model.transform_heads=never leaves out: set model.transform_heads=auto, inference or "
                          "always, or choose another task_inference.method")
    n = _masked_layers(m, images)
    mlp = m.arch == "mlp" or (m.arch == "auto" and images is False)
    if n is not None and (method == "features" or (method == "auto" and mlp)):
        ti = cfg.task_inference
        layers = [ti.get("feature_layer", 0)] + [pair[0] for pair in (ti.get("feature_extra_layers") or []) if pair]
        beyond = [k for k in layers if isinstance(k, int) and not 0 <= k < n]
        if beyond:
            raise ConfigError(f"config task_inference.feature_layer / feature_extra_layers name masked layer "
                              f"{beyond[0]} and the network has {n}: choose among 0..{n - 1}")


def check_gzsl_gate_layers(cfg: DictConfig) -> None:
    """gzsl's novelty gate (``gate.layer``, else each of ``gate.layers``) at a masked layer of the seen network,
    counted from the end when negative (-1: the head's input), where the config fixes the count (``modnet.jobs.gzsl``
    checked it after the imports, or once the network had trained; it calls this for a config passed to
    ``run_gzsl``)."""
    gate = cfg.get("gate")
    if not isinstance(gate, DictConfig) or not gate.get("enabled"):
        return
    n = _masked_layers(cfg.model, _gives_images(cfg.get("benchmark")))
    for layer in _layer_choice(gate) if n is not None else []:
        if isinstance(layer, int):
            check_gate_layer_index(layer, n)


def check_gate_layer_index(layer: int, n: int) -> None:
    """gzsl's gate layer ``layer`` among the ``n`` masked layers (``modnet.jobs.gzsl`` checks it too, where the
    network is built)."""
    if not -n <= layer < n:
        raise ConfigError(f"gate layer {layer} but the network has {n} masked layers: choose among {-n}..{n - 1}")


def _check_arch_inputs(cfg: DictConfig) -> None:
    """``model.arch=cnn`` / ``resnet18`` take images (N, C, H, W): on a benchmark of vectors every strategy stopped
    when its network was built (``modnet.nets.build.resolve_arch``), after the imports (cl and gzsl). MNIST-1D
    gives vectors, digits without ``benchmark.image`` too (an npz file's arrays in cl: ``_check_cl_npz``)."""
    arch, bcfg = cfg.model.arch, cfg.get("benchmark")
    if arch not in ("cnn", "resnet18") or _gives_images(bcfg) is not False:
        return
    name = bcfg.get("name")
    fix = ", or benchmark.image=true (digits as 8x8 images)" if name == "digits" else ""
    raise ConfigError(f"config model.arch={arch} needs images (N, C, H, W) and benchmark={name} gives vectors; "
                      f"use model.arch=mlp or auto{fix}")


def _check_hnet_arch(cfg: DictConfig) -> None:
    """hnet's main network is an MLP (hypnettorch's ``mnets.MLP``, ``strategies/hnet.py``): with ``model.arch``
    cnn or resnet18 its build stopped after every strategy before it in the list had trained."""
    arch = cfg.model.arch
    if arch in ("cnn", "resnet18") and "hnet" in cfg.strategies:
        rest = [n for n in cfg.strategies if n != "hnet"]
        fix = f"strategies=[{','.join(rest)}]" if rest else "another strategy"
        raise ConfigError(f"strategy hnet builds an MLP main network, not model.arch={arch}: run {fix} (hnet left "
                          "out), or model.arch=mlp")


def _check_bench_image_shape(shape, cnn: bool) -> None:
    """``image_shape`` of the bench's image loops: [C, H, W], each positive; the small CNN (``model.cnn_channels``
    of configs/training.yaml, the bench's network settings) halves H and W per conv block, so they must be at least
    2 ** blocks (else "not enough values to unpack" or "too small for 2 pooling blocks", after the MLP loops)."""
    values = list(shape) if isinstance(shape, ListConfig) else None
    if values is None or len(values) != 3 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1
                                                  for v in values):
        raise ConfigError(f"config image_shape={shape!r} must be [channels, height, width] of positive integers, "
                          "e.g. [3, 32, 32]")
    if cnn:
        import configs

        channels = OmegaConf.load(Path(configs.__file__).parent / "training.yaml").model.cnn_channels
        side = 2 ** len(channels)
        if min(values[1:]) < side:
            raise ConfigError(f"config image_shape={values}: the bench's small CNN halves height and width in each "
                              f"of its {len(channels)} conv blocks; give a height and width of at least {side}, e.g. "
                              "image_shape=[3,32,32] (or leave cnn out of archs)")


def _check_compile(option) -> None:
    """``train.compile``: a bool or a backend's name (``modnet.runner.runner.compile_backend`` checks the name);
    inductor, the default backend, builds its kernels with a C++ compiler (the CPU's) or Triton, whose
    launchers a C compiler builds (CUDA): without one it fails at the first training step."""
    if not isinstance(option, (bool, str)):
        raise ConfigError(f"config train.compile={option!r} must be true, false or a torch.compile backend's name")
    if option is True or option == "inductor":
        import os
        import shutil

        if not any(shutil.which(c) for c in (os.environ.get("CXX", ""), "c++", "g++", "clang++") if c):
            raise ConfigError("config train.compile=true: torch.compile's inductor backend needs a C++ compiler "
                              "and none was found (set CXX or install g++), or set train.compile=false")


def _check_strategies(names) -> None:
    from strategies.registry import strategy_names

    if names is None or isinstance(names, str):
        raise ConfigError(f"config strategies={'null' if names is None else names} must be a list of strategy "
                          "names, e.g. strategies=[modnet,naive]")
    names = list(names)
    if not names:
        raise ConfigError("config strategies=[] is empty; name at least one, e.g. strategies=[modnet,naive]")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"config strategies lists {', '.join(repeated)} more than once; each strategy runs once "
                          "per seed (for repeats use seeds=[0,1,2])")
    for name in names:
        check_choice("strategies", name, strategy_names())


def _check_benchmark_classes(cfg: DictConfig) -> None:
    """``benchmark.unseen_classes`` names each class once (a repeat ran with fewer unseen classes than listed,
    recorded as listed); ``benchmark.hidden`` a positive integer or null; ``benchmark.test_fraction`` a share in (0, 1)."""
    bcfg = cfg.get("benchmark")
    if not isinstance(bcfg, DictConfig):
        return
    unseen = bcfg.get("unseen_classes")
    if isinstance(unseen, ListConfig):
        values = list(unseen)
        repeated = sorted({c for c in values if values.count(c) > 1})
        if repeated:
            raise ConfigError(f"config benchmark.unseen_classes lists {repeated} more than once; name each unseen "
                              "class once")
    check_benchmark_width(bcfg)
    fraction = bcfg.get("test_fraction")
    if fraction is not None and (isinstance(fraction, bool) or not isinstance(fraction, (int, float))
                                 or not 0.0 < fraction < 1.0):
        raise ConfigError(f"config benchmark.test_fraction={fraction!r} must be a number in (0, 1): the share of "
                          "each class's samples held out for testing, e.g. 0.3")


def _check_benchmark(job: str, cfg: DictConfig) -> None:
    """The chosen benchmark's own pre-flight check (``scenarios.registry``: a path given and there, files present
    with download off, class ids in range) and, for cl, ``class_order`` / ``n_experiences`` against its class
    count, where the benchmark fixes one (an npz file's count is checked with its arrays, ``_check_cl_npz``).
    explain with ``run_dir`` explains the run's own data: its benchmark is not read."""
    bcfg = cfg.get("benchmark")
    if job not in ("cl", "gzsl", "explain") or not isinstance(bcfg, DictConfig) or \
            (job == "explain" and cfg.get("run_dir")):
        return
    from scenarios.registry import get_benchmark

    entry = get_benchmark(str(bcfg.get("name")))
    if entry is None:  # modnet.config.compose names an unknown benchmark
        return
    if entry.check is not None:
        entry.check(bcfg, job)
    if job == "cl" and entry.n_classes is not None:
        _check_class_split(bcfg, entry.n_classes, f"benchmark={entry.name}", cfg.get("scenario"))


def _check_class_split(bcfg, n_classes: int, source: str, scenario: str | None = None) -> None:
    """``class_order`` lists the ``n_classes`` class ids 0..n-1 once each; a split's ``n_experiences`` divides
    them (Avalanche's error otherwise comes after the imports, naming neither key) and, task-incremental, leaves
    at least two classes a task (``scenarios.base.split_benchmark`` refuses one, after the imports)."""
    order = bcfg.get("class_order")
    values = list(order) if isinstance(order, (list, ListConfig)) else None
    if values is not None and all(isinstance(c, int) and not isinstance(c, bool) for c in values) and \
            sorted(values) != list(range(n_classes)):  # other values: _check_strategy_options names them
        raise ConfigError(f"config benchmark.class_order={list(order)} must list each of {source}'s {n_classes} class "
                          f"ids 0..{n_classes - 1} once, or be null")
    limit = bcfg.get("max_train_samples")
    if isinstance(limit, int) and not isinstance(limit, bool) and 0 < limit < n_classes:
        raise ConfigError(f"config benchmark.max_train_samples={limit} keeps fewer training samples than {source}'s "
                          f"{n_classes} classes, so some class has none; raise it to at least {n_classes} (or null: "
                          "all samples)")
    n_exp = bcfg.get("n_experiences")
    if bcfg.get("variant", "split") == "split" and isinstance(n_exp, int) and n_exp > 0 and n_classes % n_exp:
        raise ConfigError(f"{source} has {n_classes} classes, which do not split evenly into benchmark.n_experiences="
                          f"{n_exp}; choose a divisor of {n_classes}")
    if bcfg.get("variant", "split") == "split" and isinstance(n_exp, int):
        from scenarios import one_class_per_task  # light: the package imports nothing heavy

        trivial = one_class_per_task(n_classes, n_exp, scenario, "benchmark.n_experiences")
        if trivial:
            raise ConfigError(f"{source}: {trivial}")


DEVICE = re.compile(r"(auto|cpu|mps|(cuda|xpu)(:\d+)?)")


# a Linux machine on which torch can see a GPU has one of these (NVIDIA's driver; ROCm's, whose GPUs torch
# also calls cuda; WSL2's GPU paravirtualisation, through which CUDA runs there): without any, device=cuda is
# refused before torch's import
GPU_DEVICE_FILES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")


def _check_device(device) -> None:
    """``device``: auto, cpu, cuda[:N] (and mps, xpu[:N]). cuda on a Linux machine without a GPU driver's
    device file is one line here, before torch's import (10-30 s); where the files are, whether CUDA works is
    the job's to say (``modnet.config.resolve_device``), after torch's import."""
    if device is not None and not (isinstance(device, str) and DEVICE.fullmatch(device)):
        raise ConfigError(f"config device={device!r} is not a device; use auto, cpu, cuda or cuda:N")
    if device == "mps" and sys.platform != "darwin":
        raise ConfigError("device=mps is Apple's GPU and this is not a Mac; use device=auto or device=cpu")
    if isinstance(device, str) and device.startswith("cuda") and sys.platform.startswith("linux") and \
            not any(os.path.exists(f) for f in GPU_DEVICE_FILES):
        raise ConfigError(f"device={device} but this machine has no GPU (none of {', '.join(GPU_DEVICE_FILES)}); "
                          "use device=auto or device=cpu")


def _check_learning_rates(cfg: DictConfig) -> None:
    """Every learning rate of the config (a key ``lr`` or ``*_lr``, at any depth) a number >= 0 or null (null:
    the option's default): torch's optimisers reject a negative one only when the strategy that uses it is built,
    after the ones before it have trained."""
    def walk(node, prefix):
        for key in node.keys():
            path = f"{prefix}{key}"
            child = node._get_node(key)
            if isinstance(child, DictConfig):
                walk(child, path + ".")
            elif str(key) == "lr" or str(key).endswith("_lr"):
                _number(cfg, path, minimum=0, strict=False)

    walk(cfg, "")


def check_benchmark_width(bcfg) -> None:
    """``benchmark.hidden`` (awa2, cub, npz in gzsl): a positive integer or null (``modnet.jobs.gzsl`` checks it too,
    for a config passed to ``run_gzsl`` directly)."""
    width = bcfg.get("hidden")
    if width is not None and (isinstance(width, bool) or not isinstance(width, int) or width < 1):
        raise ConfigError(f"benchmark.hidden={width!r} must be a positive integer (the networks' width on this "
                          "benchmark's inputs) or null (= model.hidden)")


def _check_zsl_names(cfg: DictConfig) -> None:
    """``methods``: known names, each once (a repeat scored the method twice into one row);
    ``calibration.mode`` among its choices."""
    methods = list(cfg.get("methods") or [])
    if not methods:
        raise ConfigError(f"config methods is empty; choose among {', '.join(ZSL_METHODS)}")
    for name in methods:
        check_choice("methods", name, ZSL_METHODS)
    repeated = sorted({n for n in methods if methods.count(n) > 1})
    if repeated:
        raise ConfigError(f"config methods lists {', '.join(repeated)} more than once; each method is scored once "
                          "per seed")
    if OmegaConf.select(cfg, "calibration.mode") is not None:
        check_choice("calibration.mode", cfg.calibration.mode, CALIBRATION_MODES)


def check_gzsl_options(cfg: DictConfig) -> None:
    """Every name, choice and number of a gzsl config that the config alone decides (``modnet.jobs.gzsl`` calls it
    too, for a config passed to ``run_gzsl``; the gate's layers against the network: ``check_gzsl_gate_layers``):
    methods and calibration.mode, the baselines' features, ``seen_network.hat_c``, ``large_train``'s method
    blocks, the gate's settings, ``calibration.val_splits`` / ``val_min_classes``, the niwt block where a NIWT
    method reads it, ``model.arch`` and, with ``continual.enabled``, the strategies."""
    _check_zsl_names(cfg)
    for key in ("baseline_features", "clswgan.features", "large_train.clswgan.features"):
        value = OmegaConf.select(cfg, key)
        if value is not None:
            check_choice(key, value, BASELINE_FEATURES)
    check_benchmark_width(cfg.benchmark)
    _number(cfg, "seen_network.hat_c", minimum=0, strict=False,
            meaning="HAT's capacity regulariser weight of the seen-class network; null = hat.c")
    check_large_method_blocks(cfg)
    _check_gzsl_gate(cfg)
    _number(cfg, "calibration.val_splits", minimum=0, strict=True, integer=True,
            meaning="null = enough splits for val_min_classes")
    _number(cfg, "calibration.val_min_classes", minimum=0, strict=True, integer=True,
            nullable=OmegaConf.select(cfg, "calibration.val_splits") is not None,
            meaning="the pseudo-unseen classes the validation splits hold in all")
    if set(cfg.methods) & set(NIWT_METHODS):
        _check_niwt(cfg)
    check_choice("model.arch", cfg.model.arch, ARCHS)
    if OmegaConf.select(cfg, "continual.enabled"):
        _check_strategies(cfg.strategies)


def check_large_method_blocks(cfg: DictConfig) -> None:
    """Every key of ``large_train.<block>`` (clswgan, ale) must be a key of that block (``modnet.jobs.gzsl``
    checks it again where it applies them)."""
    for block in LARGE_METHOD_BLOCKS:
        for key in (cfg.get("large_train") or {}).get(block) or {}:
            if key not in cfg[block]:
                raise ConfigError(f"large_train.{block}.{key} is not a key of the {block} block; use one of "
                                  f"{', '.join(cfg[block])}")


def _layer_choice(block: DictConfig) -> list:
    """A block's masked layer(s): ``layer`` when set, else its ``layers`` (gzsl's gate and niwt blocks)."""
    return [block.layer] if block.get("layer") is not None else list(block.get("layers") or [])


def _check_layer_indices(name: str, block: DictConfig, hint: str) -> None:
    layers = _layer_choice(block)
    if not layers or not all(isinstance(v, int) and not isinstance(v, bool) for v in layers):
        raise ConfigError(f"{name}.layer / {name}.layers must be masked-layer indices ({hint}), got {layers!r}")


def _check_gzsl_gate(cfg: DictConfig) -> None:
    """The novelty gate's quantiles, layer indices, shrinkage and min_seen_ratio (its layers against the network:
    ``check_gzsl_gate_layers``)."""
    gate = cfg.gate

    def fraction(v) -> bool:
        try:
            return 0.0 < float(v) <= 1.0
        except (TypeError, ValueError):
            return False

    if gate.quantile is not None and not fraction(gate.quantile):
        raise ConfigError(f"gate.quantile={gate.quantile} must be a number in (0, 1], or null (chosen on the "
                          "validation splits)")
    if not gate.quantiles or not all(fraction(q) for q in gate.quantiles):
        raise ConfigError(f"gate.quantiles={list(gate.quantiles or [])} must be a non-empty list of numbers in (0, 1]")
    _check_layer_indices("gate", gate, "0 = the first, -1 = the head's input")
    _number(cfg, "gate.shrinkage", minimum=0, strict=False, maximum=1, nullable=False,
            meaning="the shrinkage of the pooled covariance towards tr/d I")
    if gate.get("min_seen_ratio") is not None and not fraction(gate.min_seen_ratio):
        raise ConfigError(f"gate.min_seen_ratio={gate.min_seen_ratio} must be a number in (0, 1], or null (the best "
                          "validation H whatever the seen classes lose)")


def _check_niwt(cfg: DictConfig) -> None:
    """The niwt block (read by niwt, niwt_routed and niwt_positives): its choices, layers and numbers, and what
    a cosine head (no bias, rows compared by direction) leaves NIWT nothing to set."""
    niwt = cfg.niwt
    for key, choices in (("init", NIWT_INITS), ("bias", NIWT_BIASES), ("scale", NIWT_SCALES),
                         ("map_fit", NIWT_MAP_FITS)):
        check_choice(f"niwt.{key}", niwt[key], choices)
    _check_layer_indices("niwt", niwt, "-2 = one block before the head's input, -1 = its input")
    _number(cfg, "niwt.map_ridge", minimum=0, strict=False, nullable=False,
            meaning="map_fit=centered's ridge, x the mean squared norm of the centred knowledge")
    _number(cfg, "niwt.seen_budget", minimum=0, strict=False, maximum=1, below=True, nullable=False,
            meaning="the share of seen training images the unseen rows may take, e.g. niwt.seen_budget=0.075")
    if niwt.map_fit == "centered" and not niwt.map_bias:
        raise ConfigError("niwt.map_fit=centered predicts (k - mean k) B, which needs niwt.map_bias=true")
    if cfg.model.get("head", "linear") == "cosine" and "niwt_positives" in cfg.methods:
        raise ConfigError("model.head=cosine scores rows by direction (no bias): niwt_positives sets one bias "
                          "per unseen row; leave it out of methods, e.g. methods=[niwt,eszsl,ale,clswgan]")
    if cfg.model.get("head", "linear") == "cosine" and niwt.scale != "none":
        raise ConfigError(f"model.head=cosine scores rows by direction (no bias): niwt.scale={niwt.scale} "
                          "has nothing to set; use niwt.scale=none")


def _check_seeds(seeds) -> None:
    if seeds is None:
        return
    if not isinstance(seeds, (list, tuple, ListConfig)):  # seeds=0: list() of an int was a TypeError traceback
        raise ConfigError(f"config seeds={seeds!r} must be a list, e.g. seeds=[0,1,2], or null (one run: seed={seeds})")
    values = list(seeds)
    if not values:
        raise ConfigError("config seeds=[] is empty; give seeds=[0,1,2], or seeds=null to run the one `seed`")
    if any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in values):
        raise ConfigError(f"config seeds must be integers >= 0 (numpy's generators take no others), got {values}")
    repeated = sorted({s for s in values if values.count(s) > 1})
    if repeated:
        raise ConfigError(f"config seeds lists {repeated} more than once; a repeated seed gives the same run twice "
                          "and a false standard deviation")


def _check_zsl_npz(bcfg, job: str) -> None:
    from scenarios.sources import MIN_SEEN_CLASSES, check_zsl_npz, read_npz

    path = Path(bcfg.path).expanduser()  # a file: the npz benchmark's own check ran first (_check_benchmark)
    check_zsl_npz(path, read_npz(path), min_seen=MIN_SEEN_CLASSES if job == "gzsl" else 1)


def _check_cl_npz(bcfg, arch: str) -> None:
    """The file's arrays, its classes against ``n_experiences`` and ``max_train_samples`` (the first samples hold
    every class: ``scenarios.build_benchmark`` refused it after the imports), vectors not given to a CNN."""
    from scenarios.sources import check_npz_arrays, read_npz

    path = Path(bcfg.path).expanduser()  # a file: the npz benchmark's own check ran first (_check_benchmark)
    arrays = check_npz_arrays(path, read_npz(path))
    labels = arrays["y_train"].tolist()
    _check_class_split(bcfg, len(set(labels)), str(path))
    limit = bcfg.get("max_train_samples")
    missing = sorted(set(labels) - set(labels[:limit])) if limit else []
    if missing:
        raise ConfigError(f"config benchmark.max_train_samples={limit} keeps the first {limit} training samples of "
                          f"{path}, which hold none of classes {missing}; raise it (or null: all samples)")
    if arch in ("cnn", "resnet18") and arrays["x_train"].ndim == 2:
        raise ConfigError(f"config model.arch={arch} needs images (N, C, H, W) and {path} holds vectors x_train "
                          f"{arrays['x_train'].shape}; use model.arch=mlp or auto")


# -- modnet ddp's launcher (modnet.runner.distributed.main): its own options, checked before torch is imported --
def check_ddp_config(cfg, world_size: int) -> None:
    """Bad settings for a data-parallel run, named with the fix, before any process trains."""
    from strategies.registry import STRATEGIES, get_strategy

    for name in cfg.strategies:
        entry = get_strategy(name)
        if entry.gradient_sync is None:
            ok = [n for n, e in STRATEGIES.items() if e.gradient_sync is not None]
            raise ConfigError(f"strategy {name} cannot run data-parallel: {entry.no_ddp_reason or 'unverified'}; "
                              f"use `modnet cl` for it, or one of {', '.join(ok)}")
    if world_size < 1:
        raise ConfigError(f"the number of processes must be >= 1, got {world_size}")
    if cfg.train.batch_size % world_size:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} is the global batch and must be divisible "
                          f"by the {world_size} processes; use e.g. train.batch_size="
                          f"{cfg.train.batch_size + world_size - cfg.train.batch_size % world_size}")
    if cfg.resume:
        raise ConfigError("resume=true is not supported by data-parallel runs; rerun without it")


def with_default_ddp_output(overrides: Sequence[str]) -> list[str]:
    if any(o.lstrip("+").startswith("output_dir=") for o in overrides):
        return list(overrides)
    return [*overrides, "output_dir=outputs/ddp"]


def split_nproc(argv: list[str]) -> tuple[int | None, list[str]]:
    """``--nproc N`` (or torchrun's ``--nproc-per-node N``) out of the overrides."""
    names = ("--nproc", "--nproc-per-node", "--nproc_per_node")
    nproc, rest, it = None, [], iter(argv)
    for a in it:
        key, eq, value = a.partition("=")
        if key in names:
            value = value if eq else next(it, "")
            if not value.isdigit() or int(value) < 1:
                raise ConfigError(f"{key} needs a number of processes >= 1, got {value!r}")
            nproc = int(value)
        else:
            rest.append(a)
    return nproc, rest


def precheck_ddp(argv: list[str]) -> tuple[int | None, list[str], DictConfig]:
    """``modnet ddp``'s launcher checks (``modnet.cli`` runs them before the import of ``modnet.runner.distributed``,
    torch; its ``main`` runs them too): ``--nproc``, what ``modnet cl`` checks, and the data-parallel settings (the
    batch against ``--nproc`` where it is given; its default, the GPU count, is known after the import). Returns
    (``--nproc`` or None, the overrides with the default output_dir, the composed config)."""
    from modnet.config import compose

    nproc, overrides = split_nproc(argv)
    overrides = with_default_ddp_output(overrides)
    cfg = compose("cl", overrides)
    validate("cl", cfg)
    check_ddp_config(cfg, nproc or 1)
    return nproc, overrides, cfg
