"""Submission CSV: streaming writer, reader, validator and local scorer.

Format (FACTS section 1): header ``oid_ypos,x_1,x_3,...,x_69`` (odd columns only), one
row per (oid, depth row) named ``f"{oid}_y_{row}"``, rows 0..69 for every test oid.

Reading a submission back (:func:`read_submission_maps`) gives the odd columns only;
:func:`expand_odd_columns` rebuilds a full 70-column map from them: each even interior
column is the mean of its two odd neighbours (linear interpolation), column 0 copies
column 1 (nothing lies left of it to interpolate with, and copying cannot overshoot).
The odd columns of the rebuilt map are exactly the CSV's, so a map written by this
toolkit, read back and written again gives the same bytes (values at 3 decimals are
exact in float32 over 1500..4500 m/s).
"""
from __future__ import annotations

import csv
import math
import os
import re
from pathlib import Path
import warnings
from typing import Dict, Iterable, Optional, Sequence

import numpy as np

from ..utils import atomic_path
from ..errors import SubmissionError

ODD_COLUMNS = list(range(1, 70, 2))
HEADER = ["oid_ypos"] + [f"x_{c}" for c in ODD_COLUMNS]
N_ROWS = 70
#: the velocity range of the competition's maps (m/s)
VALUE_RANGE = (1500.0, 4500.0)
_OID_YPOS = re.compile(r"^(.+)_y_(\d+)$")
_BAD_OID = re.compile(r"[,\"'\s]")


class SubmissionRangeWarning(UserWarning):
    """A submission value outside the maps' range [1500, 4500] m/s.

    A warning, not an error: Kaggle accepts and scores such a file, but every true value
    lies in the range, so clamping (``np.clip(v, 1500, 4500)``) can only lower the MAE.
    """


def check_oid(oid) -> str:
    """``oid`` as a string, or :class:`SubmissionError` if it cannot be a row name of the
    CSV (empty, or with a comma, quote, space or newline)."""
    if not isinstance(oid, str) or not oid or _BAD_OID.search(oid):
        raise SubmissionError(f"oid {oid!r} is not a valid test id (no commas, quotes, spaces or newlines)")
    return oid


def _as_map(v, oid) -> np.ndarray:
    a = v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)
    a = a.reshape(a.shape[-2:]) if a.ndim == 3 and a.shape[0] == 1 else a
    if a.shape != (70, 70):
        raise SubmissionError(f"prediction for oid {oid!r} has shape {a.shape}, expected (70, 70) or (1, 70, 70)")
    if not np.isfinite(a).all():
        raise SubmissionError(f"prediction for oid {oid!r} contains NaN or inf")
    return a


class SubmissionWriter:
    """Write predictions row by row, without holding them all in memory.

    Use as a context manager; the CSV appears at ``path`` only if the block ends
    without an error (it is written to a temporary file and renamed)::

        with SubmissionWriter("submission.csv") as w:
            for oids, vel in batches:          # vel: (B,1,70,70) m/s
                w.write_batch(oids, vel)
    """

    def __init__(self, path: os.PathLike, float_format: str = "{:.3f}"):
        self.path = Path(path)
        self.fmt = float_format
        self.n_oids = 0
        self._seen = set()
        self._ctx = None
        self._fh = None

    def __enter__(self) -> "SubmissionWriter":
        self._ctx = atomic_path(self.path, suffix=".csv")
        tmp = self._ctx.__enter__()
        self._fh = open(tmp, "w", newline="")
        self._fh.write(",".join(HEADER) + "\n")
        return self

    def write(self, oid: str, velocity) -> None:
        """One oid's (70,70) velocity map in m/s."""
        check_oid(oid)
        if oid in self._seen:
            raise SubmissionError(f"oid {oid!r} written twice")
        self._seen.add(oid)
        a = _as_map(velocity, oid)[:, ODD_COLUMNS]
        fmt = self.fmt
        lines = [f"{oid}_y_{r}," + ",".join(fmt.format(x) for x in a[r]) for r in range(N_ROWS)]
        self._fh.write("\n".join(lines) + "\n")
        self.n_oids += 1

    def write_batch(self, oids: Sequence[str], velocities) -> None:
        if len(oids) != len(velocities):
            raise SubmissionError(f"{len(oids)} oids but {len(velocities)} predictions")
        for oid, v in zip(oids, velocities):
            self.write(oid, v)

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._fh.close()
        return bool(self._ctx.__exit__(exc_type, exc, tb))


