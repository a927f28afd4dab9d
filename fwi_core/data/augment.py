"""Augmentations that keep seismic and velocity consistent."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .normalize import denormalize_seismic, normalize_seismic


def hflip(seismic, velocity=None):
    """The horizontal flip: reverse receivers and source order, mirror the velocity map.

    Works on numpy arrays or tensors, single samples ``(5,T,R)``/``(1,H,W)`` or batches
    ``(B,5,T,R)``/``(B,1,H,W)``. Physically approximate: mirrored sources sit at columns
    69, 52, 35, 17, 0 (35, not 34), see FACTS section 3.
    """
    def flip(a, dims):
        return torch.flip(a, dims) if torch.is_tensor(a) else np.ascontiguousarray(np.flip(a, axis=dims))

    s = flip(seismic, (-3, -1))
    if velocity is None:
        return s
    return s, flip(velocity, (-1,))


def scale_amplitude(seismic: torch.Tensor, factors: torch.Tensor, normalized: bool = True) -> torch.Tensor:
    """Multiply each sample's raw gathers by one factor (a stronger or weaker source).

    Physical validity: the wave equation is linear in the source, so ``a * seismic`` is
    exactly the data of the same velocity map with an ``a`` times stronger source; the
    host's data all share one source amplitude, so this teaches invariance to a nuisance
    the test set does not vary (a regulariser, and robustness to the log normalisation's
    amplitude dependence), not new physics.

    Args:
        seismic: (B, S, T, R) gathers, normalised (OpenFWI log min-max) when ``normalized``.
        factors: (B,) positive factors.
    Returns:
        (B, S, T, R) in the same units as the input.
    """
    f = factors.to(seismic.device, torch.float32).view(-1, *([1] * (seismic.dim() - 1)))
    if not normalized:
        return seismic * f.to(seismic.dtype)
    return normalize_seismic(denormalize_seismic(seismic.float()) * f).to(seismic.dtype)


def add_noise(seismic: torch.Tensor, std: float, generator: Optional[torch.Generator] = None,
              normalized: bool = True) -> torch.Tensor:
    """Add white Gaussian noise of ``std`` times each sample's RMS amplitude to its raw gathers.

    Physical validity: field data carry ambient noise, the host's synthetic data do not;
    small noise (a few % of the RMS, i.e. an SNR of 20-30 dB) drowns the weakest late
    arrivals the network could otherwise over-fit, at the price of a train/test mismatch
    (keep ``std`` small and the probability moderate).

    Args:
        seismic: (B, S, T, R), normalised when ``normalized``.
        std: noise standard deviation relative to the per-sample RMS of the raw gathers.
        generator: a CPU generator for reproducible noise.
    Returns:
        (B, S, T, R) in the same units as the input.
    """
    raw = denormalize_seismic(seismic.float()) if normalized else seismic.float()
    rms = raw.pow(2).flatten(1).mean(1).sqrt().view(-1, *([1] * (raw.dim() - 1)))
    noise = torch.randn(raw.shape, generator=generator, dtype=torch.float32).to(raw.device)
    out = raw + std * rms * noise
    return (normalize_seismic(out) if normalized else out).to(seismic.dtype)
