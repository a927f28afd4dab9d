"""Fit an ensemble from the training engine's out-of-fold files and write its JSON.

    report = fit_ensemble(["runs/"], "runs/ensemble.json", meta=True)

Reads every ``oof_fold<k>.npz`` (``indices``, ``pred``, ``target`` (m/s), ``family``,
``fold``, ``source``; see ``fwi_core.train.engine``) under the given run folders or
files. Runs are grouped into models by their folder name without the fold suffix
(``cnx-fold0`` and ``cnx-fold1`` are the model ``cnx``): a model's OOF predictions are
the union of its folds, and models are aligned on the samples they all predicted,
keyed by (fold, sample index). Then:

1. static weights from each model's per-family OOF MAE (:func:`weights_from_validation`),
   optimised weights (:func:`optimize_weights`), and their cross-fitted comparison with
   equal weights (:func:`compare_weightings`); the weighting with the lowest
   cross-fitted MAE is written (or the one ``select`` names);
2. optionally a meta-learner (features from the predictions, plus the seismic and the
   physics residual when ``data`` is given, plus family probabilities with a
   ``family_classifier``), evaluated on held-out folds (:func:`evaluate_meta_learner`),
   then refitted on everything and saved beside the JSON; the JSON points to it only
   when it beat the static weights (``meta="always"``: always);
3. the ensemble JSON lists every run's checkpoint (``best.pt`` by default, with the
   weights source its OOF came from) as a member of its model's group; a model's
   weight is shared equally by its runs.
"""
from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..data import FWIDataset, find_competition_root, index_train
from ..data.normalize import normalize_velocity
from .config import EnsembleConfig, MemberSpec
from .family import FamilyClassifier
from .meta import MetaFeatureSpec, evaluate_meta_learner, meta_features, train_meta_learner
from .optimize import compare_weightings
from .weights import EnsembleWeights

PathLike = Union[str, os.PathLike]
FOLD_SUFFIX = r"[-_.]?fold[-_]?\d+$"
_OOF_KEYS = ("indices", "pred", "target", "family", "fold")

__all__ = ["fit_ensemble", "load_oof", "find_oof_files", "align_oof", "FOLD_SUFFIX"]


def find_oof_files(sources: Sequence[PathLike]) -> List[Path]:
    """``oof_fold*.npz`` files: the given files, and those under the given folders."""
    found: List[Path] = []
    for s in sources:
        s = Path(s)
        if s.is_file():
            found.append(s)
        elif s.is_dir():
            found.extend(sorted(s.rglob("oof_fold*.npz")))
        else:
            raise FileNotFoundError(f"fit_ensemble: {s} does not exist")
    if not found:
        raise FileNotFoundError(f"fit_ensemble: no oof_fold*.npz under {', '.join(map(str, sources))}")
    return sorted(dict.fromkeys(p.resolve() for p in found))


