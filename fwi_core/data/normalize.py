"""OpenFWI normalisation of velocity and seismic, and their exact inverses.

- velocity: min-max from [VEL_MIN, VEL_MAX] = [1500, 4500] m/s to [-1, 1];
- seismic: ``sign(x) * log1p(|x|)``, then min-max to [-1, 1] with the log of the data
  range (FlatVel-A's raw range, about -26.95 .. 52.77).

Functions accept numpy arrays or torch tensors and return the same kind.
"""
from __future__ import annotations

import math

import numpy as np
import torch

VEL_MIN = 1500.0
VEL_MAX = 4500.0
SEIS_RAW_MIN = -26.95
SEIS_RAW_MAX = 52.77
_LOG_MIN = -math.log1p(abs(SEIS_RAW_MIN))
_LOG_MAX = math.log1p(SEIS_RAW_MAX)


def _lib(x):
    return torch if torch.is_tensor(x) else np


def normalize_velocity(v):
    """m/s -> [-1, 1]."""
    return (v - VEL_MIN) / (VEL_MAX - VEL_MIN) * 2.0 - 1.0


def denormalize_velocity(y):
    """[-1, 1] -> m/s (exact inverse of :func:`normalize_velocity`)."""
    return (y + 1.0) / 2.0 * (VEL_MAX - VEL_MIN) + VEL_MIN


def log_transform(x):
    """``sign(x) * log1p(|x|)``."""
    L = _lib(x)
    return L.sign(x) * L.log1p(L.abs(x))


def inverse_log_transform(t):
    L = _lib(t)
    return L.sign(t) * L.expm1(L.abs(t))


def normalize_seismic(x):
    """Raw seismic -> log-compressed, min-max scaled to [-1, 1] (values outside the
    reference range map slightly outside [-1, 1]; nothing is clipped, so it inverts)."""
    t = log_transform(x)
    return (t - _LOG_MIN) / (_LOG_MAX - _LOG_MIN) * 2.0 - 1.0


def denormalize_seismic(y):
    """Exact inverse of :func:`normalize_seismic`."""
    t = (y + 1.0) / 2.0 * (_LOG_MAX - _LOG_MIN) + _LOG_MIN
    return inverse_log_transform(t)