def write_submission(path: os.PathLike, oids: Sequence[str], velocities) -> Path:
    """Write a whole submission at once (small test sets)."""
    with SubmissionWriter(path) as w:
        w.write_batch(list(oids), velocities)
    return Path(path)


def validate_submission(path: os.PathLike, test_oids: Optional[Iterable[str]] = None,
                        out_of_range: str = "warn") -> Dict[str, int]:
    """Check a submission CSV as Kaggle would; streams the file.

    Checks the header, 36 fields per row, ``<oid>_y_<row>`` names, 70 distinct rows
    0..69 per oid, finite numbers, and (if ``test_oids`` is given) that every test oid
    is present exactly once and no other oid is.

    Values outside [1500, 4500] m/s are accepted by Kaggle but can only cost MAE:
    ``out_of_range="warn"`` (default) emits one :class:`SubmissionRangeWarning` with
    their count and the first one's line and column, ``"error"`` raises
    :class:`SubmissionError`, ``"ignore"`` says nothing.

    Returns ``{"oids": ..., "rows": ...}``; raises :class:`SubmissionError` naming the
    file, line and problem.
    """
    if out_of_range not in ("warn", "error", "ignore"):
        raise ValueError(f"validate_submission: out_of_range must be 'warn', 'error' or 'ignore', "
                         f"got {out_of_range!r}")
    lo, hi = VALUE_RANGE
    n_out, first_out = 0, None
    path = Path(path)
    if not path.is_file():
        raise SubmissionError(f"{path}: submission file does not exist")
    rows_of: Dict[str, int] = {}
    n = 0
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header != HEADER:
                raise SubmissionError(f"{path}: header must be 'oid_ypos,x_1,x_3,...,x_69' (35 odd columns), "
                                      f"got {','.join(header or [])[:120]!r}")
            for line_no, row in enumerate(reader, start=2):
                if len(row) != len(HEADER):
                    raise SubmissionError(f"{path}:{line_no}: {len(row)} fields, expected {len(HEADER)}")
                m = _OID_YPOS.match(row[0])
                if not m or not 0 <= int(m.group(2)) < N_ROWS:
                    raise SubmissionError(f"{path}:{line_no}: id {row[0]!r} is not '<oid>_y_<row>' with row 0..69")
                oid, r = m.group(1), int(m.group(2))
                bit = 1 << r
                mask = rows_of.get(oid, 0)
                if mask & bit:
                    raise SubmissionError(f"{path}:{line_no}: row {row[0]!r} appears twice")
                rows_of[oid] = mask | bit
                for j, x in enumerate(row[1:]):
                    try:
                        val = float(x)
                    except ValueError:
                        raise SubmissionError(f"{path}:{line_no}: {HEADER[j + 1]}={x!r} is not a number") from None
                    if not math.isfinite(val):
                        raise SubmissionError(f"{path}:{line_no}: {HEADER[j + 1]} is {x!r}, expected a finite number")
                    if not lo <= val <= hi:
                        n_out += 1
                        if first_out is None:
                            first_out = f"line {line_no}, {HEADER[j + 1]} = {x}"
                n += 1
    except (UnicodeDecodeError, csv.Error) as e:
        raise SubmissionError(f"{path}: not a UTF-8 CSV text file ({type(e).__name__}: {e})") from e
    full = (1 << N_ROWS) - 1
    for oid, mask in rows_of.items():
        if mask != full:
            missing = [r for r in range(N_ROWS) if not mask >> r & 1]
            raise SubmissionError(f"{path}: oid {oid!r} lacks rows {missing[:10]}{'...' if len(missing) > 10 else ''}")
    if test_oids is not None:
        want = set(test_oids)
        missing = want - rows_of.keys()
        extra = rows_of.keys() - want
        if missing:
            raise SubmissionError(f"{path}: {len(missing)} test oids missing, e.g. {sorted(missing)[:3]}")
        if extra:
            raise SubmissionError(f"{path}: {len(extra)} oids not in the test set, e.g. {sorted(extra)[:3]}")
    if not rows_of:
        raise SubmissionError(f"{path}: no rows")
    if n_out and out_of_range != "ignore":
        msg = (f"{path}: {n_out} values outside [{lo:.0f}, {hi:.0f}] m/s (first at {first_out}); Kaggle scores "
               "them, but clamping to the range can only lower the MAE")
        if out_of_range == "error":
            raise SubmissionError(msg)
        warnings.warn(msg, SubmissionRangeWarning, stacklevel=2)
    return {"oids": len(rows_of), "rows": n}


