"""Speed options as Avalanche plugins: bf16 autocast and channels_last, for any strategy.

Avalanche's template has no autocast hook, so the plugin opens ``torch.autocast`` before the forward pass
and closes it after (the loss is computed in float32 outside it; bf16 needs no gradient scaler).
"""
from __future__ import annotations

import torch
from avalanche.core import SupervisedPlugin


class AutocastPlugin(SupervisedPlugin):
    def __init__(self, device_type: str, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.device_type, self.dtype = device_type, dtype
        self._ctx = None

    def _enter(self):
        self._ctx = torch.autocast(self.device_type, dtype=self.dtype)
        self._ctx.__enter__()

    def _exit(self):
        if self._ctx is not None:
            self._ctx.__exit__(None, None, None)
            self._ctx = None

    def before_forward(self, strategy, **kw):
        self._enter()

    def after_forward(self, strategy, **kw):
        self._exit()
        strategy.mb_output = strategy.mb_output.float()

    def before_eval_forward(self, strategy, **kw):
        self._enter()

    def after_eval_forward(self, strategy, **kw):
        self._exit()
        strategy.mb_output = strategy.mb_output.float()


class ChannelsLastPlugin(SupervisedPlugin):
    """Model and image batches in channels_last memory format (faster convolutions on tensor cores)."""

    def before_training(self, strategy, **kw):
        strategy.model.to(memory_format=torch.channels_last)

    def _convert(self, strategy):
        x = strategy.mbatch[0]
        if x.dim() == 4:
            strategy.mbatch[0] = x.contiguous(memory_format=torch.channels_last)

    def before_forward(self, strategy, **kw):
        self._convert(strategy)

    def before_eval_forward(self, strategy, **kw):
        self._convert(strategy)
