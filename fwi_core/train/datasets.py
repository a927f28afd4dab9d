"""The data of a training run: train/validation datasets, family folds, family balancing,
simulated-data mixing (``sim_fraction``), and the loaders the loop and validation read.

Exact resume: the epoch order is a function of (seed, epoch) (:class:`EpochSampler`) and
the DataLoaders get their own generators (so they do not consume the global RNG).
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ..data import FWIDataset, family_kfold, find_competition_root, index_train
from ..errors import ConfigError, FWIError
from ..physics.simulated import mix_datasets
from ..platform import Platform
from .config import TrainConfig
from .distributed import DistInfo, EpochSampler

log = logging.getLogger("fwi_core.train")


# --------------------------------------------------------------------------- seeds
def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (for per-batch generators)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h >> 1


def _worker_init(worker_id: int) -> None:
    seed = torch.initial_seed() % 2 ** 32
    np.random.seed(seed)
    random.seed(seed)


# --------------------------------------------------------------------------- items
class _Indexed(Dataset):
    """Items of ``ds`` prefixed with their position (to gather validation across ranks)."""

    def __init__(self, ds: Dataset):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        item = self.ds[i]
        return (i, item[0], item[1], item[2] if len(item) > 2 else "all")


def families_of(ds: Dataset) -> List[str]:
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


class Joined(Dataset):
    """Datasets one after the other, keeping ``families()`` (for family balancing) and
    ``raw()`` when every part has it."""

    def __init__(self, parts: Sequence[Dataset]):
        self.parts = list(parts)
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _locate(self, i: int):
        k = int(np.searchsorted(self.offsets, int(i), side="right") - 1)
        return self.parts[k], int(i) - int(self.offsets[k])

    def __getitem__(self, i):
        ds, j = self._locate(i)
        return ds[j]

    def raw(self, i):
        ds, j = self._locate(i)
        return ds.raw(j)

    def families(self) -> List[str]:
        return [f for p in self.parts for f in families_of(p)]


def _pseudo_labels(folder: str) -> FWIDataset:
    """The samples of a pseudo-label folder (every family under its ``train_samples/``)."""
    root = Path(folder)
    if not (root / "train_samples").is_dir():
        raise ConfigError(f"pseudo={folder}: no train_samples/ folder there; give the --out folder of "
                          "python -m tools.pseudo_label (it holds train_samples/Pseudo/)")
    try:
        ds = FWIDataset(index_train(root))
    except FWIError as exc:
        raise ConfigError(f"pseudo={folder}: {exc}") from exc
    if len(ds) == 0:
        raise ConfigError(f"pseudo={folder}: the folder holds no samples")
    return ds


# --------------------------------------------------------------------------- the run's data
def per_rank_batch(cfg: TrainConfig, dist: DistInfo) -> int:
    """Each process's share of the global ``batch_size``."""
    if cfg.batch_size % dist.world_size:
        raise ConfigError(f"batch_size={cfg.batch_size} (the global batch) must be divisible by "
                          f"the {dist.world_size} processes")
    per_rank = cfg.batch_size // dist.world_size
    if cfg.grad_accum > per_rank:
        raise ConfigError(f"grad_accum={cfg.grad_accum} exceeds the per-process batch {per_rank}")
    return per_rank


def fold_datasets(cfg: TrainConfig, platform: Platform,
           datasets: Optional[Tuple[Dataset, Optional[Dataset]]] = None) -> Tuple[Dataset, Optional[Dataset]]:
    """The given ``(train, val)`` pair, or ``cfg.data`` indexed and split by family folds."""
    if datasets is not None:
        if not isinstance(datasets, (tuple, list)) or len(datasets) != 2:
            raise ConfigError("datasets must be a pair (train_dataset, val_dataset or None)")
        return datasets[0], datasets[1]
    root = cfg.data or platform.data_dir
    if not root:
        raise ConfigError("no training data: pass data=DIR (--data DIR), the competition root "
                          "holding train_samples/, or set FWI_DATA")
    if not Path(root).exists():
        raise ConfigError(f"data path {root} does not exist")
    full = FWIDataset(index_train(find_competition_root(root)))
    if cfg.folds >= 2:
        tr, va = family_kfold(full.families(), cfg.folds, cfg.seed)[cfg.fold]
        return full.subset(tr), full.subset(va)
    return full, None


