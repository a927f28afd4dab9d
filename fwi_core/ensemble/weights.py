"""Ensemble weights as data: one global row or one row per family, each a
``{member_name: weight}`` dict of non-negative weights summing to 1.

    w = EnsembleWeights({"default": {"a": 0.5, "b": 0.5}, "FlatVel_A": {"a": 0.9, "b": 0.1}})
    w.for_samples(["a", "b"], ["FlatVel_A", "Style_B"])   # (2, 2): FlatVel_A row, default row
    w.save("ensemble.json"); EnsembleWeights.load("ensemble.json")

The ``"default"`` row serves families without a row of their own (and calls without
families); when a table has no ``"default"`` row, it is the equal weighting. A flat
``{member: weight}`` dict is a global table (its only row is the default).

JSON: ``{"format": "fwi_core.ensemble/1", "weights": {"default": {...}, "<family>": {...}}}``;
an ensemble configuration (:mod:`fwi_core.ensemble.config`) holds the same ``weights``
field beside its member list. Loading validates every row: numbers, finite, >= 0, summing
to 1 (within ``SUM_TOLERANCE``, then renormalised exactly) and, when the file lists its
members, only known member names; a violation raises :class:`EnsembleConfigError` naming
the file and the field.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch

from ..errors import EnsembleConfigError
from ..utils import atomic_write_text

FORMAT = "fwi_core.ensemble/1"
DEFAULT = "default"
#: How far a row's sum may be from 1 in a file (hand-edited 0.33/0.33/0.33 passes).
SUM_TOLERANCE = 1e-2
PathLike = Union[str, os.PathLike]

__all__ = ["EnsembleWeights", "FORMAT", "DEFAULT", "SUM_TOLERANCE"]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_row(row: Any, where: str, source: str, members: Optional[Sequence[str]]) -> Dict[str, float]:
    """Validate one ``{member: weight}`` row and return it renormalised to sum 1."""
    if not isinstance(row, Mapping) or not row:
        raise EnsembleConfigError(f"{source}: {where}: expected a non-empty {{member: weight}} object, "
                                  f"got {row!r}")
    out: Dict[str, float] = {}
    for name, w in row.items():
        if not isinstance(name, str) or not name:
            raise EnsembleConfigError(f"{source}: {where}: member names must be non-empty strings, got {name!r}")
        if members is not None and name not in members:
            raise EnsembleConfigError(f"{source}: {where}.{name}: unknown member {name!r}; "
                                      f"members: {', '.join(members)}")
        if not _is_number(w) or not math.isfinite(float(w)):
            raise EnsembleConfigError(f"{source}: {where}.{name}: weight must be a finite number, got {w!r}")
        if w < 0:
            raise EnsembleConfigError(f"{source}: {where}.{name}: negative weight {w} (weights must be >= 0)")
        out[name] = float(w)
    total = sum(out.values())
    if abs(total - 1.0) > SUM_TOLERANCE:
        raise EnsembleConfigError(f"{source}: {where}: weights sum to {total:.6g}, expected 1 "
                                  f"(within {SUM_TOLERANCE})")
    return {k: v / total for k, v in out.items()}


class EnsembleWeights:
    """Global or per-family member weights (non-negative, each row summing to 1).

    Args:
        table: ``{member: weight}`` (global) or ``{family_or_"default": {member: weight}}``.
        members: the ensemble's member names, in order; names outside it raise. Default:
            the names the table mentions, in order of first appearance.
        source: how errors name the table's origin (a file path when loaded).

    Raises:
        EnsembleConfigError: a malformed table (see the module doc).
    """

    def __init__(self, table: Mapping[str, Any], members: Optional[Sequence[str]] = None,
                 source: str = "EnsembleWeights"):
        if not isinstance(table, Mapping) or not table:
            raise EnsembleConfigError(f"{source}: weights: expected a non-empty object, got {table!r}")
        values = list(table.values())
        if all(_is_number(v) for v in values):
            table = {DEFAULT: dict(table)}
        elif not all(isinstance(v, Mapping) for v in values):
            raise EnsembleConfigError(f"{source}: weights: mix of numbers and rows; use either "
                                      "{member: w} or {family: {member: w}}")
        members = None if members is None else [str(m) for m in members]
        if members is not None and len(set(members)) != len(members):
            raise EnsembleConfigError(f"{source}: duplicate member names in {members}")
        self.rows: Dict[str, Dict[str, float]] = {
            str(fam): _check_row(row, f"weights.{fam}", source, members) for fam, row in table.items()}
        if members is None:
            members = list(dict.fromkeys(n for row in self.rows.values() for n in row))
        self.members: List[str] = members
        self.source = source
        #: Free-form information about how the weights were found (not saved).
        self.info: Dict[str, Any] = {}

    # ------------------------------------------------------------------ constructors
    @classmethod
    def equal(cls, members: Sequence[str]) -> "EnsembleWeights":
        """Equal weights over ``members``."""
        members = list(members)
        if not members:
            raise EnsembleConfigError("EnsembleWeights.equal: no members")
        return cls({m: 1.0 / len(members) for m in members}, members)

    @classmethod
    def from_arrays(cls, members: Sequence[str], default: Sequence[float],
                    per_family: Optional[Mapping[str, Sequence[float]]] = None) -> "EnsembleWeights":
        """From weight vectors in ``members`` order (``default`` (M,), ``per_family``
        {family: (M,)}); they are validated like a file's rows."""
        members = list(members)

        def row(vec, where):
            vec = [float(v) for v in vec]
            if len(vec) != len(members):
                raise EnsembleConfigError(f"EnsembleWeights: {where}: {len(vec)} weights for "
                                          f"{len(members)} members")
            return dict(zip(members, vec))

        table = {DEFAULT: row(default, DEFAULT)}
        for fam, vec in (per_family or {}).items():
            table[str(fam)] = row(vec, fam)
        return cls(table, members)

    # ------------------------------------------------------------------ access
    @property
    def families(self) -> List[str]:
        """Families with a row of their own."""
        return [f for f in self.rows if f != DEFAULT]

    def row(self, family: Optional[str] = None) -> Dict[str, float]:
        """The weights used for ``family`` (its row, else the default row, else equal)."""
        if family is not None and str(family) in self.rows:
            return dict(self.rows[str(family)])
        if DEFAULT in self.rows:
            return dict(self.rows[DEFAULT])
        return {m: 1.0 / len(self.members) for m in self.members}

    def vector(self, member_names: Sequence[str], family: Optional[str] = None) -> torch.Tensor:
        """(M,) float32 weights of ``member_names`` for ``family``, renormalised over these
        members (a subset of the ensemble gets its weights rescaled; a subset whose weights
        are all 0 gets equal weights)."""
        names = [str(n) for n in member_names]
        if not names:
            raise ValueError("EnsembleWeights: no member names given")
        unknown = [n for n in names if n not in self.members]
        if unknown:
            raise ValueError(f"EnsembleWeights ({self.source}): no weight for member(s) {unknown}; "
                             f"known members: {', '.join(self.members)}")
        r = self.row(family)
        w = torch.tensor([r.get(n, 0.0) for n in names], dtype=torch.float64)
        total = float(w.sum())
        w = w / total if total > 0 else torch.full_like(w, 1.0 / len(names))
        return w.to(torch.float32)

    def for_samples(self, member_names: Sequence[str],
                    families: Optional[Sequence[str]] = None) -> torch.Tensor:
        """Weights of ``member_names``: (M,) without families (the default row), else
        (B, M), one row per sample's family. Rows sum to 1 (see :meth:`vector`)."""
        if families is None:
            return self.vector(member_names)
        cache: Dict[str, torch.Tensor] = {}
        rows = []
        for f in families:
            f = str(f)
            if f not in cache:
                cache[f] = self.vector(member_names, f)
            rows.append(cache[f])
        if not rows:
            return torch.zeros(0, len(member_names))
        return torch.stack(rows)

    # ------------------------------------------------------------------ files
    def to_dict(self) -> Dict[str, Dict[str, float]]:
        """``{"default": {...}, "<family>": {...}}`` (what the JSON ``weights`` field holds)."""
        return {fam: dict(row) for fam, row in self.rows.items()}

    def save(self, path: PathLike) -> Path:
        """Write ``{"format", "weights"}`` as JSON, atomically. To store weights inside an
        ensemble configuration use :class:`~fwi_core.ensemble.config.EnsembleConfig`."""

        path = Path(path)
        atomic_write_text(path, json.dumps({"format": FORMAT, "weights": self.to_dict()}, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: PathLike, members: Optional[Sequence[str]] = None) -> "EnsembleWeights":
        """Read the ``weights`` field of a weights file or an ensemble configuration.
        Member names are checked against ``members``, else against the file's own
        ``members`` list when it has one."""
        path = Path(path)
        data = read_json(path)
        if "weights" not in data:
            raise EnsembleConfigError(f"{path}: no 'weights' field")
        if members is None and isinstance(data.get("members"), list):
            members = [m.get("name") if isinstance(m, Mapping) else m for m in data["members"]]
        return cls(data["weights"], members, source=str(path))

    def __eq__(self, other) -> bool:
        return isinstance(other, EnsembleWeights) and self.members == other.members and \
            self.rows.keys() == other.rows.keys() and all(
                self.rows[f].keys() == other.rows[f].keys()
                and all(abs(self.rows[f][m] - other.rows[f][m]) < 1e-12 for m in self.rows[f])
                for f in self.rows)

    def __repr__(self) -> str:
        return f"EnsembleWeights(members={self.members}, rows={list(self.rows)})"


def read_json(path: Path) -> Dict[str, Any]:
    """A JSON object from ``path`` with its format checked; clear errors otherwise."""
    if not path.is_file():
        raise EnsembleConfigError(f"{path}: ensemble file not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EnsembleConfigError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise EnsembleConfigError(f"{path}: expected a JSON object at the top level")
    fmt = data.get("format", FORMAT)
    if fmt != FORMAT:
        raise EnsembleConfigError(f"{path}: format {fmt!r}, expected {FORMAT!r}")
    return data
