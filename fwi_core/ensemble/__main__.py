"""``python -m fwi_core.ensemble fit|train-classifier ...``

    python -m fwi_core.ensemble train-classifier --data ROOT --out runs/family_classifier.pt [--folds 5 --seed 0]
    python -m fwi_core.ensemble fit RUN_DIR_OR_OOF [...] [--out JSON] [--meta] [--family-classifier PT] ...

``fit`` scores equal, static and optimised weights, the single best model and (with
``--meta``) a meta-learner on held-out folds, as each would be deployed, writes the
ensemble JSON of the best (see :func:`fit_ensemble`) and prints the table and the
deployed weighting's score. ``train-classifier`` trains the family classifier with
out-of-fold probabilities (one classifier per fold of the runs' family folds, and the
one deployed on everything), for ``fit --family-classifier``.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import List, Optional

from ..data import FWIDataset, find_competition_root, index_train
from ..errors import FWIError
from ..params import int_at_least
from .family_fit import oof_proba_path, save_oof_proba, train_family_classifier_oof
from .fit import SELECTIONS, fit_ensemble
from .optimize import format_comparison


def _fit(a) -> int:
    meta = {"yes": True, "always": "always", None: False}[a.meta]
    kwargs = {"n_trials": a.n_trials, "iterations": a.iterations}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rep = fit_ensemble(a.sources, a.out, method=a.method, select=a.select, meta=meta, data=a.data,
                           family_classifier=a.family_classifier, physics_nt=a.physics_nt,
                           checkpoint_name=a.checkpoint_name, meta_kwargs={"epochs": a.meta_epochs}, **kwargs)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    print(f"{rep['n_samples']} aligned OOF samples, models: "
          + ", ".join(f"{g} ({len(m)} run{'s' if len(m) > 1 else ''})" for g, m in rep["groups"].items()))
    print("held-out OOF MAE (m/s) of each weighting and each model")
    print(format_comparison(rep["comparison"]))
    if rep["meta"] is not None:
        others = {k: v for k, v in rep["mae"].items() if k != "meta"}
        best = min(others, key=others.get)
        print(f"meta-learner on held-out folds: MAE {rep['mae']['meta']:.3f} vs the best other weighting "
              f"({best}) {others[best]:.3f}: {'written' if rep['meta_written'] else 'not referenced by the JSON'}")
    print(f"wrote {rep['config']}: deployed weighting {rep['selected']}, held-out OOF MAE "
          f"{rep['deployed_mae']:.3f} m/s ({rep['comparison']['scored_with']})")
    return 0


def _train_classifier(a) -> int:
    ds = FWIDataset(index_train(find_competition_root(a.data)))
    final, oof = train_family_classifier_oof(ds, folds=a.folds, seed=a.seed, epochs=a.epochs,
                                             batch_size=a.batch_size, device=a.device, progress=True)
    path = final.save(a.out)
    oof_file = save_oof_proba(oof_proba_path(path), oof)
    print(f"family classifier: {len(final.families)} families, {len(ds)} samples; out-of-fold accuracy "
          f"{final.report['oof_accuracy']:.3f} ({a.folds} folds, seed {a.seed})")
    print(f"wrote {path} and {oof_file} (use: python -m fwi_core.ensemble fit RUNS --family-classifier {path})")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fwi_core.ensemble", description=__doc__.split("\n\n")[2],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fit", help="score every weighting on held-out folds and write the best's ensemble JSON",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    f.add_argument("sources", nargs="+", type=Path, help="run folders (searched recursively) or oof_fold*.npz files")
    f.add_argument("--out", type=Path, default=None, help="ensemble JSON (default: ensemble.json beside the runs)")
    f.add_argument("--method", default="auto", choices=["auto", "optuna", "projected_gradient"])
    f.add_argument("--select", default="best", choices=list(SELECTIONS),
                   help="best: the lowest held-out MAE; single: the best model alone")
    f.add_argument("--n-trials", type=int_at_least(1), default=100, help="optuna trials per weight row")
    f.add_argument("--iterations", type=int_at_least(1), default=300, help="projected-gradient steps per weight row")
    f.add_argument("--meta-epochs", type=int_at_least(1), default=100, help="meta-learner training epochs")
    f.add_argument("--meta", nargs="?", const="yes", default=None, choices=["yes", "always"],
                   help="also evaluate a meta-learner (written when it wins on held-out folds; 'always': always)")
    f.add_argument("--data", type=Path, default=None, help="competition root the runs trained on (seismic features)")
    f.add_argument("--family-classifier", type=Path, default=None,
                   help="a classifier from train-classifier (its .oof.npz beside it)")
    f.add_argument("--physics-nt", type=int_at_least(0), default=0,
                   help="physics-residual feature over the first N time samples")
    f.add_argument("--checkpoint-name", default="best.pt")
    c = sub.add_parser("train-classifier", help="train the family classifier with out-of-fold probabilities",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    c.add_argument("--data", type=Path, required=True, help="competition root (train_samples/) the runs trained on")
    c.add_argument("--out", type=Path, required=True, help="classifier file (.pt); the .oof.npz goes beside it")
    c.add_argument("--folds", type=int_at_least(2), default=5, help="the runs' --folds")
    c.add_argument("--seed", type=int, default=0, help="the runs' --seed (it decides the folds)")
    c.add_argument("--epochs", type=int_at_least(1), default=3)
    c.add_argument("--batch-size", type=int_at_least(1), default=16)
    c.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    a = ap.parse_args(argv)
    if a.out is not None and a.out.is_dir():
        what = "the ensemble JSON file" if a.command == "fit" else "the classifier file (.pt)"
        ap.error(f"argument --out: {a.out} is a folder, expected {what} to write")
    for flag in ("data", "family_classifier"):
        path = getattr(a, flag, None)
        if path is not None and not path.exists():
            ap.error(f"argument --{flag.replace('_', '-')}: {path} does not exist")
    try:
        return _fit(a) if a.command == "fit" else _train_classifier(a)
    except (FileNotFoundError, ValueError, FWIError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
