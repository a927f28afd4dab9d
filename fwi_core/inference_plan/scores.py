"""What each stage of a run did to the score: :class:`StageScores`, the planner's
``on_stage_end`` callback the infer kernel passes.

It keeps the final maps of the first few files (for plots of what was submitted) and, when
the test set comes with its solution (``test_solution.npz``, written by ``tools.synth``:
a rehearsal), the MAE per family after every stage, in the order the stages ran; with
the run's summary that is a table of MAE, seconds and samples covered per stage
(:meth:`StageScores.table`), saved as ``stage_scores.json``. Without a solution nothing
beyond the kept maps is read.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np

from ..data.submission import load_solution
from ..utils import atomic_write_text
from .summary import RunSummary

PathLike = Union[str, os.PathLike]

__all__ = ["StageScores"]


class StageScores:
    """Per-stage scores of a run (see the module doc).

    Args:
        ids: the run's file ids, in the run's order.
        solution: ``test_solution.npz`` (true maps and families) or None.
        keep: final maps of the first ``keep`` files are kept (:attr:`maps`).
    """

    def __init__(self, ids: Sequence[str], solution: Optional[PathLike] = None, keep: int = 4):
        self.ids = list(ids)
        self.keep = max(0, int(keep))
        self.maps: Optional[np.ndarray] = None
        self.rows: List[Dict[str, Any]] = []
        self.truth: Optional[np.ndarray] = None
        self.families: Optional[np.ndarray] = None
        if solution is not None and Path(solution).is_file():
            sol = load_solution(solution)
            self.truth = np.stack([sol[oid] for oid in self.ids]).astype(np.float32)
            with np.load(solution, allow_pickle=False) as d:
                fam = dict(zip([str(o) for o in d["oids"]], [str(f) for f in d["family"]])) if "family" in d else {}
            self.families = np.array([fam.get(oid, "all") for oid in self.ids])

    def __call__(self, stage: str, read_rows: Callable[[int, int], np.ndarray]) -> None:
        """``on_stage_end``: keep the first maps, score the stage when the solution is known."""
        if self.keep:
            self.maps = np.array(read_rows(0, min(self.keep, len(self.ids))))
        if self.truth is None:
            return
        pred = read_rows(0, len(self.ids)).astype(np.float32)
        err = np.abs(pred[:, :, 1::2] - self.truth[:, :, 1::2]).mean((1, 2))     # the competition's columns
        mae = {"all": float(err.mean())}
        for f in sorted(set(self.families)):
            mae[f] = float(err[self.families == f].mean())
        self.rows.append({"stage": stage, "mae": mae})

    def table(self, summary: RunSummary) -> List[Dict[str, Any]]:
        """Rows in the order the stages ran: stage, status, seconds, samples covered, MAE per
        family ("all" first) after it."""
        recs = {s["name"]: s for s in summary.stages}
        out = []
        for r in self.rows:
            rec = recs.get(r["stage"], {})
            out.append({"stage": r["stage"], "status": rec.get("status"), "seconds": rec.get("seconds"),
                        "samples": rec.get("samples", rec.get("files")), "candidates": rec.get("candidates"),
                        "mae": r["mae"]})
        return out

    def format(self, summary: RunSummary) -> str:
        """The table as markdown: one row per stage, one MAE column per family."""
        rows = self.table(summary)
        if not rows:
            return "(no solution: no per-stage scores)"
        fams = list(rows[0]["mae"])
        head = "| stage | s | samples | " + " | ".join(f"MAE {f}" for f in fams) + " |"
        lines = [head, "|---|---:|---:|" + "---:|" * len(fams)]
        for r in rows:
            cov = f"{r['samples']}" + (f" of {r['candidates']}" if r.get("candidates") is not None else "")
            lines.append(f"| {r['stage']} | {r['seconds'] or 0:.1f} | {cov} | "
                         + " | ".join(f"{r['mae'][f]:.2f}" for f in fams) + " |")
        return "\n".join(lines)

    def save(self, path: PathLike, summary: RunSummary) -> Path:
        """``stage_scores.json``: the table and the families' sample counts."""
        counts = {} if self.families is None else {f: int((self.families == f).sum()) for f in set(self.families)}
        atomic_write_text(path, json.dumps({"stages": self.table(summary), "samples_per_family": counts,
                                            "files": len(self.ids)}, indent=1, sort_keys=True))
        return Path(path)
