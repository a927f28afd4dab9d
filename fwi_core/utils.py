"""Small shared helpers: optional dependencies, progress bars, atomic file writes, devices."""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from types import ModuleType
from typing import Iterator, List, Optional, Union

import numpy as np
import torch

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, stale temporaries stay
    fcntl = None

PathLike = Union[str, os.PathLike]


def optional_import(name: str, needed_for: str, install: Optional[str] = None) -> ModuleType:
    """Import an optional dependency, the one way fwi_core loads one (lazily, where it is
    used), or raise an ImportError that says what needs it and how to get it.

    Args:
        name: the module (``"timm"``, ``"timm.models.metaformer"``, ``"e3nn.o3"``).
        needed_for: what needs it, e.g. ``"the se3_transformer model"``.
        install: how to get it (default ``pip install <top-level package>``).
    """
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        top = name.split(".")[0]
        how = install or f"pip install {top.replace('_', '-')}"
        raise ImportError(f"{needed_for} needs {top}: {how}") from exc


def has_module(name: str) -> bool:
    """Whether an optional dependency can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


class _SilentBar:
    """What :func:`progress_bar` returns without tqdm: iterates, ignores updates."""

    def __init__(self, it=None, **_):
        self.it = it

    def __iter__(self):
        return iter(self.it)

    def update(self, *_):
        pass

    def set_postfix(self, *_, **__):
        pass

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def progress_bar(iterable=None, **kwargs):
    """A tqdm progress bar (``tqdm.auto`` in notebooks), or a silent pass-through if
    tqdm is missing. ``disable`` defaults to off when stderr is not a terminal and
    ``FWI_PROGRESS=0`` is set."""
    if os.environ.get("FWI_PROGRESS", "1") == "0":
        kwargs["disable"] = True
    if not has_module("tqdm"):          # tqdm ships with Kaggle's image and our dependencies
        return _SilentBar(iterable)
    with warnings.catch_warnings():     # "IProgress not found": tqdm falls back to text bars
        warnings.simplefilter("ignore")
        tqdm = optional_import("tqdm.auto", "progress bars").tqdm
    kwargs.setdefault("file", sys.stderr)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)


def _try_lock(fd: int) -> bool:
    """Take an exclusive advisory lock on ``fd`` without waiting; False if another open
    file holds it (its writer is alive: the kernel drops the lock when a process dies,
    even by SIGKILL)."""
    if fcntl is None:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


@contextlib.contextmanager
def atomic_path(path: PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success,
    delete it on failure, so a reader never sees a half-written file.

    The temporary file (``.<name>.<random><suffix>.tmp``) is locked while it is being
    written; a process killed meanwhile leaves it behind unlocked, and
    :func:`remove_stale_temps` deletes it on the next run."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=(suffix or path.suffix) + ".tmp",
                               dir=path.parent)
    tmp = Path(tmp)
    try:
        _try_lock(fd)
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    finally:
        os.close(fd)


def remove_stale_temps(folder: PathLike, name: Optional[str] = None) -> List[Path]:
    """Delete what interrupted writes left in ``folder``: the temporary files of
    :func:`atomic_path` (of the file ``name`` only, if given) and the staging folders of
    :func:`locked_staging_dir`, whose writer is gone (no lock held; a live writer's
    are kept). Returns the removed paths. A no-op where advisory locks do not exist."""
    folder = Path(folder)
    if fcntl is None or not folder.is_dir():
        return []
    removed = []
    for p in sorted(folder.glob(f".{name}.*" if name else ".*")):
        is_temp = p.is_file() and p.name.endswith(".tmp")
        is_stage = p.is_dir() and p.name.endswith(".staging")
        if not (is_temp or is_stage):
            continue
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            if not _try_lock(fd):
                continue
            if is_temp:
                p.unlink(missing_ok=True)
            else:
                shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
        finally:
            os.close(fd)
    return removed


@contextlib.contextmanager
def locked_staging_dir(path: PathLike) -> Iterator[Path]:
    """A fresh folder ``.<name>.<random>.staging`` beside ``path`` to build ``path`` in,
    locked while this block runs (so :func:`remove_stale_temps` removes it only after
    its writer died); deleted if the block raises. The caller renames it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".staging", dir=path.parent))
    fd = os.open(tmp, os.O_RDONLY)
    try:
        _try_lock(fd)
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(fd)


def atomic_save_npy(path: PathLike, array) -> None:
    """``np.save`` through a temporary file and a rename."""
    with atomic_path(path, suffix=".npy") as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


def atomic_write_text(path: PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def plain(obj):
    """``obj`` with numpy scalars and arrays turned into Python numbers and lists and
    tuples into lists (what ``weights_only`` loading and JSON accept)."""
    if isinstance(obj, dict):
        return {str(k) if isinstance(k, np.generic) else k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, str):
        return str(obj)   # str subclasses (e.g. torch's TorchVersion) are not weights_only-safe
    return obj


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
