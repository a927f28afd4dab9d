"""Simulated training data at scale: fresh maps every epoch, simulated in batches.

:class:`SimulatedDataset` is a map-style torch dataset of ``samples_per_epoch`` items
that change every epoch. ``set_epoch(epoch)`` draws the epoch's velocity maps from the
family generators (:mod:`.families`), applies physical map augmentations
(:mod:`.map_augment`), and simulates them with the exact forward model
(:func:`~fwi_core.physics.simulate`, no gradients) in batches on ``device``. The whole
epoch's block is made at once, with a progress bar, and held in RAM (seismic as float16
by default), or, with ``cache_dir``, in memory-mapped ``.npy`` files that a later run
asking for the same (seed, epoch, configuration) reads instead of simulating again.

Items are ``(normalize_seismic(seismic), normalize_velocity(velocity), family)`` like
:class:`fwi_core.data.FWIDataset`: float32 tensors (5, nt, 70) and (1, 70, 70) and the
family name. :class:`MixedDataset` / :func:`mix_datasets` combine real and simulated
items at a set fraction.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from ..data.normalize import normalize_seismic, normalize_velocity
from ..utils import atomic_path, atomic_write_text, progress_bar
from .families import FAMILIES, SIZE, VEL_HI, VEL_LO, generate_one
from .forward import simulate
from .map_augment import DEFAULT_AUGMENT, augment_map, validate_augment

log = logging.getLogger(__name__)

#: bump when the recipe of a block changes (maps, augmentations, simulation): old caches
#: then no longer match
RECIPE_VERSION = 1
_SALT = 0x51D0A7A  # separates this module's random streams from other users of the seed
_N_SHOTS = 5
_N_REC = SIZE


def _family_weights(families: Optional[Sequence[str]],
                    weights: Optional[Union[Sequence[float], Mapping[str, float]]]) -> Tuple[List[str], np.ndarray]:
    fams = list(FAMILIES if families is None else families)
    if not fams:
        raise ValueError("SimulatedDataset: families is empty")
    unknown = [f for f in fams if f not in FAMILIES]
    if unknown:
        raise ValueError(f"SimulatedDataset: unknown families {unknown}; expected some of {', '.join(FAMILIES)}")
    if len(set(fams)) != len(fams):
        raise ValueError(f"SimulatedDataset: families {fams} has repeats")
    if weights is None:
        w = np.ones(len(fams))
    elif isinstance(weights, Mapping):
        extra = sorted(set(weights) - set(fams))
        if extra:
            raise ValueError(f"SimulatedDataset: weights name families {extra} that are not in families={fams}")
        w = np.array([float(weights.get(f, 0.0)) for f in fams])
    else:
        w = np.asarray(list(weights), dtype=np.float64)
        if w.shape != (len(fams),):
            raise ValueError(f"SimulatedDataset: {len(w)} weights for {len(fams)} families {fams}")
    if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"SimulatedDataset: weights must be finite, >= 0 and not all 0, got {w.tolist()}")
    return fams, w / w.sum()


def family_layout(n: int, families: Sequence[str], weights: np.ndarray, seed: int) -> List[str]:
    """The family of each of ``n`` positions: counts proportional to ``weights`` (largest
    remainders), positions shuffled by ``seed``; the same for every epoch."""
    raw = weights * n
    counts = np.floor(raw).astype(np.int64)
    rest = n - int(counts.sum())
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[:rest]] += 1
    out = np.repeat(np.arange(len(families)), counts)
    np.random.default_rng([_SALT, int(seed), 1]).shuffle(out)
    return [families[i] for i in out]


class SimulatedDataset(Dataset):
    """Freshly simulated (seismic, velocity, family) samples, a new block every epoch.

    Args:
        samples_per_epoch: items per epoch.
        seed: the random seed; (seed, epoch) determine every map.
        families: the families to draw from (default: all 10).
        weights: relative frequency of each family (a list parallel to ``families`` or a
            ``{family: weight}`` dict; default equal). Family counts are proportional to
            the weights (largest remainders) and the family of each position is the same
            every epoch (so family-balanced samplers can be built once); its map is new.
        augment: per-map probabilities of the map augmentations, keys ``"crop"``,
            ``"warp"``, ``"blend"`` (default :data:`~fwi_core.physics.map_augment.DEFAULT_AUGMENT`
            = ``{"crop": 0.3, "warp": 0.3, "blend": 0.2}``; ``{}`` for none). A blend's
            second map comes from a family drawn by ``weights``; the item keeps the first
            map's family, as do crops and warps.
        nt: time samples per trace (default 1000, the competition's); items are then
            (5, nt, 70). Short ``nt`` is for tests and quick experiments.
        device: where to simulate (default: CUDA when available, else CPU).
        batch_chunk: maps propagated together inside :func:`simulate` (its default).
        sim_batch: maps per :func:`simulate` call (default 256 on CUDA, 8 on CPU).
        dtype: storage dtype of the seismic, ``"float16"`` (default) or ``"float32"``;
            velocities are stored as float32, so the seismic is the simulation of the
            exact map an item returns (to the storage's rounding).
        cache_dir: keep each epoch's block in ``simdata-<key>-epoch<NNNNN>.{seis,vel}.npy``
            + ``.json`` there (memory-mapped; written atomically, the ``.json`` last), and
            read it back instead of simulating when the same block is asked for again.
            ``<key>`` hashes every option that changes the data (seed, samples_per_epoch,
            families, weights, augment, nt, dtype, recipe version), not where it was simulated.
        normalize: return OpenFWI-normalised tensors (like FWIDataset); else raw m/s and seismic.
        backend: the simulator backend (see :func:`simulate`).
        progress: show a progress bar while a block is simulated.

    ``set_epoch(epoch)`` makes (or loads) the block of ``epoch``; an item asked for before
    any ``set_epoch`` makes epoch 0's.
    """

    def __init__(self, samples_per_epoch: int, *, seed: int = 0, families: Optional[Sequence[str]] = None,
                 weights: Optional[Union[Sequence[float], Mapping[str, float]]] = None,
                 augment: Optional[Mapping[str, float]] = None, nt: int = 1000,
                 device: Optional[Union[str, torch.device]] = None, batch_chunk: Optional[int] = None,
                 sim_batch: Optional[int] = None, dtype: str = "float16",
                 cache_dir: Optional[Union[str, os.PathLike]] = None, normalize: bool = True,
                 backend: str = "auto", progress: bool = True):
        if int(samples_per_epoch) < 1:
            raise ValueError(f"SimulatedDataset: samples_per_epoch must be >= 1, got {samples_per_epoch}")
        if int(nt) < 1:
            raise ValueError(f"SimulatedDataset: nt must be >= 1, got {nt}")
        if str(np.dtype(dtype)) not in ("float16", "float32"):
            raise ValueError(f"SimulatedDataset: dtype must be 'float16' or 'float32', got {dtype!r}")
        if sim_batch is not None and int(sim_batch) < 1:
            raise ValueError(f"SimulatedDataset: sim_batch must be >= 1, got {sim_batch}")
        self.n = int(samples_per_epoch)
        self.seed = int(seed)
        self.family_names, self.weights = _family_weights(families, weights)
        self.augment = validate_augment(DEFAULT_AUGMENT if augment is None else augment)
        self.nt = int(nt)
        self.device = torch.device(device) if device is not None else \
            torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.batch_chunk = batch_chunk
        self.sim_batch = int(sim_batch) if sim_batch is not None else (256 if self.device.type == "cuda" else 8)
        self.dtype = np.dtype(dtype)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.normalize = normalize
        self.backend = backend
        self.progress = progress
        self._families = family_layout(self.n, self.family_names, self.weights, self.seed)
        self.epoch: Optional[int] = None
        self._seis: Optional[np.ndarray] = None
        self._vel: Optional[np.ndarray] = None
        self._applied: List[List[str]] = []
        #: figures of the last block made or loaded: epoch, samples, seconds, samples_per_s, from_cache
        self.last_block: Dict[str, Any] = {}

    # -- configuration ---------------------------------------------------------------
    def config(self) -> Dict[str, Any]:
        """Everything that determines the data (the cache key hashes it)."""
        return {"version": RECIPE_VERSION, "seed": self.seed, "samples_per_epoch": self.n,
                "families": self.family_names, "weights": [round(float(w), 12) for w in self.weights],
                "augment": dict(sorted(self.augment.items())), "nt": self.nt, "dtype": str(self.dtype)}

    @property
    def key(self) -> str:
        """A 16-hex-digit content key of :meth:`config`."""
        text = json.dumps(self.config(), sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:16]

    def cache_files(self, epoch: int) -> Tuple[Path, Path, Path]:
        """(seismic .npy, velocity .npy, metadata .json) of ``epoch``'s block in ``cache_dir``."""
        if self.cache_dir is None:
            raise ValueError("SimulatedDataset.cache_files: no cache_dir was given")
        stem = self.cache_dir / f"simdata-{self.key}-epoch{int(epoch):05d}"
        return Path(f"{stem}.seis.npy"), Path(f"{stem}.vel.npy"), Path(f"{stem}.json")

    # -- maps ------------------------------------------------------------------------------
    def _rng(self, epoch: int, i: int) -> np.random.Generator:
        return np.random.default_rng([_SALT, self.seed, int(epoch), int(i)])

    def _partner(self, rng: np.random.Generator) -> np.ndarray:
        fam = self.family_names[int(rng.choice(len(self.family_names), p=self.weights))]
        return np.clip(generate_one(fam, rng), VEL_LO, VEL_HI).astype(np.float32)

    def make_map(self, epoch: int, i: int) -> Tuple[np.ndarray, List[str]]:
        """The velocity map of item ``i`` in ``epoch``: float32 (1, 70, 70) m/s, and the
        augmentations applied to it (a function of (seed, epoch, i) and the options)."""
        if not 0 <= i < self.n:
            raise IndexError(f"SimulatedDataset: item {i} out of range 0..{self.n - 1}")
        rng = self._rng(epoch, i)
        m = np.clip(generate_one(self._families[i], rng), VEL_LO, VEL_HI).astype(np.float32)[None]
        if self.augment:
            m, applied = augment_map(m, rng, self.augment, partner=self._partner)
            return m, applied
        return m, []

    # -- blocks ----------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Make the block of ``epoch`` (or load it from ``cache_dir``); the items then
        come from it. Asking for the current epoch again does nothing."""
        epoch = int(epoch)
        if epoch < 0:
            raise ValueError(f"SimulatedDataset.set_epoch: epoch must be >= 0, got {epoch}")
        if epoch == self.epoch and self._seis is not None:
            return
        self._seis = self._vel = None     # free the previous block first
        t0 = time.perf_counter()
        from_cache = self.cache_dir is not None and self._load(epoch)
        if not from_cache:
            if self.cache_dir is not None:
                self._generate_to_cache(epoch)
                if not self._load(epoch):
                    raise RuntimeError(f"SimulatedDataset: the block just written to {self.cache_dir} "
                                       "cannot be read back")
            else:
                seis = np.empty((self.n, _N_SHOTS, self.nt, _N_REC), self.dtype)
                vel = np.empty((self.n, 1, SIZE, SIZE), np.float32)
                self._applied = self._fill(epoch, seis, vel)
                self._seis, self._vel = seis, vel
        self.epoch = epoch
        dt = time.perf_counter() - t0
        self.last_block = {"epoch": epoch, "samples": self.n, "seconds": dt,
                           "samples_per_s": self.n / dt if dt > 0 else float("inf"), "from_cache": bool(from_cache)}

    def _fill(self, epoch: int, seis: np.ndarray, vel: np.ndarray) -> List[List[str]]:
        """Draw, augment and simulate every map of ``epoch`` into ``seis`` and ``vel``."""
        applied: List[List[str]] = []
        bar = progress_bar(total=self.n, desc=f"simulate epoch {epoch}", unit="sample",
                           disable=not self.progress or None)
        try:
            for s0 in range(0, self.n, self.sim_batch):
                s1 = min(self.n, s0 + self.sim_batch)
                maps = []
                for i in range(s0, s1):
                    m, a = self.make_map(epoch, i)
                    maps.append(m)
                    applied.append(a)
                block = np.stack(maps)
                seis[s0:s1] = self._simulate(block)
                vel[s0:s1] = block
                bar.update(s1 - s0)
        finally:
            bar.close()
        return applied

    def _simulate(self, block: np.ndarray) -> np.ndarray:
        """Simulate (n, 1, 70, 70) maps. With a compiling backend, a call whose size is not a
        multiple of the propagation chunk is padded with copies of its last map (results
        dropped), so every chunk has the same shape and ``torch.compile`` compiles once."""
        n = len(block)
        chunk = self.batch_chunk or (64 if self.device.type == "cuda" else 2)
        pad = (-n) % chunk if self.backend != "eager" else 0
        if pad:
            block = np.concatenate([block, np.repeat(block[-1:], pad, axis=0)])
        out = simulate(block, nt=self.nt, device=self.device, batch_chunk=self.batch_chunk, backend=self.backend)
        return out[:n]

    def _generate_to_cache(self, epoch: int) -> None:
        seis_p, vel_p, meta_p = self.cache_files(epoch)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with atomic_path(seis_p, suffix=".npy") as ts, atomic_path(vel_p, suffix=".npy") as tv:
            seis = np.lib.format.open_memmap(ts, mode="w+", dtype=self.dtype,
                                             shape=(self.n, _N_SHOTS, self.nt, _N_REC))
            vel = np.lib.format.open_memmap(tv, mode="w+", dtype=np.float32, shape=(self.n, 1, SIZE, SIZE))
            applied = self._fill(epoch, seis, vel)
            seis.flush()
            vel.flush()
            del seis, vel
        meta = {"key": self.key, "epoch": epoch, "config": self.config(), "applied": applied,
                "families": self._families, "seconds": round(time.perf_counter() - t0, 3),
                "device": str(self.device)}
        atomic_write_text(meta_p, json.dumps(meta) + "\n")

    def _load(self, epoch: int) -> bool:
        """Open ``epoch``'s cached block if it is complete and matches; False otherwise."""
        seis_p, vel_p, meta_p = self.cache_files(epoch)
        if not (seis_p.is_file() and vel_p.is_file() and meta_p.is_file()):
            return False
        try:
            meta = json.loads(meta_p.read_text())
            seis = np.load(seis_p, mmap_mode="r")
            vel = np.load(vel_p, mmap_mode="r")
        except (OSError, ValueError) as exc:
            log.warning("SimulatedDataset: ignoring unreadable cache %s (%s)", meta_p, exc)
            return False
        ok = (meta.get("key") == self.key and meta.get("config") == self.config()
              and seis.shape == (self.n, _N_SHOTS, self.nt, _N_REC) and seis.dtype == self.dtype
              and vel.shape == (self.n, 1, SIZE, SIZE) and len(meta.get("applied", [])) == self.n)
        if not ok:
            log.warning("SimulatedDataset: cache %s does not match this configuration; simulating again", meta_p)
            return False
        self._seis, self._vel, self._applied = seis, vel, [list(a) for a in meta["applied"]]
        return True

    def _ensure(self) -> None:
        if self._seis is None:
            self.set_epoch(0 if self.epoch is None else self.epoch)

    # -- dataset protocol ------------------------------------------------------------------
    def __len__(self) -> int:
        return self.n

    def families(self) -> List[str]:
        """The family of every item, in order (the same every epoch)."""
        return list(self._families)

    def applied(self, i: int) -> List[str]:
        """The augmentations applied to item ``i``'s map in the current epoch."""
        self._ensure()
        return list(self._applied[i])

    def raw(self, i: int) -> Tuple[np.ndarray, np.ndarray, str]:
        """Un-normalised item ``i``: float32 seismic (5, nt, 70), velocity (1, 70, 70) m/s, family."""
        if not -self.n <= i < self.n:
            raise IndexError(f"SimulatedDataset: item {i} out of range 0..{self.n - 1}")
        self._ensure()
        return (np.asarray(self._seis[i], dtype=np.float32), np.asarray(self._vel[i], dtype=np.float32),
                self._families[i])

    def __getitem__(self, i: int):
        x, y, fam = self.raw(int(i))
        if self.normalize:
            x, y = normalize_seismic(x), normalize_velocity(y)
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), \
            torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32)), fam

    def __getstate__(self):
        d = dict(self.__dict__)
        if self.cache_dir is not None:   # memory maps: each DataLoader worker reopens the files
            d["_seis"] = d["_vel"] = None
        return d


