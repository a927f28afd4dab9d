"""Ensemble weights from validation data.

- :func:`weights_from_validation`: static weights from each member's per-family
  validation MAE (inverse-MAE^p or softmin), optionally scaled by the seismic misfit
  (the normalised seismic misfit of the member's predictions).
- :func:`optimize_weights`: weights minimising the out-of-fold MAE of the weighted mean,
  non-negative and summing to 1, per family: optuna's TPE sampler when installed,
  otherwise (or with ``method="projected_gradient"``) a deterministic projected
  subgradient descent on the probability simplex.
- :func:`compare_weightings`: OOF MAE of equal, static and optimised weights and of the
  single best member side by side per family (cross-fitted over folds when fold ids are
  given; weight rows picked as deployment will pick them), :func:`format_comparison`.

Shapes: ``preds`` (M, N, H, W) (or (M, N, 1, H, W)) member predictions, ``targets``
(N, H, W) (or (N, 1, H, W)), ``families`` N names; any consistent unit (m/s for OOF files).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from ..metrics import per_family
from ..utils import has_module, optional_import
from .weights import DEFAULT, EnsembleWeights

ArrayLike = Union[np.ndarray, torch.Tensor]
METHODS = ("auto", "optuna", "projected_gradient")

__all__ = ["weights_from_validation", "optimize_weights", "compare_weightings", "format_comparison",
           "member_family_mae", "project_simplex", "weighted_mean", "METHODS", "WEIGHTINGS", "TRUE_FAMILIES"]


# ----------------------------------------------------------------------------- helpers
def _as_float(x: ArrayLike) -> torch.Tensor:
    t = x if torch.is_tensor(x) else torch.from_numpy(np.ascontiguousarray(x))
    return t.detach().to(torch.float32)


def _flat_inputs(preds: ArrayLike, targets: ArrayLike, families: Optional[Sequence[str]] = None):
    """(M, N, P) predictions, (N, P) targets, N family names (checked)."""
    p, t = _as_float(preds), _as_float(targets)
    if p.dim() < 3:
        raise ValueError(f"preds: expected (M, N, H, W), got shape {tuple(p.shape)}")
    m, n = p.shape[:2]
    if t.shape[0] != n or t[0].numel() != p[0, 0].numel():
        raise ValueError(f"targets: expected {n} maps shaped like the predictions {tuple(p.shape[2:])}, "
                         f"got {tuple(t.shape)}")
    fams = ["all"] * n if families is None else [str(f) for f in families]
    if len(fams) != n:
        raise ValueError(f"families: {len(fams)} names for {n} samples")
    return p.reshape(m, n, -1), t.reshape(n, -1), fams


def weighted_mean(preds: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean over members: ``preds`` (M, N, ...), ``weights`` (M,) or (N, M)
    -> (N, ...)."""
    w = weights.to(preds)
    if w.dim() == 1:
        return torch.tensordot(w, preds, dims=([0], [0]))
    return torch.einsum("nm,mn...->n...", w, preds)


def _mae(p: torch.Tensor, t: torch.Tensor, w: torch.Tensor) -> float:
    return float((weighted_mean(p, w) - t).abs().mean(dtype=torch.float64))


