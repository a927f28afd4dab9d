"""The gains table: computed by hand, saved and found beside a checkpoint, looked up by
name, kind or default; the cheapest good member first."""
import json

import numpy as np
import pytest

from fwi_core.inference_plan import StageGains, build_stages, find_stage_gains
from fwi_core.inference_plan.measure import compute_stage_gains
from tests.inference_plan.helpers import fake_ensemble


def test_first_member_is_the_cheapest_good_one():
    g = StageGains(member_mae={"a": 30.0, "b": 31.0, "c": 60.0})
    assert g.member_order(["a", "b", "c"], {"a": 2.0, "b": 1.0, "c": 0.1}) == ["b", "a", "c"]
    assert StageGains().member_order(["a", "b"], {"a": 2.0, "b": 1.0}) == ["b", "a"]


def test_compute_stage_gains_by_hand_and_round_trip(tmp_path):
    true = np.full((4, 1, 70, 70), 2000.0, np.float32)
    first = true + 100.0
    second = true + np.array([50.0, 50.0, 10.0, 10.0], np.float32)[:, None, None, None]
    g = compute_stage_gains(true, {"member:a": first, "flip": second}, families=["A", "A", "B", "B"],
                            members={"a": first})
    assert g.gains == {"member:a": pytest.approx(900.0), "flip": pytest.approx(70.0)}
    assert g.per_family["flip"] == {"A": pytest.approx(50.0), "B": pytest.approx(90.0)}
    assert g.member_mae == {"a": pytest.approx(100.0)} and g.samples == 4 and g.order == ["member:a", "flip"]
    path = g.save(tmp_path)
    (tmp_path / "best.pt").write_bytes(b"")
    assert path.name == "stage_gains.json" and find_stage_gains([tmp_path / "best.pt"]) == StageGains.load(path)
    stage = build_stages(["members", "flip", "mc_dropout"], ["a"], {"ensemble": fake_ensemble(1)})
    assert [g.gain(s) for s in stage] == [pytest.approx(900.0), pytest.approx(70.0), 0.05]
    bad = json.loads(path.read_text())
    bad["gains"]["flip"] = "lots"
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="gains.flip must be a finite number"):
        StageGains.load(path)
