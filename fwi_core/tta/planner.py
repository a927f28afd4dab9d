"""The time-budgeted inference planner.

    from fwi_core.ensemble import Ensemble
    from fwi_core.tta import BudgetedInference, Deadline, TestFileSource

    ens = Ensemble.from_checkpoints(paths)
    summary = BudgetedInference(ens, TestFileSource(root), "submission.csv",
                                deadline=Deadline.from_budget(3 * 3600)).run()
    print(summary.format())

How it spends the time (every decision is in the run summary):

1. The first stage (the cheapest good member) runs over every file and writes a complete
   ``submission.csv``. After its first batch the planner projects the pass; when it
   cannot finish before the deadline it stops with :class:`InsufficientBudgetError`
   saying how long the pass needs. Should it still run late, the files it does not
   reach get the fallback prediction, so the CSV stays complete.
2. Then it repeatedly picks, among the remaining stages, the set with the most expected
   gain (validation MAE removed, :mod:`~fwi_core.tta.gains`) that fits in the time left
   (greedy by gain per second, each stage's seconds per file timed on the test files),
   and runs the first of that set in priority order over every file, rewriting the CSV
   when it ends. Running out of time for everything, it drops the stages with the lowest
   gain per second first.
3. Before each batch it checks that the batch (its measured cost times ``margin``) plus
   finishing (writing the CSV) still fits before the deadline; if not, the stage stops
   there: the files it reached keep its improvement, the others the previous prediction.
   A stage that turns out slower than planned is also abandoned early when the stages
   it would crowd out are worth more.

Every per-file result lives in memory-mapped files in the state folder and progress is
committed after every batch, so a run killed at any point resumes (``resume=True``) where
it stopped and writes the same bytes as an uninterrupted run.
"""
from __future__ import annotations

import hashlib
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from ..errors import DataFormatError, InsufficientBudgetError
from ..data.normalize import VEL_MAX, VEL_MIN
from ..utils import atomic_write_text, progress_bar, remove_stale_temps
from .gains import StageGains
from .source import batches
from .stages import (DEFAULT_STAGES, MAP, BatchState, RunContext, Stage, StageError, build_stages,
                     stage_array)
from .store import PredictionStore, format_submission_rows, write_submission_csv

PathLike = Union[str, os.PathLike]
STATE_FORMAT = "fwi_core.tta/1"
#: Seconds kept free before the platform's session limit by the default deadline.
DEFAULT_SAFETY_MARGIN = 300.0
#: Fallback velocity (m/s) when no file at all could be predicted (the sample submission's).
FALLBACK_VELOCITY = 3000.0
#: A stage without a cost estimate is timed on one file only while at least this fraction
#: of the time left at the start of the run remains.
PROBE_MIN_FRACTION = 0.1

__all__ = ["BudgetedInference", "Deadline", "RunSummary", "InsufficientBudgetError", "CorruptedFileWarning",
           "run_budgeted", "default_state_dir", "DEFAULT_SAFETY_MARGIN"]


class CorruptedFileWarning(UserWarning):
    """A test file could not be read; it got the fallback prediction."""


@dataclass
class Deadline:
    """An absolute deadline on ``clock`` (None: no deadline).

    Attributes:
        at: the deadline, in ``clock()`` seconds, or None.
        clock: the time source (``time.monotonic``; tests pass a fake clock).
        origin: ``clock()`` value of the process start (budgets count from there).
    """

    at: Optional[float]
    clock: Callable[[], float] = time.monotonic
    origin: Optional[float] = None

    def remaining(self) -> float:
        """Seconds left (inf without a deadline)."""
        return math.inf if self.at is None else self.at - self.clock()

    @classmethod
    def from_budget(cls, seconds: Optional[float], clock: Callable[[], float] = time.monotonic,
                    age: Optional[float] = None) -> "Deadline":
        """``seconds`` after the process start (``age``: seconds since then; default the
        real process age from :func:`fwi_core.platform.process_age`)."""
        from ..platform import process_age

        now = clock()
        origin = now - (process_age() if age is None else float(age))
        if seconds is None:
            return cls(None, clock, origin)
        if not math.isfinite(float(seconds)) or seconds <= 0:
            raise ValueError(f"time budget must be a positive number of seconds, got {seconds!r}")
        return cls(origin + float(seconds), clock, origin)

    @classmethod
    def platform_default(cls, safety_margin: float = DEFAULT_SAFETY_MARGIN,
                         clock: Callable[[], float] = time.monotonic, age: Optional[float] = None) -> "Deadline":
        """The platform's session limit (:func:`fwi_core.train.detect_platform`: 11.5 h
        on Kaggle, 11 h on Colab, none locally) minus ``safety_margin`` seconds, from
        the process start."""
        from ..platform import detect_platform

        limit = detect_platform().time_budget
        return cls.from_budget(None if limit is None else max(1.0, limit - safety_margin), clock, age)

    def spent(self) -> float:
        return 0.0 if self.origin is None else self.clock() - self.origin


