import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("FWI_PROGRESS", "0")

#: 4 velocity maps (one each of flat, curve, fault, style) and the gathers the host-style
#: simulator produced for them (tests/fixtures/README.md says where they came from)
REFERENCE = ROOT / "tests" / "fixtures" / "host_reference.npz"


@pytest.fixture(scope="session")
def reference():
    """``velocity`` (4, 1, 70, 70), ``seismic`` (4, 5, 1000, 70) float32, ``family`` (4,)."""
    return dict(np.load(REFERENCE))


@pytest.fixture
def one_thread(monkeypatch):
    """One torch thread and no progress bars: the tests share two cores, and results
    compare byte for byte with subprocesses that run the same way. Test modules that need
    it say ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("FWI_PROGRESS", "0")
    yield
    torch.set_num_threads(n)


def _write(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, arr)


@pytest.fixture
def fake_root(tmp_path):
    """A small competition-layout tree with random seismic (fast, no simulation):
    FlatVel_A (2 files x 3), CurveFault_B (1 file x 4), Style_A (1 file x 2), 3 test files."""
    from fwi_core.physics import generate

    rng = np.random.default_rng(0)
    root = tmp_path / "waveform-inversion"
    ts = root / "train_samples"
    for fam, files, names in [
        ("FlatVel_A", [3, 3], [("data/data1.npy", "model/model1.npy"), ("data/data2.npy", "model/model2.npy")]),
        ("CurveFault_B", [4], [("seis6_1_0.npy", "vel6_1_0.npy")]),
        ("Style_A", [2], [("data/data1.npy", "model/model1.npy")]),
    ]:
        for n, (s, v) in zip(files, names):
            _write(ts / fam / s, rng.standard_normal((n, 5, 1000, 70)).astype(np.float32))
            _write(ts / fam / v, generate(fam, n, seed=n))
    for oid in ["000039dca2", "0a1b2c3d4e", "ffffffffff"]:
        _write(root / "test" / f"{oid}.npy", rng.standard_normal((5, 1000, 70)).astype(np.float32))
    return root
