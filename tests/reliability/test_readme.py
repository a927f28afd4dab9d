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
