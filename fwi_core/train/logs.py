"""Per-run logs: ``log.csv`` (one row per evaluation) and ``curves.png``."""
from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Dict, List, Sequence

from .. import plotting
from ..utils import atomic_path

log = logging.getLogger("fwi_core.train")

FIRST_COLUMNS = ["epoch", "step", "lr", "train_loss", "pde_loss", "val_mae", "val_mae_raw", "val_mae_ema",
                 "family_mae"]


class CSVLog:
    """History rows in a CSV (columns fixed by the first row: the epoch columns,
    per-family columns, then time). :meth:`write` rewrites the whole file atomically from
    the run's history, which a resumed run restores from its checkpoint, so a kill never
    leaves a partial line or a missing row; :meth:`append` adds one row."""

    def __init__(self, path: os.PathLike):
        self.path = Path(path)

    def write(self, history: Sequence[Dict]) -> None:
        """Replace the file with ``history`` (atomic)."""
        if not history:
            return
        rest = sorted(k for k in history[0] if k not in FIRST_COLUMNS and k not in ("time", "partial"))
        header = [c for c in FIRST_COLUMNS if c in history[0]] + rest + ["time", "partial"]
        with atomic_path(self.path, suffix=".csv") as tmp:
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=header, extrasaction="ignore")
                w.writeheader()
                for row in history:
                    w.writerow({k: _fmt(v) for k, v in row.items()})

    def _header(self, row: Dict) -> List[str]:
        if self.path.is_file() and self.path.stat().st_size:
            with open(self.path, newline="") as f:
                first = next(csv.reader(f), None)
            if first:
                return first
        rest = sorted(k for k in row if k not in FIRST_COLUMNS and k not in ("time", "partial"))
        return [c for c in FIRST_COLUMNS if c in row] + rest + ["time", "partial"]

    def append(self, row: Dict) -> None:
        header = self._header(row)
        new = not (self.path.is_file() and self.path.stat().st_size)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=header, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow({k: _fmt(v) for k, v in row.items()})


def _fmt(v):
    return f"{v:.6g}" if isinstance(v, float) else v


def save_curves(history: Sequence[Dict], path: os.PathLike) -> bool:
    """Plot train loss (and the PDE term), validation MAE (raw, EMA) and the per-family validation MAE
    against the epoch into ``path`` with :func:`fwi_core.plotting.plot_curves` (the same
    three panels the train kernel shows); False when matplotlib is missing or the
    history holds nothing to plot."""
    present = list(dict.fromkeys(k for r in history for k in r))
    keys = [k for k in ("train_loss", "pde_loss", "val_mae_raw", "val_mae_ema") if k in present]
    keys += [k for k in present if k.startswith(("mae_raw/", "mae_ema/"))]   # the per-family panel
    if not history or not keys:
        return False
    try:
        fig = plotting.plot_curves(list(history), x="epoch", keys=keys)
    except ImportError:
        log.info("matplotlib is not installed: no curves.png")
        return False
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    return True
