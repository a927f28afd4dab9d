"""The gains table: how much each stage lowered the validation MAE (``stage_gains.json``).

The planner ranks stages by expected gain per second: the gain (m/s of MAE removed) comes
from this table, measured on validation predictions; the seconds are measured on the
test files at run time.

    {"format": "fwi_core.stage_gains/1",
     "gains": {"member:run/best": 180.4, "member:run/snapshot-01": 0.9, "flip": 0.6, "crf": 0.3},
     "mae": {"member:run/best": 31.2, ...},                  # validation MAE after each stage
     "member_mae": {"run/best": 31.2, "run/snapshot-01": 33.0},   # each member alone
     "per_family": {"flip": {"FlatVel_A": 0.1, ...}, ...},
     "order": ["member:run/best", "member:run/snapshot-01", "flip", "crf"],   # as measured
     "samples": 500,
     "members": {"run/best": "<sha1 of its weights>", ...}}

Members are named by their weights: ``members`` holds the digest of each measured
member's weights (:func:`~fwi_core.inference_plan.identity.member_digests`), and
:meth:`StageGains.for_ensemble` renames the table's member entries to the names the run's
ensemble gives the same weights (``inv-fold0/best`` from a checkpoint folder,
``inv-fold0`` from an ensemble JSON), so measured gains are never ignored for a name.

A stage's gain is looked up by its name (``member:<name>``, ``flip``...), then by its
kind (``member``, ``flip``, ``crf``, ``mc_dropout``, ``refine``...), then the stage's
own default (:data:`DEFAULT_GAINS` for the built-in ones). A gain <= 0 (the stage made
validation worse) means the planner skips the stage.

The table is measured by :mod:`~fwi_core.inference_plan.measure` (which runs the planner).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from ..utils import atomic_write_text
from .identity import member_digests

PathLike = Union[str, os.PathLike]
FORMAT = "fwi_core.stage_gains/1"
GAINS_FILE = "stage_gains.json"
#: Built-in defaults (m/s of validation MAE removed): a further member, flip TTA (about
#: 0.6 MAE in a top write-up, FACTS section 7), the tuned CRF, MC-dropout averaging; for
#: the refinement stages and the consistency flags (diagnostics) they are what the planner
#: assumes until a table measures them.
#: ``refine`` (the curved, faulted and style maps): from network-quality starts at 60 s per
#: map every family gained (BENCHMARKS.md, "Test-time refinement": 29.1 -> 21.7 m/s over
#: those eight families) as flat layers did (4.3 -> 2.1); a gains table measured on
#: validation replaces both (a far start, e.g. a weak network's, can lose)
DEFAULT_GAINS = {"member": 1.0, "flip": 0.6, "crf": 0.2, "mc_dropout": 0.05, "refine_layered": 1.0, "refine": 1.0,
                 "consistency": 0.01}
#: A member is "good" when its validation MAE is within this factor of the best member's.
GOOD_MEMBER_FACTOR = 1.1

__all__ = ["StageGains", "find_stage_gains", "find_stage_gains_file", "DEFAULT_GAINS", "GAINS_FILE",
           "GOOD_MEMBER_FACTOR"]


def _number_map(obj: Any, where: str, source: str) -> Dict[str, float]:
    if not isinstance(obj, Mapping):
        raise ValueError(f"{source}: {where} must be an object of numbers, got {type(obj).__name__}")
    out = {}
    for k, v in obj.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
            raise ValueError(f"{source}: {where}.{k} must be a finite number, got {v!r}")
        out[str(k)] = float(v)
    return out


def _map(d: Mapping[str, Any], key: str, path) -> Mapping[str, Any]:
    v = d.get(key, {})
    if not isinstance(v, Mapping):
        raise ValueError(f"{path}: {key} must be an object")
    return v


@dataclass
class StageGains:
    """Expected validation-MAE decrease per stage (see the module doc).

    Attributes:
        gains: stage name or kind -> m/s.
        mae: stage name -> validation MAE after it (cumulative, informative).
        member_mae: member name -> its own validation MAE (picks the cheapest good
            member to run first).
        per_family: stage name -> {family: gain}.
        order: the stages in the order they were measured (each gain is relative to
            the stage before it; the first one's to a constant 3000 m/s map).
        samples: number of validation samples measured.
        members: member name -> digest of its weights (how a run finds its members here).
        per_kind: (ranked stages) stage name -> {family kind: m/s removed per refined
            sample of that kind}; a kind <= 0 is never refined.
        seconds: stage name -> {family kind (or "all"): seconds per sample where it was measured}.
    """

    gains: Dict[str, float] = field(default_factory=dict)
    mae: Dict[str, float] = field(default_factory=dict)
    member_mae: Dict[str, float] = field(default_factory=dict)
    per_family: Dict[str, Dict[str, float]] = field(default_factory=dict)
    order: List[str] = field(default_factory=list)
    samples: int = 0
    members: Dict[str, str] = field(default_factory=dict)
    per_kind: Dict[str, Dict[str, float]] = field(default_factory=dict)
    seconds: Dict[str, Dict[str, float]] = field(default_factory=dict)

    def gain(self, stage) -> float:
        """Expected gain of a :class:`~fwi_core.inference_plan.stages.Stage` (name, kind, default)."""
        if stage.name in self.gains:
            return self.gains[stage.name]
        if stage.kind in self.gains:
            return self.gains[stage.kind]
        return float(DEFAULT_GAINS.get(stage.kind, stage.default_gain))

    def source_of(self, stage) -> str:
        """Where :meth:`gain` took the number from: "table" or "default"."""
        return "table" if stage.name in self.gains or stage.kind in self.gains else "default"

    def member_order(self, members: Sequence[str], cost: Mapping[str, float]) -> list:
        """Members with the cheapest good one first (good: validation MAE within
        ``GOOD_MEMBER_FACTOR`` of the best known; all members count as good when the
        table has no member MAE), then the rest in the given order."""
        members = list(members)
        if not members:
            return []
        known = {m: self.member_mae[m] for m in members if m in self.member_mae}
        best = min(known.values()) if known else math.inf
        good = [m for m in members if not known or (m in known and known[m] <= GOOD_MEMBER_FACTOR * best)]
        first = min(good, key=lambda m: (cost.get(m, math.inf), members.index(m)))
        return [first] + [m for m in members if m != first]

    # -- members -------------------------------------------------------------------
    def for_ensemble(self, ensemble) -> "StageGains":
        """This table with its member entries renamed to ``ensemble``'s names: a measured
        member whose weights' digest matches a run member's takes that member's name."""
        if not self.members:
            return self
        digests = member_digests(ensemble)
        by_digest = {d: name for name, d in digests.items()}
        rename = {old: by_digest[d] for old, d in self.members.items() if d in by_digest and by_digest[d] != old}
        if not rename:
            return self

        def stage(key: str) -> str:
            if key.startswith("member:") and key[7:] in rename:
                return "member:" + rename[key[7:]]
            return key
        return StageGains(gains={stage(k): v for k, v in self.gains.items()},
                          mae={stage(k): v for k, v in self.mae.items()},
                          member_mae={rename.get(k, k): v for k, v in self.member_mae.items()},
                          per_family={stage(k): dict(v) for k, v in self.per_family.items()},
                          order=[stage(k) for k in self.order], samples=self.samples,
                          members={rename.get(k, k): v for k, v in self.members.items()},
                          per_kind={k: dict(v) for k, v in self.per_kind.items()},
                          seconds={stage(k): dict(v) for k, v in self.seconds.items()})

    def describe(self, ensemble, stages: Sequence[str]) -> List[str]:
        """One line per stage of a plan (``members`` expanded): the gain used and where it
        comes from (the table, by name or kind, or the built-in default)."""
        names: List[str] = []
        for s in stages:
            names += [f"member:{m}" for m in ensemble.member_names] if s == "members" else [s]
        out = []
        for n in names:
            kind = "member" if n.startswith("member:") else n
            ref = _Named(n, kind)
            how = ("table" if n in self.gains else "table, by kind") if self.source_of(ref) == "table" else "default"
            line = f"{n}: {self.gain(ref):+.3f} m/s ({how})"
            if n in self.per_kind:
                line += "; per refined sample: " + ", ".join(f"{k} {v:+.2f}" for k, v in self.per_kind[n].items())
            if n in self.seconds and "all" in self.seconds[n]:
                line += f"; {self.seconds[n]['all']:.3g} s per {'sample' if n in self.per_kind else 'file'} measured"
            out.append(line)
        return out

    # -- files ---------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        return {"format": FORMAT, "gains": self.gains, "mae": self.mae, "member_mae": self.member_mae,
                "per_family": self.per_family, "order": self.order, "samples": self.samples,
                "members": self.members, "per_kind": self.per_kind, "seconds": self.seconds}

    def save(self, path: PathLike) -> Path:
        """Write the table as JSON (atomic); a folder gets ``stage_gains.json``."""
        path = Path(path)
        if path.is_dir():
            path = path / GAINS_FILE
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True))
        return path

    @classmethod
    def load(cls, path: PathLike) -> "StageGains":
        """Read and validate a table; raises ValueError naming the file and field."""
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except OSError as e:
            raise ValueError(f"{path}: cannot read the stage gains table ({e})") from e
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ValueError(f"{path}: not a stage gains table (format {FORMAT!r} expected)")
        per_family = d.get("per_family", {})
        if not isinstance(per_family, Mapping):
            raise ValueError(f"{path}: per_family must be an object")
        order = d.get("order", [])
        if not isinstance(order, list) or not all(isinstance(o, str) for o in order):
            raise ValueError(f"{path}: order must be a list of stage names")
        samples = d.get("samples", 0)
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
            raise ValueError(f"{path}: samples must be a non-negative integer, got {samples!r}")
        members = d.get("members", {})
        if not isinstance(members, Mapping) or not all(isinstance(v, str) for v in members.values()):
            raise ValueError(f"{path}: members must map member names to weight digests (strings)")
        return cls(gains=_number_map(d.get("gains", {}), "gains", str(path)),
                   mae=_number_map(d.get("mae", {}), "mae", str(path)),
                   member_mae=_number_map(d.get("member_mae", {}), "member_mae", str(path)),
                   per_family={k: _number_map(v, f"per_family.{k}", str(path)) for k, v in per_family.items()},
                   order=order, samples=samples, members=dict(members),
                   per_kind={k: _number_map(v, f"per_kind.{k}", str(path)) for k, v in _map(d, "per_kind", path).items()},
                   seconds={k: _number_map(v, f"seconds.{k}", str(path)) for k, v in _map(d, "seconds", path).items()})


def find_stage_gains_file(dirs: Sequence[PathLike]) -> Optional[Path]:
    """The ``stage_gains.json`` in the first of ``dirs`` holding one (a checkpoint file
    means its folder), or None."""
    for d in dirs:
        d = Path(d)
        f = (d.parent if d.is_file() else d) / GAINS_FILE
        if f.is_file():
            return f
    return None


def find_stage_gains(dirs: Sequence[PathLike]) -> Optional[StageGains]:
    """The table of :func:`find_stage_gains_file`, or None (the planner then uses the defaults)."""
    f = find_stage_gains_file(dirs)
    return None if f is None else StageGains.load(f)


@dataclass
class _Named:
    """A stage reference by name and kind (what :meth:`StageGains.gain` looks up)."""

    name: str
    kind: str
    default_gain: float = 0.0
