"""Velocity-map augmentations that stay physical.

Each function returns a new velocity map; the simulator then computes exact seismic for
it, so (simulate(map), map) is a true training pair (unlike augmenting the gathers,
FACTS section 7: 1st place re-simulated crops and affine warps, 3rd place blends of two
maps with alpha 0.3..0.7).

- :func:`crop_resize`: zoom into a random sub-window and resize it back bilinearly.
- :func:`affine_warp`: a small rotation / shear / scale about the map centre, the
  boundary reflected or replicated.
- :func:`blend`: ``alpha * a + (1 - alpha) * b`` with ``alpha`` drawn in 0.3..0.7.
- :func:`augment_map`: apply each of them with per-map probabilities
  (:data:`DEFAULT_AUGMENT`).

Maps are numpy arrays of shape (H, W) or (1, H, W) in m/s; results keep the input's
shape, are float32 and are clipped to [1500, 4500] m/s. The random functions take a
``numpy.random.Generator``; :func:`crop_window` and :func:`warp` are their deterministic
cores. Resampling is ``torch.nn.functional.grid_sample`` (bilinear, float64,
``align_corners=False``) on the affine grid of the transform.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Literal, Mapping, Optional, Tuple

import numpy as np
import torch

from .families import VEL_HI, VEL_LO

Boundary = Literal["reflect", "replicate"]
#: the per-map probabilities :class:`~fwi_core.physics.simulated.SimulatedDataset` uses by default
DEFAULT_AUGMENT: Dict[str, float] = {"crop": 0.3, "warp": 0.3, "blend": 0.2}
AUGMENTATIONS = ("blend", "crop", "warp")   # the order augment_map applies them in
_PADDING = {"reflect": "reflection", "replicate": "border"}


def _as_2d(v: np.ndarray, what: str = "velocity") -> Tuple[np.ndarray, Tuple[int, ...]]:
    a = np.asarray(v)
    if a.ndim == 3 and a.shape[0] == 1:
        m = a[0]
    elif a.ndim == 2:
        m = a
    else:
        raise ValueError(f"map_augment: {what} of shape {a.shape} must be (H, W) or (1, H, W)")
    if min(m.shape) < 2:
        raise ValueError(f"map_augment: {what} of shape {a.shape} is smaller than 2x2")
    if not np.isfinite(m).all():
        raise ValueError(f"map_augment: {what} contains NaN or inf")
    return m.astype(np.float64), a.shape


def _finish(m: np.ndarray, shape: Tuple[int, ...]) -> np.ndarray:
    return np.clip(m, VEL_LO, VEL_HI).astype(np.float32).reshape(shape)


def _resample(m: np.ndarray, matrix: np.ndarray, offset: np.ndarray, boundary: Boundary) -> np.ndarray:
    """Sample ``m`` (H, W) at ``p_in = matrix @ (p_out - c) + c + offset`` for every output
    pixel ``p_out = (row, col)``, ``c`` the centre; bilinear, outside points per ``boundary``."""
    if boundary not in _PADDING:
        raise ValueError(f"map_augment: boundary must be 'reflect' or 'replicate', got {boundary!r}")
    h, w = m.shape
    # grid_sample's normalised coordinates (x = column, y = row), align_corners=False:
    # n = (p - c) / (size / 2). In (x, y) order: n_in = D^-1 A D n_out + D^-1 t.
    d = np.diag([w / 2.0, h / 2.0])
    a_xy = matrix[::-1, ::-1]                       # (row, col) -> (x, y) axis order
    t_xy = np.asarray(offset, dtype=np.float64)[::-1]
    theta = np.zeros((2, 3))
    theta[:, :2] = np.linalg.inv(d) @ a_xy @ d
    theta[:, 2] = np.linalg.inv(d) @ t_xy
    th = torch.from_numpy(theta)[None]
    grid = torch.nn.functional.affine_grid(th, [1, 1, h, w], align_corners=False)
    out = torch.nn.functional.grid_sample(torch.from_numpy(np.ascontiguousarray(m))[None, None], grid,
                                          mode="bilinear", padding_mode=_PADDING[boundary],
                                          align_corners=False)
    return out[0, 0].numpy()


def crop_window(v: np.ndarray, top: float, left: float, height: float, width: float,
                boundary: Boundary = "replicate") -> np.ndarray:
    """The sub-window rows ``top .. top+height``, columns ``left .. left+width`` (in pixel
    edges, fractions allowed) resized back to the map's size, bilinear.

    Args:
        v: (H, W) or (1, H, W) m/s.
        top, left, height, width: the window in pixels; ``(0, 0, H, W)`` is the identity.
    Returns:
        float32 map of ``v``'s shape, clipped to [1500, 4500].
    """
    m, shape = _as_2d(v)
    h, w = m.shape
    if height <= 0 or width <= 0:
        raise ValueError(f"crop_window: height and width must be > 0, got {height}, {width}")
    # output pixel edges 0..H map onto window edges top..top+height
    sy, sx = height / h, width / w
    matrix = np.diag([sy, sx])
    offset = np.array([top + height / 2.0 - h / 2.0, left + width / 2.0 - w / 2.0])
    return _finish(_resample(m, matrix, offset, boundary), shape)


def crop_resize(v: np.ndarray, rng: np.random.Generator, *, min_scale: float = 0.6,
                keep_aspect: bool = False) -> np.ndarray:
    """Zoom into a random sub-window and resize it back (bilinear).

    The window's height and width are ``s * H`` and ``s' * W`` with ``s, s'`` uniform in
    ``[min_scale, 1]`` (equal when ``keep_aspect``); its position is uniform inside the map.
    Layers get thicker and interfaces move; the map stays within its value range.

    Args:
        v: (H, W) or (1, H, W) m/s.
        rng: the random generator.
        min_scale: the smallest window side as a fraction of the map's, in (0, 1].
    Returns:
        float32 map of ``v``'s shape, clipped to [1500, 4500].
    """
    if not 0 < min_scale <= 1:
        raise ValueError(f"crop_resize: min_scale must be in (0, 1], got {min_scale}")
    m, _ = _as_2d(v)
    h, w = m.shape
    sy = rng.uniform(min_scale, 1.0)
    sx = sy if keep_aspect else rng.uniform(min_scale, 1.0)
    height, width = sy * h, sx * w
    top, left = rng.uniform(0.0, h - height), rng.uniform(0.0, w - width)
    return crop_window(v, top, left, height, width)


def warp(v: np.ndarray, rotation: float = 0.0, shear: float = 0.0, scale: float = 1.0,
         translate: Tuple[float, float] = (0.0, 0.0), boundary: Boundary = "reflect") -> np.ndarray:
    """An affine warp about the map centre: rotation (degrees), horizontal shear (the
    column shift per row, as a fraction), isotropic scale (> 1 zooms in) and a
    translation (rows, cols). ``warp(v)`` (identity parameters) returns ``v``.

    Args:
        v: (H, W) or (1, H, W) m/s.
        boundary: how points that fall outside are filled: ``"reflect"`` (mirror at the
            edges) or ``"replicate"`` (the nearest edge value).
    Returns:
        float32 map of ``v``'s shape, clipped to [1500, 4500].
    """
    if scale <= 0:
        raise ValueError(f"warp: scale must be > 0, got {scale}")
    m, shape = _as_2d(v)
    r = math.radians(rotation)
    rot = np.array([[math.cos(r), -math.sin(r)], [math.sin(r), math.cos(r)]])   # (row, col)
    sh = np.array([[1.0, 0.0], [shear, 1.0]])
    # forward map out = S R Sh in; grid_sample needs in = (S R Sh)^-1 out
    fwd = scale * rot @ sh
    return _finish(_resample(m, np.linalg.inv(fwd), np.asarray(translate, dtype=np.float64), boundary), shape)


def affine_warp(v: np.ndarray, rng: np.random.Generator, *, max_rotation: float = 10.0,
                max_shear: float = 0.15, max_scale: float = 0.15,
                boundary: Boundary = "reflect") -> np.ndarray:
    """A small random affine warp: rotation uniform in ``±max_rotation`` degrees, shear
    in ``±max_shear``, scale in ``1 ± max_scale``; see :func:`warp`.

    Args:
        v: (H, W) or (1, H, W) m/s.
    Returns:
        float32 map of ``v``'s shape, clipped to [1500, 4500].
    """
    for name, val in (("max_rotation", max_rotation), ("max_shear", max_shear)):
        if val < 0:
            raise ValueError(f"affine_warp: {name} must be >= 0, got {val}")
    if not 0 <= max_scale < 1:
        raise ValueError(f"affine_warp: max_scale must be in [0, 1), got {max_scale}")
    rot = rng.uniform(-max_rotation, max_rotation)
    shear = rng.uniform(-max_shear, max_shear)
    scale = rng.uniform(1.0 - max_scale, 1.0 + max_scale)
    return warp(v, rotation=rot, shear=shear, scale=scale, boundary=boundary)


def blend(a: np.ndarray, b: np.ndarray, rng: np.random.Generator,
          alpha_range: Tuple[float, float] = (0.3, 0.7)) -> np.ndarray:
    """``alpha * a + (1 - alpha) * b`` with ``alpha`` uniform in ``alpha_range``.

    Args:
        a, b: maps of the same shape, (H, W) or (1, H, W) m/s.
    Returns:
        float32 map of ``a``'s shape, clipped to [1500, 4500]. The alpha drawn is the
        first ``rng.uniform`` draw, so ``rng`` seeded alike gives the same alpha.
    """
    ma, shape = _as_2d(a, "first map")
    mb, shape_b = _as_2d(b, "second map")
    if ma.shape != mb.shape:
        raise ValueError(f"blend: maps of shapes {shape} and {shape_b} differ")
    lo, hi = alpha_range
    if not 0 <= lo <= hi <= 1:
        raise ValueError(f"blend: alpha_range must satisfy 0 <= lo <= hi <= 1, got {alpha_range}")
    alpha = rng.uniform(lo, hi)
    return _finish(alpha * ma + (1.0 - alpha) * mb, shape)


def augment_map(v: np.ndarray, rng: np.random.Generator, probs: Optional[Mapping[str, float]] = None,
                partner: Optional[Callable[[np.random.Generator], np.ndarray]] = None,
                ) -> Tuple[np.ndarray, List[str]]:
    """Apply each augmentation with its probability, in the order blend, crop, warp.

    Args:
        v: (H, W) or (1, H, W) m/s.
        rng: the random generator (one draw per augmentation decides whether it applies).
        probs: ``{"crop": p, "warp": p, "blend": p}`` (missing keys: 0; default
            :data:`DEFAULT_AUGMENT`).
        partner: ``partner(rng)`` returns the second map of a blend (needed when
            ``probs["blend"] > 0``).
    Returns:
        (the map, float32 of ``v``'s shape; the names of the augmentations applied).
    """
    probs = validate_augment(DEFAULT_AUGMENT if probs is None else probs)
    if probs.get("blend", 0.0) > 0 and partner is None:
        raise ValueError("augment_map: a blend probability needs partner= (a function returning the second map)")
    applied: List[str] = []
    out = np.asarray(v, dtype=np.float32)
    for name in AUGMENTATIONS:
        if rng.random() >= probs.get(name, 0.0):
            continue
        if name == "blend":
            out = blend(out, np.asarray(partner(rng), dtype=np.float32).reshape(out.shape), rng)
        elif name == "crop":
            out = crop_resize(out, rng)
        else:
            out = affine_warp(out, rng)
        applied.append(name)
    return out, applied


def validate_augment(probs: Mapping[str, float]) -> Dict[str, float]:
    """Check an augmentation-probability mapping; returns it as a plain dict of floats."""
    if not isinstance(probs, Mapping):
        raise ValueError(f"augment must be a mapping like {DEFAULT_AUGMENT}, got {type(probs).__name__}")
    unknown = sorted(set(probs) - set(AUGMENTATIONS))
    if unknown:
        raise ValueError(f"augment: unknown augmentation(s) {unknown}; expected keys among {list(AUGMENTATIONS)}")
    out = {}
    for k, p in probs.items():
        p = float(p)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"augment: probability of {k!r} must be in [0, 1], got {p}")
        out[k] = p
    return out
