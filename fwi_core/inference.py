"""Inference: predict velocity maps (ensembles, flip TTA), score labelled data, and
stream a whole test set into a submission CSV.

Models map normalised seismic (B,5,1000,70) to normalised velocity (B,1,70,70); the
functions here take care of normalisation, devices, batching and the m/s conversion.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import DataLoader

from .data.augment import hflip
from .data.dataset import FWIDataset, TestDataset
from .data.normalize import VEL_MAX, VEL_MIN, denormalize_velocity
from .data.submission import SubmissionWriter
from .utils import progress_bar

Models = Union[torch.nn.Module, Sequence[torch.nn.Module]]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


CRF_CONFIG_FILE = "crf.json"


def save_crf_config(config: dict, folder: Union[str, os.PathLike]) -> Path:
    """Write a tuned :class:`~fwi_core.crf.ContinuousCRF` configuration beside checkpoints."""
    import json

    from .utils import atomic_write_text

    path = Path(folder) / CRF_CONFIG_FILE
    atomic_write_text(path, json.dumps(config, indent=2, sort_keys=True))
    return path


def load_crf(checkpoint_dirs: Sequence[Union[str, os.PathLike]]):
    """The CRF saved by :func:`save_crf_config` in the first of ``checkpoint_dirs`` that
    holds one (a checkpoint file means its folder), or None."""
    import json

    from .crf import ContinuousCRF

    for d in checkpoint_dirs:
        d = Path(d)
        f = (d.parent if d.is_file() else d) / CRF_CONFIG_FILE
        if f.is_file():
            try:
                config = json.loads(f.read_text())
                if not isinstance(config, dict):
                    raise TypeError(f"expected a JSON object, got {type(config).__name__}")
                return ContinuousCRF(**config)
            except (ValueError, TypeError, UnicodeDecodeError) as e:   # bad JSON, unknown or bad fields
                raise ValueError(f"{f}: not a CRF configuration ({type(e).__name__}: {e}); delete it or "
                                 "tune it again (the train kernel writes it)") from e
    return None


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
    import re

    if kind not in CHECKPOINT_KINDS:
        raise ValueError(f"find_checkpoints: kind must be one of {', '.join(CHECKPOINT_KINDS)}, got {kind!r}")
    globs = [pattern] if pattern is not None else \
        {"best": ["best*.pt"], "snapshot": ["snapshot-*.pt"], "last": [], "all": ["best*.pt", "snapshot-*.pt"]}[kind]
    want_last = pattern is None and kind in ("last", "all")
    step = re.compile(r"^ckpt-(\d+)\.pt$")
    found: List[Path] = []
    for d in dirs:
        d = Path(d)
        if d.is_file():
            found.append(d)
        elif d.is_dir():
            for g in globs:
                found.extend(p for p in d.rglob(g) if p.is_file())
            if want_last:
                newest: Dict[Path, Path] = {}
                for p in d.rglob("ckpt-*.pt"):
                    m = step.match(p.name)
                    if m and p.is_file():
                        cur = newest.get(p.parent)
                        if cur is None or int(m.group(1)) > int(step.match(cur.name).group(1)):
                            newest[p.parent] = p
                found.extend(newest.values())
    if not found:
        what = repr(pattern) if pattern is not None else f"kind {kind!r}"
        raise FileNotFoundError(f"no checkpoints matching {what} under {', '.join(map(str, dirs))}; "
                                "pass checkpoint paths explicitly or attach the training output")
    return sorted(dict.fromkeys(found))


def _as_list(models: Models) -> List[torch.nn.Module]:
    return [models] if isinstance(models, torch.nn.Module) else list(models)


@torch.no_grad()
def predict_batch(models: Models, x: torch.Tensor, flip_tta: bool = False,
                  weights: Optional[Sequence[float]] = None) -> torch.Tensor:
    """Normalised prediction (B,1,70,70) of an ensemble on a normalised batch.

    Args:
        models: one model or several (their outputs are averaged, weighted by ``weights``).
        flip_tta: also predict the horizontally flipped input and average with the
            un-flipped prediction of it (FACTS section 1).
    """
    ms = _as_list(models)
    w = torch.as_tensor(weights if weights is not None else [1.0] * len(ms), dtype=torch.float32)
    if len(w) != len(ms):
        raise ValueError(f"predict_batch: {len(ms)} models but {len(w)} weights")
    w = w / w.sum()
    out = None
    for m, wi in zip(ms, w.tolist()):
        p = m(x)
        if flip_tta:
            p = 0.5 * (p + torch.flip(m(hflip(x)), (-1,)))  # un-flip the flipped prediction
        out = p * wi if out is None else out + p * wi
    return out


@torch.no_grad()
def predict_mc_dropout(models: Models, x: torch.Tensor, passes: int = 8, flip_tta: bool = False):
    """Monte Carlo dropout (Gal & Ghahramani 2016): ``passes`` stochastic forward passes
    of each model with only its dropout layers active. Returns (mean, variance) in m/s,
    each (B,1,70,70); the models are put back in eval mode afterwards."""
    from .models import enable_mc_dropout

    if passes < 2:
        raise ValueError(f"predict_mc_dropout: need at least 2 passes, got {passes}")
    ms = _as_list(models)
    samples = []
    try:
        for m in ms:
            enable_mc_dropout(m)
        for _ in range(passes):
            samples.append(to_velocity(predict_batch(ms, x, flip_tta)))
    finally:
        for m in ms:
            m.eval()
    stack = torch.stack(samples)
    return stack.mean(0), stack.var(0, unbiased=True)


def to_velocity(pred: torch.Tensor) -> torch.Tensor:
    """Normalised prediction -> m/s, clipped to the competition's range."""
    return denormalize_velocity(pred.float()).clamp_(VEL_MIN, VEL_MAX)


