import numpy as np
import math
import json

import pytest
import torch

from fwi_core.crf import ContinuousCRF, load_crf, save_crf_config
from fwi_core.data import FWIDataset, index_train
from fwi_core.inference import predict_batch, predict_dataset, to_velocity
from fwi_core.models.checkpoint import find_checkpoints
from fwi_core.scoring import format_table, score_predictions


class Tiny(torch.nn.Module):
    """(B,5,1000,70) -> (B,1,70,70): per-receiver energy, then a column-asymmetric map."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.linspace(-1, 1, 70))

    def forward(self, x):
        e = x.abs().mean(dim=(1, 2))  # (B,70)
        return torch.tanh(e[:, None, None, :] * self.w[None, None, :, None] + 0.1 * self.w)


def test_flip_tta_averages_with_the_unflipped_flipped_prediction():
    m = Tiny()
    x = torch.randn(2, 5, 1000, 70)
    p = predict_batch(m, x)
    pf = predict_batch(m, x, flip_tta=True)
    manual = 0.5 * (m(x) + torch.flip(m(torch.flip(x, (1, 3))), (-1,)))
    torch.testing.assert_close(pf, manual)
    assert not torch.allclose(p, pf)
    # ensemble with weights = weighted mean
    m2 = Tiny()
    with torch.no_grad():
        m2.w.mul_(-1)
    torch.testing.assert_close(predict_batch([m, m2], x, weights=[3, 1]), 0.75 * m(x) + 0.25 * m2(x))
    with pytest.raises(ValueError, match="2 models but 1 weights"):
        predict_batch([m, m2], x, weights=[1])


def test_to_velocity_clips_to_the_competition_range():
    v = to_velocity(torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0]))
    torch.testing.assert_close(v, torch.tensor([1500.0, 1500.0, 3000.0, 4500.0, 4500.0]))


def test_predict_dataset_and_score_table(fake_root):
    ds = FWIDataset(index_train(fake_root))
    res = predict_dataset(Tiny(), ds, batch_size=4, device=torch.device("cpu"), progress=False)
    assert res["pred"].shape == (12, 1, 70, 70) and res["true"].shape == (12, 1, 70, 70)
    assert res["pred"].min() >= 1500 and res["pred"].max() <= 4500
    table = score_predictions(res["pred"], res["true"], res["family"])
    assert set(table) == {"CurveFault_B", "FlatVel_A", "Style_A", "all"}
    assert set(table["all"]) == {"mae", "competition_mae", "rmse", "ssim", "boundary_iou"}
    exact = score_predictions(res["true"], res["true"], res["family"])["all"]
    assert exact["mae"] == 0 and abs(exact["ssim"] - 1) < 1e-9
    text = format_table(table)
    assert text.splitlines()[-1].startswith("all")


def test_crf_config_round_trip_and_checkpoint_discovery(tmp_path):
    ck = tmp_path / "run" / "best.pt"
    ck.parent.mkdir()
    ck.write_bytes(b"x")
    assert find_checkpoints([tmp_path]) == [ck]
    with pytest.raises(FileNotFoundError, match="no checkpoints matching"):
        find_checkpoints([tmp_path / "nothing"])
    assert load_crf([ck]) is None
    cfg = {"window": 3, "iterations": 4, "lambda_feature": 2.0, "temperature": 50.0}
    save_crf_config(cfg, ck.parent)
    crf = load_crf([ck])
    assert isinstance(crf, ContinuousCRF) and json.loads((ck.parent / "crf.json").read_text()) == cfg
    # the loaded CRF is the saved configuration: same output as one built from it, on a
    # noisy layered map that it visibly smooths
    g = torch.Generator().manual_seed(0)
    v = torch.linspace(1800, 4000, 70).view(1, 1, 70, 1).expand(1, 1, 70, 70) \
        + 60.0 * torch.randn(1, 1, 70, 70, generator=g)
    torch.testing.assert_close(crf(v), ContinuousCRF(**cfg)(v))
    assert crf.config()["temperature"] == 50.0 and crf.config()["iterations"] == 4
    assert (crf(v) - v).abs().mean() > 10.0


def test_mc_dropout_gives_mean_and_positive_variance_and_restores_eval():
    from fwi_core.inference import predict_mc_dropout
    from fwi_core.scoring import score_uncertainty

    class Drop(torch.nn.Module):
        """Output tanh(mask * c) with a dropout mask in {0, 2}: mean tanh(2c)/2, variance tanh(2c)^2/4."""

        def __init__(self):
            super().__init__()
            self.drop = torch.nn.Dropout(0.5)

        def forward(self, x):
            c = torch.full((x.shape[0], 1, 1, 70), 0.3)
            return torch.tanh(self.drop(c)).expand(-1, 1, 70, 70)

    m = Drop().eval()
    x = torch.randn(2, 5, 1000, 70)
    torch.manual_seed(0)
    mean, var = predict_mc_dropout(m, x, passes=400)
    assert mean.shape == var.shape == (2, 1, 70, 70) and not m.training and not m.drop.training
    t = math.tanh(0.6)
    # m/s: 1500 m/s per normalised unit, around 3000 m/s
    assert float(mean.mean()) == pytest.approx(3000 + 1500 * t / 2, abs=1500 * t * 0.1)
    assert float(var.mean()) == pytest.approx((1500 * t) ** 2 / 4, rel=0.1)
    with pytest.raises(ValueError, match="at least 2"):
        predict_mc_dropout(m, x, passes=1)
    # calibration: a truth 1 sd away lies inside the 90% interval (|z| < 1.645), 2 sd away outside
    sd = var.sqrt().numpy()
    near = score_uncertainty(mean.numpy(), var.numpy(), mean.numpy() + sd, ["a", "b"])
    far = score_uncertainty(mean.numpy(), var.numpy(), mean.numpy() + 2 * sd, ["a", "b"])
    assert near["all"]["coverage90"] == 1.0 and far["all"]["coverage90"] == 0.0
    nll = 0.5 * np.log(2 * np.pi * var.numpy()) + 0.5
    assert near["all"]["nll"] == pytest.approx(float(nll.mean()), rel=1e-4)
