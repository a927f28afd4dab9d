"""Tabulate training runs from their checkpoints' metadata (compare folds and platforms).

    python -m tools.runs runs/ /kaggle-outputs/ ...       # markdown table to stdout
    python -m tools.runs runs/ --csv runs.csv              # also as CSV

Each run folder (any folder below the arguments holding ``best.pt`` or ``ckpt-*.pt``)
gives one row from its ``best.pt`` (else its latest checkpoint): model, platform, fold,
epochs and steps trained, best validation MAE (m/s) and which weights (raw/EMA), the
per-family MAE, wall time, AMP, world size, git commit and why it stopped (from the latest
checkpoint). Checkpoints are read memory-mapped, so large ones are cheap.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from fwi_core.errors import CheckpointError
from fwi_core.models.checkpoint import read_metadata
from fwi_core.train import CheckpointManager

BASE_COLUMNS = ["run", "model", "platform", "fold", "epochs", "steps", "best_mae", "weights",
                "wall_time_h", "amp", "world", "git", "stopped"]


def find_runs(paths: Sequence[str]) -> List[Path]:
    """Run folders under ``paths`` (a path may itself be a run folder), sorted."""
    runs = set()
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such folder")
        cands = ([p] + [d for d in p.rglob("*") if d.is_dir()]) if p.is_dir() else [p.parent]
        for d in cands:
            if (d / "best.pt").is_file() or CheckpointManager(d).latest() is not None:
                runs.add(d)
    return sorted(runs)


def run_row(run: Path, root: Optional[Path] = None) -> Dict[str, object]:
    """One table row (per-family MAEs under ``mae:<family>`` keys)."""
    latest = CheckpointManager(run).latest()
    best = run / "best.pt"
    meta = read_metadata(best if best.is_file() else latest)
    last = read_metadata(latest) if latest is not None else meta
    metrics = meta.get("metrics") or {}
    name = str(run.relative_to(root)) if root is not None and run != root and root in run.parents else str(run)
    row: Dict[str, object] = {
        "run": name, "model": meta.get("model"), "platform": last.get("platform"),
        "fold": f"{meta.get('fold')}/{meta.get('folds')}", "epochs": last.get("epoch"),
        "steps": last.get("step"), "best_mae": metrics.get("mae"), "weights": metrics.get("source"),
        "wall_time_h": (last.get("wall_time") or 0.0) / 3600.0, "amp": last.get("amp"),
        "world": last.get("world_size"), "git": (last.get("git_commit") or "")[:8] or None,
        "stopped": last.get("stopped_reason"),
    }
    for fam, e in sorted((metrics.get("per_family") or {}).items()):
        row[f"mae:{fam}"] = e.get("best")
    return row


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def table(rows: List[Dict[str, object]]) -> str:
    """Markdown table over the union of the rows' columns."""
    fam_cols = sorted({k for r in rows for k in r if k.startswith("mae:")})
    cols = BASE_COLUMNS + fam_cols
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.runs", description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", help="run folders or folders holding them")
    ap.add_argument("--csv", help="also write the table as CSV to this file")
    args = ap.parse_args(argv)
    rows = []
    for path in args.paths:
        root = Path(path)
        try:
            runs = find_runs([path])
        except FileNotFoundError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        for run in runs:
            try:
                rows.append(run_row(run, root))
            except CheckpointError as exc:
                print(f"warning: skipping {run}: {exc}", file=sys.stderr)
    if not rows:
        print(f"no runs (folders with best.pt or ckpt-*.pt) under {' '.join(args.paths)}", file=sys.stderr)
        return 1
    print(table(rows))
    if args.csv:
        cols = BASE_COLUMNS + sorted({k for r in rows for k in r if k.startswith("mae:")})
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
