"""What a budgeted run did: :class:`RunSummary` (printed, and saved as
``<csv stem>_summary.json``), and the per-family uncertainty it reports."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np

from ..utils import atomic_write_text
from .stages import RunContext
from .store import PredictionStore

PathLike = Union[str, os.PathLike]

__all__ = ["RunSummary", "uncertainty_by_family"]


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
            not run), files, samples (files it covered; for refinement, samples refined),
            seconds, files_per_s, expected_gain, gain_source, note (for a ranked stage also
            candidates, screened).
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
                 f"{'stage':<28}{'status':>10}{'samples':>8}{'s':>9}{'per s':>9}{'gain':>8}  note"]
        for s in self.stages:
            fps = f"{s['files_per_s']:.2f}" if s.get("files_per_s") else "-"
            lines.append(f"{s['name']:<28}{s['status']:>10}{s.get('samples', s['files']):>8}{s['seconds']:>9.1f}"
                         f"{fps:>9}{s['expected_gain']:>8.2f}  {s.get('note', '')}")
        if self.bad_files:
            lines.append(f"{len(self.bad_files)} unreadable file(s) got the fallback prediction:")
            lines += [f"  {oid}: {msg}" for oid, msg in sorted(self.bad_files.items())]
        if self.fallback_files > len(self.bad_files):
            lines.append(f"{self.fallback_files - len(self.bad_files)} file(s) were not reached in time "
                         "and got the fallback prediction")
        return "\n".join(lines)

    def save(self, path: PathLike) -> Path:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True))
        return Path(path)


def uncertainty_by_family(store: PredictionStore, ctx: RunContext) -> Optional[Dict[str, Dict[str, Any]]]:
    """Per-family MC-dropout standard deviation (:attr:`RunSummary.uncertainty`), streamed
    from the stored map; None when MC dropout did not run."""
    upto = ctx.avail.get("mc_std", 0)
    if upto <= 0:
        return None
    arr = store.array("mc_std")
    fam = store.array("family", (), "int16") if ctx.family_names else None
    acc: Dict[str, List[Any]] = {}
    for s in range(0, upto, 1024):
        e = min(upto, s + 1024)
        ok = ctx.row_ok(s, e)
        std = arr.read(s, e).astype(np.float64)
        codes = fam.read(s, e) if fam is not None else np.full(e - s, -1)
        for i in np.flatnonzero(ok):
            name = ctx.family_names[codes[i]] if codes[i] >= 0 else "all"
            a = acc.setdefault(name, [0, 0.0, np.zeros(70)])
            a[0] += 1
            a[1] += float(std[i].mean())
            a[2] += std[i].mean(1)
    return {f: {"files": c, "mean_std": tot / c, "depth_std": (prof / c).tolist()}
            for f, (c, tot, prof) in sorted(acc.items())}
