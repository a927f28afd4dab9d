"""Torch datasets over the competition layout (memory-mapped, normalised, augmentable)."""
from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from .augment import hflip
from .io import SEIS_SHAPE, VEL_SHAPE, check_finite, open_npy
from .layout import FilePair, index_train, list_test, load_test_sample
from .normalize import normalize_seismic, normalize_velocity


class FWIDataset(Dataset):
    """(seismic, velocity, family) samples from indexed file pairs.

    Files are opened memory-mapped on first use (per worker), so only the requested
    sample is read. Items are float32 tensors (5,1000,70) and (1,70,70), normalised to
    OpenFWI's [-1, 1] when ``normalize`` (see :mod:`fwi_core.data.normalize`), and the
    family name.

    Args:
        pairs: from :func:`index_train` (or a root path, indexed here).
        indices: optional list of global sample indices to expose (e.g. a fold).
        normalize: apply OpenFWI normalisation.
        flip_prob: probability of the horizontal-flip augmentation per item.
        seed: seed of the augmentation's random stream.
    """

    def __init__(self, pairs, indices: Optional[Sequence[int]] = None, normalize: bool = True,
                 flip_prob: float = 0.0, seed: int = 0):
        if isinstance(pairs, (str, os.PathLike)):
            pairs = index_train(pairs)
        self.pairs: List[FilePair] = list(pairs)
        if any(p.n < 0 for p in self.pairs):
            raise ValueError("FWIDataset needs validated pairs (index_train(..., validate=True))")
        self.offsets = np.concatenate([[0], np.cumsum([p.n for p in self.pairs])])
        total = int(self.offsets[-1])
        self.indices = np.arange(total) if indices is None else np.asarray(indices, dtype=np.int64)
        if len(self.indices) and (self.indices.min() < 0 or self.indices.max() >= total):
            raise IndexError(f"FWIDataset: indices must lie in 0..{total - 1}")
        self.normalize = normalize
        self.flip_prob = float(flip_prob)
        self.rng = np.random.default_rng(seed)
        self._maps = {}

    # -- index helpers -------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.indices)

    def locate(self, global_index: int) -> Tuple[int, int]:
        """(pair index, row within the file) of a global sample index."""
        f = int(np.searchsorted(self.offsets, global_index, side="right") - 1)
        return f, int(global_index - self.offsets[f])

    def families(self) -> List[str]:
        """The family of every exposed item, in order (for samplers and folds)."""
        fam_of_file = [p.family for p in self.pairs]
        file_idx = np.searchsorted(self.offsets, self.indices, side="right") - 1
        return [fam_of_file[i] for i in file_idx]

    def subset(self, positions: Sequence[int], **overrides) -> "FWIDataset":
        """A dataset over some of this one's items (positions into ``self.indices``)."""
        kw = dict(normalize=self.normalize, flip_prob=self.flip_prob)
        kw.update(overrides)
        return FWIDataset(self.pairs, self.indices[np.asarray(positions, dtype=np.int64)], **kw)

    # -- reading ------------------------------------------------------------------
    def _arrays(self, f: int):
        if f not in self._maps:
            p = self.pairs[f]
            self._maps[f] = (open_npy(p.seismic, SEIS_SHAPE, "seismic"), open_npy(p.velocity, VEL_SHAPE, "velocity"))
        return self._maps[f]

    def raw(self, item: int) -> Tuple[np.ndarray, np.ndarray, str]:
        """Un-normalised float32 (seismic, velocity m/s, family) of item ``item``."""
        f, row = self.locate(int(self.indices[item]))
        s, v = self._arrays(f)
        p = self.pairs[f]
        x = check_finite(np.asarray(s[row], dtype=np.float32), p.seismic, "seismic", row)
        y = check_finite(np.asarray(v[row], dtype=np.float32), p.velocity, "velocity", row)
        return x, y, p.family

    def __getitem__(self, item: int):
        x, y, fam = self.raw(item)
        if self.flip_prob > 0 and self.rng.random() < self.flip_prob:
            x, y = hflip(x, y)
        if self.normalize:
            x, y = normalize_seismic(x), normalize_velocity(y)
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), \
            torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32)), fam

    def __getstate__(self):  # memory maps are reopened in each DataLoader worker
        d = dict(self.__dict__)
        d["_maps"] = {}
        return d


class TestDataset(Dataset):
    """Test files ``test/<oid>.npy`` as (normalised seismic, oid)."""

    __test__ = False  # not a pytest class

    def __init__(self, root, normalize: bool = True, files: Optional[List[Tuple[str, os.PathLike]]] = None):
        self.files = files if files is not None else list_test(root)
        self.normalize = normalize

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        oid, path = self.files[i]
        x = load_test_sample(path)
        if self.normalize:
            x = normalize_seismic(x)
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), oid
