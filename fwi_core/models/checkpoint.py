"""Reading checkpoints: find them, check them, rebuild the model they hold.

A checkpoint is a ``torch.save`` dict written by the training engine
(:mod:`fwi_core.train.checkpoint`) that ``weights_only`` loading reads: ``format``,
``metadata`` (the registry name of the model and its kwargs, validation metrics, ...),
``model`` and ``ema`` weights. Everything that *uses* a trained model (inference,
ensembles, stages, recipes) reads it through this module, so none of them needs the
training engine.

    from fwi_core.models.checkpoint import find_checkpoints, load_model
    model = load_model(find_checkpoints(["runs"])[0])     # best.pt, better of raw / EMA
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch

from ..errors import CheckpointError
from .registry import create_model

__all__ = ["FORMAT", "CHECKPOINT_KINDS", "load_checkpoint", "read_metadata", "rolling_checkpoints",
           "find_checkpoints", "family_sources", "load_model"]

#: The format string every checkpoint of this version carries.
FORMAT = "fwi_core.train/1"
_ROLLING = re.compile(r"^ckpt-(\d+)\.pt$")
PathLike = Union[str, os.PathLike]


# ------------------------------------------------------------------------- files
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


def rolling_checkpoints(folder: PathLike) -> List[Path]:
    """The rolling checkpoints ``ckpt-<step>.pt`` of one run folder, oldest step first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _ROLLING.match(p.name)) and p.is_file()]
    return [p for _, p in sorted(found)]


CHECKPOINT_KINDS = ("best", "snapshot", "last", "all")


def find_checkpoints(dirs: Sequence[Union[str, os.PathLike]], pattern: Optional[str] = None,
                     kind: str = "best") -> List[Path]:
    """Checkpoint files under ``dirs`` (searched recursively), sorted.

    Args:
        dirs: folders to search, or checkpoint files (returned as they are).
        pattern: a glob for file names; overrides ``kind``.
        kind: which checkpoints the training engine wrote to find: "best"
            (``best*.pt``, the default), "snapshot" (``snapshot-<k>.pt``, one per cycle
            of a ``cosine_restarts`` run), "last" (the newest rolling ``ckpt-<step>.pt``
            of each run folder: the last weights), or "all" (best, snapshots and last).

    Raises:
        ValueError: an unknown ``kind``.
        FileNotFoundError: nothing found (the message says where it looked).
    """
    if kind not in CHECKPOINT_KINDS:
        raise ValueError(f"find_checkpoints: kind must be one of {', '.join(CHECKPOINT_KINDS)}, got {kind!r}")
    globs = [pattern] if pattern is not None else \
        {"best": ["best*.pt"], "snapshot": ["snapshot-*.pt"], "last": [], "all": ["best*.pt", "snapshot-*.pt"]}[kind]
    want_last = pattern is None and kind in ("last", "all")
    found: List[Path] = []
    for d in dirs:
        d = Path(d)
        if d.is_file():
            found.append(d)
        elif d.is_dir():
            for g in globs:
                found.extend(p for p in d.rglob(g) if p.is_file())
            if want_last:        # the newest rolling checkpoint of each run folder
                for run in sorted({p.parent for p in d.rglob("ckpt-*.pt")}):
                    rolling = rolling_checkpoints(run)
                    if rolling:
                        found.append(rolling[-1])
    if not found:
        what = repr(pattern) if pattern is not None else f"kind {kind!r}"
        raise FileNotFoundError(f"no checkpoints matching {what} under {', '.join(map(str, dirs))}; "
                                "pass checkpoint paths explicitly or attach the training output")
    return sorted(dict.fromkeys(found))


# ------------------------------------------------------------------------- models
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
