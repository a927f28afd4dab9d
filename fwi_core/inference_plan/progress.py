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
import json
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

from .. import platform
from .identity import digest_of, ensemble_identity, resource_id, resources_identity
from .stages import RunContext, Stage
from .store import PredictionStore

PathLike = Union[str, os.PathLike]

__all__ = ["STATE_FORMAT", "RunState", "RunProgress", "run_fingerprint", "describe_mismatch", "restore_state",
           "default_state_dir"]

#: The fingerprint's format: states saved under another format are not resumed.
STATE_FORMAT = "fwi_core.inference_plan/2"


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


def run_fingerprint(ids: Sequence[str], ensemble, specs: Sequence[Any], batch_size: int, store_dtype: str,
                    seed: int, resources: Dict[str, Any], gains: Optional[Dict[str, Any]] = None,
                    extra: Optional[dict] = None) -> Dict[str, Any]:
    """What makes two runs the same run: a saved state with another fingerprint is not
    resumed. It holds the test files, the members' weights (a digest of each: a retrained
    checkpoint under the same name is another run), the ensemble's weights and small
    networks, every stage with its options, the resources the stages use (CRF, MC passes,
    refinement iterations, the consistency flagger...), the gains table and the settings
    that change results (batch size, stored dtype, seed)."""
    ens = ensemble_identity(ensemble)
    return {
        "format": STATE_FORMAT, "files": len(ids),
        "ids_sha1": hashlib.sha1("\n".join(ids).encode()).hexdigest(),
        "members": ens["members"],
        "ensemble": {k: v for k, v in ens.items() if k != "members"},
        "stages": [s.identity() if isinstance(s, Stage) else str(s) for s in specs],
        "batch_size": int(batch_size), "store_dtype": str(store_dtype), "seed": int(seed),
        "resources": resources_identity(resources),
        "gains": None if gains is None else digest_of(gains),
        "extra": resource_id(extra or {}),
    }


def describe_mismatch(saved: Dict[str, Any], current: Dict[str, Any]) -> List[str]:
    """Why a saved fingerprint is not this run's, in words (one reason per difference)."""
    if saved.get("format") != current["format"]:
        return [f"it was saved in another format ({saved.get('format')!r}, this run {current['format']!r})"]
    out = []
    if saved.get("files") != current["files"] or saved.get("ids_sha1") != current["ids_sha1"]:
        out.append(f"the test files differ ({saved.get('files')} files then, {current['files']} now)")
    old_m, new_m = saved.get("members") or {}, current["members"]
    gone, added = sorted(set(old_m) - set(new_m)), sorted(set(new_m) - set(old_m))
    if gone or added:
        out.append("the members differ (" + "; ".join(
            ([f"gone: {', '.join(gone)}"] if gone else []) + ([f"new: {', '.join(added)}"] if added else [])) + ")")
    changed = [m for m in new_m if m in old_m and old_m[m] != new_m[m]]
    if changed:
        out.append(f"member(s) {', '.join(changed)} have other weights (the checkpoint changed)")
    for k, v in current["ensemble"].items():
        if (saved.get("ensemble") or {}).get(k) != v:
            out.append(f"the ensemble's {k.replace('_', ' ')} changed")
    if saved.get("stages") != current["stages"]:
        out.append(f"the stages or their options changed ({_short(saved.get('stages'))} then, "
                   f"{_short(current['stages'])} now)")
    old_r, new_r = saved.get("resources") or {}, current["resources"]
    for k in sorted(set(old_r) | set(new_r)):
        if old_r.get(k) != new_r.get(k):
            out.append(f"the stage option {k} changed ({_short(old_r.get(k))} then, {_short(new_r.get(k))} now)")
    for k in ("batch_size", "store_dtype", "seed"):
        if saved.get(k) != current[k]:
            out.append(f"{k} changed ({saved.get(k)!r} then, {current[k]!r} now)")
    if saved.get("gains") != current["gains"]:
        out.append("the gains table (stage_gains.json) changed")
    if saved.get("extra") != current["extra"]:
        out.append("the run's extra identity changed")
    return out or ["its fingerprint differs"]


def _short(v: Any, limit: int = 80) -> str:
    text = json.dumps(v, sort_keys=True, default=str)
    return text if len(text) <= limit else text[:limit - 3] + "..."


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
        cache_rows: the first files whose gathers the float16 cache holds (decided when the
            run starts, from the disk the state folder may use).
    """

    records: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    buffer: int = 0
    plan: List[str] = field(default_factory=list)
    stage0_done: bool = False
    csv_fresh: bool = False
    resumed: bool = False
    cache_rows: int = 0


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
                "cache_rows": st.cache_rows,
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
        why = describe_mismatch(saved.get("fingerprint") or {}, fingerprint)
        warnings.warn(f"{where}: the saved progress belongs to another run, so this run starts over: "
                      f"{'; '.join(why)}", RuntimeWarning, stacklevel=4)
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
    state.cache_rows = int(saved.get("cache_rows", 0))
    state.csv_fresh = bool(saved.get("csv_fresh", False))
    for rec in state.records.values():
        rec.pop("measured", None)          # re-time on this machine
    return list(saved["order"])
