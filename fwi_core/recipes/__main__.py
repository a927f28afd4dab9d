"""``python -m fwi_core.recipes distill --teacher ENSEMBLE_JSON [training flags]``

Distillation from the command line: the ensemble of the JSON (``python -m fwi_core.ensemble
fit``) labels the training maps of the fold, and a student trains on those labels with the
training engine; every flag of ``python -m fwi_core.train`` (``--preset``, ``--model``,
``--data``, ``--out``, ``--folds``/``--fold``, ...) configures the student. Prints the
student's and the ensemble's validation MAE per family and their ms per sample.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import List, Optional

from ..errors import FWIError
from ..train.cli import resolve_config
from .distill import distill_from_json, format_report


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fwi_core.recipes", description=__doc__.split("\n\n")[1])
    sub = ap.add_subparsers(dest="command", required=True)
    d = sub.add_parser("distill", help="train a student on an ensemble's predictions (then: training flags)")
    d.add_argument("--teacher", type=Path, required=True, help="the ensemble JSON (members, weights)")
    d.add_argument("--teacher-flip-tta", action="store_true", help="the teacher predicts with flip TTA")
    d.add_argument("--eval-samples", type=int, default=256, help="validation samples the report scores and times")
    a, rest = ap.parse_known_args(argv)
    if not a.teacher.is_file():
        ap.error(f"argument --teacher: {a.teacher} is not a file (the ensemble JSON of python -m fwi_core.ensemble fit)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg, _ = resolve_config(rest)
        out = distill_from_json(a.teacher, cfg, flip_tta=a.teacher_flip_tta, eval_samples=a.eval_samples)
    except (FWIError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_report(out["report"]))
    summary = {k: v for k, v in out["result"].items() if k != "history"}
    print(json.dumps(summary, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
