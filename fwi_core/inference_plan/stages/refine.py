"""Physics refinement as stages of budgeted inference: ``refine_layered`` and ``refine``.

Test-time FWI (:func:`fwi_core.physics.refine`) is the most expensive stage and its gain
depends on the family: on laterally flat layers a 70-value depth profile is refined
quickly and to a fraction of a m/s, on faults and Style maps it takes far more iterations
for a smaller gain (FACTS section 7). So the planner gets it as two stages, in priority
order after the network stages: ``refine_layered`` refines the samples routed to *flat
layers*, ``refine`` the others (2-D TV or the smooth prior by kind).

Both are **ranked** stages: they refine the samples of their kinds (candidates) in order
of expected gain (:mod:`~fwi_core.inference_plan.ranking`: the kind's measured gain, how
sure the routing is, the member disagreement and the data misfit of the current
prediction), as many as their share of the time allows; the summary says how many.

Routing (each file's kind, stored during the first pass while its gathers are in memory):
with a family classifier (the ensemble's), its probabilities summed per kind, the most
probable kind wins; without one, :func:`~fwi_core.physics.detect_family_kind` on the first
member's prediction and the gathers.

Cost: estimated before the stage runs by timing one evaluation (simulation + adjoint) at
the run's batch size and the stage's shots (the two end shots for flat layers) on the
run's device, over 100 time steps scaled to 1000; measured on the first batches and
re-projected. Each batch runs a fixed number of iterations (deterministic, as resumed runs
require; the planner stops between batches). Options come from the run's resources:
``refine_iters`` (iterations for flat / other samples, default (60, 30)), ``refine_kwargs``
(passed to :func:`refine`).
"""
from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ...physics import detect_family_kind, family_kind, generate, refine, seismic_misfit, simulate
from ...physics.forward import DEFAULT_SOURCE_COLUMNS
from ..gains import DEFAULT_GAINS
from ..ranking import KIND_NAMES, error_weight, expected_gain
from .base import BatchState, Stage
from .registry import register_stage

__all__ = ["RefineStage", "DEFAULT_ITERS", "KIND_ARRAY", "KIND_P_ARRAY", "route"]

DEFAULT_ITERS = (60, 30)   # L-BFGS iterations: flat-layered samples, the others
#: evaluations (simulation + adjoint) per L-BFGS iteration, line search included
EVALS_PER_ITER = 1.5
#: stored per file during the first pass: its kind (code + 1; 0 unknown) and the kind probabilities
KIND_ARRAY, KIND_P_ARRAY = "kind", "kind_p"
END_SHOTS = (0, len(DEFAULT_SOURCE_COLUMNS) - 1)


def route(batch: BatchState, pred: torch.Tensor) -> Tuple[np.ndarray, np.ndarray]:
    """(codes (B,), probabilities (B, 3)) of the batch rows' family kinds: the ensemble's
    family classifier's probabilities summed per kind when it has one, else the detector
    on ``pred`` and the gathers (probability 1)."""
    ens = batch.ctx.ensemble
    clf = getattr(ens, "family_classifier", None)
    if clf is not None and hasattr(clf, "predict_proba"):
        proba = clf.predict_proba(batch.x).float().cpu().numpy()                 # (B, F)
        probs = np.zeros((len(proba), len(KIND_NAMES)), dtype=np.float64)
        for j, fam in enumerate(clf.families):
            probs[:, KIND_NAMES.index(family_kind(str(fam)))] += proba[:, j]
    else:
        kinds = detect_family_kind(pred.detach().float().cpu(), batch.seismic.float().cpu())
        probs = np.zeros((len(kinds), len(KIND_NAMES)), dtype=np.float64)
        probs[np.arange(len(kinds)), [KIND_NAMES.index(k) for k in kinds]] = 1.0
    return probs.argmax(1), probs


