"""Checkpoints: atomic files, rolling retention, run metadata, model loading.

A checkpoint is a ``torch.save`` dict that ``torch.load(..., weights_only=True)`` can
read (tensors, numbers, strings, lists and dicts only):

- ``metadata``: model name and kwargs, fold, epoch, step, validation metrics per family,
  platform, git commit, ``fwi_core.__version__``, wall time, the config (see
  :func:`read_metadata`);
- ``model`` and ``ema``: the raw and EMA weights (``ema`` is None without EMA);
- full checkpoints (``ckpt-<step>.pt``) also hold ``state``: optimizer, scheduler,
  GradScaler, every rank's RNG states, the position within the epoch and the engine's
  bookkeeping, everything :func:`fwi_core.train.train` needs to resume exactly.

``best.pt`` and ``snapshot-<k>.pt`` hold weights and metadata only.
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

from fwi_core.utils import atomic_path

from .errors import CheckpointError

FORMAT = "fwi_core.train/1"
_CKPT_RE = re.compile(r"^ckpt-(\d+)\.pt$")
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


def plain(obj):
    """``obj`` with numpy scalars and arrays turned into Python numbers and lists and
    tuples into lists (what ``weights_only`` loading and JSON accept)."""
    if isinstance(obj, dict):
        return {str(k) if isinstance(k, np.generic) else k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, str):
        return str(obj)   # str subclasses (e.g. torch's TorchVersion) are not weights_only-safe
    return obj


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


def load_checkpoint(path: PathLike, map_location="cpu", mmap: bool = False) -> Dict[str, Any]:
    """Read a checkpoint written by the engine (``weights_only`` loading)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as exc:  # torch raises several types for corrupt or foreign files
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from exc
    fmt = ckpt.get("format") if isinstance(ckpt, dict) else None
    if fmt != FORMAT:
        m = re.fullmatch(r"fwi_core\.train/(\d+)", str(fmt))
        if m and int(m.group(1)) > int(FORMAT.rsplit("/", 1)[1]):
            raise CheckpointError(f"{path}: written by a newer fwi_core (format {fmt!r}); this version reads "
                                  f"{FORMAT!r}: update fwi_core")
        raise CheckpointError(f"{path}: not an fwi_core.train checkpoint (format {FORMAT!r} expected)")
    for key, kind in (("metadata", dict), ("model", dict)):
        if not isinstance(ckpt.get(key), kind):
            raise CheckpointError(f"{path}: checkpoint lacks {key!r} (a damaged or hand-made file)")
    return ckpt


def read_metadata(path: PathLike) -> Dict[str, Any]:
    """The metadata dict of a checkpoint (memory-mapped read: cheap for large files)."""
    return load_checkpoint(path, mmap=True)["metadata"]


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
        if not self.dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.dir.iterdir() if (m := _CKPT_RE.match(p.name))]
        return [p for _, p in sorted(found)]

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


# ------------------------------------------------------------------------- loading models
def family_sources(path: PathLike) -> Dict[str, str]:
    """Per family, the weights ("raw" or "ema") that validated better in the evaluation
    saved with the checkpoint (``metadata["metrics"]["per_family"]``); empty when the
    checkpoint holds no validation metrics."""
    meta = read_metadata(path)
    table = (meta.get("metrics") or {}).get("per_family") or {}
    return {fam: e["source"] for fam, e in table.items() if e.get("source") in ("raw", "ema")}


def load_model(path: PathLike, weights: str = "auto", device: Union[str, torch.device] = "cpu",
               strict: bool = True, family: Optional[str] = None) -> torch.nn.Module:
    """Rebuild a trained model from a checkpoint, ready for inference.

    The architecture comes from the metadata (``create_model(model, **model_kwargs)``).

    Args:
        path: a checkpoint (``best.pt``, ``ckpt-*.pt``, ``snapshot-*.pt``).
        weights: "raw", "ema", or "auto": the weights that validated better overall
            (``metadata["metrics"]["source"]``; EMA when no metrics were recorded and EMA
            weights exist), or, with ``family``, the better ones for that family.
        device: where to put the model.
        family: a family name: with ``weights="auto"``, load the weights (raw or EMA) that
            validated better on that family at this checkpoint (:func:`family_sources`);
            a family the validation did not see falls back to the overall choice. Use it
            when the family of the inputs is known or predicted (one model per family);
            an ensemble can hold both weights as two members instead.

    Returns:
        The model in eval mode, with the checkpoint's metadata as ``model.fwi_metadata``
        and the weights used as ``model.fwi_weights``.
    """
    from fwi_core.models import create_model

    if weights not in ("auto", "raw", "ema"):
        raise ValueError(f"load_model: weights must be 'auto', 'raw' or 'ema', got {weights!r}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise CheckpointError(f"device={device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError(f"device={str(device)!r} but CUDA is not available on this machine: load with "
                              "device='cpu' (checkpoints saved on a GPU load on the CPU)")
    ckpt = load_checkpoint(path)
    meta = ckpt["metadata"]
    if not isinstance(meta.get("model"), str):
        raise CheckpointError(f"{path}: metadata lacks 'model' (the registry name of the architecture)")
    if weights == "auto":
        per_family = ((meta.get("metrics") or {}).get("per_family") or {}).get(family or "", {})
        source = per_family.get("source") or (meta.get("metrics") or {}).get("source")
        weights = source or ("ema" if ckpt.get("ema") is not None else "raw")
    state = ckpt["ema"] if weights == "ema" else ckpt["model"]
    if state is None:
        raise CheckpointError(f"{path}: holds no EMA weights (trained with ema_decay=0); use weights='raw'")
    try:
        model = create_model(meta["model"], **meta.get("model_kwargs", {}))
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:   # RuntimeError: unknown model
        raise CheckpointError(f"{path}: cannot rebuild model {meta.get('model')!r} from its metadata "
                              f"({type(exc).__name__}: {exc})") from exc
    try:
        model.load_state_dict(state, strict=strict)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise CheckpointError(f"{path}: the weights do not fit model {meta['model']!r} ({first})") from exc
    model.fwi_metadata = meta
    model.fwi_weights = weights
    return model.to(device).eval()
