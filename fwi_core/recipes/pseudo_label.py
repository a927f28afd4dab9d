"""Test-time pseudo-labels: predict the test set, simulate the predictions, train on them.

One round (FACTS section 7: 1st place iterated this every epoch, 6th gained about 1 MAE
from one round): a model (or ensemble, or any callable) predicts the velocity of each
test file; the exact forward model simulates the predicted map; the pair (simulated
gathers, predicted map) is a consistent training sample, whatever the prediction's error.
The pairs are written in the competition layout::

    out_root/train_samples/Pseudo/data/data1.npy    (n, 5, 1000, 70) float32 simulated gathers
    out_root/train_samples/Pseudo/model/model1.npy  (n, 1, 70, 70) float32 predicted maps (m/s)
    ...                                             at most ``samples_per_file`` (500) per file
    out_root/pseudo_labels.json                     the oid of every sample, files, timings

so that ``fwi_core.data.index_train(out_root)`` reads them, with the folder name (``Pseudo``)
as their family; :func:`pseudo_dataset` returns them as an ``FWIDataset`` to concatenate
with the real training data (``torch.utils.data.ConcatDataset``).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from ..data import FWIDataset, index_train
from ..data.dataset import TestDataset
from ..inference import predict_batch, to_velocity
from ..models.checkpoint import load_model
from ..physics.families import VEL_HI, VEL_LO
from ..physics.forward import simulate
from ..utils import atomic_save_npy, atomic_write_text, progress_bar

PathLike = Union[str, os.PathLike]
Predictor = Union[Callable[[torch.Tensor], Any], torch.nn.Module, Sequence[torch.nn.Module], PathLike,
                  Sequence[PathLike]]
PSEUDO_FAMILY = "Pseudo"
MANIFEST = "pseudo_labels.json"


def _predict_fn(predictor: Predictor, device: torch.device, flip_tta: bool, weights: str) -> tuple:
    """(callable normalised batch -> m/s maps, a description) for any accepted predictor."""
    items = list(predictor) if isinstance(predictor, (list, tuple)) else [predictor]
    if not items:
        raise ValueError("pseudo_label_round: no predictor given (an empty list)")
    if all(isinstance(p, (str, os.PathLike)) for p in items):
        models = [load_model(p, weights=weights, device=device) for p in items]
        desc = [str(p) for p in items]
    elif all(isinstance(p, torch.nn.Module) for p in items):
        models = [m.to(device).eval() for m in items]
        desc = [type(m).__name__ for m in models]
    elif len(items) == 1 and callable(items[0]):
        fn = items[0]
        return fn, [getattr(fn, "__name__", type(fn).__name__)]
    else:
        raise ValueError("pseudo_label_round: predictor must be a callable, a model, a list of models, "
                         f"or checkpoint path(s); got {[type(p).__name__ for p in items]}")

    def fn(x: torch.Tensor) -> torch.Tensor:
        return to_velocity(predict_batch(models, x, flip_tta))

    return fn, desc


def _as_maps(pred: Any, n: int) -> np.ndarray:
    """Check a predictor's output and return float32 (n, 1, 70, 70) m/s, clipped to the range."""
    a = pred.detach().float().cpu().numpy() if torch.is_tensor(pred) else np.asarray(pred, dtype=np.float32)
    if a.ndim == 3:
        a = a[:, None]
    if a.shape != (n, 1, 70, 70):
        raise ValueError(f"pseudo_label_round: the predictor returned shape {a.shape} for {n} inputs; "
                         f"expected ({n}, 1, 70, 70) velocities in m/s")
    if not np.isfinite(a).all():
        raise ValueError("pseudo_label_round: the predictor returned NaN or inf")
    if a.max() <= 10.0:
        raise ValueError("pseudo_label_round: the predictions look normalised (max "
                         f"{a.max():.3g}); the predictor must return m/s (use fwi_core.inference.to_velocity)")
    return np.clip(a, VEL_LO, VEL_HI).astype(np.float32)


