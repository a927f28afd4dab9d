"""Measuring the gains table on validation data (and through tools.evaluate)."""
import numpy as np
import pytest
import torch

from fwi_core.data.normalize import normalize_seismic
from fwi_core.inference_plan import StageGains, find_stage_gains
from fwi_core.inference_plan.measure import measure_stage_gains
from tests.inference_plan.helpers import fake_ensemble, small_source


def test_measure_stage_gains_on_validation_arrays():
    ens = fake_ensemble(2)
    _, data = small_source(6)
    x = normalize_seismic(torch.from_numpy(data))
    true = ens.predict(x, members=["m0"])[0].numpy()        # member m0 is exact here
    g = measure_stage_gains(ens, data, true, stages=["member:m0", "member:m1", "flip"], device="cpu")
    assert list(g.gains) == ["member:m0", "member:m1", "flip"]
    assert g.mae["member:m0"] == pytest.approx(0.0, abs=1e-3) and g.gains["member:m1"] < 0
    assert g.member_mae["m0"] == pytest.approx(0.0, abs=1e-3) and g.member_mae["m1"] > 1


def test_evaluate_writes_the_stage_gains_table_only_where_asked(fake_root, tmp_path, capsys):
    from fwi_core.crf import save_crf_config
    from tests.inference_plan.helpers import tiny_checkpoint
    from tools import evaluate

    ck = [tiny_checkpoint(tmp_path / "run" / "best.pt", 0), tiny_checkpoint(tmp_path / "run" / "snapshot-01.pt", 1)]
    save_crf_config({"window": 3, "iterations": 2}, tmp_path / "run")
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    out = tmp_path / "measured" / "gains.json"
    assert evaluate.main(["--data", str(fake_root), "--checkpoint", *map(str, ck), "--batch-size", "6",
                          "--stage-gains", str(out), "--stages", "members", "flip", "crf", "mc_dropout"]) == 0
    assert "stage gains" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before     # nothing beside the checkpoints
    assert find_stage_gains(ck) is None
    g = StageGains.load(out)
    assert set(g.order[:2]) == {"member:run/best", "member:run/snapshot-01"}
    assert g.order[2:] == ["flip", "crf", "mc_dropout"] and set(g.gains) == set(g.order)
    assert g.samples == 12 and set(g.member_mae) == {"run/best", "run/snapshot-01"}
    assert set(g.members) == {"run/best", "run/snapshot-01"} and all(len(d) == 40 for d in g.members.values())
    assert g.mae[g.order[0]] == pytest.approx(g.member_mae[g.order[0].split(":", 1)[1]], rel=1e-5)
    for before_s, after in zip(g.order, g.order[1:]):    # each gain is relative to the stage before
        assert g.gains[after] == pytest.approx(g.mae[before_s] - g.mae[after], abs=1e-6)
    assert set(g.per_family["flip"]) == {"CurveFault_B", "FlatVel_A", "Style_A"}
    assert set(g.seconds) == set(g.order) and all(v["all"] >= 0 for v in g.seconds.values())
    with pytest.raises(SystemExit):             # a path is required: no silent default location
        evaluate.main(["--data", str(fake_root), "--checkpoint", str(ck[0]), "--stage-gains"])


def test_refinement_gains_are_measured_per_kind_and_a_kind_measured_harmful_is_not_refined(tmp_path):
    """Validation: refinement helps the tv samples and hurts the smooth ones; the table says
    so per kind, and a test run with that table refines no smooth sample."""
    from tests.inference_plan.helpers import FakeClock, planner
    from tests.inference_plan.test_ranked import KINDS, FakeRefine

    n = 18
    kind_of = {r: ("tv", "smooth", "flat")[r % 3] for r in range(n)}
    ens = fake_ensemble(2, drop=0.0)
    src, data = small_source(n, seed=6)
    x = normalize_seismic(torch.from_numpy(data))
    true = ens.predict(x)[0].numpy()
    true[[r for r in range(n) if kind_of[r] == "tv"]] += 300.0     # refinement's +300 fixes tv samples
    clock = FakeClock()
    stage = FakeRefine("refine", ("tv", "smooth"), clock, kind_of, np.ones(n), per_sample=2.0, delta=300.0)
    stage.limit_per_kind = 4
    g = measure_stage_gains(ens, data, true, stages=["members", stage], device="cpu")
    assert set(g.per_kind["refine"]) == {"tv", "smooth"}
    assert g.per_kind["refine"]["tv"] == pytest.approx(300.0, rel=1e-3)
    assert g.per_kind["refine"]["smooth"] == pytest.approx(-300.0, rel=1e-3)
    assert len(stage.refined) == 8                                 # 4 samples of each kind
    assert g.seconds["refine"]["all"] > 0                         # per refined sample (real seconds)
    # the full-pass gain: the kinds' shares of the samples times their gains (1/3 each)
    assert g.gains["refine"] == pytest.approx((300.0 - 300.0) / 3, abs=1e-2)
    g.gains["refine"] = 50.0
    test_stage = FakeRefine("refine", ("tv", "smooth"), clock, kind_of, np.ones(n))
    s = planner(ens, src, tmp_path, clock, budget=1e6, gains=g, stages=["members", test_stage]).run()
    assert test_stage.refined and {kind_of[r] for r in test_stage.refined} == {"tv"}
    assert KINDS
