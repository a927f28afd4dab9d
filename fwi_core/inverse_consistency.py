"""Flag aberrant predictions with the invertible UNet's inverse-consistency score.

The plan's last check ("after CRF, run inverse UNet consistency"): an
:class:`~fwi_core.models.invertible_unet.InvertibleUNet` trained with its latent
penalty (the engine adds it, weighted by ``latent_weight``) maps a sample's gathers to a
latent ``z`` whose velocity channel explains it; a final map (after ensembling and the
CRF) that the flow cannot map back close to ``z`` is inconsistent with the input's
gathers. :class:`ConsistencyFlagger` learns a threshold on that score from validation
data and flags test predictions above it (the run summary lists them; the caller
decides what to do, e.g. keep the prediction before the CRF or send the sample to
physics refinement first).

    flagger = ConsistencyFlagger.fit(inv_model, x_val, final_val_ms, true_val_ms)
    flagger.save("consistency.json")
    flags = flagger.flag(x_test, final_test_ms)        # (B,) bool
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from .data.normalize import normalize_velocity
from .utils import atomic_write_text

PathLike = Union[str, os.PathLike]


class ConsistencyFlagger:
    """Inverse-consistency scores of final predictions and a threshold learned on validation.

    Args:
        model: an ``InvertibleUNet`` (anything with ``inverse_consistency(x, velocity=)``).
        threshold: scores above it are flagged.
    """

    def __init__(self, model: torch.nn.Module, threshold: float):
        if not hasattr(model, "inverse_consistency"):
            raise TypeError(f"ConsistencyFlagger: {type(model).__name__} has no inverse_consistency "
                            "(use an invertible_unet checkpoint)")
        self.model = model.eval()
        self.threshold = float(threshold)
        #: oid -> score of the maps flagged so far by the planner's ``consistency`` stage
        self.flagged = {}

    @torch.no_grad()
    def score(self, x: torch.Tensor, velocity_ms: torch.Tensor, batch_size: int = 16) -> np.ndarray:
        """(B,) scores of m/s maps (B,1,70,70) for normalised gathers x (B,5,1000,70)."""
        dev = next(self.model.parameters()).device
        out = []
        for s in range(0, x.shape[0], batch_size):
            xb = torch.as_tensor(x[s:s + batch_size]).float().to(dev)
            vb = normalize_velocity(torch.as_tensor(velocity_ms[s:s + batch_size]).float().to(dev))
            out.append(self.model.inverse_consistency(xb, velocity=vb).double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0)

    def flag(self, x: torch.Tensor, velocity_ms: torch.Tensor) -> np.ndarray:
        """(B,) bool: the predictions whose score exceeds the threshold."""
        return self.score(x, velocity_ms) > self.threshold

    @classmethod
    def fit(cls, model: torch.nn.Module, x: torch.Tensor, velocity_ms: torch.Tensor,
            target_ms: Optional[torch.Tensor] = None, quantile: float = 0.95,
            bad_mae: Optional[float] = None) -> "ConsistencyFlagger":
        """Learn the threshold on validation predictions.

        Without targets: the ``quantile`` of the validation scores (flags the least
        consistent ``1 - quantile`` of predictions like the validation ones). With
        ``target_ms``: the threshold that best separates the bad predictions (per-sample
        MAE above ``bad_mae``, default the validation MAE's ``quantile``) from the others,
        by F1 score over the candidate thresholds (the scores themselves).
        """
        if not 0.0 < quantile < 1.0:
            raise ValueError(f"ConsistencyFlagger.fit: quantile must be in (0, 1), got {quantile}")
        flagger = cls(model, float("inf"))
        scores = flagger.score(x, velocity_ms)
        if len(scores) == 0:
            raise ValueError("ConsistencyFlagger.fit: no validation samples")
        if target_ms is None:
            flagger.threshold = float(np.quantile(scores, quantile))
            return flagger
        err = np.abs(np.asarray(velocity_ms, np.float64) - np.asarray(target_ms, np.float64))
        err = err.reshape(len(scores), -1).mean(1)
        cut = float(np.quantile(err, quantile)) if bad_mae is None else float(bad_mae)
        bad = err > cut
        best, best_t = -1.0, float(np.quantile(scores, quantile))
        for t in np.unique(scores)[:-1]:
            flagged = scores > t
            tp = float(np.sum(flagged & bad))
            f1 = 2 * tp / max(1.0, float(flagged.sum() + bad.sum()))
            if f1 > best:
                best, best_t = f1, float(t)
        flagger.threshold = best_t
        return flagger

    def save(self, path: PathLike) -> Path:
        atomic_write_text(path, json.dumps({"threshold": self.threshold}, indent=1) + "\n")
        return Path(path)

    @classmethod
    def load(cls, model: torch.nn.Module, path: PathLike) -> "ConsistencyFlagger":
        try:
            data = json.loads(Path(path).read_text())
            threshold = float(data["threshold"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: not a consistency threshold file (expected JSON "
                             f'{{"threshold": number}}): {exc}') from exc
        return cls(model, threshold)
