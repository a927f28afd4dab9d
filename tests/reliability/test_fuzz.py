"""Property-based tests (hypothesis) of the parts that touch files or parse user input:
the submission writer and validator, the normalisations and their inverses, the layout
indexer over random folder trees, and the training configuration (dicts and flags).

Each property runs under the ``fwi-dev`` profile in the default run and under ``fwi-ci``
(many more examples) in the slow-marked variant that ``make test-slow`` runs; the number
of examples per profile is ``FUZZ_EXAMPLES`` in ``conftest.py``, and every test checks
that at least that many ran.
"""
from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import string
import tempfile
import typing
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tests.reliability.conftest import FUZZ_EXAMPLES
from tests.reliability.helpers import temp_leftovers

PROFILES = [pytest.param("dev", id="dev"), pytest.param("ci", id="ci", marks=pytest.mark.slow)]


def fuzz(profile: str, strategy, prop) -> int:
    """Run ``prop`` on examples of ``strategy`` under the profile; returns the number run."""
    calls = []

    @settings(settings.get_profile(f"fwi-{profile}"))
    @given(strategy)
    def run(example):
        calls.append(1)
        prop(example)

    run()
    assert len(calls) >= FUZZ_EXAMPLES[profile]
    return len(calls)


# ================================================================== submissions
_OID = st.text(alphabet=string.ascii_lowercase + string.digits + "_-.", min_size=1, max_size=14)


@st.composite
def submissions(draw):
    oids = draw(st.lists(_OID, min_size=1, max_size=3, unique=True))
    maps = draw(hnp.arrays(np.float32, (len(oids), 70, 70),
                           elements=st.floats(1450, 4550, width=32),
                           fill=st.floats(1500, 4500, width=32)))
    return oids, maps


def _read(path: Path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], {r[0]: np.array(r[1:], dtype=np.float64) for r in rows[1:]}


@pytest.mark.parametrize("profile", PROFILES)
def test_submission_writer_and_validator_round_trip(profile, tmp_path):
    from fwi_core.data import HEADER, SubmissionRangeWarning, validate_submission, write_submission
    from fwi_core.data.submission import ODD_COLUMNS
    from fwi_core.inference_plan import format_submission_rows

    counter = iter(range(10 ** 9))

    def prop(example):
        oids, maps = example
        folder = tmp_path / f"ex{next(counter)}"
        path = write_submission(folder / "submission.csv", oids, maps)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            info = validate_submission(path, oids)
        assert info == {"oids": len(oids), "rows": 70 * len(oids)}
        written = np.array([[[float(f"{v:.3f}") for v in row] for row in m[:, ODD_COLUMNS]] for m in maps])
        outside = bool(((written < 1500) | (written > 4500)).any())
        assert outside == any(issubclass(w.category, SubmissionRangeWarning) for w in caught)
        header, values = _read(path)
        assert header == HEADER
        for oid, m in zip(oids, maps):
            for r in range(70):
                got = values[f"{oid}_y_{r}"]
                assert np.all(np.abs(got - m[r, ODD_COLUMNS].astype(np.float64)) <= 5e-4 + 1e-9)
        if not outside and maps.min() >= 1500 and maps.max() <= 4500:   # the planner's fast writer: same bytes
            body = format_submission_rows(oids, maps)
            assert path.read_bytes() == (",".join(HEADER) + "\n").encode() + body
        assert not temp_leftovers(folder)

    fuzz(profile, submissions(), prop)


_MUTATIONS = st.sampled_from(["drop_line", "dup_line", "field", "truncate", "bytes", "header", "swap_id"])


@pytest.mark.parametrize("profile", PROFILES)
def test_validator_gives_a_submission_error_or_a_valid_count_on_any_damage(profile, tmp_path):
    from fwi_core.data import SubmissionError, validate_submission, write_submission

    base = tmp_path / "base.csv"
    write_submission(base, ["aa", "bb"], np.full((2, 70, 70), 3000.0, np.float32))
    text = base.read_bytes()
    counter = iter(range(10 ** 9))

    def prop(example):
        ops, pos, junk = example
        data = bytearray(text)
        for op in ops:
            lines = bytes(data).split(b"\n")
            i = pos % max(1, len(lines))
            if op == "drop_line":
                del lines[i]
            elif op == "dup_line":
                lines.insert(i, lines[i])
            elif op == "field":
                parts = lines[i].split(b",")
                parts[pos % len(parts)] = junk
                lines[i] = b",".join(parts)
            elif op == "header":
                lines[0] = lines[0].replace(b"x_1,", junk + b",", 1)
            elif op == "swap_id":
                lines[i] = lines[i].replace(b"aa_y_", b"bb_y_", 1)
            data = bytearray(b"\n".join(lines))
            if op == "truncate":
                data = data[:pos % (len(data) + 1)]
            elif op == "bytes":
                data[pos % (len(data) + 1):pos % (len(data) + 1)] = junk
        path = tmp_path / f"d{next(counter)}.csv"
        path.write_bytes(bytes(data))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                info = validate_submission(path, ["aa", "bb"])
        except SubmissionError:
            return
        assert info == {"oids": 2, "rows": 140}

    fuzz(profile, st.tuples(st.lists(_MUTATIONS, min_size=1, max_size=3), st.integers(0, 10 ** 6), st.binary(max_size=6)),
         prop)


