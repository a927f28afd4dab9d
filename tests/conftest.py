import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("FWI_PROGRESS", "0")

SHARED = ROOT.parent / "shared"
REFERENCE = SHARED / "reference" / "openfwi_forward_reference.npz"


@pytest.fixture(scope="session")
def reference():
    import numpy as np

    if not REFERENCE.exists():
        pytest.fail(f"reference data missing: {REFERENCE} (the shared/ folder sits next to the checkout)")
    return dict(np.load(REFERENCE))
