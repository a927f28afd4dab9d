"""Tabulate training runs from their checkpoints' metadata and compare platforms.

    python -m tools.runs runs/ /kaggle-outputs/ ...              # runs, then one row per platform
    python -m tools.runs runs/ --prices prices.json --csv runs.csv

Each run folder (any folder below the arguments holding ``best.pt`` or ``ckpt-*.pt``)
gives one row from its ``best.pt`` (else its latest checkpoint): model, platform, device,
fold, epochs and steps trained, training throughput (``samples_s``: global batch over the
mean optimizer step), seconds per epoch (``epoch_s``: wall time, validation and checkpoints
included, over the epochs done, a partial epoch counted by its batches), best validation
MAE (m/s) and which weights (raw/EMA), the per-family MAE, wall time, AMP, world size,
git commit and why it stopped (from the latest checkpoint). Checkpoints are read
memory-mapped, so large ones are cheap.

A second table puts the platforms side by side, one row per (platform, device): runs,
the best throughput, the fastest epoch, the best MAE overall and per family, and, with
``--prices``, the cheapest epoch.

The price table (``--prices FILE``, JSON) gives a price per device-hour: one process of a
run on its device for an hour (so a run's cost per epoch is ``price * world size * epoch_s
/ 3600``). Keys match a run's platform (``"sagemaker"``), its platform and device
(``"sagemaker|A10G"``) or a part of its device label (``"T4"``, ``"H100"``); the longest
matching key wins, and a run no key matches has no cost::

    {"kaggle": 0, "colab": 0, "sagemaker|A10G": 1.21, "H100": 2.50}
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from fwi_core.errors import CheckpointError
from fwi_core.models.checkpoint import read_metadata
from fwi_core.train import CheckpointManager

BASE_COLUMNS = ["run", "model", "platform", "device", "fold", "epochs", "steps", "samples_s", "epoch_s",
                "cost_epoch", "best_mae", "weights", "wall_time_h", "amp", "world", "git", "stopped"]
PLATFORM_COLUMNS = ["platform", "device", "runs", "samples_s", "epoch_s", "cost_epoch", "best_mae"]


class PriceError(ValueError):
    """A price table that is not a JSON object of non-negative prices (names the file)."""


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


def load_prices(path: Optional[str]) -> Dict[str, float]:
    """The price table of ``path`` (None: no prices)."""
    if path is None:
        return {}
    try:
        table = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PriceError(f"--prices {path}: cannot read a JSON price table ({exc})") from None
    if not isinstance(table, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in table.values()):
        raise PriceError(f"--prices {path}: expected a JSON object of prices per device-hour, "
                         'e.g. {"kaggle": 0, "sagemaker|A10G": 1.21, "H100": 2.5}')
    return {str(k): float(v) for k, v in table.items()}


def price_of(platform: Optional[str], device: Optional[str], prices: Dict[str, float]) -> Optional[float]:
    """The price per device-hour of a run: the longest key of ``prices`` that is its
    platform, ``platform|<part of the device>`` or a part of its device label."""
    platform, device = platform or "", device or ""
    best = None
    for key, price in prices.items():
        plat, _, dev = key.partition("|")
        if "|" in key:
            hit = plat == platform and dev and dev in device
        else:
            hit = key == platform or (key and key in device)
        if hit and (best is None or len(key) > len(best[0])):
            best = (key, price)
    return None if best is None else best[1]


def _epochs_done(meta: Dict[str, object]) -> Optional[float]:
    pos = meta.get("position") or {}
    per = pos.get("steps_per_epoch") if isinstance(pos, dict) else None
    epochs = float(meta.get("epoch") or 0)
    if per:
        epochs += float(pos.get("batch") or 0) / float(per)
    return epochs or None


def run_row(run: Path, root: Optional[Path] = None, prices: Optional[Dict[str, float]] = None) -> Dict[str, object]:
    """One table row (per-family MAEs under ``mae:<family>`` keys)."""
    latest = CheckpointManager(run).latest()
    best = run / "best.pt"
    meta = read_metadata(best if best.is_file() else latest)
    last = read_metadata(latest) if latest is not None else meta
    metrics = meta.get("metrics") or {}
    name = str(run.relative_to(root)) if root is not None and run != root and root in run.parents else str(run)
    wall = float(last.get("wall_time") or 0.0)
    done = _epochs_done(last)
    epoch_s = wall / done if done and wall else None
    price = price_of(last.get("platform"), last.get("device"), prices or {})
    world = last.get("world_size") or 1
    row: Dict[str, object] = {
        "run": name, "model": meta.get("model"), "platform": last.get("platform"), "device": last.get("device"),
        "fold": f"{meta.get('fold')}/{meta.get('folds')}", "epochs": last.get("epoch"),
        "steps": last.get("step"), "samples_s": last.get("samples_per_s"), "epoch_s": epoch_s,
        "cost_epoch": price * world * epoch_s / 3600.0 if price is not None and epoch_s is not None else None,
        "best_mae": metrics.get("mae"), "weights": metrics.get("source"),
        "wall_time_h": wall / 3600.0, "amp": last.get("amp"),
        "world": last.get("world_size"), "git": (last.get("git_commit") or "")[:8] or None,
        "stopped": last.get("stopped_reason"),
    }
    for fam, e in sorted((metrics.get("per_family") or {}).items()):
        row[f"mae:{fam}"] = e.get("best")
    return row


def _best(values, pick=min):
    vals = [v for v in values if isinstance(v, (int, float))]
    return pick(vals) if vals else None


def compare(rows: List[Dict[str, object]]) -> List[Dict[str, object]]:
    """One row per (platform, device): runs, the highest throughput, the shortest and the
    cheapest epoch, the lowest MAE overall and per family."""
    groups: Dict[tuple, List[Dict[str, object]]] = {}
    for r in rows:
        groups.setdefault((r.get("platform"), r.get("device")), []).append(r)
    fams = sorted({k for r in rows for k in r if k.startswith("mae:")})
    out = []
    for (plat, dev), rs in sorted(groups.items(), key=lambda kv: (str(kv[0][0]), str(kv[0][1]))):
        row = {"platform": plat, "device": dev, "runs": len(rs),
               "samples_s": _best((r.get("samples_s") for r in rs), max),
               "epoch_s": _best(r.get("epoch_s") for r in rs),
               "cost_epoch": _best(r.get("cost_epoch") for r in rs),
               "best_mae": _best(r.get("best_mae") for r in rs)}
        for f in fams:
            row[f] = _best(r.get(f) for r in rs)
        out.append(row)
    return out


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def table(rows: List[Dict[str, object]], columns: Sequence[str] = BASE_COLUMNS) -> str:
    """Markdown table over ``columns`` and the rows' per-family columns."""
    cols = list(columns) + sorted({k for r in rows for k in r if k.startswith("mae:")})
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.runs", description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", help="run folders or folders holding them")
    ap.add_argument("--csv", help="also write the runs table as CSV to this file")
    ap.add_argument("--prices", help="JSON price table per device-hour (see the module doc): adds cost per epoch")
    args = ap.parse_args(argv)
    try:
        prices = load_prices(args.prices)
    except PriceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
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
                rows.append(run_row(run, root, prices))
            except CheckpointError as exc:
                print(f"warning: skipping {run}: {exc}", file=sys.stderr)
    if not rows:
        print(f"no runs (folders with best.pt or ckpt-*.pt) under {' '.join(args.paths)}", file=sys.stderr)
        return 1
    print(table(rows))
    print("\nBy platform (best of its runs; cost_epoch needs --prices):\n")
    print(table(compare(rows), PLATFORM_COLUMNS))
    if args.csv:
        cols = BASE_COLUMNS + sorted({k for r in rows for k in r if k.startswith("mae:")})
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
