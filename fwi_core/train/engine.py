"""The training engine: one call of :func:`train` trains one fold.

Per optimizer step: (micro-batched) forward under autocast, L1 + boundary loss, scaled
backward, gradient clipping, optimizer and per-step schedule, EMA update. Per epoch:
validation of the raw and the EMA weights (MAE in m/s per family), early stopping, a
resumable checkpoint, a ``log.csv`` row. At the end: ``curves.png`` and the out-of-fold
predictions of the best weights.

Exact resume: the epoch order is a function of (seed, epoch) (:class:`EpochSampler`),
augmentation draws come from generators seeded by (seed, epoch, batch), DataLoaders get
their own generators (so they do not consume the global RNG), and checkpoints carry every
rank's RNG states with the position within the epoch; a run stopped after any step and
resumed ends with the same weights as an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset, Subset

import fwi_core
from fwi_core.data import (FWIDataset, add_noise, denormalize_velocity, family_kfold,
                           find_competition_root, hflip, index_train, scale_amplitude)
from fwi_core.metrics import boundary_iou, mae, per_family, ssim
from fwi_core.utils import atomic_path, atomic_write_text, progress_bar, remove_stale_temps

from ..models.checkpoint import FORMAT, load_checkpoint, read_metadata
from ..utils import plain
from .checkpoint import CheckpointManager, git_commit, now_iso, resolve_resume, rng_state, set_rng_state
from .config import MAXIMISED, TrainConfig
from .distributed import (DistInfo, EpochSampler, all_gather_objects, any_rank, barrier,
                          init_distributed, mean_over_ranks)
from ..errors import ConfigError, TrainError
from .logs import CSVLog, save_curves
from .losses import velocity_loss
from .optim import autocast, build_optimizer, build_scheduler, make_scaler, resolve_amp, schedule_of
from ..platform import detect_platform, process_age

log = logging.getLogger("fwi_core.train")

_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
CLOSE_RESERVE = 1.0   # seconds kept for closing work besides validation and checkpoints (the curves)
# Config keys that may change between a run and its resumption without breaking exactness.
_RESUME_FREE = {"data", "out", "resume", "time_budget", "max_steps", "num_workers", "device",
                "log_every", "patience", "min_delta", "keep_last", "checkpoint_every", "epochs"}


class _AgreedOOM(RuntimeError):
    """Some DDP rank ran out of memory in a forward pass; every rank raises this together."""


# --------------------------------------------------------------------------- data helpers
class _Indexed(Dataset):
    """Items of ``ds`` prefixed with their position (to gather validation across ranks)."""

    def __init__(self, ds: Dataset):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        item = self.ds[i]
        return (i, item[0], item[1], item[2] if len(item) > 2 else "all")


def _families(ds: Dataset) -> List[str]:
    """Family of every item (``ds.families()`` when offered, else read item by item)."""
    if hasattr(ds, "families"):
        return [str(f) for f in ds.families()]
    if isinstance(ds, Subset) and hasattr(ds.dataset, "families"):
        fams = ds.dataset.families()
        return [str(fams[i]) for i in ds.indices]
    return [str(ds[i][2]) if len(ds[i]) > 2 else "all" for i in range(len(ds))]


def _sample_ids(ds: Dataset) -> np.ndarray:
    """Identifiers of the items for out-of-fold files: FWIDataset's global sample
    indices, a Subset's parent positions, else positions."""
    ids = getattr(ds, "indices", None)
    if ids is not None and len(ids) == len(ds):
        return np.asarray(ids, dtype=np.int64)
    return np.arange(len(ds), dtype=np.int64)


def _limit(ds: Dataset, n: int, seed: int) -> Dataset:
    """A seeded random subset of ``n`` items (sorted), or ``ds`` when n is 0 or large."""
    if not n or n >= len(ds):
        return ds
    pos = np.sort(np.random.default_rng(seed).choice(len(ds), n, replace=False))
    return ds.subset(pos) if isinstance(ds, FWIDataset) else Subset(ds, pos.tolist())