# ================================================================== normalisation
@pytest.mark.parametrize("profile", PROFILES)
def test_velocity_normalisation_inverts(profile):
    from fwi_core.data import denormalize_velocity, normalize_velocity

    def prop(v):
        y = normalize_velocity(v)
        np.testing.assert_allclose(denormalize_velocity(y), v, rtol=1e-12, atol=1e-8)
        inside = (v >= 1500) & (v <= 4500)
        assert np.all(np.abs(y[inside]) <= 1.0 + 1e-12)
        t = normalize_velocity(torch.from_numpy(v))
        assert torch.is_tensor(t)
        np.testing.assert_allclose(t.numpy(), y, rtol=1e-12, atol=1e-12)
        v32 = v.astype(np.float32)
        np.testing.assert_allclose(denormalize_velocity(normalize_velocity(v32)), v32, rtol=1e-6,
                                   atol=1e-3 + 1e-6 * np.abs(v32).max(initial=0))
        order = np.argsort(v, kind="stable")
        assert np.all(np.diff(y[order]) >= 0)

    fuzz(profile, hnp.arrays(np.float64, st.integers(1, 50), elements=st.floats(-1e7, 1e7)), prop)


@pytest.mark.parametrize("profile", PROFILES)
def test_seismic_normalisation_inverts(profile):
    from fwi_core.data import denormalize_seismic, normalize_seismic

    def prop(x):
        y = normalize_seismic(x)
        back = denormalize_seismic(y)
        assert np.all(np.abs(back - x) <= 1e-13 * (1 + np.abs(x)) * 64)
        assert np.all(np.sign(back) * np.sign(x) >= 0)
        order = np.argsort(x, kind="stable")
        assert np.all(np.diff(y[order]) >= 0)
        t = normalize_seismic(torch.from_numpy(x))
        np.testing.assert_allclose(t.numpy(), y, rtol=1e-12, atol=1e-12)
        x32 = x.astype(np.float32)
        back32 = denormalize_seismic(normalize_seismic(x32))
        assert back32.dtype == np.float32
        assert np.all(np.abs(back32.astype(np.float64) - x32) <= 1e-5 * (1 + np.abs(x32.astype(np.float64))))
        tb = denormalize_seismic(normalize_seismic(torch.from_numpy(x32)))
        np.testing.assert_allclose(tb.numpy(), back32, rtol=1e-5, atol=1e-6)

    fuzz(profile, hnp.arrays(np.float64, st.integers(1, 50), elements=st.floats(-1e6, 1e6)), prop)


# ================================================================== layout indexer
_FAMILIES = ["FlatVel_A", "CurveVel_B", "FlatFault_A", "CurveFault_B", "Style_A", "Pseudo", "My Data"]
_DEFECTS = ["data_without_model", "model_without_data", "truncated", "wrong_shape", "wrong_dtype",
            "count_mismatch", "empty_family", "not_npy"]
_JUNK = ["top_readme", "checkpoints_dir", "family_notes", "family_dotfile", "temp_file"]


@st.composite
def trees(draw):
    fams = draw(st.lists(st.sampled_from(_FAMILIES), min_size=1, max_size=3, unique=True))
    spec = {fam: (draw(st.sampled_from(["vel", "fault"])),
                  draw(st.lists(st.integers(1, 3), min_size=1, max_size=3)))       # samples per file
            for fam in fams}
    defect = draw(st.one_of(st.none(), st.sampled_from(_DEFECTS)))
    junk = draw(st.lists(st.sampled_from(_JUNK), max_size=3, unique=True))
    which = draw(st.integers(0, 10 ** 6))
    only = draw(st.one_of(st.none(), st.lists(st.sampled_from(fams + ["Empty_X"]), min_size=1, unique=True)))
    via_train_samples = draw(st.booleans())
    return spec, defect, junk, which, only, via_train_samples


def _write(path: Path, shape, dtype=np.float32):
    path.parent.mkdir(parents=True, exist_ok=True)
    m = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=tuple(shape))
    del m


