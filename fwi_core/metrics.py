"""Per-sample metrics for velocity maps and uncertainty (pure: no simulation; the seismic
misfit of a predicted map is :func:`fwi_core.physics.misfit.seismic_misfit`).

Every metric takes a batch and returns one value per sample: a ``(B,)`` float64 tensor,
or a numpy array when the first argument was numpy. Inputs are ``(B, C, H, W)`` or
``(B, H, W)`` (each leading index is one sample); prediction and target must have the
same shape. :func:`per_family` averages per-sample values by family.

Map metrics work in whatever units the maps are in (m/s or normalised), except where an
argument says otherwise (``data_range`` for SSIM, ``threshold`` for boundaries).

- errors: :func:`mae`, :func:`competition_mae` (Kaggle's metric: odd columns only),
  :func:`rmse`;
- structure: :func:`ssim` (MONAI's definition), :func:`edge_map`, :func:`boundary_iou`;
- CRF: :func:`crf_energy_reduction`;
- uncertainty: :func:`gaussian_nll`, :func:`interval_coverage`, :func:`calibration_curve`,
  :func:`calibration_error`.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

ArrayLike = Union[np.ndarray, torch.Tensor]

__all__ = ["mae", "competition_mae", "rmse", "ssim", "edge_map", "boundary_iou",
           "crf_energy_reduction", "gaussian_nll",
           "interval_coverage", "calibration_curve", "calibration_error", "per_family"]


# --------------------------------------------------------------------------- helpers
def _as_tensor(x: ArrayLike, device=None) -> torch.Tensor:
    t = x if torch.is_tensor(x) else torch.from_numpy(np.asarray(x))
    if device is not None:
        t = t.to(device)
    return t.to(torch.float64)


def _inputs(name: str, first: ArrayLike, *others: ArrayLike) -> Tuple[bool, list]:
    """Convert to float64 tensors on ``first``'s device and check equal shapes."""
    is_numpy = not torch.is_tensor(first)
    a = _as_tensor(first)
    if a.dim() < 2:
        raise ValueError(f"{name}: expected a batch (B, ...) with at least 2 dimensions, "
                         f"got shape {tuple(a.shape)}")
    out = [a]
    for o in others:
        t = _as_tensor(o, a.device)
        if t.shape != a.shape:
            raise ValueError(f"{name}: shapes differ: {tuple(a.shape)} vs {tuple(t.shape)}")
        out.append(t)
    return is_numpy, out


def _ret(t: torch.Tensor, is_numpy: bool) -> ArrayLike:
    return t.detach().cpu().numpy() if is_numpy else t


def _as_4d(t: torch.Tensor, name: str) -> torch.Tensor:
    if t.dim() == 3:
        return t.unsqueeze(1)
    if t.dim() == 4:
        return t
    raise ValueError(f"{name}: expected (B,H,W) or (B,C,H,W), got shape {tuple(t.shape)}")


# ---------------------------------------------------------------------- map errors
def mae(pred: ArrayLike, target: ArrayLike) -> ArrayLike:
    """Mean absolute error per sample."""
    is_np, (p, t) = _inputs("mae", pred, target)
    return _ret((p - t).abs().flatten(1).mean(1), is_np)


def competition_mae(pred: ArrayLike, target: ArrayLike) -> ArrayLike:
    """The Kaggle metric per sample: MAE over the submitted columns only.

    The submission holds columns ``x_1, x_3, ..., x_69`` (odd indices of the last,
    width axis, 35 of 70), every row.
    """
    is_np, (p, t) = _inputs("competition_mae", pred, target)
    return _ret((p[..., 1::2] - t[..., 1::2]).abs().flatten(1).mean(1), is_np)


def rmse(pred: ArrayLike, target: ArrayLike) -> ArrayLike:
    """Root mean squared error per sample."""
    is_np, (p, t) = _inputs("rmse", pred, target)
    return _ret((p - t).pow(2).flatten(1).mean(1).sqrt(), is_np)


# ------------------------------------------------------------------------- structure
def _gaussian_window(win_size: int, sigma: float, channels: int, like: torch.Tensor) -> torch.Tensor:
    """MONAI's separable Gaussian window (normalised to sum 1), shaped for a grouped conv."""
    dist = torch.arange((1 - win_size) / 2, (1 + win_size) / 2, 1.0, dtype=torch.float64)
    g = torch.exp(-((dist / sigma) ** 2) / 2)
    g = g / g.sum()
    k = torch.outer(g, g)
    return k.expand(channels, 1, win_size, win_size).to(like)