def _families_of(ds: Dataset) -> List[str]:
    if hasattr(ds, "families"):
        return [str(f) for f in ds.families()]
    base = getattr(ds, "dataset", None)
    if base is not None and hasattr(base, "families") and hasattr(ds, "indices"):
        fams = base.families()
        return [str(fams[i]) for i in ds.indices]
    return [str(ds[i][2]) for i in range(len(ds))]


class MixedDataset(Dataset):
    """Real items followed by simulated ones, ``sim_fraction`` of the total simulated.

    Items ``0 .. n_real-1`` are ``real``'s, the next ``n_sim`` are ``simulated``'s
    ``0 .. n_sim-1``, with ``n_sim = round(sim_fraction * n_real / (1 - sim_fraction))``,
    so the realised fraction ``n_sim / (n_real + n_sim)`` is ``sim_fraction`` to within
    half an item. The simulated items change every epoch (``set_epoch`` forwards to
    ``simulated``, and to ``real`` when it has ``set_epoch``). Family-balanced sampling
    resamples within each family, so the fraction then holds per family rather than overall.

    Args:
        real: a dataset of (seismic, velocity, family) items, e.g. an ``FWIDataset`` (subset).
        simulated: a :class:`SimulatedDataset` with at least ``n_sim`` items and the
            real data's ``nt``.
        sim_fraction: in [0, 1); None uses every simulated item.
    """

    def __init__(self, real: Dataset, simulated: SimulatedDataset, sim_fraction: Optional[float] = None):
        n_real = len(real)
        if sim_fraction is None:
            n_sim = len(simulated)
        else:
            f = float(sim_fraction)
            if not 0.0 <= f < 1.0:
                raise ValueError(f"MixedDataset: sim_fraction must be in [0, 1), got {sim_fraction}")
            n_sim = int(round(f * n_real / (1.0 - f)))
            if n_sim > len(simulated):
                raise ValueError(f"MixedDataset: sim_fraction={f} of {n_real} real items needs {n_sim} simulated "
                                 f"items but the simulated dataset has {len(simulated)}: build it with "
                                 f"samples_per_epoch={n_sim} (mix_datasets does)")
        if n_real + n_sim == 0:
            raise ValueError("MixedDataset: both parts are empty")
        if n_real and n_sim:
            nt_real = int(real[0][0].shape[1])
            if nt_real != simulated.nt:
                raise ValueError(f"MixedDataset: real seismic has nt={nt_real} time samples, the simulated "
                                 f"dataset nt={simulated.nt}; build it with nt={nt_real}")
        self.real, self.simulated = real, simulated
        self.n_real, self.n_sim = n_real, n_sim
        self._real_families: Optional[List[str]] = None

    @property
    def sim_fraction(self) -> float:
        """The realised fraction of simulated items."""
        return self.n_sim / (self.n_real + self.n_sim)

    def __len__(self) -> int:
        return self.n_real + self.n_sim

    def is_simulated(self, i: int) -> bool:
        return i >= self.n_real

    def set_epoch(self, epoch: int) -> None:
        if self.n_sim:
            self.simulated.set_epoch(epoch)
        if hasattr(self.real, "set_epoch"):
            self.real.set_epoch(epoch)

    def families(self) -> List[str]:
        if self._real_families is None:
            self._real_families = _families_of(self.real) if self.n_real else []
        return self._real_families + self.simulated.families()[:self.n_sim]

    def _locate(self, i: int) -> Tuple[Dataset, int]:
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"MixedDataset: item {i} out of range 0..{len(self) - 1}")
        return (self.real, i) if i < self.n_real else (self.simulated, i - self.n_real)

    def raw(self, i: int):
        ds, j = self._locate(i)
        if not hasattr(ds, "raw"):
            raise TypeError(f"MixedDataset.raw: {type(ds).__name__} has no raw()")
        return ds.raw(j)

    def __getitem__(self, i: int):
        ds, j = self._locate(i)
        return ds[j]


def mix_datasets(real: Dataset, sim_fraction: float, **simulated_kwargs) -> MixedDataset:
    """``MixedDataset(real, SimulatedDataset(n_sim, **simulated_kwargs), sim_fraction)``
    with exactly the ``n_sim`` simulated items the fraction needs (see :class:`MixedDataset`).

    Args:
        real: the real dataset.
        sim_fraction: in (0, 1).
        simulated_kwargs: :class:`SimulatedDataset` options (seed, families, augment, nt, device, ...).
    """
    f = float(sim_fraction)
    if not 0.0 < f < 1.0:
        raise ValueError(f"mix_datasets: sim_fraction must be in (0, 1), got {sim_fraction}")
    n_sim = max(1, int(round(f * len(real) / (1.0 - f))))
    return MixedDataset(real, SimulatedDataset(n_sim, **simulated_kwargs), f)
