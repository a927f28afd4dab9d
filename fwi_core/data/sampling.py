"""Family balancing and family-stratified folds."""
from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np


def _by_family(families: Sequence[str]) -> Dict[str, np.ndarray]:
    groups: Dict[str, List[int]] = defaultdict(list)
    for i, f in enumerate(families):
        groups[f].append(i)
    return {f: np.asarray(ix) for f, ix in sorted(groups.items())}


def balanced_indices(families: Sequence[str], per_family: Optional[int] = None, seed: int = 0) -> np.ndarray:
    """Indices giving every family ``per_family`` samples (default: the median family
    size): large families are downsampled without replacement, small ones upsampled
    (all of them, then random repeats). Shuffled."""
    groups = _by_family(families)
    if not groups:
        return np.zeros(0, dtype=np.int64)
    target = int(per_family or np.median([len(v) for v in groups.values()]))
    rng = np.random.default_rng(seed)
    out = []
    for f, ix in groups.items():
        if len(ix) >= target:
            out.append(rng.choice(ix, target, replace=False))
        else:
            extra = rng.choice(ix, target - len(ix), replace=True)
            out.append(np.concatenate([ix, extra]))
    res = np.concatenate(out)
    rng.shuffle(res)
    return res.astype(np.int64)


def family_kfold(families: Sequence[str], k: int = 5, seed: int = 0) -> List[Tuple[np.ndarray, np.ndarray]]:
    """k (train, val) index splits stratified by family: each family's items are shuffled
    and dealt round-robin into k folds, so every fold holds about 1/k of every family."""
    if k < 2:
        raise ValueError(f"family_kfold: k must be >= 2, got {k}")
    groups = _by_family(families)
    rng = np.random.default_rng(seed)
    fold_of = np.empty(len(families), dtype=np.int64)
    offset = 0
    for f, ix in groups.items():
        ix = ix.copy()
        rng.shuffle(ix)
        fold_of[ix] = (np.arange(len(ix)) + offset) % k
        offset += len(ix)  # so small families don't always start in fold 0
    all_ix = np.arange(len(families))
    return [(all_ix[fold_of != j], all_ix[fold_of == j]) for j in range(k)]