@dataclass
class RunSummary:
    """What a budgeted run did.

    Attributes:
        csv: the submission written (None when the run had no CSV).
        files: number of files.
        budget_s: seconds the deadline left when the run started (None: no deadline).
        elapsed_s: seconds the run took.
        met_deadline: it finished (CSV written) before the deadline.
        plan: stage names the planner chose after the first pass, in order.
        stages: one dict per stage: name, kind, status (complete | partial | skipped |
            not run), files, seconds, files_per_s, expected_gain, gain_source, note.
        bad_files: oid -> why it could not be read (it got the fallback prediction).
        fallback_files: files written with the fallback (unreadable or never reached).
        resumed: the run continued a previous one.
        uncertainty: per family (predicted; "all" without a classifier): files,
            mean_std (m/s), depth_std (70 values, mean over columns and files), when MC
            dropout ran.
    """

    csv: Optional[str]
    files: int
    budget_s: Optional[float]
    elapsed_s: float = 0.0
    met_deadline: bool = True
    plan: List[str] = field(default_factory=list)
    stages: List[Dict[str, Any]] = field(default_factory=list)
    bad_files: Dict[str, str] = field(default_factory=dict)
    fallback_files: int = 0
    resumed: bool = False
    uncertainty: Optional[Dict[str, Dict[str, Any]]] = None

    @property
    def ran(self) -> List[str]:
        """Names of the stages that ran (completely or partly), in order."""
        return [s["name"] for s in self.stages if s["status"] in ("complete", "partial")]

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        """A readable report: the stages with their status, then unreadable files."""
        budget = "no deadline" if self.budget_s is None else f"{self.budget_s:.0f} s left at the start"
        lines = [f"{self.files} files, {budget}; finished in {self.elapsed_s:.1f} s"
                 f"{'' if self.met_deadline else ' (AFTER the deadline)'}"
                 f"{'; resumed a previous run' if self.resumed else ''}",
                 f"plan after the first pass: {', '.join(self.plan) or '(nothing more fits)'}",
                 f"{'stage':<28}{'status':>10}{'files':>8}{'s':>9}{'files/s':>9}{'gain':>8}  note"]
        for s in self.stages:
            fps = f"{s['files_per_s']:.2f}" if s.get("files_per_s") else "-"
            lines.append(f"{s['name']:<28}{s['status']:>10}{s['files']:>8}{s['seconds']:>9.1f}{fps:>9}"
                         f"{s['expected_gain']:>8.2f}  {s.get('note', '')}")
        if self.bad_files:
            lines.append(f"{len(self.bad_files)} unreadable file(s) got the fallback prediction:")
            lines += [f"  {oid}: {msg}" for oid, msg in sorted(self.bad_files.items())]
        if self.fallback_files > len(self.bad_files):
            lines.append(f"{self.fallback_files - len(self.bad_files)} file(s) were not reached in time "
                         "and got the fallback prediction")
        return "\n".join(lines)

    def save(self, path: PathLike) -> Path:
        import json

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True))
        return Path(path)


def default_state_dir(out_csv: Optional[PathLike]) -> Optional[Path]:
    """Where a run keeps its state: ``.<csv name>.state`` beside the CSV, except on Kaggle,
    where ``/kaggle/working`` is saved as the notebook's output and limited to 20 GB: there
    ``<temp dir>/fwi-tta/<csv name>.state`` (it survives a kernel restart within the
    session)."""
    import tempfile

    from ..platform import detect_platform

    if out_csv is None:
        return None
    out_csv = Path(out_csv)
    if detect_platform().name == "kaggle":
        return Path(tempfile.gettempdir()) / "fwi-tta" / f"{out_csv.name}.state"
    return out_csv.parent / f".{out_csv.name}.state"


