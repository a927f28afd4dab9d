"""Predict a test set within a time budget and write ``submission.csv``.

    python -m fwi_core.predict --data ROOT --checkpoints PATH [PATH ...] --time-budget SECONDS
                               --out submission.csv [--ensemble-config JSON] [--no-resume]
                               [--stages members flip crf mc_dropout refine_layered refine consistency]
                               [--refine-iters 60 30] [--strict]
    python -m fwi_core.predict --data ROOT --prior-submission old.csv --out refined.csv
                               [--stages prior refine_layered refine] [--checkpoints PATH ...]

The budget counts from the start of this process. The command runs the time-budgeted
planner (:mod:`fwi_core.inference_plan`) over every ``ROOT/test/<oid>.npy`` and exits

- 0 with a complete, valid CSV whenever the budget lets the cheapest member predict
  every file once (better stages follow as the budget allows);
- 2 when it does not (the message says how long that pass needs, measured on the first
  batch), or on bad arguments or inputs (no test files, no checkpoints, a bad ensemble
  file or stage name, a prior submission missing, lacking test files or malformed);
- 1 when ``--strict`` meets an unreadable test file (named in the message).

The run is set up exactly as the infer kernel sets it up
(:func:`fwi_core.inference_plan.prepare_inference`, the defaults of
:class:`~fwi_core.inference_plan.InferenceOptions`: the kernel's plan is this command's
default). ``--checkpoints`` takes files or folders (searched for ``--checkpoint-kind``
checkpoints: best, snapshot, last or all). With ``--ensemble-config`` the members and
weights come from that JSON file and the paths are where to look for its checkpoints.
The tuned CRF (``crf.json``), the consistency threshold (``consistency.json`` beside an
``invertible_unet`` checkpoint) and the gains table (``stage_gains.json``) are read from
beside the checkpoints. An interrupted run is resumed when it is the same run (same
files, weights, stages, options); ``--no-resume`` starts over. A summary (what ran,
unreadable files) is printed and saved as ``<out stem>_summary.json``.

A refinement-only pass: ``--prior-submission CSV`` starts the plan from an existing
submission instead of the members (stage ``prior``,
:mod:`fwi_core.inference_plan.stages.prior`; the CSV's odd columns are kept, the even ones
interpolated). ``--checkpoints`` is then optional (a family classifier among them routes
refinement); the default stages become ``prior crf refine_layered refine consistency``
(those without what they need are skipped); every test file must be in the CSV.

Under ``torchrun --nproc-per-node N [--nnodes M ...] -m fwi_core.predict ...`` each rank
predicts its share of the test files (whole batches) with its own plan and state, and rank
0 merges the shards into ``--out`` (:mod:`fwi_core.sharding`).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from fwi_core.errors import DataFormatError, FWIError
from fwi_core.inference_plan import Deadline, InferenceOptions, InferenceSetup, prepare_inference
from fwi_core.sharding import ShardedPredict

#: Exit codes: 2 a bad argument or input, or a budget too small for the first pass;
#: 1 an unreadable test file under --strict.
EXIT_BAD_INPUT, EXIT_UNREADABLE = 2, 1
DEFAULTS = InferenceOptions()


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m fwi_core.predict", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="competition root (holding test/)")
    ap.add_argument("--checkpoints", nargs="+", default=[],
                    help="checkpoint files or folders (required unless --prior-submission)")
    ap.add_argument("--prior-submission", type=Path, default=None, metavar="CSV",
                    help="start from this submission instead of the members (stage 'prior'): a refinement-only "
                         "pass, e.g. --stages prior refine_layered refine")
    ap.add_argument("--time-budget", type=float, default=None,
                    help="seconds from the process start (default: the platform's session limit minus a margin)")
    ap.add_argument("--out", type=Path, default=Path("submission.csv"))
    ap.add_argument("--ensemble-config", type=Path, default=None, help="ensemble JSON (members and weights)")
    ap.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                    help="continue an interrupted run when it is the same run (default); --no-resume starts over")
    ap.add_argument("--stages", nargs="+", default=None,
                    help=f"stages in priority order (default: {' '.join(DEFAULTS.stages)})")
    ap.add_argument("--refine-iters", nargs=2, type=int, default=None, metavar=("FLAT", "OTHER"),
                    help="L-BFGS iterations of physics refinement: flat-layered samples, the others "
                         f"(default: {' '.join(map(str, DEFAULTS.refine_iters))})")
    ap.add_argument("--strict", action="store_true", help="an unreadable test file is an error")
    ap.add_argument("--checkpoint-kind", default=DEFAULTS.checkpoint_kind, choices=["best", "snapshot", "last", "all"])
    ap.add_argument("--gains", type=Path, default=None, help="stage_gains.json (default: beside the checkpoints)")
    ap.add_argument("--no-crf", action="store_true", help="ignore a tuned crf.json")
    ap.add_argument("--no-flip", action="store_true", help="drop the flip stage")
    ap.add_argument("--mc-passes", type=int, default=DEFAULTS.mc_passes)
    ap.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size)
    ap.add_argument("--num-workers", type=int, default=DEFAULTS.num_workers)
    ap.add_argument("--device", default=None)
    ap.add_argument("--state-dir", type=Path, default=None,
                    help="default: .<out name>.state beside --out (on Kaggle: in the temp folder, outside the "
                         "20 GB output)")
    ap.add_argument("--keep-state", action="store_true")
    ap.add_argument("--state-limit-gb", type=float, default=None,
                    help="what the state folder may hold (default: 40 on Kaggle, else 90%% of the free disk)")
    ap.add_argument("--no-gather-cache", action="store_true",
                    help="read the test files in every pass instead of keeping a float16 copy in the state folder")
    ap.add_argument("--store-dtype", default=DEFAULTS.store_dtype, choices=["float32", "float16"])
    ap.add_argument("--limit", type=int, default=None, help="only the first N test files (quick checks)")
    ap.add_argument("--seed", type=int, default=DEFAULTS.seed)
    return ap


def setup_run(a: argparse.Namespace) -> InferenceSetup:
    """The run's setup from parsed arguments (data, ensemble, CRF, consistency flagger,
    gains, stages): the one function that builds a run from the command line (call it once
    per process, e.g. per rank)."""
    options = DEFAULTS.with_(stages=a.stages, refine_iters=a.refine_iters, checkpoint_kind=a.checkpoint_kind,
                             flip_tta=not a.no_flip, use_crf=not a.no_crf, mc_passes=a.mc_passes,
                             batch_size=a.batch_size, num_workers=a.num_workers, store_dtype=a.store_dtype,
                             seed=a.seed, state_limit_gb=a.state_limit_gb, gather_cache=not a.no_gather_cache)
    return prepare_inference(a.data, a.checkpoints, ensemble_config=a.ensemble_config, options=options,
                             gains_path=a.gains, limit=a.limit, device=a.device, prior_submission=a.prior_submission)


def main(argv: Optional[List[str]] = None) -> int:
    # the deadline first (it counts from the process start: loading checkpoints spends it)
    a = _parser().parse_args(argv)
    if not a.checkpoints and a.prior_submission is None and a.ensemble_config is None:
        return _fail(ValueError("give --checkpoints (the members), or --prior-submission CSV for a refinement-only "
                                "pass over an existing submission"), EXIT_BAD_INPUT)
    try:
        deadline = Deadline.from_budget(a.time_budget) if a.time_budget is not None else Deadline.platform_default()
    except ValueError as e:
        return _fail(e, EXIT_BAD_INPUT)
    try:
        shard = ShardedPredict(a.out, a.batch_size)     # under torchrun: this rank's share (fwi_core.sharding)
        a.device = shard.device(a.device)
        setup = setup_run(a)
        setup.source = shard.take(setup.source)
    except (FWIError, FileNotFoundError, ValueError) as e:   # bad data, checkpoints, ensemble, CRF or gains
        return _fail(e, EXIT_BAD_INPUT)
    print(setup.describe())
    try:      # one process: setup.run itself; torchrun: this rank's shard, then rank 0 merges into --out
        summary = shard.run(lambda out, state_dir, keep: setup.run(
            out, deadline, resume=a.resume, state_dir=state_dir, strict=a.strict, device=a.device, keep_state=keep),
            a.state_dir, a.keep_state)
    except (FWIError, ValueError) as e:   # too small a budget, a bad stage list or setting; --strict
        return _fail(e, EXIT_UNREADABLE if isinstance(e, DataFormatError) else EXIT_BAD_INPUT)
    print(f"wrote {a.out} ({summary.files if summary else 0} oids; summary in "
          f"{a.out.with_name(a.out.stem + '_summary.json')})")
    return 0


def _fail(error: Exception, code: int) -> int:
    print(f"error: {error}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
