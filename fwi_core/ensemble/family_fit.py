"""Training the family classifier (:class:`~fwi_core.ensemble.family.FamilyClassifier`):
on labelled data, and out of fold (one classifier per family fold, each sample's
probabilities from the one that did not see it, ``<classifier>.oof.npz``), plus reading and
writing those probabilities.

    clf = train_family_classifier(train_ds, epochs=3, val_dataset=val_ds)
    final, oof = train_family_classifier_oof(ds, folds=5, seed=0)
    save_oof_proba(oof_proba_path("family_classifier.pt"), oof)
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..data import family_kfold
from ..utils import atomic_path, progress_bar
from .family import FamilyClassifier

PathLike = Union[str, os.PathLike]

__all__ = ["train_family_classifier", "train_family_classifier_oof", "oof_proba_path", "save_oof_proba",
           "load_oof_proba"]


def train_family_classifier(dataset, families: Optional[Sequence[str]] = None, epochs: int = 3,
                            batch_size: int = 16, lr: float = 2e-3, weight_decay: float = 1e-4,
                            val_dataset=None, device: Optional[Union[str, torch.device]] = None,
                            seed: int = 0, num_workers: int = 0, progress: bool = True,
                            **model_kwargs) -> FamilyClassifier:
    """Train a :class:`FamilyClassifier` on labelled data.

    Args:
        dataset: yields ``(seismic_norm (S,T,R), velocity, family)`` (e.g. ``FWIDataset``).
        families: class names (default: the sorted families of ``dataset``).
        epochs, batch_size, lr, weight_decay: AdamW, cross-entropy, classes re-weighted by
            inverse frequency (balanced families).
        val_dataset: optional held-out data for the accuracy report.
        **model_kwargs: :class:`FamilyClassifier` arguments (width, time_size, ...).

    Returns:
        The classifier in eval mode, with ``.report``: ``train_loss`` per epoch,
        ``train_accuracy`` and (with ``val_dataset``) ``val_accuracy`` and
        ``val_accuracy_per_family``, ``seconds``.
    """


    start = time.perf_counter()
    labels = _families_of(dataset)
    fams = sorted(set(labels)) if families is None else [str(f) for f in families]
    unknown = sorted(set(labels) - set(fams))
    if unknown:
        raise ValueError(f"train_family_classifier: dataset families {unknown} are not in families={fams}")
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    x0 = dataset[0][0]
    clf = FamilyClassifier(fams, in_channels=int(x0.shape[0]), **model_kwargs).to(dev)
    index = {f: i for i, f in enumerate(fams)}
    counts = np.bincount([index[f] for f in labels], minlength=len(fams)).astype(np.float64)
    cw = torch.tensor(np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / len(fams), 0.0),
                      dtype=torch.float32, device=dev)
    opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=weight_decay)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers,
                        generator=torch.Generator().manual_seed(seed), drop_last=len(dataset) > batch_size)
    history, correct, seen = [], 0, 0
    bar = progress_bar(total=epochs * len(loader), desc="family classifier", unit="step", disable=not progress)
    for _ in range(epochs):
        clf.train()
        total, n, correct, seen = 0.0, 0, 0, 0
        for x, _, fam in loader:
            y = torch.tensor([index[str(f)] for f in fam], device=dev)
            logits = clf(x.to(dev))
            loss = F.cross_entropy(logits, y, weight=cw)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(y)
            n += len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            bar.update(1)
        history.append(total / max(n, 1))
    bar.close()
    _recalibrate_batchnorm(clf, loader, dev)
    clf.eval()
    report: Dict[str, Any] = {"train_loss": history, "train_accuracy": correct / max(seen, 1),
                              "families": fams}
    if val_dataset is not None:
        acc, per = _accuracy(clf, val_dataset, batch_size, dev)
        report.update(val_accuracy=acc, val_accuracy_per_family=per)
    report["seconds"] = time.perf_counter() - start
    clf.report = report
    return clf


@torch.no_grad()
def _recalibrate_batchnorm(model: nn.Module, loader, dev) -> None:
    """Recompute BatchNorm running statistics as exact averages over one pass of the
    training data with the final weights (short trainings leave them lagging behind)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None            # cumulative moving average
    model.train()
    for x, _, _ in loader:
        model(x.to(dev))
    for m, mom in zip(bns, saved):
        m.momentum = mom


