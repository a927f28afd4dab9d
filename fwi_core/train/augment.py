"""The batch augmentations as the engine applies them: horizontal flips (``flip_prob``),
amplitude scaling (``scale_prob``, ``scale_range``) and additive noise (``noise_prob``,
``noise_std``).

Every draw is made for the whole global batch from a generator seeded by (seed, epoch,
batch), each rank taking its own items, so single-process, DDP and resumed runs augment
the same samples the same way (and the global RNG is left alone).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from ..data import add_noise, hflip, scale_amplitude
from .config import TrainConfig
from .datasets import mix_seed
from .distributed import DistInfo


class BatchAugment:
    """Augment one training batch (this rank's share of global batch ``batch``)."""

    def __init__(self, cfg: TrainConfig, dist: DistInfo):
        self.cfg, self.dist = cfg, dist

    def __call__(self, x: torch.Tensor, y: torch.Tensor, epoch: int,
                 batch: int) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """The augmented ``(x, y)`` and the (B,) bool mask of the flipped samples (None
        without flips). Inputs are cloned before they are changed."""
        flipped = None
        if self.cfg.flip_prob > 0:
            x, y, flipped = self.flip(x, y, epoch, batch)
        if self.cfg.scale_prob > 0 or self.cfg.noise_prob > 0:
            x = self.gathers(x, epoch, batch)
        return x, y, flipped

    def flip(self, x: torch.Tensor, y: torch.Tensor, epoch: int, batch: int):
        """Horizontal flips of gathers and maps together; returns ``(x, y, mask)``."""
        g = torch.Generator().manual_seed(mix_seed(self.cfg.seed, epoch, batch))
        draw = torch.rand(self.cfg.batch_size, generator=g) < self.cfg.flip_prob
        mask = draw[self.dist.rank::self.dist.world_size][: x.shape[0]].to(x.device)
        if bool(mask.any()):
            x, y = x.clone(), y.clone()
            x[mask], y[mask] = hflip(x[mask], y[mask])
        return x, y, mask

    def gathers(self, x: torch.Tensor, epoch: int, batch: int) -> torch.Tensor:
        """Amplitude scaling and additive noise on the gathers."""
        cfg = self.cfg
        n = cfg.batch_size
        g = torch.Generator().manual_seed(mix_seed(cfg.seed, epoch, batch, 2))
        pick = slice(self.dist.rank, None, self.dist.world_size)
        if cfg.scale_prob > 0:
            lo, hi = (math.log(v) for v in cfg.scale_range)
            use = (torch.rand(n, generator=g) < cfg.scale_prob)[pick][: x.shape[0]]
            f = torch.exp(lo + (hi - lo) * torch.rand(n, generator=g))[pick][: x.shape[0]]
            if bool(use.any()):
                x = x.clone()
                x[use.to(x.device)] = scale_amplitude(x[use.to(x.device)], f[use])
        if cfg.noise_prob > 0:
            use = (torch.rand(n, generator=g) < cfg.noise_prob)[pick][: x.shape[0]]
            if bool(use.any()):
                x = x.clone()
                x[use.to(x.device)] = add_noise(x[use.to(x.device)], cfg.noise_std, generator=g)
        return x
