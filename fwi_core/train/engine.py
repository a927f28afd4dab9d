"""The training engine: one call of :func:`train` trains one fold.

The loop (:class:`Trainer`) runs epochs of optimizer steps and calls its collaborators:

- :mod:`.datasets`: the train/validation sets (folds, family balancing, simulated data)
  and their loaders;
- :mod:`.augment`: flips, amplitude scaling and noise of each batch;
- :mod:`.step`: one optimizer step (AMP, accumulation, clipping, out-of-memory retry, EMA)
  minimising :class:`~.losses.TrainLoss` (every loss term, with its weight);
- :mod:`.validate`: validation of the raw and EMA weights per epoch, early stopping
  bookkeeping, the out-of-fold file;
- :mod:`.checkpoint`: resumable checkpoints, ``best.pt``, snapshots, resuming;
- :mod:`.budget`: the time budget, time-mode schedules, restart snapshots.

Per epoch: validation, a resumable checkpoint, a ``log.csv`` row. At the end:
``curves.png`` and the out-of-fold predictions of the best weights.

Exact resume: the epoch order is a function of (seed, epoch), augmentation draws come from
generators seeded by (seed, epoch, batch), DataLoaders get their own generators, and
checkpoints carry every rank's RNG states with the position within the epoch; a run
stopped after any step and resumed ends with the same weights as an uninterrupted one.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch.utils.data import Dataset

from ..errors import ConfigError, TrainError
from ..platform import detect_platform
from ..utils import progress_bar, remove_stale_temps
from .augment import BatchAugment
from .budget import Budget, Snapshots, clock
from .checkpoint import CheckpointManager, RunCheckpoints, resolve_resume, restore_rng
from .config import TrainConfig
from .datasets import TrainData, per_rank_batch, seed_all
from .distributed import DistInfo, barrier, init_distributed
from .logs import CSVLog, save_curves
from .losses import Batch, TrainLoss
from .model import TrainedModel
from .state import RunState
from .step import Stepper
from .validate import Validator, summarize

__all__ = ["train", "summarize", "Trainer"]

log = logging.getLogger("fwi_core.train")


class Trainer:
    """One training run: its collaborators, and the loop that calls them; use :func:`train`."""

    def __init__(self, cfg: TrainConfig, datasets: Optional[Tuple[Dataset, Optional[Dataset]]] = None):
        t0 = clock()
        self.cfg = cfg.validate()
        self.platform = detect_platform()
        self.dist: DistInfo = init_distributed(cfg.device)
        try:
            self._setup(datasets, t0)
        except BaseException:
            self.close()
            raise

    def _setup(self, datasets, t0: float) -> None:
        cfg, d = self.cfg, self.dist
        self.device = d.device
        self.budget = Budget(cfg, self.platform, t0)
        self.out = Path(cfg.out or Path(self.platform.out_dir) / f"{cfg.model}-fold{cfg.fold}")
        files = CheckpointManager(self.out, cfg.keep_last)
        if d.is_main:
            remove_stale_temps(self.out)     # half-written files of a killed run
        resume_path = resolve_resume(cfg.resume, self.out)
        if resume_path is None and files.latest() is not None:
            raise ConfigError(f"{self.out} already holds checkpoints of another run: resume it with "
                              "resume='auto' (--resume auto), or choose a new out folder")
        per_rank = per_rank_batch(cfg, d)
        seed_all(cfg.seed)
        self.data = TrainData.load(cfg, self.platform, d, per_rank, datasets)
        self.budget.check()
        self.total_steps = 0 if self.budget.time_mode else cfg.epochs * self.data.steps_per_epoch

        self.model = TrainedModel.build(cfg, d)
        self.state = RunState.start(cfg.grad_accum, self.device)     # all of it is checkpointed
        self.stepper = Stepper(cfg, d, self.model, TrainLoss(cfg, self.model.raw, self.device), self.state,
                               self.total_steps, self.data.steps_per_epoch)
        self.model.set_family_vocabulary(cfg, self.data.train_ds)
        self.augment = BatchAugment(cfg, d)
        self.validator = Validator(cfg, self.data, self.model, self.stepper.amp, self.state, self.budget)
        self.snapshots = Snapshots(cfg, self.budget.time_mode)
        self.ckpts = RunCheckpoints(cfg, d, files, self.platform.name, self.model, self.stepper, self.state,
                                    self.budget, self.data.steps_per_epoch, self.total_steps)
        rng = self.ckpts.begin(resume_path, self.out)
        self.csv = CSVLog(self.out / "log.csv")
        self.model.wrap(d)
        if rng is not None:   # last, after everything that draws random numbers at build time
            restore_rng(rng, d)
        barrier(d)

    @property
    def loss(self) -> TrainLoss:
        return self.stepper.loss

    # ------------------------------------------------------------------ helpers of the loop
    def _reserve(self) -> float:
        v = self.validator
        return self.budget.reserve(len(self.model.sources()), v.batches(), v.eval_batch, self.data.per_rank)

    def _out_of_time(self) -> bool:
        return self.budget.out_of_time(self._reserve, self.dist)

    def _batch(self, x: torch.Tensor, y: torch.Tensor, rest) -> Batch:
        """The batch on the device, with its family indices, augmented."""
        s = self.state
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        fam_idx = self.model.family_index(rest[0], self.device) if rest else None
        observed = x if self.cfg.pde_weight > 0 else None   # the gathers before augmentation
        x, y, flipped = self.augment(x, y, s.epoch, s.batch)
        return Batch(x, y, fam_idx, observed, flipped)

    def _due(self) -> bool:
        """Log after steps 1, 2, 4, 8, ... below ``log_every``, then every ``log_every``."""
        step, every = self.state.step, self.cfg.log_every
        return step % every == 0 or (step < every and step & (step - 1) == 0)

    def _postfix(self, bar) -> None:
        """The running loss, learning rate and PDE term on the progress bar and in the log."""
        s = self.state
        loss = float(s.loss_sum / max(1, s.loss_count))
        if not math.isfinite(loss):
            raise TrainError(f"the training loss is {loss} at step {s.step}: lower lr, keep grad_clip "
                             "on, or use amp=bf16 instead of fp16")
        info = {"loss": f"{loss:.4f}", "lr": f"{self.stepper.lr:.2e}", "ep": s.epoch}
        if s.pde_count:
            info["pde"] = f"{s.pde_sum / s.pde_count:.4g}"
        left = self.budget.left_text()
        if left is not None:
            info["budget_left"] = left
        bar.set_postfix(info, refresh=False)
        if self.dist.is_main:
            log.info("step %d (epoch %d, batch %d/%d): %s | %.3f s/step", s.step, s.epoch, s.batch,
                     self.data.steps_per_epoch, " | ".join(f"{k} {v}" for k, v in info.items() if k != "ep"),
                     self.budget.step_time)

    def _checkpoint(self, snapshot: Optional[int]) -> None:
        """Evaluation done: save (``best.pt`` when it improved) and log the row."""
        self.ckpts.save(best=self.state.improved, snapshot=snapshot)
        if self.dist.is_main:
            self.csv.write(self.state.history)

    # ------------------------------------------------------------------ the loop
    def fit(self) -> Dict[str, Any]:
        cfg, s = self.cfg, self.state
        bar = progress_bar(total=self.total_steps or None, initial=s.step,
                           desc=f"{cfg.model} fold {cfg.fold}", unit="step", disable=not self.dist.is_main)
        reason = None
        stopped_at_epoch_start = False
        self.model.raw.train()
        try:
            while (self.budget.time_mode or s.epoch < cfg.epochs) and reason is None:
                for x, y, *rest in self.data.train_loader(s.epoch, s.batch):
                    if self._out_of_time():
                        reason = "time_budget"
                        stopped_at_epoch_start = s.batch == 0
                        break
                    if self.budget.time_mode:
                        self.budget.advance_schedule(self.stepper, s, self._reserve(), self.dist)
                        self.snapshots.before_step(self.stepper.schedule, s,
                                                   lambda k: self.ckpts.save(snapshot=k))
                    start = clock()
                    s.loss_sum += self.stepper.train_batch(self._batch(x, y, rest))
                    s.loss_count += 1
                    pde = self.loss.take_pde()
                    if pde is not None:
                        s.pde_sum += float(pde)
                        s.pde_count += 1
                    s.step += 1
                    s.batch += 1
                    bar.update(1)
                    self.budget.record_step(start)
                    if self._due():
                        self._postfix(bar)
                    if s.batch == self.data.steps_per_epoch:
                        break
                    if cfg.checkpoint_every and s.step % cfg.checkpoint_every == 0:
                        self.ckpts.save()
                    if cfg.max_steps and s.step >= cfg.max_steps:
                        reason = "max_steps"
                        break
                if reason is not None:
                    break
                # end of an epoch
                s.epoch, s.batch = s.epoch + 1, 0
                self.validator.evaluate(partial=False, lr=self.stepper.lr)
                snapshot = self.snapshots.at_epoch_end(s)
                if cfg.patience and self.data.val_ds is not None and s.bad_evals >= cfg.patience:
                    reason = "early_stopping"
                elif cfg.max_steps and s.step >= cfg.max_steps:
                    reason = "max_steps"
                elif not self.budget.time_mode and s.epoch >= cfg.epochs:
                    reason = "completed"
                if reason is None and self._out_of_time():
                    reason = "time_budget"
                closing = self.snapshots.at_stop(reason, s)
                snapshot = closing if closing is not None else snapshot
                s.stopped_reason = reason
                self._checkpoint(snapshot)
            reason = reason or "completed"
            s.stopped_reason = reason
            if s.batch:     # stopped mid-epoch: evaluate what we have, checkpoint resumably
                self.validator.evaluate(partial=True, lr=self.stepper.lr)
                self._checkpoint(self.snapshots.at_stop(reason, s))
            elif stopped_at_epoch_start:  # the epoch end's checkpoint did not know why it was the last
                self._checkpoint(self.snapshots.at_stop(reason, s))
        finally:
            bar.close()
        return self._finish(reason)

    def _finish(self, reason: str) -> Dict[str, Any]:
        """Final checkpoint bookkeeping, curves, out-of-fold predictions; the result."""
        files, s = self.ckpts.files, self.state
        if files.latest() is None:   # stopped before the first step: save the start
            self.ckpts.save(best=self.data.val_ds is None)
        last = files.latest()
        if self.dist.is_main:
            self.csv.write(s.history)     # complete even if a kill came between a checkpoint and its row
            save_curves(s.history, self.out / "curves.png")
        oof_path = None
        if self.data.val_ds is not None and files.best_path.is_file():
            oof_path = self.validator.write_oof(files.best_path, self.out / f"oof_fold{self.cfg.fold}.npz")
        barrier(self.dist)
        best = s.best_metrics or {}
        return {
            "best_checkpoint": str(files.best_path if files.best_path.is_file() else last),
            "last_checkpoint": str(last),
            "history": s.history, "best_val_mae": float(best.get("mae", math.nan)),
            "val_mae_per_family": {f: e["best"] for f, e in best.get("per_family", {}).items()},
            "best_source": best.get("source"), "oof_path": str(oof_path) if oof_path else None,
            "stopped_reason": reason, "out_dir": str(self.out), "step": s.step, "epoch": s.epoch,
            "wall_time": self.budget.wall_time(s.wall_before), "platform": self.platform.name,
            "amp": self.stepper.amp, "oom_events": s.oom_events, "time_budget": self.budget.seconds,
        }

    def close(self) -> None:
        if self.dist.owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def train(cfg: Union[TrainConfig, Dict[str, Any]],
          datasets: Optional[Tuple[Dataset, Optional[Dataset]]] = None) -> Dict[str, Any]:
    """Train one fold; see :class:`TrainConfig` for the settings.

    Args:
        cfg: a :class:`TrainConfig` or a dict of its fields.
        datasets: optional ``(train_ds, val_ds)`` in-memory datasets yielding
            ``(seismic, normalised velocity, family)``; ``val_ds`` may be None (no
            validation). Without it ``cfg.data`` is indexed and split by family folds.

    Returns:
        ``best_checkpoint``, ``last_checkpoint`` (paths), ``history`` (one dict per
        evaluation), ``best_val_mae`` (m/s, the better of raw/EMA at the best
        checkpoint), ``val_mae_per_family``, ``best_source``, ``oof_path`` (or None),
        ``stopped_reason`` ("completed", "early_stopping", "time_budget", "max_steps"),
        and ``out_dir``, ``step``, ``epoch``, ``wall_time``, ``platform``, ``amp``,
        ``oom_events``, ``time_budget``.
    """
    if isinstance(cfg, dict):
        cfg = TrainConfig.from_dict(cfg)
    trainer = Trainer(cfg, datasets)
    try:
        return trainer.fit()
    finally:
        trainer.close()