def _build_tree(root: Path, spec, defect, junk, which):
    """Write the tree; returns (expected pairs, expected error type or None, file the
    error must name)."""
    from fwi_core.data import DataFormatError, LayoutError, MissingPairError

    ts = root / "train_samples"
    pairs = []
    for fam, (kind, counts) in spec.items():
        for k, n in enumerate(counts):
            if kind == "vel":
                s, v = f"{fam}/data/data{k + 1}.npy", f"{fam}/model/model{k + 1}.npy"
            else:
                s, v = f"{fam}/seis{2 * k + 2}_1_0.npy", f"{fam}/vel{2 * k + 2}_1_0.npy"
            _write(ts / s, (n, 5, 1000, 70))
            _write(ts / v, (n, 1, 70, 70))
            pairs.append((fam, s, v, n))
    expected_error, named = None, None
    fam, s, v, n = pairs[which % len(pairs)]
    if defect == "data_without_model":
        (ts / v).unlink()
        expected_error, named = MissingPairError, Path(s).name
    elif defect == "model_without_data":
        (ts / s).unlink()
        expected_error, named = MissingPairError, Path(v).name
    elif defect == "truncated":
        with open(ts / s, "r+b") as f:
            f.truncate(200)
        expected_error, named = DataFormatError, Path(s).name
    elif defect == "wrong_shape":
        _write(ts / s, (n, 5, 1000, 69))
        expected_error, named = DataFormatError, Path(s).name
    elif defect == "wrong_dtype":
        _write(ts / v, (n, 1, 70, 70), np.int32)
        expected_error, named = DataFormatError, Path(v).name
    elif defect == "count_mismatch":
        _write(ts / v, (n + 1, 1, 70, 70))
        expected_error, named = MissingPairError, Path(v).name
    elif defect == "empty_family":
        (ts / "Empty_X").mkdir(parents=True)
        expected_error, named, fam = LayoutError, "Empty_X", "Empty_X"
    elif defect == "not_npy":
        (ts / v).write_text("velocity\n")
        expected_error, named = DataFormatError, Path(v).name
    for j in junk:                 # things a real folder holds that are not data
        if j == "top_readme":
            (ts / "README.md").write_text("notes\n")
        elif j == "checkpoints_dir":
            (ts / ".ipynb_checkpoints").mkdir(exist_ok=True)
            (ts / ".ipynb_checkpoints" / "x.ipynb").write_text("{}")
        elif j == "family_notes":
            (ts / pairs[0][0] / "notes.txt").write_text("notes\n")
        elif j == "family_dotfile":
            (ts / pairs[0][0] / ".DS_Store").write_bytes(b"\0")
        elif j == "temp_file":
            p = ts / pairs[-1][1]
            (p.parent / f".{p.name}.k2j4.npy.tmp").write_bytes(b"\x93NUMPY")
    return pairs, expected_error, named, fam


@pytest.mark.parametrize("profile", PROFILES)
def test_layout_indexer_over_random_trees(profile):
    from fwi_core.data import DataError, LayoutError, index_train

    def prop(example):
        spec, defect, junk, which, only, via_ts = example
        with tempfile.TemporaryDirectory() as d:
            root = Path(d) / "comp"
            pairs, error, named, bad_family = _build_tree(root, spec, defect, junk, which)
            wanted = None if only is None else set(only)
            pairs = [p for p in pairs if wanted is None or p[0] in wanted]
            if wanted is not None and bad_family not in wanted:
                error = None
            if error is None and not pairs:
                error, named = LayoutError, "no family folders with data"
            try:
                got = index_train(root / "train_samples" if via_ts else root, families=only)
            except DataError as e:
                assert error is not None, f"unexpected {type(e).__name__}: {e}"
                assert isinstance(e, error), f"{type(e).__name__}: {e}, expected {error.__name__}"
                assert named in str(e), f"{e} does not name {named}"
                return
            assert error is None, f"no error, expected {error.__name__} naming {named}"
            ts = root / "train_samples"
            assert [(p.family, p.seismic.relative_to(ts).as_posix(), p.velocity.relative_to(ts).as_posix(), p.n)
                    for p in got] == sorted(pairs, key=lambda p: (p[0], p[1]))

    fuzz(profile, trees(), prop)


# ================================================================== training configuration
_JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-10 ** 12, 10 ** 12) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6)


