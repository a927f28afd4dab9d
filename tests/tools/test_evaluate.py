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
    import numpy as np
    import torch

    from fwi_core.crf import default_crf_ms
    from fwi_core.data import FWIDataset, index_train
    from fwi_core.inference import predict_dataset
    from fwi_core.scoring import score_predictions, score_uncertainty
    from fwi_core.metrics import mae, per_family
    from fwi_core.physics.misfit import seismic_misfit
    from fwi_core.train import load_model

    out = tmp_path / "metrics.json"
    torch.manual_seed(0)
    assert evaluate.main(["--data", str(fake_root), "--checkpoint", checkpoint, "--json", str(out),
                          "--flip-tta", "--crf", "--physics", "1", "--batch-size", "4", "--mc-dropout", "3"]) == 0
    text = capsys.readouterr().out
    assert "12 samples, 1 checkpoint(s), flip TTA" in text
    for fam in ("CurveFault_B", "FlatVel_A", "Style_A", "all"):
        assert fam in text
    data = json.loads(out.read_text())
    # the same numbers computed independently (same seed: the same dropout draws)
    ds = FWIDataset(index_train(fake_root))
    torch.manual_seed(0)
    res = predict_dataset([load_model(checkpoint)], ds, batch_size=4, flip_tta=True, mc_passes=3, progress=False)
    want = score_predictions(res["pred"], res["true"], res["family"])
    for fam, row in want.items():
        assert data["metrics"][fam] == pytest.approx(row, rel=1e-6), fam
    unc = score_uncertainty(res["pred"], res["var"], res["true"], res["family"])
    assert data["uncertainty"]["all"] == pytest.approx(unc["all"], rel=1e-6)
    # no crf.json beside the checkpoint: the default CRF in m/s units
    assert data["crf"]["source"] == "default, m/s units"
    crf_mae = per_family(mae(default_crf_ms()(torch.from_numpy(res["pred"])).detach().numpy(), res["true"]),
                         list(res["family"]))
    assert data["crf_mae"] == pytest.approx(crf_mae, rel=1e-5)
    obs = np.stack([ds.raw(0)[0]])
    pc = seismic_misfit(res["pred"][:1], obs)
    assert data["seismic_misfit"]["all"] == pytest.approx(float(np.mean(pc)), rel=1e-4)


def test_evaluate_crf_uses_the_tuned_crf_json(fake_root, checkpoint, tmp_path, capsys):
    from pathlib import Path

    from fwi_core.crf import save_crf_config

    cfg = {"window": 5, "iterations": 20, "lambda_feature": 4.0, "lambda_spatial": 1.0, "temperature": 400.0}
    save_crf_config(cfg, Path(checkpoint).parent)
    out = tmp_path / "m.json"
    assert evaluate.main(["--data", str(fake_root), "--checkpoint", checkpoint, "--json", str(out), "--crf",
                          "--batch-size", "4"]) == 0
    data = json.loads(out.read_text())
    assert data["crf"]["source"] == "tuned crf.json"
    assert data["crf"]["config"]["temperature"] == 400.0 and data["crf"]["config"]["iterations"] == 20
    assert "MAE after CRF (tuned crf.json)" in capsys.readouterr().out


def test_evaluate_reports_missing_inputs(fake_root, tmp_path, capsys):
    assert evaluate.main(["--data", str(fake_root), "--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    ck = tmp_path / "x.pt"
    ck.write_bytes(b"")
    assert evaluate.main(["--data", str(tmp_path / "nodata"), "--checkpoint", str(ck)]) == 2
    assert "error:" in capsys.readouterr().err


def test_evaluate_compares_members_and_ensemble(fake_root, checkpoint, tmp_path, capsys):
    """Several checkpoints: each member's MAE and the ensemble's side by side, per family."""
    import numpy as np
    import torch

    from fwi_core.data import FWIDataset, index_train
    from fwi_core.inference import predict_dataset
    from fwi_core.metrics import mae, per_family
    from fwi_core.models import create_model
    from fwi_core.train import load_model
    from fwi_core.train.checkpoint import FORMAT, save_checkpoint

    torch.manual_seed(1)     # a second, different member in the engine's checkpoint format
    other = create_model("inversionnet", width=0.0625)
    second = tmp_path / "run2" / "best.pt"
    save_checkpoint({"format": FORMAT, "metadata": {"model": "inversionnet", "model_kwargs": {"width": 0.0625}},
                     "model": other.state_dict(), "ema": None}, second)
    out = tmp_path / "cmp.json"
    assert evaluate.main(["--data", str(fake_root), "--checkpoint", checkpoint, str(second),
                          "--json", str(out), "--batch-size", "4"]) == 0
    text = capsys.readouterr().out
    assert "12 samples, 2 checkpoint(s)" in text and "model comparison" in text
    cmp = json.loads(out.read_text())["comparison"]
    assert set(cmp) == {"CurveFault_B", "FlatVel_A", "Style_A", "all"}
    assert set(cmp["all"]) == {"run/best", "run2/best", "ensemble"}
    ds = FWIDataset(index_train(fake_root))
    for name, path in (("run/best", checkpoint), ("run2/best", second)):
        r = predict_dataset(load_model(path), ds, batch_size=4, progress=False)
        expected = per_family(mae(r["pred"], r["true"]), list(r["family"]))
        for fam, v in expected.items():
            assert cmp[fam][name] == pytest.approx(v, rel=1e-6)
    assert cmp["all"]["run/best"] != pytest.approx(cmp["all"]["run2/best"])
    assert cmp["all"]["ensemble"] == pytest.approx(json.loads(out.read_text())["metrics"]["all"]["mae"])
    assert np.isfinite(cmp["all"]["ensemble"])
