"""Which samples a partial stage covers first: the expected gain of each sample.

A ranked stage (physics refinement) whose pass over every candidate does not fit in its
share of the time covers the samples with the highest expected gain first. The expected
gain of sample i routed to kind k is

    gain_i = P_i(k) * g_k * w_i

- ``g_k``: the stage's gain per sample of kind k (m/s of MAE removed, measured on validation
  per family kind, :attr:`~fwi_core.inference_plan.gains.StageGains.per_kind`; without a
  measurement the stage's gain for every kind it refines);
- ``P_i(k)``: how sure the routing is (the family classifier's probabilities summed over
  the families of kind k; 1 when the kind comes from the detector);
- ``w_i``: how wrong the current prediction looks, relative to the other candidates: the
  mean of the available error signals, each divided by its mean over the candidates
  (so ``w`` averages 1). The signals are the member disagreement (the spread of the
  members' predictions, or the MC-dropout spread) and the data misfit of the current
  prediction (the public record: misfit correlates with error, Pearson about 0.76). The
  misfit costs a simulation, so it is computed only for the top of the cheap ranking
  (:func:`screen_count`), which is then re-ranked with it.

These are choices (the evidence: the misfit/error correlation; that a prediction the
members disagree on is more often wrong); BENCHMARKS.md measures the result.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import numpy as np

__all__ = ["KIND_NAMES", "error_weight", "expected_gain", "rank_rows", "screen_count", "kind_codes_from",
           "SCREEN_FACTOR", "SCREEN_SHARE"]

#: Kind codes stored per file (``kind`` array: code + 1, 0 = unknown).
KIND_NAMES = ("flat", "tv", "smooth")
#: The misfit is computed for this many times the samples the share is projected to cover ...
SCREEN_FACTOR = 3.0
#: ... as long as screening takes at most this fraction of the share.
SCREEN_SHARE = 0.25


def error_weight(disagreement: Optional[np.ndarray] = None, misfit: Optional[np.ndarray] = None,
                 n: Optional[int] = None) -> np.ndarray:
    """``w_i``: the mean of the available signals, each divided by its mean over the rows
    (NaN entries of a signal count as its mean); ones (``n`` of them) without signals."""
    parts = []
    for sig in (disagreement, misfit):
        if sig is None:
            continue
        sig = np.asarray(sig, dtype=np.float64)
        finite = np.isfinite(sig)
        if not finite.any():
            continue
        mean = float(sig[finite].mean())
        if not mean > 0:
            continue
        parts.append(np.where(finite, sig / mean, 1.0))
    if not parts:
        if n is None:
            n = len(disagreement) if disagreement is not None else (len(misfit) if misfit is not None else 0)
        return np.ones(n)
    return np.mean(parts, axis=0)


def expected_gain(kind_codes: np.ndarray, kind_p: np.ndarray, kind_gains: Dict[str, float],
                  weight: np.ndarray) -> np.ndarray:
    """``gain_i`` (m/s) of rows routed to ``kind_codes`` (0, 1, 2 = flat, tv, smooth) with
    routing probabilities ``kind_p`` (k, 3), per-kind gains and error weights."""
    codes = np.asarray(kind_codes, dtype=np.int64)
    g = np.array([kind_gains.get(k, 0.0) for k in KIND_NAMES])[codes]
    p = np.asarray(kind_p, dtype=np.float64)[np.arange(len(codes)), codes]
    return p * g * np.asarray(weight, dtype=np.float64)


def rank_rows(rows: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """``rows`` by decreasing score (ties: lower row first)."""
    rows = np.asarray(rows, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    return rows[np.lexsort((rows, -scores))]


def screen_count(candidates: int, share: float, per_sample: float, screen_per_sample: Optional[float],
                 batch: int) -> int:
    """How many of the top candidates get their misfit computed: none when every
    candidate fits in the share (the order then does not matter) or when the misfit's cost
    is unknown; else ``SCREEN_FACTOR`` times the projected coverage (at least a batch), as
    long as that takes at most ``SCREEN_SHARE`` of the share."""
    if candidates <= 0 or not screen_per_sample or screen_per_sample <= 0 or not math.isfinite(share):
        return 0
    covered = share / max(per_sample, 1e-12)
    if covered >= candidates:
        return 0
    m = max(batch, int(SCREEN_FACTOR * covered))
    m = min(m, int(SCREEN_SHARE * share / screen_per_sample))
    return int(max(0, min(candidates, m)))


def kind_codes_from(names: Sequence[str]) -> np.ndarray:
    """Codes of kind names (``flat``/``tv``/``smooth``)."""
    return np.array([KIND_NAMES.index(k) for k in names], dtype=np.int64)
