"""The stage interface: :class:`Stage`, what a stage sees of a batch (:class:`BatchState`)
and of the run (:class:`RunContext`).

A run is a sequence of stages, each a pass over every file that turns the current
prediction into a better one. Two kinds:

- producers (built in: ``MemberStage``, ``FlipStage``, ``MCDropoutStage``) compute
  something per member (a member's prediction, its flipped-input prediction, its
  MC-dropout mean and standard deviation) and store it on disk; their output is the
  ensemble's combination of everything stored so far (:meth:`RunContext.base_prediction`),
  with the cheap post-processing stages that already ran applied again;
- transforms (``CRFStage``, and plug-ins such as physics refinement) map the current
  prediction (m/s) of a batch to an improved one.

Writing a stage (e.g. ``fwi_core.physics.refine``)::

    class RefineStage(Stage):
        name = kind = "refine"
        default_gain = 5.0          # m/s of validation MAE it removes when stage_gains.json lacks "refine"
        needs_seismic = True        # it reads batch.seismic (raw gathers)

        def run(self, batch: BatchState) -> torch.Tensor:
            v = batch.pred          # (B,1,70,70) m/s, the current prediction of batch.ids
            ...                     # batch.seismic (B,5,1000,70) raw, batch.x normalised,
            return refined          # batch.families (list or None), batch.std (MC std or None)

    register_stage("refine", lambda resources: RefineStage())   # then stages=[..., "refine"]

``run`` must be deterministic for a given batch (a resumed run recomputes the batch it
was interrupted in) and return finite (B,1,70,70) m/s; values are clamped to
1500..4500 afterwards. It may keep per-file results with ``batch.write(name, values)``
/ ``batch.read(name)``. The planner times it on the first batch (or uses
:meth:`Stage.estimate`) and runs it over as many files as the deadline allows. A
transform whose effect a later producer would overwrite must come after every producer
in the stage list (only ``reapply`` transforms, such as the CRF, may come earlier). The
planner may still re-plan a producer after it; a transform whose per-sample result must
survive that (physics refinement) sets ``settles`` and marks its rows with
:meth:`BatchState.settle`: later stages then leave those rows alone.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ...data.normalize import VEL_MAX, VEL_MIN, denormalize_velocity, normalize_seismic

__all__ = ["Stage", "BatchState", "RunContext", "MAP", "member_array", "stage_array"]

#: One velocity map (depth, x).
MAP = (70, 70)


def _to_velocity(pred_norm: torch.Tensor) -> torch.Tensor:
    return denormalize_velocity(pred_norm.float()).clamp_(VEL_MIN, VEL_MAX)


class Stage(abc.ABC):
    """One improvement pass (see the module doc). Subclasses implement :meth:`run`; those
    with ``reapply = True`` also :meth:`transform` (checked when the class is defined).

    Attributes:
        name: unique name in a run (e.g. ``member:<member>``, ``flip``, ``crf``).
        kind: the key of the gains table used when it has no entry for ``name``.
        default_gain: expected validation-MAE decrease (m/s) when the table has neither.
        needs_seismic: the stage reads the gathers (the planner then streams the files).
        producer: recomputes the ensemble's combination (built-in member-level stages).
        reapply: (transforms) cheap and deterministic: re-applied by producers that run
            after it, so it may precede them in the list.
        settles: (transforms such as physics refinement) the rows it marks with
            :meth:`BatchState.settle` are final: every stage that runs after it, in whatever
            order the planner re-plans, leaves those rows' prediction as it is.
        observes: (diagnostics such as the consistency flags) it does not change the maps
            but describes them; when a later stage changes maps, the planner discards what it
            found (:meth:`reset`) and it may run again.
        ranked: (physics refinement) it works on candidate samples, best expected gain
            first, and may run on part of them (it then also defines ``candidates``,
            ``cheap_scores``, ``final_scores``, ``kinds_of``, ``misfit`` and
            ``screen_cost``; see :mod:`fwi_core.inference_plan.ranked`).
        starts: it may be the first stage: it predicts every file on its own (a member;
            ``prior``, which reads an existing submission).
    """

    name: str = "stage"
    kind: str = "stage"
    default_gain: float = 0.0
    needs_seismic: bool = True
    producer: bool = False
    reapply: bool = False
    settles: bool = False
    observes: bool = False
    ranked: bool = False
    starts: bool = False

    def unavailable(self, ctx: "RunContext") -> Optional[str]:
        """Why the stage cannot run in this run (e.g. no dropout layers), or None."""
        return None

    def estimate(self, ctx: "RunContext", before: Sequence["Stage"]) -> Optional[float]:
        """Seconds per file before the stage has run, given the stages that will have
        run before it; None: the planner times :meth:`run` on the first batch."""
        return None

    def prepare(self, ctx: "RunContext") -> None:
        """Called once before the stage's first batch (in each process)."""

    def disk_bytes(self, ctx: "RunContext", before: Sequence["Stage"] = ()) -> int:
        """Bytes the stage adds to the state folder (its stored per-file arrays), given the
        stages that will have run before it; the planner skips a stage that would take the
        folder over its limit."""
        return 0

    def first_pass(self, batch: "BatchState", pred: torch.Tensor) -> None:
        """Called for each batch of the first pass with its prediction (m/s), while the
        gathers are in memory: store per-file features the stage needs later (refinement
        stores each file's family kind)."""

    def fallback(self, ctx: "RunContext", rows: np.ndarray) -> Optional[np.ndarray]:
        """(first stages) (k,70,70) m/s for the rows its first pass could not predict
        (unreadable or unreached files), or None: the mean map of the predicted rows."""
        return None

    def reset(self, ctx: "RunContext") -> None:
        """(observers) Forget what the stage found: later stages changed the maps it saw."""

    def identity(self) -> Dict[str, object]:
        """What distinguishes this stage's output from another configuration of it (part of
        the run's fingerprint: a saved run whose stages had other options is not resumed)."""
        return {"name": self.name, "class": type(self).__name__}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.reapply and cls.transform is Stage.transform:
            raise TypeError(f"stage class {cls.__name__} sets reapply = True but defines no transform(pred, batch)")

    @abc.abstractmethod
    def run(self, batch: "BatchState") -> torch.Tensor:
        """The improved prediction (B,1,70,70) m/s of ``batch``."""

    def transform(self, pred: torch.Tensor, batch: "BatchState") -> torch.Tensor:
        """(reapply transforms) apply the stage to ``pred`` (B,1,70,70) m/s. Only stages
        with ``reapply = True`` have one."""
        raise TypeError(f"{self!r} is not a reapply stage: it has no transform")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


