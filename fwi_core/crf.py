"""Locally connected Gaussian continuous CRF with mean-field inference.

Refines a network's velocity prediction ``z`` by minimising the convex quadratic energy
(Xu et al. 2017, continuous CRFs; FACTS section 6)::

    E(y) = sum_i a_i (y_i - z_i)^2 + 1/2 sum_i sum_{j in N(i)} w_ij (y_i - y_j)^2

over a (2d+1) x (2d+1) window ``N(i)`` (no self-term), with

    a_i  = unary_weight * confidence_i            (confidence = 1 when not given)
    w_ij = lambda_spatial * exp(-|p_i - p_j|^2 / (2 theta_spatial^2))
         + lambda_feature * exp(-|p_i - p_j|^2 / (2 theta_feature^2)
                                - |f_i - f_j|^2 / (2 temperature^2))

``p`` are pixel positions (in cells), ``f`` the guide features (B, C, H, W): decoder
features, seismic-derived features, or the prediction itself when ``guide=None``;
``|f_i - f_j|^2`` sums over channels, so ``temperature`` is in guide units (0.05 for a
prediction normalised to [-1, 1] is 75 m/s; for a guide in m/s use m/s). The pairwise
scale ``b`` of the usual formulation is folded into the two lambdas.

Inference is the mean-field (Jacobi) update, all pixels at once::

    mu_i <- (a_i z_i + sum_j w_ij mu_j) / (a_i + sum_j w_ij)

Why plain Jacobi is safe here. The weights are computed once from the guide (not from the
evolving ``mu``) and are symmetric (``w_ij = w_ji``) and non-negative, so
``E(y) = y^T A y - 2 y^T a z + const`` with ``A = diag(a) + L_w`` (``L_w`` the graph
Laplacian). One Jacobi step ``y' = y - D^-1 r`` (``D = diag(A)``, ``r = A y - a z``)
changes the energy by ``-r^T D^-1 (2D - A) D^-1 r``, and ``2D - A = diag(a) + Q_w``
where ``Q_w = diag(sum_j w_ij) + W`` is the signless Laplacian,
``x^T Q_w x = sum_{i<j} w_ij (x_i + x_j)^2 >= 0``. Hence ``2D - A`` is positive definite
for ``a > 0`` and every step strictly lowers the energy (non-increasing for ``a >= 0``),
however large the weights: no damping or red-black ordering is needed, and the iteration
converges to the exact MAP. (Only floating-point rounding can raise the energy, by about
1e-7 relative in float32 once converged.) ``last_energies`` records the energy after
each iteration so this can be monitored.

Public API: :class:`ContinuousCRF` (an ``nn.Module``, optionally trainable through the
unrolled iterations), :func:`tune_crf` (grid or optuna search on a validation set) and
:func:`save_crf_config` / :func:`load_crf` (the tuned configuration as ``crf.json`` beside
the checkpoints).
"""
from __future__ import annotations

import itertools
import json
import math
import os
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .metrics import mae
from .utils import atomic_write_text, has_module, optional_import

ArrayLike = Union[np.ndarray, torch.Tensor]

__all__ = ["ContinuousCRF", "tune_crf", "default_crf_ms"]

#: Names of the CRF's positive hyper-parameters (learned when ``trainable=True``).
PARAMETER_NAMES = ("lambda_spatial", "lambda_feature", "temperature", "theta_spatial",
                   "theta_feature", "unary_weight")
_STRICTLY_POSITIVE = ("temperature", "theta_spatial", "theta_feature")


def _inverse_softplus(x: float) -> float:
    return x + math.log(-math.expm1(-x))


