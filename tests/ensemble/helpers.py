"""Tiny models and checkpoints for the ensemble tests (fast on 2 CPU cores)."""
from __future__ import annotations

import torch
import torch.nn as nn

from fwi_core.train.checkpoint import FORMAT, save_checkpoint
from tests.train.helpers import H, R, T, TinyNet, W  # noqa: F401  (registers "tiny_fwi")


class Const(nn.Module):
    """Outputs ``value`` everywhere (B,1,h,w); with ``drop`` > 0 a dropout layer perturbs it
    (MC dropout), with ``slope`` it adds ``slope * mean(x)`` (so it reacts to the input)."""

    def __init__(self, value: float, hw=(H, W), drop: float = 0.0, slope: float = 0.0):
        super().__init__()
        self.value, self.hw, self.slope = value, hw, slope
        self.bias = nn.Parameter(torch.zeros(1))
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        b = x.shape[0]
        base = torch.full((b, 1, *self.hw), self.value) + self.bias + self.slope * x.mean((1, 2, 3)).view(b, 1, 1, 1)
        return self.drop(base) if self.drop.p > 0 else base


def make_checkpoint(path, seed: int = 0, ema_seed: int = 100, metrics_source=None):
    """An engine-format checkpoint of ``tiny_fwi`` with different raw and EMA weights."""
    torch.manual_seed(seed)
    raw = TinyNet()
    torch.manual_seed(ema_seed)
    ema = TinyNet()
    meta = {"model": "tiny_fwi", "model_kwargs": {}, "metrics": {"source": metrics_source} if metrics_source else None}
    save_checkpoint({"format": FORMAT, "metadata": meta, "model": raw.state_dict(), "ema": ema.state_dict()}, path)
    return path
