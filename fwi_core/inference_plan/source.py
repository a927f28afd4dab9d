"""Where the budgeted planner's inputs come from: test files on disk, or arrays.

A source is a sized sequence of ids with ``read(i)`` returning one raw (un-normalised)
float32 gather (5, 1000, 70), or raising :class:`~fwi_core.data.DataError` (any other
exception counts too) for an unreadable or corrupted file. :func:`batches` streams a
source in fixed batches (a DataLoader, optionally with worker processes) and turns read
failures into flagged rows instead of errors, so one bad file does not stop the run.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import LayoutError
from ..data.io import SEIS_SHAPE
from ..data.layout import list_test, load_test_sample

__all__ = ["TestFileSource", "ArraySource", "RawBatch", "batches", "row_batches", "item_shape_of"]


class TestFileSource:
    """Every ``test/<oid>.npy`` under a competition root (sorted by oid).

    Args:
        root: the competition root (or its ``test/`` folder).
        limit: keep only the first ``limit`` files (quick checks).
        files: explicit ``(oid, path)`` pairs instead of listing ``root``.
    """

    __test__ = False  # not a pytest class

    def __init__(self, root: Optional[Union[str, os.PathLike]] = None, limit: Optional[int] = None,
                 files: Optional[Sequence[Tuple[str, os.PathLike]]] = None):
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ValueError(f"TestFileSource: limit must be None or >= 1, got {limit!r}")
        if files is None:
            if root is None:
                raise ValueError("TestFileSource: give a competition root or explicit files")
            files = list_test(root)
        self.files: List[Tuple[str, Path]] = [(str(o), Path(p)) for o, p in files][:limit]
        self.ids: List[str] = [o for o, _ in self.files]
        seen = set()
        for oid, path in self.files:
            if oid in seen:
                raise LayoutError(f"{path}: duplicate test oid {oid!r} (each test file must appear once)")
            seen.add(oid)
        self.item_shape = SEIS_SHAPE

    def __len__(self) -> int:
        return len(self.files)

    def read(self, i: int) -> np.ndarray:
        """The raw gathers of file ``i``; raises DataFormatError naming a bad file."""
        return load_test_sample(self.files[i][1])

    def describe(self, i: int) -> str:
        return str(self.files[i][1])


class ArraySource:
    """In-memory (or memory-mapped) gathers, e.g. validation samples.

    Args:
        seismic: (N, 5, 1000, 70) raw gathers (any array-like indexable by row), or a
            callable ``seismic(i)`` returning one.
        ids: N unique ids (default ``"0", "1", ...``).
        n: the number of samples when ``seismic`` is a callable.
    """

    def __init__(self, seismic, ids: Optional[Sequence[str]] = None, n: Optional[int] = None):
        self._get = seismic if callable(seismic) else (lambda i: seismic[i])
        size = n if n is not None else len(seismic)
        self.ids = [str(i) for i in (ids if ids is not None else range(size))]
        if len(self.ids) != size:
            raise ValueError(f"ArraySource: {size} samples but {len(self.ids)} ids")
        if len(set(self.ids)) != size:
            raise ValueError("ArraySource: ids must be unique")

    def __len__(self) -> int:
        return len(self.ids)

    def read(self, i: int) -> np.ndarray:
        return np.asarray(self._get(i), dtype=np.float32)

    def describe(self, i: int) -> str:
        return f"sample {self.ids[i]}"


@dataclass
class RawBatch:
    """One batch of a source.

    Attributes:
        start, stop: the rows ``start:stop`` of the source.
        seismic: (B, *item_shape) float32 raw gathers (zeros where ``ok`` is False).
        ok: (B,) bool, False for a file that could not be read.
        errors: messages of the unreadable files, by row offset in the batch.
        rows: the rows read, for a batch of chosen rows (:func:`row_batches`); None for
            the contiguous rows ``start:stop``.
    """

    start: int
    stop: int
    seismic: torch.Tensor
    ok: torch.Tensor
    errors: dict
    rows: Optional[np.ndarray] = None


class _Safe(Dataset):
    def __init__(self, source, start: int, shape: Tuple[int, ...], rows: Optional[Sequence[int]] = None):
        self.source, self.start, self.shape = source, start, shape
        self.rows = None if rows is None else [int(r) for r in rows]

    def __len__(self) -> int:
        return len(self.source) - self.start if self.rows is None else len(self.rows)

    def __getitem__(self, j: int):
        i = self.start + j if self.rows is None else self.rows[j]
        try:
            x = np.array(self.source.read(i), dtype=np.float32)   # a private, writable copy
            if x.shape != self.shape:
                raise ValueError(f"shape {x.shape}, expected {self.shape}")
            if not np.isfinite(x).all():
                raise ValueError("contains NaN or inf values")
            return torch.from_numpy(x), True, ""
        except Exception as e:  # noqa: BLE001 - any failure to read one file is that file's problem
            msg = str(e)
            where = self.source.describe(i)
            if where not in msg:
                msg = f"{where}: {msg}"
            return torch.zeros(self.shape), False, f"{type(e).__name__}: {msg}"


def batches(source, start: int, batch_size: int, num_workers: int = 0,
            item_shape: Optional[Tuple[int, ...]] = None) -> Iterator[RawBatch]:
    """Stream ``source`` from row ``start`` (a multiple of ``batch_size``) in batches
    whose boundaries are multiples of ``batch_size`` (so a resumed run sees the same
    batches as an uninterrupted one).

    Args:
        item_shape: shape of one gather; default: the source's ``item_shape`` attribute,
            else the shape of its first readable row.
    """
    if start % batch_size and start != len(source):
        raise ValueError(f"batches: start {start} is not a multiple of the batch size {batch_size}")
    if start >= len(source):
        return
    shape = item_shape or getattr(source, "item_shape", None) or _first_shape(source)
    loader = DataLoader(_Safe(source, start, tuple(shape)), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=_collate)
    s = start
    for x, ok, errs in loader:
        e = s + len(ok)
        yield RawBatch(s, e, x, ok, {j: m for j, m in enumerate(errs) if m})
        s = e


def row_batches(source, batches_of_rows: Sequence[Sequence[int]], num_workers: int = 0,
                item_shape: Optional[Tuple[int, ...]] = None) -> Iterator[RawBatch]:
    """Stream the given batches of rows (any rows, e.g. the samples a ranked stage refines,
    in rank order): one :class:`RawBatch` per batch, its ``start``/``stop`` the smallest
    row and one past the largest (``rows`` of the batch are what was read)."""
    flat = [int(r) for b in batches_of_rows for r in b]
    if not flat:
        return
    shape = item_shape or getattr(source, "item_shape", None) or _first_shape(source)
    loader = DataLoader(_Safe(source, 0, tuple(shape), flat), batch_size=1, num_workers=num_workers,
                        collate_fn=_collate)
    it = iter(loader)
    for rows in batches_of_rows:
        items = [next(it) for _ in rows]
        x = torch.cat([i[0] for i in items]) if items else torch.zeros((0,) + tuple(shape))
        ok = torch.cat([i[1] for i in items]) if items else torch.zeros(0, dtype=torch.bool)
        errs = {j: m for j, item in enumerate(items) for m in item[2] if m}
        yield RawBatch(min(rows), max(rows) + 1, x, ok, errs, rows=np.asarray(rows, dtype=np.int64))


def _collate(items):
    xs, oks, errs = zip(*items)
    return torch.stack(xs), torch.tensor(oks, dtype=torch.bool), list(errs)


def item_shape_of(source) -> Tuple[int, ...]:
    """The shape of one gather of ``source``: its ``item_shape``, else its first readable row's."""
    shape = getattr(source, "item_shape", None)
    return tuple(shape) if shape else _first_shape(source)


def _first_shape(source) -> Tuple[int, ...]:
    for i in range(len(source)):
        try:
            return tuple(np.asarray(source.read(i)).shape)
        except Exception:  # noqa: BLE001
            continue
    return tuple(SEIS_SHAPE)
