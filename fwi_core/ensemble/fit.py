"""Fit an ensemble from the training engine's out-of-fold files and write its JSON.

    report = fit_ensemble(["runs/"], "runs/ensemble.json", meta=True)

Reads every ``oof_fold<k>.npz`` (``indices``, ``pred``, ``target`` (m/s), ``family``,
``fold``, ``source``, optionally ``mc_var``; see ``fwi_core.train.validate``) under the
given run folders or files. Runs are grouped into models: by their folder name without
the fold suffix (``cnx-fold0`` and ``cnx-fold1`` are the model ``cnx``), and folders
whose runs trained the same model (``config.json`` / checkpoint metadata: model and
kwargs) on disjoint folds are one model whatever their names (on Kaggle the current run
is ``working`` and the attached ones ``input/<name>``). A model's OOF predictions are the
union of its folds, and models are aligned on the samples they all predicted, keyed by
(fold, sample index). Then every weighting is scored on held-out folds, as it will be
deployed (weight rows picked by the family classifier's out-of-fold predictions, or the
default row without a classifier):

- equal, static (:func:`weights_from_validation`) and optimised (:func:`optimize_weights`)
  weights, cross-fitted (:func:`compare_weightings`), and the single best model;
- optionally a meta-learner (features from the predictions, plus the seismic and the
  physics residual when ``data`` is given, the family classifier's out-of-fold
  probabilities, MC-dropout variances when the OOF files carry them), cross-fitted
  (:func:`evaluate_meta_learner`), refitted on everything and saved beside the JSON.

The weighting with the lowest held-out MAE is written (or the one ``select`` names), so
the ensemble is never worse than its best model on held-out folds; its score is the one
reported. The JSON lists every run's checkpoint (``best.pt`` by default, with the weights
source its OOF came from) of the models that get a weight; a model's weight is shared
equally by its runs. Fewer than :data:`MIN_TRUSTED` aligned samples (or folds of fewer
than :data:`MIN_TRUSTED_FOLD`) give a warning: weights fitted on so few are noise.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..data import FWIDataset, find_competition_root, index_train
from ..data.normalize import VEL_MAX, VEL_MIN, normalize_velocity
from ..errors import CheckpointError
from ..metrics import per_family
from ..models.checkpoint import read_metadata
from .config import EnsembleConfig, MemberSpec
from .family_fit import load_oof_proba, oof_proba_path
from .meta import MetaFeatureSpec, meta_features
from .meta_fit import evaluate_meta_learner, train_meta_learner
from .optimize import WEIGHTINGS, compare_weightings
from .weights import EnsembleWeights

PathLike = Union[str, os.PathLike]
FOLD_SUFFIX = r"[-_.]?fold[-_]?\d+$"
_OOF_KEYS = ("indices", "pred", "target", "family", "fold")
#: Fewer aligned OOF samples than this (or a fold with fewer than MIN_TRUSTED_FOLD): a warning.
MIN_TRUSTED = 100
MIN_TRUSTED_FOLD = 20
SELECTIONS = ("best", *WEIGHTINGS)

__all__ = ["fit_ensemble", "load_oof", "find_oof_files", "align_oof", "FOLD_SUFFIX", "MIN_TRUSTED",
           "MIN_TRUSTED_FOLD", "SELECTIONS"]


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
    if "mc_var" in data and data["mc_var"].shape != data["pred"].shape:
        raise ValueError(f"{path}: mc_var {data['mc_var'].shape} and pred {data['pred'].shape} differ")
    return data


def model_identity(run: Path, checkpoint_name: str = "best.pt") -> Optional[Tuple[str, str]]:
    """(model name, identity) of a run folder: the model, its kwargs and backbone from
    ``config.json``, else from the checkpoint's metadata; None when neither is readable."""
    try:
        if (run / "config.json").is_file():
            d = json.loads((run / "config.json").read_text())
        elif (run / checkpoint_name).is_file():
            d = read_metadata(run / checkpoint_name)
        else:
            return None
    except (OSError, ValueError, CheckpointError):
        return None
    if not isinstance(d, dict) or not d.get("model"):
        return None
    ident = json.dumps([d.get("model"), d.get("model_kwargs") or {}, d.get("backbone_checkpoint")], sort_keys=True,
                       default=str)
    return str(d["model"]), ident


