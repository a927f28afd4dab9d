"""What to run next: the planner's decisions, apart from running anything.

- which stages can still run (:meth:`Policy.candidates`: not run, available, a positive
  expected gain);
- which of them fit in the time left (:meth:`Policy.choose`: greedy by expected gain per
  second of projected time, ties in priority order); running out of time for everything,
  the stages with the lowest gain per second are dropped first;
- the projections behind that: seconds per file of a stage (measured on this run, else
  its own estimate, else the time of one file, :meth:`Policy.should_probe`), the cost of
  ending a stage (copying unreached rows, writing the CSV: :class:`Costs`), the cost of
  the next batch;
- re-planning while a stage runs (:meth:`Policy.should_abandon`: stop a stage slower than
  planned when the stages it would crowd out are worth more);
- partial stages: a ranked stage (physics refinement) whose pass over all its candidate
  samples does not fit still runs, on the samples with the highest expected gain, with the
  time the full stages leave (:meth:`Policy.choose` keeps the stages chosen after it in
  ``reserve``); at most one stage is partial in a plan, the one with the best gain per
  second.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from .deadline import Deadline
from .gains import StageGains
from .progress import RunState
from .ranking import screen_count
from .stages import RunContext, Stage
from .store import folder_bytes

__all__ = ["Policy", "Costs", "measured", "PROBE_MIN_FRACTION"]

#: A stage without a cost estimate is timed on one file only while at least this fraction
#: of the time left at the start of the run remains.
PROBE_MIN_FRACTION = 0.1


@dataclass
class Costs:
    """Seconds per file of a run's bookkeeping, measured as it goes.

    Attributes:
        n: files of the run.
        writes_csv: the run writes a CSV.
        csv: seconds per file to write the CSV.
        copy: seconds per file to copy a stored map.
        probe: stage name -> seconds per file, timed on one file (stages without estimate).
    """

    n: int
    writes_csv: bool
    csv: float = 0.0
    copy: float = 0.0
    probe: Dict[str, float] = field(default_factory=dict)

    def finish(self, copy_rows: int) -> float:
        """Seconds to end a stage: copy ``copy_rows`` unreached rows, write the CSV."""
        csv = self.csv * self.n if self.writes_csv else 0.0
        return csv + self.copy * copy_rows


def measured(times: Sequence[float]) -> float:
    """Seconds per file from per-batch timings (the first batch, often a warm-up, is left
    out once there are others)."""
    t = list(times[1:]) if len(times) > 1 else list(times)
    return float(np.mean(t[-20:]))


class Policy:
    """The planner's decisions over one run (see the module doc).

    Args:
        stages: the run's stages in priority order.
        ctx: the run as stages see it (what ran, member costs).
        state: records (measured costs, statuses) of the run.
        gains: the gains table.
        deadline: the run's deadline.
        costs: the bookkeeping costs.
        margin: safety factor on measured costs.
        select: False: every available stage runs, regardless of gains and time.
        budget: seconds the deadline left at the start of the run (None: no deadline).
    """

    def __init__(self, stages: Sequence[Stage], ctx: RunContext, state: RunState, gains: StageGains,
                 deadline: Deadline, costs: Costs, margin: float, select: bool, budget: Optional[float]):
        self.stages, self.ctx, self.state, self.gains = list(stages), ctx, state, gains
        self.deadline, self.costs, self.margin, self.select, self.budget = deadline, costs, margin, select, budget
        self.n = costs.n
        #: stage name -> seconds the plan keeps for the stages chosen after it (its share ends there)
        self.reserve: Dict[str, float] = {}
        #: bytes the state folder may hold (0: not checked)
        self.disk_limit = 0
        self._units: Dict[str, int] = {}

    def gain(self, stage: Stage) -> float:
        return float(self.gains.gain(stage))

    def record(self, stage: Stage) -> Dict[str, Any]:
        """The stage's record in the run summary (created on first use)."""
        return self.state.records.setdefault(stage.name, {
            "name": stage.name, "kind": stage.kind, "status": "not run", "files": 0, "done": 0, "seconds": 0.0,
            "files_per_s": None, "expected_gain": self.gain(stage), "gain_source": self.gains.source_of(stage),
            "note": "", "samples": 0})

    # ----------------------------------------------------------------------- ranked stages
    def units(self, stage: Stage) -> int:
        """Files a full pass of the stage covers: every file, or (ranked stages) its
        candidate samples not yet done (counted once per re-plan round)."""
        if not getattr(stage, "ranked", False):
            return self.n
        if stage.name not in self._units:
            rec = self.state.records.get(stage.name, {})
            if rec.get("ranked"):
                left = int(rec["candidates"]) - int(rec.get("done", 0))
            else:
                left = len(stage.candidates(self.ctx, self.gains))
            self._units[stage.name] = max(0, left)
        return self._units[stage.name]

    def full_cost(self, stage: Stage, before: Sequence[Stage]) -> Optional[float]:
        """Projected seconds of the stage's whole pass (its units, ending it included)."""
        c = self.per_file(stage, before)
        if c is None:
            return None
        if getattr(stage, "ranked", False):
            k = self.units(stage)
            # a ranked stage copies the current prediction once, then rewrites the CSV
            return c * k + self.costs.copy * self.n * (0 if self.state.records.get(stage.name, {}).get("copied")
                                                      else 1) + self.costs.finish(0)
        return c * self.n + self.costs.finish(0)

    def share_left(self, stage: Stage) -> float:
        """Seconds the running ranked stage may still spend: the time left minus what the
        plan keeps for the stages after it, minus finishing (writing the CSV)."""
        rec = self.state.records.get(stage.name, {})
        keep = rec.get("reserve", self.reserve.get(stage.name, 0.0))
        return self.deadline.remaining() - keep - self.costs.finish(0) * self.margin

    def screen_count(self, stage: Stage, candidates: int) -> int:
        """How many top candidates of a ranked stage get their misfit computed
        (:func:`~fwi_core.inference_plan.ranking.screen_count`)."""
        per = self.per_file(stage, [])
        if per is None or not self.select:
            return 0
        screen = stage.screen_cost(self.ctx) if hasattr(stage, "screen_cost") else None
        share = self.share_left(stage) / self.margin
        return screen_count(candidates, share, per, screen, self.ctx.batch_size)

    # ----------------------------------------------------------------------- costs
    def per_file(self, stage: Stage, before: Sequence[Stage]) -> Optional[float]:
        """Seconds per file of ``stage``: measured, else its estimate, else its probe."""
        rec = self.state.records.get(stage.name)
        if rec and rec.get("measured"):
            return rec["measured"]
        est = stage.estimate(self.ctx, before)
        if est is not None:
            return float(est)
        return self.costs.probe.get(stage.name)

    def next_batch(self, times: Sequence[float], stage: Stage, files: int) -> float:
        """Projected seconds of the stage's next batch of ``files`` files."""
        if times:
            return max(times[-1], float(np.mean(times[-5:]))) * files
        c = self.per_file(stage, [])
        return (c or 0.0) * files

    def should_probe(self, stage: Stage) -> bool:
        """Time a stage that has no estimate on one file, if at least
        ``PROBE_MIN_FRACTION`` of the starting time is left (the one step taken without a
        measured or estimated cost)?"""
        if stage.estimate(self.ctx, []) is not None or stage.name in self.costs.probe:
            return False
        left = self.deadline.remaining() - self.costs.finish(0) * self.margin
        return not (self.budget is not None and left < PROBE_MIN_FRACTION * self.budget)

    def after_first_pass(self, first: Stage) -> None:
        """Split the first pass's measured cost into the member's forward pass (when it was
        not timed before the pass) or the reading of the files (when it was); a first stage
        without a member (``prior``) costs the reading of the files."""
        rec = self.state.records[first.name]
        if rec.get("measured") is not None:
            member = getattr(first, "member", None)
            probe = self.ctx.member_cost.get(member)
            if member is not None and probe is None:
                self.ctx.member_cost[member] = rec["measured"]
            elif probe is not None:
                self.ctx.io_cost = max(0.0, rec["measured"] - probe)
            elif member is None:
                self.ctx.io_cost = rec["measured"]

    # ----------------------------------------------------------------------- choice
    def candidates(self) -> List[Stage]:
        """Stages that may still run (marks the others skipped, with why)."""
        out = []
        self._units = {}
        for s in self.stages:
            rec = self.record(s)
            if s.name in self.ctx.executed or rec["status"] == "skipped":
                continue
            why = s.unavailable(self.ctx)
            if why:
                rec.update(status="skipped", note=why)
                continue
            if self.disk_limit and folder_bytes(self.ctx.store.folder) + s.disk_bytes(self.ctx) > self.disk_limit:
                rec.update(status="skipped", note=f"its arrays ({s.disk_bytes(self.ctx) / 1e9:.2f} GB) would take the "
                           f"state folder over its {self.disk_limit / 1e9:.2f} GB limit")
                continue
            if self.select and self.gain(s) <= 0:
                rec.update(status="skipped", note=f"expected gain {self.gain(s):.3g} <= 0 ({rec['gain_source']})")
                continue
            if getattr(s, "ranked", False) and self.units(s) == 0:
                if not rec.get("ranked"):
                    gains = s.kind_gains(self.gains)
                    harmful = [k for k, g in gains.items() if g <= 0]
                    rec.update(status="skipped", note="no samples to refine: none routed to "
                               f"{', '.join(k for k in s.kinds if k not in harmful) or 'a kind it may refine'}"
                               + (f" (kinds measured harmful: {', '.join(harmful)})" if harmful else ""))
                continue
            out.append(s)
        return out

    def plan_time(self, selection: Sequence[Stage]) -> Optional[float]:
        """Projected seconds to run ``selection`` (priority order) completely."""
        total, before = 0.0, []
        for s in selection:
            c = self.full_cost(s, before)
            if c is None:
                return None
            total += c
            before.append(s)
        return total

    def choose(self, pool: Sequence[Stage], seconds: float, commit: bool = True) -> List[Stage]:
        """The subset of ``pool`` to run in ``seconds``: greedy by gain per second of
        projected time (ties: priority order), then the ranked stage with the best gain
        per second that does not fit whole gets what is left (a partial pass); returned
        in priority order. ``commit`` keeps what each stage must leave to the stages
        chosen after it (:attr:`reserve`)."""
        chosen, partial = self._choose(pool, seconds)
        if commit and self.select:
            self.reserve = {s.name: self.plan_time([t for t in chosen[i + 1:] if t is not partial]) or 0.0
                            for i, s in enumerate(chosen)}
        elif commit and math.isfinite(seconds):
            # measuring (every stage runs): the ranked stages split the time left equally
            ranked = [s for s in chosen if getattr(s, "ranked", False)]
            self.reserve = {s.name: seconds * (len(ranked) - 1 - i) / len(ranked) for i, s in enumerate(ranked)}
        return chosen

    def _choose(self, pool: Sequence[Stage], seconds: float):
        prio = {s.name: i for i, s in enumerate(self.stages)}
        if not self.select or math.isinf(seconds):
            return sorted(pool, key=lambda s: prio[s.name]), None
        chosen: List[Stage] = []
        base = 0.0
        while True:
            best, best_rate, best_total = None, -math.inf, 0.0
            for s in sorted(pool, key=lambda s: prio[s.name]):
                if s in chosen:
                    continue
                sel = sorted(chosen + [s], key=lambda t: prio[t.name])
                total = self.plan_time(sel)
                if total is None or total > seconds:
                    continue
                rate = self.gain(s) / max(total - base, 1e-9)
                if rate > best_rate:
                    best, best_rate, best_total = s, rate, total
            if best is None:
                break
            chosen.append(best)
            base = best_total
        partial = self._partial([s for s in pool if s not in chosen], seconds - base)
        if partial is not None:
            chosen.append(partial)
        return sorted(chosen, key=lambda t: prio[t.name]), partial

    def _partial(self, rest: Sequence[Stage], left: float) -> Optional[Stage]:
        """The ranked stage that gets ``left`` seconds for a partial pass (best gain per
        second; it must fit at least one batch), or None."""
        best, best_rate = None, -math.inf
        for s in rest:
            if not getattr(s, "ranked", False):
                continue
            per, full = self.per_file(s, []), self.full_cost(s, [])
            if per is None or full is None or full <= 0:
                continue
            one_batch = (per * min(self.ctx.batch_size, max(1, self.units(s))) + self.costs.copy * self.n
                         + self.costs.finish(0)) * self.margin
            if left < one_batch:
                continue
            rate = self.gain(s) / full
            if rate > best_rate:
                best, best_rate = s, rate
        return best

    def plan_gain(self, selection: Sequence[Stage], seconds: float) -> float:
        """Expected gain of running ``selection`` in ``seconds`` (a partial stage counts
        for the fraction of its candidates the time left to it covers)."""
        full = [s for s in selection if self.plan_time([s]) is not None]
        total = self.plan_time(full) or 0.0
        gain = 0.0
        for s in selection:
            c = self.plan_time([s])
            if c is None:
                continue
            if getattr(s, "ranked", False) and total > seconds:
                share = max(0.0, seconds - (total - c))
                gain += self.gain(s) * min(1.0, share / max(c, 1e-9))
            else:
                gain += self.gain(s)
        return gain

    def skip_unaffordable(self, pool: Sequence[Stage]) -> None:
        """Mark the stages that no longer fit skipped, saying what they need."""
        for s in pool:
            rec = self.record(s)
            t = self.plan_time([s])
            rec.update(status="skipped", note="no cost estimate and too little time to time it"
                       if t is None else
                       f"needs about {t:.0f} s, {max(0.0, self.deadline.remaining()):.0f} s left")

    def should_abandon(self, stage: Stage, done: int, times: Sequence[float]) -> bool:
        """Is it worth more to stop the running stage now (keeping the files it improved)
        and give its remaining time to other stages? Compares the gain still to come from
        continuing it (and from the stages that fit after it) with the gain of the stages
        that fit if it stops now."""
        if len(times) < 2:
            return False                       # one batch is too noisy a measurement
        per_file = measured(times)
        rows = self.n - done
        others = [s for s in self.candidates() if s is not stage]
        if not others:
            return False
        # seconds usable under the same margin as the per-batch check
        usable = (self.deadline.remaining() - self.costs.finish(rows) * self.margin) / self.margin
        if rows * per_file <= usable:
            after = self.choose(others, usable - rows * per_file, commit=False)
            keep_going = self.gain(stage) * rows / self.n + self.plan_gain(after, usable - rows * per_file)
        else:
            keep_going = self.gain(stage) * max(0.0, usable / per_file) / self.n
        alternative = self.choose(others, usable, commit=False)
        return self.plan_gain(alternative, usable) > keep_going
