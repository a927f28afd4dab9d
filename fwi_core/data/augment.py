"""Augmentations that keep seismic and velocity consistent."""
from __future__ import annotations

import numpy as np
import torch


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
