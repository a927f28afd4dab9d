"""Memory-mapped, validated access to .npy files."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from ..errors import DataFormatError

SEIS_SHAPE = (5, 1000, 70)
VEL_SHAPE = (1, 70, 70)


def open_npy(path, sample_shape: Tuple[int, ...], what: str, batched: bool = True) -> np.ndarray:
    """Open ``path`` memory-mapped (read-only) after checking header, dtype and shape.

    Args:
        sample_shape: the shape of one sample, e.g. (5, 1000, 70).
        what: a word for messages ("seismic", "velocity").
        batched: the file holds (N, *sample_shape) rather than one sample.

    Raises:
        DataFormatError naming the file and what was expected.
    """
    path = Path(path)
    expected = ("(N, " + ", ".join(map(str, sample_shape)) + ")") if batched else str(tuple(sample_shape))
    if not path.is_file():
        raise DataFormatError(f"{path}: {what} file does not exist")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:  # bad magic, truncated data, pickled object arrays
        raise DataFormatError(f"{path}: not a readable .npy {what} file of shape {expected} float32 ({e})") from e
    except OSError as e:
        raise DataFormatError(f"{path}: cannot read {what} file ({e})") from e
    if not isinstance(arr, np.ndarray):
        raise DataFormatError(f"{path}: expected a single .npy array, got {type(arr).__name__}")
    shape_ok = (arr.ndim == len(sample_shape) + 1 and tuple(arr.shape[1:]) == tuple(sample_shape)) if batched \
        else tuple(arr.shape) == tuple(sample_shape)
    if not shape_ok:
        raise DataFormatError(f"{path}: {what} has shape {tuple(arr.shape)}, expected {expected}")
    if arr.dtype not in (np.float32, np.float64, np.float16):
        raise DataFormatError(f"{path}: {what} has dtype {arr.dtype}, expected float32")
    return arr


def check_finite(array: np.ndarray, path, what: str, index: Optional[int] = None) -> np.ndarray:
    """Raise DataFormatError if ``array`` has NaN/inf, naming the file (and sample)."""
    if not np.isfinite(array).all():
        where = f" sample {index}" if index is not None else ""
        raise DataFormatError(f"{path}:{where} {what} contains NaN or inf values")
    return array
