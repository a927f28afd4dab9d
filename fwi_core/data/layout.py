"""The Kaggle competition layout: find the root, index train files, list test files.

``train_samples/<Family>/data/data*.npy`` + ``model/model*.npy`` for Vel/Style families;
``train_samples/<Family>/seis*_*.npy`` + ``vel*_*.npy`` side by side for Fault families;
``test/<oid>.npy``; ``sample_submission.csv``.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import LayoutError, MissingPairError
from .io import SEIS_SHAPE, VEL_SHAPE, check_finite, open_npy

COMPETITION_SLUG = "waveform-inversion"
KAGGLE_CANDIDATES = (
    Path("/kaggle/input") / COMPETITION_SLUG,
    Path("/kaggle/input/competitions") / COMPETITION_SLUG,
)


def _looks_like_root(p: Path) -> bool:
    return p.is_dir() and ((p / "train_samples").is_dir() or (p / "test").is_dir())


def find_competition_root(path: Optional[os.PathLike] = None,
                          search: Sequence[os.PathLike] = KAGGLE_CANDIDATES) -> Path:
    """The folder holding ``train_samples/`` and/or ``test/``.

    ``path`` (or the ``FWI_DATA`` environment variable) wins when given; otherwise the
    Kaggle mounts are tried, then any ``/kaggle/input/**`` folder containing
    ``train_samples`` (newer images mount competitions elsewhere).
    """
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise LayoutError(f"data root must be a folder path, got {path!r} ({type(path).__name__})")
    given = path or os.environ.get("FWI_DATA")
    if given:
        p = Path(given).expanduser()
        if _looks_like_root(p):
            return p
        for child in sorted(p.glob("*/")) if p.is_dir() else []:
            if _looks_like_root(child):
                return child
        raise LayoutError(f"{p}: not a competition root (expected train_samples/ and/or test/ inside)")
    for c in search:
        if _looks_like_root(Path(c)):
            return Path(c)
    base = Path("/kaggle/input")
    if base.is_dir():
        for sub in sorted(base.glob("**/train_samples")):
            return sub.parent
    raise LayoutError("competition data not found: pass the data root (e.g. --data DIR), set FWI_DATA, "
                      f"or attach the competition (searched {', '.join(map(str, search))})")


@dataclass(frozen=True)
class FilePair:
    """One seismic file and its velocity file, with the family and sample count."""

    family: str
    seismic: Path
    velocity: Path
    n: int


_FAULT_RE = re.compile(r"^seis(.*)\.npy$")
_VEL_RE = re.compile(r"^data(.*)\.npy$")


def _pairs_in_family(fam_dir: Path) -> List[Tuple[Path, Path]]:
    fam = fam_dir.name
    pairs = []
    data_dir, model_dir = fam_dir / "data", fam_dir / "model"
    if data_dir.is_dir() or model_dir.is_dir():
        for d in sorted(data_dir.glob("*.npy")) if data_dir.is_dir() else []:
            m = _VEL_RE.match(d.name)
            if not m:
                continue
            v = model_dir / f"model{m.group(1)}.npy"
            if not v.is_file():
                raise MissingPairError(f"{d}: seismic file without its velocity file {v}")
            pairs.append((d, v))
        if model_dir.is_dir():
            for v in sorted(model_dir.glob("model*.npy")):
                d = data_dir / ("data" + v.name[len("model"):])
                if not d.is_file():
                    raise MissingPairError(f"{v}: velocity file without its seismic file {d}")
    for s in sorted(fam_dir.glob("seis*.npy")):
        v = fam_dir / ("vel" + _FAULT_RE.match(s.name).group(1) + ".npy")
        if not v.is_file():
            raise MissingPairError(f"{s}: seismic file without its velocity file {v.name} in {fam_dir}")
        pairs.append((s, v))
    for v in sorted(fam_dir.glob("vel*.npy")):
        s = fam_dir / ("seis" + v.name[len("vel"):])
        if not s.is_file():
            raise MissingPairError(f"{v}: velocity file without its seismic file {s.name} in {fam_dir}")
    if not pairs:
        raise LayoutError(f"{fam_dir}: family folder {fam!r} holds no data/model or seis/vel files")
    return pairs


def index_train(root: os.PathLike, families: Optional[Iterable[str]] = None,
                validate: bool = True) -> List[FilePair]:
    """Every (seismic, velocity) file pair under ``root/train_samples`` (or ``root`` itself
    if it is a train_samples folder), both naming schemes, sorted by family and name.

    With ``validate`` each file's header is checked (shape, dtype, equal sample counts)
    through a memory map, without reading the data.
    """
    root = Path(root)
    ts = root / "train_samples" if (root / "train_samples").is_dir() else root
    if not ts.is_dir():
        raise LayoutError(f"{root}: no train_samples/ folder")
    wanted = set(families) if families is not None else None
    out: List[FilePair] = []
    # hidden folders (.ipynb_checkpoints, staging folders of interrupted writes) are not families
    for fam_dir in sorted(p for p in ts.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if wanted is not None and fam_dir.name not in wanted:
            continue
        for s, v in _pairs_in_family(fam_dir):
            n = -1
            if validate:
                a = open_npy(s, SEIS_SHAPE, "seismic")
                b = open_npy(v, VEL_SHAPE, "velocity")
                if len(a) != len(b):
                    raise MissingPairError(f"{s} holds {len(a)} samples but {v} holds {len(b)}")
                n = len(a)
            out.append(FilePair(fam_dir.name, s, v, n))
    if not out:
        raise LayoutError(f"{ts}: no family folders with data" +
                          (f" for {sorted(wanted)}" if wanted else ""))
    return out


def list_test(root: os.PathLike) -> List[Tuple[str, Path]]:
    """(oid, path) of every ``root/test/<oid>.npy``, sorted by oid."""
    root = Path(root)
    td = root / "test" if (root / "test").is_dir() else root
    if not td.is_dir() or (td == root and not any(root.glob("*.npy"))):   # a root without test/
        raise LayoutError(f"{root}: no test/ folder (expected {root / 'test'}/<oid>.npy)")
    files = sorted(td.glob("*.npy"))
    if not files:
        raise LayoutError(f"{td}: no .npy test files")
    return [(f.stem, f) for f in files]


def load_test_sample(path: os.PathLike) -> np.ndarray:
    """One test file as float32 (5, 1000, 70), checked."""
    arr = open_npy(path, SEIS_SHAPE, "test seismic", batched=False)
    return check_finite(np.asarray(arr, dtype=np.float32), path, "test seismic")
