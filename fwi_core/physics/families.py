"""Velocity-map generators for the 10 OpenFWI families (numpy only, deterministic).

Recipes follow the public OpenFWI descriptions:

- ``FlatVel``: flat layers; A has 3-5 layers with velocity increasing with depth, B
  has 5-8 layers with velocities in random order.
- ``CurveVel``: the same layers, with interfaces bent by a sum of sines of periods
  70/1 .. 70/5 cells.
- ``FlatFault`` / ``CurveFault``: flat or curved layers cut by faults: straight dipping
  lines across which the layers are shifted (one fault for A, two or three for B).
- ``Style``: smooth natural-looking fields (smoothed noise) on a depth trend; B is rougher.

Every map is (1, 70, 70) float32 in m/s within [1500, 4500]. ``generate(family, n, seed)``
returns the same maps for the same arguments.
"""
from __future__ import annotations

from typing import List

import numpy as np

VEL_LO = 1500.0
VEL_HI = 4500.0
SIZE = 70

FAMILIES: List[str] = [
    "FlatVel_A", "FlatVel_B", "CurveVel_A", "CurveVel_B",
    "FlatFault_A", "FlatFault_B", "CurveFault_A", "CurveFault_B",
    "Style_A", "Style_B",
]
#: families whose Kaggle files are ``seis*_1_0.npy`` / ``vel*_1_0.npy`` side by side
FAULT_FAMILIES = {f for f in FAMILIES if "Fault" in f}


def _layer_velocities(rng: np.random.Generator, n: int, monotone: bool) -> np.ndarray:
    """Velocities of ``n`` layers from top to bottom, adjacent layers >= 150 m/s apart."""
    while True:
        v = rng.uniform(VEL_LO, VEL_HI, size=n)
        if monotone:
            v = np.sort(v)
        if n == 1 or np.min(np.abs(np.diff(v))) >= 150.0:
            return v


def _interfaces(rng: np.random.Generator, n_layers: int, curved: bool, rough: bool) -> np.ndarray:
    """Interface depths (n_layers-1, 70) in rows, increasing downwards at every column."""
    k = n_layers - 1
    depths = np.sort(rng.choice(np.arange(6, 66), size=k, replace=False)).astype(np.float64)
    x = np.arange(SIZE, dtype=np.float64)
    z = np.repeat(depths[:, None], SIZE, axis=1)
    if curved:
        # a shared deformation (sum of sines of periods 70/1..70/5) plus a little per-interface
        n_terms = 5 if rough else 3
        base = np.zeros(SIZE)
        for m in range(1, n_terms + 1):
            amp = rng.uniform(0.5, 6.0 if rough else 4.0) / m
            base += amp * np.sin(2 * np.pi * m * x / SIZE + rng.uniform(0, 2 * np.pi))
        for i in range(k):
            own = rng.uniform(0.5, 1.5) * base
            own += rng.uniform(0, 1.5) * np.sin(2 * np.pi * rng.integers(1, 6) * x / SIZE
                                                + rng.uniform(0, 2 * np.pi))
            z[i] += own
    z = np.clip(z, 1, SIZE - 1)
    # keep interfaces ordered (no crossing) and at least one row apart
    for i in range(1, k):
        z[i] = np.maximum(z[i], z[i - 1] + 1)
    return z


def _paint_layers(z_if: np.ndarray, vel: np.ndarray) -> np.ndarray:
    rows = np.arange(SIZE, dtype=np.float64)[:, None]  # (70,1)
    idx = (rows[None] >= z_if[:, None, :]).sum(axis=0)  # (70,70): layer index per cell
    return vel[idx]


def _apply_fault(rng: np.random.Generator, m: np.ndarray) -> np.ndarray:
    """Shift the map on one side of a dipping line by a vertical throw (rows)."""
    x0 = rng.uniform(10, SIZE - 10)
    dip = np.deg2rad(rng.uniform(45, 80)) * rng.choice([-1, 1])
    throw = int(rng.integers(4, 16)) * int(rng.choice([-1, 1]))
    zz, xx = np.mgrid[0:SIZE, 0:SIZE]
    # line through (row 0, x0) with the given dip: x = x0 + z / tan(dip)
    side = xx > x0 + zz / np.tan(dip)
    src_rows = np.clip(zz - throw, 0, SIZE - 1)
    shifted = m[src_rows, xx]
    return np.where(side, shifted, m)


def _smooth(rng: np.random.Generator, sigma: float) -> np.ndarray:
    """White noise smoothed by a Gaussian of ``sigma`` cells (FFT, periodic), unit std."""
    n = 2 * SIZE
    noise = rng.standard_normal((n, n))
    f = np.fft.fftfreq(n)
    g = np.exp(-2 * (np.pi * sigma) ** 2 * (f[:, None] ** 2 + f[None, :] ** 2))
    field = np.real(np.fft.ifft2(np.fft.fft2(noise) * g))[:SIZE, :SIZE]
    return (field - field.mean()) / (field.std() + 1e-12)


def _style(rng: np.random.Generator, rough: bool) -> np.ndarray:
    depth = np.linspace(0.0, 1.0, SIZE)[:, None] * np.ones((1, SIZE))
    if rough:
        field = 0.6 * _smooth(rng, 6.0) + 0.5 * _smooth(rng, 2.0) + 0.25 * _smooth(rng, 0.8)
    else:
        field = _smooth(rng, 9.0) + 0.15 * _smooth(rng, 4.0)
    trend = rng.uniform(1.0, 2.5)
    m = trend * depth + 0.35 * field
    lo = rng.uniform(VEL_LO, 2500.0)
    hi = rng.uniform(max(lo + 800.0, 3200.0), VEL_HI)
    m = (m - m.min()) / (m.max() - m.min() + 1e-12)
    return lo + m * (hi - lo)


def generate_one(family: str, rng: np.random.Generator) -> np.ndarray:
    """One (70, 70) float64 map of ``family`` drawn from ``rng``."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
    kind, variant = family.split("_")
    hard = variant == "B"
    if kind == "Style":
        return _style(rng, rough=hard)
    curved = kind.startswith("Curve")
    fault = kind.endswith("Fault")
    n_layers = int(rng.integers(5, 9)) if hard else int(rng.integers(3, 6))
    z = _interfaces(rng, n_layers, curved=curved, rough=hard)
    m = _paint_layers(z, _layer_velocities(rng, n_layers, monotone=not hard))
    if fault:
        for _ in range(int(rng.integers(2, 4)) if hard else 1):
            m = _apply_fault(rng, m)
    return m


def generate(family: str, n: int, seed: int = 0) -> np.ndarray:
    """``n`` velocity maps of ``family``: float32 (n, 1, 70, 70) in m/s, deterministic
    in (family, n, seed)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
    if n < 0:
        raise ValueError(f"generate: n must be >= 0, got {n}")
    # a stream per family so that families don't share random draws for the same seed
    rng = np.random.default_rng([int(seed), FAMILIES.index(family)])
    maps = [generate_one(family, rng) for _ in range(n)]
    out = np.stack(maps)[:, None] if maps else np.zeros((0, 1, SIZE, SIZE))
    return np.clip(out, VEL_LO, VEL_HI).astype(np.float32)
