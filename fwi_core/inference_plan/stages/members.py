"""The ``members`` stages: one member's prediction, combined with the members so far."""
from __future__ import annotations

import torch

from ...data.augment import hflip
from .base import Stage, member_array

__all__ = ["MemberStage"]


class MemberStage(Stage):
    """Predict one member (with the flip when the flip stage already ran) and combine it
    with the members stored so far."""

    kind = "member"
    default_gain = 1.0
    producer = True
    starts = True

    def __init__(self, member: str):
        self.member = member
        self.name = f"member:{member}"

    def estimate(self, ctx, before):
        c = ctx.member_cost.get(self.member)
        if c is None:
            return None
        flips = 2.0 if any(s.kind == "flip" for s in before) or ctx.has_run("flip", self.name) else 1.0
        return c * flips + ctx.io_cost

    def disk_bytes(self, ctx, before=()):
        flip = any(s.kind == "flip" for s in before) or ctx.has_run("flip", self.name)
        return ctx.map_bytes() * (2 if flip else 1)

    def run(self, batch):
        ens, x = batch.ctx.ensemble, batch.x
        batch.write(member_array(self.member), ens.predict_member(self.member, x).float())
        if batch.ctx.has_run("flip", before=self.name):
            pf = torch.flip(ens.predict_member(self.member, hflip(x)), (-1,))
            batch.write(member_array(self.member, "flip"), pf.float())
        return batch.ctx.base_prediction(batch)
