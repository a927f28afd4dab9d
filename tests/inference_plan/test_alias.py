"""``fwi_core.tta``, the package's former name, is an alias for one release: the same public
names, and a DeprecationWarning once, naming the new package."""
import importlib
import sys
import warnings

import pytest

import fwi_core.inference_plan as inference_plan


def test_the_old_name_works_and_warns_once(monkeypatch):
    monkeypatch.delitem(sys.modules, "fwi_core.tta", raising=False)
    with pytest.warns(DeprecationWarning, match=r"fwi_core\.tta is now fwi_core\.inference_plan; the alias goes "
                                                r"in the next release") as caught:
        import fwi_core.tta as tta
    assert len([w for w in caught if issubclass(w.category, DeprecationWarning)]) == 1
    assert caught[0].filename == __file__          # it names the importing line
    assert tta.__all__ == inference_plan.__all__ and len(tta.__all__) >= 30
    for name in inference_plan.__all__:
        assert getattr(tta, name) is getattr(inference_plan, name), name
    from fwi_core.tta import BudgetedInference, run_budgeted           # noqa: F401 - the usual spelling
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        importlib.import_module("fwi_core.tta")                        # once: a second import is silent
