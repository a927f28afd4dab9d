"""Predict a test set within a time budget and write ``submission.csv``.

    python -m fwi_core.predict --data ROOT --checkpoints PATH [PATH ...] --time-budget SECONDS
                               --out submission.csv [--ensemble-config JSON] [--resume]
                               [--stages members flip crf mc_dropout] [--strict]

The budget counts from the start of this process. The command runs the time-budgeted
planner (:mod:`fwi_core.inference_plan`) over every ``ROOT/test/<oid>.npy`` and exits

- 0 with a complete, valid CSV whenever the budget lets the cheapest member predict
  every file once (better stages follow as the budget allows);
- 2 when it does not (the message says how long that pass needs, measured on the first
  batch), or on bad arguments or inputs (no test files, no checkpoints, a bad ensemble
  file or stage name);
- 1 when ``--strict`` meets an unreadable test file (named in the message).

``--checkpoints`` takes files or folders (searched for ``--checkpoint-kind``
checkpoints: best, snapshot, last or all). With ``--ensemble-config`` the members and
weights come from that JSON file and the paths are where to look for its checkpoints.
The tuned CRF (``crf.json``) and the gains table (``stage_gains.json``) are read from
beside the first checkpoint that has them. A summary (what ran, unreadable files) is
printed and saved as ``<out stem>_summary.json``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from fwi_core.crf import load_crf
from fwi_core.data import find_competition_root
from fwi_core.ensemble import Ensemble
from fwi_core.errors import DataFormatError, FWIError
from fwi_core.inference_plan import (DEFAULT_STAGES, Deadline, StageGains, TestFileSource, find_stage_gains,
                                     run_budgeted)
from fwi_core.models.checkpoint import find_checkpoints

#: Exit codes: 2 a bad argument or input, or a budget too small for the first pass;
#: 1 an unreadable test file under --strict.
EXIT_BAD_INPUT, EXIT_UNREADABLE = 2, 1


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m fwi_core.predict", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="competition root (holding test/)")
    ap.add_argument("--checkpoints", nargs="+", required=True, help="checkpoint files or folders")
    ap.add_argument("--time-budget", type=float, default=None,
                    help="seconds from the process start (default: the platform's session limit minus a margin)")
    ap.add_argument("--out", type=Path, default=Path("submission.csv"))
    ap.add_argument("--ensemble-config", type=Path, default=None, help="ensemble JSON (members and weights)")
    ap.add_argument("--resume", action="store_true", help="continue an interrupted run with the same inputs")
    ap.add_argument("--stages", nargs="+", default=None,
                    help="stages in priority order (default: members flip crf mc_dropout)")
    ap.add_argument("--strict", action="store_true", help="an unreadable test file is an error")
    ap.add_argument("--checkpoint-kind", default="best", choices=["best", "snapshot", "last", "all"])
    ap.add_argument("--gains", type=Path, default=None, help="stage_gains.json (default: beside the checkpoints)")
    ap.add_argument("--no-crf", action="store_true", help="ignore a tuned crf.json")
    ap.add_argument("--mc-passes", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--num-workers", type=int, default=0)
    ap.add_argument("--device", default=None)
    ap.add_argument("--state-dir", type=Path, default=None,
                    help="default: .<out name>.state beside --out (on Kaggle: in the temp folder, outside the "
                         "20 GB output)")
    ap.add_argument("--keep-state", action="store_true")
    ap.add_argument("--store-dtype", default="float32", choices=["float32", "float16"])
    ap.add_argument("--limit", type=int, default=None, help="only the first N test files (quick checks)")
    ap.add_argument("--seed", type=int, default=0)
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    # the deadline first (it counts from the process start: loading checkpoints spends it)
    a = _parser().parse_args(argv)
    try:
        deadline = Deadline.from_budget(a.time_budget) if a.time_budget is not None else Deadline.platform_default()
    except ValueError as e:
        return _fail(e, EXIT_BAD_INPUT)

    try:
        root = find_competition_root(a.data)
        source = TestFileSource(root, limit=a.limit)
        if a.ensemble_config is not None:
            ens = Ensemble.from_checkpoints([Path(p) for p in a.checkpoints], config=a.ensemble_config,
                                            device=a.device)
            files = [m.path for m in ens.members.values() if m.path is not None]
        else:
            files = find_checkpoints(a.checkpoints, kind=a.checkpoint_kind)
            ens = Ensemble.from_checkpoints(files, device=a.device)
        crf = None if a.no_crf else load_crf(files)
        gains = StageGains.load(a.gains) if a.gains is not None else find_stage_gains(files)
    except (FWIError, FileNotFoundError, ValueError) as e:   # bad data, checkpoints, ensemble, CRF or gains
        return _fail(e, EXIT_BAD_INPUT)
    print(f"data: {root} ({len(source)} test files)")
    print("members:", *(f"{n} ({m.path})" for n, m in ens.members.items()), sep="\n  ")
    extra = {"checkpoints": [[str(f), f.stat().st_size] for f in files],
             "ensemble_config": str(a.ensemble_config) if a.ensemble_config else None}
    try:
        summary = run_budgeted(ens, source, a.out, deadline=deadline, stages=a.stages or DEFAULT_STAGES,
                               gains=gains, state_dir=a.state_dir, resume=a.resume, strict=a.strict,
                               batch_size=a.batch_size, device=a.device, num_workers=a.num_workers,
                               store_dtype=a.store_dtype, seed=a.seed, crf=crf, mc_passes=a.mc_passes,
                               keep_state=a.keep_state, fingerprint_extra=extra)
    except (FWIError, ValueError) as e:   # too small a budget, a bad stage list or setting; --strict
        return _fail(e, EXIT_UNREADABLE if isinstance(e, DataFormatError) else EXIT_BAD_INPUT)
    print(f"wrote {a.out} ({summary.files} oids; summary in {a.out.with_name(a.out.stem + '_summary.json')})")
    return 0


def _fail(error: Exception, code: int) -> int:
    print(f"error: {error}", file=sys.stderr)
    return code

if __name__ == "__main__":
    sys.exit(main())
