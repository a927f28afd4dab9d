"""Inference: predict velocity maps of a batch or a labelled dataset (ensembles, flip TTA,
MC dropout), in m/s.

Models map normalised seismic (B,5,1000,70) to normalised velocity (B,1,70,70); the
functions here take care of normalisation, devices, batching and the m/s conversion.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import DataLoader

from .data.augment import hflip
from .data.dataset import FWIDataset
from .data.normalize import VEL_MAX, VEL_MIN, denormalize_velocity
from .models import enable_mc_dropout
from .utils import default_device, progress_bar

Models = Union[torch.nn.Module, Sequence[torch.nn.Module]]


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