def _plausible(name: str, default):
    """Values near what a user would write for a field (so some configs validate)."""
    from fwi_core.models import list_models
    from fwi_core.train.config import AMP_MODES, MONITORS, OPTIMIZERS, SCHEDULES

    options = {"amp": AMP_MODES, "schedule": SCHEDULES, "optimizer": OPTIMIZERS, "monitor": MONITORS,
               "model": tuple(list_models()), "device": ("cpu", "auto", "gpu", "cuda:0")}
    if name in options:
        return st.sampled_from(list(options[name]))
    if isinstance(default, bool):
        return st.booleans()
    if isinstance(default, int):
        return st.integers(-2, 12) | st.floats(-2, 12)
    if isinstance(default, float):
        return st.floats(-0.5, 1.5)
    if isinstance(default, tuple):
        return st.lists(st.integers(-1, 6) | st.floats(0, 3), max_size=3)
    if isinstance(default, dict):
        return st.just({}) | st.dictionaries(st.sampled_from(["width", "drop", "augment", "families"]),
                                             _JSONISH, max_size=2)
    return st.none() | st.text(max_size=6) | st.floats(0, 100)


@st.composite
def config_dicts(draw):
    from fwi_core.train import TrainConfig

    defaults = TrainConfig().to_dict()
    names = draw(st.lists(st.sampled_from(sorted(defaults)), max_size=6, unique=True))
    d = {n: draw(st.one_of(_plausible(n, defaults[n]), _JSONISH)) for n in names}
    if draw(st.integers(0, 9)) == 0:
        d[draw(st.text(max_size=8))] = draw(_JSONISH)
    return d


def _check_types(cfg) -> None:
    """An accepted config holds values of its declared types."""
    from fwi_core.train import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    for name, hint in hints.items():
        v = getattr(cfg, name)
        if typing.get_origin(hint) is typing.Union:
            if v is None:
                continue
            hint = [a for a in typing.get_args(hint) if a is not type(None)][0]
        if hint is bool:
            assert isinstance(v, bool), name
        elif hint is int:
            assert isinstance(v, int) and not isinstance(v, bool), (name, v)
        elif hint is float:
            assert isinstance(v, float) and math.isfinite(v), (name, v)
        elif hint is str:
            assert isinstance(v, str), name
        elif typing.get_origin(hint) is dict:
            assert isinstance(v, dict), name
        else:
            assert isinstance(v, tuple), name


@pytest.mark.parametrize("profile", PROFILES)
def test_config_dicts_validate_or_raise_config_error(profile):
    from fwi_core.train import ConfigError, TrainConfig

    def prop(d):
        try:
            cfg = TrainConfig.from_dict(d).validate()
        except ConfigError as e:
            assert str(e)
            return
        _check_types(cfg)

    fuzz(profile, config_dicts(), prop)


@st.composite
def argvs(draw):
    """Command lines of ``python -m fwi_core.train``: known flags (and a few unknown ones)
    with the number of values each takes, the values plausible or junk."""
    import json

    from fwi_core.train import TrainConfig
    from fwi_core.train.cli import build_parser

    defaults = TrainConfig().to_dict()
    actions = [a for a in build_parser()._actions if a.option_strings and a.dest != "help"]
    tokens = []
    for _ in range(draw(st.integers(0, 6))):
        if draw(st.integers(0, 9)) == 0:
            tokens.append("--" + draw(st.text(string.ascii_lowercase + "-", max_size=8)))
            continue
        a = draw(st.sampled_from(actions))
        tokens.append(draw(st.sampled_from(a.option_strings)))
        count = {None: 1, "?": draw(st.integers(0, 1)), "*": draw(st.integers(0, 3)), 0: 0}.get(a.nargs, a.nargs)
        for _ in range(count):
            if a.dest in defaults and draw(st.integers(0, 3)) > 0:
                v = draw(_plausible(a.dest, defaults[a.dest]))
                v = v[0] if isinstance(v, list) and v and a.nargs in ("*", 2) else v
                tokens.append(json.dumps(v) if isinstance(v, (dict, list)) else str(v))
            else:
                tokens.append(draw(st.text(string.printable, max_size=8)))
    return tokens


@pytest.mark.parametrize("profile", PROFILES)
def test_cli_flags_validate_or_exit_with_a_message(profile, tmp_path, monkeypatch):
    from fwi_core.train import ConfigError, TrainError
    from fwi_core.train.cli import config_from_args

    monkeypatch.chdir(tmp_path)          # a random --config path reads nothing of the repo

    def prop(argv):
        out, err = io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
                cfg = config_from_args(argv).validate()
        except SystemExit as e:          # argparse: the problem on stderr (or --h[elp]: the usage)
            assert (e.code == 2 and "error:" in err.getvalue()) or (e.code == 0 and "usage:" in out.getvalue())
            return
        except (ConfigError, TrainError) as e:
            assert str(e)
            return
        _check_types(cfg)

    fuzz(profile, argvs(), prop)
