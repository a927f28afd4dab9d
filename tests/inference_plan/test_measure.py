"""Measuring the gains table on validation data (and through tools.evaluate)."""
import pytest
import torch

from fwi_core.data.normalize import normalize_seismic
from fwi_core.inference_plan import find_stage_gains, measure_stage_gains
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


def test_evaluate_writes_the_stage_gains_table_beside_the_checkpoint(fake_root, tmp_path, capsys):
    from fwi_core.crf import save_crf_config
    from tests.inference_plan.helpers import tiny_checkpoint
    from tools import evaluate

    ck = [tiny_checkpoint(tmp_path / "run" / "best.pt", 0), tiny_checkpoint(tmp_path / "run" / "snapshot-01.pt", 1)]
    save_crf_config({"window": 3, "iterations": 2}, tmp_path / "run")
    assert evaluate.main(["--data", str(fake_root), "--checkpoint", *map(str, ck), "--batch-size", "6",
                          "--stage-gains"]) == 0
    assert "stage gains" in capsys.readouterr().out
    g = find_stage_gains(ck)
    assert set(g.order[:2]) == {"member:run/best", "member:run/snapshot-01"}
    assert g.order[2:] == ["flip", "crf", "mc_dropout"] and set(g.gains) == set(g.order)
    assert g.samples == 12 and set(g.member_mae) == {"run/best", "run/snapshot-01"}
    assert g.mae[g.order[0]] == pytest.approx(g.member_mae[g.order[0].split(":", 1)[1]], rel=1e-5)
    for before, after in zip(g.order, g.order[1:]):    # each gain is relative to the stage before
        assert g.gains[after] == pytest.approx(g.mae[before] - g.mae[after], abs=1e-6)
    assert set(g.per_family["flip"]) == {"CurveFault_B", "FlatVel_A", "Style_A"}
