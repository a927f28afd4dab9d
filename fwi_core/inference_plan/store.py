"""The state folder of a run: disk-backed per-file arrays and the progress file.

The budgeted planner keeps every per-file quantity (each member's prediction, the current
prediction, the MC-dropout variance, the family code) in a ``.npy`` file on disk and maps
only the rows of the batch it works on, so its memory stays flat however many test files
there are. One (70, 70) map costs 19.6 KB per file in float32 (9.8 KB in float16): about
1.3 GB per stored array for Kaggle's 65,818 test files.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np

from .. import platform
from ..utils import atomic_write_text, remove_stale_temps

PathLike = Union[str, os.PathLike]

__all__ = ["StoredArray", "PredictionStore", "state_limit", "KAGGLE_STATE_LIMIT_GB", "GATHERS", "GATHER_BYTES",
           "CachedSource"]

#: The state folder's default limit on Kaggle, in GB. It lives in the temp folder (outside
#: /kaggle/working, whose 20 GB are saved as the notebook's output): a session's disk is
#: about 73 GB, so 40 GB leaves the output and a margin free. Elsewhere the default is 90%
#: of the free disk.
KAGGLE_STATE_LIMIT_GB = 40.0
#: The float16 cache of the test gathers (one (5, 1000, 70) array per cached file).
GATHERS = "gathers"
GATHER_BYTES = 5 * 1000 * 70 * 2


def state_limit(folder: PathLike, limit_gb: Optional[float]) -> int:
    """Bytes the state folder may hold: ``limit_gb`` (None: :data:`KAGGLE_STATE_LIMIT_GB`
    on Kaggle, else no limit of its own), and never more than 90% of what its disk has free
    plus what the folder already holds."""
    folder = Path(folder)
    probe = folder if folder.exists() else next((p for p in folder.parents if p.exists()), Path("."))
    free = shutil.disk_usage(probe).free + folder_bytes(folder)
    cap = int(0.9 * free)
    if limit_gb is None and platform.detect_platform().name == "kaggle":
        limit_gb = KAGGLE_STATE_LIMIT_GB
    return cap if limit_gb is None else min(cap, int(float(limit_gb) * 1e9))


def folder_bytes(folder: PathLike) -> int:
    """Apparent size of the files directly in ``folder`` (0 when it does not exist)."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


class CachedSource:
    """A source whose first ``rows`` files are read from the float16 gather cache once the
    first pass has written them there (``avail()`` rows), the others from ``source``."""

    def __init__(self, source, cache: "StoredArray", avail):
        self.source, self.cache, self.avail = source, cache, avail
        self.ids = source.ids
        self.item_shape = getattr(source, "item_shape", None)

    def __len__(self) -> int:
        return len(self.source)

    def read(self, i: int) -> np.ndarray:
        if i < min(self.cache.n, self.avail()):
            return self.cache.read(i, i + 1)[0].astype(np.float32)
        return self.source.read(i)

    def describe(self, i: int) -> str:
        return self.source.describe(i)


