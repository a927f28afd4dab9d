import numpy as np
import pytest

from fwi_core.data import (HEADER, SubmissionError, SubmissionWriter, score_submission, validate_submission,
                           write_submission)


def _maps(n, seed=0):
    return np.random.default_rng(seed).uniform(1500, 4500, (n, 1, 70, 70)).astype(np.float32)


def test_write_validate_and_score(tmp_path):
    oids = ["000039dca2", "0a1b2c3d4e"]
    v = _maps(2)
    p = write_submission(tmp_path / "sub.csv", oids, v)
    lines = p.read_text().splitlines()
    assert lines[0] == "oid_ypos," + ",".join(f"x_{c}" for c in range(1, 70, 2))
    assert lines[1].startswith("000039dca2_y_0,") and len(lines) == 1 + 140
    assert validate_submission(p, oids) == {"oids": 2, "rows": 140}
    truth = {o: m[0] for o, m in zip(oids, v)}
    assert score_submission(p, truth) < 1e-3  # written with 3 decimals
    shifted = {o: m + 10 for o, m in truth.items()}
    assert abs(score_submission(p, shifted) - 10) < 1e-3


def test_writer_streams_and_leaves_nothing_on_error(tmp_path):
    out = tmp_path / "sub.csv"
    with pytest.raises(SubmissionError, match="NaN"):
        with SubmissionWriter(out) as w:
            w.write("a", _maps(1)[0])
            bad = _maps(1)[0]
            bad[0, 0, 0] = np.nan
            w.write("b", bad)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(SubmissionError, match="shape"):
        with SubmissionWriter(out) as w:
            w.write("a", np.zeros((70, 69)))
    with SubmissionWriter(out) as w:
        for i in range(5):
            w.write_batch([f"{i:010x}"], _maps(1, i))
    assert validate_submission(out)["oids"] == 5


def _csv(tmp_path, rows, header=None):
    p = tmp_path / "s.csv"
    p.write_text(",".join(header or HEADER) + "\n" + "\n".join(rows) + ("\n" if rows else ""))
    return p


def _rows(oid, n=70, val="3000.0"):
    return [f"{oid}_y_{r}," + ",".join([val] * 35) for r in range(n)]


@pytest.mark.parametrize("case, match", [
    ("header", "header must be"),
    ("fields", "36"),
    ("missing_row", "lacks rows"),
    ("dup_row", "appears twice"),
    ("nan", "finite"),
    ("text", "not a number"),
    ("bad_id", "not '<oid>_y_<row>'"),
])
def test_validator_catches(tmp_path, case, match):
    rows = _rows("aaaaaaaaaa")
    header = None
    if case == "header":
        header = ["id"] + HEADER[1:]
    elif case == "fields":
        rows[3] = rows[3] + ",1.0"
    elif case == "missing_row":
        rows = rows[:-1]
    elif case == "dup_row":
        rows[5] = rows[4]
    elif case == "nan":
        rows[7] = rows[7].replace("3000.0", "nan", 1)
    elif case == "text":
        rows[7] = rows[7].replace("3000.0", "abc", 1)
    elif case == "bad_id":
        rows[0] = rows[0].replace("_y_0", "_y_70")
    with pytest.raises(SubmissionError, match=match):
        validate_submission(_csv(tmp_path, rows, header))


def test_validator_checks_test_oids(tmp_path):
    p = _csv(tmp_path, _rows("aaaaaaaaaa"))
    validate_submission(p, ["aaaaaaaaaa"])
    with pytest.raises(SubmissionError, match="1 test oids missing"):
        validate_submission(p, ["aaaaaaaaaa", "bbbbbbbbbb"])
    with pytest.raises(SubmissionError, match="not in the test set"):
        validate_submission(p, [])
