"""Running a ranked stage (physics refinement): its candidates in order of expected gain,
as many as its share of the time allows.

1. **Rank** (once; persisted, so a resumed run continues the same order): the stage's
   candidate rows (:meth:`~fwi_core.inference_plan.stages.RefineStage.candidates`) by
   expected gain from their routing and the member disagreement
   (:mod:`~fwi_core.inference_plan.ranking`).
2. **Screen**: when the share cannot cover every candidate, the data misfit of the
   current prediction is computed for the top of that ranking (a forward simulation each,
   end shots) and those rows are ranked again with it.
3. **Run**: the current prediction is copied to the output buffer once, then the stage
   runs batches of rows in rank order, writing only those rows. A batch has the run's batch
   size, or fewer rows when only fewer fit in the share (the time left minus what the plan
   keeps for the stages chosen after it, minus finishing; each row costing the measured
   seconds per sample times the margin); the stage stops when not one more fits. The cost
   is re-measured on every batch and the coverage re-projected (logged after the second).
   Each batch's size is committed before it runs, so a resumed run repeats it. Where the time
   is limited, the first batch is a single sample (the estimate is checked before a whole
   batch is bet on it), and each batch gets the share left as a wall-clock limit (a safety
   net against an estimate far off: the stage stops its optimisation there).

Every batch's rows are written before the progress that describes them is committed, so
a kill at any point resumes to the same bytes.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from ..data.normalize import VEL_MAX, VEL_MIN
from .policy import measured
from .ranking import rank_rows
from .source import row_batches
from .stages import MAP, BatchState, Stage, member_array

__all__ = ["run_ranked", "disagreement", "RANK_ARRAY", "MISFIT_ARRAY", "GAIN_ARRAY"]

#: stored per ranked stage: the rank order (rows), each row's misfit and expected gain
RANK_ARRAY, MISFIT_ARRAY, GAIN_ARRAY = "rank={}", "misfit={}", "gain={}"


def disagreement(ctx, rows: np.ndarray, chunk: int = 2048) -> Optional[np.ndarray]:
    """Per row, how much the ensemble disagrees (m/s, mean over the map): the MC-dropout
    spread where it covers every row, else the spread of the stored member predictions
    (at least two members), else None."""
    rows = np.asarray(rows, dtype=np.int64)
    if not len(rows):
        return None
    if ctx.avail.get("mc_std", 0) > int(rows.max()):
        arr = ctx.store.array("mc_std")
        return np.concatenate([arr.read_rows(rows[s:s + chunk]).astype(np.float64).mean((1, 2))
                               for s in range(0, len(rows), chunk)])
    members = [m for m in ctx.ensemble.member_names if ctx.avail.get(member_array(m), 0) > int(rows.max())]
    if len(members) < 2:
        return None
    out = []
    for s in range(0, len(rows), chunk):
        r = rows[s:s + chunk]
        stack = np.stack([ctx.store.array(member_array(m)).read_rows(r).astype(np.float64) for m in members])
        out.append(stack.std(0).mean((1, 2)) * (VEL_MAX - VEL_MIN) / 2)
    return np.concatenate(out)


def _order(runner, stage: Stage) -> np.ndarray:
    rec = runner.policy.record(stage)
    return runner.store.array(RANK_ARRAY.format(stage.name), (), "int64").read(0, int(rec["candidates"]))


def _rank(runner, stage: Stage, rec: Dict[str, Any]) -> None:
    """Step 1: rank the candidates, decide how many to screen; persisted and committed."""
    ctx, gains = runner.ctx, runner.policy.gains
    rows = stage.candidates(ctx, gains)
    spread = disagreement(ctx, rows)
    scores = stage.cheap_scores(ctx, gains, rows, spread)
    order = rank_rows(rows, scores)
    k = len(order)
    full = np.full(runner.n, -1, dtype=np.int64)
    full[:k] = order
    runner.store.array(RANK_ARRAY.format(stage.name), (), "int64").write(0, full)
    g = np.full(runner.n, np.nan, dtype=np.float32)
    g[rows] = scores
    runner.store.array(GAIN_ARRAY.format(stage.name), (), "float32").write(0, g)
    screen = runner.policy.screen_count(stage, k)
    rec.update(ranked=True, candidates=k, screen=screen, screened=0, final=screen == 0, copied=False,
               done=0, files=0, samples=0)
    runner.progress.commit(running=stage.name)
    runner.log(f"[{stage.name}] {k} candidate samples ranked by expected gain"
               + (f"; the misfit of the top {screen} ranks them again" if screen else ""))


def _batch(runner, stage: Stage, rows: np.ndarray, raw) -> BatchState:
    ok = raw.ok.numpy() & runner.ctx.row_ok(0, runner.n)[rows]
    rows = rows[ok]
    pred = torch.from_numpy(runner.buf(runner.state.buffer).read_rows(rows))[:, None]
    seismic = raw.seismic[torch.as_tensor(np.flatnonzero(ok))]
    settled = runner.settled_rows(rows)
    return BatchState(int(rows.min()) if len(rows) else 0, int(rows.max()) + 1 if len(rows) else 0, rows,
                      [runner.ids[r] for r in rows], pred, seismic, None, runner.ctx, False, settled,
                      runner.code(stage), True, stage.kinds_of(runner.ctx, rows))


def _screen(runner, stage: Stage, rec: Dict[str, Any]) -> None:
    """Step 2: the misfit of the top rows, then their order by the full expected gain."""
    order = _order(runner, stage)
    mis = runner.store.array(MISFIT_ARRAY.format(stage.name), (), "float32")
    b = runner.batch_size
    todo = order[int(rec["screened"]):int(rec["screen"])]
    chunks = [todo[i:i + b] for i in range(0, len(todo), b)]
    per = stage.screen_cost(runner.ctx) if hasattr(stage, "screen_cost") else 0.0
    stream = row_batches(runner.source, [list(c) for c in chunks], runner.num_workers)
    for rows in chunks:
        if runner.policy.share_left(stage) < per * len(rows) * runner.margin:
            rec["screen"] = int(rec["screened"])         # no time to screen more: rank what was screened
            break
        t0 = runner.clock()
        raw = next(stream)
        batch = _batch(runner, stage, np.asarray(rows), raw)
        values = np.full(len(rows), np.nan, dtype=np.float32)
        if len(batch):
            values[np.isin(rows, batch.rows)] = stage.misfit(batch)
        mis.write_rows(rows, values)
        rec["screened"] = int(rec["screened"]) + len(rows)
        rec["seconds"] = float(rec["seconds"]) + runner.clock() - t0
        runner.progress.commit(running=stage.name)
    top = order[:int(rec["screened"])].copy()
    if len(top):
        spread = disagreement(runner.ctx, top)
        scores = stage.final_scores(runner.ctx, runner.policy.gains, top, spread, mis.read_rows(top))
        order[:len(top)] = rank_rows(top, scores)
        full = np.full(runner.n, -1, dtype=np.int64)
        full[:len(order)] = order
        runner.store.array(RANK_ARRAY.format(stage.name), (), "int64").write(0, full)
        g = runner.store.array(GAIN_ARRAY.format(stage.name), (), "float32")
        g.write_rows(top, scores.astype(np.float32))
    rec["final"] = True
    runner.progress.commit(running=stage.name)


def run_ranked(runner, stage: Stage) -> None:
    """Run a ranked stage (see the module doc) and end it (buffers, CSV, record)."""
    ctx, rec = runner.ctx, runner.policy.record(stage)
    if stage.name not in ctx.executed:
        ctx.executed.append(stage.name)
    rec["status"] = "running"
    rec.setdefault("reserve", runner.policy.reserve.get(stage.name, 0.0))   # kept for the stages after it
    stage.prepare(ctx)
    runner.progress.commit(running=stage.name)
    if not rec.get("ranked"):
        _rank(runner, stage, rec)
    if not rec.get("final"):
        _screen(runner, stage, rec)
    order = _order(runner, stage)
    out_buf = runner.buf(1 - runner.state.buffer)
    times: List[float] = []
    reason = ""
    estimate = runner.policy.per_file(stage, [])
    while int(rec["done"]) < len(order):
        done = int(rec["done"])
        size = int(rec.get("next") or 0)
        if not size:            # decided (and committed) before the batch runs, so a resumed run repeats it
            size = _next_size(runner, stage, times, len(order) - done)
            if size < 1:
                reason = "its share of the time was spent"
                break
            rec["next"] = size
            runner.progress.commit(running=stage.name)
        rows = order[done:done + size]
        if not rec.get("copied"):          # the output starts as the current prediction
            out_buf.copy_from(runner.buf(runner.state.buffer), 0, runner.n)
            rec["copied"] = True
            runner.progress.commit(running=stage.name)
        t0 = runner.clock()
        raw = next(row_batches(runner.source, [list(rows)], runner.num_workers))
        batch = _batch(runner, stage, np.asarray(rows), raw)
        room = runner.policy.share_left(stage) + (runner.clock() - t0)
        batch.time_limit = room / runner.margin if math.isfinite(room) else None   # a safety net only
        if len(batch):
            with torch.no_grad():
                out = stage.run(batch)
            out = runner.check_output(out, len(batch), stage.name)
            finite = torch.isfinite(out.flatten(1)).all(1).numpy()
            take = finite & ~batch.settled_by_others()
            out_buf.write_rows(batch.rows[take], out[torch.as_tensor(np.flatnonzero(take))]
                               .clamp(VEL_MIN, VEL_MAX)[:, 0].numpy())
            runner.store_settled(batch)
            rec["samples"] = int(rec.get("samples", 0)) + int(
                batch.settle_mask.sum() if batch.settle_mask is not None else take.sum())
        dt = runner.clock() - t0
        times.append(dt / max(1, len(rows)))
        rec["done"] = done + len(rows)
        rec["next"] = 0
        rec["files"] = rec["done"]
        rec["seconds"] = float(rec["seconds"]) + dt
        rec["measured"] = measured(times)
        runner.progress.commit(running=stage.name)
        share = runner.policy.share_left(stage)
        if len(times) == 2 and estimate and math.isfinite(share):
            left = len(order) - int(rec["done"])
            fit = int(max(0.0, share) / runner.margin / max(rec["measured"], 1e-9))
            runner.log(f"[{stage.name}] measured {rec['measured']:.2f} s per sample (estimated {estimate:.2f}); "
                       f"about {min(left, fit)} of the {left} candidates left fit in its share")
    _end(runner, stage, rec, reason)


def _next_size(runner, stage: Stage, times: List[float], left: int) -> int:
    """Rows of the next batch: the batch size, fewer when only fewer fit in the share (the
    cost per sample measured so far, else estimated, times the margin); 0 when none fits."""
    per = runner.policy.next_batch(times, stage, 1)
    room = runner.policy.share_left(stage)
    if not math.isfinite(room):
        return min(runner.batch_size, left)
    fit = int(room / max(per * runner.margin, 1e-12))
    if not times:           # the first batch is one sample: the estimate is checked before a whole batch is bet on it
        fit = min(fit, 1)
    return max(0, min(runner.batch_size, left, fit))


def _end(runner, stage: Stage, rec: Dict[str, Any], reason: str) -> None:
    k = int(rec.get("candidates", 0))
    done = int(rec.get("done", 0))
    rec["status"] = "complete" if done >= k else ("partial" if done > 0 else "not run")
    if done < k:
        rec["note"] = f"{reason or 'stopped'}: {rec.get('samples', 0)} of {k} candidate samples refined"
    else:
        rec["note"] = f"{rec.get('samples', 0)} of {k} candidate samples refined"
    if rec.get("measured"):
        rec["files_per_s"] = 1.0 / rec["measured"] if rec["measured"] > 0 else None
    if rec.get("copied"):
        runner.swap_and_write(stage, rec)
    else:
        runner.progress.commit(running=None)
        runner.log(f"[{stage.name}] {rec['status']}: {rec['note']}; {runner.postfix()}")
