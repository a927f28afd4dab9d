"""The ``prior`` stage: the first prediction read from an existing submission CSV.

A refinement-only pass starts the plan from a submission made before (by this toolkit or
anything else) instead of running member networks::

    python -m fwi_core.predict --data ROOT --prior-submission old.csv \\
        --stages prior refine_layered refine --out refined.csv

``prior`` is a first stage (``starts``): in the first pass it writes each file's map from
the CSV, while the gathers are read once so refinement can route every file to its kind.
The CSV holds odd columns only; the full map is rebuilt by
:func:`~fwi_core.data.submission.expand_odd_columns` (even columns the mean of their
neighbours, column 0 a copy of column 1). The scored odd columns stay the CSV's exactly:
a file no later stage changes is written back with the prior's bytes; a refined one gets
its refined odd columns. Unreadable test files keep their prior map (not the mean map of
the others, as after a member pass).

It needs no checkpoints: without any the run's ensemble is :class:`NoMembers` (no member
stages, no family classifier: refinement routes by the detector). It replaces the member
stages, so a list with ``prior`` holds no producer (``members``, ``flip``,
``mc_dropout``). The prior file is part of the run's identity (its size and SHA-1): a
changed CSV is another run, not resumed.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from ...data.normalize import VEL_MAX, VEL_MIN
from ...data.submission import expand_odd_columns, read_submission_maps
from ...errors import StageError, SubmissionError
from .base import RunContext, Stage
from .registry import register_stage

PathLike = Union[str, os.PathLike]

__all__ = ["PriorSubmission", "PriorStage", "NoMembers", "PRIOR_RESOURCE"]

#: The run's resource holding the :class:`PriorSubmission`.
PRIOR_RESOURCE = "prior_submission"


class PriorSubmission:
    """A submission CSV read as the run's first prediction.

    Args:
        path: the CSV (``oid_ypos,x_1,...,x_69``).

    Raises:
        SubmissionError: no such file.
    """

    def __init__(self, path: PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise SubmissionError(f"--prior-submission {self.path}: no such file")
        self._digest: Optional[str] = None

    def config(self) -> Dict[str, Any]:
        """Its identity in the run's fingerprint: name, size and SHA-1 of the file."""
        if self._digest is None:
            h = hashlib.sha1()
            with open(self.path, "rb") as fh:
                for chunk in iter(lambda: fh.read(16 << 20), b""):
                    h.update(chunk)
            self._digest = h.hexdigest()
        return {"file": self.path.name, "bytes": self.path.stat().st_size, "sha1": self._digest}

    def check(self, oids: Sequence[str]) -> None:
        """Raise :class:`SubmissionError` unless every oid of ``oids`` has its 70 rows in
        the CSV (naming the first few missing) with finite numbers (naming the line and
        column): before any work, so a bad file leaves no state behind."""
        read_submission_maps(self.path, oids, values=False, check_values=True)

    def maps(self, oids: Sequence[str]) -> np.ndarray:
        """(k,70,70) float32 m/s of ``oids``: their odd columns from the CSV, the even
        columns interpolated, clamped to the maps' range.

        Raises:
            SubmissionError: missing oids or rows, a value that is not a finite number.
        """
        odd = read_submission_maps(self.path, oids)
        return np.clip(expand_odd_columns(odd), VEL_MIN, VEL_MAX).astype(np.float32)

    def __repr__(self) -> str:
        return f"PriorSubmission({str(self.path)!r})"


class NoMembers:
    """The ensemble of a run without checkpoints (a ``prior`` run): no members, no family
    classifier, no meta-learner. The planner only asks it for its (empty) members and
    families."""

    members: Dict[str, Any] = {}
    member_names: List[str] = []
    weights = None
    family_classifier = None
    meta_learner = None

    def __len__(self) -> int:
        return 0

    def predict_families(self, x_norm) -> None:
        return None

    def to(self, device) -> "NoMembers":
        return self


class PriorStage(Stage):
    """The first prediction of every file, from a :class:`PriorSubmission` (see the module doc)."""

    name = kind = "prior"
    default_gain = 0.0
    needs_seismic = True        # the first pass reads the gathers: refinement's routing, the gather cache
    starts = True

    def __init__(self, prior: PriorSubmission):
        self.prior = prior
        self._maps: Optional[np.ndarray] = None
        self._ids: Optional[List[str]] = None

    def identity(self):
        return {**super().identity(), "prior": self.prior.config()}

    def prepare(self, ctx: RunContext) -> None:
        """Read the maps of the run's files (its shard under torchrun) from the CSV."""
        self._load(ctx)

    def _load(self, ctx: RunContext) -> np.ndarray:
        ids = list(ctx.ids)
        if self._maps is None or self._ids != ids:
            self._maps, self._ids = self.prior.maps(ids), ids
        return self._maps

    def estimate(self, ctx, before):
        return ctx.io_cost if ctx.io_cost > 0 else None

    def run(self, batch):
        return torch.from_numpy(self._load(batch.ctx)[batch.rows])[:, None]

    def fallback(self, ctx: RunContext, rows: np.ndarray) -> np.ndarray:
        """(k,70,70) m/s for rows the first pass could not predict (unreadable or unreached
        files): their prior maps."""
        return self._load(ctx)[np.asarray(rows, dtype=np.int64)]

    @classmethod
    def from_resources(cls, resources: Dict[str, Any]) -> "PriorStage":
        prior = resources.get(PRIOR_RESOURCE)
        if prior is None:
            raise StageError("stage 'prior' needs a prior submission (--prior-submission CSV, or "
                             f"prepare_inference(prior_submission=...) / the resource {PRIOR_RESOURCE!r})")
        return cls(prior)


register_stage("prior", PriorStage.from_resources)
