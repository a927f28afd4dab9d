"""A small family classifier on the seismic: which geological family (FlatVel_A,
CurveFault_B, ...) a sample comes from, to pick per-family ensemble weights on the test
set (whose families are unknown) and as a meta-learner feature.

    clf = train_family_classifier(train_ds, epochs=3, val_dataset=val_ds)   # .family_fit
    clf.predict_proba(x_norm)   # (B, F) probabilities, columns in clf.families order
    clf.predict(x_norm)         # B family names
    clf.save("family_classifier.pt"); FamilyClassifier.load("family_classifier.pt")

Out of fold: the classifier's probabilities on the very samples it trained on are nearly
one-hot (it has seen their labels), so features computed from them leak the label into the
meta-learner and flatter per-family weights. Training lives in :mod:`.family_fit` (so a
notebook that only predicts does not carry it): :func:`~.family_fit.train_family_classifier_oof` trains one
classifier per fold on the other folds (the engine's family folds: same ``folds`` and
``seed``) and keeps each sample's probabilities from the classifier that did not see it
(``<classifier>.oof.npz``, read by ``fit_ensemble``), plus the classifier trained on
everything, the one deployed (``python -m fwi_core.ensemble train-classifier``).

The network downsamples the normalised gathers (B, S, T, R) by adaptive average pooling
of the signal and of its magnitude (so oscillating wavelets do not cancel) to
(2S, time_size, receiver_size), then runs four strided ConvBnAct blocks, global average
pooling and a linear layer to F logits. It accepts any (T, R).
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.blocks import ConvBnAct
from .saved import SavedModule

PathLike = Union[str, os.PathLike]

__all__ = ["FamilyClassifier"]


class FamilyClassifier(SavedModule, nn.Module):
    """Seismic -> family logits.

    Args:
        families: the class names (column order of the probabilities).
        in_channels: sources S of the input (5).
        width: channels of the first conv block (doubling twice).
        time_size, receiver_size: the pooled input size.
        drop_rate: dropout before the linear layer.

    Shapes: ``forward(x (B, S, T, R)) -> logits (B, F)``.
    """

    FORMAT = "fwi_core.ensemble.family_classifier/1"
    WHAT = "family classifier"

    def __init__(self, families: Sequence[str], in_channels: int = 5, width: int = 16,
                 time_size: int = 128, receiver_size: int = 35, drop_rate: float = 0.1):
        super().__init__()

        self.families: List[str] = [str(f) for f in families]
        if len(self.families) < 2 or len(set(self.families)) != len(self.families):
            raise ValueError(f"FamilyClassifier: need at least 2 distinct families, got {self.families}")
        self.kwargs = dict(in_channels=int(in_channels), width=int(width), time_size=int(time_size),
                           receiver_size=int(receiver_size), drop_rate=float(drop_rate))
        w = int(width)
        self.size = (int(time_size), int(receiver_size))
        self.features = nn.Sequential(
            ConvBnAct(2 * in_channels, w, 3, stride=(2, 1)),        # (B, w, T'/2, R')
            ConvBnAct(w, 2 * w, 3, stride=2),                       # (B, 2w, T'/4, R'/2)
            ConvBnAct(2 * w, 4 * w, 3, stride=2),                   # (B, 4w, T'/8, R'/4)
            ConvBnAct(4 * w, 4 * w, 3, stride=2),                   # (B, 4w, T'/16, R'/8)
        )
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(4 * w, len(self.families))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.kwargs["in_channels"]:
            raise ValueError(f"FamilyClassifier: expected seismic (B, {self.kwargs['in_channels']}, T, R), "
                             f"got {tuple(x.shape)}")
        x = x.float()
        h = torch.cat([F.adaptive_avg_pool2d(x, self.size), F.adaptive_avg_pool2d(x.abs(), self.size)], 1)
        h = self.features(h).mean((2, 3))                           # (B, 4w)
        return self.fc(self.drop(h))                                # (B, F)

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """(B, F) class probabilities (eval mode; on ``x``'s device)."""
        was = self.training
        self.eval()
        dev = next(self.parameters()).device
        try:
            out = [F.softmax(self(x[i:i + batch_size].to(dev)), 1) for i in range(0, x.shape[0], batch_size)]
        finally:
            self.train(was)
        return torch.cat(out).to(x.device)

    def predict(self, x: torch.Tensor) -> List[str]:
        """The most probable family of each sample."""
        return [self.families[i] for i in self.predict_proba(x).argmax(1).tolist()]

    # ------------------------------------------------------------------ files
    def saved_fields(self) -> Dict[str, Any]:
        return {"families": self.families, "kwargs": self.kwargs}

    @classmethod
    def from_saved_fields(cls, fields: Dict[str, Any]) -> "FamilyClassifier":
        return cls(fields["families"], **fields["kwargs"])