class StoredArray:
    """A ``(n, *item_shape)`` ``.npy`` file read and written a row window at a time.

    Each call maps only the rows it touches (``np.memmap`` with an offset), so resident
    memory does not grow with ``n``. Writes are flushed before returning: a process killed
    afterwards (even by SIGKILL) leaves them in the file.

    Args:
        path: the ``.npy`` file.
        n: number of rows (files).
        item_shape: shape of one row, e.g. (70, 70) or () for a scalar per file.
        dtype: numpy dtype of the file.
        create: make a new zero-filled (sparse) file, replacing any old one; otherwise
            open the existing file and check its shape and dtype.
    """

    def __init__(self, path: PathLike, n: int, item_shape: Tuple[int, ...], dtype, create: bool):
        self.path = Path(path)
        self.n = int(n)
        self.item_shape = tuple(int(s) for s in item_shape)
        self.dtype = np.dtype(dtype)
        shape = (self.n,) + self.item_shape
        if create or not self.path.is_file():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            m = np.lib.format.open_memmap(self.path, mode="w+", dtype=self.dtype, shape=shape)
            del m
        m = np.load(self.path, mmap_mode="r")
        if m.shape != shape or m.dtype != self.dtype:
            raise ValueError(f"{self.path}: stored array has shape {m.shape} {m.dtype}, expected {shape} "
                             f"{self.dtype} (delete the state folder to start over)")
        self.offset = int(m.offset)
        del m
        self.row_bytes = int(np.prod(self.item_shape, dtype=np.int64)) * self.dtype.itemsize

    def _window(self, start: int, stop: int, mode: str) -> np.memmap:
        if not 0 <= start <= stop <= self.n:
            raise IndexError(f"{self.path.name}: rows {start}:{stop} outside 0:{self.n}")
        return np.memmap(self.path, dtype=self.dtype, mode=mode, offset=self.offset + start * self.row_bytes,
                         shape=(stop - start,) + self.item_shape)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` as an in-memory array of the file's dtype."""
        if stop <= start:
            return np.empty((0,) + self.item_shape, self.dtype)
        w = self._window(start, stop, "r")
        out = np.array(w)
        del w
        return out

    def write(self, start: int, values: np.ndarray) -> None:
        """Write ``values`` (k, *item_shape) to rows ``start:start+k`` and flush."""
        values = np.asarray(values)
        if values.shape[1:] != self.item_shape:
            raise ValueError(f"{self.path.name}: rows of shape {values.shape[1:]}, expected {self.item_shape}")
        if len(values) == 0:
            return
        w = self._window(start, start + len(values), "r+")
        w[...] = values.astype(self.dtype, copy=False)
        w.flush()
        del w

    def read_rows(self, rows) -> np.ndarray:
        """The given rows (any order, k of them) as an in-memory (k, *item_shape) array;
        only the pages of those rows are read."""
        rows = np.asarray(rows, dtype=np.int64)
        if not len(rows):
            return np.empty((0,) + self.item_shape, self.dtype)
        if rows.min() < 0 or rows.max() >= self.n:
            raise IndexError(f"{self.path.name}: rows outside 0:{self.n}")
        w = self._window(0, self.n, "r")
        out = np.array(w[rows])
        del w
        return out

    def write_rows(self, rows, values: np.ndarray) -> None:
        """Write ``values`` (k, *item_shape) to the given rows and flush."""
        rows = np.asarray(rows, dtype=np.int64)
        values = np.asarray(values)
        if values.shape != (len(rows),) + self.item_shape:
            raise ValueError(f"{self.path.name}: {values.shape} values for {len(rows)} rows of {self.item_shape}")
        if not len(rows):
            return
        if rows.min() < 0 or rows.max() >= self.n:
            raise IndexError(f"{self.path.name}: rows outside 0:{self.n}")
        w = self._window(0, self.n, "r+")
        w[rows] = values.astype(self.dtype, copy=False)
        w.flush()
        del w

    def copy_from(self, other: "StoredArray", start: int, stop: int, chunk: int = 1024) -> None:
        """Copy rows ``start:stop`` of ``other`` into the same rows of this array."""
        for s in range(start, stop, chunk):
            e = min(stop, s + chunk)
            self.write(s, other.read(s, e))


class PredictionStore:
    """The state folder of one budgeted run: named :class:`StoredArray` files and
    ``progress.json``.

    Args:
        folder: the state folder (created if missing).
        n: number of files of the run.
        dtype: dtype of the stored maps ("float32" or "float16").
    """

    PROGRESS = "progress.json"

    def __init__(self, folder: PathLike, n: int, dtype: str = "float32"):
        if np.dtype(dtype) not in (np.dtype("float32"), np.dtype("float16")):
            raise ValueError(f"PredictionStore: dtype must be 'float32' or 'float16', got {dtype!r}")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.n = int(n)
        self.dtype = np.dtype(dtype)
        self._arrays: Dict[str, StoredArray] = {}

    def _file(self, name: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
        return self.folder / f"{safe}.npy"

    def array(self, name: str, item_shape: Tuple[int, ...] = (70, 70), dtype=None,
              create: bool = False) -> StoredArray:
        """The stored array ``name`` (opened once, then cached); ``create`` makes it new."""
        if create or name not in self._arrays:
            self._arrays[name] = StoredArray(self._file(name), self.n, item_shape,
                                             self.dtype if dtype is None else dtype, create)
        return self._arrays[name]

    def has(self, name: str) -> bool:
        return name in self._arrays or self._file(name).is_file()

    # -- progress --------------------------------------------------------------------
    @property
    def progress_path(self) -> Path:
        return self.folder / self.PROGRESS

    def load_progress(self) -> Optional[Dict[str, Any]]:
        """The saved progress dict, or None when there is none (or it is unreadable)."""
        try:
            return json.loads(self.progress_path.read_text())
        except (OSError, ValueError):
            return None

    def commit(self, progress: Dict[str, Any]) -> None:
        """Persist ``progress`` atomically (after the rows it describes were written)."""
        atomic_write_text(self.progress_path, json.dumps(progress, indent=1, sort_keys=True))

    def remove(self) -> None:
        """Delete the state files (arrays first, the progress file last: a run killed in
        between is resumed from it) and temporary files of killed writers, then the folder;
        warns naming what is left when something else keeps the folder."""
        self._arrays.clear()
        if not self.folder.is_dir():
            return
        for p in list(self.folder.glob("*.npy")) + [self.progress_path]:
            try:
                p.unlink()
            except FileNotFoundError:
                pass
        remove_stale_temps(self.folder)
        try:
            self.folder.rmdir()
        except FileNotFoundError:
            pass
        except OSError:
            left = sorted(q.name for q in self.folder.iterdir())
            warnings.warn(f"{self.folder}: the state folder could not be removed; it still holds "
                          f"{', '.join(left[:10])}", RuntimeWarning, stacklevel=2)
