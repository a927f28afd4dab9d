"""``python -m fwi_core.ensemble fit RUN_DIR_OR_OOF [...] [--out JSON] [--meta] ...``

Fits ensemble weights (and optionally a meta-learner) from the training engine's
``oof_fold<k>.npz`` files and writes the ensemble JSON (see :func:`fit_ensemble`);
prints the cross-fitted OOF MAE of equal, static and optimised weights per family, and
the meta-learner's held-out comparison.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from ..errors import EnsembleConfigError
from ..params import int_at_least
from .fit import fit_ensemble
from .optimize import format_comparison


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fwi_core.ensemble", description=__doc__.split("\n\n")[1])
    sub = ap.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fit", help="fit weights from out-of-fold files and write the ensemble JSON")
    f.add_argument("sources", nargs="+", type=Path, help="run folders (searched recursively) or oof_fold*.npz files")
    f.add_argument("--out", type=Path, default=None, help="ensemble JSON (default: ensemble.json beside the runs)")
    f.add_argument("--method", default="auto", choices=["auto", "optuna", "projected_gradient"])
    f.add_argument("--select", default="best", choices=["best", "optimised", "static", "equal"])
    f.add_argument("--n-trials", type=int_at_least(1), default=100, help="optuna trials per weight row")
    f.add_argument("--iterations", type=int_at_least(1), default=300, help="projected-gradient steps per weight row")
    f.add_argument("--meta-epochs", type=int_at_least(1), default=100, help="meta-learner training epochs")
    f.add_argument("--meta", nargs="?", const="yes", default=None, choices=["yes", "always"],
                   help="also fit a meta-learner (written when it beats the static weights; 'always': always)")
    f.add_argument("--data", type=Path, default=None, help="competition root the runs trained on (seismic features)")
    f.add_argument("--family-classifier", type=Path, default=None)
    f.add_argument("--physics-nt", type=int_at_least(0), default=0,
                   help="physics-residual feature over the first N time samples")
    f.add_argument("--checkpoint-name", default="best.pt")
    a = ap.parse_args(argv)
    if a.out is not None and a.out.is_dir():
        ap.error(f"argument --out: {a.out} is a folder, expected the ensemble JSON file to write")
    for flag, path in (("--data", a.data), ("--family-classifier", a.family_classifier)):
        if path is not None and not path.exists():
            ap.error(f"argument {flag}: {path} does not exist")


    meta = {"yes": True, "always": "always", None: False}[a.meta]
    kwargs = {"n_trials": a.n_trials, "iterations": a.iterations}
    try:
        rep = fit_ensemble(a.sources, a.out, method=a.method, select=a.select, meta=meta, data=a.data,
                           family_classifier=a.family_classifier, physics_nt=a.physics_nt,
                           checkpoint_name=a.checkpoint_name, meta_kwargs={"epochs": a.meta_epochs}, **kwargs)
    except (FileNotFoundError, ValueError, EnsembleConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{rep['n_samples']} aligned OOF samples, models: "
          + ", ".join(f"{g} ({len(m)} run{'s' if len(m) > 1 else ''})" for g, m in rep["groups"].items()))
    print("OOF MAE (m/s): equal, static and optimised weights, and each model")
    print(format_comparison(rep["comparison"]))
    if rep["meta"] is not None:
        t = rep["meta"]["table"]["all"]
        print(f"meta-learner on held-out folds: MAE {t['meta']:.3f} vs best static {t['static']:.3f} "
              f"({'beats' if rep['meta']['beats_static'] else 'does not beat'} static; "
              f"{'written' if rep['meta_written'] else 'not referenced by the JSON'})")
    print(f"wrote {rep['config']} (weights: {rep['selected']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
