"""A lightweight meta-learner: per-sample member weights from cheap features.

Features (:func:`meta_features`, one row per sample; which groups are used is a
:class:`MetaFeatureSpec`, stored with the model):

- ``family``: the family classifier's probabilities (F);
- ``seismic``: statistics of the normalised gathers (5: mean, std, mean |x|, max |x|,
  fraction of the energy in the second half of the record);
- ``prediction``: per member, the mean, spread and mean vertical gradient of its map (3M);
- ``disagreement``: per member, the mean |p_m - ensemble mean|, and the mean across-member
  standard deviation (M + 1);
- ``mc_variance``: per member, the mean MC-dropout standard deviation (M);
- ``physics``: per member, the physics residual: simulate its prediction with the exact
  forward model over the first ``physics_nt`` time samples and take the normalised misfit
  against the observed gathers (:func:`fwi_core.physics.misfit.seismic_misfit`; the misfit
  correlates with the error). This is the expensive one (a simulation per member).

The model (:class:`MetaLearner`) standardises the features and maps them with a small MLP
(or a linear layer, ``hidden=0``) to member logits; the weights are their softmax. Its last
layer starts at zero with the bias at ``log(prior)``, so an untrained meta-learner returns
the static weights. :func:`train_meta_learner` minimises the MAE of the weighted
combination on out-of-fold predictions; :func:`evaluate_meta_learner` cross-fits it over
folds and reports whether it beats the best static (optimised per-family) weights.

Shapes: predictions (M, N, H, W) or (M, N, 1, H, W); features (N, D); weights (N, M).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.normalize import denormalize_seismic, denormalize_velocity
from ..metrics import per_family
from ..physics.misfit import seismic_misfit
from .optimize import TRUE_FAMILIES, optimize_weights
from .saved import SavedModule

PathLike = Union[str, os.PathLike]
ArrayLike = Union[np.ndarray, torch.Tensor]
FORMAT = "fwi_core.ensemble.meta_learner/1"
#: The meta-learner "beats" the static weights when it lowers their MAE by more than this fraction.
BEAT_TOLERANCE = 1e-4

__all__ = ["MetaFeatureSpec", "MetaLearner", "meta_features", "seismic_statistics", "physics_misfit",
           "train_meta_learner", "evaluate_meta_learner"]


@dataclass
class MetaFeatureSpec:
    """Which feature groups the meta-learner uses (see the module doc).

    Args:
        family: family-classifier probabilities (needs a classifier).
        seismic: statistics of the normalised gathers (needs the seismic).
        prediction: statistics of each member's map.
        disagreement: member disagreement.
        mc_variance: MC-dropout standard deviation per member (needs MC passes).
        physics_nt: > 0: physics residual per member over the first ``physics_nt`` time
            samples (needs the seismic; costs a simulation per member and sample).
    """

    family: bool = False
    seismic: bool = True
    prediction: bool = True
    disagreement: bool = True
    mc_variance: bool = False
    physics_nt: int = 0

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "MetaFeatureSpec":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"MetaFeatureSpec: unknown field(s) {sorted(unknown)}")
        return cls(**d)

    @property
    def needs_seismic(self) -> bool:
        return self.seismic or self.physics_nt > 0


def _flat(preds: ArrayLike) -> torch.Tensor:
    """(M, N, P) float32 from (M, N, P), (M, N, H, W) or (M, N, 1, H, W)."""
    p = preds if torch.is_tensor(preds) else torch.from_numpy(np.asarray(preds))
    if p.dim() < 3:
        raise ValueError(f"meta-learner: predictions must be (M, N, H, W), got {tuple(p.shape)}")
    return p.detach().float().flatten(2)


def _stack(preds: ArrayLike) -> torch.Tensor:
    p = preds if torch.is_tensor(preds) else torch.from_numpy(np.asarray(preds))
    p = p.detach().float()
    if p.dim() == 4:
        p = p.unsqueeze(2)
    if p.dim() != 5:
        raise ValueError(f"meta-learner: predictions must be (M, N, H, W) or (M, N, 1, H, W), got {tuple(p.shape)}")
    return p


def seismic_statistics(x_norm: torch.Tensor) -> torch.Tensor:
    """(B, 5) statistics of normalised gathers (B, S, T, R): mean, std, mean |x|, max |x|,
    and the fraction of the energy (of x minus its mean) in the second half of the record."""
    x = x_norm.detach().float().flatten(2)                          # (B, S, T*R)
    b = x.shape[0]
    flat = x.reshape(b, -1)
    c = x_norm.detach().float() - flat.mean(1).view(b, 1, 1, 1)
    e = c.pow(2)
    half = e.shape[2] // 2
    late = e[:, :, half:].sum((1, 2, 3)) / e.sum((1, 2, 3)).clamp_min(1e-12)
    return torch.stack([flat.mean(1), flat.std(1), flat.abs().mean(1), flat.abs().amax(1), late], 1)


def physics_misfit(preds_norm: torch.Tensor, x_norm: torch.Tensor, nt: int,
                   simulator: Optional[Callable] = None) -> torch.Tensor:
    """(B, M) normalised seismic misfit of each member's prediction over the first ``nt``
    time samples: ``||simulate(p_m)[:nt] - observed[:nt]|| / ||observed[:nt]||``.

    Args:
        preds_norm: (M, B, 1, H, W) normalised predictions.
        x_norm: (B, S, T, R) normalised observed gathers (``T >= nt``).
    """

    p = _stack(preds_norm)
    if nt < 1 or nt > x_norm.shape[-2]:
        raise ValueError(f"physics_misfit: nt must be in 1..{x_norm.shape[-2]}, got {nt}")
    obs = denormalize_seismic(x_norm.detach().float()[..., :nt, :])
    out = []
    for m in range(p.shape[0]):
        v = denormalize_velocity(p[m].clamp(-1, 1))
        out.append(torch.as_tensor(seismic_misfit(v, obs, simulator=simulator, nt=nt)).float())
    return torch.stack(out, 1).to(x_norm.device)


def meta_features(spec: MetaFeatureSpec, preds_norm: ArrayLike, x_norm: Optional[torch.Tensor] = None,
                  family_proba: Optional[torch.Tensor] = None, mc_var: Optional[ArrayLike] = None,
                  simulator: Optional[Callable] = None) -> torch.Tensor:
    """(B, D) float32 features of a batch (see the module doc).

    Args:
        spec: which groups.
        preds_norm: (M, B, H, W) or (M, B, 1, H, W) member predictions, normalised units.
        x_norm: (B, S, T, R) normalised gathers (``seismic`` / ``physics_nt``).
        family_proba: (B, F) classifier probabilities (``family``).
        mc_var: (M, B, ...) MC-dropout variances, normalised units (``mc_variance``).
        simulator: for the physics residual (default :func:`fwi_core.physics.simulate`).
    """
    p = _stack(preds_norm)                                          # (M, B, 1, H, W)
    m, b = p.shape[:2]
    dev = p.device
    cols: List[torch.Tensor] = []
    if spec.family:
        if family_proba is None:
            raise ValueError("meta_features: the spec uses family probabilities; pass family_proba")
        cols.append(torch.as_tensor(family_proba).float().to(dev).reshape(b, -1))
    if spec.seismic:
        if x_norm is None:
            raise ValueError("meta_features: the spec uses seismic statistics; pass x_norm")
        cols.append(seismic_statistics(x_norm).to(dev))
    if spec.prediction:
        flat = p.flatten(2)                                         # (M, B, P)
        grad = (p[..., 1:, :] - p[..., :-1, :]).abs().flatten(2).mean(2)
        cols.append(torch.cat([flat.mean(2), flat.std(2), grad]).t())
    if spec.disagreement:
        mean = p.mean(0, keepdim=True)
        dev_m = (p - mean).abs().flatten(2).mean(2).t()             # (B, M)
        spread = p.std(0, unbiased=False).flatten(1).mean(1, keepdim=True) if m > 1 else torch.zeros(b, 1)
        cols.append(torch.cat([dev_m, spread.to(dev)], 1))
    if spec.mc_variance:
        if mc_var is None:
            raise ValueError("meta_features: the spec uses MC-dropout variance; pass mc_var")
        v = _stack(mc_var).to(dev)
        cols.append(v.clamp_min(0).sqrt().flatten(2).mean(2).t())
    if spec.physics_nt:
        if x_norm is None:
            raise ValueError("meta_features: the spec uses the physics residual; pass x_norm")
        cols.append(physics_misfit(p, x_norm, spec.physics_nt, simulator).to(dev))
    if not cols:
        raise ValueError("meta_features: the spec selects no features")
    return torch.cat(cols, 1).float()


class MetaLearner(SavedModule, nn.Module):
    """Per-sample member weights from features: standardise, MLP (or linear), softmax.

    Args:
        member_names: the M members (or groups) it weighs, in order.
        n_features: D.
        spec: the features it expects (:class:`MetaFeatureSpec`).
        hidden: hidden width of the MLP (0: softmax-linear).
        prior: (M,) initial weights (the static weights); default equal.

    Shapes: ``forward(features (B, D)) -> weights (B, M)`` (rows sum to 1).
    """

    FORMAT = FORMAT
    WHAT = "meta-learner"

    def __init__(self, member_names: Sequence[str], n_features: int, spec: Optional[MetaFeatureSpec] = None,
                 hidden: int = 32, prior: Optional[Sequence[float]] = None):
        super().__init__()
        self.member_names: List[str] = [str(n) for n in member_names]
        self.spec = spec or MetaFeatureSpec()
        self.n_features, self.hidden = int(n_features), int(hidden)
        m = len(self.member_names)
        if m < 1 or self.n_features < 1:
            raise ValueError(f"MetaLearner: need members and features, got {m} and {n_features}")
        self.register_buffer("feature_mean", torch.zeros(self.n_features))
        self.register_buffer("feature_std", torch.ones(self.n_features))
        layers: List[nn.Module] = []
        if self.hidden:
            layers += [nn.Linear(self.n_features, self.hidden), nn.GELU()]
        last = nn.Linear(self.hidden or self.n_features, m)
        nn.init.zeros_(last.weight)
        pr = torch.full((m,), 1.0 / m) if prior is None else torch.as_tensor(prior, dtype=torch.float32)
        if pr.shape != (m,) or (pr < 0).any():
            raise ValueError(f"MetaLearner: prior must be {m} non-negative weights, got {pr.tolist()}")
        with torch.no_grad():
            last.bias.copy_(torch.log(pr.clamp_min(1e-3) / pr.clamp_min(1e-3).sum()))
        self.net = nn.Sequential(*layers, last)

    def set_normalisation(self, features: torch.Tensor) -> None:
        """Standardise with the mean and std of training features (N, D)."""
        with torch.no_grad():
            self.feature_mean.copy_(features.mean(0))
            self.feature_std.copy_(features.std(0, unbiased=False).clamp_min(1e-6))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() != 2 or features.shape[1] != self.n_features:
            raise ValueError(f"MetaLearner: expected features (B, {self.n_features}), got {tuple(features.shape)}")
        z = (features.to(self.feature_mean) - self.feature_mean) / self.feature_std
        return F.softmax(self.net(z), 1)

    @torch.no_grad()
    def predict_weights(self, preds_norm: ArrayLike, x_norm: Optional[torch.Tensor] = None,
                        family_proba: Optional[torch.Tensor] = None, mc_var: Optional[ArrayLike] = None,
                        simulator: Optional[Callable] = None) -> torch.Tensor:
        """(B, M) weights for member predictions (M, B, 1, H, W) in ``member_names`` order."""
        feats = meta_features(self.spec, preds_norm, x_norm, family_proba, mc_var, simulator)
        return self(feats)

    # ------------------------------------------------------------------ files
    def saved_fields(self) -> Dict[str, Any]:
        return {"member_names": self.member_names, "spec": self.spec.to_dict(), "n_features": self.n_features,
                "hidden": self.hidden}

    @classmethod
    def from_saved_fields(cls, fields: Dict[str, Any]) -> "MetaLearner":
        return cls(fields["member_names"], fields["n_features"], MetaFeatureSpec.from_dict(fields["spec"]),
                   fields["hidden"])

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
    p = _flat(preds)                                                # (M, N, P)
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


    p = _flat(preds)
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
