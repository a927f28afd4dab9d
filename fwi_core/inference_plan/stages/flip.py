"""The ``flip`` stage: horizontal-flip test-time augmentation of every member run so far."""
from __future__ import annotations

from typing import Any, Dict

import numpy as np
import torch

from ...data.augment import hflip
from .base import Stage, member_array
from .members import MemberStage
from .registry import register_stage

__all__ = ["FlipStage"]


class FlipStage(Stage):
    """Horizontal-flip TTA: each stored member also predicts the mirrored gathers (source
    order and receivers reversed); its prediction, mirrored back, is averaged with the
    plain one. Approximate (mirrored source 34 sits at column 35, FACTS section 3)."""

    name = kind = "flip"
    default_gain = 0.6
    producer = True

    def estimate(self, ctx, before):
        members = [m for m in ctx.members_run()] + [s.member for s in before if isinstance(s, MemberStage)
                                                     and s.member not in ctx.members_run()]
        if any(m not in ctx.member_cost for m in members):
            return None
        return sum(ctx.member_cost[m] for m in members) + ctx.io_cost

    def unavailable(self, ctx):
        return None

    def disk_bytes(self, ctx, before=()):
        members = set(ctx.members_run()) | {s.member for s in before if isinstance(s, MemberStage)}
        return ctx.map_bytes() * len(members)

    def run(self, batch):
        ctx = batch.ctx
        xf = hflip(batch.x)
        for m in ctx.ensemble.member_names:
            if ctx.avail.get(member_array(m, "flip"), 0) >= batch.stop:
                continue                      # members run after this stage predict their own flip
            have = batch.rows < ctx.avail.get(member_array(m), 0)
            if not have.any():
                continue
            it = torch.as_tensor(np.flatnonzero(have), device=xf.device)
            pf = torch.flip(ctx.ensemble.predict_member(m, xf[it]), (-1,))
            batch.write(member_array(m, "flip"), pf.float(), mask=have)
        return ctx.base_prediction(batch)

    @classmethod
    def from_resources(cls, resources: Dict[str, Any]) -> "FlipStage":
        return cls()


register_stage("flip", FlipStage.from_resources)