def _merge_runs_of_one_model(tables: Dict[str, Dict], idents: Dict[str, Optional[Tuple[str, str]]]) -> Dict[str, str]:
    """{folder stem: group}: stems that trained the same model on disjoint (fold, sample)
    keys (the folds of one model in folders named differently) become one group, named
    after the model; every other stem is its own group."""
    out = {stem: stem for stem in tables}
    used = set(tables)
    by_ident: Dict[str, List[str]] = {}
    for stem, ident in idents.items():
        if ident is not None:
            by_ident.setdefault(ident[1], []).append(stem)
    for stems in by_ident.values():
        if len(stems) < 2:
            continue
        seen: set = set()
        disjoint = True
        for stem in stems:
            keys = set(tables[stem])
            if keys & seen:
                disjoint = False
                break
            seen |= keys
        if not disjoint:
            continue
        name = idents[stems[0]][0]
        if name in used and name not in stems:
            name = "+".join(sorted(stems))
        used.add(name)
        for stem in stems:
            out[stem] = name
    return out


def align_oof(files: Sequence[Path], group_pattern: str = FOLD_SUFFIX, checkpoint_name: str = "best.pt",
              with_variance: bool = False):
    """Group OOF files by model and align the models on common (fold, index) keys.

    Returns:
        ``(groups, preds, targets, families, folds, runs, keys)``: group names (G),
        predictions (G, N, H, W) float32, targets (N, H, W), families (N,), fold ids (N,),
        ``runs`` {group: [(run folder, fold, weights source), ...]} and the N aligned
        (fold, sample index) keys; with ``with_variance`` also the MC-dropout variances
        (G, N, H, W) in m/s^2, or None unless every file carries ``mc_var``.
    """
    by_stem: Dict[str, Dict[Tuple[int, int], Tuple[int, int]]] = {}
    stem_runs: Dict[str, List[Tuple[Path, int, str]]] = {}
    loaded = []
    for fi, f in enumerate(files):
        d = load_oof(f)
        loaded.append(d)
        run = f.parent
        stem = re.sub(group_pattern, "", run.name) or run.name
        fold = int(np.asarray(d["fold"]).reshape(-1)[0])
        source = str(np.asarray(d["source"]).reshape(-1)[0]) if "source" in d else "auto"
        stem_runs.setdefault(stem, []).append((run, fold, source))
        table = by_stem.setdefault(stem, {})
        for row, idx in enumerate(np.asarray(d["indices"]).tolist()):
            key = (fold, int(idx))
            if key in table:
                other = files[table[key][0]].parent
                raise ValueError(f"fit_ensemble: model {stem!r} has two predictions of fold {fold} sample {idx} "
                                 f"({other} and {run}): give different models different run names "
                                 f"(the name without its fold suffix is the model)")
            table[key] = (fi, row)
    idents = {stem: model_identity(r[0][0], checkpoint_name) for stem, r in stem_runs.items()}
    group_of = _merge_runs_of_one_model(by_stem, idents)
    by_group: Dict[str, Dict[Tuple[int, int], Tuple[int, int]]] = {}
    runs: Dict[str, List[Tuple[Path, int, str]]] = {}
    for stem, g in group_of.items():
        by_group.setdefault(g, {}).update(by_stem[stem])
        runs.setdefault(g, []).extend(stem_runs[stem])
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
    var = np.zeros_like(preds) if all("mc_var" in d for d in loaded) else None
    targets = np.zeros((len(common), *shape), np.float32)
    families = np.empty(len(common), dtype=object)
    for gi, g in enumerate(groups):
        for ni, key in enumerate(common):
            fi, row = by_group[g][key]
            d = loaded[fi]
            preds[gi, ni] = d["pred"][row]
            if var is not None:
                var[gi, ni] = d["mc_var"][row]
            if gi == 0:
                targets[ni] = d["target"][row]
                families[ni] = str(d["family"][row])
            elif not np.allclose(d["target"][row], targets[ni], atol=1e-2):
                raise ValueError(f"fit_ensemble: models {groups[0]!r} and {g!r} have different targets for fold "
                                 f"{key[0]} sample {key[1]}: their OOF files come from different data")
    folds = np.asarray([k[0] for k in common])
    out = (groups, preds, targets, families.astype(str), folds, runs, common)
    return (*out, var) if with_variance else out


