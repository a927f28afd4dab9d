"""Measure the gains table on validation data: :func:`measure_stage_gains` runs the
planner's stages over validation samples (every stage, in order, no deadline) and
:func:`compute_stage_gains` turns the prediction after each stage into the validation-MAE
decrease the planner ranks stages by (:class:`~fwi_core.inference_plan.gains.StageGains`).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from ..inference import to_velocity
from ..metrics import mae
from .deadline import Deadline
from .gains import StageGains
from .identity import member_digests
from .planner import BudgetedInference
from .source import ArraySource
from .ranking import KIND_NAMES
from .stages import DEFAULT_STAGES, member_array
from .stages.refine import KIND_ARRAY

PathLike = Union[str, os.PathLike]

__all__ = ["compute_stage_gains", "measure_stage_gains", "MEASURED_STAGES", "REFINE_SAMPLES_PER_KIND",
           "GAINS_TIME_BUDGET"]


def _mae(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    return np.asarray(mae(np.asarray(pred, dtype=np.float32).reshape(len(true), 70, 70),
                          np.asarray(true, dtype=np.float32).reshape(len(true), 70, 70)))


def compute_stage_gains(true: np.ndarray, cumulative: Mapping[str, np.ndarray],
                        families: Optional[Sequence[str]] = None,
                        members: Optional[Mapping[str, np.ndarray]] = None,
                        baseline: float = 3000.0) -> StageGains:
    """The gains table from validation predictions.

    Args:
        true: (N,1,70,70) or (N,70,70) true velocities, m/s.
        cumulative: stage name -> (N,...) prediction (m/s) after that stage and every
            stage before it, in the order the stages ran (a dict keeps it).
        families: N family names (adds per-family gains).
        members: member name -> its own (N,...) prediction (m/s), for ``member_mae``.
        baseline: the first stage's gain is measured against this constant map (the
            sample submission's 3000 m/s).

    Returns:
        A :class:`StageGains`: gain of stage k = MAE before it - MAE after it.
    """
    true = np.asarray(true, dtype=np.float32)
    n = len(true)
    if n == 0:
        raise ValueError("compute_stage_gains: no validation samples")
    if families is not None and len(families) != n:
        raise ValueError(f"compute_stage_gains: {n} samples but {len(families)} families")
    fams = np.asarray(families) if families is not None else None

    def per_family(err: np.ndarray) -> Dict[str, float]:
        return {} if fams is None else {str(f): float(err[fams == f].mean()) for f in np.unique(fams)}

    prev = _mae(np.full_like(true, baseline), true)
    out = StageGains(samples=n, order=list(cumulative))
    for name, pred in cumulative.items():
        if len(pred) != n:
            raise ValueError(f"compute_stage_gains: stage {name!r} has {len(pred)} predictions for {n} samples")
        err = _mae(pred, true)
        out.gains[name] = float(prev.mean() - err.mean())
        out.mae[name] = float(err.mean())
        if fams is not None:
            before, after = per_family(prev), per_family(err)
            out.per_family[name] = {f: before[f] - after[f] for f in after}
        prev = err
    for name, pred in (members or {}).items():
        out.member_mae[name] = float(_mae(pred, true).mean())
    return out


#: What is measured by default: the infer kernel's plan (the CLI's default) without the
#: consistency flags, which change no map.
MEASURED_STAGES = tuple(s for s in DEFAULT_STAGES if s != "consistency")
#: Refinement is measured on at most this many validation samples per family kind (evenly
#: spaced over the samples routed to the kind, the kinds taken in turn): its cost per sample
#: is minutes on a CPU.
REFINE_SAMPLES_PER_KIND = 8
#: The train kernel's measurement stops refining after this many seconds (the network
#: stages always run): a small share of a Kaggle session.
GAINS_TIME_BUDGET = 600.0


def measure_stage_gains(ensemble, seismic, true: np.ndarray, families: Optional[Sequence[str]] = None,
                        stages: Sequence[Any] = MEASURED_STAGES, crf=None, batch_size: int = 16, device=None,
                        mc_passes: int = 8, refine_iters: Optional[Sequence[int]] = None,
                        refine_samples: int = REFINE_SAMPLES_PER_KIND, time_budget: Optional[float] = None,
                        state_dir: Optional[PathLike] = None, progress: bool = False,
                        log: Optional[Callable[[str], None]] = None) -> StageGains:
    """Run the stages over validation samples (every stage, in order, no deadline) and
    turn the prediction after each into :func:`compute_stage_gains`; refinement (a ranked
    stage) is measured per family kind on ``refine_samples`` samples of each kind.

    Args:
        ensemble: a :class:`~fwi_core.ensemble.Ensemble`.
        seismic: (N,5,1000,70) raw validation gathers (array, memmap, or a callable
            ``seismic(i)`` with ``len(true)`` samples, e.g. ``lambda i: ds.raw(i)[0]``).
        true: (N,1,70,70) true velocities, m/s.
        families: N family names.
        stages, crf, mc_passes: as for :class:`~fwi_core.inference_plan.planner.BudgetedInference`
            (default: :data:`MEASURED_STAGES`, the infer kernel's plan).
        refine_iters: refinement iterations (flat, others; default the stages' own).
        refine_samples: samples per family kind that refinement is measured on (at most).
        time_budget: seconds from now after which refinement stops (the kinds are
            refined in turn, so each gets samples); None: no limit.
        state_dir: scratch folder (default: a temporary folder, removed afterwards).
        log: ``log(message)`` for the planner's lines (default: silent).

    Returns:
        The table (save it beside the checkpoints with ``.save(folder)``): per stage the
        validation MAE it removed (for a ranked stage, what a pass over every sample is
        expected to remove: the kinds' shares times their gains) and its seconds per file
        (per refined sample for refinement); ``per_kind`` for refinement; the members'
        weight digests.
    """
    if refine_samples < 1:
        raise ValueError(f"measure_stage_gains: refine_samples must be >= 1, got {refine_samples}")
    true = np.asarray(true, dtype=np.float32)
    n = len(true)
    source = ArraySource(seismic, n=n if callable(seismic) else None)
    cumulative: Dict[str, np.ndarray] = {}

    def grab(name, read_rows):
        cumulative[name] = read_rows(0, n).copy()

    resources = {"refine_limit": int(refine_samples)}
    if refine_iters is not None:
        resources["refine_iters"] = list(refine_iters)
    with tempfile.TemporaryDirectory(dir=state_dir) as tmp:
        deadline = Deadline.from_budget(time_budget, age=0.0) if time_budget is not None else Deadline(None)
        planner = BudgetedInference(ensemble, source, None, stages=stages, crf=crf, batch_size=batch_size,
                                    device=device, mc_passes=mc_passes, state_dir=Path(tmp) / "state",
                                    select=False, keep_state=True, progress=progress, on_stage_end=grab,
                                    log=log, resources=resources, deadline=deadline,
                                    gather_cache=False)
        planner.run()
        members = {}
        for m in ensemble.member_names:
            if planner.ctx.avail.get(member_array(m), 0) >= n:
                arr = planner.store.array(member_array(m)).read(0, n).astype(np.float32)
                members[m] = to_velocity(torch.from_numpy(arr)).numpy()
        table = compute_stage_gains(true, cumulative, families, members)
        _ranked_gains(planner, table, cumulative, true)
        planner.store.remove()
    table.members = member_digests(ensemble)
    return table


def _ranked_gains(planner: BudgetedInference, table: StageGains, cumulative: Dict[str, np.ndarray],
                  true: np.ndarray) -> None:
    """Per-kind gains and seconds of the ranked stages (refinement), each stage's seconds."""
    n = len(true)
    names = list(cumulative)
    kinds = None
    if planner.ctx.avail.get(KIND_ARRAY, 0):
        kinds = planner.store.array(KIND_ARRAY, (), "int8").read(0, n).astype(np.int64) - 1
    settled = planner.store.array("settled", (), "int16").read(0, n) if planner.ctx.avail.get("settled") else None
    for i, stage in enumerate(planner.stages):
        rec = planner.state.records.get(stage.name, {})
        if stage.name not in cumulative:
            continue
        if not getattr(stage, "ranked", False):
            table.seconds[stage.name] = {"all": float(rec.get("seconds", 0.0)) / n}
            continue
        code = list(planner.ctx.stages).index(stage.name) + 1
        rows = np.flatnonzero(settled == code) if settled is not None else np.zeros(0, np.int64)
        if not len(rows) or kinds is None:
            continue
        k = names.index(stage.name)
        before = cumulative[names[k - 1]] if k > 0 else np.full_like(true, 3000.0)
        removed = _mae(before[rows], true[rows]) - _mae(cumulative[stage.name][rows], true[rows])
        per_kind = {KIND_NAMES[c]: float(removed[kinds[rows] == c].mean()) for c in np.unique(kinds[rows])}
        table.per_kind[stage.name] = per_kind
        # a pass over every sample: each kind's share of the samples times its gain per refined sample
        table.gains[stage.name] = float(sum(np.mean(kinds == KIND_NAMES.index(kd)) * g for kd, g in per_kind.items()))
        table.seconds[stage.name] = {"all": float(rec.get("seconds", 0.0)) / len(rows)}
