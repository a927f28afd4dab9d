"""Physics refinement as stages of budgeted inference: ``refine_layered`` and ``refine``.

Test-time FWI (:func:`fwi_core.physics.refine`) is the most expensive stage and its gain
depends on the family: on laterally flat layers a 70-value depth profile is refined
quickly and to a fraction of a m/s, on faults and Style maps it takes far more iterations
for a smaller gain (FACTS section 7). So the planner gets it as two stages, in priority
order after the network stages:

- ``refine_layered``: refines only the samples whose data say *flat layers* (the first
  shot and the mirrored last shot agree, :func:`~fwi_core.physics.refine.detect_family_kind`);
  the others pass through untouched at no cost, so this pass over every file is cheap and
  spends the budget where the expected gain per second is largest;
- ``refine``: refines the remaining samples (1-D/2-D TV or the smooth prior by kind) with
  what is left of the deadline.

Each run is deterministic for a given batch (a fixed iteration count, no wall-clock stop
inside a batch: the planner stops between batches), as resumed runs require. Options come
from the run's resources: ``refine_iters`` (L-BFGS iterations for flat / other samples,
default (60, 30)), ``refine_kwargs`` (passed to :func:`refine`).
"""
from __future__ import annotations

import time
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch

from ...physics import detect_family_kind, generate, refine, simulate
from .base import BatchState, Stage
from .registry import register_stage

__all__ = ["RefineStage"]

DEFAULT_ITERS = (60, 30)   # L-BFGS iterations: flat-layered samples, the others
DEFAULT_GAIN = 1.0         # m/s, a placeholder until stage_gains.json measures it


class RefineStage(Stage):
    """Refine the samples of the given kinds in each batch by regularised FWI.

    Args:
        name: the stage's name (``refine_layered`` or ``refine``).
        kinds: the regulariser kinds this stage refines (``"flat"``, ``"tv"``, ``"smooth"``).
        max_iter: optimiser iterations per batch call.
        default_gain: expected validation-MAE decrease (m/s) without a gains-table entry.
        refine_kwargs: passed to :func:`fwi_core.physics.refine`.
    """

    needs_seismic = True
    settles = True          # a refined sample is final: later stages (a re-plan) leave it alone

    def __init__(self, name: str, kinds: Sequence[str], max_iter: int, default_gain: float,
                 refine_kwargs: Optional[Dict[str, Any]] = None):
        self.name = self.kind = name
        self.kinds = tuple(kinds)
        self.max_iter = int(max_iter)
        self.default_gain = float(default_gain)
        self.refine_kwargs = dict(refine_kwargs or {})
        self.last_counts: Dict[str, int] = {}
        self._eval_cost: Optional[float] = None

    def estimate(self, ctx, before) -> float:
        """Seconds per file, conservatively: every file refined, ``max_iter`` L-BFGS
        iterations of 1.5 misfit evaluations each, an evaluation (forward + adjoint of one
        sample) timed once on the run's device at 100 time steps and scaled to 1000."""
        if self._eval_cost is None:
            v = torch.from_numpy(generate("FlatVel_A", 1, seed=0)).to(ctx.device).requires_grad_(True)
            obs = simulate(v.detach(), nt=100)
            best = float("inf")
            for _ in range(2):            # the first call may compile
                t = time.perf_counter()
                ((simulate(v, nt=100) - obs) ** 2).sum().backward()
                if v.device.type == "cuda":
                    torch.cuda.synchronize()
                best = min(best, time.perf_counter() - t)
            self._eval_cost = best * 10.0
        return self.max_iter * 1.5 * self._eval_cost + getattr(ctx, "io_cost", 0.0)

    def run(self, batch: BatchState) -> torch.Tensor:
        pred = batch.pred.float()
        seis = batch.seismic.float()
        kinds = detect_family_kind(pred.cpu(), seis.cpu())
        others = batch.settled_by_others()          # refined by the other refinement stage already
        pick = [i for i, k in enumerate(kinds) if k in self.kinds and not others[i]]
        self.last_counts = {k: kinds.count(k) for k in set(kinds)}
        if not pick:
            return pred
        mask = np.zeros(len(kinds), dtype=bool)
        mask[pick] = True
        batch.settle(mask)
        dev = batch.ctx.device
        idx = torch.tensor(pick, dtype=torch.long)
        out = pred.clone()
        refined = refine(pred[idx].to(dev), seis[idx].to(dev), family=[kinds[i] for i in pick],
                         max_iter=self.max_iter, **self.refine_kwargs)
        out[idx] = refined.to(out.device, out.dtype)
        return out

    @classmethod
    def layered(cls, resources: Dict[str, Any]) -> "RefineStage":
        """``refine_layered``: the flat-layered samples (``refine_iters[0]`` iterations)."""
        return cls._from_resources(resources, "refine_layered", ("flat",), 0)

    @classmethod
    def remaining(cls, resources: Dict[str, Any]) -> "RefineStage":
        """``refine``: the other samples (``refine_iters[1]`` iterations)."""
        return cls._from_resources(resources, "refine", ("tv", "smooth"), 1)

    @classmethod
    def _from_resources(cls, resources: Dict[str, Any], name: str, kinds: Sequence[str], which: int) -> "RefineStage":
        iters = resources.get("refine_iters") or DEFAULT_ITERS
        return cls(name, kinds, int(iters[which]), DEFAULT_GAIN, resources.get("refine_kwargs"))


register_stage("refine_layered", RefineStage.layered)
register_stage("refine", RefineStage.remaining)
