"""Test-time pseudo-labels: predict the test set, simulate the predictions, train on them.

One round (FACTS section 7: 1st place iterated this every epoch, 6th gained about 1 MAE
from one round): a model (or ensemble, or any callable) predicts the velocity of each
test file; the exact forward model simulates the predicted map; the pair (simulated
gathers, predicted map) is a consistent training sample, whatever the prediction's error.

A round fits Kaggle's 20 GB of output: the gathers are stored as float16 (the default,
700,000 bytes a sample, plus 19,600 for the float32 map: 719,600 bytes, 0.72 MB), and only
the ``max_gb`` (default 15 GB: about 20,800 samples) most confident predictions are kept:
ranked by ``rank_by``, "disagreement" (the mean |difference| between the prediction of the
input and the un-flipped prediction of its flip, plus the spread of several models: cheap,
computed while predicting) or "misfit" (the normalised data misfit of the simulated
prediction against the observed gathers: every prediction is simulated once to rank it and
the kept ones again to store them), or "none" (the first files). All 65,818 test samples
in float16 would take 47 GB; in float32 (the old format) 92 GB.

The pairs are written in the competition layout::

    out_root/train_samples/Pseudo/data/data1.npy    (n, 5, 1000, 70) float16 simulated gathers
    out_root/train_samples/Pseudo/model/model1.npy  (n, 1, 70, 70) float32 predicted maps (m/s)
    ...                                             at most ``samples_per_file`` (500) per file
    out_root/pseudo_labels.json                     the oid and score of every sample kept, sizes, timings

so that ``fwi_core.data.index_train(out_root)`` reads them, with the folder name (``Pseudo``)
as their family. Train on them beside the real data with ``python -m fwi_core.train
--pseudo out_root`` (the train kernel's ``pseudo_dir``); :func:`pseudo_dataset` returns
them as an ``FWIDataset``.
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

from ..data import FWIDataset, hflip, index_train
from ..data.dataset import TestDataset
from ..data.normalize import denormalize_seismic
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
RANKINGS = ("disagreement", "misfit", "none")
#: Default size limit of a round (Kaggle keeps 20 GB of output, checkpoints included).
MAX_GB = 15.0


def bytes_per_sample(nt: int = 1000, dtype: str = "float16") -> int:
    """Disk bytes of one pseudo-labelled sample: the gathers (5, nt, 70) in ``dtype`` and
    the float32 map (1, 70, 70)."""
    return 5 * int(nt) * 70 * np.dtype(dtype).itemsize + 70 * 70 * 4


def _predict_fn(predictor: Predictor, device: torch.device, flip_tta: bool, weights: str,
                scored: bool = False) -> tuple:
    """(callable normalised batch -> m/s maps, a description) for any accepted predictor.
    With ``scored`` (models and checkpoints only) the callable returns (maps, (B,)
    disagreement in m/s: mean |prediction - un-flipped prediction of the flip|, plus the
    mean spread of the models when there are several)."""
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
        if scored:
            raise ValueError("pseudo_label_round: rank_by='disagreement' needs models or checkpoints (it compares "
                             "their flipped predictions); with a callable use rank_by='misfit' or 'none'")
        return fn, [getattr(fn, "__name__", type(fn).__name__)]
    else:
        raise ValueError("pseudo_label_round: predictor must be a callable, a model, a list of models, "
                         f"or checkpoint path(s); got {[type(p).__name__ for p in items]}")

    def fn(x: torch.Tensor) -> torch.Tensor:
        return to_velocity(predict_batch(models, x, flip_tta))

    def scored_fn(x: torch.Tensor):
        own = torch.stack([to_velocity(m(x)) for m in models])                         # (M, B, 1, H, W)
        flipped = torch.stack([to_velocity(torch.flip(m(hflip(x)), (-1,))) for m in models])
        maps = (0.5 * (own + flipped) if flip_tta else own).mean(0)
        score = (own - flipped).abs().mean((0, 2, 3, 4))
        if len(models) > 1:
            score = score + own.std(0, unbiased=False).mean((1, 2, 3))
        return maps, score

    return (scored_fn if scored else fn), desc


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
                       progress: bool = True, dtype: str = "float16", max_gb: Optional[float] = MAX_GB,
                       max_samples: Optional[int] = None, rank_by: str = "auto") -> Dict[str, Any]:
    """Predict the test files, keep the most confident, simulate them, write (gathers, map) pairs.

    Args:
        predictor: a callable mapping a normalised batch (B, 5, 1000, 70) on ``device`` to
            velocities in m/s (B, 1, 70, 70) (tensor or array); or a model or list of models
            (averaged, :func:`fwi_core.inference.predict_batch` + ``to_velocity``); or
            checkpoint path(s) (:func:`fwi_core.models.checkpoint.load_model` with ``weights``).
        test_root: the competition root (holding ``test/``) or the test folder.
        out_root: where ``train_samples/<family>/`` and ``pseudo_labels.json`` go.
        limit: consider only the first ``limit`` test files (sorted by oid).
        batch_size: test files predicted together.
        device: where to predict and simulate (default: CUDA when available).
        flip_tta: average with the flipped prediction (models and checkpoints only).
        family: the folder name, which ``index_train`` reports as the family.
        samples_per_file: samples per ``data<k>.npy`` / ``model<k>.npy`` pair (<= 500 keeps
            the competition's file size).
        sim_batch: maps per :func:`simulate` call (default 256 on CUDA, 8 on CPU).
        backend: the simulator backend.
        overwrite: replace an existing ``train_samples/<family>`` (else an error).
        progress: show progress bars.
        dtype: storage of the gathers, "float16" (default) or "float32".
        max_gb: keep at most this many GB (10^9 bytes) of samples (:func:`bytes_per_sample`
            each; None: no limit); max_samples: at most this many samples.
        rank_by: which samples to keep when not all fit: "disagreement", "misfit", "none"
            (see the module doc), or "auto" (disagreement for models and checkpoints, none
            for a callable).

    Returns:
        A summary: ``samples`` (kept), ``candidates`` (predicted), ``files`` (the
        data/model path pairs), ``bytes_per_sample``, ``bytes``, ``dtype``, ``rank_by``,
        ``score_kept_max`` / ``score_median`` (the ranking score), ``family``, ``out_root``,
        ``manifest``, ``predict_s``, ``rank_s`` and ``simulate_s`` (seconds),
        ``simulate_samples_per_s``, ``velocity_mean`` (m/s).

    The folder is built beside its destination and renamed into place at the end, so an
    interrupted round leaves no partial family folder; each file is written atomically.
    """
    if samples_per_file < 1 or batch_size < 1:
        raise ValueError(f"pseudo_label_round: samples_per_file ({samples_per_file}) and batch_size "
                         f"({batch_size}) must be >= 1")
    if limit is not None and limit < 1:
        raise ValueError(f"pseudo_label_round: limit must be >= 1, got {limit}")
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"pseudo_label_round: max_samples must be >= 1, got {max_samples}")
    if max_gb is not None and not max_gb > 0:
        raise ValueError(f"pseudo_label_round: max_gb must be > 0 (None: no limit), got {max_gb}")
    if str(dtype) not in ("float16", "float32"):
        raise ValueError(f"pseudo_label_round: dtype must be 'float16' or 'float32', got {dtype!r}")
    if rank_by not in (*RANKINGS, "auto"):
        raise ValueError(f"pseudo_label_round: rank_by must be one of {', '.join(RANKINGS)} or auto, got {rank_by!r}")
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
    if rank_by == "auto":
        items = list(predictor) if isinstance(predictor, (list, tuple)) else [predictor]
        rank_by = "none" if len(items) == 1 and callable(items[0]) and not isinstance(items[0], torch.nn.Module) \
            else "disagreement"
    fn, desc = _predict_fn(predictor, device, flip_tta, weights, scored=rank_by == "disagreement")
    n = len(ds)
    per = bytes_per_sample(1000, dtype)
    keep_n = min(n, max_samples or n, int(max_gb * 1e9 // per) if max_gb else n)
    if keep_n < 1:
        raise ValueError(f"pseudo_label_round: max_gb={max_gb} holds no sample of {per:,} bytes")

    # 1. predict every candidate (and score it)
    maps = np.empty((n, 1, 70, 70), np.float32)
    scores = np.zeros(n, np.float64)
    oids: List[str] = []
    t = time.perf_counter()
    bar = progress_bar(total=n, desc="pseudo-labels: predict", unit="sample", disable=not progress or None)
    with torch.no_grad():
        for x, ids in DataLoader(ds, batch_size=batch_size):
            i0 = len(oids)
            out = fn(x.to(device))
            if rank_by == "disagreement":
                out, score = out
                scores[i0:i0 + len(ids)] = score.detach().double().cpu().numpy()
            maps[i0:i0 + len(ids)] = _as_maps(out, len(ids))
            oids.extend(ids)
            bar.update(len(ids))
    bar.close()
    t_pred = time.perf_counter() - t
    t_rank = 0.0
    if rank_by == "misfit" and keep_n < n:
        t = time.perf_counter()
        scores = _misfits(ds, maps, batch_size, sim_batch, device, backend, progress)
        t_rank = time.perf_counter() - t
    if rank_by == "none" or keep_n == n:
        kept = np.arange(keep_n)
    else:
        kept = np.sort(np.argsort(scores, kind="stable")[:keep_n])      # the most confident, in oid order

    # 2. simulate the kept maps and write them
    out_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{family}.", dir=out_root))
    t_sim = 0.0
    files: List[Dict[str, str]] = []
    bar = progress_bar(total=keep_n, desc="pseudo-labels: simulate", unit="sample", disable=not progress or None)
    try:
        for k, s0 in enumerate(range(0, keep_n, samples_per_file)):
            rows = kept[s0:s0 + samples_per_file]
            t = time.perf_counter()
            seis = np.empty((len(rows), 5, 1000, 70), np.dtype(dtype))
            for b0 in range(0, len(rows), sim_batch):
                seis[b0:b0 + sim_batch] = simulate(maps[rows[b0:b0 + sim_batch]], device=device, backend=backend)
                bar.update(len(rows[b0:b0 + sim_batch]))
            t_sim += time.perf_counter() - t
            rel_d, rel_m = Path("data") / f"data{k + 1}.npy", Path("model") / f"model{k + 1}.npy"
            atomic_save_npy(tmp / rel_d, seis)
            atomic_save_npy(tmp / rel_m, maps[rows])
            files.append({"data": str(dest / rel_d), "model": str(dest / rel_m), "oids": len(rows)})
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
    kept_scores = scores[kept]
    summary = {
        "samples": int(keep_n), "candidates": n, "family": family, "out_root": str(out_root), "files": files,
        "dtype": str(dtype), "bytes_per_sample": per, "bytes": per * int(keep_n), "max_gb": max_gb,
        "rank_by": rank_by, "score_kept_max": float(kept_scores.max()) if rank_by != "none" else None,
        "score_median": float(np.median(scores)) if rank_by != "none" else None,
        "predict_s": round(t_pred, 3), "rank_s": round(t_rank, 3), "simulate_s": round(t_sim, 3),
        "simulate_samples_per_s": keep_n / t_sim if t_sim > 0 else float("inf"),
        "velocity_mean": float(maps[kept].astype(np.float64).mean()),
        "device": str(device), "predictor": desc, "test_root": str(test_root),
        "manifest": str(out_root / MANIFEST),
    }
    atomic_write_text(out_root / MANIFEST, json.dumps(dict(summary, oids=[oids[i] for i in kept],
                                                           scores=[float(v) for v in kept_scores]),
                                                      indent=1) + "\n")
    return summary


def _misfits(ds, maps: np.ndarray, batch_size: int, sim_batch: int, device: torch.device, backend: str,
             progress: bool) -> np.ndarray:
    """(N,) normalised data misfit ``||simulate(map) - observed|| / ||observed||`` of every
    predicted map against its test file's gathers."""
    out = np.zeros(len(maps))
    bar = progress_bar(total=len(maps), desc="pseudo-labels: misfit", unit="sample", disable=not progress or None)
    i = 0
    for x, _ in DataLoader(ds, batch_size=min(batch_size, sim_batch)):
        obs = denormalize_seismic(x.double())
        sim = torch.from_numpy(np.asarray(simulate(maps[i:i + len(x)], device=device, backend=backend))).double()
        out[i:i + len(x)] = ((sim - obs).flatten(1).norm(dim=1) / obs.flatten(1).norm(dim=1)).numpy()
        i += len(x)
        bar.update(len(x))
    bar.close()
    return out


def pseudo_dataset(out_root: PathLike, family: str = PSEUDO_FAMILY, **kwargs):
    """The pseudo-labelled samples under ``out_root`` as an :class:`fwi_core.data.FWIDataset`
    (``kwargs`` go to it, e.g. ``flip_prob``); concatenate it with the real training set."""

    return FWIDataset(index_train(out_root, families=[family]), **kwargs)
