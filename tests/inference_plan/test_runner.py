"""Running stages: unreadable files and unreached rows get the fallback, the progress bar."""
import re

import numpy as np
import pytest

from fwi_core.data import DataFormatError, validate_submission
from fwi_core.inference_plan import CorruptedFileWarning, TestFileSource
from tests.inference_plan.helpers import FakeClock, fake_ensemble, write_test_root, small_source, planner


def test_a_first_pass_that_runs_late_fills_the_rest_with_the_fallback(tmp_path):
    clock = FakeClock()
    costs = iter(1.4 ** np.arange(100))    # each batch 1.4 times slower than the one before
    ens = fake_ensemble(1, clock, [1.0], jitter=lambda: float(next(costs)))
    src, _ = small_source(20)
    p = planner(ens, src, tmp_path, clock, budget=30.0, stages=["members"])
    s = p.run()
    assert clock() <= 30.0 and s.met_deadline
    first = s.stages[0]
    assert first["status"] == "partial" and first["files"] == 16 and s.fallback_files == 4
    assert validate_submission(tmp_path / "sub.csv", src.ids)["oids"] == 20


def test_corrupted_test_file_gets_the_mean_map_a_warning_and_a_summary_line(tmp_path):
    root = write_test_root(tmp_path / "data", 5)
    bad = sorted((root / "test").glob("*.npy"))[2]
    bad.write_bytes(b"\x93NUMPY garbage")
    src = TestFileSource(root)
    p = planner(fake_ensemble(1), src, tmp_path, stages=["members"], keep_state=True)
    with pytest.warns(CorruptedFileWarning, match=bad.stem):
        s = p.run()
    assert list(s.bad_files) == [bad.stem] and "not a readable .npy" in s.bad_files[bad.stem]
    assert bad.stem in s.format() and s.fallback_files == 1
    rows = p.read_prediction(0, 5)
    good = [i for i in range(5) if i != 2]
    np.testing.assert_allclose(rows[2], rows[good].mean(0), rtol=1e-6)
    assert validate_submission(tmp_path / "sub.csv", src.ids)["oids"] == 5
    with pytest.raises(DataFormatError, match=f"{bad.stem}.*strict"):
        planner(fake_ensemble(1), src, tmp_path / "strict", stages=["members"], strict=True).run()


def test_when_no_file_is_readable_the_fallback_is_constant(tmp_path):
    src, _ = small_source(3, bad={0, 1, 2})
    with pytest.warns(CorruptedFileWarning):
        p = planner(fake_ensemble(1), src, tmp_path, stages=["members"], keep_state=True)
        s = p.run()
    assert s.fallback_files == 3 and (p.read_prediction(0, 3) == 3000.0).all()


def test_progress_bar_names_the_stage_and_the_deadline(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FWI_PROGRESS", "1")
    clock = FakeClock()
    src, _ = small_source(6)
    planner(fake_ensemble(1, clock, [0.01]), src, tmp_path, clock, budget=7200.0, stages=["members"],
            progress=True).run()
    err = capsys.readouterr().err
    assert "member:m0" in err and "deadline in 1:59:59" in err
    assert re.search(r"6/6 \[\d\d:\d\d<\d\d:\d\d", err)     # elapsed<ETA
