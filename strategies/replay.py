"""``replay``: Avalanche's ``Replay`` (``Naive`` with a ``ReplayPlugin``): a class-balanced buffer of stored samples.
The plugin is ``strategies.plugins.replay.BufferReplay``, Avalanche's without its deprecated buffer update call.

Hyper-parameters, configs/training.yaml ``replay``: mem_size (stored samples in total, or ``match``: as many
as fit in modnet's stored bytes, ``strategies.memory``).
"""
from __future__ import annotations

from strategies.memory import replay_buffer_bytes
from strategies.registry import register_strategy

NAME = "replay"


def settings(strategy) -> dict:
    from avalanche.training.plugins import ReplayPlugin

    from strategies.memory import plugin_of

    return {"mem_size": int(plugin_of(strategy, ReplayPlugin).mem_size)}


@register_strategy(NAME, stored_bytes=replay_buffer_bytes, gradient_sync="ddp", settings=settings)
def build(cfg, info, common):
    from strategies.common import avalanche_baseline
    from strategies.memory import mem_size
    from strategies.plugins.replay import BufferReplay

    # as avalanche.training.Replay builds itself: Naive's template with the plugin as its first plugin
    replay = BufferReplay(mem_size(cfg.replay.mem_size, NAME))
    return avalanche_baseline("Naive", cfg, info, common, plugins=[replay])
