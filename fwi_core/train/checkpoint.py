"""Checkpoints of a training run: atomic files, rolling retention, run metadata, RNG states.

A checkpoint is a ``torch.save`` dict that ``torch.load(..., weights_only=True)`` can
read (tensors, numbers, strings, lists and dicts only):

- ``metadata``: model name and kwargs, fold, epoch, step, validation metrics per family,
  platform, device, training throughput (``samples_per_s``), git commit,
  ``fwi_core.__version__``, wall time, the config (see
  :func:`read_metadata`);
- ``model`` and ``ema``: the raw and EMA weights (``ema`` is None without EMA);
- full checkpoints (``ckpt-<step>.pt``) also hold ``state``: optimizer, scheduler,
  GradScaler, every rank's RNG states, the position within the epoch and the engine's
  bookkeeping, everything :func:`fwi_core.train.train` needs to resume exactly.

``best.pt`` and ``snapshot-<k>.pt`` hold weights and metadata only. Reading checkpoints
and rebuilding models from them is :mod:`fwi_core.models.checkpoint`'s job.

:class:`RunCheckpoints` is the run's side: the payload of the model, the optimizer step and
the :class:`~fwi_core.train.state.RunState`, written by every rank together (RNG states are
gathered), and resuming from one (with the schedule rebased when the run's length changed).
"""
from __future__ import annotations

import datetime
import json
import logging
import math
import os
import random
import re
import subprocess
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from .. import __version__
from ..errors import CheckpointError, ConfigError
from ..models.checkpoint import FORMAT, load_checkpoint, rolling_checkpoints
from ..platform import device_label
from ..utils import atomic_path, atomic_write_text, plain
from .budget import Budget
from .config import MAXIMISED, TrainConfig
from .distributed import DistInfo, all_gather_objects, barrier
from .model import TrainedModel
from .state import RunState
from .step import Stepper

PathLike = Union[str, os.PathLike]
log = logging.getLogger("fwi_core.train")
# Config keys that may change between a run and its resumption without breaking exactness.
_RESUME_FREE = {"data", "out", "resume", "time_budget", "max_steps", "num_workers", "device",
                "log_every", "patience", "min_delta", "keep_last", "checkpoint_every", "epochs"}


