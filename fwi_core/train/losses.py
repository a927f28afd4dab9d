"""Training losses on normalised velocity maps (B, 1, H, W)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def boundary_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 distance between the spatial finite-difference gradients of two maps.

    Forward differences along depth (rows) and across (columns), each averaged over its
    cells, summed: large where a predicted layer boundary is blurred or misplaced.
    """
    dz_p, dz_t = pred[..., 1:, :] - pred[..., :-1, :], target[..., 1:, :] - target[..., :-1, :]
    dx_p, dx_t = pred[..., :, 1:] - pred[..., :, :-1], target[..., :, 1:] - target[..., :, :-1]
    return F.l1_loss(dz_p, dz_t) + F.l1_loss(dx_p, dx_t)


def velocity_loss(pred: torch.Tensor, target: torch.Tensor, boundary_weight: float = 0.0) -> torch.Tensor:
    """L1 plus ``boundary_weight`` times :func:`boundary_loss`, computed in float32."""
    if pred.shape != target.shape:
        raise ValueError(f"loss: prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    pred, target = pred.float(), target.float()
    loss = F.l1_loss(pred, target)
    if boundary_weight:
        loss = loss + boundary_weight * boundary_loss(pred, target)
    return loss