def predict_test_set(models: Models, root: Union[str, os.PathLike], out_csv: Union[str, os.PathLike],
                     batch_size: int = 16, device: Optional[torch.device] = None, flip_tta: bool = True,
                     num_workers: int = 0, limit: Optional[int] = None, progress: bool = True,
                     weights: Optional[Sequence[float]] = None,
                     postprocess: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> Path:
    """Predict every ``test/<oid>.npy`` under ``root`` and write ``out_csv`` (streamed,
    atomic). ``postprocess`` (e.g. a :class:`~fwi_core.crf.ContinuousCRF`) maps each batch
    of (B,1,70,70) m/s predictions before writing. Returns the CSV path."""
    device = device or default_device()
    ms = [m.to(device).eval() for m in _as_list(models)]
    ds = TestDataset(root)
    if limit is not None:
        ds.files = ds.files[:limit]
    loader = DataLoader(ds, batch_size=batch_size, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    bar = progress_bar(total=len(ds), desc="predict test", unit="file", disable=not progress)
    with SubmissionWriter(out_csv) as writer:
        for x, oids in loader:
            v = to_velocity(predict_batch(ms, x.to(device, non_blocking=True), flip_tta, weights))
            if postprocess is not None:
                with torch.no_grad():
                    v = postprocess(v).clamp_(VEL_MIN, VEL_MAX)
            writer.write_batch(list(oids), v.cpu().numpy())
            bar.update(len(oids))
    bar.close()
    return Path(out_csv)


@torch.no_grad()
def predict_dataset(models: Models, dataset: FWIDataset, batch_size: int = 16,
                    device: Optional[torch.device] = None, flip_tta: bool = False,
                    num_workers: int = 0, progress: bool = True, mc_passes: int = 0) -> Dict[str, np.ndarray]:
    """Predictions (m/s) for a labelled dataset: dict with ``pred``, ``true`` (B,1,70,70)
    float32 and ``family`` (B,) str; with ``mc_passes`` >= 2, ``pred`` is the MC-dropout
    mean and ``var`` its variance (m/s squared)."""
    device = device or default_device()
    ms = [m.to(device).eval() for m in _as_list(models)]
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    preds, trues, fams, variances = [], [], [], []
    bar = progress_bar(total=len(dataset), desc="predict", unit="sample", disable=not progress)
    for x, y, fam in loader:
        if mc_passes:
            mean, var = predict_mc_dropout(ms, x.to(device), mc_passes, flip_tta)
            preds.append(mean.cpu().numpy())
            variances.append(var.cpu().numpy())
        else:
            preds.append(to_velocity(predict_batch(ms, x.to(device), flip_tta)).cpu().numpy())
        trues.append(denormalize_velocity(y.float()).numpy())
        fams.extend(fam)
        bar.update(len(fam))
    bar.close()
    out = {"pred": np.concatenate(preds), "true": np.concatenate(trues), "family": np.array(fams)}
    if variances:
        out["var"] = np.concatenate(variances)
    return out


def score_uncertainty(mean: np.ndarray, var: np.ndarray, true: np.ndarray,
                      families: Sequence[str]) -> Dict[str, Dict[str, float]]:
    """Calibration of a predicted mean and variance per family (and 'all'): Gaussian NLL,
    coverage of the 90% interval (0.9 when calibrated) and the calibration error (mean
    gap between expected and observed coverage over levels)."""
    from . import metrics

    var = np.maximum(var, 1e-6)  # MC samples that all agree give zero variance
    per_sample = {
        "nll": metrics.gaussian_nll(mean, var, true),
        "coverage90": metrics.interval_coverage(mean, var, true, level=0.9),
        "calibration_error": metrics.calibration_error(mean, var, true),
    }
    table: Dict[str, Dict[str, float]] = {}
    for name, vals in per_sample.items():
        for fam, v in metrics.per_family(vals, list(families)).items():
            table.setdefault(fam, {})[name] = float(v)
    return table


def score_predictions(pred: np.ndarray, true: np.ndarray, families: Sequence[str]) -> Dict[str, Dict[str, float]]:
    """Metrics per family (and 'all') of m/s predictions: MAE, the competition's MAE
    (odd columns), RMSE, SSIM (data range 3000 m/s) and boundary IoU."""
    from . import metrics

    per_sample = {
        "mae": metrics.mae(pred, true),
        "competition_mae": metrics.competition_mae(pred, true),
        "rmse": metrics.rmse(pred, true),
        "ssim": metrics.ssim(pred, true, data_range=VEL_MAX - VEL_MIN),
        "boundary_iou": metrics.boundary_iou(pred, true),
    }
    table: Dict[str, Dict[str, float]] = {}
    for name, vals in per_sample.items():
        for fam, v in metrics.per_family(vals, list(families)).items():
            table.setdefault(fam, {})[name] = float(v)
    return table


def format_table(table: Dict[str, Dict[str, float]]) -> str:
    """A plain-text table of :func:`score_predictions` output ('all' last)."""
    fams = sorted(k for k in table if k != "all") + (["all"] if "all" in table else [])
    cols = list(next(iter(table.values())).keys()) if table else []
    head = f"{'family':<14}" + "".join(f"{c:>17}" for c in cols)
    lines = [head, "-" * len(head)]
    for f in fams:
        lines.append(f"{f:<14}" + "".join(f"{table[f][c]:>17.4f}" for c in cols))
    return "\n".join(lines)
