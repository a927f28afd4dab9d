"""Running a stage over the files: batches, fallbacks, the CSV.

:class:`StageRunner` runs one stage at a time over fixed batches of the source (so a
resumed run sees the same batches), reading the current prediction from one of two
disk-backed buffers and writing the stage's output to the other; before each batch it
asks the :class:`~fwi_core.inference_plan.policy.Policy` whether the batch still fits
before the deadline, or whether the stage is worth stopping. Unreadable files get the
fallback prediction (the mean map of the others) in the first pass and keep it. When a
stage ends the buffers swap and the complete ``submission.csv`` is rewritten; progress
is committed after every batch and around every CSV.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from ..data.normalize import VEL_MAX, VEL_MIN, normalize_seismic
from ..errors import DataFormatError, InsufficientBudgetError
from ..utils import progress_bar
from .deadline import Deadline
from .policy import Policy, measured
from .progress import RunProgress, RunState
from .ranked import run_ranked
from .source import batches, item_shape_of
from .stages import MAP, BatchState, RunContext, Stage, stage_array

#: Stored array of the settled rows: 0, or the code of the stage that made the row final.
SETTLED = "settled"
from .store import GATHERS, CachedSource, PredictionStore, StoredArray
from .submission_csv import format_submission_rows, write_submission_csv

__all__ = ["StageRunner", "CorruptedFileWarning", "FALLBACK_VELOCITY", "prediction_buffer", "time_members"]

#: Fallback velocity (m/s) when no file at all could be predicted (the sample submission's).
FALLBACK_VELOCITY = 3000.0


class CorruptedFileWarning(UserWarning):
    """A test file could not be read; it got the fallback prediction."""


def prediction_buffer(store: PredictionStore, i: int) -> StoredArray:
    """One of the two prediction buffers (m/s, float32): the current prediction and the
    next stage's output."""
    return store.array(f"pred{i}", MAP, "float32")


def time_members(ensemble, source, batch_size: int, device: torch.device, clock: Callable[[], float],
                 ctx: RunContext) -> None:
    """Time one forward pass of every member on the first batch (``ctx.member_cost``)."""
    raw = next(batches(source, 0, batch_size, 0))
    x = normalize_seismic(raw.seismic[raw.ok].to(device).float())
    if len(x):
        for m in ensemble.member_names:
            t = clock()
            ensemble.predict_member(m, x)
            ctx.member_cost[m] = (clock() - t) / len(x)


