"""Run one round of test-time pseudo-labelling.

    python -m tools.pseudo_label --data ROOT --checkpoints PATH [PATH...] --out DIR [--max-gb 15]
        [--rank-by disagreement|misfit|none] [--dtype float16] [--limit N] [--device cuda]

Predicts ``ROOT/test/*.npy`` with the checkpoints (averaged; folders are searched for
``best*.pt``), keeps the most confident predictions that fit ``--max-gb`` (0.72 MB a sample
in float16), simulates them with the exact forward model and writes the (simulated
gathers, predicted map) pairs to ``DIR/train_samples/Pseudo/`` in the competition layout,
plus ``DIR/pseudo_labels.json`` (see :func:`fwi_core.recipes.pseudo_label_round`). Train
on them next to the real data with ``python -m fwi_core.train --pseudo DIR``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from fwi_core.data import find_competition_root
from fwi_core.errors import FWIError
from fwi_core.models.checkpoint import find_checkpoints
from fwi_core.recipes import pseudo_label_round
from fwi_core.recipes.pseudo_label import MAX_GB, RANKINGS


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.pseudo_label", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, type=Path, help="competition root holding test/")
    ap.add_argument("--checkpoints", required=True, nargs="+", type=Path,
                    help="checkpoint files or folders (best*.pt inside); several are averaged")
    ap.add_argument("--out", required=True, type=Path, help="output root (train_samples/Pseudo/ is written there)")
    ap.add_argument("--limit", type=int, default=None, help="use the first N test files only")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--flip-tta", action="store_true", help="average with the flipped prediction")
    ap.add_argument("--weights", default="auto", choices=["auto", "raw", "ema"])
    ap.add_argument("--family", default="Pseudo", help="folder name = family name of the samples")
    ap.add_argument("--samples-per-file", type=int, default=500)
    ap.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="storage of the gathers")
    ap.add_argument("--max-gb", type=float, default=MAX_GB,
                    help=f"keep at most this many GB of samples (default {MAX_GB}: Kaggle keeps 20 GB of output)")
    ap.add_argument("--max-samples", type=int, default=None, help="keep at most this many samples")
    ap.add_argument("--rank-by", default="disagreement", choices=list(RANKINGS),
                    help="which predictions to keep when not all fit (default: disagreement)")
    ap.add_argument("--force", action="store_true", help="replace an earlier round's folder")
    a = ap.parse_args(argv)

    try:
        root = find_competition_root(a.data)
        ckpts = find_checkpoints(a.checkpoints)
        res = pseudo_label_round([str(p) for p in ckpts], root, a.out, limit=a.limit, batch_size=a.batch_size,
                                 device=a.device, flip_tta=a.flip_tta, weights=a.weights, family=a.family,
                                 samples_per_file=a.samples_per_file, overwrite=a.force, dtype=a.dtype,
                                 max_gb=a.max_gb, max_samples=a.max_samples, rank_by=a.rank_by)
    except (FWIError, FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"kept {res['samples']} of {res['candidates']} test samples (ranked by {res['rank_by']}; "
          f"{res['bytes_per_sample']:,} bytes each in {res['dtype']}, {res['bytes'] / 1e9:.2f} GB)")
    print(f"pseudo-labelled {res['samples']} test samples with {len(ckpts)} checkpoint(s) on {res['device']}: "
          f"predict {res['predict_s']:.1f} s, simulate {res['simulate_s']:.1f} s "
          f"({res['simulate_samples_per_s']:.2f} samples/s), mean velocity {res['velocity_mean']:.0f} m/s")
    print(f"wrote {len(res['files'])} file pair(s) to {Path(a.out) / 'train_samples' / res['family']} "
          f"and {res['manifest']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
