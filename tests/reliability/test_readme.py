"""The README's Reliability figures are the real sizes of the tests."""
from __future__ import annotations

import inspect
import re
from pathlib import Path

from tests.reliability import test_fuzz, test_kills
from tests.reliability.cases import CASES
from tests.reliability.conftest import FUZZ_EXAMPLES
from tests.reliability.killer import KILLS_DEFAULT, KILLS_SLOW

README = Path(__file__).resolve().parents[2] / "README.md"


def _section() -> str:
    text = README.read_text()
    return text[text.index("## Reliability"):text.index("\n## ", text.index("## Reliability") + 5)]


def _properties(module, param: str):
    return [f for n, f in vars(module).items()
            if n.startswith("test_") and callable(f) and param in inspect.signature(f).parameters]


def test_readme_reliability_figures_match_the_tests():
    s = re.sub(r"\s+", " ", _section())
    n = len(CASES)
    assert f"| bad-input cases with a clear error and nothing half-written | {n} of {n} | {n} of {n} |" in s
    assert f"One table (`tests/reliability/cases.py`) of {n} cases" in s
    targets = len(_properties(test_kills, "n"))
    assert f"| kill points tried and survived ({targets} targets) | {targets * KILLS_DEFAULT} ({KILLS_DEFAULT} per " \
           f"target) | {targets * KILLS_SLOW} ({KILLS_SLOW} per target) |" in s
    props = len(_properties(test_fuzz, "profile"))
    dev, ci = FUZZ_EXAMPLES["dev"], FUZZ_EXAMPLES["ci"]
    assert f"| fuzz examples ({props} properties) | {props * dev:,} ({dev:,} each) | {props * ci:,} ({ci:,} each) |" in s
    assert f"{dev:,} examples per property in `make test`, {ci:,} in `make test-slow`" in s


def test_readme_promises_about_parameters_and_submissions(tmp_path):
    import numpy as np
    import pytest

    from fwi_core.data import SubmissionError, SubmissionRangeWarning, validate_submission, write_submission
    from fwi_core.params import ParameterError, check_parameters

    s = re.sub(r"\s+", " ", _section())
    quoted = re.search(r"`batch_size = \"16\"` stops with `ParameterError: (.+?)`", s).group(1)
    with pytest.raises(ParameterError) as e:
        check_parameters("train", {"batch_size": "16"})
    assert str(e.value) == quoted
    v = np.full((1, 70, 70), 3000.0, np.float32)
    v[0, 10, 3] = 4600.0
    path = write_submission(tmp_path / "s.csv", ["a"], v)
    with pytest.warns(SubmissionRangeWarning, match=r"1 values outside \[1500, 4500\] m/s \(first at line 12, x_3 = "):
        validate_submission(path, ["a"])
    with pytest.raises(SubmissionError, match="1 values outside"):
        validate_submission(path, ["a"], out_of_range="error")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert validate_submission(path, ["a"], out_of_range="ignore") == {"oids": 1, "rows": 70}
    for oid in ("a,b", 'a"b', "a b", "a\nb", ""):
        with pytest.raises(SubmissionError, match="is not a valid test id"):
            write_submission(tmp_path / "t.csv", [oid], v)
    assert not (tmp_path / "t.csv").exists()