def read_submission_maps(path: os.PathLike, oids: Sequence[str], values: bool = True,
                         check_values: bool = True) -> Optional[np.ndarray]:
    """The odd columns of the maps of ``oids`` in a submission CSV, streamed (only the
    rows of ``oids`` are kept).

    Args:
        path: the submission.
        oids: the oids wanted, in the order of the result.
        values: False only checks the file and returns None: that every oid of ``oids``
            is there with rows 0..69 and (with ``check_values``) that their values are
            finite numbers, nothing kept.
        check_values: with ``values=False``, parse the wanted rows' values too (False: a
            faster pass over the ids alone).

    Returns:
        (len(oids), 70, 35) float32 m/s (columns x_1, x_3, ..., x_69), or None.

    Raises:
        SubmissionError: the file is missing or not a UTF-8 CSV, a bad header, a row name
            that is not ``<oid>_y_<row>``, a row twice, a wanted row with a field count
            other than 36 or a value that is not a finite number (naming the line and
            column), or oids of ``oids`` missing or lacking rows (naming the first few).
    """
    path = Path(path)
    if not path.is_file():
        raise SubmissionError(f"{path}: submission file does not exist")
    index = {check_oid(o): i for i, o in enumerate(oids)}
    if len(index) != len(oids):
        raise SubmissionError("read_submission_maps: oids name some oid twice")
    out = np.zeros((len(index), N_ROWS, len(ODD_COLUMNS)), dtype=np.float32) if values else None
    seen = np.zeros((len(index), N_ROWS), dtype=bool)
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            header = fh.readline().rstrip("\r\n").split(",")
            if header != HEADER:
                raise SubmissionError(f"{path}: header must be 'oid_ypos,x_1,x_3,...,x_69' (35 odd columns), "
                                      f"got {','.join(header)[:120]!r}")
            for line_no, line in enumerate(fh, start=2):
                name, _, rest = line.partition(",")
                oid, sep, r = name.rpartition("_y_")
                if not sep or not r.isdigit() or not 0 <= int(r) < N_ROWS:
                    if not line.strip():
                        continue
                    raise SubmissionError(f"{path}:{line_no}: id {name!r} is not '<oid>_y_<row>' with row 0..69")
                i = index.get(oid)
                if i is None:
                    continue
                r = int(r)
                if seen[i, r]:
                    raise SubmissionError(f"{path}:{line_no}: row {name!r} appears twice")
                seen[i, r] = True
                if values:
                    out[i, r] = _parse_values(path, line_no, rest)
                elif check_values:
                    _parse_values(path, line_no, rest)
    except UnicodeDecodeError as e:
        raise SubmissionError(f"{path}: not a UTF-8 CSV text file ({type(e).__name__}: {e})") from e
    lacking = np.flatnonzero(~seen.all(1))
    if len(lacking):
        names = list(index)
        missing = [names[i] for i in lacking if not seen[i].any()]
        partial = [names[i] for i in lacking if seen[i].any()]
        parts = []
        if missing:
            parts.append(f"{len(missing)} of the {len(names)} oids wanted are missing, e.g. {missing[:5]}")
        if partial:
            rows = np.flatnonzero(~seen[index[partial[0]]]).tolist()
            parts.append(f"{len(partial)} oids lack rows, e.g. {partial[0]!r} lacks rows {rows[:10]}")
        raise SubmissionError(f"{path}: " + "; ".join(parts))
    return out