# ------------------------------------------------------------------------- metadata
def git_commit(path: Optional[PathLike] = None) -> Optional[str]:
    """The commit of the checkout holding ``path`` (default: fwi_core), or the
    ``FWI_GIT_COMMIT`` environment variable, or None when neither is known."""
    if os.environ.get("FWI_GIT_COMMIT"):
        return os.environ["FWI_GIT_COMMIT"]
    where = Path(path) if path else Path(__file__).resolve().parent
    try:
        res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True,
                             text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    sha = res.stdout.strip()
    return sha if res.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", sha) else None


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------------- RNG states
def rng_state() -> Dict[str, Any]:
    """Python, numpy and torch (CPU and CUDA) RNG states, as weights_only-safe values."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": _to_lists(random.getstate()),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


# ------------------------------------------------------------------------- files
def save_checkpoint(payload: Dict[str, Any], path: PathLike) -> Path:
    """``torch.save`` through a temporary file renamed into place (atomic)."""
    path = Path(path)
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(payload, tmp)
    return path


class CheckpointManager:
    """Checkpoints of one run folder: rolling ``ckpt-<step>.pt`` (the last ``keep_last``),
    ``best.pt`` and ``snapshot-<k>.pt``, all written atomically."""

    def __init__(self, directory: PathLike, keep_last: int = 2):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.dir = Path(directory)
        self.keep_last = int(keep_last)

    @property
    def best_path(self) -> Path:
        return self.dir / "best.pt"

    def rolling(self) -> List[Path]:
        """The rolling checkpoints, oldest first."""
        return rolling_checkpoints(self.dir)

    def latest(self) -> Optional[Path]:
        r = self.rolling()
        return r[-1] if r else None

    def save(self, payload: Dict[str, Any], step: int) -> Path:
        """Write ``ckpt-<step>.pt`` and delete all but the newest ``keep_last``."""
        path = save_checkpoint(payload, self.dir / f"ckpt-{int(step):08d}.pt")
        for old in self.rolling()[:-self.keep_last]:
            old.unlink(missing_ok=True)
        return path

    def save_best(self, payload: Dict[str, Any]) -> Path:
        return save_checkpoint(_weights_only(payload), self.best_path)

    def save_snapshot(self, payload: Dict[str, Any], index: int) -> Path:
        return save_checkpoint(_weights_only(payload), self.dir / f"snapshot-{int(index):02d}.pt")


def _weights_only(payload: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in payload.items() if k != "state"}


def resolve_resume(resume: Optional[str], out_dir: PathLike) -> Optional[Path]:
    """The checkpoint to resume from: a file, a run folder's latest, or for "auto" the
    latest in ``out_dir`` (None if there is none yet)."""
    if not resume:
        return None
    if str(resume).lower() == "auto":
        return CheckpointManager(out_dir).latest()
    p = Path(resume)
    if p.is_dir():
        latest = CheckpointManager(p).latest()
        if latest is None:
            raise CheckpointError(f"resume={resume}: no ckpt-*.pt in that folder")
        return latest
    if not p.is_file():
        raise CheckpointError(f"resume={resume}: no such checkpoint file or run folder")
    return p


def restore_rng(ranks: Sequence[Dict[str, Any]], dist: DistInfo) -> None:
    """Restore this rank's RNG states from a checkpoint's per-rank states (rank 0's when
    the number of processes changed)."""
    set_rng_state(ranks[dist.rank] if len(ranks) == dist.world_size else ranks[0])
    if len(ranks) != dist.world_size:
        log.warning("resuming on %d processes from a checkpoint of %d: RNG streams differ",
                    dist.world_size, len(ranks))


# ------------------------------------------------------------------------- a run's checkpoints
class RunCheckpoints:
    """What a run's checkpoints hold, writing them, and resuming from one."""

    def __init__(self, cfg: TrainConfig, dist: DistInfo, files: CheckpointManager, platform: str,
                 model: TrainedModel, stepper: Stepper, state: RunState, budget: Budget,
                 steps_per_epoch: int, total_steps: int):
        self.cfg, self.dist, self.files, self.platform = cfg, dist, files, platform
        self.model, self.stepper, self.state, self.budget = model, stepper, state, budget
        self.steps_per_epoch, self.total_steps = steps_per_epoch, total_steps
        self.git = git_commit()

    def metadata(self, metrics: Optional[Dict[str, Any]]) -> Dict[str, Any]:
        cfg, s = self.cfg, self.state
        return {
            "model": self.model.name, "model_kwargs": plain(dict(self.model.kwargs)), "fold": cfg.fold,
            "folds": cfg.folds, "epoch": s.epoch, "step": s.step,
            "position": {"epoch": s.epoch, "batch": s.batch, "steps_per_epoch": self.steps_per_epoch},
            "metrics": metrics,
            "best": {"monitor": cfg.monitor, "value": None if math.isinf(s.best_value) else
                     (-s.best_value if cfg.monitor in MAXIMISED else s.best_value),
                     "step": s.best_step},
            "family_best": s.family_best, "family_names": self.model.family_names,
            "time_mode": self.budget.time_mode, "platform": self.platform,
            # what the run computed on and how fast (global batch / mean optimizer step: samples/s)
            "device": device_label(self.dist.device),
            "samples_per_s": cfg.batch_size / self.budget.step_time if self.budget.step_time else None,
            "world_size": self.dist.world_size, "amp": self.stepper.amp, "git_commit": self.git,
            "fwi_core_version": __version__, "torch_version": torch.__version__,
            "wall_time": self.budget.wall_time(s.wall_before), "created": now_iso(),
            "stopped_reason": s.stopped_reason, "config": cfg.to_dict(),
        }

    def payload(self, metrics: Optional[Dict[str, Any]], full: bool) -> Dict[str, Any]:
        m, st, s = self.model, self.stepper, self.state
        p = {"format": FORMAT, "metadata": plain(self.metadata(metrics)), "model": m.raw.state_dict(),
             "ema": m.ema.module.state_dict() if m.ema is not None else None}
        if full:
            p["state"] = {
                "optimizer": st.optimizer.state_dict(), "scheduler": st.scheduler.state_dict(),
                "scaler": st.scaler.state_dict(),
                "ema_n_averaged": int(m.ema.n_averaged) if m.ema is not None else 0,
                # per rank: RNG states and the running loss of the epoch so far
                "ranks": all_gather_objects({"rng": rng_state(), "loss_sum": float(s.loss_sum),
                                             "loss_count": s.loss_count, "pde_sum": float(s.pde_sum),
                                             "pde_count": s.pde_count}, self.dist),
                "epoch": s.epoch, "batch": s.batch, "step": s.step, "accum": s.accum,
                "best_value": s.best_value, "best_step": s.best_step, "bad_evals": s.bad_evals,
                "history": plain(s.history), "family_best": plain(s.family_best),
                "last_metrics": plain(s.last_metrics), "best_metrics": plain(s.best_metrics),
                "oom_events": s.oom_events, "wall_time": self.budget.wall_time(s.wall_before),
                "progress": float(st.schedule._progress(s.step)), "cycle": s.cycle,
            }
        return p

    def save(self, best: bool = False, snapshot: Optional[int] = None) -> Optional[Path]:
        """Write the rolling (resumable) checkpoint, and ``best.pt`` / a snapshot. Every
        rank must call it (RNG states are gathered); rank 0 writes."""
        start = self.budget.now()
        payload = self.payload(self.state.last_metrics, full=True)
        path = None
        if self.dist.is_main:
            # best and snapshot first, the resumable checkpoint (which records that they
            # were written) last: a run killed in between resumes from the previous
            # checkpoint and writes them again, instead of never writing them
            if best:
                self.files.save_best(payload)
            if snapshot is not None:
                self.files.save_snapshot(payload, snapshot)
            path = self.files.save(payload, self.state.step)
        barrier(self.dist)
        self.budget.save_time = self.budget.now() - start
        return path

    def begin(self, resume: Optional[Path], out: Path) -> Optional[List[Dict[str, Any]]]:
        """Resume from ``resume`` (returns every rank's RNG states, to restore last), or
        start the run folder ``out``: a fresh ``config.json``, no ``log.csv``."""
        if resume is not None:
            return self.load(resume)
        if self.dist.is_main:
            out.mkdir(parents=True, exist_ok=True)
            (out / "log.csv").unlink(missing_ok=True)
            atomic_write_text(out / "config.json", json.dumps(self.cfg.to_dict(), indent=1) + "\n")
        return None

    def load(self, path: Path) -> List[Dict[str, Any]]:
        """Load a resumable checkpoint into the model, the optimizer step and the run
        state; returns every rank's RNG states."""
        ckpt = load_checkpoint(path, map_location="cpu")
        if "state" not in ckpt:
            raise ConfigError(f"resume={path}: a weights-only checkpoint (best/snapshot); resume "
                              "from a ckpt-*.pt file or the run folder")
        old = ckpt["metadata"].get("config", {})
        changed = sorted(k for k, v in plain(self.cfg.to_dict()).items()
                         if k not in _RESUME_FREE and k in old and old[k] != v)
        if changed:
            log.warning("resuming %s with changed settings %s: the result will differ from an "
                        "uninterrupted run", path, changed)
        m, st, s, saved = self.model, self.stepper, self.state, ckpt["state"]
        meta = ckpt["metadata"]
        mismatch = (f"resume={path}: the run trained {meta.get('model')} "
                    f"{json.dumps(plain(meta.get('model_kwargs') or {}))} but this config builds {m.name} "
                    f"{json.dumps(plain(dict(m.kwargs)))}: resume with the run's model (python -m fwi_core.train "
                    "--out RUN --resume restores it from config.json) or use a new out folder")
        if meta.get("model") != m.name:
            raise ConfigError(mismatch)
        try:              # other kwargs may fit the same weights (e.g. a dropout rate)
            m.raw.load_state_dict(ckpt["model"])
        except RuntimeError as exc:
            raise ConfigError(f"{mismatch} ({str(exc).splitlines()[0]})") from None
        if m.ema is not None:
            if ckpt["ema"] is None:
                raise ConfigError(f"resume={path}: the checkpoint has no EMA weights; set ema_decay=0")
            m.ema.module.load_state_dict(ckpt["ema"])
            m.ema.n_averaged.fill_(saved["ema_n_averaged"])
        st.optimizer.load_state_dict(saved["optimizer"])
        st.scheduler.load_state_dict(saved["scheduler"])
        self.rebase_schedule(old, saved)
        st.scaler.load_state_dict(saved["scaler"])
        s.epoch, s.batch, s.step, s.accum = saved["epoch"], saved["batch"], saved["step"], saved["accum"]
        s.best_value, s.best_step, s.bad_evals = saved["best_value"], saved["best_step"], saved["bad_evals"]
        s.history, s.family_best = list(saved["history"]), dict(saved["family_best"])
        s.last_metrics, s.best_metrics = saved["last_metrics"], saved["best_metrics"]
        s.oom_events, s.wall_before = list(saved["oom_events"]), float(saved["wall_time"])
        if s.batch >= self.steps_per_epoch:   # data or batch size changed since
            raise ConfigError(f"resume={path}: position {s.batch} is past the "
                              f"{self.steps_per_epoch} batches of an epoch with this data/batch_size")
        log.info("resumed %s at epoch %d, batch %d, step %d", path, s.epoch, s.batch, s.step)
        ranks = saved["ranks"]
        mine = ranks[self.dist.rank] if len(ranks) == self.dist.world_size else ranks[0]
        s.loss_sum.fill_(mine["loss_sum"])
        s.loss_count = mine["loss_count"]
        s.pde_sum, s.pde_count = float(mine.get("pde_sum", 0.0)), int(mine.get("pde_count", 0))
        return [r["rng"] for r in ranks]

    def rebase_schedule(self, old_cfg: Dict[str, Any], saved: Dict[str, Any]) -> None:
        """After loading the scheduler of a run of another length (epochs changed, or a
        time-mode run resumed with a new budget): go on from the current step and
        learning rate over the new length instead of crashing or climbing back up. A run
        whose schedule had annealed to its end warms back up to ``lr`` over
        ``rewarm_fraction`` of the new length, then anneals over the rest. A changed
        ``lr`` becomes the new peak."""
        st, cfg = self.stepper, self.cfg
        fn = st.schedule
        step = int(saved["step"])
        progress = float(saved.get("progress", fn._progress(step)))
        self.state.cycle = int(saved.get("cycle", 0))
        old_total = fn.total
        factor = fn(step)             # where the loaded schedule stands
        if old_cfg.get("lr", cfg.lr) != cfg.lr:
            st.scheduler.base_lrs = [cfg.lr for _ in st.optimizer.param_groups]
            for g in st.optimizer.param_groups:
                g["initial_lr"] = cfg.lr
            log.info("learning rate changed from %g to %g on resume: the schedule's peak is now %g",
                     old_cfg.get("lr"), cfg.lr, cfg.lr)
        rewarm = cfg.rewarm_fraction if fn.finished(progress) else 0.0
        if self.budget.time_mode:
            if rewarm:      # a finished anneal: the new budget is a new schedule, warming up first
                progress = 0.0
            # progress goes on from where it stopped to 1 over the new budget
            self.state.progress0 = progress
            fn.progress = progress
            if old_total or rewarm:     # was a step-mode run, or had finished: anneal from the current rate
                fn.rebase(step, 0, factor, progress, rewarm)
                log.info("resumed a %s schedule in time mode: %s over the new budget",
                         f"{old_total}-step" if old_total else "finished",
                         f"warming up over {rewarm:.0%} of it, then annealing" if rewarm else "annealing")
            st.set_lr(step)
            return
        if old_total != self.total_steps or rewarm:
            if rewarm and step >= self.total_steps - 1:
                rewarm = 0.0         # nothing left to train: stay annealed
            fn.rebase(step, self.total_steps, factor, progress, rewarm)
            st.set_lr(step)
            st.scheduler._last_lr = [g["lr"] for g in st.optimizer.param_groups]
            if rewarm:
                log.info("the run had annealed to the end of its schedule (step %d): warming the learning rate back "
                         "up from %.3g to %g over %.0f%% of the %d new steps, then annealing to step %d", step,
                         factor * cfg.lr, cfg.lr, 100 * rewarm, self.total_steps - step, self.total_steps)
            else:
                log.info("schedule length changed from %s to %d steps (epochs %s -> %d): continuing from step %d "
                         "at %.3g of the learning rate", old_total or "time budget", self.total_steps,
                         old_cfg.get("epochs"), self.cfg.epochs, step, factor)
