"""The :class:`Ensemble`: members (checkpoints: best, EMA, snapshots, folds, models)
combined with weights that are data (:class:`~fwi_core.ensemble.weights.EnsembleWeights`).

    ens = Ensemble.from_checkpoints(["runs/cnx-fold0/best.pt", "runs/inv-fold0/best.pt"])
    ens = Ensemble.from_checkpoints([], config="runs/ensemble.json")     # members + weights from JSON
    mean, var = ens.predict(x_norm, flip_tta=True, mc_passes=8)         # m/s, m/s^2

Members map normalised seismic (B,5,1000,70) to normalised velocity (B,1,70,70). The
combination is a weighted mean in normalised units, with weights (in order of
precedence): per-pixel inverse-variance weights when asked (MC-dropout variances),
the meta-learner's per-sample weights (when the ensemble has one and the seismic is
given), else the static weights of the samples' families (given, or predicted by the
family classifier, else the default row).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..errors import EnsembleConfigError
from ..inference import predict_batch, to_velocity
from ..models.checkpoint import find_checkpoints, load_model
from ..utils import default_device
from .config import EnsembleConfig, MemberSpec
from .family import FamilyClassifier
from .meta import MetaLearner
from .uncertainty import inverse_variance_weights, mc_dropout_predict, mixture_variance
from .weights import EnsembleWeights

PathLike = Union[str, os.PathLike]
VEL_SCALE = 1500.0   # m/s per normalised unit: (VEL_MAX - VEL_MIN) / 2

__all__ = ["Member", "Ensemble", "member_name_for"]


@dataclass
class Member:
    """One ensemble member.

    Args:
        name: unique name (the key of the weights table).
        model: maps normalised seismic (B,5,1000,70) to normalised velocity (B,1,70,70).
        path: the checkpoint it came from, if any.
        kind: best | ema | raw | snapshot | fold | student | model | ...
        group: the model it belongs to (default its name; see :mod:`.config`).
    """

    name: str
    model: nn.Module
    path: Optional[Path] = None
    kind: str = "model"
    group: Optional[str] = None

    @property
    def group_name(self) -> str:
        return self.group or self.name


def _kind_of(path: Path) -> str:
    stem = path.stem
    if stem.startswith("snapshot"):
        return "snapshot"
    if stem.startswith("ckpt"):
        return "checkpoint"
    return "best" if stem.startswith("best") else "model"


def member_name_for(path: PathLike, weights: str = "auto") -> str:
    """Default member name of a checkpoint: ``<run folder>/<file stem>`` (plus
    ``:raw``/``:ema`` when a weight source is forced)."""
    path = Path(path)
    name = f"{path.parent.name}/{path.stem}" if path.parent.name else path.stem
    return name if weights == "auto" else f"{name}:{weights}"


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


class Ensemble:
    """Weighted ensemble of velocity models.

    Args:
        members: the members (unique names).
        weights: static weights (global or per family); None: equal weights.
        family_classifier: a :class:`~fwi_core.ensemble.family.FamilyClassifier` used to
            pick per-family weights when families are not given.
        meta_learner: a :class:`~fwi_core.ensemble.meta.MetaLearner` predicting per-sample
            weights (over the members' groups) from cheap features.
    """

    def __init__(self, members: Sequence[Member], weights: Optional[EnsembleWeights] = None,
                 family_classifier: Optional[nn.Module] = None, meta_learner: Optional[nn.Module] = None):
        members = list(members)
        if not members:
            raise ValueError("Ensemble: no members")
        names = [m.name for m in members]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"Ensemble: duplicate member names {dupes}")
        self.members: Dict[str, Member] = {m.name: m for m in members}
        if weights is None:
            weights = EnsembleWeights.equal(names)
        unknown = [n for n in weights.members if n not in self.members]
        if unknown:
            raise ValueError(f"Ensemble: the weights name unknown member(s) {unknown}; members: {names}")
        # a copy that knows every member (members a row does not mention get weight 0)
        info = weights.info
        weights = EnsembleWeights(weights.to_dict(), list(dict.fromkeys(list(weights.members) + names)),
                                  source=weights.source)
        weights.info = info
        self.weights = weights
        self.family_classifier = family_classifier
        self.meta_learner = meta_learner
        for m in members:
            m.model.eval()
        if family_classifier is not None:
            family_classifier.eval()
        if meta_learner is not None:
            meta_learner.eval()

    # ------------------------------------------------------------------ building
    @classmethod
    def from_checkpoints(cls, paths: Sequence[PathLike] = (), config: Optional[PathLike] = None,
                         device: Optional[Union[str, torch.device]] = None,
                         pattern: str = "best*.pt") -> "Ensemble":
        """Load members from checkpoints, or from an ensemble JSON file.

        Args:
            paths: checkpoint files or folders (searched recursively for ``pattern``).
                Without ``config`` each checkpoint is one member (``load_model(path,
                'auto')``: the better-validated of raw/EMA weights), named
                ``<run folder>/<stem>``, with equal weights. With ``config`` they are
                extra places to find the config's checkpoints whose recorded path does
                not exist (e.g. attached under another root).
            config: an ensemble JSON (:class:`~fwi_core.ensemble.config.EnsembleConfig`):
                members (one checkpoint may give a raw and an EMA member), weights,
                optional family classifier and meta-learner.
            device: where to put the models (default: CUDA if available).
        """
        device = torch.device(device) if device is not None else default_device()
        paths = [Path(p) for p in (paths or ())]
        if config is None:
            files = find_checkpoints(paths, pattern) if paths else []
            if not files:
                raise FileNotFoundError("Ensemble.from_checkpoints: no checkpoints given (pass paths or config=)")
            members = []
            for f in files:
                model = load_model(f, weights="auto", device=device)
                name = member_name_for(f)
                if name in [m.name for m in members]:
                    name = str(f)
                members.append(Member(name, model, f, "ema" if getattr(model, "fwi_weights", "") == "ema"
                                      else _kind_of(f)))
            return cls(members)
        cfg = EnsembleConfig.load(config)
        members = []
        for spec in cfg.members:
            ck = _locate(cfg, spec, paths)
            model = load_model(ck, weights=spec.weights, device=device)
            members.append(Member(spec.name, model, ck, spec.kind, spec.group))
        family_classifier = meta_learner = None
        if cfg.family_classifier:
            family_classifier = FamilyClassifier.load(_existing(cfg, "family_classifier"), device=device)
        if cfg.meta_learner:
            meta_learner = MetaLearner.load(_existing(cfg, "meta_learner"), device=device)
        return cls(members, cfg.weights, family_classifier, meta_learner)

    # ------------------------------------------------------------------ access
    @property
    def member_names(self) -> List[str]:
        return list(self.members)

    def __len__(self) -> int:
        return len(self.members)

    def to(self, device: Union[str, torch.device]) -> "Ensemble":
        for m in self.members.values():
            m.model.to(device)
        for extra in (self.family_classifier, self.meta_learner):
            if extra is not None:
                extra.to(device)
        return self

    # ------------------------------------------------------------------ prediction
    @torch.no_grad()
    def predict_member(self, name: str, x_norm: torch.Tensor, flip_tta: bool = False) -> torch.Tensor:
        """Normalised prediction (B,1,70,70) of one member (no grad; on ``x_norm``'s
        device). ``flip_tta`` averages with the un-flipped prediction of the flipped input."""

        if name not in self.members:
            raise KeyError(f"Ensemble: no member {name!r}; members: {', '.join(self.members)}")
        model = self.members[name].model
        return predict_batch(model, x_norm.to(_device_of(model)), flip_tta).to(x_norm.device)

    @torch.no_grad()
    def predict_member_mc(self, name: str, x_norm: torch.Tensor, passes: int,
                          flip_tta: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """MC-dropout mean and variance (normalised units, (B,1,70,70) each) of one member."""

        if name not in self.members:
            raise KeyError(f"Ensemble: no member {name!r}; members: {', '.join(self.members)}")
        model = self.members[name].model
        mean, var = mc_dropout_predict(model, x_norm.to(_device_of(model)), passes, flip_tta)
        return mean.to(x_norm.device), var.to(x_norm.device)

    @torch.no_grad()
    def predict_families(self, x_norm: torch.Tensor) -> Optional[List[str]]:
        """Predicted family per sample (the family classifier), or None without one."""
        if self.family_classifier is None:
            return None
        return self.family_classifier.predict(x_norm)

    def sample_weights(self, names: Sequence[str], batch: int, families: Optional[Sequence[str]] = None,
                       x_norm: Optional[torch.Tensor] = None, preds: Optional[torch.Tensor] = None,
                       variances: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, M) member weights for a batch: the meta-learner's when it applies (see
        :meth:`combine`), else the static weights of each sample's family."""
        if self.meta_learner is not None and preds is not None:
            spec = self.meta_learner.spec
            if x_norm is not None or not (spec.needs_seismic or spec.family):
                w = self._meta_weights(list(names), preds, x_norm, variances)
                if w is not None:
                    return w
        if families is None and x_norm is not None:
            families = self.predict_families(x_norm)
        if families is not None and len(families) != batch:
            raise ValueError(f"Ensemble: {len(families)} families for a batch of {batch}")
        w = self.weights.for_samples(list(names), families)
        return w.expand(batch, -1) if w.dim() == 1 else w

    def _meta_weights(self, names: List[str], preds: torch.Tensor, x_norm: torch.Tensor,
                      variances: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Member weights from the meta-learner (it weighs groups; a group's weight is
        shared by its members equally), or None when it cannot apply to these members."""
        meta = self.meta_learner
        groups = [self.members[n].group_name for n in names]
        order = list(dict.fromkeys(groups))
        if sorted(order) != sorted(meta.member_names):
            return None
        if meta.spec.mc_variance and variances is None:
            return None
        idx = {g: [i for i, gg in enumerate(groups) if gg == g] for g in order}
        gp = torch.stack([preds[idx[g]].mean(0) for g in meta.member_names])
        gv = None if variances is None else torch.stack([variances[idx[g]].mean(0) for g in meta.member_names])
        fam_proba = None
        if meta.spec.family:
            if self.family_classifier is None or x_norm is None:
                return None
            fam_proba = self.family_classifier.predict_proba(x_norm)
        gw = meta.predict_weights(gp, x_norm, family_proba=fam_proba, mc_var=gv)   # (B, G)
        w = torch.zeros(gp.shape[1], len(names), device=gw.device)
        for j, g in enumerate(meta.member_names):
            for i in idx[g]:
                w[:, i] = gw[:, j] / len(idx[g])
        return w

    def combine(self, preds: Mapping[str, torch.Tensor], families: Optional[Sequence[str]] = None,
                x_norm: Optional[torch.Tensor] = None, variances: Optional[Mapping[str, torch.Tensor]] = None,
                inverse_variance: bool = False) -> torch.Tensor:
        """Weighted mean of member predictions.

        Args:
            preds: {member name: normalised (B,1,70,70)} (any subset of the members: the
                weights are renormalised over it).
            families: B family names (per-family static weights); None: predicted by the
                family classifier when ``x_norm`` is given, else the default row.
            x_norm: the normalised seismic (B,5,1000,70): enables the family classifier and
                the meta-learner (used when the ensemble has one covering exactly these
                members' groups, and ``x_norm`` is given or its features do not need it).
            variances: {member: (B,1,70,70) MC-dropout variance, normalised units}.
            inverse_variance: per-pixel weights ``w_m / var_m`` (renormalised) instead.

        Returns:
            Normalised (B,1,70,70).
        """
        if not preds:
            raise ValueError("Ensemble.combine: no predictions")
        names = list(preds)
        unknown = [n for n in names if n not in self.members]
        if unknown:
            raise KeyError(f"Ensemble.combine: unknown member(s) {unknown}; members: {', '.join(self.members)}")
        stack = torch.stack([preds[n] for n in names])                            # (M,B,1,H,W)
        var = None
        if variances is not None:
            missing = [n for n in names if n not in variances]
            if missing:
                raise ValueError(f"Ensemble.combine: no variance for member(s) {missing}")
            var = torch.stack([variances[n].to(stack) for n in names])
        w = self.sample_weights(names, stack.shape[1], families, x_norm, stack, var).to(stack)   # (B,M)
        return _weighted(stack, w, var, inverse_variance)[0]

    @torch.no_grad()
    def predict(self, x_norm: torch.Tensor, members: Optional[Sequence[str]] = None, flip_tta: bool = False,
                mc_passes: int = 0, families: Optional[Sequence[str]] = None,
                inverse_variance: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Ensemble prediction in m/s.

        Args:
            x_norm: normalised seismic (B,5,1000,70).
            members: the members to run (default all); weights are renormalised over them.
            flip_tta: flip test-time augmentation per member.
            mc_passes: >= 2: MC-dropout passes per member, giving the variance.
            families: B family names (None: the family classifier's, if any).
            inverse_variance: weigh members per pixel by inverse MC variance (needs mc_passes).

        Returns:
            ``(mean, variance)``: mean (B,1,70,70) m/s clamped to 1500..4500; variance
            (B,1,70,70) m/s^2, the variance of the weighted mixture of the members' MC
            distributions (within-member variance plus disagreement), or None without
            MC dropout.
        """


        names = list(members) if members is not None else self.member_names
        if mc_passes == 1 or mc_passes < 0:
            raise ValueError(f"Ensemble.predict: mc_passes must be 0 or >= 2, got {mc_passes}")
        if inverse_variance and not mc_passes:
            raise ValueError("Ensemble.predict: inverse_variance needs mc_passes >= 2")
        preds, var = {}, None
        if mc_passes:
            var = {}
            for n in names:
                preds[n], var[n] = self.predict_member_mc(n, x_norm, mc_passes, flip_tta)
        else:
            for n in names:
                preds[n] = self.predict_member(n, x_norm, flip_tta)
        if families is None:
            families = self.predict_families(x_norm)
        stack = torch.stack([preds[n] for n in names])                            # (M,B,1,H,W)
        vstack = None if var is None else torch.stack([var[n] for n in names])
        w = self.sample_weights(names, stack.shape[1], families, x_norm, stack, vstack).to(stack)
        mean, eff = _weighted(stack, w, vstack, inverse_variance)
        if vstack is None:
            return to_velocity(mean), None
        return to_velocity(mean), mixture_variance(stack, vstack, eff) * VEL_SCALE ** 2


def _weighted(stack: torch.Tensor, w: torch.Tensor, var: Optional[torch.Tensor],
              inverse_variance: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean of ``stack`` (M,B,1,H,W) with weights ``w`` (B,M), or per pixel
    ``w / var`` renormalised; returns (mean (B,1,H,W), the weights used)."""
    if inverse_variance:
        if var is None:
            raise ValueError("Ensemble: inverse_variance needs MC-dropout variances")

        pw = inverse_variance_weights(var, prior=w)                                 # (M,B,1,H,W)
        return (pw * stack).sum(0), pw
    return torch.einsum("bm,mb...->b...", w, stack), w


def _locate(cfg: EnsembleConfig, spec: MemberSpec, search: Sequence[Path]) -> Path:
    """The checkpoint of a config member: as recorded (relative to the JSON file), else
    the same relative path (or file name) under one of the ``search`` folders."""
    p = cfg.resolve(spec.checkpoint)
    if p.is_file():
        return p
    rel = Path(spec.checkpoint)
    for root in search:
        if root.is_file() and (root.name == rel.name and (len(rel.parts) < 2 or root.parent.name == rel.parts[-2])):
            return root
        if root.is_dir():
            for cand in (root / rel, root / Path(*rel.parts[-2:]) if len(rel.parts) >= 2 else root / rel.name):
                if cand.is_file():
                    return cand
    src = cfg.path or "ensemble config"
    raise EnsembleConfigError(f"{src}: members[{spec.name!r}].checkpoint: {spec.checkpoint} not found "
                              f"(looked at {p}{' and under ' + ', '.join(map(str, search)) if search else ''})")


def _existing(cfg: EnsembleConfig, key: str) -> Path:
    p = cfg.resolve(getattr(cfg, key))
    if not p.is_file():
        raise EnsembleConfigError(f"{cfg.path}: {key}: {p} not found")
    return p