class RefineStage(Stage):
    """Refine the samples of the given kinds, best expected gain first, by regularised FWI.

    Args:
        name: the stage's name (``refine_layered`` or ``refine``).
        kinds: the kinds this stage refines (``"flat"``, ``"tv"``, ``"smooth"``).
        max_iter: optimiser iterations per batch call.
        default_gain: expected validation-MAE decrease (m/s) without a gains-table entry.
        refine_kwargs: passed to :func:`fwi_core.physics.refine`.
        limit_per_kind: (measuring gains on validation) refine at most this many samples
            of each kind, evenly spaced over the samples routed to it.
    """

    needs_seismic = True
    settles = True          # a refined sample is final: later stages (a re-plan) leave it alone
    ranked = True           # it covers the candidates with the highest expected gain first

    def __init__(self, name: str, kinds: Sequence[str], max_iter: int, default_gain: float,
                 refine_kwargs: Optional[Dict[str, Any]] = None, limit_per_kind: Optional[int] = None):
        self.limit_per_kind = None if limit_per_kind is None else int(limit_per_kind)
        self.name = self.kind = name
        self.kinds = tuple(kinds)
        self.max_iter = int(max_iter)
        self.default_gain = float(default_gain)
        self.refine_kwargs = dict(refine_kwargs or {})
        self.last_counts: Dict[str, int] = {}
        self._timed: Dict[Tuple[str, int, int], Tuple[float, float]] = {}

    def identity(self):
        return {**super().identity(), "kinds": list(self.kinds), "max_iter": self.max_iter,
                "refine_kwargs": {k: repr(v) for k, v in sorted(self.refine_kwargs.items())},
                "limit_per_kind": self.limit_per_kind}

    @property
    def shots(self) -> Optional[Tuple[int, ...]]:
        """The shots a batch of this stage fits: the end shots for flat layers (a laterally
        invariant medium makes the others translations of them), else all."""
        return END_SHOTS if self.kinds == ("flat",) else None

    # -- routing and ranking ---------------------------------------------------------
    def first_pass(self, batch: BatchState, pred: torch.Tensor) -> None:
        """Store each file's kind and kind probabilities (once per file, for both stages)."""
        ctx = batch.ctx
        if ctx.avail.get(KIND_ARRAY, 0) >= batch.stop or batch.seismic is None or not len(batch):
            return
        codes, probs = route(batch, pred)
        batch.write(KIND_ARRAY, codes + 1, item_shape=(), dtype="int8")
        batch.write(KIND_P_ARRAY, probs, item_shape=(len(KIND_NAMES),), dtype="float16")

    def kind_gains(self, gains) -> Dict[str, float]:
        """m/s removed per refined sample of each of its kinds: measured on validation
        (``gains.per_kind[name]``), else the stage's gain for every kind."""
        measured = gains.per_kind.get(self.name, {})
        return {k: float(measured.get(k, gains.gain(self))) for k in self.kinds}

    def candidates(self, ctx, gains) -> np.ndarray:
        """Rows this stage may refine: readable, routed to one of its kinds whose measured
        gain is positive (a kind measured harmful on validation is never refined; when
        measuring, ``limit_per_kind`` set, every kind is), and not made final by another
        stage."""
        n = ctx.store.n
        if ctx.avail.get(KIND_ARRAY, 0) <= 0:
            return np.zeros(0, dtype=np.int64)
        measuring = self.limit_per_kind is not None
        allowed = [KIND_NAMES.index(k) + 1 for k, g in self.kind_gains(gains).items() if g > 0 or measuring]
        codes = ctx.store.array(KIND_ARRAY, (), "int8").read(0, n)
        ok = np.isin(codes, allowed) & ctx.row_ok(0, n)
        if ctx.avail.get("settled", 0):
            settled = ctx.store.array("settled", (), "int16").read(0, n)
            mine = list(ctx.stages).index(self.name) + 1 if self.name in ctx.stages else -1
            ok &= (settled == 0) | (settled == mine)
        rows = np.flatnonzero(ok)
        if self.limit_per_kind is not None:
            keep = []
            for c in np.unique(codes[rows]):
                of_kind = rows[codes[rows] == c]
                pick = np.unique(np.linspace(0, len(of_kind) - 1, min(self.limit_per_kind, len(of_kind))).round())
                keep.append(of_kind[pick.astype(np.int64)])
            rows = np.sort(np.concatenate(keep)) if keep else rows[:0]
        return rows

    def cheap_scores(self, ctx, gains, rows: np.ndarray, disagreement: Optional[np.ndarray]) -> np.ndarray:
        """Expected gain (m/s) of each candidate before its misfit is known; when measuring
        (``limit_per_kind``) the kinds in turn instead, so a time limit leaves samples of each."""
        codes = ctx.store.array(KIND_ARRAY, (), "int8").read_rows(rows).astype(np.int64) - 1
        if self.limit_per_kind is not None:
            turn = np.zeros(len(rows))
            for c in np.unique(codes):
                turn[codes == c] = np.arange(int((codes == c).sum()))
            return -turn
        probs = ctx.store.array(KIND_P_ARRAY, (len(KIND_NAMES),), "float16").read_rows(rows).astype(np.float64)
        return expected_gain(codes, probs, self.kind_gains(gains), error_weight(disagreement, n=len(rows)))

    def final_scores(self, ctx, gains, rows: np.ndarray, disagreement: Optional[np.ndarray],
                     misfit: np.ndarray) -> np.ndarray:
        """Expected gain (m/s) of screened candidates, their misfit included."""
        codes = ctx.store.array(KIND_ARRAY, (), "int8").read_rows(rows).astype(np.int64) - 1
        probs = ctx.store.array(KIND_P_ARRAY, (len(KIND_NAMES),), "float16").read_rows(rows).astype(np.float64)
        return expected_gain(codes, probs, self.kind_gains(gains), error_weight(disagreement, misfit, n=len(rows)))

    def kinds_of(self, ctx, rows: np.ndarray) -> List[str]:
        """The stored kind of each row."""
        codes = ctx.store.array(KIND_ARRAY, (), "int8").read_rows(rows).astype(np.int64) - 1
        return [KIND_NAMES[c] for c in codes]

    # -- costs ---------------------------------------------------------------------
    def _costs(self, ctx) -> Tuple[float, float]:
        """(seconds of one evaluation, seconds of one forward) for a batch of the run's
        size with this stage's shots, on the run's device: timed once over 100 steps and
        scaled to 1000."""
        b = max(1, int(getattr(ctx, "batch_size", 1)))
        shots = self.shots or tuple(range(len(DEFAULT_SOURCE_COLUMNS)))
        key = (str(ctx.device), b, len(shots))
        if key not in self._timed:
            cols = [DEFAULT_SOURCE_COLUMNS[s] for s in shots]
            v = torch.from_numpy(generate("FlatVel_A", b, seed=0)).to(ctx.device)
            obs = simulate(v, nt=100, source_columns=cols)
            best_eval = best_fwd = float("inf")
            for _ in range(2):            # the first call may compile
                t = time.perf_counter()
                with torch.no_grad():
                    simulate(v, nt=100, source_columns=cols)
                _sync(v)
                best_fwd = min(best_fwd, time.perf_counter() - t)
                w = v.clone().requires_grad_(True)
                t = time.perf_counter()
                with torch.enable_grad():
                    ((simulate(w, nt=100, source_columns=cols) - obs) ** 2).sum().backward()
                _sync(v)
                best_eval = min(best_eval, time.perf_counter() - t)
            self._timed[key] = (best_eval * 10.0, best_fwd * 10.0)
        return self._timed[key]

    def estimate(self, ctx, before) -> float:
        """Seconds per refined sample: ``max_iter`` iterations of ``EVALS_PER_ITER``
        evaluations plus the start and final misfits, at the run's batch size."""
        evaluation, forward = self._costs(ctx)
        b = max(1, int(getattr(ctx, "batch_size", 1)))
        return (self.max_iter * EVALS_PER_ITER * evaluation + 2 * forward) / b + getattr(ctx, "io_cost", 0.0)

    def screen_cost(self, ctx) -> float:
        """Seconds per sample of the misfit used in the ranking (one forward, end shots)."""
        b = max(1, int(getattr(ctx, "batch_size", 1)))
        key = (str(ctx.device), b, len(END_SHOTS))
        if key not in self._timed:
            flat = RefineStage("timing", ("flat",), 1, 0.0)
            flat._timed = self._timed
            flat._costs(ctx)
        return self._timed[key][1] / b + getattr(ctx, "io_cost", 0.0)

    # -- per batch -----------------------------------------------------------------
    def misfit(self, batch: BatchState) -> np.ndarray:
        """(B,) normalised data misfit of the current prediction (end shots): how wrong
        it looks to the data."""
        seis = batch.seismic.float()[:, list(END_SHOTS)]
        cols = [DEFAULT_SOURCE_COLUMNS[s] for s in END_SHOTS]
        with torch.no_grad():
            m = seismic_misfit(batch.pred.float().to(batch.ctx.device), seis.to(batch.ctx.device),
                               source_columns=cols)
        return np.asarray(m.detach().cpu().numpy() if torch.is_tensor(m) else m, dtype=np.float64)

    def run(self, batch: BatchState) -> torch.Tensor:
        pred = batch.pred.float()
        seis = batch.seismic.float()
        kinds: List[str] = list(batch.kinds) if batch.kinds is not None else detect_family_kind(pred.cpu(), seis.cpu())
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
        kwargs = dict(self.refine_kwargs)
        if batch.time_limit is not None and "time_budget" not in kwargs:
            kwargs["time_budget"] = max(0.0, float(batch.time_limit))     # never past the share left
        with torch.enable_grad():         # the runner calls stages under no_grad; FWI needs gradients
            refined = refine(pred[idx].to(dev), seis[idx].to(dev), family=[kinds[i] for i in pick],
                             max_iter=self.max_iter, **kwargs)
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
        return cls(name, kinds, int(iters[which]), DEFAULT_GAINS[name], resources.get("refine_kwargs"),
                   resources.get("refine_limit"))


def _sync(t: torch.Tensor) -> None:
    if t.device.type == "cuda":
        torch.cuda.synchronize(t.device)


register_stage("refine_layered", RefineStage.layered)
register_stage("refine", RefineStage.remaining)
