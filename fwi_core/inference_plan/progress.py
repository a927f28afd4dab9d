"""A run's progress on disk: what identifies the run (its fingerprint), what it has done
(:class:`RunState` and the :class:`~fwi_core.inference_plan.stages.RunContext`),
committed to ``progress.json`` in the state folder after every batch, and read back by
a resumed run.

The order of writes makes any kill safe: a batch's rows are written to the stored
arrays first, then the progress that describes them is committed (atomically); a run
killed in between recomputes that batch when resumed.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

from .. import platform
from .stages import RunContext, Stage
from .store import PredictionStore

PathLike = Union[str, os.PathLike]

__all__ = ["STATE_FORMAT", "RunState", "RunProgress", "run_fingerprint", "restore_state", "default_state_dir"]

#: The fingerprint's format (the package's former name: saved states stay resumable).
STATE_FORMAT = "fwi_core.tta/1"


def default_state_dir(out_csv: Optional[PathLike]) -> Optional[Path]:
    """Where a run keeps its state: ``.<csv name>.state`` beside the CSV, except on Kaggle,
    where ``/kaggle/working`` is saved as the notebook's output and limited to 20 GB: there
    ``<temp dir>/fwi-tta/<csv name>.state`` (it survives a kernel restart within the
    session)."""
    if out_csv is None:
        return None
    out_csv = Path(out_csv)
    if platform.detect_platform().name == "kaggle":
        return Path(tempfile.gettempdir()) / "fwi-tta" / f"{out_csv.name}.state"
    return out_csv.parent / f".{out_csv.name}.state"


def run_fingerprint(ids: Sequence[str], members: Sequence[str], specs: Sequence[Any], batch_size: int,
                    store_dtype: str, seed: int, mc_passes: int, crf, extra: Optional[dict]) -> Dict[str, Any]:
    """What makes two runs the same run: a saved state with another fingerprint is not
    resumed."""
    return {
        "format": STATE_FORMAT, "files": len(ids),
        "ids_sha1": hashlib.sha1("\n".join(ids).encode()).hexdigest(),
        "members": list(members),
        "stages": [s.name if isinstance(s, Stage) else str(s) for s in specs],
        "batch_size": batch_size, "store_dtype": store_dtype, "seed": int(seed),
        "mc_passes": int(mc_passes), "crf": None if crf is None else _crf_id(crf),
        "extra": extra or {},
    }


def _crf_id(crf) -> Any:
    try:
        return {k: round(float(v), 8) for k, v in crf.config().items()}
    except Exception:  # noqa: BLE001 - a foreign post-processor: identify by type
        return type(crf).__name__


@dataclass
class RunState:
    """What a run has done, besides what its :class:`RunContext` holds.

    Attributes:
        records: stage name -> its record (status, files, seconds, ..., ``done``: rows
            done; ``measured``: seconds per file on this machine, not restored).
        buffer: which of the two prediction arrays (``pred0``/``pred1``) is current.
        plan: the stages chosen after the first pass.
        stage0_done: the first pass ended (the current prediction covers every file).
        csv_fresh: the CSV holds the current prediction.
        resumed: the run continues a saved one (not saved itself).
    """

    records: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    buffer: int = 0
    plan: List[str] = field(default_factory=list)
    stage0_done: bool = False
    csv_fresh: bool = False
    resumed: bool = False


class RunProgress:
    """Commits a run's progress (``progress.json`` of its store).

    Args:
        store: the run's :class:`~fwi_core.inference_plan.store.PredictionStore`.
        fingerprint: :func:`run_fingerprint` of the run.
        state, ctx: what is committed (read at each commit).
        order: the run's stage names in priority order.
    """

    def __init__(self, store: PredictionStore, fingerprint: Dict[str, Any], state: RunState, ctx: RunContext,
                 order: Sequence[str]):
        self.store, self.fingerprint, self.state, self.ctx = store, fingerprint, state, ctx
        self.order = list(order)

    def snapshot(self, running: Optional[str] = None, finished: bool = False, summary=None) -> Dict[str, Any]:
        st, ctx = self.state, self.ctx
        return {"fingerprint": self.fingerprint, "order": self.order,
                "records": st.records, "buffer": st.buffer, "running": running,
                "avail": ctx.avail, "executed": ctx.executed,
                "bad": {str(r): m for r, m in ctx.bad_rows.items()}, "families": ctx.family_names,
                "member_cost": ctx.member_cost, "io_cost": ctx.io_cost, "plan": st.plan,
                "stage0_done": st.stage0_done, "csv_fresh": st.csv_fresh, "finished": finished,
                "summary": summary}

    def commit(self, running: Optional[str] = None, finished: bool = False, summary=None) -> None:
        """Persist the progress (after the rows it describes were written): ``running``
        the stage in progress, ``finished`` with the run's ``summary`` dict at the end."""
        self.store.commit(self.snapshot(running, finished, summary))


def restore_state(saved: Dict[str, Any], fingerprint: Dict[str, Any], state: RunState, ctx: RunContext,
                  where: PathLike) -> Optional[List[str]]:
    """Adopt saved progress into ``state`` and ``ctx``; returns the saved stage order, or
    None (with a warning) when it belongs to another run."""
    if saved.get("fingerprint") != fingerprint:
        other = saved.get("fingerprint") or {}
        differ = sorted(k for k in fingerprint if other.get(k) != fingerprint[k])
        warnings.warn(f"{where}: saved progress belongs to another run ({', '.join(differ)} "
                      "differ); starting over", RuntimeWarning, stacklevel=4)
        return None
    state.records = saved["records"]
    state.buffer = int(saved["buffer"])
    ctx.avail = {k: int(v) for k, v in saved["avail"].items()}
    ctx.executed = list(saved["executed"])
    ctx.bad_rows = {int(r): m for r, m in saved["bad"].items()}
    ctx.family_names = list(saved["families"])
    ctx.member_cost = {k: float(v) for k, v in saved["member_cost"].items()}
    ctx.io_cost = float(saved["io_cost"])
    state.plan = list(saved["plan"])
    state.stage0_done = bool(saved["stage0_done"])
    state.csv_fresh = bool(saved.get("csv_fresh", False))
    for rec in state.records.values():
        rec.pop("measured", None)          # re-time on this machine
    return list(saved["order"])
