"""Deprecated alias of :mod:`fwi_core.inference_plan` (time-budgeted inference), kept for
one release: ``from fwi_core.tta import run_budgeted`` still works and warns once. Import
:mod:`fwi_core.inference_plan` instead; the alias goes in the next release. (Only the
package's public names are here, not its submodules: ``fwi_core.tta.planner`` is
``fwi_core.inference_plan.planner``.)"""
import warnings

from ..inference_plan import *  # noqa: F401,F403
from ..inference_plan import __all__  # noqa: F401

# stacklevel 2: the importing line (warnings skips importlib's own frames)
warnings.warn("fwi_core.tta is now fwi_core.inference_plan; the alias goes in the next release",
              DeprecationWarning, stacklevel=2)
