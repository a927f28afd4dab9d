"""The ensemble JSON file (the "static weighting in config" that the infer kernel's
``ensemble_config`` parameter points to).

    {
      "format": "fwi_core.ensemble/1",
      "members": [
        {"name": "cnx-fold0", "checkpoint": "cnx-fold0/best.pt", "weights": "auto",
         "kind": "best", "group": "cnx"},
        {"name": "cnx-fold0:ema", "checkpoint": "cnx-fold0/best.pt", "weights": "ema", "kind": "ema"}
      ],
      "weights": {"default": {"cnx-fold0": 0.5, "cnx-fold0:ema": 0.5},
                  "FlatVel_A": {"cnx-fold0": 1.0}},
      "family_classifier": "family_classifier.pt",
      "meta_learner": "meta_learner.pt",
      "report": {}
    }

``checkpoint`` and the optional ``family_classifier`` / ``meta_learner`` paths are
absolute or relative to the JSON file's folder. ``weights`` (per member) picks the raw,
EMA or ``auto`` (better-validated) weights of the checkpoint, so one checkpoint can give
two members. ``group`` (optional, default the name) names the model a member belongs
to: the meta-learner weighs groups, members of a group are averaged. The ``weights``
table is :class:`~fwi_core.ensemble.weights.EnsembleWeights` (omitted: equal weights);
``report`` is free-form (the OOF comparison written by ``fit_ensemble``).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

from ..errors import EnsembleConfigError
from ..utils import atomic_write_text, plain
from .weights import FORMAT, EnsembleWeights, read_json

PathLike = Union[str, os.PathLike]
WEIGHT_SOURCES = ("auto", "raw", "ema")
_MEMBER_KEYS = {"name", "checkpoint", "weights", "kind", "group"}
_TOP_KEYS = {"format", "members", "weights", "family_classifier", "meta_learner", "report"}

__all__ = ["MemberSpec", "EnsembleConfig", "WEIGHT_SOURCES"]


@dataclass
class MemberSpec:
    """One member of an ensemble file.

    Args:
        name: unique member name (the key of the weights table).
        checkpoint: checkpoint path (absolute or relative to the JSON file's folder).
        weights: which weights of the checkpoint: "auto", "raw" or "ema".
        kind: free label (best, ema, raw, snapshot, fold, student, ...).
        group: the model this member belongs to (default: its name).
    """

    name: str
    checkpoint: str
    weights: str = "auto"
    kind: str = "best"
    group: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        d = {"name": self.name, "checkpoint": self.checkpoint, "weights": self.weights, "kind": self.kind}
        if self.group is not None:
            d["group"] = self.group
        return d


@dataclass
class EnsembleConfig:
    """An ensemble file's content; :meth:`load` validates, :meth:`save` writes atomically."""

    members: List[MemberSpec]
    weights: Optional[EnsembleWeights] = None
    family_classifier: Optional[str] = None
    meta_learner: Optional[str] = None
    report: Dict[str, Any] = field(default_factory=dict)
    path: Optional[Path] = None   # the file it was loaded from / saved to

    @property
    def member_names(self) -> List[str]:
        return [m.name for m in self.members]

    def resolve(self, rel: str) -> Path:
        """A path of the file (checkpoint, classifier, meta-learner) made absolute:
        relative paths are relative to the JSON file's folder."""
        p = Path(rel)
        if p.is_absolute() or self.path is None:
            return p
        return self.path.parent / p

    # ------------------------------------------------------------------ files
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "ensemble config",
                  path: Optional[Path] = None) -> "EnsembleConfig":
        unknown = sorted(set(data) - _TOP_KEYS)
        if unknown:
            raise EnsembleConfigError(f"{source}: unknown field(s) {unknown}; fields: {', '.join(sorted(_TOP_KEYS))}")
        raw = data.get("members")
        if not isinstance(raw, list) or not raw:
            raise EnsembleConfigError(f"{source}: members: expected a non-empty list of "
                                      "{name, checkpoint, ...} objects")
        members: List[MemberSpec] = []
        for i, m in enumerate(raw):
            where = f"members[{i}]"
            if not isinstance(m, Mapping):
                raise EnsembleConfigError(f"{source}: {where}: expected an object, got {m!r}")
            bad = sorted(set(m) - _MEMBER_KEYS)
            if bad:
                raise EnsembleConfigError(f"{source}: {where}: unknown field(s) {bad}; "
                                          f"fields: {', '.join(sorted(_MEMBER_KEYS))}")
            for key in ("name", "checkpoint"):
                if not isinstance(m.get(key), str) or not m.get(key):
                    raise EnsembleConfigError(f"{source}: {where}.{key}: expected a non-empty string")
            w = m.get("weights", "auto")
            if w not in WEIGHT_SOURCES:
                raise EnsembleConfigError(f"{source}: {where}.weights: {w!r} is not one of "
                                          f"{', '.join(WEIGHT_SOURCES)}")
            group = m.get("group")
            if group is not None and (not isinstance(group, str) or not group):
                raise EnsembleConfigError(f"{source}: {where}.group: expected a non-empty string")
            members.append(MemberSpec(m["name"], m["checkpoint"], w, str(m.get("kind", "best")), group))
        names = [m.name for m in members]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise EnsembleConfigError(f"{source}: members: duplicate name(s) {dupes}")
        weights = None
        if data.get("weights") is not None:
            weights = EnsembleWeights(data["weights"], names, source=source)
        extra = {}
        for key in ("family_classifier", "meta_learner"):
            v = data.get(key)
            if v is not None and (not isinstance(v, str) or not v):
                raise EnsembleConfigError(f"{source}: {key}: expected a path string or null, got {v!r}")
            extra[key] = v
        report = data.get("report") or {}
        if not isinstance(report, Mapping):
            raise EnsembleConfigError(f"{source}: report: expected an object")
        return cls(members, weights, report=dict(report), path=path, **extra)

    @classmethod
    def load(cls, path: PathLike) -> "EnsembleConfig":
        """Read and validate an ensemble file (errors name the file and the field)."""
        path = Path(path)
        return cls.from_dict(read_json(path), source=str(path), path=path.resolve())

    def to_dict(self) -> Dict[str, Any]:
        d: Dict[str, Any] = {"format": FORMAT, "members": [m.to_dict() for m in self.members]}
        if self.weights is not None:
            d["weights"] = self.weights.to_dict()
        for key in ("family_classifier", "meta_learner"):
            if getattr(self, key):
                d[key] = getattr(self, key)
        if self.report:
            d["report"] = self.report
        return d

    def save(self, path: Optional[PathLike] = None) -> Path:
        """Write the JSON atomically (to ``path``, default where it was loaded from)."""
        path = Path(path) if path is not None else self.path
        if path is None:
            raise ValueError("EnsembleConfig.save: no path given")
        if self.weights is not None:   # validate before writing
            EnsembleWeights(self.weights.to_dict(), self.member_names, source=str(path))
        atomic_write_text(path, json.dumps(plain(self.to_dict()), indent=2) + "\n")
        self.path = Path(path).resolve()
        return Path(path)
