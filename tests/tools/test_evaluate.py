import json

import pytest

from fwi_core.train import TrainConfig, train
from tools import evaluate


@pytest.fixture
def checkpoint(fake_root, tmp_path):
    res = train(TrainConfig(data=str(fake_root), out=str(tmp_path / "run"), model="inversionnet",
                            model_kwargs={"width": 0.0625}, epochs=1, batch_size=4, folds=0,
                            time_budget=0, num_workers=0, ema_decay=0.0))
    return res["best_checkpoint"]


def test_evaluate_prints_metrics_per_family(fake_root, checkpoint, tmp_path, capsys):
    out = tmp_path / "metrics.json"
    assert evaluate.main(["--data", str(fake_root), "--checkpoint", checkpoint, "--json", str(out),
                          "--flip-tta", "--crf", "--physics", "1", "--batch-size", "4", "--mc-dropout", "3"]) == 0
    text = capsys.readouterr().out
    assert "12 samples, 1 checkpoint(s), flip TTA" in text
    for fam in ("CurveFault_B", "FlatVel_A", "Style_A", "all"):
        assert fam in text
    data = json.loads(out.read_text())
    assert set(data["metrics"]["all"]) == {"mae", "competition_mae", "rmse", "ssim", "boundary_iou"}
    assert data["metrics"]["all"]["mae"] > 0
    assert set(data["crf_mae"]) >= {"all"} and set(data["physical_consistency"]) >= {"all"}
    unc = data["uncertainty"]["all"]
    assert set(unc) == {"nll", "coverage90", "calibration_error"} and 0 <= unc["coverage90"] <= 1


def test_evaluate_reports_missing_inputs(fake_root, tmp_path, capsys):
    assert evaluate.main(["--data", str(fake_root), "--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    ck = tmp_path / "x.pt"
    ck.write_bytes(b"")
    assert evaluate.main(["--data", str(tmp_path / "nodata"), "--checkpoint", str(ck)]) == 2
    assert "error:" in capsys.readouterr().err
