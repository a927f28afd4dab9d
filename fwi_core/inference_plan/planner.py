"""The time-budgeted inference planner.

    from fwi_core.ensemble import Ensemble
    from fwi_core.inference_plan import BudgetedInference, Deadline, TestFileSource

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
   gain (validation MAE removed, :mod:`~fwi_core.inference_plan.gains`) that fits in the time left
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

This module wires the parts together: :mod:`.policy` decides what runs next,
:mod:`.runner` runs it (batches, fallbacks, the CSV), :mod:`.progress` commits and
restores the run's progress, :mod:`.summary` reports it.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from ..errors import StageError
from ..utils import default_device, remove_stale_temps
from .deadline import Deadline
from .gains import StageGains
from .policy import Costs, Policy
from .progress import RunProgress, RunState, default_state_dir, restore_state, run_fingerprint
from .runner import StageRunner, prediction_buffer, time_members
from .source import TestFileSource, item_shape_of
from .stages import DEFAULT_STAGES, RunContext, Stage, build_stages
from .store import PredictionStore, state_limit
from .summary import RunSummary, uncertainty_by_family

PathLike = Union[str, os.PathLike]

__all__ = ["BudgetedInference", "run_budgeted"]

#: record fields that are the run's bookkeeping, not the summary's
_INTERNAL = ("done", "measured", "ranked", "final", "copied", "reserve", "screen")


class BudgetedInference:
    """Run an ensemble's stages over a source within a deadline (see the module doc).

    Args:
        ensemble: a :class:`~fwi_core.ensemble.Ensemble` (``member_names``,
            ``predict_member``, ``predict_member_mc``, ``combine``, ``sample_weights``,
            ``predict_families``).
        source: a :class:`~fwi_core.inference_plan.source.TestFileSource` (or any source).
        out_csv: the submission to write (None: no CSV, e.g. on validation data).
        stages: names or :class:`~fwi_core.inference_plan.stages.Stage` objects in priority order
            (default ``members, flip, crf, mc_dropout``).
        deadline: a :class:`Deadline` (default: the platform's session limit minus a
            safety margin, from the process start; none locally).
        gains: the gains table (default: built-in defaults).
        state_dir: where per-file arrays and progress live (default:
            :func:`default_state_dir`). Disk: 19.6 KB per file per stored map (two for
            the current prediction, one per member for each of its prediction, flipped
            prediction and MC mean, one for the MC spread).
        resume: continue the run saved in ``state_dir`` when it is the same run (same test
            files, members' weights, stages and options, resources, gains; otherwise the
            saved state is discarded with a warning that says what differs); False starts
            over (saying so when there was saved progress).
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
        fingerprint_extra: more identity of the run (JSON-able): a saved state with other
            extra identity is not resumed.
        on_stage_end: ``callback(stage_name, read_rows)`` after each stage, where
            ``read_rows(start, stop)`` returns the current (k,70,70) m/s predictions.
        log: ``log(message)`` for plan lines (default print; None: silent).
        resources: extra entries for registered stage factories.
        state_limit_gb: what the state folder may hold, GB (default: 40 on Kaggle, where
            it lives in the temp folder outside the 20 GB output; elsewhere no limit of its
            own); never more than 90% of its disk's free space. The projection is logged when
            the run starts; a stage whose arrays would exceed it is skipped.
        gather_cache: keep a float16 copy of the first files' gathers in the state folder,
            as many as the limit leaves room for after every stage's arrays, so later
            passes read them from there instead of the test files (refinement, which fits
            the data to float32 rounding, always reads the files).
    """

    def __init__(self, ensemble, source, out_csv: Optional[PathLike], stages: Sequence[Any] = DEFAULT_STAGES,
                 deadline: Optional[Deadline] = None, gains: Optional[StageGains] = None,
                 state_dir: Optional[PathLike] = None, resume: bool = False, strict: bool = False,
                 batch_size: int = 16, device: Optional[Union[str, torch.device]] = None, num_workers: int = 0,
                 store_dtype: str = "float32", seed: int = 0, crf=None, mc_passes: int = 8,
                 crf_confidence: bool = False, margin: float = 1.5, progress: bool = True,
                 keep_state: bool = False, select: bool = True, fingerprint_extra: Optional[dict] = None,
                 on_stage_end: Optional[Callable] = None, log: Optional[Callable[[str], None]] = print,
                 resources: Optional[Dict[str, Any]] = None, state_limit_gb: Optional[float] = None,
                 gather_cache: bool = True):
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
        self.gains = (gains or StageGains()).for_ensemble(ensemble)   # members named by their weights
        state_dir = Path(state_dir) if state_dir is not None else default_state_dir(self.out_csv)
        if state_dir is None:
            raise ValueError("BudgetedInference: give state_dir when out_csv is None")
        self.state_dir = state_dir
        self.resume, self.strict = bool(resume), bool(strict)
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.device = torch.device(default_device() if device is None else device)
        self.store_dtype = str(np.dtype(store_dtype))
        self.margin = float(margin)
        self.progress, self.keep_state, self.select = progress, keep_state, select
        self.on_stage_end, self.log_fn = on_stage_end, log
        self.seed = int(seed)
        self.state_limit_gb, self.gather_cache = state_limit_gb, bool(gather_cache)
        self.disk_limit: int = 0
        self.resources = {"ensemble": ensemble, "crf": crf, "mc_passes": int(mc_passes), "device": self.device,
                          "crf_confidence": bool(crf_confidence), "gather_cache": self.gather_cache,
                          **(resources or {})}
        self.fingerprint = run_fingerprint(self.ids, ensemble, self.specs, self.batch_size, self.store_dtype, seed,
                                           self.resources, self.gains.to_dict(), fingerprint_extra)
        self.store = PredictionStore(self.state_dir, self.n, self.store_dtype)
        self.ctx = RunContext(ensemble, self.store, self.device, seed, self.batch_size, self.ids)
        self.state = RunState()
        self.costs = Costs(self.n, self.out_csv is not None)
        self.stages: List[Stage] = []
        self.budget: Optional[float] = None
        self.policy: Optional[Policy] = None         # the parts of a run, wired by run()
        self.runner: Optional[StageRunner] = None
        self.journal: Optional[RunProgress] = None

    # ----------------------------------------------------------------------- what it did
    @property
    def records(self) -> Dict[str, Dict[str, Any]]:
        return self.state.records

    @property
    def plan(self) -> List[str]:
        return self.state.plan

    @property
    def resumed(self) -> bool:
        return self.state.resumed

    @property
    def buffer(self) -> int:
        return self.state.buffer

    @property
    def probe_cost(self) -> Dict[str, float]:
        return self.costs.probe

    def read_prediction(self, start: int, stop: int, previous: bool = False) -> np.ndarray:
        """Rows ``start:stop`` (k,70,70 m/s) of the current prediction, or (``previous``)
        of the one the last stage started from."""
        return prediction_buffer(self.store, 1 - self.state.buffer if previous else self.state.buffer).read(start, stop)

    def log(self, msg: str) -> None:
        if self.log_fn is not None:
            self.log_fn(msg)

    # ----------------------------------------------------------------------- the run
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
        saved = self.store.load_progress() if self.resume else None
        if not self.resume and self.store.progress_path.is_file():
            self.log(f"{self.state_dir}: resume is off: the saved progress there is discarded, starting over")
        restored = saved is not None and self._restore(saved)
        self.disk_limit = state_limit(self.state_dir, self.state_limit_gb)
        if not restored:
            self._start_over()
        self._wire(budget)
        self.policy.disk_limit = self.disk_limit
        if restored and saved.get("finished"):
            # killed after the finished commit, before the summary file or the state's removal
            self.log(f"{self.state_dir}: this run already finished")
            if self.out_csv is not None and not (self.state.csv_fresh and self.out_csv.is_file()):
                self.runner.write_csv()
            summary = RunSummary(**saved["summary"])
            self._wrap_up(summary)
            return summary
        self.ctx.stages = {s.name: s for s in self.stages}
        for s in self.stages:
            self.policy.record(s)
        self.runner.probe_io(self.state_dir / "scratch.npy")
        self.journal.commit()
        self.log(f"{self.n} files; {self.runner.postfix()}; stages in priority order: "
                 f"{', '.join(s.name for s in self.stages)}")
        self.log(self._disk_report())

        first = self.stages[0]
        running = saved.get("running") if restored else None
        if self.state.stage0_done and not self.state.csv_fresh:
            self.runner.write_csv()        # interrupted between a stage's end and its CSV
            self.journal.commit()
        if not self.state.stage0_done:
            self.runner.run_stage(first, mandatory=True)
            self.policy.after_first_pass(first)
            self.journal.commit()
        elif running:
            self.log(f"resuming stage {running} at file {self.state.records[running]['done']}")
            self.runner.run_stage(self.ctx.stages[running], mandatory=False)
        self._spend_the_rest()
        return self._finish(t_start, budget)

    def _restore(self, saved: Dict[str, Any]) -> bool:
        """Adopt a saved state; False when it belongs to another run."""
        state = RunState(resumed=True)
        ctx = RunContext(self.ensemble, self.store, self.device, self.seed, self.batch_size, self.ids)
        order = restore_state(saved, self.fingerprint, state, ctx, self.state_dir)
        if order is None:
            return False
        members = [n.split(":", 1)[1] for n in order if n.startswith("member:")]
        stages = build_stages(self.specs, members + [m for m in self.ensemble.member_names if m not in members],
                              self.resources)
        if [s.name for s in stages] != order:
            return False
        self.state, self.ctx, self.stages = state, ctx, stages
        return True

    def _start_over(self) -> None:
        """A new state folder; the stages, with ``members`` in the order cheapest good
        member first (every member timed on the first batch)."""
        self.store.remove()
        self.store = PredictionStore(self.state_dir, self.n, self.store_dtype)
        self.ctx = RunContext(self.ensemble, self.store, self.device, self.seed, self.batch_size, self.ids)
        self.state = RunState()
        prediction_buffer(self.store, 0)
        prediction_buffer(self.store, 1)
        try:
            names = list(self.ensemble.member_names)
            if len(names) > 1 and any(s == "members" for s in self.specs):
                time_members(self.ensemble, self.source, self.batch_size, self.device, self.clock, self.ctx)
            self.stages = build_stages(self.specs, self.gains.member_order(names, self.ctx.member_cost),
                                       self.resources)
        except StageError:    # a bad stage list: leave no state folder behind
            self.store.remove()
            raise
        self.ctx.stages = {s.name: s for s in self.stages}
        if self.gather_cache:          # the room the stages' arrays leave, for the gathers' float16 copy
            per_file = int(np.prod(item_shape_of(self.source))) * 2
            self.state.cache_rows = int(max(0, min(self.n, (self.disk_limit - self._projected()) // per_file)))

    def _projected(self) -> int:
        """Bytes the state folder holds at most: the two prediction buffers and every
        stage's arrays (all of them run), the gather cache aside."""
        total = 2 * self.n * 70 * 70 * 4
        for i, st in enumerate(self.stages):
            total += st.disk_bytes(self.ctx, self.stages[:i])
        return total

    def _disk_report(self) -> str:
        cache = self.state.cache_rows * int(np.prod(item_shape_of(self.source))) * 2 if self.state.cache_rows else 0
        gb = 1e9
        return (f"state folder {self.state_dir}: up to {(self._projected() + cache) / gb:.2f} GB "
                f"(prediction buffers and the stages' arrays {self._projected() / gb:.2f} GB, float16 gathers of "
                f"{self.state.cache_rows} of {self.n} files {cache / gb:.2f} GB) within its limit of "
                f"{self.disk_limit / gb:.2f} GB")

    def _wire(self, budget: Optional[float]) -> None:
        self.journal = RunProgress(self.store, self.fingerprint, self.state, self.ctx, [s.name for s in self.stages])
        self.policy = Policy(self.stages, self.ctx, self.state, self.gains, self.deadline, self.costs, self.margin,
                             self.select, budget)
        self.runner = StageRunner(self.ensemble, self.source, self.ids, self.out_csv, self.store, self.ctx,
                                  self.state, self.policy, self.journal, self.deadline, self.batch_size,
                                  self.num_workers, self.strict, self.margin, self.progress, self.log,
                                  self.on_stage_end)

    def _spend_the_rest(self) -> None:
        """After the first pass: run the best set of stages that fits, one at a time,
        choosing again after each."""
        while True:
            pool = self.policy.candidates()
            if not pool:
                break
            for s in pool:
                if self.select and math.isfinite(self.deadline.remaining()) and self.policy.should_probe(s):
                    self.runner.probe(s)
            left = self.deadline.remaining()
            chosen = self.policy.choose(pool, left if math.isfinite(left) else math.inf)
            if not chosen:
                self.policy.skip_unaffordable(pool)
                break
            if not self.state.plan:
                self.state.plan = [s.name for s in chosen]
                self.log(f"plan: {', '.join(self.state.plan)}")
            self.runner.run_stage(chosen[0], mandatory=False)

    def _finish(self, t_start: float, budget: Optional[float]) -> RunSummary:
        records = self.state.records
        for s in self.stages:
            rec = self.policy.record(s)
            if rec["status"] == "running":
                rec["status"] = "partial"
        first = records.get(self.stages[0].name, {})
        unreached = self.n - int(first.get("done", 0)) if first.get("status") != "complete" else 0
        summary = RunSummary(
            csv=None if self.out_csv is None else str(self.out_csv), files=self.n, budget_s=budget,
            elapsed_s=self.clock() - t_start, met_deadline=self.deadline.remaining() >= 0,
            plan=list(self.state.plan),
            stages=[{k: v for k, v in records[s.name].items() if k not in _INTERNAL} for s in self.stages],
            bad_files={self.ids[r]: m for r, m in sorted(self.ctx.bad_rows.items())},
            fallback_files=len(self.ctx.bad_rows) + unreached, resumed=self.state.resumed,
            uncertainty=uncertainty_by_family(self.store, self.ctx))
        self.journal.commit(finished=True, summary=summary.to_dict())
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


def run_budgeted(ensemble, root_or_source, out_csv: Optional[PathLike], time_budget: Optional[float] = None,
                 **kwargs) -> RunSummary:
    """:class:`BudgetedInference` in one call: ``root_or_source`` is a competition root
    (its ``test/*.npy``) or a source; ``time_budget`` seconds from the process start
    (None: the platform's default deadline)."""
    source = root_or_source if hasattr(root_or_source, "read") else TestFileSource(root_or_source)
    deadline = kwargs.pop("deadline", None)
    if deadline is None:
        deadline = Deadline.from_budget(time_budget) if time_budget is not None else Deadline.platform_default()
    return BudgetedInference(ensemble, source, out_csv, deadline=deadline, **kwargs).run()
