"""Small shared helpers: progress bars and atomic file writes."""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Iterator, Union

PathLike = Union[str, os.PathLike]


def progress_bar(iterable=None, **kwargs):
    """A tqdm progress bar (``tqdm.auto`` in notebooks), or a silent pass-through if
    tqdm is missing. ``disable`` defaults to off when stderr is not a terminal and
    ``FWI_PROGRESS=0`` is set."""
    if os.environ.get("FWI_PROGRESS", "1") == "0":
        kwargs["disable"] = True
    try:
        import warnings

        with warnings.catch_warnings():  # "IProgress not found": tqdm falls back to text bars
            warnings.simplefilter("ignore")
            from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm ships with Kaggle's image and our deps
        class _Silent:
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

        return _Silent(iterable)
    kwargs.setdefault("file", sys.stderr)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)


@contextlib.contextmanager
def atomic_path(path: PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success,
    delete it on failure, so a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=(suffix or path.suffix) + ".tmp",
                               dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_save_npy(path: PathLike, array) -> None:
    """``np.save`` through a temporary file and a rename."""
    import numpy as np

    with atomic_path(path, suffix=".npy") as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


def atomic_write_text(path: PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
