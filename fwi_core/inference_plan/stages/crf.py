"""The ``crf`` stage: the tuned continuous CRF on the current prediction."""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from ...ensemble.uncertainty import crf_confidence
from .base import Stage
from .registry import register_stage

__all__ = ["CRFStage"]


class CRFStage(Stage):
    """The continuous CRF (:class:`~fwi_core.crf.ContinuousCRF`, tuned on validation by
    the train kernel) on the current prediction; cheap, so producers that run after it
    apply it again. ``use_confidence``: weigh its data term by the MC-dropout confidence
    (:func:`fwi_core.ensemble.crf_confidence`) where MC dropout ran."""

    name = kind = "crf"
    default_gain = 0.2
    needs_seismic = False
    reapply = True

    #: Until measured, a CRF pass is assumed to cost this fraction of the cheapest member's
    #: forward pass per file (10 Jacobi iterations over a 5x5 window are tens of MFLOP per
    #: map, a network's forward pass several GFLOP).
    COST_FACTOR = 0.05

    def __init__(self, crf: Optional[torch.nn.Module], use_confidence: bool = False):
        self.crf = crf
        self.use_confidence = use_confidence

    def unavailable(self, ctx):
        return None if self.crf is not None else "no tuned CRF (crf.json beside the checkpoints)"

    def estimate(self, ctx, before):
        costs = [c for c in ctx.member_cost.values() if c > 0]
        return self.COST_FACTOR * min(costs) if costs else None

    @torch.no_grad()
    def transform(self, pred, batch):
        conf = None
        if self.use_confidence:
            std = batch.std
            if std is not None:
                conf = crf_confidence(std ** 2)
        return self.crf(pred.float(), confidence=conf)

    def run(self, batch):
        return self.transform(batch.pred, batch)

    @classmethod
    def from_resources(cls, resources: Dict[str, Any]) -> "CRFStage":
        return cls(resources.get("crf"), use_confidence=bool(resources.get("crf_confidence", False)))


register_stage("crf", CRFStage.from_resources)