class ContinuousCRF(nn.Module):
    """Gaussian continuous CRF refinement of a (B, 1, H, W) prediction (see module doc).

    Args:
        window: odd window size (2d+1); pairs are within ``d`` cells in both directions.
        iterations: number of mean-field (Jacobi) updates.
        lambda_spatial: weight of the position-only smoothness kernel (>= 0).
        lambda_feature: weight of the edge-aware (guide-dependent) kernel (>= 0).
        temperature: feature bandwidth, in guide units (> 0).
        theta_spatial: spatial bandwidth of the smoothness kernel, in cells (> 0).
        theta_feature: spatial bandwidth of the edge-aware kernel, in cells (> 0).
        unary_weight: weight ``a`` of the data term (> 0 for a unique MAP); multiplied
            by the per-pixel ``confidence`` when one is given.
        trainable: learn the six parameters above through the unrolled iterations
            (stored as ``nn.Parameter`` behind a softplus, so they stay positive; all
            must then be > 0). The MAP only depends on the ratios of ``unary_weight`` to
            the lambdas, so one of them is redundant when all are learned.
        track_energy: record ``last_energies`` (float64, no gradient) on each call.

    Call ``crf(prediction, guide=None, confidence=None)`` with ``prediction`` (B,1,H,W),
    ``guide`` (B,C,H,W) or None (use the prediction), ``confidence`` (B,1,H,W) >= 0 or
    None; returns the refined (B,1,H,W) map in the prediction's units and dtype (the
    refinement is unit-equivariant in the prediction: only ``temperature`` depends on
    the guide's units). After a call, ``last_energies`` is a list of ``iterations + 1``
    (B,) tensors: the energy of the initial ``mu = z`` and after each update.
    """

    def __init__(self, window: int = 5, iterations: int = 10, lambda_spatial: float = 0.1,
                 lambda_feature: float = 1.0, temperature: float = 0.05,
                 theta_spatial: float = 1.0, theta_feature: float = 2.0,
                 unary_weight: float = 1.0, trainable: bool = False, track_energy: bool = True):
        super().__init__()
        if window < 3 or window % 2 == 0:
            raise ValueError(f"ContinuousCRF: window must be odd and >= 3, got {window}")
        if iterations < 0:
            raise ValueError(f"ContinuousCRF: iterations must be >= 0, got {iterations}")
        self.window = int(window)
        self.iterations = int(iterations)
        self.trainable = bool(trainable)
        self.track_energy = bool(track_energy)
        self.last_energies: List[torch.Tensor] = []
        values = dict(lambda_spatial=lambda_spatial, lambda_feature=lambda_feature,
                      temperature=temperature, theta_spatial=theta_spatial,
                      theta_feature=theta_feature, unary_weight=unary_weight)
        for name, value in values.items():
            value = float(value)
            if not math.isfinite(value) or value < 0 or (value == 0 and (
                    trainable or name in _STRICTLY_POSITIVE)):
                need = "> 0" if (trainable or name in _STRICTLY_POSITIVE) else ">= 0"
                raise ValueError(f"ContinuousCRF: {name} must be finite and {need}, got {value}")
            if trainable:
                self.register_parameter(f"raw_{name}", nn.Parameter(
                    torch.tensor(_inverse_softplus(value), dtype=torch.float32)))
            else:
                self.register_buffer(f"raw_{name}", torch.tensor(value, dtype=torch.float32))

    # ---------------------------------------------------------------- parameters
    def param(self, name: str) -> torch.Tensor:
        """The current (positive) value of a hyper-parameter as a 0-d tensor."""
        raw = getattr(self, f"raw_{name}")
        return F.softplus(raw) if self.trainable else raw

    def config(self) -> Dict[str, float]:
        """Keyword arguments that rebuild this CRF (current values, not trainable)."""
        cfg: Dict[str, float] = {"window": self.window, "iterations": self.iterations}
        cfg.update({n: float(self.param(n).detach()) for n in PARAMETER_NAMES})
        return cfg

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in self.config().items()) + f", trainable={self.trainable}"

    # ---------------------------------------------------------------- building blocks
    def _check(self, prediction: torch.Tensor, guide, confidence):
        if prediction.dim() != 4 or prediction.shape[1] != 1:
            raise ValueError(f"ContinuousCRF: prediction must be (B,1,H,W), got {tuple(prediction.shape)}")
        b, _, h, w = prediction.shape
        if guide is None:
            guide = prediction
        elif guide.dim() != 4 or guide.shape[0] != b or guide.shape[-2:] != prediction.shape[-2:]:
            raise ValueError(f"ContinuousCRF: guide must be (B,C,H,W) = ({b},C,{h},{w}), "
                             f"got {tuple(guide.shape)}")
        if confidence is not None and confidence.shape != prediction.shape:
            raise ValueError(f"ContinuousCRF: confidence must have the prediction's shape "
                             f"{tuple(prediction.shape)}, got {tuple(confidence.shape)}")
        return guide.to(prediction), None if confidence is None else confidence.to(prediction)

    def pairwise_weights(self, guide: torch.Tensor) -> torch.Tensor:
        """Pairwise weights ``w_ij`` for every window offset.

        Args:
            guide: (B, C, H, W) features.
        Returns:
            (B, window^2, H*W) weights in ``F.unfold`` order (row offset major); the
            centre (self) entry and neighbours outside the image are zero. Symmetric:
            the weight of (i, i+o) equals that of (i+o, i) at offset -o.
        """
        b, _, h, w = guide.shape
        d = self.window // 2
        dt = guide.dtype
        ls, lf = self.param("lambda_spatial").to(guide), self.param("lambda_feature").to(guide)
        temp, ts, ta = (self.param(n).to(guide) for n in ("temperature", "theta_spatial", "theta_feature"))
        gp = F.pad(guide, (d, d, d, d))
        inside = F.pad(torch.ones(h, w, dtype=dt, device=guide.device), (d, d, d, d))
        weights = []
        for dy in range(-d, d + 1):
            for dx in range(-d, d + 1):
                if dy == 0 and dx == 0:
                    weights.append(guide.new_zeros(b, h, w))
                    continue
                rows, cols = slice(d + dy, d + dy + h), slice(d + dx, d + dx + w)
                r2 = float(dy * dy + dx * dx)
                f2 = (guide - gp[:, :, rows, cols]).pow(2).sum(1)                   # (B,H,W)
                wo = ls * torch.exp(-r2 / (2 * ts ** 2)) \
                    + lf * torch.exp(-r2 / (2 * ta ** 2) - f2 / (2 * temp ** 2))
                weights.append(wo * inside[rows, cols])
        return torch.stack(weights, 1).flatten(2)                                   # (B,K,HW)

    def _unary(self, z: torch.Tensor, confidence: Optional[torch.Tensor]) -> torch.Tensor:
        a = self.param("unary_weight").to(z)
        if confidence is None:
            return a.expand(z.shape[0], z.shape[-2] * z.shape[-1])
        if (confidence < 0).any():
            raise ValueError("ContinuousCRF: confidence must be >= 0")
        return a * confidence.flatten(1)

    def _neighbours(self, mu: torch.Tensor, shape) -> torch.Tensor:
        """(B, HW) field -> (B, window^2, HW) values at every window offset (0 outside)."""
        return F.unfold(mu.reshape(shape), self.window, padding=self.window // 2)

    def _energy(self, y, z, a, wts, shape) -> torch.Tensor:
        y, z, a, wts = (t.detach().to(torch.float64) for t in (y, z, a, wts))
        unary = (a * (y - z) ** 2).sum(1)
        diff = y[:, None, :] - self._neighbours(y, shape)
        return unary + 0.5 * (wts * diff ** 2).sum((1, 2))

    # ---------------------------------------------------------------- public
    def energy(self, y: torch.Tensor, z: torch.Tensor, guide: Optional[torch.Tensor] = None,
               confidence: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Per-sample energy E(y) (float64, (B,)) for a candidate ``y`` given the
        prediction ``z`` (both (B,1,H,W)); ``guide=None`` uses ``z``, as ``forward`` does."""
        guide, confidence = self._check(z, guide, confidence)
        if y.shape != z.shape:
            raise ValueError(f"ContinuousCRF.energy: y {tuple(y.shape)} and z {tuple(z.shape)} differ")
        with torch.no_grad():
            wts = self.pairwise_weights(guide)
            return self._energy(y.to(z).flatten(1), z.flatten(1), self._unary(z, confidence),
                                wts, z.shape)

    def forward(self, prediction: torch.Tensor, guide: Optional[torch.Tensor] = None,
                confidence: Optional[torch.Tensor] = None) -> torch.Tensor:
        guide, confidence = self._check(prediction, guide, confidence)
        shape = prediction.shape
        z = prediction.flatten(1)                                                   # (B,HW)
        wts = self.pairwise_weights(guide)                                          # (B,K,HW)
        a = self._unary(prediction, confidence)                                     # (B,HW)
        den = a + wts.sum(1)
        isolated = den <= 0          # no data term and no neighbours: keep the prediction
        den = torch.where(isolated, torch.ones_like(den), den)
        az = a * z
        mu = z
        energies = [self._energy(mu, z, a, wts, shape)] if self.track_energy else []
        for _ in range(self.iterations):
            new = (az + (wts * self._neighbours(mu, shape)).sum(1)) / den
            mu = torch.where(isolated, mu, new)
            if self.track_energy:
                energies.append(self._energy(mu, z, a, wts, shape))
        self.last_energies = energies
        return mu.reshape(shape)


# ------------------------------------------------------------------------------ tuning
#: The default ``temperature`` (0.05) is in normalised velocity units ([-1, 1] for
#: 1500..4500 m/s); one normalised unit is 1500 m/s.
MS_PER_NORMALISED_UNIT = 1500.0


def default_crf_ms(**overrides) -> "ContinuousCRF":
    """The default CRF for predictions in m/s: the default ``temperature`` converted from
    normalised units (x 1500 m/s), so it smooths m/s maps exactly as the default CRF
    smooths the same maps normalised."""
    kwargs = {"temperature": 0.05 * MS_PER_NORMALISED_UNIT}
    kwargs.update(overrides)
    return ContinuousCRF(**kwargs)


def _robust_scale(x: torch.Tensor) -> float:
    """Median absolute difference between horizontal and vertical neighbours (all channels)."""
    d = torch.cat([(x[..., 1:, :] - x[..., :-1, :]).abs().flatten(),
                   (x[..., :, 1:] - x[..., :, :-1]).abs().flatten()])
    s = float(d.median()) if d.numel() else 0.0
    return s if s > 0 else float(x.abs().max().clamp_min(1e-6)) * 1e-2


def _evaluate(cfg: dict, preds, targets, guides, confidence, metric, batch_size) -> float:
    crf = ContinuousCRF(**cfg, track_energy=False)
    crf.to(preds.device)
    vals = []
    with torch.no_grad():
        for s in range(0, preds.shape[0], batch_size):
            sl = slice(s, s + batch_size)
            out = crf(preds[sl], None if guides is None else guides[sl],
                      None if confidence is None else confidence[sl])
            vals.append(torch.as_tensor(metric(out, targets[sl])).reshape(-1))
    return float(torch.cat(vals).to(torch.float64).mean())


def tune_crf(predictions: ArrayLike, targets: ArrayLike, guides: Optional[ArrayLike] = None,
             grid: Optional[Dict[str, Sequence]] = None, n_trials: Optional[int] = None,
             confidence: Optional[ArrayLike] = None, base_config: Optional[dict] = None,
             metric: Optional[Callable] = None, batch_size: int = 64, seed: int = 0) -> dict:
    """Choose CRF hyper-parameters on a validation set.

    Args:
        predictions: (N,1,H,W) network predictions; targets: (N,1,H,W) ground truth.
        guides: (N,C,H,W) guide features, or None (each prediction guides itself).
        grid: ``{parameter: [values]}`` searched exhaustively (the product). Default:
            ``lambda_feature`` in (0.5, 1, 2, 4), ``temperature`` in (0.5, 1, 2, 4) x s
            where s is the guides' median neighbour difference (so the grid fits m/s
            and normalised units alike), ``lambda_spatial`` in (0, 0.1).
        n_trials: run optuna's TPE sampler for this many trials instead (log-uniform
            ranges around the same values); falls back to ``grid`` with a warning when
            optuna is not installed.
        confidence: (N,1,H,W) per-pixel confidence passed to the CRF.
        base_config: fixed ``ContinuousCRF`` arguments (``window``, ``iterations``, ...).
        metric: ``f(pred, target) -> per-sample values`` to minimise (default MAE).
        batch_size: samples per CRF call.

    Returns:
        ``{"best_config": kwargs for ContinuousCRF, "crf_mae": its mean metric,
        "cnn_mae": the metric of the unrefined predictions, "improved": bool,
        "trials": [(config, value), ...]}``.
    """
    metric = metric or mae
    p = torch.as_tensor(predictions, dtype=torch.float32)
    t = torch.as_tensor(targets, dtype=torch.float32, device=p.device)
    g = None if guides is None else torch.as_tensor(guides, dtype=torch.float32, device=p.device)
    c = None if confidence is None else torch.as_tensor(confidence, dtype=torch.float32, device=p.device)
    if p.dim() != 4 or p.shape[1] != 1 or t.shape != p.shape:
        raise ValueError(f"tune_crf: predictions and targets must both be (N,1,H,W); got "
                         f"{tuple(p.shape)} and {tuple(t.shape)}")
    base = dict(base_config or {})
    base.pop("trainable", None)
    scale = _robust_scale(p if g is None else g)
    cnn = float(torch.as_tensor(metric(p, t)).to(torch.float64).mean())
    trials = []

    def run(cfg):
        value = _evaluate(cfg, p, t, g, c, metric, batch_size)
        trials.append((cfg, value))
        return value

    use_optuna = n_trials is not None
    if use_optuna and not has_module("optuna"):
        warnings.warn("tune_crf: optuna is not installed (pip install optuna); "
                      "searching the grid instead", stacklevel=2)
        use_optuna = False
    if use_optuna:
        optuna = optional_import("optuna", "tune_crf(n_trials=...)")
        optuna.logging.set_verbosity(optuna.logging.WARNING)

        def objective(trial):
            cfg = dict(base)
            cfg["lambda_spatial"] = trial.suggest_float("lambda_spatial", 1e-3, 1.0, log=True)
            cfg["lambda_feature"] = trial.suggest_float("lambda_feature", 1e-2, 10.0, log=True)
            cfg["temperature"] = trial.suggest_float("temperature", 0.1 * scale, 10 * scale, log=True)
            cfg["theta_feature"] = trial.suggest_float("theta_feature", 0.5, 4.0)
            return run(cfg)

        study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed))
        study.optimize(objective, n_trials=int(n_trials))
    else:
        if grid is None:
            grid = {"lambda_feature": (0.5, 1.0, 2.0, 4.0),
                    "temperature": tuple(m * scale for m in (0.5, 1.0, 2.0, 4.0)),
                    "lambda_spatial": (0.0, 0.1)}
        keys = list(grid)
        for combo in itertools.product(*(grid[k] for k in keys)):
            run({**base, **dict(zip(keys, combo))})
    if not trials:
        raise ValueError("tune_crf: the search evaluated no configuration (empty grid?)")
    best_cfg, best = min(trials, key=lambda tv: tv[1])
    best_cfg = ContinuousCRF(**best_cfg).config()
    return {"best_config": best_cfg, "crf_mae": best, "cnn_mae": cnn, "improved": best < cnn,
            "trials": trials}


# ------------------------------------------------------------------ saved configuration
CRF_CONFIG_FILE = "crf.json"


def save_crf_config(config: dict, folder: Union[str, os.PathLike]) -> Path:
    """Write a tuned :class:`~fwi_core.crf.ContinuousCRF` configuration beside checkpoints."""
    path = Path(folder) / CRF_CONFIG_FILE
    atomic_write_text(path, json.dumps(config, indent=2, sort_keys=True))
    return path


def load_crf(checkpoint_dirs: Sequence[Union[str, os.PathLike]]):
    """The CRF saved by :func:`save_crf_config` in the first of ``checkpoint_dirs`` that
    holds one (a checkpoint file means its folder), or None."""
    for d in checkpoint_dirs:
        d = Path(d)
        f = (d.parent if d.is_file() else d) / CRF_CONFIG_FILE
        if f.is_file():
            try:
                config = json.loads(f.read_text())
                if not isinstance(config, dict):
                    raise TypeError(f"expected a JSON object, got {type(config).__name__}")
                return ContinuousCRF(**config)
            except (ValueError, TypeError, UnicodeDecodeError) as e:   # bad JSON, unknown or bad fields
                raise ValueError(f"{f}: not a CRF configuration ({type(e).__name__}: {e}); delete it or "
                                 "tune it again (the train kernel writes it)") from e
    return None
