"""One error root: every error fwi_core raises for a cause the user can fix is an FWIError,
so an entry point catches one type and prints one clear line."""
import ast
import importlib
import inspect
from pathlib import Path

import pytest

import fwi_core.errors as errors
from fwi_core.errors import FWIError

ROOT = Path(__file__).resolve().parents[1]


def exception_classes():
    """Every exception class defined anywhere in fwi_core (warnings and private ones aside)."""
    found = []
    for path in sorted((ROOT / "fwi_core").rglob("*.py")):
        tree = ast.parse(path.read_text())
        names = [n.name for n in tree.body if isinstance(n, ast.ClassDef) and not n.name.startswith("_")]
        if not names:
            continue
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        module = importlib.import_module(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
        for name in names:
            cls = getattr(module, name)
            if inspect.isclass(cls) and issubclass(cls, BaseException) and not issubclass(cls, Warning):
                found.append(cls)
    return found


def test_every_error_is_an_fwi_error():
    classes = exception_classes()
    assert errors.DataError in classes and errors.InsufficientBudgetError in classes
    assert [c.__qualname__ for c in classes if not issubclass(c, FWIError)] == []


def test_errors_keep_their_builtin_bases():
    """Callers that catch ValueError / RuntimeError keep working."""
    assert issubclass(errors.DataFormatError, ValueError) and issubclass(errors.ConfigError, ValueError)
    assert issubclass(errors.CheckpointError, RuntimeError) and issubclass(errors.TrainError, RuntimeError)
    assert issubclass(errors.StageError, ValueError) and issubclass(errors.UnknownModelError, RuntimeError)


@pytest.mark.parametrize("raise_it", [
    lambda: __import__("fwi_core.models", fromlist=["x"]).create_model("no_such_model"),
    lambda: __import__("fwi_core.data", fromlist=["x"]).find_competition_root("/no/such/folder"),
    lambda: __import__("fwi_core.models.checkpoint", fromlist=["x"]).load_checkpoint("/no/such.pt"),
    lambda: __import__("fwi_core.params", fromlist=["x"]).check_parameters("infer", {"batch_size": "16"}),
])
def test_user_errors_from_each_layer_are_caught_as_one_type(raise_it):
    with pytest.raises(FWIError) as info:
        raise_it()
    assert str(info.value)          # a message, not a bare type