def pseudo_label_round(predictor: Predictor, test_root: PathLike, out_root: PathLike, *,
                       limit: Optional[int] = None, batch_size: int = 16,
                       device: Optional[Union[str, torch.device]] = None, flip_tta: bool = False,
                       weights: str = "auto", family: str = PSEUDO_FAMILY, samples_per_file: int = 500,
                       sim_batch: Optional[int] = None, backend: str = "auto", overwrite: bool = False,
                       progress: bool = True) -> Dict[str, Any]:
    """Predict the test files, simulate the predictions, write (gathers, map) pairs.

    Args:
        predictor: a callable mapping a normalised batch (B, 5, 1000, 70) on ``device`` to
            velocities in m/s (B, 1, 70, 70) (tensor or array); or a model or list of models
            (averaged, :func:`fwi_core.inference.predict_batch` + ``to_velocity``); or
            checkpoint path(s) (:func:`fwi_core.models.checkpoint.load_model` with ``weights``).
        test_root: the competition root (holding ``test/``) or the test folder.
        out_root: where ``train_samples/<family>/`` and ``pseudo_labels.json`` go.
        limit: use only the first ``limit`` test files (sorted by oid).
        batch_size: test files predicted together.
        device: where to predict and simulate (default: CUDA when available).
        flip_tta: average with the flipped prediction (models and checkpoints only).
        family: the folder name, which ``index_train`` reports as the family.
        samples_per_file: samples per ``data<k>.npy`` / ``model<k>.npy`` pair (<= 500 keeps
            the competition's file size).
        sim_batch: maps per :func:`simulate` call (default 256 on CUDA, 8 on CPU).
        backend: the simulator backend.
        overwrite: replace an existing ``train_samples/<family>`` (else an error).
        progress: show a progress bar.

    Returns:
        A summary: ``samples``, ``files`` (the data/model path pairs), ``family``,
        ``out_root``, ``manifest``, ``predict_s`` and ``simulate_s`` (seconds),
        ``simulate_samples_per_s``, ``velocity_mean`` (m/s).

    The folder is built beside its destination and renamed into place at the end, so an
    interrupted round leaves no partial family folder; each file is written atomically.
    """
    if samples_per_file < 1 or batch_size < 1:
        raise ValueError(f"pseudo_label_round: samples_per_file ({samples_per_file}) and batch_size "
                         f"({batch_size}) must be >= 1")
    if limit is not None and limit < 1:
        raise ValueError(f"pseudo_label_round: limit must be >= 1, got {limit}")
    if not family or "/" in family or family.startswith("."):
        raise ValueError(f"pseudo_label_round: family {family!r} must be a plain folder name")
    out_root = Path(out_root)
    dest = out_root / "train_samples" / family
    if dest.exists() and not overwrite:
        raise FileExistsError(f"{dest} exists (an earlier round?); pass overwrite=True (--force) to replace it")
    device = torch.device(device) if device is not None else \
        torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sim_batch = int(sim_batch) if sim_batch is not None else (256 if device.type == "cuda" else 8)
    ds = TestDataset(test_root)
    if limit is not None:
        ds.files = ds.files[:limit]
    fn, desc = _predict_fn(predictor, device, flip_tta, weights)
    n = len(ds)

    out_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{family}.", dir=out_root))
    t_pred = t_sim = 0.0
    files: List[Dict[str, str]] = []
    oids: List[str] = []
    vel_sum = 0.0
    bar = progress_bar(total=n, desc="pseudo-labels", unit="sample", disable=not progress or None)
    try:
        for k, s0 in enumerate(range(0, n, samples_per_file)):
            part = Subset(ds, list(range(s0, min(n, s0 + samples_per_file))))
            maps, part_oids = [], []
            t = time.perf_counter()
            with torch.no_grad():
                for x, ids in DataLoader(part, batch_size=batch_size):
                    maps.append(_as_maps(fn(x.to(device)), len(ids)))
                    part_oids.extend(ids)
            maps = np.concatenate(maps)
            t_pred += time.perf_counter() - t
            t = time.perf_counter()
            seis = np.empty((len(maps), 5, 1000, 70), np.float32)
            for b0 in range(0, len(maps), sim_batch):
                seis[b0:b0 + sim_batch] = simulate(maps[b0:b0 + sim_batch], device=device, backend=backend)
                bar.update(len(maps[b0:b0 + sim_batch]))
            t_sim += time.perf_counter() - t
            rel_d, rel_m = Path("data") / f"data{k + 1}.npy", Path("model") / f"model{k + 1}.npy"
            atomic_save_npy(tmp / rel_d, seis)
            atomic_save_npy(tmp / rel_m, maps)
            files.append({"data": str(dest / rel_d), "model": str(dest / rel_m), "oids": len(part_oids)})
            oids.extend(part_oids)
            vel_sum += float(maps.astype(np.float64).sum())
        # swap into place
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{family}.old.", dir=out_root))
            dest.rename(old / family)
            tmp.rename(dest)
            shutil.rmtree(old)
        else:
            tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
    summary = {
        "samples": n, "family": family, "out_root": str(out_root), "files": files,
        "predict_s": round(t_pred, 3), "simulate_s": round(t_sim, 3),
        "simulate_samples_per_s": n / t_sim if t_sim > 0 else float("inf"),
        "velocity_mean": vel_sum / (n * 70 * 70) if n else float("nan"),
        "device": str(device), "predictor": desc, "test_root": str(test_root),
        "manifest": str(out_root / MANIFEST),
    }
    atomic_write_text(out_root / MANIFEST, json.dumps(dict(summary, oids=oids), indent=1) + "\n")
    return summary


def pseudo_dataset(out_root: PathLike, family: str = PSEUDO_FAMILY, **kwargs):
    """The pseudo-labelled samples under ``out_root`` as an :class:`fwi_core.data.FWIDataset`
    (``kwargs`` go to it, e.g. ``flip_prob``); concatenate it with the real training set."""

    return FWIDataset(index_train(out_root, families=[family]), **kwargs)