def _expand(weights: EnsembleWeights, groups: Dict[str, List[str]]) -> EnsembleWeights:
    """Group weights -> member weights (a group's weight shared equally by its members)."""
    members = [m for g in weights.members for m in groups[g]]
    table = {fam: {m: row.get(g, 0.0) / len(groups[g]) for g in weights.members for m in groups[g]}
             for fam, row in weights.rows.items()}
    return EnsembleWeights(table, members)


def _restrict(weights: EnsembleWeights, keep: Sequence[str]) -> EnsembleWeights:
    """The weights of the groups in ``keep`` only, each row renormalised over them."""
    table = {}
    for fam, row in weights.rows.items():
        total = sum(row.get(g, 0.0) for g in keep)
        table[fam] = {g: (row.get(g, 0.0) / total if total > 0 else 1.0 / len(keep)) for g in keep}
    return EnsembleWeights(table, list(keep))


def _classifier_oof(path: PathLike, keys: Sequence[Tuple[int, int]]) -> Tuple[np.ndarray, np.ndarray]:
    """The family classifier's out-of-fold probabilities (N, F) for the aligned ``keys``
    and their column names: from ``<classifier>.oof.npz``, never from the classifier
    itself (which trained on these samples)."""
    oof_file = oof_proba_path(path)
    oof = load_oof_proba(oof_file)
    where = {(int(f), int(i)): r for r, (f, i) in enumerate(zip(oof["fold"], oof["index"]))}
    missing = [k for k in keys if k not in where]
    if missing:
        raise ValueError(f"fit_ensemble: {oof_file} has no out-of-fold probabilities for (fold, sample) "
                         f"{missing[:3]}{'...' if len(missing) > 3 else ''}: train the classifier with the runs' "
                         "--folds and --seed on the same data")
    return oof["proba"][[where[k] for k in keys]].astype(np.float32), oof["families"].astype(str)


def _meta_features_batched(spec, preds_norm: np.ndarray, x_of, proba: Optional[np.ndarray],
                           var_norm: Optional[np.ndarray], batch: int = 64, simulator=None) -> torch.Tensor:
    n = preds_norm.shape[1]
    rows = []
    for s in range(0, n, batch):
        sl = slice(s, min(n, s + batch))
        x = x_of(range(sl.start, sl.stop)) if x_of is not None else None
        rows.append(meta_features(spec, torch.from_numpy(preds_norm[:, sl]), x,
                                  None if proba is None else torch.from_numpy(proba[sl]),
                                  None if var_norm is None else torch.from_numpy(var_norm[:, sl]),
                                  simulator=simulator))
    return torch.cat(rows)


def _small_set_warning(n: int, folds: np.ndarray) -> Optional[str]:
    counts = {int(f): int(c) for f, c in zip(*np.unique(folds, return_counts=True))}
    if n >= MIN_TRUSTED and min(counts.values()) >= MIN_TRUSTED_FOLD and len(counts) >= 2:
        return None
    return (f"only {n} aligned OOF samples (per fold: {counts}): weights fitted on so few are noise and the "
            f"held-out comparison can pick by chance; trust it from about {MIN_TRUSTED} samples "
            f"({MIN_TRUSTED_FOLD} per fold, 2 folds at least) on")