@dataclass
class TrainData:
    """The datasets of one fold and how the loop and validation read them."""

    cfg: TrainConfig
    dist: DistInfo
    train_ds: Dataset
    val_ds: Optional[Dataset]
    per_rank: int
    sampler: EpochSampler
    steps_per_epoch: int
    val_families: Sequence[str] = ()
    val_ids: Optional[np.ndarray] = None

    @classmethod
    def load(cls, cfg: TrainConfig, platform: Platform, dist: DistInfo, per_rank: int,
             datasets: Optional[Tuple[Dataset, Optional[Dataset]]] = None) -> "TrainData":
        """Build the training set (limited, mixed with simulated samples) and the
        validation set (limited; None when empty), the epoch sampler (family-balanced
        with ``balance_families``)."""
        train_ds, val_ds = fold_datasets(cfg, platform, datasets)
        if len(train_ds) == 0:
            raise ConfigError("the training set is empty")
        train_ds = _limit(train_ds, cfg.max_train_samples, cfg.seed)
        if cfg.pseudo:
            pseudo = _pseudo_labels(cfg.pseudo)
            train_ds = Joined([train_ds, pseudo])
            log.info("training on %d real + %d pseudo-labelled samples (%s)", len(train_ds) - len(pseudo),
                     len(pseudo), cfg.pseudo)
        if cfg.sim_fraction > 0:
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
        fams = families_of(train_ds) if cfg.balance_families else None
        sampler = EpochSampler(train_ds, dist.world_size, dist.rank, cfg.seed, fams)
        steps = sampler.num_samples // per_rank
        if steps < 1:
            raise ConfigError(f"batch_size={cfg.batch_size} exceeds the {len(train_ds)} training "
                              "samples: lower batch_size")
        data = cls(cfg, dist, train_ds, val_ds, per_rank, sampler, steps)
        if val_ds is not None:
            data.val_families, data.val_ids = families_of(val_ds), _sample_ids(val_ds)
        return data

    def train_loader(self, epoch: int, start_batch: int) -> DataLoader:
        """The batches of ``epoch`` from ``start_batch`` on (this rank's share)."""
        if hasattr(self.train_ds, "set_epoch"):   # simulated data: a fresh block every epoch
            self._simulate_block(epoch)
        self.sampler.set_epoch(epoch)
        self.sampler.start = start_batch * self.per_rank
        return DataLoader(self.train_ds, batch_size=self.per_rank, sampler=self.sampler, drop_last=True,
                          num_workers=self.cfg.num_workers, pin_memory=self.dist.device.type == "cuda",
                          generator=torch.Generator().manual_seed(mix_seed(self.cfg.seed, epoch, 1)),
                          worker_init_fn=_worker_init)

    def _simulate_block(self, epoch: int) -> None:
        """``set_epoch``: make (or load) the epoch's simulated block, with a log line
        before (it can take minutes) and after (how long it took)."""
        sim = getattr(self.train_ds, "simulated", None)
        fresh = sim is not None and getattr(self.train_ds, "n_sim", 0) and getattr(sim, "epoch", None) != epoch
        if fresh and self.dist.is_main:
            last = getattr(sim, "last_block", None) or {}
            eta = f", about {self.train_ds.n_sim / last['samples_per_s']:.0f} s at the last block's rate" \
                if last.get("samples_per_s") and not last.get("from_cache") else ""
            log.info("epoch %d: simulating %d fresh samples on %s (blocks of %d)%s ...", epoch, self.train_ds.n_sim,
                     getattr(sim, "device", "?"), getattr(sim, "sim_batch", 0), eta)
        self.train_ds.set_epoch(epoch)
        if fresh and self.dist.is_main:
            last = getattr(sim, "last_block", None) or {}
            if last:
                log.info("epoch %d: %d simulated samples %s in %.1f s (%.1f samples/s)", epoch, last["samples"],
                         "read from the cache" if last.get("from_cache") else "made", last["seconds"],
                         last["samples_per_s"])

    def val_loader(self, batch_size: int) -> DataLoader:
        """This rank's share of the validation set, as (position, x, y, family)."""
        positions = list(range(self.dist.rank, len(self.val_ds), self.dist.world_size))
        return DataLoader(_Indexed(self.val_ds), batch_size=batch_size, sampler=positions,
                          num_workers=self.cfg.num_workers, pin_memory=self.dist.device.type == "cuda",
                          generator=torch.Generator().manual_seed(self.cfg.seed),
                          worker_init_fn=_worker_init)