def _ssim(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample SSIM of m/s maps (data range 3000 m/s), the window shrunk for small maps."""
    win = min(11, min(pred.shape[-2:]) - (1 - min(pred.shape[-2:]) % 2))
    return ssim(pred, target, data_range=3000.0, win_size=max(3, win))


def _cat(arrays: List[np.ndarray]) -> np.ndarray:
    return np.concatenate(arrays) if arrays else np.zeros(0, np.float32)


def _worker_init(worker_id: int) -> None:
    seed = torch.initial_seed() % 2 ** 32
    np.random.seed(seed)
    random.seed(seed)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _mix(*parts: int) -> int:
    """A 63-bit seed from integers (for per-batch augmentation generators)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h >> 1


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


# --------------------------------------------------------------------------- the trainer
class Trainer:
    """State and loop of one training run; use :func:`train`."""

    def __init__(self, cfg: TrainConfig, datasets: Optional[Tuple[Dataset, Optional[Dataset]]] = None):
        self.t0 = time.perf_counter()
        self.cfg = cfg.validate()
        self.platform = detect_platform()
        self.dist: DistInfo = init_distributed(cfg.device)
        try:
            self._setup(datasets)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ setup
    def _setup(self, datasets) -> None:
        cfg, d = self.cfg, self.dist
        self.device = d.device
        if cfg.time_budget is not None:     # explicit: seconds from now
            self.budget = float(cfg.time_budget) or None
        elif self.platform.time_budget:    # the platform's session limit, from the process start
            self.budget = max(0.0, self.platform.time_budget - process_age())
            log.info("%s session: training stops in %.2f h at the latest", self.platform.name,
                     self.budget / 3600)
        else:
            self.budget = None
        self.out = Path(cfg.out or Path(self.platform.out_dir) / f"{cfg.model}-fold{cfg.fold}")
        self.ckpts = CheckpointManager(self.out, cfg.keep_last)
        if d.is_main:
            remove_stale_temps(self.out)     # half-written files of a killed run
        resume_path = resolve_resume(cfg.resume, self.out)
        if resume_path is None and self.ckpts.latest() is not None:
            raise ConfigError(f"{self.out} already holds checkpoints of another run: resume it with "
                              "resume='auto' (--resume auto), or choose a new out folder")
        if cfg.batch_size % d.world_size:
            raise ConfigError(f"batch_size={cfg.batch_size} (the global batch) must be divisible by "
                              f"the {d.world_size} processes")
        self.per_rank = cfg.batch_size // d.world_size
        if cfg.grad_accum > self.per_rank:
            raise ConfigError(f"grad_accum={cfg.grad_accum} exceeds the per-process batch {self.per_rank}")

        _seed_all(cfg.seed)
        self.train_ds, self.val_ds = self._datasets(datasets)
        fams = _families(self.train_ds) if cfg.balance_families else None
        self.sampler = EpochSampler(self.train_ds, d.world_size, d.rank, cfg.seed, fams)
        self.steps_per_epoch = self.sampler.num_samples // self.per_rank
        if self.steps_per_epoch < 1:
            raise ConfigError(f"batch_size={cfg.batch_size} exceeds the {len(self.train_ds)} training "
                              "samples: lower batch_size")
        # epochs=0: train until the budget, the schedule spanning it (time mode)
        self.time_mode = cfg.epochs == 0
        if self.time_mode and not self.budget:
            raise ConfigError("epochs=0 trains until the time budget runs out: set time_budget to a number "
                              "of seconds (--time-budget S), or give epochs >= 1")
        self.total_steps = 0 if self.time_mode else cfg.epochs * self.steps_per_epoch

        from fwi_core.models import create_model
        self.model_name, self.model_kwargs = self._architecture()
        try:
            self.raw = create_model(self.model_name, **self.model_kwargs)
        except (TypeError, ValueError) as exc:     # unknown or bad model_kwargs
            raise ConfigError(f"model_kwargs {dict(cfg.model_kwargs)} do not fit model {cfg.model!r}: {exc}") from exc
        if cfg.backbone_checkpoint:
            self.raw.load_backbone(cfg.backbone_checkpoint)
        self.raw = self.raw.to(self.device)
        if cfg.sync_bn and d.enabled:
            self.raw = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.raw)
        self.ema = None
        if cfg.ema_decay > 0:
            self.ema = AveragedModel(self.raw, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay),
                                     use_buffers=True)
            self.ema.module.eval()
        elif cfg.monitor == "mae_ema":
            raise ConfigError("monitor='mae_ema' needs EMA: set ema_decay > 0")
        self.amp = resolve_amp(cfg.amp, self.device)
        self.scaler = make_scaler(self.amp, self.device)
        self.optimizer = build_optimizer([p for p in self.raw.parameters() if p.requires_grad], cfg.optimizer,
                                         cfg.lr, cfg.weight_decay)
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule, self.total_steps,
                                         self.steps_per_epoch, cfg.warmup_steps, cfg.min_lr,
                                         cfg.restart_epochs, cfg.restart_cycles)
        self.schedule = schedule_of(self.scheduler)
        self.family_names = self._family_vocabulary()
        self.aux_weights = {"family": cfg.family_loss_weight, "latent": cfg.latent_weight}

        # bookkeeping (all of it is checkpointed)
        self.epoch, self.batch, self.step = 0, 0, 0
        self.accum = cfg.grad_accum
        self.eval_batch = max(1, 2 * self.per_rank // self.accum)
        self.best_value, self.best_step, self.bad_evals = math.inf, -1, 0
        self.history: List[Dict[str, Any]] = []
        self.family_best: Dict[str, Dict[str, Any]] = {}
        self.last_metrics: Optional[Dict[str, Any]] = None
        self.best_metrics: Optional[Dict[str, Any]] = None
        self.oom_events: List[Dict[str, int]] = []
        self.wall_before = 0.0
        self.stopped_reason: Optional[str] = None
        self.git = git_commit()
        self.loss_sum = torch.zeros((), device=self.device)
        self.loss_count = 0
        self.step_time, self.val_time, self.save_time = 0.0, None, None
        self._improved = False
        self.progress0 = 0.0          # time mode: schedule progress when this process started
        self.cycle = 0                # cosine_restarts: the cycle of the last optimizer step

        rng = None
        if resume_path is not None:
            rng = self._load(resume_path)
        elif d.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "log.csv").unlink(missing_ok=True)
            atomic_write_text(self.out / "config.json", json.dumps(cfg.to_dict(), indent=1) + "\n")
        self.csv = CSVLog(self.out / "log.csv")
        self.model = self.raw
        if d.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.raw, device_ids=ids)
        if rng is not None:   # last, after everything that draws random numbers at build time
            set_rng_state(rng[d.rank] if len(rng) == d.world_size else rng[0])
            if len(rng) != d.world_size:
                log.warning("resuming on %d processes from a checkpoint of %d: RNG streams differ",
                            d.world_size, len(rng))
        barrier(d)

    def _architecture(self) -> Tuple[str, Dict[str, Any]]:
        """The model to build: ``cfg.model``, or with ``backbone_checkpoint`` a
        ``residual_stage`` of the frozen backbone (rebuilt from its checkpoint's metadata)
        and ``cfg.model`` as the member trained on its residual."""
        cfg = self.cfg
        if not cfg.backbone_checkpoint:
            return cfg.model, dict(cfg.model_kwargs)

        meta = read_metadata(cfg.backbone_checkpoint)
        if meta.get("model") == "residual_stage":
            raise ConfigError(f"backbone_checkpoint={cfg.backbone_checkpoint} is itself a residual stage: "
                              "use a plain model's checkpoint as the backbone")
        return "residual_stage", {"backbone": meta["model"], "backbone_kwargs": dict(meta.get("model_kwargs") or {}),
                                  "member": cfg.model, "member_kwargs": dict(cfg.model_kwargs)}

    def _family_vocabulary(self) -> Optional[List[str]]:
        """Family names indexed by the model's per-family terms (models with
        ``num_families`` > 0): the competition's 10 families, or the sorted training
        families when the data uses other names; None for models without them."""
        n = int(getattr(self.raw, "num_families", 0) or 0)
        if n <= 0:
            return None
        from fwi_core.physics.families import FAMILIES

        seen = sorted(set(_families(self.train_ds)))
        names = list(FAMILIES) if set(seen) <= set(FAMILIES) else seen
        if len(names) > n:
            raise ConfigError(f"model {self.cfg.model!r} has num_families={n} but the data has {len(names)} "
                              f"families ({', '.join(names)}): set model_kwargs num_families >= {len(names)}")
        return names

    def _family_index(self, families) -> Optional[torch.Tensor]:
        if self.family_names is None or families is None:
            return None
        pos = {f: i for i, f in enumerate(self.family_names)}
        try:
            return torch.tensor([pos[str(f)] for f in families], dtype=torch.long, device=self.device)
        except KeyError as exc:
            raise TrainError(f"family {exc.args[0]!r} is not one of the model's families "
                             f"{self.family_names}") from None

    def _datasets(self, datasets):
        cfg = self.cfg
        if datasets is not None:
            if not isinstance(datasets, (tuple, list)) or len(datasets) != 2:
                raise ConfigError("datasets must be a pair (train_dataset, val_dataset or None)")
            train_ds, val_ds = datasets
        else:
            root = cfg.data or self.platform.data_dir
            if not root:
                raise ConfigError("no training data: pass data=DIR (--data DIR), the competition root "
                                  "holding train_samples/, or set FWI_DATA")
            if not Path(root).exists():
                raise ConfigError(f"data path {root} does not exist")
            full = FWIDataset(index_train(find_competition_root(root)))
            if cfg.folds >= 2:
                tr, va = family_kfold(full.families(), cfg.folds, cfg.seed)[cfg.fold]
                train_ds, val_ds = full.subset(tr), full.subset(va)
            else:
                train_ds, val_ds = full, None
        if len(train_ds) == 0:
            raise ConfigError("the training set is empty")
        train_ds = _limit(train_ds, cfg.max_train_samples, cfg.seed)
        if cfg.sim_fraction > 0:
            from fwi_core.physics.simulated import mix_datasets

            kwargs = {"seed": cfg.seed, "nt": int(train_ds[0][0].shape[-2]), **cfg.sim_kwargs}
            try:
                train_ds = mix_datasets(train_ds, cfg.sim_fraction, **kwargs)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"sim_kwargs {dict(cfg.sim_kwargs)}: {exc}") from exc
            log.info("training on %d real + %d freshly simulated samples per epoch", train_ds.n_real, train_ds.n_sim)
        if val_ds is not None:
            val_ds = _limit(val_ds, cfg.max_val_samples, cfg.seed + 1)
            if len(val_ds) == 0:
                val_ds = None
        if val_ds is not None:
            self.val_families = _families(val_ds)
            self.val_ids = _sample_ids(val_ds)
        return train_ds, val_ds

    # ------------------------------------------------------------------ checkpoints
    def _metadata(self, metrics: Optional[Dict[str, Any]]) -> Dict[str, Any]:
        cfg = self.cfg
        return {
            "model": self.model_name, "model_kwargs": plain(dict(self.model_kwargs)), "fold": cfg.fold,
            "folds": cfg.folds, "epoch": self.epoch, "step": self.step,
            "position": {"epoch": self.epoch, "batch": self.batch, "steps_per_epoch": self.steps_per_epoch},
            "metrics": metrics,
            "best": {"monitor": cfg.monitor, "value": None if math.isinf(self.best_value) else
                     (-self.best_value if cfg.monitor in MAXIMISED else self.best_value),
                     "step": self.best_step},
            "family_best": self.family_best, "family_names": self.family_names,
            "time_mode": self.time_mode, "platform": self.platform.name,
            "world_size": self.dist.world_size, "amp": self.amp, "git_commit": self.git,
            "fwi_core_version": fwi_core.__version__, "torch_version": torch.__version__,
            "wall_time": self.wall_time, "created": now_iso(), "stopped_reason": self.stopped_reason,
            "config": cfg.to_dict(),
        }

    @property
    def wall_time(self) -> float:
        return self.wall_before + time.perf_counter() - self.t0

    def _payload(self, metrics, full: bool) -> Dict[str, Any]:
        p = {"format": FORMAT, "metadata": plain(self._metadata(metrics)), "model": self.raw.state_dict(),
             "ema": self.ema.module.state_dict() if self.ema is not None else None}
        if full:
            p["state"] = {
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "ema_n_averaged": int(self.ema.n_averaged) if self.ema is not None else 0,
                # per rank: RNG states and the running loss of the epoch so far
                "ranks": all_gather_objects({"rng": rng_state(), "loss_sum": float(self.loss_sum),
                                             "loss_count": self.loss_count}, self.dist),
                "epoch": self.epoch, "batch": self.batch, "step": self.step, "accum": self.accum,
                "best_value": self.best_value, "best_step": self.best_step, "bad_evals": self.bad_evals,
                "history": plain(self.history), "family_best": plain(self.family_best),
                "last_metrics": plain(self.last_metrics), "best_metrics": plain(self.best_metrics),
                "oom_events": self.oom_events, "wall_time": self.wall_time,
                "progress": float(self.schedule._progress(self.step)), "cycle": self.cycle,
            }
        return p

    def _save(self, best: bool = False, snapshot: Optional[int] = None) -> Optional[Path]:
        """Write the rolling (resumable) checkpoint, and ``best.pt`` / a snapshot. Every
        rank must call it (RNG states are gathered); rank 0 writes."""
        start = time.perf_counter()
        payload = self._payload(self.last_metrics, full=True)
        path = None
        if self.dist.is_main:
            # best and snapshot first, the resumable checkpoint (which records that they
            # were written) last: a run killed in between resumes from the previous
            # checkpoint and writes them again, instead of never writing them
            if best:
                self.ckpts.save_best(payload)
            if snapshot is not None:
                self.ckpts.save_snapshot(payload, snapshot)
            path = self.ckpts.save(payload, self.step)
        barrier(self.dist)
        self.save_time = time.perf_counter() - start
        return path

    def _load(self, path: Path):
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
        s = ckpt["state"]
        self.raw.load_state_dict(ckpt["model"])
        if self.ema is not None:
            if ckpt["ema"] is None:
                raise ConfigError(f"resume={path}: the checkpoint has no EMA weights; set ema_decay=0")
            self.ema.module.load_state_dict(ckpt["ema"])
            self.ema.n_averaged.fill_(s["ema_n_averaged"])
        self.optimizer.load_state_dict(s["optimizer"])
        self.scheduler.load_state_dict(s["scheduler"])
        self._rebase_schedule(old, s)
        self.scaler.load_state_dict(s["scaler"])
        self.epoch, self.batch, self.step, self.accum = s["epoch"], s["batch"], s["step"], s["accum"]
        self.best_value, self.best_step, self.bad_evals = s["best_value"], s["best_step"], s["bad_evals"]
        self.history, self.family_best = list(s["history"]), dict(s["family_best"])
        self.last_metrics, self.best_metrics = s["last_metrics"], s["best_metrics"]
        self.oom_events, self.wall_before = list(s["oom_events"]), float(s["wall_time"])
        if self.batch >= self.steps_per_epoch:   # data or batch size changed since
            raise ConfigError(f"resume={path}: position {self.batch} is past the "
                              f"{self.steps_per_epoch} batches of an epoch with this data/batch_size")
        log.info("resumed %s at epoch %d, batch %d, step %d", path, self.epoch, self.batch, self.step)
        mine = s["ranks"][self.dist.rank] if len(s["ranks"]) == self.dist.world_size else s["ranks"][0]
        self.loss_sum.fill_(mine["loss_sum"])
        self.loss_count = mine["loss_count"]
        return [r["rng"] for r in s["ranks"]]

    def _rebase_schedule(self, old_cfg: Dict[str, Any], state: Dict[str, Any]) -> None:
        """After loading the scheduler of a run of another length (epochs changed, or a
        time-mode run resumed with a new budget): go on from the current step and
        learning rate over the new length instead of crashing or climbing back up."""
        fn = self.schedule
        step = int(state["step"])
        progress = float(state.get("progress", fn._progress(step)))
        self.cycle = int(state.get("cycle", 0))
        old_total = fn.total
        if self.time_mode:
            # progress goes on from where it stopped to 1 over the new budget
            self.progress0 = progress
            fn.progress = progress
            if old_total:     # was a step-mode run: anneal from the current rate
                fn.rebase(step, 0, fn(step), progress)
                log.info("resumed a %d-step schedule in time mode: annealing over the new budget", old_total)
            return
        if old_total != self.total_steps:
            factor = fn(step)
            fn.rebase(step, self.total_steps, factor, progress)
            for g, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
                g["lr"] = base * fn(step)
            self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]
            log.info("schedule length changed from %s to %d steps (epochs %s -> %d): continuing from step %d "
                     "at %.3g of the learning rate", old_total or "time budget", self.total_steps,
                     old_cfg.get("epochs"), self.cfg.epochs, step, factor)

    # ------------------------------------------------------------------ one step
    def _flip(self, x: torch.Tensor, y: torch.Tensor, epoch: int, batch: int):
        """Horizontal flips drawn for the whole global batch (seeded by epoch and batch),
        this rank taking its items, so DDP and single-process runs flip the same samples."""
        g = torch.Generator().manual_seed(_mix(self.cfg.seed, epoch, batch))
        draw = torch.rand(self.cfg.batch_size, generator=g) < self.cfg.flip_prob
        mask = draw[self.dist.rank::self.dist.world_size][: x.shape[0]].to(x.device)
        if bool(mask.any()):
            x, y = x.clone(), y.clone()
            x[mask], y[mask] = hflip(x[mask], y[mask])
        self._flipped = mask
        return x, y

    def _augment(self, x: torch.Tensor, epoch: int, batch: int) -> torch.Tensor:
        """Amplitude scaling and additive noise on the gathers (``scale_prob``,
        ``noise_prob``), drawn for the whole global batch from a generator seeded by
        (seed, epoch, batch) like the flips, so resumed and DDP runs draw the same."""
        cfg = self.cfg
        n = cfg.batch_size
        g = torch.Generator().manual_seed(_mix(cfg.seed, epoch, batch, 2))
        pick = slice(self.dist.rank, None, self.dist.world_size)
        if cfg.scale_prob > 0:
            lo, hi = (math.log(v) for v in cfg.scale_range)
            use = (torch.rand(n, generator=g) < cfg.scale_prob)[pick][: x.shape[0]]
            f = torch.exp(lo + (hi - lo) * torch.rand(n, generator=g))[pick][: x.shape[0]]
            if bool(use.any()):
                x = x.clone()
                x[use.to(x.device)] = scale_amplitude(x[use.to(x.device)], f[use])
        if cfg.noise_prob > 0:
            use = (torch.rand(n, generator=g) < cfg.noise_prob)[pick][: x.shape[0]]
            if bool(use.any()):
                x = x.clone()
                x[use.to(x.device)] = add_noise(x[use.to(x.device)], cfg.noise_std, generator=g)
        return x

    def _forward(self, xc: torch.Tensor, fam_idx: Optional[torch.Tensor]) -> torch.Tensor:
        """Forward pass under autocast. Under DDP the ranks agree on out-of-memory: a rank
        that runs out of memory in its forward pass tells the others (one all-reduce of a
        flag per micro-batch), and every rank raises :class:`_AgreedOOM` together, so all
        of them halve the micro-batch in step (no rank is left waiting in a collective)."""
        kwargs = {"family_idx": fam_idx} if fam_idx is not None else {}
        failed = False
        pred = None
        try:
            with autocast(self.amp, self.device):
                pred = self.model(xc, **kwargs)
        except _OOM:
            if not self.dist.enabled:
                raise
            failed = True
        if self.dist.enabled and any_rank(failed, self.dist):
            pred = None
            # the ranks whose forward pass succeeded expect its backward: reset DDP's reducer
            # on every rank ("forward can run despite previous backward not succeeding")
            reducer = getattr(self.model, "reducer", None)
            if reducer is not None and hasattr(reducer, "_reset_state"):
                reducer._reset_state()
            raise _AgreedOOM(f"out of memory in a forward pass on {'this' if failed else 'another'} rank")
        return pred

    def _loss(self, pred: torch.Tensor, yc: torch.Tensor, fam_idx: Optional[torch.Tensor]) -> torch.Tensor:
        """L1 (+ boundary term) plus the model's own auxiliary terms (``auxiliary_losses``:
        the family head's cross-entropy, the invertible UNet's latent penalty), weighted by
        ``family_loss_weight`` / ``latent_weight``."""
        loss = velocity_loss(pred, yc, self.cfg.boundary_weight)
        aux = getattr(self.raw, "auxiliary_losses", None)
        if aux is not None:
            for name, value in aux(fam_idx).items():
                loss = loss + self.aux_weights.get(name, 1.0) * value.float()
        return loss

    def _pde_weight(self) -> float:
        """``pde_weight``, ramped linearly over the first ``pde_ramp_steps`` steps."""
        ramp = self.cfg.pde_ramp_steps
        return self.cfg.pde_weight * (min(1.0, (self.step + 1) / ramp) if ramp else 1.0)

    def pde_term(self, pred: torch.Tensor, observed: torch.Tensor,
                 flipped: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The PDE-consistency term of a batch: the normalised misfit between the observed
        gathers and the exact simulation of the predicted maps (``physics.pde_loss``), on
        the first ``pde_samples`` samples, the shots ``pde_shots`` and the first ``pde_time``
        time samples; float32 physics outside autocast, differentiable through the
        simulator's adjoint.

        Args:
            pred: (B, 1, H, W) normalised predictions (of possibly flipped inputs).
            observed: (B, S, T, R) normalised gathers *before* augmentation.
            flipped: (B,) bool, the samples whose input was flipped: their predictions are
                flipped back, so they are compared with the unflipped gathers (the flip
                itself is only approximately physical).
        """
        from fwi_core.data import denormalize_seismic
        from fwi_core.physics.pde_loss import pde_loss

        cfg = self.cfg
        k = cfg.pde_samples or pred.shape[0]
        p = pred[:k].float()
        if flipped is not None and bool(flipped[:k].any()):
            f = flipped[:k].view(-1, 1, 1, 1)
            p = torch.where(f, torch.flip(p, (-1,)), p)
        v = denormalize_velocity(p.clamp(-1.0, 1.0))
        obs = denormalize_seismic(observed[:k].float())
        with torch.autocast(self.device.type, enabled=False):
            return pde_loss(v, obs, shots=list(cfg.pde_shots) or None, max_time=cfg.pde_time or None,
                            **cfg.pde_simulate_kwargs).float()

    def _forward_backward(self, x: torch.Tensor, y: torch.Tensor,
                          fam_idx: Optional[torch.Tensor] = None,
                          pde: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
        n = x.shape[0]
        obs = pde["observed"] if pde else None
        flipped = pde["flipped"] if pde else None
        chunks = [t.tensor_split(self.accum) if t is not None else [None] * self.accum
                  for t in (x, y, fam_idx, obs, flipped)] if self.accum > 1 else [[x], [y], [fam_idx], [obs], [flipped]]
        parts = list(zip(*chunks))
        total = torch.zeros((), device=x.device)
        for i, (xc, yc, fc, oc, flc) in enumerate(parts):
            last = i == len(parts) - 1
            sync = self.model.no_sync() if (self.dist.enabled and not last) else contextlib.nullcontext()
            with sync:
                pred = self._forward(xc, fc)
                loss = self._loss(pred, yc, fc)
                if oc is not None:
                    loss = loss + self._pde_weight() * self.pde_term(pred, oc, flc)
                loss = loss * (xc.shape[0] / n)
                self.scaler.scale(loss).backward()
            total += loss.detach()
        if self.cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.raw.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.raw)
        return total

    def _train_batch(self, x: torch.Tensor, y: torch.Tensor, fam_idx: Optional[torch.Tensor] = None,
                     pde: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
        """One optimizer step; on out-of-memory, halve the micro-batch (doubling the
        accumulation, so the effective batch is unchanged) and retry. Under DDP this
        works for a forward pass that runs out of memory on any rank (the ranks agree);
        running out of memory in the backward pass under DDP raises a TrainError that
        says what to set."""
        while True:
            try:
                return self._forward_backward(x, y, fam_idx, pde)
            except (_OOM, _AgreedOOM) as exc:
                agreed = isinstance(exc, _AgreedOOM)
                message = str(exc).splitlines()[0] if str(exc) else "out of memory"
            # outside the except block, so the traceback (and the activations it holds) is freed
            self.optimizer.zero_grad(set_to_none=True)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            micro = -(-x.shape[0] // self.accum)
            if self.dist.enabled and not agreed:
                raise TrainError(
                    f"{message} in the backward pass under DDP (micro-batch {micro}, rank {self.dist.rank}): "
                    f"restart with grad_accum={2 * self.accum} (--grad-accum {2 * self.accum}) or a smaller "
                    "batch_size, and --resume to go on from the last checkpoint")
            if micro <= 1:
                raise TrainError(f"{message} with a micro-batch of 1: use a smaller model, "
                                 "amp=bf16/fp16, or a larger GPU")
            self.accum *= 2
            new_micro = -(-x.shape[0] // self.accum)
            self.oom_events.append({"kind": "train", "step": self.step, "micro_batch": new_micro,
                                    "accum": self.accum})
            log.warning("out of memory at step %d: micro-batch %d -> %d, accumulating %d micro-batches "
                        "per step (same effective batch)", self.step, micro, new_micro, self.accum)

    # ------------------------------------------------------------------ validation
    def _val_loader(self) -> DataLoader:
        positions = list(range(self.dist.rank, len(self.val_ds), self.dist.world_size))
        return DataLoader(_Indexed(self.val_ds), batch_size=self.eval_batch, sampler=positions,
                          num_workers=self.cfg.num_workers, pin_memory=self.device.type == "cuda",
                          generator=torch.Generator().manual_seed(self.cfg.seed),
                          worker_init_fn=_worker_init)

    def _predict(self, sources: Dict[str, torch.nn.Module], keep: Optional[str] = None):
        """Per-sample MAE (m/s) of every source on the validation set, gathered over ranks
        in dataset order; with ``keep``, also that source's predictions and the targets.
        On out-of-memory the evaluation batch is halved and the pass repeated."""
        while True:
            try:
                local = self._predict_local(sources, keep)
                break
            except _OOM:
                pass
            if self.device.type == "cuda":   # outside the except block: the traceback is freed
                torch.cuda.empty_cache()
            if self.eval_batch <= 1:
                raise TrainError("out of memory while validating with batch 1")
            self.eval_batch //= 2
            self.oom_events.append({"kind": "eval", "step": self.step, "micro_batch": self.eval_batch})
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
            for idx, x, y, _ in self._val_loader():
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
            self.raw.train()
        return pos, maes, preds, targets

    def _monitor_value(self, metrics: Dict[str, Any]) -> float:
        """The monitored metric as a quantity to minimise (scores that grow, boundary IoU
        and SSIM, are negated)."""
        value = float(metrics[self.cfg.monitor])
        return -value if self.cfg.monitor in MAXIMISED else value

    def _sources(self) -> Dict[str, torch.nn.Module]:
        return {"raw": self.raw, **({"ema": self.ema.module} if self.ema is not None else {})}

    def _evaluate(self, partial: bool) -> Optional[Dict[str, Any]]:
        """Validate, log a history row, track the best; returns the metrics (None without
        a validation set). ``partial`` evaluations (mid-epoch stops) do not count toward
        early stopping, and the epoch's running train loss carries on past them."""
        train_loss = float(mean_over_ranks(self.loss_sum / max(1, self.loss_count), self.dist))
        if not partial:
            self.loss_sum.zero_()
            self.loss_count = 0
        row = {"epoch": round(self.epoch + self.batch / self.steps_per_epoch, 4), "step": self.step,
               "lr": float(self.scheduler.get_last_lr()[0]), "train_loss": train_loss}
        improved = self.val_ds is None   # without validation the latest weights count as best
        metrics = None
        if self.val_ds is not None:
            start = time.perf_counter()
            values, _, _ = self._predict(self._sources())
            self.val_time = time.perf_counter() - start
            maes = {k: v for k, v in values.items() if k in self._sources()}
            scores = {name: {src: values[f"{short}_{src}"] for src in maes}
                      for name, short in (("boundary_iou", "biou"), ("ssim", "ssim"))}
            metrics = summarize(self.val_families, maes, scores)
            metrics.update(epoch=row["epoch"], step=self.step)
            self.last_metrics = metrics
            value = self._monitor_value(metrics)
            improved = value < self.best_value - self.cfg.min_delta
            if improved:
                self.best_value, self.best_step, self.best_metrics = value, self.step, metrics
                if not partial:
                    self.bad_evals = 0
            elif not partial:
                self.bad_evals += 1
            for fam, e in metrics["per_family"].items():
                if fam not in self.family_best or e["best"] < self.family_best[fam]["mae"]:
                    self.family_best[fam] = {"mae": e["best"], "source": e["source"],
                                             "epoch": row["epoch"], "step": self.step}
            row.update(val_mae=metrics["mae"], family_mae=metrics["family_mae"])
            for src in maes:
                row[f"val_mae_{src}"] = metrics[f"mae_{src}"]
                row[f"val_biou_{src}"] = metrics[f"boundary_iou_{src}"]
                row[f"val_ssim_{src}"] = metrics[f"ssim_{src}"]
                for fam, e in metrics["per_family"].items():
                    row[f"mae_{src}/{fam}"] = e[src]
                    row[f"biou_{src}/{fam}"] = e[f"boundary_iou_{src}"]
                    row[f"ssim_{src}/{fam}"] = e[f"ssim_{src}"]
        row.update(time=round(self.wall_time, 2), partial=int(partial))
        self.history.append(row)
        self._improved = improved
        return metrics

    # ------------------------------------------------------------------ the loop
    def _train_loader(self, epoch: int, start_batch: int) -> DataLoader:
        if hasattr(self.train_ds, "set_epoch"):   # simulated data: a fresh block every epoch
            self.train_ds.set_epoch(epoch)
        self.sampler.set_epoch(epoch)
        self.sampler.start = start_batch * self.per_rank
        return DataLoader(self.train_ds, batch_size=self.per_rank, sampler=self.sampler, drop_last=True,
                          num_workers=self.cfg.num_workers, pin_memory=self.device.type == "cuda",
                          generator=torch.Generator().manual_seed(_mix(self.cfg.seed, epoch, 1)),
                          worker_init_fn=_worker_init)

    def _reserve(self) -> float:
        """Seconds kept for one more step and the closing work: a validation of every
        weight source, the out-of-fold pass with one source, two checkpoint writes, the
        curves."""
        n_sources = 2 if self.ema is not None else 1
        if self.val_ds is None:
            per_source = 0.0
        elif self.val_time is not None:
            per_source = self.val_time / n_sources
        else:   # a forward pass costs about 1/3 of a training step
            n_batches = -(-len(self.val_ds) // (self.dist.world_size * self.eval_batch))
            per_source = n_batches * self.step_time * 0.4 * self.eval_batch / self.per_rank
        save = self.save_time if self.save_time is not None else 0.5
        return self.step_time + per_source * (n_sources + 1) + 2 * save + CLOSE_RESERVE

    def _out_of_time(self) -> bool:
        """Would one more step, then the closing work, overrun the budget?"""
        if self.budget is None:
            return False
        elapsed = time.perf_counter() - self.t0
        return any_rank(elapsed + self._reserve() > self.budget, self.dist)

    def _update_progress(self) -> None:
        """Time mode: the schedule's progress = elapsed / (budget - closing reserve),
        going on from where a resumed run stopped; never moves backwards. The same value
        on every rank (rank 0's)."""
        elapsed = time.perf_counter() - self.t0
        horizon = max(1e-6, self.budget - self._reserve())
        p = self.progress0 + (1.0 - self.progress0) * elapsed / horizon
        if self.dist.enabled:
            t = torch.tensor([p], dtype=torch.float64,
                             device=self.device if torch.distributed.get_backend() == "nccl" else "cpu")
            torch.distributed.broadcast(t, 0)
            p = float(t.item())
        self.schedule.progress = min(1.0, max(self.schedule.progress, p))
        for g, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            g["lr"] = base * self.schedule(self.step)

    def _restart_snapshot(self) -> None:
        """cosine_restarts in time mode: when the next step starts a new cycle, save the
        weights that ended the previous one (trained at its learning-rate minimum)."""
        k = self.schedule.cycle_index(self.step)
        if k > self.cycle:
            self._save(snapshot=self.cycle + 1)
            self.cycle = k

    def _postfix(self, bar) -> None:
        loss = float(self.loss_sum / max(1, self.loss_count))
        if not math.isfinite(loss):
            raise TrainError(f"the training loss is {loss} at step {self.step}: lower lr, keep grad_clip "
                             "on, or use amp=bf16 instead of fp16")
        info = {"loss": f"{loss:.4f}", "lr": f"{self.scheduler.get_last_lr()[0]:.2e}", "ep": self.epoch}
        if self.budget is not None:
            left = max(0.0, self.budget - (time.perf_counter() - self.t0))
            info["budget_left"] = time.strftime("%H:%M:%S", time.gmtime(left))
        bar.set_postfix(info, refresh=False)

    def fit(self) -> Dict[str, Any]:
        cfg = self.cfg
        restarts = cfg.schedule == "cosine_restarts"
        bar = progress_bar(total=self.total_steps or None, initial=self.step,
                           desc=f"{cfg.model} fold {cfg.fold}", unit="step", disable=not self.dist.is_main)
        reason = None
        self.raw.train()
        try:
            while (self.time_mode or self.epoch < cfg.epochs) and reason is None:
                for x, y, *rest in self._train_loader(self.epoch, self.batch):
                    if self._out_of_time():
                        reason = "time_budget"
                        break
                    if self.time_mode:
                        self._update_progress()
                        if restarts:
                            self._restart_snapshot()
                    start = time.perf_counter()
                    x = x.to(self.device, non_blocking=True)
                    y = y.to(self.device, non_blocking=True)
                    fam_idx = self._family_index(rest[0]) if rest else None
                    observed = x if cfg.pde_weight > 0 else None   # the gathers before augmentation
                    self._flipped = None
                    if cfg.flip_prob > 0:
                        x, y = self._flip(x, y, self.epoch, self.batch)
                    if cfg.scale_prob > 0 or cfg.noise_prob > 0:
                        x = self._augment(x, self.epoch, self.batch)
                    pde = None
                    if observed is not None and self.step % cfg.pde_every == 0:
                        flipped = self._flipped if self._flipped is not None else \
                            torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
                        pde = {"observed": observed, "flipped": flipped}
                    self.loss_sum += self._train_batch(x, y, fam_idx, pde)
                    self.loss_count += 1
                    self.step += 1
                    self.batch += 1
                    bar.update(1)
                    if self.step % cfg.log_every == 0:
                        self._postfix(bar)
                    dt = time.perf_counter() - start
                    self.step_time = dt if self.step_time == 0 else 0.8 * self.step_time + 0.2 * dt
                    if self.batch == self.steps_per_epoch:
                        break
                    if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                        self._save()
                    if cfg.max_steps and self.step >= cfg.max_steps:
                        reason = "max_steps"
                        break
                if reason is not None:
                    break
                # end of an epoch
                self.epoch, self.batch = self.epoch + 1, 0
                self._evaluate(partial=False)
                snapshot = None
                if restarts and not self.time_mode and self.epoch % cfg.restart_epochs == 0:
                    snapshot = self.epoch // cfg.restart_epochs   # the cycle ended on this step
                    self.cycle = snapshot
                if cfg.patience and self.val_ds is not None and self.bad_evals >= cfg.patience:
                    reason = "early_stopping"
                elif cfg.max_steps and self.step >= cfg.max_steps:
                    reason = "max_steps"
                elif not self.time_mode and self.epoch >= cfg.epochs:
                    reason = "completed"
                if reason is None and self._out_of_time():
                    reason = "time_budget"
                if self.time_mode and restarts and reason == "time_budget":
                    snapshot = self.cycle + 1   # the budget's end closes the last cycle
                self.stopped_reason = reason
                self._save(best=self._improved, snapshot=snapshot)
                if self.dist.is_main:
                    self.csv.write(self.history)
            reason = reason or "completed"
            self.stopped_reason = reason
            if self.batch:     # stopped mid-epoch: evaluate what we have, checkpoint resumably
                self._evaluate(partial=True)
                snapshot = self.cycle + 1 if (self.time_mode and restarts and reason == "time_budget") else None
                self._save(best=self._improved, snapshot=snapshot)
                if self.dist.is_main:
                    self.csv.write(self.history)
        finally:
            bar.close()
        return self._finish(reason)

    def _finish(self, reason: str) -> Dict[str, Any]:
        """Final checkpoint bookkeeping, curves, out-of-fold predictions; the result."""
        if self.ckpts.latest() is None:   # stopped before the first step: save the start
            self._save(best=self.val_ds is None)
        last = self.ckpts.latest()
        if self.dist.is_main:
            self.csv.write(self.history)     # complete even if a kill came between a checkpoint and its row
            save_curves(self.history, self.out / "curves.png")
        oof_path = None
        if self.val_ds is not None and self.ckpts.best_path.is_file():
            oof_path = self._write_oof()
        barrier(self.dist)
        best = self.best_metrics or {}
        return {
            "best_checkpoint": str(self.ckpts.best_path if self.ckpts.best_path.is_file() else last),
            "last_checkpoint": str(last),
            "history": self.history, "best_val_mae": float(best.get("mae", math.nan)),
            "val_mae_per_family": {f: e["best"] for f, e in best.get("per_family", {}).items()},
            "best_source": best.get("source"), "oof_path": str(oof_path) if oof_path else None,
            "stopped_reason": reason, "out_dir": str(self.out), "step": self.step, "epoch": self.epoch,
            "wall_time": self.wall_time, "platform": self.platform.name, "amp": self.amp,
            "oom_events": self.oom_events, "time_budget": self.budget,
        }

    def _write_oof(self) -> Path:
        """Predict the validation set with the best weights (the better source) and save
        ``oof_fold<k>.npz``: indices, pred and target (m/s, (N, 70, 70)), family, mae."""
        ckpt = load_checkpoint(self.ckpts.best_path, map_location="cpu")
        source = (ckpt["metadata"].get("metrics") or {}).get("source") or "raw"
        from fwi_core.models import create_model
        model = create_model(self.model_name, **self.model_kwargs).to(self.device)
        model.load_state_dict(ckpt["ema"] if source == "ema" else ckpt["model"])
        values, pred, target = self._predict({source: model}, keep=source)
        maes = {source: values[source]}
        path = self.out / f"oof_fold{self.cfg.fold}.npz"
        if self.dist.is_main:
            with atomic_path(path, suffix=".npz") as tmp:
                with open(tmp, "wb") as f:
                    np.savez(f, indices=self.val_ids, pred=pred, target=target,
                             family=np.asarray(self.val_families, dtype=str), mae=maes[source],
                             fold=np.int64(self.cfg.fold), source=np.asarray(source))
        return path

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