def ssim(pred: ArrayLike, target: ArrayLike, data_range: float, win_size: int = 11,
         sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> ArrayLike:
    """Structural similarity per sample, as ``monai.metrics.SSIMMetric`` (2-D) defines it.

    Local statistics come from a Gaussian window (``win_size`` x ``win_size``, ``sigma``)
    applied as a *valid* convolution (no padding, biased variances); the SSIM map
    ``l * cs`` with ``l = (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1)``,
    ``cs = (2 s_xy + C2) / (s_x + s_y + C2)``, ``C1 = (k1 L)^2``, ``C2 = (k2 L)^2`` is
    averaged over channels and positions.

    Args:
        pred, target: (B,C,H,W) or (B,H,W), H and W >= ``win_size``.
        data_range: L, the value range of the maps (3000.0 for m/s in 1500..4500, 2.0 for
            maps normalised to [-1, 1]).
    """
    is_np, (p, t) = _inputs("ssim", pred, target)
    p, t = _as_4d(p, "ssim"), _as_4d(t, "ssim")
    if min(p.shape[-2:]) < win_size:
        raise ValueError(f"ssim: maps of size {tuple(p.shape[-2:])} are smaller than the "
                         f"{win_size}x{win_size} window")
    if data_range <= 0:
        raise ValueError(f"ssim: data_range must be > 0, got {data_range}")
    c = p.shape[1]
    kernel = _gaussian_window(win_size, sigma, c, p)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2

    def conv(x):
        return F.conv2d(x, kernel, groups=c)

    mu_x, mu_y = conv(p), conv(t)
    s_x = conv(p * p) - mu_x ** 2
    s_y = conv(t * t) - mu_y ** 2
    s_xy = conv(p * t) - mu_x * mu_y
    cs = (2 * s_xy + c2) / (s_x + s_y + c2)
    lum = (2 * mu_x * mu_y + c1) / (mu_x ** 2 + mu_y ** 2 + c1)
    return _ret((lum * cs).flatten(1).mean(1), is_np)


def edge_map(velocity: ArrayLike, threshold: float = 100.0) -> ArrayLike:
    """Boolean boundary map: cells where the gradient magnitude exceeds ``threshold``.

    The gradient is taken with central differences (one-sided on the border) in map units
    per cell, so a step of height h between two rows marks both rows with gradient h/2.
    Returns a bool map with the input's shape.
    """
    is_np = not torch.is_tensor(velocity)
    v = _as_tensor(velocity)
    if v.dim() < 2:
        raise ValueError(f"edge_map: expected (..., H, W), got shape {tuple(v.shape)}")
    gy, gx = torch.gradient(v, dim=(-2, -1))
    return _ret(torch.sqrt(gx ** 2 + gy ** 2) > threshold, is_np)


def boundary_iou(pred: ArrayLike, target: ArrayLike, threshold: float = 100.0,
                 tolerance: int = 1) -> ArrayLike:
    """Tolerant IoU of the velocity boundaries (:func:`edge_map`) per sample.

    Edges are matched within a square band of ``tolerance`` cells (a max-pool dilation of
    size ``2*tolerance+1``): with ``P``, ``T`` the predicted and true edge sets,
    ``tp = (|P & dil(T)| + |T & dil(P)|) / 2``, ``fp = |P| - |P & dil(T)|``,
    ``fn = |T| - |T & dil(P)|`` and ``IoU = tp / (tp + fp + fn)``. With ``tolerance=0``
    this is the plain IoU of the edge sets; it is 1 when neither map has an edge.

    Args:
        threshold: gradient magnitude (map units per cell) above which a cell is an edge;
            100 m/s per cell by default (use 100 / 1500 for maps normalised to [-1, 1]).
    """
    is_np, (p, t) = _inputs("boundary_iou", pred, target)
    if tolerance < 0:
        raise ValueError(f"boundary_iou: tolerance must be >= 0, got {tolerance}")
    ep = edge_map(p, threshold).to(torch.float64)
    et = edge_map(t, threshold).to(torch.float64)
    b = ep.shape[0]
    ep4, et4 = ep.reshape(-1, 1, *ep.shape[-2:]), et.reshape(-1, 1, *et.shape[-2:])
    if tolerance > 0:
        k = 2 * tolerance + 1
        dp = F.max_pool2d(ep4, k, stride=1, padding=tolerance)
        dt = F.max_pool2d(et4, k, stride=1, padding=tolerance)
    else:
        dp, dt = ep4, et4
    n_p, n_t = ep.reshape(b, -1).sum(1), et.reshape(b, -1).sum(1)
    hit_p = (ep4 * dt).reshape(b, -1).sum(1)
    hit_t = (et4 * dp).reshape(b, -1).sum(1)
    tp = (hit_p + hit_t) / 2
    denom = tp + (n_p - hit_p) + (n_t - hit_t)
    iou = torch.where(denom > 0, tp / denom.clamp_min(1e-300), torch.ones_like(tp))
    return _ret(iou, is_np)


# ------------------------------------------------------------------------------- CRF
def crf_energy_reduction(energies) -> ArrayLike:
    """Relative drop ``(E_first - E_last) / E_first`` of a CRF's energy per sample.

    Args:
        energies: ``ContinuousCRF.last_energies`` (a list of (B,) tensors, one per
            iteration), or a (T, B) array/tensor. Samples with ``E_first == 0`` give 0.
    """
    is_np = isinstance(energies, np.ndarray)
    if isinstance(energies, (list, tuple)):
        if len(energies) == 0:
            raise ValueError("crf_energy_reduction: no energies (did the CRF run 0 iterations?)")
        is_np = not torch.is_tensor(energies[0])
        e = torch.stack([_as_tensor(x).reshape(-1) for x in energies])
    else:
        e = _as_tensor(energies)
        if e.dim() == 1:
            e = e[:, None]
    first, last = e[0], e[-1]
    red = torch.where(first != 0, (first - last) / torch.where(first != 0, first, torch.ones_like(first)),
                      torch.zeros_like(first))
    return _ret(red, is_np)


# ----------------------------------------------------------------------- uncertainty
def _z_score(level: torch.Tensor) -> torch.Tensor:
    """Half-width, in standard deviations, of the central Gaussian interval at ``level``."""
    return math.sqrt(2.0) * torch.erfinv(level)


def gaussian_nll(mean: ArrayLike, variance: ArrayLike, target: ArrayLike,
                 eps: float = 1e-6) -> ArrayLike:
    """Gaussian negative log-likelihood per sample, averaged over cells:
    ``0.5 * (log(2 pi var) + (target - mean)^2 / var)``, with ``var`` clamped to ``eps``
    (``torch.nn.GaussianNLLLoss(full=True)`` per sample)."""
    is_np, (m, v, t) = _inputs("gaussian_nll", mean, variance, target)
    v = v.clamp_min(eps)
    nll = 0.5 * (torch.log(2 * math.pi * v) + (t - m) ** 2 / v)
    return _ret(nll.flatten(1).mean(1), is_np)


def interval_coverage(mean: ArrayLike, variance: ArrayLike, target: ArrayLike,
                      level: float = 0.9) -> ArrayLike:
    """Fraction of cells whose target lies in the central ``level`` Gaussian interval
    ``mean +- z * sqrt(var)`` (``z = 1.645`` for 0.9). Well calibrated: about ``level``."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"interval_coverage: level must be in (0, 1), got {level}")
    is_np, (m, v, t) = _inputs("interval_coverage", mean, variance, target)
    z = _z_score(torch.tensor(level, dtype=torch.float64, device=m.device))
    inside = (t - m).abs() <= z * v.clamp_min(0).sqrt()
    return _ret(inside.to(torch.float64).flatten(1).mean(1), is_np)


def calibration_curve(mean: ArrayLike, variance: ArrayLike, target: ArrayLike,
                      levels: Optional[Sequence[float]] = None) -> Tuple[ArrayLike, ArrayLike]:
    """Expected vs observed interval coverage over several levels.

    Returns:
        ``(expected, observed)``: the levels (L,) (default 0.05, 0.10, ..., 0.95) and the
        observed coverage per sample and level (B, L). A calibrated model lies on the
        diagonal; observed below expected means overconfident (variance too small).
    """
    is_np, (m, v, t) = _inputs("calibration_curve", mean, variance, target)
    lv = torch.tensor(np.arange(1, 20) / 20 if levels is None else list(levels),
                      dtype=torch.float64, device=m.device)
    if lv.numel() == 0 or (lv <= 0).any() or (lv >= 1).any():
        raise ValueError("calibration_curve: levels must be a non-empty list of values in (0, 1)")
    r = ((t - m).abs() / v.clamp_min(1e-300).sqrt()).flatten(1)            # (B, N) |z|
    observed = (r[:, None, :] <= _z_score(lv)[None, :, None]).to(torch.float64).mean(2)
    return _ret(lv, is_np), _ret(observed, is_np)


def calibration_error(mean: ArrayLike, variance: ArrayLike, target: ArrayLike,
                      levels: Optional[Sequence[float]] = None) -> ArrayLike:
    """Mean absolute gap between observed and expected coverage per sample
    (over :func:`calibration_curve`'s levels)."""
    expected, observed = calibration_curve(mean, variance, target, levels)
    if isinstance(observed, np.ndarray):
        return np.abs(observed - expected[None]).mean(1)
    return (observed - expected[None]).abs().mean(1)


# --------------------------------------------------------------------------- families
def per_family(values: ArrayLike, families: Sequence[str]) -> Dict[str, float]:
    """Mean of per-sample ``values`` for each family, plus ``'all'`` (the overall mean).

    Args:
        values: (B,) per-sample metric values.
        families: B family names (e.g. ``'FlatVel_A'``), in the same order.
    """
    vals = _as_tensor(values).reshape(-1).cpu().numpy()
    fams = [str(f) for f in families]
    if len(fams) != len(vals):
        raise ValueError(f"per_family: {len(vals)} values but {len(fams)} family names")
    out: Dict[str, float] = {}
    for fam in sorted(set(fams)):
        out[fam] = float(np.mean([v for v, f in zip(vals, fams) if f == fam]))
    out["all"] = float(vals.mean()) if len(vals) else float("nan")
    return out
