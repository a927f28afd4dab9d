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
  planned when the stages it would crowd out are worth more).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from .deadline import Deadline
from .gains import StageGains
from .progress import RunState
from .stages import RunContext, Stage

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

    def gain(self, stage: Stage) -> float:
        return float(self.gains.gain(stage))

    def record(self, stage: Stage) -> Dict[str, Any]:
        """The stage's record in the run summary (created on first use)."""
        return self.state.records.setdefault(stage.name, {
            "name": stage.name, "kind": stage.kind, "status": "not run", "files": 0, "done": 0, "seconds": 0.0,
            "files_per_s": None, "expected_gain": self.gain(stage), "gain_source": self.gains.source_of(stage),
            "note": ""})

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
        not timed before the pass) or the reading of the files (when it was)."""
        rec = self.state.records[first.name]
        if rec.get("measured") is not None:
            member = getattr(first, "member", None)
            probe = self.ctx.member_cost.get(member)
            if member is not None and probe is None:
                self.ctx.member_cost[member] = rec["measured"]
            elif probe is not None:
                self.ctx.io_cost = max(0.0, rec["measured"] - probe)

    # ----------------------------------------------------------------------- choice
    def candidates(self) -> List[Stage]:
        """Stages that may still run (marks the others skipped, with why)."""
        out = []
        for s in self.stages:
            rec = self.record(s)
            if s.name in self.ctx.executed or rec["status"] == "skipped":
                continue
            why = s.unavailable(self.ctx)
            if why:
                rec.update(status="skipped", note=why)
                continue
            if self.select and self.gain(s) <= 0:
                rec.update(status="skipped", note=f"expected gain {self.gain(s):.3g} <= 0 ({rec['gain_source']})")
                continue
            out.append(s)
        return out

    def plan_time(self, selection: Sequence[Stage]) -> Optional[float]:
        """Projected seconds to run ``selection`` (priority order) over every file."""
        total, before = 0.0, []
        for s in selection:
            c = self.per_file(s, before)
            if c is None:
                return None
            total += c * self.n + self.costs.finish(0)
            before.append(s)
        return total

    def choose(self, pool: Sequence[Stage], seconds: float) -> List[Stage]:
        """The subset of ``pool`` to run in ``seconds``: greedy by gain per second of
        projected time (ties: priority order); returned in priority order."""
        prio = {s.name: i for i, s in enumerate(self.stages)}
        if not self.select or math.isinf(seconds):
            return sorted(pool, key=lambda s: prio[s.name])
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
                return sorted(chosen, key=lambda t: prio[t.name])
            chosen.append(best)
            base = best_total

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
            after = self.choose(others, usable - rows * per_file)
            keep_going = self.gain(stage) * rows / self.n + sum(self.gain(s) for s in after)
        else:
            keep_going = self.gain(stage) * max(0.0, usable / per_file) / self.n
        alternative = self.choose(others, usable)
        return sum(self.gain(s) for s in alternative) > keep_going
