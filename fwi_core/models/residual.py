"""Stage-wise training on a frozen backbone's residual: ``residual_stage``.

A member of the ensemble with a different inductive bias (the geometric members: EGNN,
heat diffusion, SE(3) transformer, MeshCNN) is trained on what a frozen backbone gets
wrong: the stage predicts ``prior + correction`` where ``prior`` is the backbone's
prediction, so its loss against the truth is the member's loss on the residual target
``truth - prior``; the member also *sees* the prior (``forward(x, prior=...)``, the
members that declare ``accepts_prior``). For ``residual_stacker`` (``accepts_residual``) the stage
also computes the data residual ``x - normalize(simulate(prior))`` with the exact
simulator and passes it on: stacking on residuals.

Shapes: x (B, 5, 1000, 70) normalised seismic -> (B, 1, 70, 70) normalised velocity in
[-1, 1]. The correction of a generic member (its output ``t`` in [-1, 1]) is scaled per
pixel by ``min(max_correction, 1 - prior)`` upwards and ``min(max_correction, 1 + prior)``
downwards, so the output stays in [-1, 1] and differentiable; members whose class sets
``adds_prior`` (the stacker) return the corrected map themselves (capabilities: :mod:`.registry`).

The backbone is frozen: no gradients, always in eval mode (its BatchNorm statistics and
dropout do not change while the member trains), and its weights travel in the stage's
checkpoints, so ``load_model`` rebuilds the whole stage from the stage's checkpoint alone.
The engine builds a stage when ``TrainConfig.backbone_checkpoint`` is set.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
import torch.nn as nn

from .blocks import check_seismic
from .checkpoint import load_model
from .registry import create_model, model_capabilities, register_model
from .residual_stacker import bounded_correction, compute_residual

__all__ = ["ResidualStage", "residual_stage"]


class ResidualStage(nn.Module):
    """A frozen backbone plus a trainable member predicting its correction.

    Args:
        backbone: registered model name of the backbone; backbone_kwargs: its arguments.
        member: registered model name of the member; member_kwargs: its arguments.
        max_correction: largest correction in normalised units (0.5 = 750 m/s).
        residual_seismic: pass the data residual to members that accept it (costs one
            simulation of the prior per forward pass; default: when the member accepts it).
        drop_rate: passed to the member (its dropout; MC dropout of a stage samples the
            member's and the backbone's dropout layers).
    """

    def __init__(self, backbone: str = "inversionnet", backbone_kwargs: Optional[Dict[str, Any]] = None,
                 member: str = "inversionnet", member_kwargs: Optional[Dict[str, Any]] = None,
                 max_correction: float = 0.5, residual_seismic: Optional[bool] = None,
                 drop_rate: Optional[float] = None):
        super().__init__()
        member_kwargs = dict(member_kwargs or {})
        if drop_rate is not None:
            member_kwargs["drop_rate"] = drop_rate
        if backbone == "residual_stage" or member == "residual_stage":
            raise ValueError("residual_stage: backbone and member must be plain models, not stages")
        if not 0 < max_correction <= 2:
            raise ValueError(f"residual_stage: max_correction must be in (0, 2], got {max_correction}")
        self.backbone = create_model(backbone, **(backbone_kwargs or {}))
        self.member = create_model(member, **member_kwargs)
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.backbone.eval()
        self.max_correction = float(max_correction)
        caps = model_capabilities(self.member)
        self.member_takes_prior, self.member_adds_prior = caps.accepts_prior, caps.adds_prior
        accepts_residual = caps.accepts_residual
        self.residual_seismic = accepts_residual if residual_seismic is None else bool(residual_seismic)
        if self.residual_seismic and not accepts_residual:
            raise ValueError(f"residual_stage: member {member!r} does not take residual=")

    def train(self, mode: bool = True) -> "ResidualStage":
        super().train(mode)
        self.backbone.eval()   # frozen: BatchNorm statistics and dropout stay in inference mode
        return self

    def load_backbone(self, path, weights: str = "auto") -> None:
        """Load the backbone's weights from a training checkpoint of the backbone model."""
        src = load_model(path, weights=weights)
        self.backbone.load_state_dict(src.state_dict())

    @torch.no_grad()
    def prior(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's prediction (B, 1, 70, 70), normalised, without gradients."""
        return self.backbone(x).float().clamp(-1.0, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_seismic(x, type(self).__name__)
        prior = self.prior(x).to(x.dtype if x.is_floating_point() else torch.float32)   # (B, 1, 70, 70)
        kwargs = {}
        if self.member_takes_prior:
            kwargs["prior"] = prior
        if self.residual_seismic:
            kwargs["residual"] = compute_residual(x.float(), prior.float()).to(x.dtype)   # (B, 5, 1000, 70)
        out = self.member(x, **kwargs)                                               # (B, 1, 70, 70)
        if self.member_adds_prior:
            return out
        return bounded_correction(prior.float(), out.float(), self.max_correction).to(out.dtype)  # (B, 1, 70, 70)


@register_model
def residual_stage(**kwargs) -> ResidualStage:
    """A frozen backbone + a member trained on its residual (stage-wise training)."""
    return ResidualStage(**kwargs)
