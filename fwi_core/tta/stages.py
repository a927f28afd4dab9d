"""Stages of budgeted inference and the interface a new stage implements.

A run is a sequence of stages, each a pass over every file that turns the current
prediction into a better one. Two kinds:

- producers (built in: :class:`MemberStage`, :class:`FlipStage`, :class:`MCDropoutStage`)
  compute something per member (a member's prediction, its flipped-input prediction,
  its MC-dropout mean and standard deviation) and store it on disk; their output is the
  ensemble's combination of everything stored so far (:meth:`RunContext.base_prediction`),
  with the cheap post-processing stages that already ran applied again;
- transforms (:class:`CRFStage`, and plug-ins such as physics refinement) map the
  current prediction (m/s) of a batch to an improved one.

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
in the stage list (only ``reapply`` transforms, such as the CRF, may come earlier).
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..data.augment import hflip
from ..data.normalize import VEL_MAX, VEL_MIN, denormalize_velocity, normalize_seismic
from ..errors import StageError

__all__ = ["Stage", "BatchState", "RunContext", "MemberStage", "FlipStage", "CRFStage", "MCDropoutStage",
           "register_stage", "registered_stages", "build_stages", "DEFAULT_STAGES", "StageError"]

#: The default stage list, in priority order ("members" expands to one stage per member,
#: the cheapest good one first).
DEFAULT_STAGES = ("members", "flip", "crf", "mc_dropout")

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
    """

    name: str = "stage"
    kind: str = "stage"
    default_gain: float = 0.0
    needs_seismic: bool = True
    producer: bool = False
    reapply: bool = False

    def unavailable(self, ctx: "RunContext") -> Optional[str]:
        """Why the stage cannot run in this run (e.g. no dropout layers), or None."""
        return None

    def estimate(self, ctx: "RunContext", before: Sequence["Stage"]) -> Optional[float]:
        """Seconds per file before the stage has run, given the stages that will have
        run before it; None: the planner times :meth:`run` on the first batch."""
        return None

    def prepare(self, ctx: "RunContext") -> None:
        """Called once before the stage's first batch (in each process)."""

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
    _x: Optional[torch.Tensor] = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.rows)

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
        store: the :class:`~fwi_core.tta.store.PredictionStore`.
        device: where the seismic goes.
        avail: stored array name -> number of leading rows that hold valid values.
        executed: names of the stages that have run (or are running), in order.
        stages: every stage of the run by name.
        member_cost: member name -> seconds per file of one forward pass (timed).
        io_cost: seconds per file of reading and normalising the gathers.
        seed: base seed of the stochastic stages.
    """

    def __init__(self, ensemble, store, device: torch.device, seed: int = 0):
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
                      batch.probe)


def member_array(name: str, which: str = "raw") -> str:
    """Stored array name of a member's prediction (``raw``, ``flip`` or ``mc``)."""
    return f"member={name}" if which == "raw" else f"member={name}.{which}"


def stage_array(stage_name: str) -> str:
    """Name under which a transform's coverage (rows done) is tracked."""
    return f"done={stage_name}"


# ------------------------------------------------------------------------ built-ins
class MemberStage(Stage):
    """Predict one member (with the flip when the flip stage already ran) and combine it
    with the members stored so far."""

    kind = "member"
    default_gain = 1.0
    producer = True

    def __init__(self, member: str):
        self.member = member
        self.name = f"member:{member}"

    def estimate(self, ctx, before):
        c = ctx.member_cost.get(self.member)
        if c is None:
            return None
        flips = 2.0 if any(s.kind == "flip" for s in before) or ctx.has_run("flip", self.name) else 1.0
        return c * flips + ctx.io_cost

    def run(self, batch):
        ens, x = batch.ctx.ensemble, batch.x
        batch.write(member_array(self.member), ens.predict_member(self.member, x).float())
        if batch.ctx.has_run("flip", before=self.name):
            pf = torch.flip(ens.predict_member(self.member, hflip(x)), (-1,))
            batch.write(member_array(self.member, "flip"), pf.float())
        return batch.ctx.base_prediction(batch)


class FlipStage(Stage):
    """Horizontal-flip TTA: each stored member also predicts the mirrored gathers (source
    order and receivers reversed); its prediction, mirrored back, is averaged with the
    plain one. Approximate (mirrored source 34 sits at column 35, FACTS section 3)."""

    name = kind = "flip"
    default_gain = 0.6
    producer = True

    def estimate(self, ctx, before):
        members = [m for m in ctx.members_run()] + [s.member for s in before if isinstance(s, MemberStage)
                                                     and s.member not in ctx.members_run()]
        if any(m not in ctx.member_cost for m in members):
            return None
        return sum(ctx.member_cost[m] for m in members) + ctx.io_cost

    def unavailable(self, ctx):
        return None

    def run(self, batch):
        ctx = batch.ctx
        xf = hflip(batch.x)
        for m in ctx.ensemble.member_names:
            if ctx.avail.get(member_array(m, "flip"), 0) >= batch.stop:
                continue                      # members run after this stage predict their own flip
            have = batch.rows < ctx.avail.get(member_array(m), 0)
            if not have.any():
                continue
            it = torch.as_tensor(np.flatnonzero(have), device=xf.device)
            pf = torch.flip(ctx.ensemble.predict_member(m, xf[it]), (-1,))
            batch.write(member_array(m, "flip"), pf.float(), mask=have)
        return ctx.base_prediction(batch)


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

    def estimate(self, ctx, before):
        members = ctx.members_run() + [s.member for s in before if isinstance(s, MemberStage)
                                       and s.member not in ctx.members_run()]
        if any(m not in ctx.member_cost for m in members):
            return None
        flip = 2.0 if any(s.kind == "flip" for s in before) or ctx.has_run("flip", self.name) else 1.0
        drop = set(self._droppers(ctx))
        return sum(ctx.member_cost[m] * (self.passes if m in drop else 0) for m in members) * flip + ctx.io_cost

    def run(self, batch):
        from ..ensemble.uncertainty import mixture_variance

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


