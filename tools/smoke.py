"""The main job, end to end on synthetic data (``make smoke``).

1. make a small synthetic dataset in the competition layout (``tools.synth``) unless one
   is already there;
2. build the notebooks (``tools.build``);
3. run ``build/train/train.ipynb`` (with ``preset = "smoke"``: ``fwi_core/train/presets.py``)
   and then ``build/infer/infer.ipynb`` with papermill on
   a real ipykernel, from a working directory where ``fwi_core`` is not importable (so
   the notebooks prove they are self-contained);
4. validate ``submission.csv`` and print its MAE against the true test velocities.

    python -m tools.smoke [--data data/smoke] [--out runs/smoke] [--epochs 6] ...
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

ROOT = Path(__file__).resolve().parents[1]


def _check_not_importable(cwd: Path, env: dict) -> None:
    r = subprocess.run([sys.executable, "-c", "import fwi_core"], cwd=cwd, env=env, capture_output=True)
    if r.returncode == 0:
        raise SystemExit(f"fwi_core is importable from {cwd} (installed in the environment?); the smoke run "
                         "could not prove the notebooks are self-contained. Uninstall it (pip uninstall "
                         "fwi-kaggle-toolkit) and retry.")


def run_notebook(nb: Path, out_nb: Path, params: dict, cwd: Path, timeout: int) -> float:
    import papermill as pm

    t0 = time.time()
    print(f"\n=== papermill {nb.name} ({', '.join(f'{k}={v}' for k, v in params.items())})", flush=True)
    pm.execute_notebook(str(nb), str(out_nb), parameters=params, kernel_name="python3", cwd=str(cwd),
                        execution_timeout=timeout, progress_bar=False, log_output=True)
    return time.time() - t0


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.smoke", description="Run the main job on synthetic data.")
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "smoke")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "smoke")
    ap.add_argument("--samples-per-family", type=int, default=16)
    ap.add_argument("--test-samples", type=int, default=20)
    # the training settings are the "smoke" preset's (fwi_core/train/presets.py); these override them
    ap.add_argument("--model", default=None, help="default: the smoke preset's")
    ap.add_argument("--epochs", type=int, default=None, help="default: the smoke preset's")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the smoke preset's")
    ap.add_argument("--lr", type=float, default=None, help="default: the smoke preset's")
    ap.add_argument("--time-budget", type=float, default=None, help="seconds of training (default: the preset's)")
    ap.add_argument("--infer-budget", type=float, default=90.0,
                    help="seconds of the infer notebook (from its kernel's start): the planner's deadline")
    ap.add_argument("--timeout", type=int, default=1800, help="per-cell timeout (s)")
    a = ap.parse_args(argv)

    from fwi_core.data import load_solution, score_submission, validate_submission
    from tools import build as build_tool
    from tools import synth

    t_start = time.time()
    data, out = a.data.resolve(), a.out.resolve()
    if not (data / "test_solution.npz").is_file():
        print(f"=== synthetic data -> {data}", flush=True)
        synth.build(data, a.samples_per_family, a.test_samples, seed=0, force=True)
    else:
        print(f"=== synthetic data: reusing {data} (delete it to regenerate)")
    print("=== build", flush=True)
    build_tool.build(["train", "infer"], ROOT / "build")

    if out.exists():  # a fresh run folder (the engine refuses to train over old checkpoints)
        import shutil
        shutil.rmtree(out)
    out.mkdir(parents=True)
    workdir = out / "workdir"  # outside any package folder: fwi_core is not importable here
    workdir.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    os.environ.pop("PYTHONPATH", None)  # the kernel inherits this process's environment
    os.environ["FWI_PROGRESS"] = "0"  # progress bars would print one log line per update
    _check_not_importable(workdir, env)

    given = {"model_name": a.model, "epochs": a.epochs, "batch_size": a.batch_size, "lr": a.lr,
             "time_budget": a.time_budget}
    t_train = run_notebook(ROOT / "build/train/train.ipynb", out / "train.out.ipynb", {
        "preset": "smoke", "data_root": str(data), "output_dir": str(out),
        **{k: v for k, v in given.items() if v is not None},
    }, workdir, a.timeout)
    t_infer = run_notebook(ROOT / "build/infer/infer.ipynb", out / "infer.out.ipynb", {
        "data_root": str(data), "checkpoints": [], "checkpoint_dirs": [str(out)], "output_dir": str(out),
        "batch_size": 8, "num_workers": 0, "checkpoint_kind": "all", "time_budget": a.infer_budget,
        "mc_passes": 4,
    }, workdir, a.timeout)

    csv = out / "submission.csv"
    import json
    run = json.loads((out / "submission_summary.json").read_text())
    members = [s for s in run["stages"] if s["kind"] == "member"]
    print(f"\n=== budgeted inference ({a.infer_budget:.0f} s budget, {len(members)} members): " +
          ", ".join(f"{s['name']} {s['status']}" for s in run["stages"]))
    if len(members) < 2:
        raise SystemExit(f"the infer notebook found {len(members)} member(s); the smoke run expects the best "
                         "checkpoint and the restart snapshots")
    solution = load_solution(data / "test_solution.npz")
    info = validate_submission(csv, solution.keys())
    mae = score_submission(csv, solution)
    print(f"\n=== smoke OK in {time.time() - t_start:.0f} s (train notebook {t_train:.0f} s, infer {t_infer:.0f} s)")
    print(f"submission: {csv} ({info['oids']} oids, {info['rows']} rows, valid)")
    print(f"local MAE on {info['oids']} synthetic test samples: {mae:.1f} m/s "
          f"(predicting 3000 everywhere: {score_submission(data / 'sample_submission.csv', solution):.1f})")
    print(f"executed notebooks: {out / 'train.out.ipynb'}, {out / 'infer.out.ipynb'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