def project_simplex(v: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of a vector (M,) onto the probability simplex
    (Duchi et al. 2008): non-negative, summing to 1."""
    v = v.to(torch.float64)
    u, _ = torch.sort(v, descending=True)
    css = torch.cumsum(u, 0) - 1.0
    k = torch.arange(1, len(v) + 1, dtype=torch.float64)
    rho = int(torch.nonzero(u - css / k > 0).max())
    theta = css[rho] / (rho + 1)
    return (v - theta).clamp_min(0.0)


def member_family_mae(preds: ArrayLike, targets: ArrayLike, families: Sequence[str],
                      member_names: Sequence[str]) -> Dict[str, Dict[str, float]]:
    """{member: {family: MAE, ..., "all": MAE}} of each member's own predictions."""

    p, t, fams = _flat_inputs(preds, targets, families)
    if len(member_names) != p.shape[0]:
        raise ValueError(f"member_names: {len(member_names)} names for {p.shape[0]} members")
    return {str(name): per_family((p[i] - t).abs().mean(1).double().numpy(), fams)
            for i, name in enumerate(member_names)}


# ------------------------------------------------------------------ (a) static weights
def weights_from_validation(member_mae: Mapping[str, Mapping[str, float]],
                            physics: Optional[Mapping[str, Mapping[str, float]]] = None,
                            method: str = "inverse", power: float = 2.0, temperature: float = 0.1,
                            physics_power: float = 1.0) -> EnsembleWeights:
    """Static weights from each member's validation MAE per family.

    Args:
        member_mae: {member: {family: MAE}} (e.g. :func:`member_family_mae`, or the
            ``val_mae_per_family`` of each run); an ``"all"`` entry sets the default row,
            else the default uses the mean over the member's families.
        physics: optional {member: {family: misfit}} (:func:`fwi_core.physics.misfit.seismic_misfit`
            averaged per family); weights are further multiplied by
            ``(misfit / best misfit) ** -physics_power``.
        method: "inverse" (``w ∝ MAE^-power``) or "softmin"
            (``w ∝ exp(-(MAE / best MAE - 1) / temperature)``: a member 10% worse than the
            best gets ``exp(-1)`` of its weight at temperature 0.1).

    Returns:
        :class:`EnsembleWeights` with a default row and a row per family that every
        member reports.
    """
    if method not in ("inverse", "softmin"):
        raise ValueError(f"weights_from_validation: method must be 'inverse' or 'softmin', got {method!r}")
    names = list(member_mae)
    if not names:
        raise ValueError("weights_from_validation: no members")

    def score_row(values: List[float], pcs: Optional[List[float]]) -> List[float]:
        v = np.maximum(np.asarray(values, dtype=np.float64), 1e-9)
        if not np.all(np.isfinite(v)):
            raise ValueError(f"weights_from_validation: non-finite MAE in {values}")
        if method == "inverse":
            w = v ** -float(power)
        else:
            w = np.exp(-(v / v.min() - 1.0) / float(temperature))
        if pcs is not None:
            pc = np.maximum(np.asarray(pcs, dtype=np.float64), 1e-12)
            w = w * (pc / pc.min()) ** -float(physics_power)
        return list(w / w.sum())

    def column(fam: str, table) -> Optional[List[float]]:
        if table is None:
            return None
        if any(fam not in table.get(n, {}) for n in names):
            return None
        return [float(table[n][fam]) for n in names]

    default_mae = []
    for n in names:
        row = member_mae[n]
        fams = [f for f in row if f != "all"]
        if "all" in row:
            default_mae.append(float(row["all"]))
        elif fams:
            default_mae.append(float(np.mean([row[f] for f in fams])))
        else:
            raise ValueError(f"weights_from_validation: member {n!r} has no MAE")
    default_pc = None
    if physics is not None:
        default_pc = column("all", physics) or [float(np.mean([v for f, v in physics[n].items() if f != "all"]))
                                                  for n in names]
    per_family = {}
    families = sorted(set.intersection(*[set(member_mae[n]) for n in names]) - {"all"})
    for fam in families:
        per_family[fam] = score_row(column(fam, member_mae), column(fam, physics))
    w = EnsembleWeights.from_arrays(names, score_row(default_mae, default_pc), per_family)
    w.info = {"method": f"validation:{method}", "physics": physics is not None}
    return w


# --------------------------------------------------------------- (b) optimised weights
def _fit_projected_gradient(p: torch.Tensor, t: torch.Tensor, iterations: int,
                            init: Sequence[torch.Tensor]) -> torch.Tensor:
    """Projected subgradient descent of the MAE on the simplex, from the best of
    ``init`` and the vertices; step ``0.5 / sqrt(k + 1)`` along the normalised
    subgradient ``mean(sign(sum_m w_m p_m - t) * p_m)``; returns the best iterate."""
    m = p.shape[0]
    candidates = [torch.full((m,), 1.0 / m, dtype=torch.float64)] + list(torch.eye(m, dtype=torch.float64))
    candidates += [project_simplex(torch.as_tensor(c, dtype=torch.float64)) for c in init]
    scores = [_mae(p, t, c) for c in candidates]
    best_i = int(np.argmin(scores))
    w, best_w, best = candidates[best_i].clone(), candidates[best_i].clone(), scores[best_i]
    n_px = t.numel()
    for k in range(iterations):
        resid = weighted_mean(p, w) - t
        s = torch.sign(resid)
        g = torch.einsum("mnp,np->m", p, s).double() / n_px
        norm = float(g.norm())
        if norm == 0:
            break
        w = project_simplex(w - (0.5 / math.sqrt(k + 1)) * g / norm)
        val = _mae(p, t, w)
        if val < best:
            best, best_w = val, w.clone()
    return best_w


def _fit_optuna(p: torch.Tensor, t: torch.Tensor, n_trials: int, seed: int,
                init: Sequence[torch.Tensor]) -> torch.Tensor:
    """TPE search over M free weights in [0, 1], normalised to sum 1; the equal
    weighting and ``init`` are enqueued as the first trials."""
    optuna = _optuna()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    m = p.shape[0]

    def normalise(raw):
        w = torch.tensor(raw, dtype=torch.float64)
        return w / w.sum() if float(w.sum()) > 0 else torch.full((m,), 1.0 / m, dtype=torch.float64)

    def objective(trial):
        return _mae(p, t, normalise([trial.suggest_float(f"w{i}", 0.0, 1.0) for i in range(m)]))

    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed))
    for start in [torch.full((m,), 1.0 / m)] + list(init):
        start = project_simplex(torch.as_tensor(start, dtype=torch.float64))
        study.enqueue_trial({f"w{i}": float(start[i]) for i in range(m)})
    study.optimize(objective, n_trials=max(int(n_trials), 1 + len(init)))
    return normalise([study.best_params[f"w{i}"] for i in range(m)])


