"""Training the meta-learner (:class:`~fwi_core.ensemble.meta.MetaLearner`) on
out-of-fold predictions, and cross-fitting it to see whether it beats the best static
(optimised per-family) weights.

    meta = train_meta_learner(oof_preds, targets, meta_features(spec, oof_preds_norm), names, spec)
    report = evaluate_meta_learner(oof_preds, targets, families, features, folds)

Shapes: predictions (M, N, H, W) or (M, N, 1, H, W); features (N, D).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from ..metrics import per_family
from .meta import ArrayLike, MetaFeatureSpec, MetaLearner, flat_predictions
from .optimize import TRUE_FAMILIES, optimize_weights

#: The meta-learner "beats" the static weights when it lowers their MAE by more than this fraction.
BEAT_TOLERANCE = 1e-4

__all__ = ["train_meta_learner", "evaluate_meta_learner", "BEAT_TOLERANCE"]


def train_meta_learner(preds: ArrayLike, targets: ArrayLike, features: ArrayLike,
                       member_names: Optional[Sequence[str]] = None, spec: Optional[MetaFeatureSpec] = None,
                       hidden: int = 32, epochs: int = 100, lr: float = 1e-2, weight_decay: float = 1e-4,
                       batch_size: int = 1024, prior: Optional[Sequence[float]] = None,
                       val_fraction: float = 0.2, seed: int = 0) -> MetaLearner:
    """Fit a :class:`MetaLearner` minimising the MAE of ``sum_m w_m(features) p_m``.

    Args:
        preds: (M, N, H, W) out-of-fold member predictions (any unit; m/s for OOF files).
        targets: (N, H, W) in the same unit.
        features: (N, D) from :func:`meta_features` (with the same ``spec``).
        prior: (M,) the static weights it starts from.
        epochs, lr, weight_decay, batch_size: AdamW over shuffled mini-batches.
        val_fraction: a random share of the samples (at least 5) held out for early
            stopping: the state with the lowest held-out MAE is kept, counting the
            untrained state (the prior), so it only leaves the static weights it started
            from when that helps on samples it did not train on; 0 trains on everything
            for ``epochs``.

    Returns:
        The meta-learner in eval mode (``.report``: ``train_mae``, ``val_mae``,
        ``prior_val_mae``, ``best_epoch`` (0: the prior), ``epochs``, ``n``).
    """
    p = flat_predictions(preds)                                                # (M, N, P)
    t = torch.as_tensor(np.asarray(targets) if not torch.is_tensor(targets) else targets).float()
    t = t.reshape(t.shape[0], -1)
    f = torch.as_tensor(np.asarray(features) if not torch.is_tensor(features) else features).float()
    m, n = p.shape[:2]
    if t.shape[0] != n or f.shape[0] != n:
        raise ValueError(f"train_meta_learner: {n} predictions, {t.shape[0]} targets, {f.shape[0]} feature rows")
    names = list(member_names) if member_names is not None else [f"m{i}" for i in range(m)]
    torch.manual_seed(seed)
    meta = MetaLearner(names, f.shape[1], spec, hidden, prior)
    meta.set_normalisation(f)
    opt = torch.optim.AdamW(meta.parameters(), lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    n_val = int(round(n * val_fraction)) if val_fraction > 0 else 0
    if n_val < 5 or n - n_val < 5:
        n_val = 0
    val_idx, tr_idx = perm[:n_val], perm[n_val:]

    def mae_on(idx) -> float:
        with torch.no_grad():
            return float((torch.einsum("bm,mbp->bp", meta(f[idx]), p[:, idx]) - t[idx]).abs().mean())

    meta.eval()
    prior_val = mae_on(val_idx) if n_val else float("nan")
    best_val, best_epoch = prior_val, 0
    best_state = {k: v.clone() for k, v in meta.state_dict().items()}
    for epoch in range(1, int(epochs) + 1):
        meta.train()
        order = tr_idx[torch.randperm(len(tr_idx), generator=g)]
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            w = meta(f[idx])                                        # (b, M)
            comb = torch.einsum("bm,mbp->bp", w, p[:, idx])
            loss = (comb - t[idx]).abs().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        if n_val:
            meta.eval()
            v = mae_on(val_idx)
            if v < best_val:
                best_val, best_epoch = v, epoch
                best_state = {k: v_.clone() for k, v_ in meta.state_dict().items()}
    if n_val:
        meta.load_state_dict(best_state)
    else:
        best_epoch = int(epochs)
    meta.eval()
    meta.report = {"train_mae": mae_on(tr_idx), "val_mae": best_val, "prior_val_mae": prior_val,
                   "best_epoch": best_epoch, "epochs": int(epochs), "n": int(n)}
    return meta


def evaluate_meta_learner(preds: ArrayLike, targets: ArrayLike, families: Sequence[str], features: ArrayLike,
                          folds: Sequence[int], member_names: Optional[Sequence[str]] = None,
                          spec: Optional[MetaFeatureSpec] = None, method: str = "projected_gradient",
                          optimize_kwargs: Optional[Dict[str, Any]] = None,
                          score_families: Union[str, Sequence[str], None] = TRUE_FAMILIES,
                          **train_kwargs) -> Dict[str, Any]:
    """Does the meta-learner beat the best static weights on held-out folds?

    For each fold: fit optimised per-family static weights (:func:`optimize_weights`) and
    a meta-learner (starting from them) on the other folds, and score equal, static and
    meta weights on the held-out fold; the static rows are picked by ``score_families``
    (see :func:`~fwi_core.ensemble.optimize.compare_weightings`: "true", N names, or None
    for the default row).

    Returns:
        ``{"table": {family: {"n", "equal", "static", "meta"}} (MAE, 'all' included),
        "beats_static": bool (meta's overall MAE below static's by more than
        ``BEAT_TOLERANCE`` of it: ties and rounding do not count), "gain": static - meta
        (overall MAE), "folds": number of folds, "per_sample": {"equal", "static",
        "meta": (N,) MAE}}``.
    """


    p = flat_predictions(preds)
    t = torch.as_tensor(np.asarray(targets) if not torch.is_tensor(targets) else targets).float()
    t = t.reshape(t.shape[0], -1)
    f = torch.as_tensor(np.asarray(features) if not torch.is_tensor(features) else features).float()
    fams = np.asarray([str(x) for x in families])
    fold_arr = np.asarray(folds)
    m, n = p.shape[:2]
    if len(fams) != n or len(fold_arr) != n:
        raise ValueError(f"evaluate_meta_learner: {n} samples but {len(fams)} families and {len(fold_arr)} fold ids")
    if len(np.unique(fold_arr)) < 2:
        raise ValueError("evaluate_meta_learner: need at least 2 folds")
    names = list(member_names) if member_names is not None else [f"m{i}" for i in range(m)]
    if isinstance(score_families, str):
        scored: Optional[List[str]] = list(fams)
    else:
        scored = None if score_families is None else [str(x) for x in score_families]
    scores = {k: np.zeros(n) for k in ("equal", "static", "meta")}
    for fold in np.unique(fold_arr):
        tr, te = np.nonzero(fold_arr != fold)[0], np.nonzero(fold_arr == fold)[0]
        static = optimize_weights(p[:, tr], t[tr], list(fams[tr]), method=method, member_names=names,
                                  **(optimize_kwargs or {}))
        meta = train_meta_learner(p[:, tr], t[tr], f[tr], names, spec, prior=static.vector(names).tolist(),
                                  **train_kwargs)
        with torch.no_grad():
            ws = static.for_samples(names, None if scored is None else [scored[i] for i in te])
            ws = ws.expand(len(te), -1) if ws.dim() == 1 else ws
            wm = meta(f[te])
        for key, w in (("equal", torch.full((len(te), m), 1.0 / m)), ("static", ws), ("meta", wm)):
            comb = torch.einsum("bm,mbp->bp", w, p[:, te])
            scores[key][te] = (comb - t[te]).abs().mean(1).double().numpy()
    table: Dict[str, Dict[str, float]] = {}
    for key, vals in scores.items():
        for fam, v in per_family(vals, list(fams)).items():
            table.setdefault(fam, {"n": int(n if fam == "all" else (fams == fam).sum())})[key] = float(v)
    gain = table["all"]["static"] - table["all"]["meta"]
    beats = gain > BEAT_TOLERANCE * table["all"]["static"]
    return {"table": table, "beats_static": bool(beats), "gain": float(gain),
            "folds": int(len(np.unique(fold_arr))), "per_sample": scores}