def _parse_values(path: Path, line_no: int, rest: str) -> np.ndarray:
    fields = rest.rstrip("\r\n").split(",")
    if len(fields) != len(ODD_COLUMNS):
        raise SubmissionError(f"{path}:{line_no}: {len(fields) + 1} fields, expected {len(HEADER)}")
    try:
        vals = np.array(fields, dtype=np.float64)
    except ValueError:
        j = next(j for j, x in enumerate(fields) if not _is_number(x))
        raise SubmissionError(f"{path}:{line_no}: {HEADER[j + 1]}={fields[j]!r} is not a number") from None
    bad = np.flatnonzero(~np.isfinite(vals))
    if len(bad):
        j = int(bad[0])
        raise SubmissionError(f"{path}:{line_no}: {HEADER[j + 1]} is {fields[j]!r}, expected a finite number")
    return vals.astype(np.float32)


def _is_number(x: str) -> bool:
    try:
        float(x)
        return True
    except ValueError:
        return False


def expand_odd_columns(odd: np.ndarray) -> np.ndarray:
    """Full maps (..., 70, 70) from their odd columns (..., 70, 35) (x_1, x_3, ..., x_69):
    even columns 2..68 are the mean of their odd neighbours, column 0 copies column 1
    (see the module doc); the odd columns are kept exactly."""
    odd = np.asarray(odd)
    if odd.shape[-2:] != (N_ROWS, len(ODD_COLUMNS)):
        raise SubmissionError(f"expand_odd_columns: expected (..., {N_ROWS}, {len(ODD_COLUMNS)}) odd columns, "
                              f"got {odd.shape}")
    full = np.empty(odd.shape[:-1] + (70,), dtype=odd.dtype)
    full[..., 1::2] = odd
    full[..., 2::2] = 0.5 * (odd[..., :-1] + odd[..., 1:])
    full[..., 0] = odd[..., 0]
    return full


def score_submission(path: os.PathLike, truth: Dict[str, np.ndarray]) -> float:
    """The competition's MAE (odd columns) of a submission against true maps (m/s)."""
    total, count = 0.0, 0
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        next(reader)
        for row in reader:
            m = _OID_YPOS.match(row[0])
            oid, r = m.group(1), int(m.group(2))
            if oid not in truth:
                raise SubmissionError(f"{path}: oid {oid!r} has no true velocity")
            t = np.asarray(truth[oid]).reshape(70, 70)[r, ODD_COLUMNS]
            total += float(np.abs(np.asarray(row[1:], dtype=np.float64) - t).sum())
            count += len(ODD_COLUMNS)
    if count == 0:
        raise SubmissionError(f"{path}: no rows to score")
    return total / count


def load_solution(path: os.PathLike) -> Dict[str, np.ndarray]:
    """True test velocities saved by ``tools.synth`` (``test_solution.npz``) as oid -> (70,70)."""
    path = Path(path)
    if not path.is_file():
        raise SubmissionError(f"{path}: no solution file (tools.synth writes test_solution.npz)")
    d = np.load(path, allow_pickle=False)
    if "oids" not in d or "velocity" not in d:
        raise SubmissionError(f"{path}: expected arrays 'oids' and 'velocity'")
    return {str(o): v.reshape(70, 70) for o, v in zip(d["oids"], d["velocity"])}
