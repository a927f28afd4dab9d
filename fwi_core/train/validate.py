"""Validation of a run: per-sample MAE (m/s), boundary IoU and SSIM of the raw and the EMA
weights, gathered over ranks in dataset order; the metrics per family (:func:`summarize`),
best-so-far and early-stopping bookkeeping, the history rows, and the out-of-fold file of
the best weights (``oof_fold<k>.npz``).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from ..data import denormalize_velocity
from ..errors import TrainError
from ..inference import predict_mc_dropout
from ..metrics import boundary_iou, mae, per_family, ssim
from ..models.checkpoint import load_checkpoint
from ..utils import atomic_path
from .budget import Budget
from .config import MAXIMISED, TrainConfig
from .datasets import TrainData
from .distributed import all_gather_objects, mean_over_ranks
from .model import TrainedModel
from .optim import autocast
from .state import RunState
from .step import OOM

log = logging.getLogger("fwi_core.train")


def summarize(families: Sequence[str], maes: Dict[str, np.ndarray],
              scores: Optional[Dict[str, Dict[str, np.ndarray]]] = None) -> Dict[str, Any]:
    """Validation metrics from per-sample MAEs (m/s) of each weight source ("raw", "ema").

    Returns ``mae_<source>`` (mean over samples), ``source`` (the better source overall)
    and ``mae`` (its MAE), ``per_family`` = {family: {<source>: MAE, "best": min,
    "source": the better source for that family, "n": count}} and ``family_mae`` (the
    mean over families of the per-family best). With ``scores`` ({"boundary_iou": {source:
    per-sample values}, "ssim": {...}}; higher is better), also ``<score>_<source>``,
    ``<score>`` (the better source's, by MAE) and ``per_family[f]["<score>_<source>"]``.
    """
    out: Dict[str, Any] = {}
    fam_means = {}
    for src, v in maes.items():
        out[f"mae_{src}"] = float(np.mean(v)) if len(v) else float("nan")
        fam_means[src] = per_family(np.asarray(v, dtype=np.float64), families)
        fam_means[src].pop("all")
    source = min(maes, key=lambda s: out[f"mae_{s}"])   # ties go to "raw" (listed first)
    out["source"], out["mae"] = source, out[f"mae_{source}"]
    counts = {str(f): int(c) for f, c in zip(*np.unique(np.asarray(families, dtype=str), return_counts=True))}
    table = {}
    for fam in sorted(counts):
        entry = {src: fam_means[src][fam] for src in maes}
        best = min(maes, key=lambda s: entry[s])
        table[fam] = {**entry, "best": entry[best], "source": best, "n": counts[fam]}
    for name, by_source in (scores or {}).items():
        for src, v in by_source.items():
            out[f"{name}_{src}"] = float(np.mean(v)) if len(v) else float("nan")
            for fam, value in per_family(np.asarray(v, dtype=np.float64), families).items():
                if fam in table:
                    table[fam][f"{name}_{src}"] = value
        out[name] = out.get(f"{name}_{source}", float("nan"))
    out["per_family"] = table
    out["family_mae"] = float(np.mean([e["best"] for e in table.values()])) if table else float("nan")
    return out


def _ssim(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample SSIM of m/s maps (data range 3000 m/s), the window shrunk for small maps."""
    win = min(11, min(pred.shape[-2:]) - (1 - min(pred.shape[-2:]) % 2))
    return ssim(pred, target, data_range=3000.0, win_size=max(3, win))


def _cat(arrays: List[np.ndarray]) -> np.ndarray:
    return np.concatenate(arrays) if arrays else np.zeros(0, np.float32)


class Validator:
    """Evaluates the run's weight sources on ``data.val_ds`` (absent: nothing to validate)."""

    def __init__(self, cfg: TrainConfig, data: TrainData, model: TrainedModel, amp: str,
                 state: RunState, budget: Budget):
        self.cfg, self.data, self.model, self.amp, self.state, self.budget = cfg, data, model, amp, state, budget
        self.dist, self.device = data.dist, data.dist.device
        self.eval_batch = max(1, 2 * data.per_rank // state.accum)   # halved on out-of-memory

    def batches(self) -> int:
        """Validation batches per rank (0 without a validation set)."""
        if self.data.val_ds is None:
            return 0
        return -(-len(self.data.val_ds) // (self.dist.world_size * self.eval_batch))

    def monitor_value(self, metrics: Dict[str, Any]) -> float:
        """The monitored metric as a quantity to minimise (scores that grow, boundary IoU
        and SSIM, are negated)."""
        value = float(metrics[self.cfg.monitor])
        return -value if self.cfg.monitor in MAXIMISED else value

    def evaluate(self, partial: bool, lr: float) -> Optional[Dict[str, Any]]:
        """Validate, log a history row, track the best; returns the metrics (None without
        a validation set). ``partial`` evaluations (mid-epoch stops) do not count toward
        early stopping, and the epoch's running train loss carries on past them."""
        s, data = self.state, self.data
        train_loss = float(mean_over_ranks(s.loss_sum / max(1, s.loss_count), self.dist))
        row = {"epoch": round(s.epoch + s.batch / data.steps_per_epoch, 4), "step": s.step,
               "lr": lr, "train_loss": train_loss}
        if self.cfg.pde_weight > 0:      # the PDE term's mean (unweighted) over the epoch's steps that had it
            pde = torch.tensor(s.pde_sum / s.pde_count if s.pde_count else float("nan"), device=self.device)
            row["pde_loss"] = float(mean_over_ranks(pde, self.dist))
        if not partial:
            s.loss_sum.zero_()
            s.loss_count = 0
            s.pde_sum, s.pde_count = 0.0, 0
        improved = data.val_ds is None   # without validation the latest weights count as best
        metrics = None
        if data.val_ds is not None:
            sources = self.model.sources()
            start = self.budget.now()
            values, _, _ = self.predict(sources)
            self.budget.val_time = self.budget.now() - start
            maes = {k: v for k, v in values.items() if k in sources}
            scores = {name: {src: values[f"{short}_{src}"] for src in maes}
                      for name, short in (("boundary_iou", "biou"), ("ssim", "ssim"))}
            metrics = summarize(data.val_families, maes, scores)
            metrics.update(epoch=row["epoch"], step=s.step)
            s.last_metrics = metrics
            value = self.monitor_value(metrics)
            improved = value < s.best_value - self.cfg.min_delta
            if improved:
                s.best_value, s.best_step, s.best_metrics = value, s.step, metrics
                if not partial:
                    s.bad_evals = 0
            elif not partial:
                s.bad_evals += 1
            for fam, e in metrics["per_family"].items():
                if fam not in s.family_best or e["best"] < s.family_best[fam]["mae"]:
                    s.family_best[fam] = {"mae": e["best"], "source": e["source"],
                                          "epoch": row["epoch"], "step": s.step}
            row.update(val_mae=metrics["mae"], family_mae=metrics["family_mae"])
            for src in maes:
                row[f"val_mae_{src}"] = metrics[f"mae_{src}"]
                row[f"val_biou_{src}"] = metrics[f"boundary_iou_{src}"]
                row[f"val_ssim_{src}"] = metrics[f"ssim_{src}"]
                for fam, e in metrics["per_family"].items():
                    row[f"mae_{src}/{fam}"] = e[src]
                    row[f"biou_{src}/{fam}"] = e[f"boundary_iou_{src}"]
                    row[f"ssim_{src}/{fam}"] = e[f"ssim_{src}"]
        row.update(time=round(self.budget.wall_time(s.wall_before), 2), partial=int(partial))
        s.history.append(row)
        s.improved = improved
        return metrics

    def predict(self, sources: Dict[str, torch.nn.Module], keep: Optional[str] = None):
        """Per-sample MAE (m/s) of every source on the validation set, gathered over ranks
        in dataset order; with ``keep``, also that source's predictions and the targets.
        On out-of-memory the evaluation batch is halved and the pass repeated."""
        while True:
            try:
                local = self._predict_local(sources, keep)
                break
            except OOM:
                pass
            if self.device.type == "cuda":   # outside the except block: the traceback is freed
                torch.cuda.empty_cache()
            if self.eval_batch <= 1:
                raise TrainError("out of memory while validating with batch 1")
            self.eval_batch //= 2
            self.state.oom_events.append({"kind": "eval", "step": self.state.step, "micro_batch": self.eval_batch})
            log.warning("out of memory while validating: evaluation batch -> %d", self.eval_batch)
        parts = all_gather_objects(local, self.dist)   # every rank gets every rank's share
        order = np.argsort(_cat([a for p in parts for a in p[0]]), kind="stable")
        maes = {k: _cat([a for p in parts for a in p[1][k]])[order] for k in parts[0][1]}
        if keep:
            return (maes, _cat([a for p in parts for a in p[2]])[order],
                    _cat([a for p in parts for a in p[3]])[order])
        return maes, None, None

    @torch.no_grad()
    def _predict_local(self, sources: Dict[str, torch.nn.Module], keep: Optional[str]):
        for m in sources.values():
            m.eval()
        pos = []
        maes = {k: [] for name in sources for k in (name, f"biou_{name}", f"ssim_{name}")}
        preds, targets = [], []
        try:
            for idx, x, y, _ in self.data.val_loader(self.eval_batch):
                x = x.to(self.device, non_blocking=True)
                y_ms = denormalize_velocity(y.to(self.device).float())
                pos.append(idx.numpy())
                for name, m in sources.items():
                    with autocast(self.amp, self.device):
                        p = m(x)
                    p_ms = denormalize_velocity(p.float())
                    maes[name].append(mae(p_ms, y_ms).cpu().numpy())
                    maes[f"biou_{name}"].append(boundary_iou(p_ms, y_ms).cpu().numpy())
                    maes[f"ssim_{name}"].append(_ssim(p_ms, y_ms).cpu().numpy())
                    if name == keep:
                        preds.append(p_ms[:, 0].cpu().numpy().astype(np.float32))
                        targets.append(y_ms[:, 0].cpu().numpy().astype(np.float32))
        finally:
            self.model.raw.train()
        return pos, maes, preds, targets

    def write_oof(self, best: Path, path: Path) -> Path:
        """Predict the validation set with the weights of checkpoint ``best`` (its better
        source) and save ``path``: indices, pred and target (m/s, (N, 70, 70)), family, mae,
        fold, source."""
        ckpt = load_checkpoint(best, map_location="cpu")
        source = (ckpt["metadata"].get("metrics") or {}).get("source") or "raw"
        model = self.model.fresh().to(self.device)
        model.load_state_dict(ckpt["ema"] if source == "ema" else ckpt["model"])
        values, pred, target = self.predict({source: model}, keep=source)
        maes = {source: values[source]}
        extra = {}
        if self.cfg.oof_mc_passes >= 2:
            extra["mc_var"] = self.mc_variance(model, self.cfg.oof_mc_passes)
        if self.dist.is_main:
            with atomic_path(path, suffix=".npz") as tmp:
                with open(tmp, "wb") as f:
                    np.savez(f, indices=self.data.val_ids, pred=pred, target=target,
                             family=np.asarray(self.data.val_families, dtype=str), mae=maes[source],
                             fold=np.int64(self.cfg.fold), source=np.asarray(source), **extra)
        return path

    def mc_variance(self, model: torch.nn.Module, passes: int) -> np.ndarray:
        """(N, H, W) float32 variance (m/s^2) of ``passes`` MC-dropout predictions of every
        validation sample, gathered over ranks in dataset order."""
        pos, var = [], []
        for idx, x, _, _ in self.data.val_loader(self.eval_batch):
            _, v = predict_mc_dropout(model, x.to(self.device), passes)
            pos.append(idx.numpy())
            var.append(v[:, 0].cpu().numpy().astype(np.float32))
        parts = all_gather_objects((pos, var), self.dist)
        order = np.argsort(_cat([a for p in parts for a in p[0]]), kind="stable")
        return _cat([a for p in parts for a in p[1]])[order]