class StageRunner:
    """Runs stages over a source (see the module doc).

    Args:
        ensemble: the run's ensemble (family classifier).
        source: the files; ids: their ids.
        out_csv: the submission (None: no CSV).
        store, ctx, state: the run's stored arrays, context and state.
        policy: decides whether a batch fits and whether to abandon a stage.
        progress: commits the run's progress.
        deadline: the run's deadline (and clock).
        batch_size, num_workers: batching.
        strict: an unreadable file raises :class:`~fwi_core.errors.DataFormatError`.
        margin: safety factor on the measured cost of the next batch and of finishing.
        show_progress: progress bars.
        log: ``log(message)``.
        on_stage_end: ``callback(stage_name, read_rows)`` after each stage, or None.
    """

    def __init__(self, ensemble, source, ids: Sequence[str], out_csv: Optional[Path], store: PredictionStore,
                 ctx: RunContext, state: RunState, policy: Policy, progress: RunProgress, deadline: Deadline,
                 batch_size: int, num_workers: int, strict: bool, margin: float, show_progress: bool,
                 log: Callable[[str], None], on_stage_end: Optional[Callable] = None):
        self.ensemble, self.source, self.ids, self.n = ensemble, source, list(ids), len(ids)
        self.out_csv, self.store, self.ctx, self.state = out_csv, store, ctx, state
        self.policy, self.costs, self.progress = policy, policy.costs, progress
        self.deadline, self.clock = deadline, deadline.clock
        self.batch_size, self.num_workers, self.strict, self.margin = batch_size, num_workers, strict, margin
        self.show_progress, self.log, self.on_stage_end = show_progress, log, on_stage_end
        self.fallback_map: Optional[np.ndarray] = None
        # later passes read the first files' gathers from their float16 copy (written by the first pass)
        self.cache: Optional[StoredArray] = None
        self.cached = source
        if state.cache_rows > 0:
            shape = item_shape_of(source)
            self.cache = StoredArray(store.folder / f"{GATHERS}.npy", state.cache_rows, shape, "float16",
                                     create=False)
            self.cached = CachedSource(source, self.cache, lambda: self.ctx.avail.get(GATHERS, 0))

    # ----------------------------------------------------------------------- buffers, CSV
    def buf(self, i: int) -> StoredArray:
        return prediction_buffer(self.store, i)

    def read_current(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of the current prediction, (k,70,70) m/s."""
        return self.buf(self.state.buffer).read(start, stop)

    def write_csv(self) -> None:
        if self.out_csv is None:
            return
        t = self.clock()
        write_submission_csv(self.out_csv, self.ids, lambda s, e: self.read_current(s, e))
        self.costs.csv = (self.clock() - t) / self.n
        self.state.csv_fresh = True

    def probe_io(self, scratch: Path) -> None:
        """Time formatting the CSV and copying stored rows on a few files."""
        k = min(self.n, 32)
        maps = np.full((k, 70, 70), FALLBACK_VELOCITY, dtype=np.float32)
        t = self.clock()
        format_submission_rows(self.ids[:k], maps)
        self.costs.csv = max(self.costs.csv, (self.clock() - t) / k)
        arr = StoredArray(scratch, k, MAP, "float32", create=True)
        t = self.clock()
        arr.write(0, maps)
        arr.read(0, k)
        self.costs.copy = max(self.costs.copy, (self.clock() - t) / k)
        arr.path.unlink()

    def postfix(self) -> str:
        left = self.deadline.remaining()
        return "no deadline" if math.isinf(left) else f"deadline in {_hms(left)}"

    # ----------------------------------------------------------------------- batches
    def probe(self, stage: Stage) -> None:
        """Time ``stage`` on one file (its result discarded): ``costs.probe``."""
        t = self.clock()
        raw = next(batches(self.source, 0, 1, 0)) if stage.needs_seismic else None
        batch = self.batch(stage, 0, 1, raw, probe=True)
        if len(batch):
            with torch.no_grad():
                stage.run(batch)
        self.costs.probe[stage.name] = (self.clock() - t) / max(1, len(batch))

    def _families(self, rows: np.ndarray, start: int, stop: int, x_ok: Optional[torch.Tensor]) -> Optional[List[str]]:
        """Family names of the batch rows: stored codes, else the ensemble's classifier
        (stored for later stages), else None (no classifier)."""
        ctx = self.ctx
        if ctx.avail.get("family", 0) >= stop:
            if not ctx.family_names:
                return None
            codes = self.store.array("family", (), "int16").read(start, stop)[rows - start]
            return [ctx.family_names[c] if c >= 0 else "default" for c in codes]
        if x_ok is None or not len(rows):
            return None
        fams = self.ensemble.predict_families(x_ok)
        if fams is None:
            return None
        fams = [str(f) for f in fams]
        for f in fams:
            if f not in ctx.family_names:
                ctx.family_names.append(f)
        arr = self.store.array("family", (), "int16")
        window = np.full(stop - start, -1, dtype=np.int16)
        window[rows - start] = [ctx.family_names.index(f) for f in fams]
        arr.write(start, window)
        ctx.avail["family"] = stop
        return fams

    def batch(self, stage: Stage, start: int, stop: int, raw, probe: bool = False) -> BatchState:
        """What ``stage`` sees of rows ``start:stop`` (``raw``: their gathers, or None)."""
        ok = self.ctx.row_ok(start, stop)
        if raw is not None:
            ok &= raw.ok.numpy()
        rows = np.arange(start, stop)[ok]
        pred = torch.from_numpy(self.read_current(start, stop)[ok])[:, None] if self.state.stage0_done \
            else torch.full((len(rows), 1) + MAP, FALLBACK_VELOCITY)
        seismic = None
        if raw is not None:
            seismic = raw.seismic[torch.as_tensor(np.flatnonzero(ok))]
        batch = BatchState(start, stop, rows, [self.ids[r] for r in rows], pred, seismic, None, self.ctx, probe,
                           self._settled(rows, start, stop), self.code(stage))
        if probe and self.ctx.avail.get("family", 0) < stop:
            return batch
        batch.families = self._families(rows, start, stop, batch.x if seismic is not None and len(rows) else None)
        return batch

    def code(self, stage: Stage) -> int:
        """The stage's code in the ``settled`` array (1 + its place in the run's stage list)."""
        names = list(self.ctx.stages)
        return names.index(stage.name) + 1 if stage.name in names else 0

    def _settled(self, rows: np.ndarray, start: int, stop: int) -> Optional[np.ndarray]:
        """Settled codes of ``rows`` (None while no stage settled any row)."""
        if not self.ctx.avail.get(SETTLED, 0):
            return None
        return self.store.array(SETTLED, (), "int16").read(start, stop)[rows - start]

    def settled_rows(self, rows: np.ndarray) -> Optional[np.ndarray]:
        """Settled codes of any rows (None while no stage settled any row)."""
        if not self.ctx.avail.get(SETTLED, 0):
            return None
        return self.store.array(SETTLED, (), "int16").read_rows(rows)

    def store_settled(self, batch: BatchState) -> None:
        """Store the rows the batch's settling stage made final (before the batch's commit)."""
        if batch.settle_mask is None or batch.probe or not batch.settle_mask.any():
            return
        arr = self.store.array(SETTLED, (), "int16")
        rows = batch.rows[batch.settle_mask]
        arr.write_rows(rows, np.full(len(rows), batch.code, dtype=np.int16))
        self.ctx.avail[SETTLED] = self.n

    @staticmethod
    def check_output(out, k: int, name: str) -> torch.Tensor:
        return _check_output(out, k, name)

    def _invalidate_observers(self, stage: Stage) -> None:
        """``stage`` changed maps: what observers (the consistency flags) found before is stale."""
        for name in list(self.ctx.executed):
            other = self.ctx.stages.get(name)
            if other is None or other is stage or not other.observes:
                continue
            self.ctx.executed.remove(name)
            other.reset(self.ctx)
            rec = self.policy.record(other)
            rec.update(status="not run", done=0, files=0,
                       note=f"what it found was discarded: {stage.name} changed the maps after it ran")
            self.log(f"[{name}] discarded: {stage.name} changed the maps after it ran; it may run again")

    def _bad(self, row: int, msg: str) -> None:
        oid = self.ids[row]
        if self.strict:
            raise DataFormatError(f"test file {oid}: {msg} (strict mode: no fallback)")
        if row not in self.ctx.bad_rows:
            warnings.warn(f"test file {oid} could not be used ({msg}); it gets the fallback prediction",
                          CorruptedFileWarning, stacklevel=3)
            self.ctx.bad_rows[row] = msg

    # ----------------------------------------------------------------------- stages
    def run_stage(self, stage: Stage, mandatory: bool) -> None:
        """Run ``stage`` from the row its record has reached over as many batches as fit
        (``mandatory``: the first pass, which covers every file), then end it. A ranked
        stage runs its candidates in rank order instead (:func:`~.ranked.run_ranked`)."""
        if getattr(stage, "ranked", False) and not mandatory:
            run_ranked(self, stage)
            return
        rec = self.policy.record(stage)
        if stage.name not in self.ctx.executed:
            self.ctx.executed.append(stage.name)
        rec["status"] = "running"
        stage.prepare(self.ctx)
        out_buf = self.buf(1 - self.state.buffer)
        start = int(rec["done"])
        self.progress.commit(running=stage.name)
        times: List[float] = []
        bar = progress_bar(total=self.n, initial=start, desc=stage.name, unit="file",
                           disable=not self.show_progress)
        stop_reason = ""
        source_iter = batches(self.source if mandatory else self.cached, start, self.batch_size, self.num_workers) \
            if stage.needs_seismic else None
        s = start
        try:
            while s < self.n:
                e = min(self.n, s + self.batch_size)
                if times or not mandatory or start > 0:
                    need = self.policy.next_batch(times, stage, e - s) * self.margin \
                        + self.costs.finish(self.n - e) * self.margin
                    if self.deadline.remaining() < need:
                        stop_reason = "stopped before the deadline"
                        break
                if times and not mandatory and self.policy.should_abandon(stage, s, times):
                    stop_reason = "abandoned for stages worth more in the time left"
                    break
                t0 = self.clock()
                raw = next(source_iter) if source_iter is not None else None
                if raw is not None:
                    assert raw.start == s and raw.stop == e, (raw.start, raw.stop, s, e)
                    for j, msg in raw.errors.items():
                        if not mandatory and (s + j) not in self.ctx.bad_rows:
                            self.log(f"warning: {self.ids[s + j]} unreadable in stage {stage.name}: {msg}")
                        if mandatory:
                            self._bad(s + j, msg)
                    if mandatory and self.cache is not None and s < self.cache.n:
                        k = min(e, self.cache.n) - s          # keep a float16 copy for the later passes
                        self.cache.write(s, raw.seismic[:k].numpy().astype(np.float16))
                        self.ctx.avail[GATHERS] = s + k
                batch = self.batch(stage, s, e, raw)
                window = self.read_current(s, e) if self.state.stage0_done else np.zeros((e - s,) + MAP, np.float32)
                if len(batch):
                    with torch.no_grad():
                        out = stage.run(batch)
                    out = _check_output(out, len(batch), stage.name)
                    finite = torch.isfinite(out.flatten(1)).all(1).numpy()
                    for i in np.flatnonzero(~finite):
                        if mandatory:
                            self._bad(int(batch.rows[i]), "the prediction is not finite")
                        else:
                            self.log(f"warning: stage {stage.name} predicted non-finite values for "
                                     f"{batch.ids[i]}; it keeps its previous prediction")
                    # rows another stage settled (refined) keep their prediction, whatever this stage returned
                    take = finite & ~batch.settled_by_others() if self.state.stage0_done else finite
                    keep = batch.rows[take] - s
                    window[keep] = out[torch.as_tensor(np.flatnonzero(take))].clamp(VEL_MIN, VEL_MAX)[:, 0].numpy()
                    if stage.settles:
                        self.store_settled(batch)
                    if mandatory:            # per-file features later stages need (refinement's routing)
                        for st in self.ctx.stages.values():
                            st.first_pass(batch, out)
                out_buf.write(s, window)
                if not stage.producer:
                    self.ctx.avail[stage_array(stage.name)] = e
                dt = self.clock() - t0
                times.append(dt / max(1, e - s))
                rec["done"] = e
                rec["files"] = e
                rec["seconds"] = float(rec["seconds"]) + dt
                rec["measured"] = measured(times)
                self.progress.commit(running=stage.name)
                if mandatory and len(times) == 1:
                    self._check_first_pass(stage, s, e, t0)
                bar.update(e - s)
                if self.show_progress:
                    bar.set_postfix_str(self.postfix())
                s = e
        finally:
            bar.close()
            if source_iter is not None:
                source_iter.close()
        self._end_stage(stage, rec, s, stop_reason, mandatory)

    def _check_first_pass(self, stage: Stage, s: int, e: int, t0: float) -> None:
        per_file = (self.clock() - t0) / (e - s)
        left_files = self.n - e
        csv = self.costs.finish(0)
        if self.deadline.remaining() < per_file * left_files + csv:
            available = self.deadline.remaining() + (self.clock() - t0)
            spent_before = (t0 - self.deadline.origin) if self.deadline.origin is not None else 0.0
            raise InsufficientBudgetError(stage.name, self.n, per_file, csv, available, spent_before, e - s)

    def _end_stage(self, stage: Stage, rec: Dict[str, Any], done: int, reason: str, mandatory: bool) -> None:
        t = self.clock()
        out_buf = self.buf(1 - self.state.buffer)
        if mandatory:
            self._fill_fallback(out_buf, done, stage)
        elif done < self.n:
            out_buf.copy_from(self.buf(self.state.buffer), done, self.n)
            if self.n - done:
                self.costs.copy = (self.clock() - t) / (self.n - done)
        if mandatory:
            self.state.stage0_done = True
        rec["status"] = "complete" if done >= self.n else ("partial" if rec["done"] > 0 else "not run")
        rec["samples"] = done
        if reason:
            rec["note"] = f"{reason} after {done} of {self.n} files"
        if rec.get("measured"):
            rec["files_per_s"] = 1.0 / rec["measured"] if rec["measured"] > 0 else None
        self.swap_and_write(stage, rec, t)

    def swap_and_write(self, stage: Stage, rec: Dict[str, Any], t: Optional[float] = None) -> None:
        """End a stage whose output buffer is complete: make it current, rewrite the CSV
        (progress committed around it), discard stale observers, log."""
        t = self.clock() if t is None else t
        if not stage.observes and rec["done"] > 0:
            self._invalidate_observers(stage)
        self.state.buffer = 1 - self.state.buffer
        self.state.csv_fresh = False
        self.progress.commit(running=None)          # the new buffer is complete: the CSV may follow
        self.write_csv()
        rec["seconds"] = float(rec["seconds"]) + (self.clock() - t)
        self.progress.commit(running=None)
        self.log(f"[{stage.name}] {rec['status']}: {rec.get('samples', rec['done'])} "
                 f"{'samples' if getattr(stage, 'ranked', False) else 'files'}, "
                 f"{rec['seconds']:.1f} s{'; ' + rec['note'] if rec['note'] else ''}; {self.postfix()}")
        if self.on_stage_end is not None:
            self.on_stage_end(stage.name, self.read_current)

    def _fill_fallback(self, buf: StoredArray, done: int, stage: Optional[Stage] = None) -> None:
        """Give unreadable and unreached rows the first stage's own fallback maps
        (:meth:`Stage.fallback`: ``prior`` keeps their prior maps), else the mean map of
        the predicted ones."""
        bad = sorted(r for r in self.ctx.bad_rows if r < done)
        missing = np.asarray(bad + list(range(done, self.n)), dtype=np.int64)
        own = stage.fallback(self.ctx, missing) if stage is not None and len(missing) else None
        if own is not None:
            for s in range(0, len(missing), 1024):
                buf.write_rows(missing[s:s + 1024], np.asarray(own[s:s + 1024], dtype=np.float32))
            return
        total, count = np.zeros(MAP, np.float64), 0
        for s in range(0, done, 1024):
            e = min(done, s + 1024)
            ok = self.ctx.row_ok(s, e)
            w = buf.read(s, e)[ok]
            total += w.sum(0, dtype=np.float64)
            count += len(w)
        fallback = (total / count).astype(np.float32) if count else np.full(MAP, FALLBACK_VELOCITY, np.float32)
        self.fallback_map = fallback
        for r in bad:
            buf.write(r, fallback[None])
        for s in range(done, self.n, 1024):
            e = min(self.n, s + 1024)
            buf.write(s, np.broadcast_to(fallback, (e - s,) + MAP))


def _check_output(out, k: int, name: str) -> torch.Tensor:
    if not torch.is_tensor(out) or tuple(out.shape) != (k, 1) + MAP:
        shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise ValueError(f"stage {name!r} returned {shape}, expected a ({k}, 1, 70, 70) tensor of m/s")
    return out.detach().float().cpu()


def _hms(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
