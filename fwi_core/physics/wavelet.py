"""Source wavelets.

The host's data were generated with a Ricker wavelet of ``nw = 2*floor((2.2/f/dt)/2)+1``
samples (147 for 15 Hz at 1 ms), centred on sample ``nc = floor(nw/2)`` (73) and zero
after its last sample, computed in float32.
"""
from __future__ import annotations

import math

import numpy as np
import torch


def ricker(freq: float = 15.0, dt: float = 1e-3, nt: int = 1000) -> np.ndarray:
    """Ricker wavelet exactly as the host computed it (float32 arithmetic).

    Args:
        freq: peak frequency in Hz.
        dt: time step in seconds.
        nt: number of time samples of the returned trace.

    Returns:
        float32 array of shape (nt,); samples past the wavelet's length are zero.
    """
    if freq <= 0 or dt <= 0 or nt <= 0:
        raise ValueError(f"ricker: freq, dt and nt must be positive, got freq={freq}, dt={dt}, nt={nt}")
    nw = 2 * (int(2.2 / freq / dt) // 2) + 1
    nc = nw // 2 + 1  # 1-based centre, as the host's (MATLAB-born) code had it
    k = torch.arange(1, nw + 1, dtype=torch.float32)
    a = (nc - k) * freq * dt * math.pi
    b = a**2
    w = (1.0 - 2.0 * b) * torch.exp(-b)
    out = np.zeros(nt, dtype=np.float32)
    n = min(nt, nw)
    out[:n] = w[:n].numpy()
    return out