def _seed(seed: int, start: int, member: int) -> int:
    return (seed * 1_000_003 + start * 7_919 + member * 104_729) % (2 ** 63)


class CRFStage(Stage):
    """The continuous CRF (:class:`~fwi_core.crf.ContinuousCRF`, tuned on validation by
    the train kernel) on the current prediction; cheap, so producers that run after it
    apply it again. ``use_confidence``: weigh its data term by the MC-dropout confidence
    (:func:`fwi_core.ensemble.crf_confidence`) where MC dropout ran."""

    name = kind = "crf"
    default_gain = 0.2
    needs_seismic = False
    reapply = True

    #: Until measured, a CRF pass is assumed to cost this fraction of the cheapest member's
    #: forward pass per file (10 Jacobi iterations over a 5x5 window are tens of MFLOP per
    #: map, a network's forward pass several GFLOP).
    COST_FACTOR = 0.05

    def __init__(self, crf: Optional[torch.nn.Module], use_confidence: bool = False):
        self.crf = crf
        self.use_confidence = use_confidence

    def unavailable(self, ctx):
        return None if self.crf is not None else "no tuned CRF (crf.json beside the checkpoints)"

    def estimate(self, ctx, before):
        costs = [c for c in ctx.member_cost.values() if c > 0]
        return self.COST_FACTOR * min(costs) if costs else None

    @torch.no_grad()
    def transform(self, pred, batch):
        conf = None
        if self.use_confidence:
            std = batch.std
            if std is not None:
                from ..ensemble.uncertainty import crf_confidence
                conf = crf_confidence(std ** 2)
        return self.crf(pred.float(), confidence=conf)

    def run(self, batch):
        return self.transform(batch.pred, batch)


# ------------------------------------------------------------------------ registry
StageFactory = Callable[[Dict[str, Any]], Stage]
_REGISTRY: Dict[str, StageFactory] = {}


def register_stage(name: str, factory: StageFactory) -> None:
    """Make ``name`` usable in stage lists (``--stages``, the infer kernel's ``stages``).

    Args:
        name: the stage name.
        factory: ``factory(resources) -> Stage``; ``resources`` holds ``ensemble``,
            ``crf`` (or None), ``mc_passes``, ``device``, ``checkpoints``.
    """
    if not name or ":" in name or name in ("members", "member"):
        raise StageError(f"register_stage: invalid or reserved stage name {name!r}")
    _REGISTRY[name] = factory


def registered_stages() -> List[str]:
    """Names that stage lists may use besides ``members`` and ``member:<name>``."""
    return sorted(_REGISTRY)


register_stage("flip", lambda r: FlipStage())
register_stage("crf", lambda r: CRFStage(r.get("crf"), use_confidence=bool(r.get("crf_confidence", False))))
register_stage("mc_dropout", lambda r: MCDropoutStage(int(r.get("mc_passes", 8))))


def build_stages(specs: Sequence[Any], member_order: Sequence[str], resources: Dict[str, Any]) -> List[Stage]:
    """Stage objects from names (or Stage objects), in priority order.

    Args:
        specs: names (``members``, ``member:<name>``, registered names) or Stage objects.
        member_order: the order ``members`` expands to (cheapest good member first).
        resources: passed to registered factories.

    Raises:
        StageError: unknown names or members, duplicates, a list not starting with a
            member, or a producer after a transform that it would overwrite.
    """
    members = list(resources["ensemble"].member_names)
    out: List[Stage] = []
    for spec in specs:
        if isinstance(spec, Stage):
            out.append(spec)
        elif spec == "members":
            out.extend(MemberStage(m) for m in member_order if f"member:{m}" not in [s.name for s in out])
        elif isinstance(spec, str) and spec.startswith("member:"):
            m = spec.split(":", 1)[1]
            if m not in members:
                raise StageError(f"stage {spec!r}: no member {m!r}; members: {', '.join(members)}")
            out.append(MemberStage(m))
        elif isinstance(spec, str) and spec in _REGISTRY:
            out.append(_REGISTRY[spec](resources))
        else:
            raise StageError(f"unknown stage {spec!r}; known: members, member:<name>, "
                             f"{', '.join(registered_stages())}")
    names = [s.name for s in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise StageError(f"stage list names {dupes} twice")
    if not out or not isinstance(out[0], MemberStage):
        raise StageError(f"the first stage must be a member (it writes the first complete submission), "
                         f"got {names[:1] or 'nothing'}")
    for i, s in enumerate(out):
        if s.producer:
            blockers = [t.name for t in out[:i] if not t.producer and not t.reapply]
            if blockers:
                raise StageError(f"stage {s.name!r} comes after {blockers}, whose result it would overwrite: "
                                 "put member/flip/mc_dropout stages first")
    return out
