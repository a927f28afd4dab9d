"""The fast submission writer: the same bytes as the reference writer, written atomically."""
import numpy as np
import pytest

from fwi_core.data import SubmissionError, SubmissionWriter, validate_submission
from fwi_core.inference_plan import format_submission_rows
from tests.inference_plan.helpers import fake_ensemble, small_source, planner


def test_fast_csv_rows_equal_the_submission_writer_byte_for_byte(tmp_path):
    rng = np.random.default_rng(1)
    v = rng.uniform(1500, 4500, (6, 70, 70)).astype(np.float32)
    v[0, 0], v[0, 1] = 1500.0, 4500.0
    v[0, 2] = np.float32(2000.0625)           # exact ties at the 4th decimal: round half to even
    v[0, 3] = np.float32(2999.9995)
    v[1] = np.round(v[1] * 16) / 16
    for oids in (["a1b2c3d4e5", "0000000000", "ffffffffff", "0a0a0a0a0a", "1111111111", "2222222222"],
                 ["a", "bb", "ccc", "dddd", "e", "ffffffffffff"]):
        with SubmissionWriter(tmp_path / "ref.csv") as w:
            w.write_batch(oids, v)
        ref = (tmp_path / "ref.csv").read_bytes().split(b"\n", 1)[1]
        assert format_submission_rows(oids, v) == ref
    with pytest.raises(ValueError, match="within"):
        format_submission_rows(["x"], np.full((1, 70, 70), 4500.5, np.float32))
    with pytest.raises(ValueError, match="finite"):
        format_submission_rows(["x"], np.full((1, 70, 70), np.nan, np.float32))


def test_validate_rejects_a_truncated_csv_so_the_atomic_write_matters(tmp_path):
    src, _ = small_source(4)
    planner(fake_ensemble(1), src, tmp_path, stages=["members"]).run()
    text = (tmp_path / "sub.csv").read_text().splitlines()
    (tmp_path / "cut.csv").write_text("\n".join(text[:100]) + "\n")
    with pytest.raises(SubmissionError):
        validate_submission(tmp_path / "cut.csv", src.ids)
    assert not list(tmp_path.glob(".sub.csv.*.tmp"))
