"""Checkpoints of a training run: atomic files, rolling retention, run metadata, RNG states.

A checkpoint is a ``torch.save`` dict that ``torch.load(..., weights_only=True)`` can
read (tensors, numbers, strings, lists and dicts only):

- ``metadata``: model name and kwargs, fold, epoch, step, validation metrics per family,
  platform, git commit, ``fwi_core.__version__``, wall time, the config (see
  :func:`read_metadata`);
- ``model`` and ``ema``: the raw and EMA weights (``ema`` is None without EMA);
- full checkpoints (``ckpt-<step>.pt``) also hold ``state``: optimizer, scheduler,
  GradScaler, every rank's RNG states, the position within the epoch and the engine's
  bookkeeping, everything :func:`fwi_core.train.train` needs to resume exactly.

``best.pt`` and ``snapshot-<k>.pt`` hold weights and metadata only. Reading checkpoints
and rebuilding models from them is :mod:`fwi_core.models.checkpoint`'s job.
"""
from __future__ import annotations

import datetime
import os
import random
import re
import subprocess
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np
import torch

from ..errors import CheckpointError
from ..models.checkpoint import FORMAT, rolling_checkpoints
from ..utils import atomic_path

PathLike = Union[str, os.PathLike]


# ------------------------------------------------------------------------- metadata
def git_commit(path: Optional[PathLike] = None) -> Optional[str]:
    """The commit of the checkout holding ``path`` (default: fwi_core), or the
    ``FWI_GIT_COMMIT`` environment variable, or None when neither is known."""
    if os.environ.get("FWI_GIT_COMMIT"):
        return os.environ["FWI_GIT_COMMIT"]
    where = Path(path) if path else Path(__file__).resolve().parent
    try:
        res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True,
                             text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    sha = res.stdout.strip()
    return sha if res.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", sha) else None


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------------- RNG states
def rng_state() -> Dict[str, Any]:
    """Python, numpy and torch (CPU and CUDA) RNG states, as weights_only-safe values."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": _to_lists(random.getstate()),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


# ------------------------------------------------------------------------- files
def save_checkpoint(payload: Dict[str, Any], path: PathLike) -> Path:
    """``torch.save`` through a temporary file renamed into place (atomic)."""
    path = Path(path)
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(payload, tmp)
    return path


class CheckpointManager:
    """Checkpoints of one run folder: rolling ``ckpt-<step>.pt`` (the last ``keep_last``),
    ``best.pt`` and ``snapshot-<k>.pt``, all written atomically."""

    def __init__(self, directory: PathLike, keep_last: int = 2):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.dir = Path(directory)
        self.keep_last = int(keep_last)

    @property
    def best_path(self) -> Path:
        return self.dir / "best.pt"

    def rolling(self) -> List[Path]:
        """The rolling checkpoints, oldest first."""
        return rolling_checkpoints(self.dir)

    def latest(self) -> Optional[Path]:
        r = self.rolling()
        return r[-1] if r else None

    def save(self, payload: Dict[str, Any], step: int) -> Path:
        """Write ``ckpt-<step>.pt`` and delete all but the newest ``keep_last``."""
        path = save_checkpoint(payload, self.dir / f"ckpt-{int(step):08d}.pt")
        for old in self.rolling()[:-self.keep_last]:
            old.unlink(missing_ok=True)
        return path

    def save_best(self, payload: Dict[str, Any]) -> Path:
        return save_checkpoint(_weights_only(payload), self.best_path)

    def save_snapshot(self, payload: Dict[str, Any], index: int) -> Path:
        return save_checkpoint(_weights_only(payload), self.dir / f"snapshot-{int(index):02d}.pt")


def _weights_only(payload: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in payload.items() if k != "state"}


def resolve_resume(resume: Optional[str], out_dir: PathLike) -> Optional[Path]:
    """The checkpoint to resume from: a file, a run folder's latest, or for "auto" the
    latest in ``out_dir`` (None if there is none yet)."""
    if not resume:
        return None
    if str(resume).lower() == "auto":
        return CheckpointManager(out_dir).latest()
    p = Path(resume)
    if p.is_dir():
        latest = CheckpointManager(p).latest()
        if latest is None:
            raise CheckpointError(f"resume={resume}: no ckpt-*.pt in that folder")
        return latest
    if not p.is_file():
        raise CheckpointError(f"resume={resume}: no such checkpoint file or run folder")
    return p
