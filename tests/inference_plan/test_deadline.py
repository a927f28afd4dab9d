"""The deadline counts from the process start (and the platform's session limit)."""
import math

import pytest

from fwi_core.inference_plan import Deadline
from tests.inference_plan.helpers import FakeClock


def test_deadline_counts_from_the_process_start(monkeypatch):
    clock = FakeClock(1000.0)
    d = Deadline.from_budget(60.0, clock, age=15.0)
    assert d.at == 1045.0 and d.remaining() == 45.0 and d.spent() == 15.0
    assert math.isinf(Deadline.from_budget(None, clock, age=1.0).remaining())
    with pytest.raises(ValueError, match="positive"):
        Deadline.from_budget(-1, clock, age=0)
    for var in ("KAGGLE_KERNEL_RUN_TYPE", "COLAB_RELEASE_TAG", "SM_MODEL_DIR", "SM_CHANNEL_TRAINING"):
        monkeypatch.delenv(var, raising=False)
    assert Deadline.platform_default(clock=clock, age=0.0).at is None           # locally: no deadline
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    monkeypatch.setenv("FWI_DATA", "/nonexistent")
    k = Deadline.platform_default(clock=clock, age=20.0)
    assert k.at == 1000.0 - 20.0 + 11.5 * 3600 - 300.0