def load_oof(path: PathLike) -> Dict[str, np.ndarray]:
    """One out-of-fold file, checked (clear errors naming the file and the key)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except Exception as exc:
        raise ValueError(f"{path}: not a readable out-of-fold file ({type(exc).__name__}: {exc})") from exc
    missing = [k for k in _OOF_KEYS if k not in data]
    if missing:
        raise ValueError(f"{path}: missing key(s) {missing}; an engine oof file has {', '.join(_OOF_KEYS)}")
    n = len(data["indices"])
    for k in ("pred", "target", "family"):
        if len(data[k]) != n:
            raise ValueError(f"{path}: {k} has {len(data[k])} rows for {n} indices")
    if data["pred"].shape != data["target"].shape:
        raise ValueError(f"{path}: pred {data['pred'].shape} and target {data['target'].shape} differ")
    return data


def align_oof(files: Sequence[Path], group_pattern: str = FOLD_SUFFIX):
    """Group OOF files by model and align the models on common (fold, index) keys.

    Returns:
        ``(groups, preds, targets, families, folds, runs, keys)``: group names (G),
        predictions (G, N, H, W) float32, targets (N, H, W), families (N,), fold ids (N,),
        ``runs`` {group: [(run folder, fold, weights source), ...]} and the N aligned
        (fold, sample index) keys.
    """
    by_group: Dict[str, Dict[Tuple[int, int], Tuple[int, int]]] = {}
    runs: Dict[str, List[Tuple[Path, int, str]]] = {}
    loaded = []
    for fi, f in enumerate(files):
        d = load_oof(f)
        loaded.append(d)
        run = f.parent
        group = re.sub(group_pattern, "", run.name) or run.name
        fold = int(np.asarray(d["fold"]).reshape(-1)[0])
        source = str(np.asarray(d["source"]).reshape(-1)[0]) if "source" in d else "auto"
        runs.setdefault(group, []).append((run, fold, source))
        table = by_group.setdefault(group, {})
        for row, idx in enumerate(np.asarray(d["indices"]).tolist()):
            key = (fold, int(idx))
            if key in table:
                other = files[table[key][0]].parent
                raise ValueError(f"fit_ensemble: model {group!r} has two predictions of fold {fold} sample {idx} "
                                 f"({other} and {run}): give different models different run names "
                                 f"(the name without its fold suffix is the model)")
            table[key] = (fi, row)
    groups = sorted(by_group)
    common = sorted(set.intersection(*[set(t) for t in by_group.values()]))
    if not common:
        raise ValueError(f"fit_ensemble: the models {groups} share no (fold, sample) predictions: train them "
                         "on the same folds (same folds/seed) so their OOF files overlap")
    dropped = {g: len(by_group[g]) - len(common) for g in groups if len(by_group[g]) > len(common)}
    if dropped:
        warnings.warn(f"fit_ensemble: using the {len(common)} samples every model predicted; dropped per model: "
                      f"{dropped}", stacklevel=3)
    first = loaded[by_group[groups[0]][common[0]][0]]
    shape = first["pred"].shape[1:]
    preds = np.zeros((len(groups), len(common), *shape), np.float32)
    targets = np.zeros((len(common), *shape), np.float32)
    families = np.empty(len(common), dtype=object)
    for gi, g in enumerate(groups):
        for ni, key in enumerate(common):
            fi, row = by_group[g][key]
            d = loaded[fi]
            preds[gi, ni] = d["pred"][row]
            if gi == 0:
                targets[ni] = d["target"][row]
                families[ni] = str(d["family"][row])
            elif not np.allclose(d["target"][row], targets[ni], atol=1e-2):
                raise ValueError(f"fit_ensemble: models {groups[0]!r} and {g!r} have different targets for fold "
                                 f"{key[0]} sample {key[1]}: their OOF files come from different data")
    folds = np.asarray([k[0] for k in common])
    return groups, preds, targets, families.astype(str), folds, runs, common


def _expand(weights: EnsembleWeights, groups: Dict[str, List[str]]) -> EnsembleWeights:
    """Group weights -> member weights (a group's weight shared equally by its members)."""
    members = [m for g in weights.members for m in groups[g]]
    table = {fam: {m: row.get(g, 0.0) / len(groups[g]) for g in weights.members for m in groups[g]}
             for fam, row in weights.rows.items()}
    return EnsembleWeights(table, members)


def _meta_features_batched(spec, preds_norm: np.ndarray, x_of, fam_clf, batch: int = 64,
                           simulator=None) -> torch.Tensor:
    n = preds_norm.shape[1]
    rows = []
    for s in range(0, n, batch):
        sl = slice(s, min(n, s + batch))
        x = x_of(range(sl.start, sl.stop)) if x_of is not None else None
        proba = fam_clf.predict_proba(x) if (fam_clf is not None and x is not None) else None
        rows.append(meta_features(spec, torch.from_numpy(preds_norm[:, sl]), x, proba, simulator=simulator))
    return torch.cat(rows)


def fit_ensemble(sources: Sequence[PathLike], out_json: Optional[PathLike] = None, method: str = "auto",
                 select: str = "best", meta: Union[bool, str] = False, data: Optional[PathLike] = None,
                 family_classifier: Optional[PathLike] = None, physics_nt: int = 0,
                 checkpoint_name: str = "best.pt", group_pattern: str = FOLD_SUFFIX,
                 meta_kwargs: Optional[Dict[str, Any]] = None, **optimize_kwargs) -> Dict[str, Any]:
    """Fit weights (and optionally a meta-learner) from OOF files and write the ensemble JSON.

    Args:
        sources: run folders (searched recursively) and/or ``oof_fold*.npz`` files.
        out_json: where to write (default: ``ensemble.json`` in the runs' common folder).
        method: optimiser of :func:`optimize_weights` ("auto", "optuna", "projected_gradient").
        select: "best" (lowest cross-fitted OOF MAE), "optimised", "static" or "equal".
        meta: False, True (write it when it beats the static weights on held-out folds)
            or "always".
        data: competition root whose ``train_samples`` the runs were trained on (OOF
            indices are its global sample indices): adds seismic statistics (and the
            physics residual with ``physics_nt`` > 0) to the meta-learner's features.
        family_classifier: a saved :class:`FamilyClassifier` (with ``data``): adds family
            probabilities to the features and is referenced by the JSON.
        checkpoint_name: the checkpoint file of each run folder.
        group_pattern: regex removed from a run folder's name to get its model's name.
        meta_kwargs: arguments of :func:`train_meta_learner` (hidden, epochs, ...).
        **optimize_kwargs: arguments of :func:`optimize_weights` (n_trials, iterations, ...).

    Returns:
        ``{"config": JSON path, "selected": weighting written, "comparison":
        compare_weightings report, "meta": evaluate_meta_learner report or None,
        "meta_written": bool, "weights": the member-level EnsembleWeights, "groups":
        {model: [member names]}, "n_samples": N}``.
    """
    if select not in ("best", "optimised", "static", "equal"):
        raise ValueError(f"fit_ensemble: select must be best|optimised|static|equal, got {select!r}")
    if meta not in (False, True, "always"):
        raise ValueError(f"fit_ensemble: meta must be False, True or 'always', got {meta!r}")
    files = find_oof_files(sources)
    groups, preds, targets, families, folds, runs, keys = align_oof(files, group_pattern)
    comparison = compare_weightings(preds, targets, list(families), groups, folds=folds, method=method,
                                    **optimize_kwargs)
    table = comparison["table"]["all"]
    chosen = comparison["best"] if select == "best" else select
    if chosen == "equal":
        gw = EnsembleWeights.equal(groups)
    else:
        gw = comparison["weights"]["static" if chosen == "static" else "optimised"]

    # members: every run's checkpoint, grouped by model
    run_dirs = [r for g in groups for r, _, _ in runs[g]]
    out = Path(out_json) if out_json is not None else Path(os.path.commonpath([str(r) for r in run_dirs])
                                                            if len(run_dirs) > 1 else run_dirs[0].parent) / "ensemble.json"
    out_dir = out.resolve().parent
    names_taken: Dict[str, int] = {}
    member_specs, group_members = [], {}
    for g in groups:
        for run, fold, source in sorted(runs[g], key=lambda r: (r[1], str(r[0]))):
            ck = run / checkpoint_name
            if not ck.is_file():
                warnings.warn(f"fit_ensemble: {ck} does not exist (the JSON still lists it)", stacklevel=2)
            name = run.name if run.name not in names_taken else os.path.relpath(run, out_dir)
            names_taken[name] = 1
            rel = os.path.relpath(ck.resolve(), out_dir)
            member_specs.append(MemberSpec(name, rel, source if source in ("raw", "ema") else "auto",
                                           "fold" if len(runs[g]) > 1 else "best", g))
            group_members.setdefault(g, []).append(name)
    weights = _expand(gw, group_members)

    meta_report, meta_written, meta_file, clf_file = None, False, None, None
    if meta:
        x_of, fam_clf = None, None
        if data is not None:
            ds = FWIDataset(index_train(find_competition_root(data)))
            position = {int(g): i for i, g in enumerate(np.asarray(ds.indices).tolist())}
            missing = [k[1] for k in keys if k[1] not in position]
            if missing:
                raise ValueError(f"fit_ensemble: OOF sample indices {missing[:5]} are not samples of {data}: "
                                 "pass the data the runs were trained on")

            def x_of(rows):
                return torch.stack([ds[position[keys[r][1]]][0] for r in rows])

            if family_classifier is not None:
                fam_clf = FamilyClassifier.load(family_classifier)
                clf_file = os.path.relpath(Path(family_classifier).resolve(), out_dir)
        spec = MetaFeatureSpec(family=fam_clf is not None, seismic=data is not None,
                               physics_nt=int(physics_nt) if data is not None else 0)
        feats = _meta_features_batched(spec, normalize_velocity(preds), x_of, fam_clf)
        kw = dict(meta_kwargs or {})
        meta_report = evaluate_meta_learner(preds, targets, list(families), feats, folds, groups, spec,
                                            method="projected_gradient", **kw)
        model = train_meta_learner(preds, targets, feats, groups, spec, prior=gw.vector(groups).tolist(), **kw)
        model.report = {**(model.report or {}), "evaluation": meta_report}
        meta_path = out_dir / "meta_learner.pt"
        model.save(meta_path)
        meta_written = meta == "always" or meta_report["beats_static"]
        meta_file = "meta_learner.pt" if meta_written else None

    report = {"selected": chosen, "cross_fitted": comparison["cross_fitted"], "comparison": comparison["table"],
              "n_samples": int(len(targets)), "groups": group_members, "oof_files": [str(f) for f in files],
              "group_weights": gw.to_dict(), "meta": meta_report}
    cfg = EnsembleConfig(member_specs, weights, family_classifier=clf_file, meta_learner=meta_file, report=report)
    path = cfg.save(out)
    return {"config": path, "selected": chosen, "comparison": comparison, "meta": meta_report,
            "meta_written": meta_written, "weights": weights, "groups": group_members,
            "n_samples": int(len(targets)), "mae": {k: table[k] for k in ("equal", "static", "optimised")}}

