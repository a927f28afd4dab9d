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
the static weights. Training it (:func:`~fwi_core.ensemble.meta_fit.train_meta_learner`,
:func:`~fwi_core.ensemble.meta_fit.evaluate_meta_learner`) lives in :mod:`.meta_fit`, so
a notebook that only predicts does not carry it.

Shapes: predictions (M, N, H, W) or (M, N, 1, H, W); features (N, D); weights (N, M).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.normalize import denormalize_seismic, denormalize_velocity
from ..physics.misfit import seismic_misfit
from .saved import SavedModule

PathLike = Union[str, os.PathLike]
ArrayLike = Union[np.ndarray, torch.Tensor]
FORMAT = "fwi_core.ensemble.meta_learner/1"

__all__ = ["MetaFeatureSpec", "MetaLearner", "meta_features", "seismic_statistics", "physics_misfit"]


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


def flat_predictions(preds: ArrayLike) -> torch.Tensor:
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