def _families_of(ds) -> List[str]:
    if hasattr(ds, "families"):
        return [str(f) for f in ds.families()]
    return [str(ds[i][2]) for i in range(len(ds))]


@torch.no_grad()
def _accuracy(clf: FamilyClassifier, ds, batch_size: int, dev) -> tuple:
    hits: Dict[str, List[bool]] = {}
    for x, _, fam in DataLoader(ds, batch_size=batch_size):
        pred = clf.predict(x.to(dev))
        for p, f in zip(pred, fam):
            hits.setdefault(str(f), []).append(p == str(f))
    allhits = [h for v in hits.values() for h in v]
    return float(np.mean(allhits)) if allhits else float("nan"), {f: float(np.mean(v)) for f, v in hits.items()}


def oof_proba_path(classifier_path: PathLike) -> Path:
    """Where the out-of-fold probabilities of a saved classifier live:
    ``family_classifier.pt`` -> ``family_classifier.oof.npz``."""
    return Path(classifier_path).with_suffix(".oof.npz")


def train_family_classifier_oof(dataset, folds: int = 5, seed: int = 0, progress: bool = True,
                                **train_kwargs) -> tuple:
    """Cross-fitted family classifier on an ``FWIDataset``.

    For each of the engine's family folds (:func:`fwi_core.data.family_kfold` with the same
    ``folds`` and ``seed`` as the training runs) a classifier trained on the other folds
    predicts the fold's samples; then one classifier is trained on every sample.

    Returns:
        ``(final classifier, oof)``: ``oof`` = ``{"fold": (N,), "index": (N,) global
        sample indices, "proba": (N, F) probabilities from the classifier that did not
        train on the sample, "families": (F,) column names, "true": (N,) true families,
        "trained_on": {fold: (n,) the global indices its classifier trained on}}``;
        ``final.report["oof_accuracy"]`` is the accuracy of those probabilities.
    """
    fams = np.asarray(_families_of(dataset))
    names = sorted(set(fams.tolist()))
    ids = np.asarray(getattr(dataset, "indices", np.arange(len(dataset))), dtype=np.int64)
    rows = {"fold": [], "index": [], "proba": [], "true": []}
    trained_on = {}
    for k, (tr, va) in enumerate(family_kfold(fams.tolist(), folds, seed)):
        clf = train_family_classifier(dataset.subset(tr), families=names, seed=seed + k, progress=progress,
                                      **train_kwargs)
        x = torch.stack([dataset[int(i)][0] for i in va])
        rows["proba"].append(clf.predict_proba(x).cpu().numpy())
        rows["fold"].append(np.full(len(va), k, np.int64))
        rows["index"].append(ids[va])
        rows["true"].append(fams[va])
        trained_on[k] = ids[tr]
    final = train_family_classifier(dataset, families=names, seed=seed, progress=progress, **train_kwargs)
    oof = {k: np.concatenate(v) for k, v in rows.items()}
    oof["families"] = np.asarray(names)
    oof["trained_on"] = trained_on
    pred = oof["families"][oof["proba"].argmax(1)]
    final.report = {**(final.report or {}), "oof_accuracy": float(np.mean(pred == oof["true"])),
                    "folds": int(folds), "seed": int(seed)}
    return final, oof


def save_oof_proba(path: PathLike, oof: Dict[str, Any]) -> Path:
    """Write the out-of-fold probabilities (atomically)."""
    path = Path(path)
    with atomic_path(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, fold=oof["fold"], index=oof["index"], proba=oof["proba"].astype(np.float32),
                     families=np.asarray(oof["families"], dtype=str), true=np.asarray(oof["true"], dtype=str))
    return path


def load_oof_proba(path: PathLike) -> Dict[str, np.ndarray]:
    """Read :func:`save_oof_proba`'s file; a clear error when it is absent or malformed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no out-of-fold probabilities of the family classifier; its "
                                "probabilities on its own training samples would leak their labels: train it "
                                "with python -m fwi_core.ensemble train-classifier (writes both files)")
    with np.load(path, allow_pickle=False) as z:
        data = {k: z[k] for k in z.files}
    missing = [k for k in ("fold", "index", "proba", "families") if k not in data]
    if missing or data["proba"].shape != (len(data["index"]), len(data["families"])):
        raise ValueError(f"{path}: not a family classifier's out-of-fold file (missing {missing} or wrong shapes)")
    return data