def fit_ensemble(sources: Sequence[PathLike], out_json: Optional[PathLike] = None, method: str = "auto",
                 select: str = "best", meta: Union[bool, str] = False, data: Optional[PathLike] = None,
                 family_classifier: Optional[PathLike] = None, physics_nt: int = 0,
                 checkpoint_name: str = "best.pt", group_pattern: str = FOLD_SUFFIX,
                 mc_variance: Union[bool, str] = "auto",
                 meta_kwargs: Optional[Dict[str, Any]] = None, **optimize_kwargs) -> Dict[str, Any]:
    """Score every weighting on held-out folds and write the ensemble JSON of the best.

    Args:
        sources: run folders (searched recursively) and/or ``oof_fold*.npz`` files.
        out_json: where to write (default: ``ensemble.json`` in the runs' common folder).
        method: optimiser of :func:`optimize_weights` ("auto", "optuna", "projected_gradient").
        select: "best" (lowest held-out OOF MAE among equal, static, optimised, single
            and, with ``meta``, the meta-learner), or one of "equal", "static",
            "optimised", "single" (the best model alone).
        meta: False, True (also evaluate a meta-learner: written when it wins) or
            "always" (written and deployed in any case).
        data: competition root whose ``train_samples`` the runs were trained on (OOF
            indices are its global sample indices): adds seismic statistics (and the
            physics residual with ``physics_nt`` > 0) to the meta-learner's features.
        family_classifier: a saved :class:`FamilyClassifier` with its out-of-fold
            probabilities beside it (``python -m fwi_core.ensemble train-classifier``): its
            out-of-fold predictions pick the per-family weight rows when weightings are
            scored, its probabilities are meta features, and the JSON references it.
            Without it, deployment uses the default row, and so does the scoring.
        checkpoint_name: the checkpoint file of each run folder.
        group_pattern: regex removed from a run folder's name to get its model's name.
        mc_variance: "auto" (the meta-learner uses the OOF files' MC-dropout variances
            when every file has them), True (they must) or False.
        meta_kwargs: arguments of :func:`train_meta_learner` (hidden, epochs, ...).
        **optimize_kwargs: arguments of :func:`optimize_weights` (n_trials, iterations, ...).

    Returns:
        ``{"config": JSON path, "selected": the weighting written, "deployed_mae": its
        held-out OOF MAE (m/s), "mae": {weighting: held-out MAE}, "comparison":
        compare_weightings report (with a "meta" column when evaluated), "meta":
        evaluate_meta_learner report or None, "meta_written": bool, "weights": the
        member-level EnsembleWeights, "groups": {model: [member names]}, "n_samples": N,
        "warning": the small-OOF-set warning or None}``.
    """
    if select not in SELECTIONS:
        raise ValueError(f"fit_ensemble: select must be one of {'|'.join(SELECTIONS)}, got {select!r}")
    if meta not in (False, True, "always"):
        raise ValueError(f"fit_ensemble: meta must be False, True or 'always', got {meta!r}")
    if mc_variance not in (False, True, "auto"):
        raise ValueError(f"fit_ensemble: mc_variance must be False, True or 'auto', got {mc_variance!r}")
    files = find_oof_files(sources)
    groups, preds, targets, families, folds, runs, keys, var = align_oof(files, group_pattern, checkpoint_name,
                                                                         with_variance=True)
    if mc_variance is True and var is None:
        raise ValueError("fit_ensemble: mc_variance=True but not every OOF file has mc_var: train with "
                         "--oof-mc-passes N (N >= 2) so the engine writes it")
    if mc_variance is False:
        var = None
    warning = _small_set_warning(len(targets), folds)
    if warning:
        warnings.warn(f"fit_ensemble: {warning}", stacklevel=2)
    proba, clf_families = (None, None)
    if family_classifier is not None:
        proba, clf_families = _classifier_oof(family_classifier, keys)
    deploy = None if proba is None else list(clf_families[proba.argmax(1)])
    comparison = compare_weightings(preds, targets, list(families), groups, folds=folds, method=method,
                                    score_families=deploy, **optimize_kwargs)
    table = comparison["table"]
    scores = {k: table["all"][k] for k in WEIGHTINGS}

    meta_report, meta_model = None, None
    if meta:
        x_of = None
        if data is not None:
            ds = FWIDataset(index_train(find_competition_root(data)))
            position = {int(g): i for i, g in enumerate(np.asarray(ds.indices).tolist())}
            missing = [k[1] for k in keys if k[1] not in position]
            if missing:
                raise ValueError(f"fit_ensemble: OOF sample indices {missing[:5]} are not samples of {data}: "
                                 "pass the data the runs were trained on")

            def x_of(rows):
                return torch.stack([ds[position[keys[r][1]]][0] for r in rows])

        spec = MetaFeatureSpec(family=proba is not None, seismic=data is not None,
                               physics_nt=int(physics_nt) if data is not None else 0, mc_variance=var is not None)
        var_norm = None if var is None else var / ((VEL_MAX - VEL_MIN) / 2) ** 2
        feats = _meta_features_batched(spec, normalize_velocity(preds), x_of, proba, var_norm)
        kw = dict(meta_kwargs or {})
        meta_report = evaluate_meta_learner(preds, targets, list(families), feats, folds, groups, spec,
                                            method="projected_gradient", score_families=deploy, **kw)
        for fam, value in _per_family(meta_report["per_sample"]["meta"], families).items():
            table[fam]["meta"] = value
        scores["meta"] = table["all"]["meta"]
        prior = comparison["weights"]["optimised"].vector(groups).tolist()
        meta_model = train_meta_learner(preds, targets, feats, groups, spec, prior=prior, **kw)
    chosen = min(scores, key=scores.get) if select == "best" else select
    if meta == "always":
        chosen = "meta"
    comparison["best"] = min(scores, key=scores.get)
    static_choice = chosen if chosen != "meta" else min(WEIGHTINGS, key=scores.get)
    if static_choice == "equal":
        gw = EnsembleWeights.equal(groups)
    elif static_choice == "single":
        gw = EnsembleWeights.equal([comparison["single"]])
    else:
        gw = comparison["weights"][static_choice]
    kept = groups if chosen == "meta" else [g for g in groups if g in gw.members and
                                            any(gw.rows[f].get(g, 0.0) > 0 for f in gw.rows)]
    gw = _restrict(gw, kept)

    # members: every run's checkpoint of the models that get a weight, grouped by model
    run_dirs = [r for g in groups for r, _, _ in runs[g]]
    out = Path(out_json) if out_json is not None else Path(os.path.commonpath([str(r) for r in run_dirs])
                                                            if len(run_dirs) > 1 else run_dirs[0].parent) / "ensemble.json"
    out_dir = out.resolve().parent
    names_taken: Dict[str, int] = {}
    member_specs, group_members = [], {}
    for g in kept:
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

    meta_file, clf_file = None, None
    if meta_model is not None:
        meta_model.report = {**(meta_model.report or {}), "evaluation": {k: v for k, v in meta_report.items()
                                                                          if k != "per_sample"}}
        meta_model.save(out_dir / "meta_learner.pt")
        meta_file = "meta_learner.pt" if chosen == "meta" else None
    if family_classifier is not None:
        clf_file = os.path.relpath(Path(family_classifier).resolve(), out_dir)
    deployed = {"weighting": chosen, "mae": scores[chosen], "scored_with": comparison["scored_with"],
                "cross_fitted": comparison["cross_fitted"]}
    report = {"selected": chosen, "deployed": deployed, "mae": scores, "single": comparison["single"],
              "cross_fitted": comparison["cross_fitted"], "comparison": table, "n_samples": int(len(targets)),
              "groups": group_members, "oof_files": [str(f) for f in files], "group_weights": gw.to_dict(),
              "meta": None if meta_report is None else {k: v for k, v in meta_report.items() if k != "per_sample"},
              "mc_variance": var is not None, "warning": warning}
    cfg = EnsembleConfig(member_specs, weights, family_classifier=clf_file, meta_learner=meta_file, report=report)
    path = cfg.save(out)
    return {"config": path, "selected": chosen, "deployed_mae": scores[chosen], "mae": scores,
            "comparison": comparison, "meta": meta_report, "meta_written": meta_file is not None,
            "weights": weights, "groups": group_members, "n_samples": int(len(targets)), "warning": warning}


def _per_family(values: np.ndarray, families: Sequence[str]) -> Dict[str, float]:
    return {k: float(v) for k, v in per_family(np.asarray(values, dtype=np.float64), list(families)).items()}
