"""The training loss: every term with its weight, on normalised velocity maps (B, 1, H, W).

:class:`TrainLoss` is what one optimizer step minimises (:mod:`.step` calls it on each
micro-batch; the loop never sees the terms):

- velocity L1 + ``boundary_weight`` x :func:`boundary_loss` (:func:`velocity_loss`);
- the model's auxiliary losses (``auxiliary_losses`` capability in the model registry:
  the family head's cross-entropy, the invertible UNet's latent penalty), each weighted by
  its config weight (``family_loss_weight``, ``latent_weight``; 1 for other names);
- the PDE-consistency term (``pde_weight``, ramped over ``pde_ramp_steps``): the misfit
  between the observed gathers and the simulation of the prediction
  (:func:`fwi_core.physics.misfit.pde_loss`), every ``pde_every`` steps on the first
  ``pde_samples`` samples.

Adding a loss term touches this file and ``config.py`` only: add its weight (and options)
to :class:`~fwi_core.train.config.TrainConfig` with their validation, write the term as a
method of :class:`TrainLoss` reading the :class:`Batch` fields, and add it, weighted, in
:meth:`TrainLoss.__call__` (skip it when the weight is 0). A term that needs more of the
batch than :class:`Batch` holds is more than a new term: it changes the loop's batch.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import denormalize_seismic, denormalize_velocity
from ..models.registry import model_capabilities
from ..physics.misfit import pde_loss
from .config import TrainConfig


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


@dataclass
class Batch:
    """One training batch (or micro-batch) as the loss sees it.

    Attributes:
        x: (B, 5, T, R) normalised gathers, augmented.
        y: (B, 1, H, W) normalised target maps (flipped with their gathers).
        family_idx: (B,) long, the samples' families in the model's vocabulary (models
            with per-family terms), else None.
        observed: (B, 5, T, R) the gathers *before* augmentation (with ``pde_weight``).
        flipped: (B,) bool, the samples whose gathers and map were flipped (with flips).
    """

    x: torch.Tensor
    y: torch.Tensor
    family_idx: Optional[torch.Tensor] = None
    observed: Optional[torch.Tensor] = None
    flipped: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return self.x.shape[0]

    def split(self, n: int) -> List["Batch"]:
        """``min(n, len(self))`` micro-batches (``tensor_split`` of every field; never an
        empty one, whose mean loss would be NaN); ``[self]`` for n = 1."""
        n = min(int(n), len(self))
        if n <= 1:
            return [self]
        parts = [getattr(self, f.name) for f in fields(self)]
        parts = [t.tensor_split(n) if t is not None else [None] * n for t in parts]
        return [Batch(*p) for p in zip(*parts)]


class TrainLoss:
    """The weighted sum of the loss terms of :mod:`fwi_core.train.losses` for ``model``
    (the unwrapped model, built by ``create_model``: its registry entry says which
    auxiliary losses it offers)."""

    def __init__(self, cfg: TrainConfig, model: nn.Module, device: torch.device):
        self.cfg, self.model, self.device = cfg, model, device
        self.has_auxiliary = model_capabilities(model).auxiliary_losses
        self.aux_weights = {"family": cfg.family_loss_weight, "latent": cfg.latent_weight}
        #: unweighted PDE-term values of the current step's micro-batches (see :meth:`take_pde`)
        self.pde_values: List[torch.Tensor] = []

    def __call__(self, pred: torch.Tensor, batch: Batch, step: int) -> torch.Tensor:
        """The loss of ``batch`` (a micro-batch) at optimizer step ``step``, after the
        model's forward pass on ``batch.x`` returned ``pred``."""
        loss = velocity_loss(pred, batch.y, self.cfg.boundary_weight)
        if self.has_auxiliary:
            for name, value in self.model.auxiliary_losses(batch.family_idx).items():
                loss = loss + self.aux_weights.get(name, 1.0) * value.float()
        if batch.observed is not None and step % self.cfg.pde_every == 0:
            term = self.pde_term(pred, batch.observed, batch.flipped)
            self.pde_values.append(term.detach())
            loss = loss + self.pde_weight(step) * term
        return loss

    def take_pde(self) -> Optional[torch.Tensor]:
        """The mean unweighted PDE term of the step just taken (None when the step did not
        compute it), and forget it (the engine logs it as ``pde_loss``)."""
        if not self.pde_values:
            return None
        value = torch.stack(self.pde_values).mean()
        self.pde_values.clear()
        return value

    def pde_weight(self, step: int) -> float:
        """``pde_weight``, ramped linearly over the first ``pde_ramp_steps`` steps."""
        ramp = self.cfg.pde_ramp_steps
        return self.cfg.pde_weight * (min(1.0, (step + 1) / ramp) if ramp else 1.0)

    def pde_term(self, pred: torch.Tensor, observed: torch.Tensor,
                 flipped: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The PDE-consistency term of a batch: the normalised misfit between the observed
        gathers and the exact simulation of the predicted maps (``physics.misfit.pde_loss``), on
        the first ``pde_samples`` samples, the shots ``pde_shots`` and the first ``pde_time``
        time samples; float32 physics outside autocast, differentiable through the
        simulator's adjoint.

        Args:
            pred: (B, 1, H, W) normalised predictions (of possibly flipped inputs).
            observed: (B, S, T, R) normalised gathers *before* augmentation.
            flipped: (B,) bool, the samples whose input was flipped: their predictions are
                flipped back, so they are compared with the unflipped gathers (the flip
                itself is only approximately physical).
        """
        cfg = self.cfg
        k = cfg.pde_samples or pred.shape[0]
        p = pred[:k].float()
        if flipped is not None and bool(flipped[:k].any()):
            f = flipped[:k].view(-1, 1, 1, 1)
            p = torch.where(f, torch.flip(p, (-1,)), p)
        v = denormalize_velocity(p.clamp(-1.0, 1.0))
        obs = denormalize_seismic(observed[:k].float())
        with torch.autocast(self.device.type, enabled=False):
            return pde_loss(v, obs, shots=list(cfg.pde_shots) or None, max_time=cfg.pde_time or None,
                            **cfg.pde_simulate_kwargs).float()
