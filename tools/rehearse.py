"""A rehearsal of the competition: the whole path, measured (``make rehearse``).

    python -m tools.rehearse [--budget 1500] [--samples-per-family 12] [--test-samples 40]
                             [--compare-budgets 300 900] [--out runs/rehearse] [--skip-train]

1. builds a scaled competition from the simulator (``tools.synth``: every family's training
   samples, and a held-out test set with its solution, ``test_solution.npz``);
2. builds the train and infer notebooks (``tools.build``) and runs them under papermill,
   from a folder where ``fwi_core`` is not importable, with their default parameters except
   where the data and outputs are and the time: the train notebook gets ``--train-share`` of
   the total ``--budget`` for training (its ``time_budget``), the infer notebook what is left
   when the train notebook ends (its ``time_budget``, counted from its kernel's start);
3. prints, and writes to ``<out>/rehearsal.md``, a table per family: the MAE after each stage
   of the infer notebook (first member, more members, flip, CRF, MC dropout, refinement,
   ...) in the order they ran, with the seconds each took and the samples it covered (the
   infer notebook's ``stage_scores.json``).

``--compare-budgets B1 B2 ...`` then runs the infer notebook again on the same checkpoints:
with the members alone (``stages=["members"]``), and with its full default plan at each
budget (seconds from its kernel's start), and adds their tables: what the stages after the
members buy at each budget, and how many samples refinement covered. The rehearsal's data
and synthesis time are not part of the budget. ``--skip-train`` reuses the checkpoints of a
previous rehearsal in ``<out>`` (its train notebook's time still counts in the budget).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from tools.smoke import _check_not_importable, run_notebook

ROOT = Path(__file__).resolve().parents[1]


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m tools.rehearse", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "rehearse")
    ap.add_argument("--data", type=Path, default=None, help="the scaled competition (default: <out>/data)")
    ap.add_argument("--samples-per-family", type=int, default=12)
    ap.add_argument("--test-samples", type=int, default=40)
    ap.add_argument("--families", nargs="+", default=None, help="default: all ten")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget", type=float, default=1500.0, help="seconds for the two notebooks together")
    ap.add_argument("--train-share", type=float, default=0.4,
                    help="share of --budget the train notebook trains for (its time_budget)")
    ap.add_argument("--compare-budgets", type=float, nargs="*", default=[],
                    help="infer budgets (s) of the members-alone vs full-plan comparison")
    ap.add_argument("--skip-train", action="store_true",
                    help="reuse <out>/run of a previous rehearsal (its train notebook's time counts as before)")
    ap.add_argument("--timeout", type=int, default=7200, help="per-cell timeout (s)")
    return ap


def _table(scores: Dict, title: str) -> str:
    rows = scores["stages"]
    if not rows:
        return f"### {title}\n\n(no stage ran)\n"
    fams = list(rows[0]["mae"])
    counts = scores.get("samples_per_family", {})
    head = "| stage | s | samples | " + " | ".join(
        f"{f} ({counts[f]})" if f in counts else f for f in fams) + " |"
    lines = [f"### {title}", "", "MAE (m/s) on the held-out test set after each stage, in the order the stages ran; "
             "s: the stage's seconds; samples: the files it covered (refinement: samples refined of its "
             "candidates).", "", head, "|---|---:|---:|" + "---:|" * len(fams)]
    for r in rows:
        cov = f"{r['samples']}" + (f" of {r['candidates']}" if r.get("candidates") is not None else "")
        lines.append(f"| {r['stage']} | {r['seconds'] or 0:.0f} | {cov} | "
                     + " | ".join(f"{r['mae'][f]:.1f}" for f in fams) + " |")
    return "\n".join(lines) + "\n"


def _infer(data: Path, run: Path, out: Path, budget: float, workdir: Path, timeout: int,
           extra: Optional[dict] = None) -> Dict:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    params = {"data_root": str(data), "checkpoint_dirs": [str(run)], "output_dir": str(out), "time_budget": budget,
              **(extra or {})}
    t = run_notebook(ROOT / "build" / "rehearse" / "infer" / "infer.ipynb", out / "infer.out.ipynb", params,
                     workdir, timeout)
    scores = json.loads((out / "stage_scores.json").read_text())
    scores["wall_s"] = t
    scores["summary"] = json.loads((out / "submission_summary.json").read_text())
    return scores


def main(argv: Optional[List[str]] = None) -> int:
    a = _parser().parse_args(argv)
    if not 0 < a.train_share < 1:
        print(f"error: --train-share must be between 0 and 1, got {a.train_share}", file=sys.stderr)
        return 2
    from tools import build as build_tool
    from tools import synth

    out = a.out.resolve()
    data = (a.data or out / "data").resolve()
    if not (data / "test_solution.npz").is_file():
        print(f"=== scaled competition -> {data}", flush=True)
        t = time.time()
        synth.build(data, a.samples_per_family, a.test_samples, seed=a.seed, families=a.families, force=True)
        print(f"simulated in {time.time() - t:.0f} s (not part of the budget)")
    else:
        print(f"=== scaled competition: reusing {data}")
    print("=== build", flush=True)
    build_tool.build(["train", "infer"], ROOT / "build" / "rehearse")
    run = out / "run"
    trained = out / "train.json"
    if a.skip_train and not (trained.is_file() and (run / "best.pt").is_file()):
        print(f"error: --skip-train: no previous rehearsal's run in {run}", file=sys.stderr)
        return 2
    for d in ((out / "infer", out / "workdir") if a.skip_train else (run, out / "infer", out / "workdir")):
        if d.exists():
            shutil.rmtree(d)
    workdir = out / "workdir"
    workdir.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    os.environ.pop("PYTHONPATH", None)
    os.environ["FWI_PROGRESS"] = "0"
    _check_not_importable(workdir, env)

    t0 = time.time()
    if a.skip_train:
        t_train = float(json.loads(trained.read_text())["wall_s"])
        print(f"=== reusing {run} (its train notebook took {t_train:.0f} s)")
    else:
        t_train = run_notebook(ROOT / "build" / "rehearse" / "train" / "train.ipynb", out / "train.out.ipynb",
                               {"data_root": str(data), "output_dir": str(run),
                                "time_budget": a.train_share * a.budget}, workdir, a.timeout)
        trained.write_text(json.dumps({"wall_s": t_train, "train_budget": a.train_share * a.budget}))
    left = a.budget - t_train
    if left <= 60:
        print(f"error: the train notebook took {t_train:.0f} s of the {a.budget:.0f} s budget; nothing left for "
              "the infer notebook (give a larger --budget or a smaller --train-share)", file=sys.stderr)
        return 2
    main_run = _infer(data, run, out / "infer", left, workdir, a.timeout)
    report = [f"## Rehearsal: {a.budget:.0f} s budget ({data.name}: {a.samples_per_family} training samples per "
              f"family, {main_run['files']} test samples)", "",
              f"Train notebook {t_train:.0f} s (training budget {a.train_share * a.budget:.0f} s), infer notebook "
              f"{main_run['wall_s']:.0f} s (budget {left:.0f} s from its start).", "",
              _table(main_run, f"Infer notebook, default plan, {left:.0f} s")]
    if a.compare_budgets:
        alone = _infer(data, run, out / "members-alone", max(a.compare_budgets), workdir, a.timeout,
                       {"stages": ["members"]})
        report.append(_table(alone, "Members alone"))
        for b in a.compare_budgets:
            full = _infer(data, run, out / f"full-{b:.0f}", b, workdir, a.timeout)
            report.append(_table(full, f"Full plan, {b:.0f} s"))
    text = "\n".join(report)
    (out / "rehearsal.md").write_text(text)
    print("\n" + text)
    print(f"\n=== rehearsal done in {time.time() - t0:.0f} s: {out / 'rehearsal.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
