"""What a strategy keeps besides its network's weights, in bytes (``"stored_bytes"`` in results.json).

Each strategy file declares how to count it (``register_strategy(..., stored_bytes=f)``, ``f(strategy,
info) -> int``), read after its last experience:

    stored samples      n · b_sample,   b_sample = b_x + 8 + 8 (+ 4 W for DER's logits)
                        b_x = prod(input shape) · element size of the benchmark's inputs (float32: 4),
                        a class label and a task label as int64, W logits as float32
    regularisers        Σ numel · element size of what they keep (EWC: F and θ* per experience; SI: Ω, θ̃;
                        LwF: the previous model)
    modnet              the state its inference needs beyond the backbone and heads every baseline has: HAT
                        task embeddings, the module gates (keys, queries, unit assignments), what predicts
                        the task without a label (task keys, class Gaussians or task-prediction heads)

``replay.mem_size=match`` (and ``der``'s, ``derpp``'s) sizes a buffer to modnet's stored bytes:
mem_size = floor(B_modnet / b_sample), so the buffer's bytes are within one sample of modnet's
(``matched_mem_size``). GEM and A-GEM keep a memory per experience (``patterns_per_exp``):
``gem.patterns_per_exp=match`` (``agem``'s too) gives each experience floor(B_modnet / (b_sample · n_experiences))
samples, so that after the last experience their memories are within n_experiences samples of modnet's bytes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

import numpy as np

from modnet.config import ConfigError

if TYPE_CHECKING:  # the strategy files import this module; torch is imported when a count runs
    from torch import Tensor, nn

LABEL_BYTES = 8  # a class label, int64
TASK_LABEL_BYTES = 8  # a task label, int64
LOGIT_BYTES = 4  # float32

MATCH = "match"  # mem_size value: as many samples as fit in modnet's stored bytes


def tensor_bytes(tensors: Iterable[Tensor]) -> int:
    """Σ numel · element size."""
    return int(sum(t.numel() * t.element_size() for t in tensors))


def module_bytes(module: nn.Module | None) -> int:
    """A whole network: every tensor of its state dict."""
    return 0 if module is None else tensor_bytes(module.state_dict().values())


def input_element_size(info) -> int:
    """Bytes of one input value of the benchmark (its first training sample's dtype)."""
    import torch

    x = info.benchmark.train_stream[0].dataset[0][0]
    return torch.as_tensor(x).element_size()


def output_width(info) -> int:
    """Logits a baseline network gives per sample: every class (class-incremental) or the widest task head."""
    return info.n_classes if info.scenario == "class" else max(len(c) for c in info.task_classes)


def sample_bytes(info, logits: int = 0) -> int:
    """b_sample = prod(input shape) · element size + class label + task label (+ ``logits`` float32)."""
    return (int(np.prod(info.input_shape)) * input_element_size(info) + LABEL_BYTES + TASK_LABEL_BYTES
            + LOGIT_BYTES * logits)


def matched_mem_size(target_bytes: int, bytes_per_sample: int) -> int:
    """The most samples whose bytes do not exceed ``target_bytes`` (within one sample of it)."""
    return int(target_bytes) // int(bytes_per_sample)


def mem_size(value, block: str, key: str = "mem_size") -> int:
    """A buffer size from config ``<block>.<key>``; ``match`` must have been resolved by the job."""
    if value == MATCH:
        raise ConfigError(f"{block}.{key}=match is resolved by `modnet cl` from modnet's stored bytes (with modnet "
                          "among the strategies); elsewhere give a number of samples")
    return int(value)


def plugin_of(strategy, cls):
    """The strategy's plugin of class ``cls`` (an error naming it when absent)."""
    for p in strategy.plugins:
        if isinstance(p, cls):
            return p
    raise TypeError(f"strategy {type(strategy).__name__} has no {cls.__name__} plugin")


# -- per strategy -------------------------------------------------------------------------------------------
def nothing_stored(strategy, info) -> int:
    return 0


def stored_tensors_of_plugin(cls_path: str):
    """Counter for a strategy whose plugin (``module:Class``) lists what it keeps in ``stored_tensors()``."""
    def count(strategy, info) -> int:
        import importlib

        module, name = cls_path.split(":")
        return tensor_bytes(plugin_of(strategy, getattr(importlib.import_module(module), name)).stored_tensors())

    return count


def replay_buffer_bytes(strategy, info) -> int:
    """Avalanche's ``Replay``: samples in its storage policy's buffer · b_sample."""
    from avalanche.training.plugins import ReplayPlugin

    return len(plugin_of(strategy, ReplayPlugin).storage_policy.buffer) * sample_bytes(info)


def agem_buffer_bytes(strategy, info) -> int:
    """Avalanche's ``AGEM``: samples in its per-experience buffers · b_sample."""
    from avalanche.training.plugins import AGEMPlugin

    return sum(len(b) for b in plugin_of(strategy, AGEMPlugin).buffers) * sample_bytes(info)


def gem_memory_bytes(strategy, info) -> int:
    """Avalanche's ``GEM``: its memory tensors (inputs, labels, task labels) per experience."""
    from avalanche.training.plugins import GEMPlugin

    gem = plugin_of(strategy, GEMPlugin)
    return tensor_bytes([*gem.memory_x.values(), *gem.memory_y.values(), *gem.memory_tid.values()])


def ewc_bytes(strategy, info) -> int:
    """Avalanche's ``EWC``: importances F and parameters θ* it keeps (per experience, or one set online)."""
    from avalanche.training.plugins import EWCPlugin

    ewc = plugin_of(strategy, EWCPlugin)
    kept = [*ewc.saved_params.values(), *ewc.importances.values()]
    return tensor_bytes(p.data for params in kept for p in params.values())


def lwf_bytes(strategy, info) -> int:
    """Avalanche's ``LwF``: the previous model it distils from."""
    from avalanche.training.plugins import LwFPlugin

    return module_bytes(plugin_of(strategy, LwFPlugin).lwf.prev_model)


def cumulative_bytes(strategy, info) -> int:
    """Avalanche's ``Cumulative``: every training sample so far · b_sample."""
    return len(strategy.dataset or []) * sample_bytes(info)


# state of a modular network that inference does not read, or reads derived from what is counted: records
# for module maps, explanations and results (semantic vectors, clustering method, outliers, persistent module
# ids, which tasks use and keep which module), training bookkeeping (frozen keys), and the gate's buffers
# made from its assignments (each module's one-hot expansion to units, the -inf padding of missing modules).
# Until stop 47 the one-hot expansions counted (digits class-incremental: ~57 kB of modnet's ~420 kB), and
# mem_size=match gave the buffers as much more.
_MODNET_NOT_FOR_INFERENCE = ("semantic_", "kmeans_fallback_", "outliers_", "module_ids_", "module_method_", "usage_",
                             "kept_", "key_frozen", "to_units_", "score_pad")


def modnet_bytes(strategy, info) -> int:
    """The modular network's state beyond a baseline's backbone and heads: HAT task embeddings (one mask
    per task and layer), the gates of every task (keys, query maps, unit assignments), what predicts the task
    without a label (task keys or class Gaussians: sums, counts, scatters; or the task-prediction heads and
    their calibration, ``task_ood``, where inference reads them: transform heads trained only as an
    auxiliary loss are not counted) and, on a ResNet, the batch norms of tasks after the first."""
    total = 0
    for name, t in strategy.model.state_dict().items():
        leaf = name.rsplit(".", 1)[-1]
        per_task_bn = name.startswith("bn.") and name.split(".")[2] != "0"
        task_prediction = name.startswith(("task_keys.", "task_features.")) or \
            (name.startswith("task_ood.") and strategy.model.task_ood_read_at_inference())
        if ".task_embedding." in name or task_prediction or per_task_bn or \
                (name.startswith("gate.") and not leaf.startswith(_MODNET_NOT_FOR_INFERENCE)):
            total += t.numel() * t.element_size()
    return int(total)


# -- mem_size=match -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Matchable:
    """A strategy's buffer that ``match`` can size: its config block and key, whether each sample keeps the
    network's logits (DER), and whether the key counts samples per experience (GEM, A-GEM) or in total."""
    block: str
    key: str = "mem_size"
    with_logits: bool = False
    per_experience: bool = False

    @property
    def option(self) -> str:
        return f"{self.block}.{self.key}"


MATCHABLE = {"replay": Matchable("replay"), "der": Matchable("der", with_logits=True),
             "derpp": Matchable("derpp", with_logits=True),
             "gem": Matchable("gem", "patterns_per_exp", per_experience=True),
             "agem": Matchable("agem", "patterns_per_exp", per_experience=True)}


def matching(cfg) -> list[str]:
    """The strategies of ``cfg.strategies`` whose buffer size is ``match``."""
    return [n for n in cfg.strategies if n in MATCHABLE and cfg[MATCHABLE[n].block][MATCHABLE[n].key] == MATCH]


def run_order(cfg) -> list[str]:
    """``cfg.strategies`` in the order they run: modnet first when a buffer is sized to its bytes."""
    names = list(cfg.strategies)
    if matching(cfg):
        if "modnet" not in names:
            raise ConfigError(f"{', '.join(MATCHABLE[n].option for n in matching(cfg))}=match sizes the "
                              "buffer to modnet's stored bytes: add modnet to strategies, or give a number of samples "
                              f"(e.g. {MATCHABLE[matching(cfg)[0]].option}=200)")
        names.remove("modnet")
        names.insert(0, "modnet")
    return names


def matched_size(name: str, info, modnet_stored_bytes: int) -> int:
    """The samples ``match`` gives strategy ``name``'s buffer: floor(B_modnet / b_sample) in total, or
    floor(B_modnet / (b_sample · n_experiences)) per experience."""
    spec = MATCHABLE[name]
    per_sample = sample_bytes(info, output_width(info) if spec.with_logits else 0)
    return matched_mem_size(int(modnet_stored_bytes), per_sample * (info.n_experiences if spec.per_experience else 1))


def with_matched_memory(cfg, name: str, info, modnet_stored_bytes: float | None, verbose: bool = True):
    """``cfg`` with strategy ``name``'s ``match`` replaced by ``matched_size`` (the same ``cfg`` when there is
    nothing to match); ``verbose``: a line saying the size (one process of a data-parallel run says it)."""
    from omegaconf import OmegaConf

    if name not in matching(cfg):
        return cfg
    spec = MATCHABLE[name]
    if modnet_stored_bytes is None:
        raise ConfigError(f"{spec.option}=match: modnet's result has no stored_bytes (finished by an "
                          "older version); run modnet again in a fresh output_dir")
    resolved = OmegaConf.create(OmegaConf.to_container(cfg))
    size = matched_size(name, info, int(modnet_stored_bytes))
    per_sample = sample_bytes(info, output_width(info) if spec.with_logits else 0)
    per_exp = f" per experience ({info.n_experiences})" if spec.per_experience else ""
    if size < 1:
        need = per_sample * (info.n_experiences if spec.per_experience else 1)
        raise ConfigError(f"{spec.option}=match: modnet's {int(modnet_stored_bytes)} stored bytes hold no sample of "
                          f"{per_sample} bytes{per_exp} (it needs {need}); give {spec.option} a number of samples")
    resolved[spec.block][spec.key] = size
    if verbose:
        sizes = [len(e.dataset) for e in info.benchmark.train_stream]
        # a buffer sized past the data it may keep holds all of it: its stored bytes are that, not size x bytes
        held = max(sizes) if spec.per_experience else sum(sizes)
        whole = (f" (more than the {held} training samples {'an experience has' if spec.per_experience else 'there are'}"
                 f": it keeps them all)") if size > held else ""
        print(f"[{name}] {spec.option}=match: {size} samples of {per_sample} bytes{per_exp} for modnet's "
              f"{int(modnet_stored_bytes)} stored bytes{whole}")
    return resolved


def training_sizes(cfg):
    """``cfg`` with every buffer size still ``match`` replaced by configs/training.yaml's number: for a job
    that builds a rehearsal baseline with no modnet run whose bytes it could match (the bench's timings)."""
    from importlib.resources import files

    from omegaconf import OmegaConf

    left = [spec for spec in MATCHABLE.values() if OmegaConf.select(cfg, spec.option) == MATCH]
    if not left:
        return cfg
    training = OmegaConf.load(files("configs").joinpath("training.yaml").open())
    resolved = OmegaConf.create(OmegaConf.to_container(cfg))
    for spec in left:
        resolved[spec.block][spec.key] = training[spec.block][spec.key]
    return resolved
