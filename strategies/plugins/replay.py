"""Experience replay: Avalanche's ``ReplayPlugin`` (a class-balanced buffer, its samples mixed into every training
batch), its buffer updated after each experience through the storage policy's ``post_adapt``.

Avalanche 0.6.0's plugin calls the storage policy's ``update(strategy)``, deprecated (removal in 0.7), whose body
is ``self.post_adapt(strategy, strategy.experience)`` (``avalanche/training/storage_policy.py``); its
``deprecated`` decorator forces a DeprecationWarning on every call, which a warnings filter does not hold back:
two lines of every experience's log. Calling ``post_adapt`` keeps the same buffer, drawn from the same random
numbers, without them.
"""
from __future__ import annotations

from avalanche.training.plugins import ReplayPlugin


class BufferReplay(ReplayPlugin):
    """``ReplayPlugin`` whose buffer update calls the storage policy's ``post_adapt`` directly (module doc)."""

    def after_training_exp(self, strategy, **kwargs):
        self.storage_policy.post_adapt(strategy, strategy.experience)