@dataclass
class BatchState:
    """What a stage sees of one batch.

    Attributes:
        start, stop: the batch covers rows ``start:stop`` of the run's files.
        rows: (B,) global row indices of the readable files in it (what the stage
            predicts; unreadable files keep their fallback prediction).
        ids: B file ids (oids).
        pred: (B,1,70,70) m/s, the current prediction of those files.
        seismic: (B,5,1000,70) raw gathers, or None for stages without ``needs_seismic``.
        families: B family names (predicted by the ensemble's family classifier) or None.
        ctx: the run (ensemble, stored arrays, what has run).
        probe: True while the planner times the stage (writes are discarded).
        settled: (B,) int codes: 0, or which settling stage made the row final (the runner
            keeps those rows' prediction whatever a later stage returns; see :meth:`settle`).
        code: this stage's code in ``settled``.
        scattered: the rows are chosen rows in rank order (a ranked stage), not the
            readable rows of ``start:stop``.
        kinds: (ranked refinement) the family kind each row was routed to, or None.
        time_limit: (ranked stages) wall-clock seconds the batch may take before the run's
            share ends, or None.
    """

    start: int
    stop: int
    rows: np.ndarray
    ids: List[str]
    pred: torch.Tensor
    seismic: Optional[torch.Tensor]
    families: Optional[List[str]]
    ctx: "RunContext"
    probe: bool = False
    settled: Optional[np.ndarray] = None
    code: int = 0
    scattered: bool = False
    kinds: Optional[List[str]] = None
    time_limit: Optional[float] = None
    _x: Optional[torch.Tensor] = field(default=None, repr=False)
    settle_mask: Optional[np.ndarray] = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.rows)

    def settled_by_others(self) -> np.ndarray:
        """(B,) bool: rows a different settling stage already made final."""
        if self.settled is None:
            return np.zeros(len(self.rows), dtype=bool)
        return (self.settled != 0) & (self.settled != self.code)

    def settle(self, mask) -> None:
        """(settling stages) Mark the rows of ``mask`` (B,) final: later stages keep their
        prediction (the runner stores the marks with the batch, before its commit)."""
        mask = np.asarray(mask, dtype=bool).reshape(len(self.rows))
        self.settle_mask = mask if self.settle_mask is None else (self.settle_mask | mask)

    @property
    def x(self) -> torch.Tensor:
        """Normalised seismic (B,5,1000,70) on the run's device."""
        if self.seismic is None:
            raise RuntimeError("BatchState.x: this stage was declared needs_seismic=False")
        if self._x is None:
            self._x = normalize_seismic(self.seismic.to(self.ctx.device, non_blocking=True).float())
        return self._x

    @property
    def std(self) -> Optional[torch.Tensor]:
        """MC-dropout standard deviation (B,1,70,70) m/s where it ran, else None."""
        if not len(self.rows) or self.ctx.avail.get("mc_std", 0) <= int(self.rows.max()):
            return None
        return torch.from_numpy(self.read("mc_std").astype(np.float32))[:, None]

    def read(self, name: str) -> np.ndarray:
        """Rows of this batch of the stored array ``name`` (k, *item_shape)."""
        arr = self.ctx.store.array(name)
        if self.scattered:
            return arr.read_rows(self.rows)
        return arr.read(self.start, self.stop)[self.rows - self.start]

    def write(self, name: str, values, mask: Optional[np.ndarray] = None, item_shape=MAP, dtype=None) -> None:
        """Store ``values`` (k, *item_shape) for this batch's rows (or the ``mask``ed
        subset of them, in order); the array is valid up to this batch afterwards."""
        if self.probe:
            return
        rows = self.rows if mask is None else self.rows[np.asarray(mask, dtype=bool)]
        values = values.detach().cpu().numpy() if torch.is_tensor(values) else np.asarray(values)
        values = values.reshape((len(rows),) + tuple(item_shape))
        arr = self.ctx.store.array(name, item_shape, dtype)
        if self.scattered:        # chosen rows: stored, not tracked as a covered prefix
            arr.write_rows(rows, values)
            return
        window = arr.read(self.start, self.stop)
        window[rows - self.start] = values
        arr.write(self.start, window)
        covered = np.zeros(self.stop - self.start, dtype=bool)
        covered[rows - self.start] = True
        covered[~self.ctx.row_ok(self.start, self.stop)] = True   # unreadable rows never need it
        first_gap = int(np.argmin(covered)) if not covered.all() else len(covered)
        self.ctx.avail[name] = max(self.ctx.avail.get(name, 0), self.start + first_gap)


