"""The ``mc_dropout`` stage: Monte Carlo dropout means and the ensemble's spread."""
from __future__ import annotations

from typing import Any, Dict, List

import torch

from ...data.normalize import VEL_MAX, VEL_MIN
from ...ensemble.uncertainty import mixture_variance
from ...errors import StageError
from .base import Stage, member_array
from .members import MemberStage
from .registry import register_stage

__all__ = ["MCDropoutStage"]


class MCDropoutStage(Stage):
    """Monte Carlo dropout: ``passes`` stochastic passes per stored member (with the flip
    when it ran); the members' MC means replace their predictions and the per-pixel
    standard deviation of the ensemble (the mixture of the members' MC distributions)
    is stored (``mc_std``, m/s) for the uncertainty summary. Seeded per batch, so a
    resumed run draws the same masks."""

    name = kind = "mc_dropout"
    default_gain = 0.05
    producer = True

    def __init__(self, passes: int = 8):
        if passes < 2:
            raise StageError(f"mc_dropout: need at least 2 passes, got {passes}")
        self.passes = int(passes)

    def _droppers(self, ctx) -> List[str]:
        out = []
        for m in ctx.ensemble.member_names:
            model = ctx.ensemble.members[m].model
            if any(isinstance(mod, torch.nn.modules.dropout._DropoutNd) and mod.p > 0 for mod in model.modules()):
                out.append(m)
        return out

    def unavailable(self, ctx):
        return None if self._droppers(ctx) else "no member has dropout layers"

    def disk_bytes(self, ctx, before=()):
        return ctx.map_bytes() * (len(self._droppers(ctx)) + 1)       # each dropper's MC mean, the spread

    def estimate(self, ctx, before):
        members = ctx.members_run() + [s.member for s in before if isinstance(s, MemberStage)
                                       and s.member not in ctx.members_run()]
        if any(m not in ctx.member_cost for m in members):
            return None
        flip = 2.0 if any(s.kind == "flip" for s in before) or ctx.has_run("flip", self.name) else 1.0
        drop = set(self._droppers(ctx))
        return sum(ctx.member_cost[m] * (self.passes if m in drop else 0) for m in members) * flip + ctx.io_cost

    def run(self, batch):
        ctx = batch.ctx
        ens, x = ctx.ensemble, batch.x
        flip = ctx.has_run("flip", before=self.name)
        drop = set(self._droppers(ctx))
        means, variances, names = [], [], []
        for k, m in enumerate(ens.member_names):
            have = batch.rows < ctx.avail.get(member_array(m), 0)
            if not have.all():
                continue                      # a member that ran on part of the files only
            if m in drop:
                with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
                    torch.manual_seed(_seed(ctx.seed, batch.start, k))
                    mean, var = ens.predict_member_mc(m, x, self.passes, flip)
                batch.write(member_array(m, "mc"), mean.float())
            else:
                mean, _ = ctx.member_prediction(m, batch)
                var = torch.zeros_like(mean)
            means.append(mean.float().cpu())
            variances.append(var.float().cpu())
            names.append(m)
        if names:
            stack, vstack = torch.stack(means), torch.stack(variances)
            w = ens.sample_weights(names, len(batch.rows), batch.families, x, stack.to(x.device),
                                   vstack.to(x.device)).cpu()
            std = mixture_variance(stack, vstack, w).clamp_min(0).sqrt() * (VEL_MAX - VEL_MIN) / 2
            batch.write("mc_std", std.float())
        return ctx.base_prediction(batch)

    @classmethod
    def from_resources(cls, resources: Dict[str, Any]) -> "MCDropoutStage":
        return cls(int(resources.get("mc_passes", 8)))


def _seed(seed: int, start: int, member: int) -> int:
    return (seed * 1_000_003 + start * 7_919 + member * 104_729) % (2 ** 63)


register_stage("mc_dropout", MCDropoutStage.from_resources)
