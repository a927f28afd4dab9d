"""Uncertainty from MC dropout: per-member variance, inverse-variance (confidence)
weighting, a per-pixel uncertainty map, and the CRF's ``confidence`` argument.

Shapes: member means and variances stacked as (M, B, 1, H, W); weights (B, M) per
sample or (M, B, 1, H, W) per pixel; maps (B, 1, H, W). Units are the caller's
(normalised or m/s; variances in squared units).

    mean, var = mc_dropout_predict(model, x_norm, passes=8)          # one member
    w = inverse_variance_weights(variances, prior=static_weights)    # per-pixel weights
    sd = uncertainty_map(means, variances, w)                        # (B,1,H,W) std
    refined = ContinuousCRF()(pred, confidence=crf_confidence(sd ** 2))
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn

from ..inference import predict_batch
from ..models import enable_mc_dropout

__all__ = ["mc_dropout_predict", "inverse_variance_weights", "mixture_variance", "uncertainty_map",
           "crf_confidence"]


@torch.no_grad()
def mc_dropout_predict(model: nn.Module, x: torch.Tensor, passes: int = 8,
                       flip_tta: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """MC dropout (Gal & Ghahramani 2016) of one model: ``passes`` forward passes with
    only its dropout layers active.

    Args:
        model: maps x (B, ...) to (B,1,H,W); put back in eval mode afterwards.
        x: the model's input (normalised seismic).
        passes: >= 2 stochastic passes.
        flip_tta: each pass averages with the un-flipped prediction of the flipped input.

    Returns:
        (mean, variance) of the passes, each (B,1,H,W) in the model's output units
        (unbiased variance).
    """

    if passes < 2:
        raise ValueError(f"mc_dropout_predict: need at least 2 passes, got {passes}")
    try:
        enable_mc_dropout(model)
        samples = torch.stack([predict_batch(model, x, flip_tta) for _ in range(passes)])
    finally:
        model.eval()
    return samples.mean(0), samples.var(0, unbiased=True)


def inverse_variance_weights(variances: torch.Tensor, prior: Optional[torch.Tensor] = None,
                             eps: float = 1e-8) -> torch.Tensor:
    """Per-pixel confidence weights ``prior_m / (var_m + eps)``, normalised over members.

    Args:
        variances: (M, B, 1, H, W) >= 0 per-member variances.
        prior: member weights (M,) or (B, M) (e.g. the static weights); None: equal.
        eps: variance floor (a member with zero variance does not take all the weight
            unless every other member's variance is much larger than ``eps``).

    Returns:
        (M, B, 1, H, W) weights, non-negative, summing to 1 over members at every pixel.
    """
    if variances.dim() < 3:
        raise ValueError(f"inverse_variance_weights: expected (M, B, ...), got {tuple(variances.shape)}")
    if (variances < 0).any():
        raise ValueError("inverse_variance_weights: variances must be >= 0")
    m, b = variances.shape[:2]
    inv = 1.0 / (variances + eps)
    if prior is not None:
        p = prior.to(inv)
        if p.dim() == 1:
            p = p[:, None].expand(m, b)
        elif p.dim() == 2 and p.shape == (b, m):
            p = p.t()
        else:
            raise ValueError(f"inverse_variance_weights: prior must be (M,) or (B, M) = ({b}, {m}), "
                             f"got {tuple(prior.shape)}")
        inv = inv * p.reshape(m, b, *([1] * (variances.dim() - 2)))
    total = inv.sum(0, keepdim=True)
    safe = torch.where(total > 0, total, torch.ones_like(total))
    return torch.where(total > 0, inv / safe, torch.full_like(inv, 1.0 / m))


def mixture_variance(means: torch.Tensor, variances: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-pixel variance of the weighted mixture of member distributions:
    ``sum_m w_m (var_m + (mu_m - mu)^2)`` with ``mu = sum_m w_m mu_m`` (the members' own
    MC variance plus their disagreement).

    Args:
        means, variances: (M, B, 1, H, W).
        weights: (B, M) per sample or (M, B, 1, H, W) per pixel, summing to 1 over M.

    Returns:
        (B, 1, H, W).
    """
    if means.shape != variances.shape:
        raise ValueError(f"mixture_variance: means {tuple(means.shape)} and variances "
                         f"{tuple(variances.shape)} differ")
    w = weights.to(means)
    if w.dim() == 2:
        w = w.t().reshape(*w.t().shape, *([1] * (means.dim() - 2)))
    mu = (w * means).sum(0)
    return (w * (variances + (means - mu) ** 2)).sum(0)


def uncertainty_map(means: torch.Tensor, variances: Optional[torch.Tensor] = None,
                    weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-pixel standard deviation (B,1,H,W) of the ensemble: the mixture of the
    members' MC-dropout distributions (``variances`` None: their disagreement only).

    Args:
        means: (M, B, 1, H, W) member predictions (or MC means).
        variances: (M, B, 1, H, W) MC variances, or None.
        weights: (B, M) or (M, B, 1, H, W); None: equal.
    """
    m, b = means.shape[:2]
    if weights is None:
        weights = torch.full((b, m), 1.0 / m, dtype=means.dtype, device=means.device)
    var = torch.zeros_like(means) if variances is None else variances
    return mixture_variance(means, var, weights).clamp_min(0).sqrt()


def crf_confidence(variance: torch.Tensor, reference: Optional[float] = None,
                   floor: float = 0.05) -> torch.Tensor:
    """Turn a per-pixel variance map into the ``confidence`` of
    :class:`~fwi_core.crf.ContinuousCRF` (which scales the data term ``a_i``).

    ``confidence = ref / (ref + var)``, clamped below at ``floor``: 1 where the ensemble is
    certain (the CRF keeps the prediction), towards 0 where it is uncertain (the CRF
    follows the neighbours). ``ref`` is ``reference`` (a variance in the map's units) or,
    by default, the median variance of each sample, so its median pixel gets 0.5.

    Args:
        variance: (B,1,H,W) >= 0.
        reference: the variance at which confidence is 0.5.
        floor: lowest confidence (> 0 keeps the CRF's MAP unique).

    Returns:
        (B,1,H,W) confidence in [floor, 1].
    """
    if variance.dim() != 4:
        raise ValueError(f"crf_confidence: expected a (B,1,H,W) variance map, got {tuple(variance.shape)}")
    if (variance < 0).any():
        raise ValueError("crf_confidence: variance must be >= 0")
    if not 0.0 < floor <= 1.0:
        raise ValueError(f"crf_confidence: floor must be in (0, 1], got {floor}")
    if reference is None:
        ref = variance.flatten(1).median(1).values.clamp_min(1e-12).view(-1, 1, 1, 1)
    else:
        if reference <= 0:
            raise ValueError(f"crf_confidence: reference must be > 0, got {reference}")
        ref = torch.as_tensor(reference, dtype=variance.dtype, device=variance.device)
    return (ref / (ref + variance)).clamp(min=floor, max=1.0)