def _resolve_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"optimize_weights: method must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "projected_gradient":
        return method
    if not has_module("optuna"):
        if method == "optuna":
            _optuna()    # the ImportError that says how to get it
        return "projected_gradient"
    return "optuna"


def _optuna():
    return optional_import("optuna", "optimize_weights(method='optuna')",
                           "pip install optuna (or use method='projected_gradient')")


def optimize_weights(preds: ArrayLike, targets: ArrayLike, families: Optional[Sequence[str]] = None,
                     method: str = "auto", member_names: Optional[Sequence[str]] = None,
                     per_family: bool = True, min_family_samples: int = 8, n_trials: int = 100,
                     iterations: int = 300, seed: int = 0,
                     init: Optional[EnsembleWeights] = None) -> EnsembleWeights:
    """Non-negative weights summing to 1 that minimise the MAE of the weighted mean of
    out-of-fold predictions: a default row fitted on all samples and, with
    ``per_family``, a row per family with at least ``min_family_samples`` samples.

    Args:
        preds: (M, N, H, W) member predictions (m/s); targets: (N, H, W).
        families: N family names (None: one global row).
        method: "optuna" (TPE, ``n_trials`` trials), "projected_gradient" (deterministic,
            ``iterations`` steps), or "auto": optuna when it can be imported, else the
            projected gradient.
        member_names: M names (default ``m0``, ``m1``, ...).
        init: weights tried first (e.g. the static weights of :func:`weights_from_validation`).

    Returns:
        :class:`EnsembleWeights`; ``.info`` holds the method used and the in-sample MAE
        of each row.
    """
    p, t, fams = _flat_inputs(preds, targets, families)
    m = p.shape[0]
    names = list(member_names) if member_names is not None else [f"m{i}" for i in range(m)]
    if len(names) != m:
        raise ValueError(f"member_names: {len(names)} names for {m} members")
    used = _resolve_method(method)

    def fit(idx: Optional[np.ndarray], family: Optional[str]) -> torch.Tensor:
        ps, ts = (p, t) if idx is None else (p[:, idx], t[idx])
        starts = [init.vector(names, family).double()] if init is not None else []
        if m == 1:
            return torch.ones(1, dtype=torch.float64)
        if used == "optuna":
            return _fit_optuna(ps, ts, n_trials, seed, starts)
        return _fit_projected_gradient(ps, ts, iterations, starts)

    default = fit(None, None)
    rows, info = {}, {"method": used, "mae": {DEFAULT: _mae(p, t, default)}}
    if per_family and families is not None:
        fam_arr = np.asarray(fams)
        for fam in sorted(set(fams)):
            idx = np.nonzero(fam_arr == fam)[0]
            if len(idx) < min_family_samples:
                continue
            rows[fam] = fit(idx, fam)
            info["mae"][fam] = _mae(p[:, idx], t[idx], rows[fam])
    w = EnsembleWeights.from_arrays(names, default.tolist(), {f: v.tolist() for f, v in rows.items()})
    w.info = info
    return w