class RunContext:
    """The run as stages see it: the ensemble, the stored arrays, what has run.

    Attributes:
        ensemble: a :class:`~fwi_core.ensemble.Ensemble`.
        store: the :class:`~fwi_core.inference_plan.store.PredictionStore`.
        device: where the seismic goes.
        avail: stored array name -> number of leading rows that hold valid values.
        executed: names of the stages that have run (or are running), in order.
        stages: every stage of the run by name.
        member_cost: member name -> seconds per file of one forward pass (timed).
        io_cost: seconds per file of reading and normalising the gathers.
        seed: base seed of the stochastic stages.
        batch_size: files per batch (stages time themselves at this size).
        ids: the run's file ids, row by row.
    """

    def __init__(self, ensemble, store, device: torch.device, seed: int = 0, batch_size: int = 1,
                 ids: Sequence[str] = ()):
        self.ensemble = ensemble
        self.store = store
        self.device = device
        self.seed = int(seed)
        self.avail: Dict[str, int] = {}
        self.executed: List[str] = []
        self.stages: Dict[str, Stage] = {}
        self.member_cost: Dict[str, float] = {}
        self.io_cost: float = 0.0
        self.bad_rows: Dict[int, str] = {}
        self.family_names: List[str] = []
        self.batch_size = int(batch_size)
        self.ids: List[str] = list(ids)

    # -- helpers ------------------------------------------------------------------
    def row_ok(self, start: int, stop: int) -> np.ndarray:
        ok = np.ones(stop - start, dtype=bool)
        for r in self.bad_rows:
            if start <= r < stop:
                ok[r - start] = False
        return ok

    def has_run(self, kind: str, before: Optional[str] = None) -> bool:
        """Whether a stage of ``kind`` ran (is in ``executed``), optionally before ``before``."""
        names = self.executed if before is None or before not in self.executed \
            else self.executed[:self.executed.index(before)]
        return any(self.stages[n].kind == kind for n in names if n in self.stages)

    def map_bytes(self) -> int:
        """Bytes of one stored map per file over the run's files (the store's dtype)."""
        return int(self.store.n) * MAP[0] * MAP[1] * int(np.dtype(self.store.dtype).itemsize)

    def members_run(self) -> List[str]:
        """Members whose predictions are stored (in ensemble order)."""
        return [m for m in self.ensemble.member_names if self.avail.get(member_array(m), 0) > 0]

    # -- the ensemble's combination ------------------------------------------------
    def member_prediction(self, name: str, batch: BatchState) -> Tuple[torch.Tensor, np.ndarray]:
        """(normalised (B,1,70,70), available (B,) bool) of one member for the batch rows:
        its MC-dropout mean where that ran, else the flip average, else its plain prediction."""
        rows = batch.rows
        out = np.zeros((len(rows),) + MAP, dtype=np.float32)
        have = np.zeros(len(rows), dtype=bool)
        for arr, how in ((member_array(name, "mc"), "mc"), (member_array(name, "flip"), "flip"),
                         (member_array(name), "raw")):
            a = self.avail.get(arr, 0)
            sel = (rows < a) & ~have
            if not sel.any():
                continue
            vals = batch.read(arr)[sel].astype(np.float32)
            if how == "flip":
                vals = 0.5 * (batch.read(member_array(name))[sel].astype(np.float32) + vals)
            out[sel] = vals
            have |= sel
        return torch.from_numpy(out)[:, None], have

    def base_prediction(self, batch: BatchState) -> torch.Tensor:
        """The ensemble's combination (m/s, (B,1,70,70)) of the stored member predictions
        of the batch rows, with the ``reapply`` transforms that ran applied again."""
        per = {m: self.member_prediction(m, batch) for m in self.ensemble.member_names}
        n = len(batch.rows)
        out = torch.empty(n, 1, *MAP)
        keys = [tuple(m for m in per if per[m][1][i]) for i in range(n)]
        x = batch.x if batch.seismic is not None else None
        for key in dict.fromkeys(keys):
            idx = [i for i in range(n) if keys[i] == key]
            if not key:
                raise RuntimeError(f"no member prediction stored for rows {batch.rows[idx].tolist()}")
            it = torch.as_tensor(idx)
            fams = None if batch.families is None else [batch.families[i] for i in idx]
            preds = {m: per[m][0][it].to(self.device) for m in key}
            xs = None if x is None else x[it.to(x.device)]
            out[it] = _to_velocity(self.ensemble.combine(preds, families=fams, x_norm=xs)).cpu()
        for name in self.executed:
            st = self.stages.get(name)
            if st is None or st.producer or not st.reapply:
                continue
            sel = batch.rows < self.avail.get(stage_array(name), 0)
            if sel.any():
                it = torch.as_tensor(np.flatnonzero(sel))
                out[it] = st.transform(out[it], _subset(batch, sel, out[it])).clamp(VEL_MIN, VEL_MAX).cpu()
        return out


def _subset(batch: BatchState, sel: np.ndarray, pred: torch.Tensor) -> BatchState:
    it = np.flatnonzero(sel)
    return BatchState(batch.start, batch.stop, batch.rows[it], [batch.ids[i] for i in it], pred,
                      None if batch.seismic is None else batch.seismic[torch.as_tensor(it)],
                      None if batch.families is None else [batch.families[i] for i in it], batch.ctx,
                      batch.probe, None if batch.settled is None else batch.settled[it], batch.code, batch.scattered,
                      None if batch.kinds is None else [batch.kinds[i] for i in it])


def member_array(name: str, which: str = "raw") -> str:
    """Stored array name of a member's prediction (``raw``, ``flip`` or ``mc``)."""
    return f"member={name}" if which == "raw" else f"member={name}.{which}"


def stage_array(stage_name: str) -> str:
    """Name under which a transform's coverage (rows done) is tracked."""
    return f"done={stage_name}"