class BudgetedInference:
    """Run an ensemble's stages over a source within a deadline (see the module doc).

    Args:
        ensemble: a :class:`~fwi_core.ensemble.Ensemble` (``member_names``,
            ``predict_member``, ``predict_member_mc``, ``combine``, ``sample_weights``,
            ``predict_families``).
        source: a :class:`~fwi_core.tta.source.TestFileSource` (or any source).
        out_csv: the submission to write (None: no CSV, e.g. on validation data).
        stages: names or :class:`~fwi_core.tta.stages.Stage` objects in priority order
            (default ``members, flip, crf, mc_dropout``).
        deadline: a :class:`Deadline` (default: the platform's session limit minus a
            safety margin, from the process start; none locally).
        gains: the gains table (default: built-in defaults).
        state_dir: where per-file arrays and progress live (default:
            :func:`default_state_dir`). Disk: 19.6 KB per file per stored map (two for
            the current prediction, one per member for each of its prediction, flipped
            prediction and MC mean, one for the MC spread).
        resume: continue the run saved in ``state_dir`` (a different run's state is
            discarded with a warning); False starts over.
        strict: an unreadable file raises instead of getting the fallback prediction.
        batch_size, device, num_workers: batching (fixed batch boundaries), where the
            seismic goes, DataLoader workers reading files.
        store_dtype: "float32" or "float16" for the stored member predictions (the
            current prediction is always float32).
        seed: seed of MC dropout.
        crf: the tuned :class:`~fwi_core.crf.ContinuousCRF` for the ``crf`` stage (None:
            the stage is skipped).
        mc_passes: MC-dropout passes; crf_confidence: weigh the CRF by MC confidence.
        margin: safety factor on the measured cost of the next batch and of finishing.
        progress: show progress bars (stage, ETA, time to the deadline).
        keep_state: keep the state folder after a finished run (default: delete it).
        select: False runs every available stage regardless of gains and time (used to
            measure the gains table on validation data).
        fingerprint_extra: more identity of the run (e.g. checkpoint files and sizes):
            a saved state with another fingerprint is not resumed.
        on_stage_end: ``callback(stage_name, read_rows)`` after each stage, where
            ``read_rows(start, stop)`` returns the current (k,70,70) m/s predictions.
        log: ``log(message)`` for plan lines (default print; None: silent).
        resources: extra entries for registered stage factories.
    """

    def __init__(self, ensemble, source, out_csv: Optional[PathLike], stages: Sequence[Any] = DEFAULT_STAGES,
                 deadline: Optional[Deadline] = None, gains: Optional[StageGains] = None,
                 state_dir: Optional[PathLike] = None, resume: bool = False, strict: bool = False,
                 batch_size: int = 16, device: Optional[Union[str, torch.device]] = None, num_workers: int = 0,
                 store_dtype: str = "float32", seed: int = 0, crf=None, mc_passes: int = 8,
                 crf_confidence: bool = False, margin: float = 1.5, progress: bool = True,
                 keep_state: bool = False, select: bool = True, fingerprint_extra: Optional[dict] = None,
                 on_stage_end: Optional[Callable] = None, log: Optional[Callable[[str], None]] = print,
                 resources: Optional[Dict[str, Any]] = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if margin < 1.0:
            raise ValueError(f"margin must be >= 1, got {margin}")
        if len(source) == 0:
            raise ValueError("BudgetedInference: the source has no files")
        self.ensemble = ensemble
        self.source = source
        self.ids: List[str] = list(source.ids)
        self.n = len(self.ids)
        self.out_csv = None if out_csv is None else Path(out_csv)
        self.specs = list(stages)
        self.deadline = deadline if deadline is not None else Deadline.platform_default()
        self.clock = self.deadline.clock
        self.gains = gains or StageGains()
        state_dir = Path(state_dir) if state_dir is not None else default_state_dir(self.out_csv)
        if state_dir is None:
            raise ValueError("BudgetedInference: give state_dir when out_csv is None")
        self.state_dir = state_dir
        self.resume, self.strict = bool(resume), bool(strict)
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        if device is None:
            from ..inference import default_device
            device = default_device()
        self.device = torch.device(device)
        self.store_dtype = str(np.dtype(store_dtype))
        self.margin = float(margin)
        self.progress, self.keep_state, self.select = progress, keep_state, select
        self.on_stage_end, self.log_fn = on_stage_end, log
        self.resources = {"ensemble": ensemble, "crf": crf, "mc_passes": int(mc_passes), "device": self.device,
                          "crf_confidence": bool(crf_confidence), **(resources or {})}
        self.fingerprint = {
            "format": STATE_FORMAT, "files": self.n,
            "ids_sha1": hashlib.sha1("\n".join(self.ids).encode()).hexdigest(),
            "members": list(ensemble.member_names),
            "stages": [s.name if isinstance(s, Stage) else str(s) for s in self.specs],
            "batch_size": self.batch_size, "store_dtype": self.store_dtype, "seed": int(seed),
            "mc_passes": int(mc_passes), "crf": None if crf is None else _crf_id(crf),
            "extra": fingerprint_extra or {},
        }
        self.store = PredictionStore(self.state_dir, self.n, self.store_dtype)
        self.ctx = RunContext(ensemble, self.store, self.device, seed)
        self.stages: List[Stage] = []
        self.records: Dict[str, Dict[str, Any]] = {}
        self.buffer = 0
        self.csv_cost = 0.0        # seconds per file to write the CSV
        self.copy_cost = 0.0       # seconds per file to copy a stored map
        self.probe_cost: Dict[str, float] = {}
        self.plan: List[str] = []
        self.resumed = False
        self.stage0_done = False
        self.csv_fresh = False     # the CSV holds the current buffer
        self.fallback_map: Optional[np.ndarray] = None
        self.budget: Optional[float] = None

    # ================================================================== helpers
    def log(self, msg: str) -> None:
        if self.log_fn is not None:
            self.log_fn(msg)

    def _buf(self, i: int):
        return self.store.array(f"pred{i}", MAP, "float32")

    def _read_current(self, start: int, stop: int) -> np.ndarray:
        return self._buf(self.buffer).read(start, stop)

    def _gain(self, stage: Stage) -> float:
        return float(self.gains.gain(stage))

    def _state(self, running: Optional[str] = None, finished: bool = False, summary=None) -> Dict[str, Any]:
        return {"fingerprint": self.fingerprint, "order": [s.name for s in self.stages],
                "records": self.records, "buffer": self.buffer, "running": running,
                "avail": self.ctx.avail, "executed": self.ctx.executed,
                "bad": {str(r): m for r, m in self.ctx.bad_rows.items()}, "families": self.ctx.family_names,
                "member_cost": self.ctx.member_cost, "io_cost": self.ctx.io_cost, "plan": self.plan,
                "stage0_done": self.stage0_done, "csv_fresh": self.csv_fresh, "finished": finished,
                "summary": summary}

    def _commit(self, running: Optional[str] = None, **kw) -> None:
        self.store.commit(self._state(running, **kw))

    def _record(self, stage: Stage) -> Dict[str, Any]:
        return self.records.setdefault(stage.name, {
            "name": stage.name, "kind": stage.kind, "status": "not run", "files": 0, "done": 0, "seconds": 0.0,
            "files_per_s": None, "expected_gain": self._gain(stage), "gain_source": self.gains.source_of(stage),
            "note": ""})

    # ================================================================== timing
    def _per_file(self, stage: Stage, before: Sequence[Stage]) -> Optional[float]:
        """Seconds per file of ``stage``: measured, else its estimate, else its probe."""
        rec = self.records.get(stage.name)
        if rec and rec.get("measured"):
            return rec["measured"]
        est = stage.estimate(self.ctx, before)
        if est is not None:
            return float(est)
        return self.probe_cost.get(stage.name)

    def _finish_cost(self, copy_rows: int) -> float:
        """Seconds to end a stage: copy ``copy_rows`` unreached rows, write the CSV."""
        csv = self.csv_cost * self.n if self.out_csv is not None else 0.0
        return csv + self.copy_cost * copy_rows

    def _probe_io(self) -> None:
        """Time formatting the CSV and copying stored rows on a few files."""
        k = min(self.n, 32)
        maps = np.full((k, 70, 70), FALLBACK_VELOCITY, dtype=np.float32)
        t = self.clock()
        format_submission_rows(self.ids[:k], maps)
        self.csv_cost = max(self.csv_cost, (self.clock() - t) / k)
        from .store import StoredArray

        scratch = StoredArray(self.state_dir / "scratch.npy", k, MAP, "float32", create=True)
        t = self.clock()
        scratch.write(0, maps)
        scratch.read(0, k)
        self.copy_cost = max(self.copy_cost, (self.clock() - t) / k)
        scratch.path.unlink()

    def _write_csv(self) -> None:
        if self.out_csv is None:
            return
        t = self.clock()
        write_submission_csv(self.out_csv, self.ids, lambda s, e: self._read_current(s, e))
        self.csv_cost = (self.clock() - t) / self.n
        self.csv_fresh = True

    # ================================================================== planning
    def _candidates(self) -> List[Stage]:
        out = []
        for s in self.stages:
            rec = self._record(s)
            if s.name in self.ctx.executed or rec["status"] == "skipped":
                continue
            why = s.unavailable(self.ctx)
            if why:
                rec.update(status="skipped", note=why)
                continue
            if self.select and self._gain(s) <= 0:
                rec.update(status="skipped", note=f"expected gain {self._gain(s):.3g} <= 0 ({rec['gain_source']})")
                continue
            out.append(s)
        return out

    def _plan_time(self, selection: Sequence[Stage]) -> Optional[float]:
        """Projected seconds to run ``selection`` (priority order) over every file."""
        total, before = 0.0, []
        for s in selection:
            c = self._per_file(s, before)
            if c is None:
                return None
            total += c * self.n + self._finish_cost(0)
            before.append(s)
        return total

    def _choose(self, pool: Sequence[Stage], seconds: float) -> List[Stage]:
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
                total = self._plan_time(sel)
                if total is None or total > seconds:
                    continue
                rate = self._gain(s) / max(total - base, 1e-9)
                if rate > best_rate:
                    best, best_rate, best_total = s, rate, total
            if best is None:
                return sorted(chosen, key=lambda t: prio[t.name])
            chosen.append(best)
            base = best_total

    def _probe(self, stage: Stage) -> None:
        """Time a stage that has no estimate on one file (result discarded), if at least
        ``PROBE_MIN_FRACTION`` of the starting time is left (this is the one step taken
        without a measured or estimated cost)."""
        if stage.estimate(self.ctx, []) is not None or stage.name in self.probe_cost:
            return
        left = self.deadline.remaining() - self._finish_cost(0) * self.margin
        if self.budget is not None and left < PROBE_MIN_FRACTION * self.budget:
            return
        t = self.clock()
        raw = next(batches(self.source, 0, 1, 0)) if stage.needs_seismic else None
        batch = self._batch(stage, 0, 1, raw, probe=True)
        if len(batch):
            with torch.no_grad():
                stage.run(batch)
        self.probe_cost[stage.name] = (self.clock() - t) / max(1, len(batch))

    # ================================================================== batches
    def _families(self, rows: np.ndarray, start: int, stop: int, x_ok: Optional[torch.Tensor]) -> Optional[List[str]]:
        """Family names of the batch rows: stored codes, else the ensemble's classifier
        (stored for later stages), else None (no classifier)."""
        if self.ctx.avail.get("family", 0) >= stop:
            if not self.ctx.family_names:
                return None
            codes = self.store.array("family", (), "int16").read(start, stop)[rows - start]
            return [self.ctx.family_names[c] if c >= 0 else "default" for c in codes]
        if x_ok is None or not len(rows):
            return None
        fams = self.ensemble.predict_families(x_ok)
        if fams is None:
            return None
        fams = [str(f) for f in fams]
        for f in fams:
            if f not in self.ctx.family_names:
                self.ctx.family_names.append(f)
        arr = self.store.array("family", (), "int16")
        window = np.full(stop - start, -1, dtype=np.int16)
        window[rows - start] = [self.ctx.family_names.index(f) for f in fams]
        arr.write(start, window)
        self.ctx.avail["family"] = stop
        return fams

    def _batch(self, stage: Stage, start: int, stop: int, raw, probe: bool = False) -> BatchState:
        ok = self.ctx.row_ok(start, stop)
        if raw is not None:
            ok &= raw.ok.numpy()
        rows = np.arange(start, stop)[ok]
        pred = torch.from_numpy(self._read_current(start, stop)[ok])[:, None] if self.stage0_done \
            else torch.full((len(rows), 1) + MAP, FALLBACK_VELOCITY)
        seismic = None
        if raw is not None:
            seismic = raw.seismic[torch.as_tensor(np.flatnonzero(ok))]
        batch = BatchState(start, stop, rows, [self.ids[r] for r in rows], pred, seismic, None, self.ctx, probe)
        if probe and self.ctx.avail.get("family", 0) < stop:
            return batch
        batch.families = self._families(rows, start, stop, batch.x if seismic is not None and len(rows) else None)
        return batch

    def _bad(self, row: int, msg: str) -> None:
        oid = self.ids[row]
        if self.strict:
            raise DataFormatError(f"test file {oid}: {msg} (strict mode: no fallback)")
        if row not in self.ctx.bad_rows:
            warnings.warn(f"test file {oid} could not be used ({msg}); it gets the fallback prediction",
                          CorruptedFileWarning, stacklevel=3)
            self.ctx.bad_rows[row] = msg

    # ================================================================== stages
    def _run_stage(self, stage: Stage, mandatory: bool) -> None:
        rec = self._record(stage)
        if stage.name not in self.ctx.executed:
            self.ctx.executed.append(stage.name)
        rec["status"] = "running"
        stage.prepare(self.ctx)
        out_buf = self._buf(1 - self.buffer)
        start = int(rec["done"])
        self._commit(running=stage.name)
        times: List[float] = []
        bar = progress_bar(total=self.n, initial=start, desc=stage.name, unit="file",
                           disable=not self.progress)
        stop_reason = ""
        source_iter = batches(self.source, start, self.batch_size, self.num_workers) if stage.needs_seismic \
            else None
        s = start
        try:
            while s < self.n:
                e = min(self.n, s + self.batch_size)
                if times or not mandatory or start > 0:
                    need = self._next_batch(times, stage, e - s) * self.margin \
                        + self._finish_cost(self.n - e) * self.margin
                    if self.deadline.remaining() < need:
                        stop_reason = "stopped before the deadline"
                        break
                if times and not mandatory and self._should_abandon(stage, s, times):
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
                batch = self._batch(stage, s, e, raw)
                window = self._read_current(s, e) if self.stage0_done else np.zeros((e - s,) + MAP, np.float32)
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
                    keep = batch.rows[finite] - s
                    window[keep] = out[torch.as_tensor(np.flatnonzero(finite))].clamp(VEL_MIN, VEL_MAX)[:, 0].numpy()
                out_buf.write(s, window)
                if not stage.producer:
                    self.ctx.avail[stage_array(stage.name)] = e
                dt = self.clock() - t0
                times.append(dt / max(1, e - s))
                rec["done"] = e
                rec["files"] = e
                rec["seconds"] = float(rec["seconds"]) + dt
                rec["measured"] = _measured(times)
                self._commit(running=stage.name)
                if mandatory and len(times) == 1:
                    self._check_first_pass(stage, s, e, t0)
                bar.update(e - s)
                if self.progress:
                    bar.set_postfix_str(self._postfix())
                s = e
        finally:
            bar.close()
            if source_iter is not None:
                source_iter.close()
        self._end_stage(stage, rec, s, stop_reason, mandatory)

    def _next_batch(self, times: Sequence[float], stage: Stage, files: int) -> float:
        if times:
            return max(times[-1], float(np.mean(times[-5:]))) * files
        c = self._per_file(stage, [])
        return (c or 0.0) * files

    def _postfix(self) -> str:
        left = self.deadline.remaining()
        return "no deadline" if math.isinf(left) else f"deadline in {_hms(left)}"

    def _check_first_pass(self, stage: Stage, s: int, e: int, t0: float) -> None:
        per_file = (self.clock() - t0) / (e - s)
        left_files = self.n - e
        csv = self._finish_cost(0)
        if self.deadline.remaining() < per_file * left_files + csv:
            available = self.deadline.remaining() + (self.clock() - t0)
            spent_before = (t0 - self.deadline.origin) if self.deadline.origin is not None else 0.0
            raise InsufficientBudgetError(stage.name, self.n, per_file, csv, available, spent_before, e - s)

    def _should_abandon(self, stage: Stage, done: int, times: Sequence[float]) -> bool:
        """Is it worth more to stop the running stage now (keeping the files it improved)
        and give its remaining time to other stages? Compares the gain still to come from
        continuing it (and from the stages that fit after it) with the gain of the stages
        that fit if it stops now."""
        if len(times) < 2:
            return False                       # one batch is too noisy a measurement
        per_file = _measured(times)
        rows = self.n - done
        others = [s for s in self._candidates() if s is not stage]
        if not others:
            return False
        # seconds usable under the same margin as the per-batch check
        usable = (self.deadline.remaining() - self._finish_cost(rows) * self.margin) / self.margin
        if rows * per_file <= usable:
            after = self._choose(others, usable - rows * per_file)
            keep_going = self._gain(stage) * rows / self.n + sum(self._gain(s) for s in after)
        else:
            keep_going = self._gain(stage) * max(0.0, usable / per_file) / self.n
        alternative = self._choose(others, usable)
        return sum(self._gain(s) for s in alternative) > keep_going

    def _end_stage(self, stage: Stage, rec: Dict[str, Any], done: int, reason: str, mandatory: bool) -> None:
        t = self.clock()
        out_buf = self._buf(1 - self.buffer)
        if mandatory:
            self._fill_fallback(out_buf, done)
        elif done < self.n:
            out_buf.copy_from(self._buf(self.buffer), done, self.n)
            if self.n - done:
                self.copy_cost = (self.clock() - t) / (self.n - done)
        if mandatory:
            self.stage0_done = True
        self.buffer = 1 - self.buffer
        self.csv_fresh = False
        rec["status"] = "complete" if done >= self.n else ("partial" if rec["done"] > 0 else "not run")
        if reason:
            rec["note"] = f"{reason} after {done} of {self.n} files"
        if rec.get("measured"):
            rec["files_per_s"] = 1.0 / rec["measured"] if rec["measured"] > 0 else None
        self._commit(running=None)          # the new buffer is complete: the CSV may follow
        self._write_csv()
        rec["seconds"] = float(rec["seconds"]) + (self.clock() - t)
        self._commit(running=None)
        self.log(f"[{stage.name}] {rec['status']}: {rec['done'] if done >= self.n else done} files, "
                 f"{rec['seconds']:.1f} s{'; ' + rec['note'] if rec['note'] else ''}; {self._postfix()}")
        if self.on_stage_end is not None:
            self.on_stage_end(stage.name, self._read_current)

    def _fill_fallback(self, buf, done: int) -> None:
        """Give unreadable and unreached rows the mean map of the predicted ones."""
        bad = sorted(r for r in self.ctx.bad_rows if r < done)
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

    # ================================================================== run
    def _restore(self, state: Dict[str, Any]) -> bool:
        """Adopt a saved state; False when it belongs to another run."""
        if state.get("fingerprint") != self.fingerprint:
            saved = state.get("fingerprint") or {}
            differ = sorted(k for k in self.fingerprint if saved.get(k) != self.fingerprint[k])
            warnings.warn(f"{self.state_dir}: saved progress belongs to another run ({', '.join(differ)} "
                          "differ); starting over", RuntimeWarning, stacklevel=3)
            return False
        self.records = state["records"]
        self.buffer = int(state["buffer"])
        self.ctx.avail = {k: int(v) for k, v in state["avail"].items()}
        self.ctx.executed = list(state["executed"])
        self.ctx.bad_rows = {int(r): m for r, m in state["bad"].items()}
        self.ctx.family_names = list(state["families"])
        self.ctx.member_cost = {k: float(v) for k, v in state["member_cost"].items()}
        self.ctx.io_cost = float(state["io_cost"])
        self.plan = list(state["plan"])
        self.stage0_done = bool(state["stage0_done"])
        self.csv_fresh = bool(state.get("csv_fresh", False))
        order = [n.split(":", 1)[1] for n in state["order"] if n.startswith("member:")]
        self.stages = build_stages(self.specs, order + [m for m in self.ensemble.member_names if m not in order],
                                   self.resources)
        if [s.name for s in self.stages] != state["order"]:
            return False
        for rec in self.records.values():
            rec.pop("measured", None)          # re-time on this machine
        self.resumed = True
        return True

    def _probe_members(self) -> List[str]:
        """Time one forward pass of every member on the first batch; the member order
        for ``members`` (cheapest good first)."""
        names = list(self.ensemble.member_names)
        if len(names) > 1 and any(s == "members" for s in self.specs):
            raw = next(batches(self.source, 0, self.batch_size, 0))
            from ..data.normalize import normalize_seismic
            x = normalize_seismic(raw.seismic[raw.ok].to(self.device).float())
            if len(x):
                for m in names:
                    t = self.clock()
                    self.ensemble.predict_member(m, x)
                    self.ctx.member_cost[m] = (self.clock() - t) / len(x)
        return self.gains.member_order(names, self.ctx.member_cost)

    def run(self) -> RunSummary:
        """Run (or resume) and return the summary; the CSV is complete and valid
        whenever this returns."""
        t_start = self.clock()
        if self.out_csv is not None:    # half-written CSV / summary files of a killed run
            remove_stale_temps(self.out_csv.parent, self.out_csv.name)
            remove_stale_temps(self.out_csv.parent, self.out_csv.stem + "_summary.json")
        remove_stale_temps(self.state_dir)      # and its half-written progress file
        budget = None if math.isinf(self.deadline.remaining()) else self.deadline.remaining()
        self.budget = budget
        state = self.store.load_progress() if self.resume else None
        if state is None or not self._restore(state):
            self.store.remove()
            self.store = PredictionStore(self.state_dir, self.n, self.store_dtype)
            self.ctx = RunContext(self.ensemble, self.store, self.device, self.ctx.seed)
            self.records, self.buffer, self.plan, self.stage0_done, self.resumed = {}, 0, [], False, False
            self.csv_fresh = False
            self._buf(0)
            self._buf(1)
            try:
                self.stages = build_stages(self.specs, self._probe_members(), self.resources)
            except StageError:    # a bad stage list: leave no state folder behind
                self.store.remove()
                raise
        elif state.get("finished"):
            # killed after the finished commit, before the summary file or the state's removal
            self.log(f"{self.state_dir}: this run already finished")
            if self.out_csv is not None and not (self.csv_fresh and self.out_csv.is_file()):
                self._write_csv()
            summary = RunSummary(**state["summary"])
            self._wrap_up(summary)
            return summary
        self.ctx.stages = {s.name: s for s in self.stages}
        for s in self.stages:
            self._record(s)
        self._probe_io()
        self._commit()
        self.log(f"{self.n} files; {self._postfix()}; stages in priority order: "
                 f"{', '.join(s.name for s in self.stages)}")

        first = self.stages[0]
        running = state.get("running") if self.resumed and state else None
        if self.stage0_done and not self.csv_fresh:
            self._write_csv()        # interrupted between a stage's end and its CSV
            self._commit()
        if not self.stage0_done:
            self._run_stage(first, mandatory=True)
            self._after_first(first)
        elif running:
            st = self.ctx.stages[running]
            self.log(f"resuming stage {running} at file {self.records[running]['done']}")
            self._run_stage(st, mandatory=False)
        while True:
            pool = self._candidates()
            if not pool:
                break
            for s in pool:
                if self.select and math.isfinite(self.deadline.remaining()):
                    self._probe(s)
            chosen = self._choose(pool, self.deadline.remaining() if math.isfinite(self.deadline.remaining())
                                  else math.inf)
            if not chosen:
                for s in pool:
                    rec = self._record(s)
                    t = self._plan_time([s])
                    rec.update(status="skipped", note="no cost estimate and too little time to time it"
                               if t is None else
                               f"needs about {t:.0f} s, {max(0.0, self.deadline.remaining()):.0f} s left")
                break
            if not self.plan:
                self.plan = [s.name for s in chosen]
                self.log(f"plan: {', '.join(self.plan)}")
            self._run_stage(chosen[0], mandatory=False)
        return self._finish(t_start, budget)

    def _after_first(self, first: Stage) -> None:
        rec = self.records[first.name]
        if rec.get("measured") is not None:
            member = getattr(first, "member", None)
            probe = self.ctx.member_cost.get(member)
            if member is not None and probe is None:
                self.ctx.member_cost[member] = rec["measured"]
            elif probe is not None:
                self.ctx.io_cost = max(0.0, rec["measured"] - probe)
        self._commit()

    def _finish(self, t_start: float, budget: Optional[float]) -> RunSummary:
        for s in self.stages:
            rec = self._record(s)
            if rec["status"] == "running":
                rec["status"] = "partial"
        summary = RunSummary(
            csv=None if self.out_csv is None else str(self.out_csv), files=self.n, budget_s=budget,
            elapsed_s=self.clock() - t_start, met_deadline=self.deadline.remaining() >= 0, plan=list(self.plan),
            stages=[{k: v for k, v in self.records[s.name].items() if k not in ("done", "measured")}
                    for s in self.stages],
            bad_files={self.ids[r]: m for r, m in sorted(self.ctx.bad_rows.items())},
            fallback_files=len(self.ctx.bad_rows) + self._unreached(), resumed=self.resumed,
            uncertainty=self._uncertainty())
        self._commit(finished=True, summary=summary.to_dict())
        self._wrap_up(summary)
        self.log(summary.format())
        return summary

    def _wrap_up(self, summary: RunSummary) -> None:
        """After the finished commit: save the summary beside the CSV, remove the state
        (a run killed in between does this when resumed)."""
        if self.out_csv is not None:
            summary.save(self.out_csv.with_name(self.out_csv.stem + "_summary.json"))
        if not self.keep_state:
            self.store.remove()

    def _unreached(self) -> int:
        first = self.records.get(self.stages[0].name, {})
        return self.n - int(first.get("done", 0)) if first.get("status") != "complete" else 0

    def _uncertainty(self) -> Optional[Dict[str, Dict[str, Any]]]:
        """Per-family MC-dropout standard deviation, streamed from the stored map."""
        upto = self.ctx.avail.get("mc_std", 0)
        if upto <= 0:
            return None
        arr = self.store.array("mc_std")
        fam = self.store.array("family", (), "int16") if self.ctx.family_names else None
        acc: Dict[str, List[Any]] = {}
        for s in range(0, upto, 1024):
            e = min(upto, s + 1024)
            ok = self.ctx.row_ok(s, e)
            std = arr.read(s, e).astype(np.float64)
            codes = fam.read(s, e) if fam is not None else np.full(e - s, -1)
            for i in np.flatnonzero(ok):
                name = self.ctx.family_names[codes[i]] if codes[i] >= 0 else "all"
                a = acc.setdefault(name, [0, 0.0, np.zeros(70)])
                a[0] += 1
                a[1] += float(std[i].mean())
                a[2] += std[i].mean(1)
        return {f: {"files": c, "mean_std": tot / c, "depth_std": (prof / c).tolist()}
                for f, (c, tot, prof) in sorted(acc.items())}


def _measured(times: Sequence[float]) -> float:
    """Seconds per file from per-batch timings (the first batch, often a warm-up, is left
    out once there are others)."""
    t = list(times[1:]) if len(times) > 1 else list(times)
    return float(np.mean(t[-20:]))


def _check_output(out, k: int, name: str) -> torch.Tensor:
    if not torch.is_tensor(out) or tuple(out.shape) != (k, 1) + MAP:
        shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise ValueError(f"stage {name!r} returned {shape}, expected a ({k}, 1, 70, 70) tensor of m/s")
    return out.detach().float().cpu()


def _crf_id(crf) -> Any:
    try:
        return {k: round(float(v), 8) for k, v in crf.config().items()}
    except Exception:  # noqa: BLE001 - a foreign post-processor: identify by type
        return type(crf).__name__


def _hms(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def run_budgeted(ensemble, root_or_source, out_csv: Optional[PathLike], time_budget: Optional[float] = None,
                 **kwargs) -> RunSummary:
    """:class:`BudgetedInference` in one call: ``root_or_source`` is a competition root
    (its ``test/*.npy``) or a source; ``time_budget`` seconds from the process start
    (None: the platform's default deadline)."""
    from .source import TestFileSource

    source = root_or_source if hasattr(root_or_source, "read") else TestFileSource(root_or_source)
    deadline = kwargs.pop("deadline", None)
    if deadline is None:
        deadline = Deadline.from_budget(time_budget) if time_budget is not None else Deadline.platform_default()
    return BudgetedInference(ensemble, source, out_csv, deadline=deadline, **kwargs).run()