# ------------------------------------------------------------------------- comparison
#: ``score_families`` of :func:`compare_weightings`: pick weight rows by the true families.
TRUE_FAMILIES = "true"
#: The weightings :func:`compare_weightings` scores (``single``: the best member alone).
WEIGHTINGS = ("equal", "static", "optimised", "single")


def compare_weightings(preds: ArrayLike, targets: ArrayLike, families: Sequence[str],
                       member_names: Optional[Sequence[str]] = None,
                       folds: Optional[Sequence[int]] = None,
                       static: Optional[EnsembleWeights] = None,
                       optimised: Optional[EnsembleWeights] = None,
                       method: str = "auto", static_method: str = "inverse",
                       score_families: Union[str, Sequence[str], None] = TRUE_FAMILIES,
                       **optimize_kwargs) -> Dict[str, Any]:
    """OOF MAE per family of equal, static (:func:`weights_from_validation`) and
    optimised (:func:`optimize_weights`) weights and of the single best member, beside
    each member's own MAE.

    With ``folds`` (N fold ids, at least 2 distinct) the weightings that are not given
    are cross-fitted: fitted on the other folds, scored on each held-out fold (an honest
    estimate); without, they are fitted and scored on all samples (optimistic). Given
    ``static`` / ``optimised`` weights are scored as they are. Weights are always fitted
    per true family; ``score_families`` says which row each sample gets when scored, as
    it will when deployed: the true families (``"true"``), the family classifier's
    out-of-fold predictions (N names), or None (every sample the default row: an ensemble
    without a classifier). ``single`` is the member with the lowest OOF MAE (the OOF
    predictions are held out already), so the best weighting is never worse than it.

    Returns:
        ``{"table": {family: {"n", "equal", "static", "optimised", "single", <member>:
        MAE}}, "cross_fitted": bool, "best": the weighting with the lowest overall MAE,
        "single": the best member's name, "per_sample": {weighting: (N,) MAE},
        "weights": {"static": EnsembleWeights, "optimised": EnsembleWeights}}`` (the
        returned weights are fitted on all samples).
    """

    p, t, fams = _flat_inputs(preds, targets, families)
    m, n = p.shape[:2]
    names = list(member_names) if member_names is not None else [f"m{i}" for i in range(m)]
    fam_arr = np.asarray(fams)
    if isinstance(score_families, str):
        if score_families != TRUE_FAMILIES:
            raise ValueError(f"compare_weightings: score_families must be 'true', N names or None, "
                             f"got {score_families!r}")
        scored = list(fams)
    elif score_families is None:
        scored = None
    else:
        scored = [str(f) for f in score_families]
        if len(scored) != n:
            raise ValueError(f"score_families: {len(scored)} names for {n} samples")

    def fit_static(idx):
        return weights_from_validation(member_family_mae(p[:, idx], t[idx], fam_arr[idx], names),
                                       method=static_method)

    def fit_opt(idx, init=None):
        return optimize_weights(p[:, idx], t[idx], list(fam_arr[idx]), method=method, member_names=names,
                                init=init, **optimize_kwargs)

    def score(w: EnsembleWeights, idx: np.ndarray) -> np.ndarray:
        ws = w.for_samples(names, None if scored is None else [scored[i] for i in idx])
        return (weighted_mean(p[:, idx], ws) - t[idx]).abs().mean(1).double().numpy()

    everything = np.arange(n)
    static_full = static or fit_static(everything)
    opt_full = optimised or fit_opt(everything, static_full)
    per_sample = {"equal": ((p.mean(0) - t).abs().mean(1)).double().numpy()}
    fold_arr = None if folds is None else np.asarray(folds)
    if fold_arr is not None and len(fold_arr) != n:
        raise ValueError(f"folds: {len(fold_arr)} fold ids for {n} samples")
    cross = fold_arr is not None and len(np.unique(fold_arr)) >= 2 and (static is None or optimised is None)
    for key, given, full in (("static", static, static_full), ("optimised", optimised, opt_full)):
        vals = np.zeros(n)
        if cross and given is None:
            for f in np.unique(fold_arr):
                train_idx, test_idx = np.nonzero(fold_arr != f)[0], np.nonzero(fold_arr == f)[0]
                w = fit_static(train_idx) if key == "static" else fit_opt(train_idx, fit_static(train_idx))
                vals[test_idx] = score(w, test_idx)
        else:
            vals = score(full, everything)
        per_sample[key] = vals
    own = {name: (p[i] - t).abs().mean(1).double().numpy() for i, name in enumerate(names)}
    single = min(names, key=lambda k: float(own[k].mean()))
    per_sample["single"] = own[single]
    per_sample.update(own)
    table: Dict[str, Dict[str, float]] = {}
    counts = {f: int((fam_arr == f).sum()) for f in set(fams)}
    counts["all"] = n
    for key, vals in per_sample.items():
        for fam, v in per_family(vals, fams).items():
            table.setdefault(fam, {"n": counts[fam]})[key] = float(v)
    best = min(WEIGHTINGS, key=lambda k: table["all"][k])
    return {"table": table, "cross_fitted": bool(cross), "best": best, "members": names, "single": single,
            "per_sample": {k: per_sample[k] for k in WEIGHTINGS},
            "scored_with": "true families" if isinstance(score_families, str) else
            ("the default row" if scored is None else "the classifier's families"),
            "weights": {"static": static_full, "optimised": opt_full}}


def format_comparison(report: Mapping[str, Any]) -> str:
    """A plain-text table of :func:`compare_weightings` (families as rows, 'all' last;
    a ``meta`` column when the report has one)."""
    table = report["table"]
    head_cols = [c for c in ("equal", "static", "optimised", "meta", "single") if c in table["all"]]
    cols = head_cols + list(report.get("members", []))
    fams = sorted(f for f in table if f != "all") + ["all"]
    width = max(12, *(len(c) + 2 for c in cols))
    head = f"{'family':<14}{'n':>6}" + "".join(f"{c:>{width}}" for c in cols)
    lines = [head, "-" * len(head)]
    for f in fams:
        lines.append(f"{f:<14}{table[f]['n']:>6}" + "".join(f"{table[f].get(c, float('nan')):>{width}.3f}"
                                                             for c in cols))
    scored = report.get("scored_with")
    lines.append(f"({'cross-fitted over folds' if report.get('cross_fitted') else 'in-sample'}"
                 f"{'; rows picked by ' + scored if scored else ''}; single = {report.get('single')}; "
                 f"best: {report.get('best')})")
    return "\n".join(lines)
