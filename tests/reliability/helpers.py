"""Workspaces for the reliability tests: small competition trees written as sparse
files (real shapes, no simulation), tiny checkpoints, and snapshots of a folder tree to
prove that a failed command changed nothing and left no temporary file behind."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

SEIS = (5, 1000, 70)
VEL = (1, 70, 70)


def write_npy(path: Path, shape: Sequence[int], dtype=np.float32, fill: Optional[float] = None) -> Path:
    """A valid ``.npy`` file of ``shape`` (sparse zeros unless ``fill``), created fast."""
    path.parent.mkdir(parents=True, exist_ok=True)
    m = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=tuple(shape))
    if fill is not None:
        m[...] = fill
    m.flush()
    del m
    return path


def mini_root(ws: Path, n: int = 2, test_oids: Iterable[str] = ("00aa11bb22", "33cc44dd55")) -> Path:
    """``ws/comp``: FlatVel_A (``data/data1.npy`` + ``model/model1.npy``) and FlatFault_A
    (``seis2_1_0.npy`` + ``vel2_1_0.npy``) with ``n`` samples each, and ``test/<oid>.npy``."""
    root = ws / "comp"
    ts = root / "train_samples"
    write_npy(ts / "FlatVel_A" / "data" / "data1.npy", (n,) + SEIS)
    write_npy(ts / "FlatVel_A" / "model" / "model1.npy", (n,) + VEL, fill=3000.0)
    write_npy(ts / "FlatFault_A" / "seis2_1_0.npy", (n,) + SEIS)
    write_npy(ts / "FlatFault_A" / "vel2_1_0.npy", (n,) + VEL, fill=2500.0)
    (root / "test").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for oid in test_oids:
        np.save(root / "test" / f"{oid}.npy", rng.standard_normal(SEIS).astype(np.float32))
    return root


def tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    """An engine-format checkpoint of a very narrow InversionNet (real shapes)."""
    from tests.inference_plan.helpers import tiny_checkpoint as make

    return make(path, seed)


def tree_state(root: Path) -> Tuple[Dict[str, str], frozenset]:
    """({file relpath: sha1}, {dir relpath}) of everything under ``root``."""
    files: Dict[str, str] = {}
    dirs = set()
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        for d in dirnames:
            dirs.add(str(rel / d))
        for f in filenames:
            p = Path(dirpath) / f
            files[str(rel / f)] = hashlib.sha1(p.read_bytes()).hexdigest()
    return files, frozenset(dirs)


def temp_leftovers(root: Path) -> List[str]:
    """Temporary files or folders of interrupted writes under ``root``: ``*.tmp`` files
    (``fwi_core.utils.atomic_path``) and hidden ``.<name>.*`` staging folders."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for f in filenames:
            if f.endswith(".tmp"):
                out.append(str(Path(dirpath, f).relative_to(root)))
        for d in dirnames:
            if d.startswith(".") and d not in (".git",):
                out.append(str(Path(dirpath, d).relative_to(root)) + "/")
    return sorted(out)
