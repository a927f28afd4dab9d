"""The invertible UNet's consistency check as the planner's last stage: ``consistency``.

The plan's "after CRF, run inverse UNet consistency": with a
:class:`~fwi_core.inverse_consistency.ConsistencyFlagger` (an ``invertible_unet`` checkpoint and
the threshold the train kernel learned on validation, ``consistency.json``), the stage
scores every final map (after the ensemble, the CRF and refinement) against the latent
of its gathers and flags those above the threshold. It does not change predictions: the
flags are diagnostics (``flagged``: oid -> score; the scores are also kept per file in the
run's store as ``consistency``), for a person to inspect or for a later pass to
re-predict. The in-memory list covers the batches this process ran (a resumed run lists
the flags of its own batches). The flags always describe the maps of the CSV: when the
planner runs a stage that changes maps after this one (a re-plan), the flags are discarded
and the stage may run again (``observes``).

Register the flagger as the run's resource ``consistency`` (the infer kernel does when
``consistency.json`` lies beside an ``invertible_unet`` checkpoint).
"""
from __future__ import annotations

from typing import Any, Dict

import torch

from .base import BatchState, Stage
from .registry import register_stage

__all__ = ["ConsistencyStage"]


class ConsistencyStage(Stage):
    """Flag final maps that the invertible UNet finds inconsistent with their gathers."""

    name = kind = "consistency"
    default_gain = 0.01      # diagnostics: cheap, run when there is time left
    needs_seismic = True
    observes = True          # its flags describe the final maps: a later change discards them

    def __init__(self, flagger):
        self.flagger = flagger
        # the flagger's own dict, so whoever holds the flagger (the infer kernel) sees the flags
        self.flagged: Dict[str, float] = flagger.flagged if flagger is not None else {}
        self.scored = 0

    def unavailable(self, ctx):
        return None if self.flagger is not None else "no consistency flagger (consistency.json + invertible_unet)"

    def run(self, batch: BatchState) -> torch.Tensor:
        scores = self.flagger.score(batch.x, batch.pred)
        batch.write("consistency", torch.as_tensor(scores, dtype=torch.float32), item_shape=())
        for oid, s in zip(batch.ids, scores):
            if s > self.flagger.threshold:
                self.flagged[oid] = float(s)
        self.scored += len(batch.ids)
        return batch.pred

    def reset(self, ctx) -> None:
        """A later stage changed the maps: the flags and scores no longer describe them."""
        self.flagged.clear()
        self.scored = 0
        ctx.avail.pop("consistency", None)

    def identity(self):
        f = self.flagger
        return {**super().identity(), "threshold": None if f is None else round(float(f.threshold), 10)}

    @classmethod
    def from_resources(cls, resources: Dict[str, Any]) -> "ConsistencyStage":
        return cls(resources.get("consistency"))


register_stage("consistency", ConsistencyStage.from_resources)
