"""Score predictions: per-family tables of map metrics and of uncertainty calibration,
and their plain-text form.

    print(format_table(score_predictions(pred_ms, true_ms, families)))
"""
from __future__ import annotations

from typing import Dict, Sequence

import numpy as np

from . import metrics
from .data.normalize import VEL_MAX, VEL_MIN

__all__ = ["score_predictions", "score_uncertainty", "format_table"]


def score_uncertainty(mean: np.ndarray, var: np.ndarray, true: np.ndarray,
                      families: Sequence[str]) -> Dict[str, Dict[str, float]]:
    """Calibration of a predicted mean and variance per family (and 'all'): Gaussian NLL,
    coverage of the 90% interval (0.9 when calibrated) and the calibration error (mean
    gap between expected and observed coverage over levels)."""
    var = np.maximum(var, 1e-6)  # MC samples that all agree give zero variance
    per_sample = {
        "nll": metrics.gaussian_nll(mean, var, true),
        "coverage90": metrics.interval_coverage(mean, var, true, level=0.9),
        "calibration_error": metrics.calibration_error(mean, var, true),
    }
    table: Dict[str, Dict[str, float]] = {}
    for name, vals in per_sample.items():
        for fam, v in metrics.per_family(vals, list(families)).items():
            table.setdefault(fam, {})[name] = float(v)
    return table


def score_predictions(pred: np.ndarray, true: np.ndarray, families: Sequence[str]) -> Dict[str, Dict[str, float]]:
    """Metrics per family (and 'all') of m/s predictions: MAE, the competition's MAE
    (odd columns), RMSE, SSIM (data range 3000 m/s) and boundary IoU."""
    per_sample = {
        "mae": metrics.mae(pred, true),
        "competition_mae": metrics.competition_mae(pred, true),
        "rmse": metrics.rmse(pred, true),
        "ssim": metrics.ssim(pred, true, data_range=VEL_MAX - VEL_MIN),
        "boundary_iou": metrics.boundary_iou(pred, true),
    }
    table: Dict[str, Dict[str, float]] = {}
    for name, vals in per_sample.items():
        for fam, v in metrics.per_family(vals, list(families)).items():
            table.setdefault(fam, {})[name] = float(v)
    return table


def format_table(table: Dict[str, Dict[str, float]]) -> str:
    """A plain-text table of :func:`score_predictions` output ('all' last)."""
    fams = sorted(k for k in table if k != "all") + (["all"] if "all" in table else [])
    cols = list(next(iter(table.values())).keys()) if table else []
    head = f"{'family':<14}" + "".join(f"{c:>17}" for c in cols)
    lines = [head, "-" * len(head)]
    for f in fams:
        lines.append(f"{f:<14}" + "".join(f"{table[f][c]:>17.4f}" for c in cols))
    return "\n".join(lines)
