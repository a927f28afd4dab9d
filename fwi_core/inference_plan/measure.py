"""Measure the gains table on validation data: :func:`measure_stage_gains` runs the
planner's stages over validation samples (every stage, in order, no deadline) and
:func:`compute_stage_gains` turns the prediction after each stage into the validation-MAE
decrease the planner ranks stages by (:class:`~fwi_core.inference_plan.gains.StageGains`).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from ..inference import to_velocity
from ..metrics import mae
from .gains import StageGains
from .identity import member_digests
from .planner import BudgetedInference
from .source import ArraySource
from .stages import member_array

PathLike = Union[str, os.PathLike]

__all__ = ["compute_stage_gains", "measure_stage_gains"]


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


def measure_stage_gains(ensemble, seismic, true: np.ndarray, families: Optional[Sequence[str]] = None,
                        stages: Sequence[Any] = ("members", "flip", "crf", "mc_dropout"), crf=None,
                        batch_size: int = 16, device=None, mc_passes: int = 8, state_dir: Optional[PathLike] = None,
                        progress: bool = False) -> StageGains:
    """Run the stages over validation samples (every stage, in order, no deadline) and
    turn the prediction after each into :func:`compute_stage_gains`.

    Args:
        ensemble: a :class:`~fwi_core.ensemble.Ensemble`.
        seismic: (N,5,1000,70) raw validation gathers (array, memmap, or a callable
            ``seismic(i)`` with ``len(true)`` samples, e.g. ``lambda i: ds.raw(i)[0]``).
        true: (N,1,70,70) true velocities, m/s.
        families: N family names.
        stages, crf, mc_passes: as for :class:`~fwi_core.inference_plan.planner.BudgetedInference`.
        state_dir: scratch folder (default: a temporary folder, removed afterwards).

    Returns:
        The table (save it beside the checkpoints with ``.save(folder)``).
    """
    true = np.asarray(true, dtype=np.float32)
    n = len(true)
    source = ArraySource(seismic, n=n if callable(seismic) else None)
    cumulative: Dict[str, np.ndarray] = {}

    def grab(name, read_rows):
        cumulative[name] = read_rows(0, n).copy()

    with tempfile.TemporaryDirectory(dir=state_dir) as tmp:
        planner = BudgetedInference(ensemble, source, None, stages=stages, crf=crf, batch_size=batch_size,
                                    device=device, mc_passes=mc_passes, state_dir=Path(tmp) / "state",
                                    select=False, keep_state=True, progress=progress, on_stage_end=grab,
                                    log=None)
        planner.run()
        members = {}
        for m in ensemble.member_names:
            if planner.ctx.avail.get(member_array(m), 0) >= n:
                arr = planner.store.array(member_array(m)).read(0, n).astype(np.float32)
                members[m] = to_velocity(torch.from_numpy(arr)).numpy()
        planner.store.remove()
    table = compute_stage_gains(true, cumulative, families, members)
    table.members = member_digests(ensemble)
    return table
