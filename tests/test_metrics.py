"""Tests for fwi_core.metrics (hand-computed cases) and smoke tests for fwi_core.plotting."""
import math

import numpy as np
import pytest
import torch

from fwi_core import metrics as M


def step_map(row: int, lo: float = 2000.0, hi: float = 3000.0, n: int = 70) -> torch.Tensor:
    """(1,1,n,n): ``lo`` in rows < row, ``hi`` below."""
    v = torch.full((1, 1, n, n), lo, dtype=torch.float64)
    v[..., row:, :] = hi
    return v


# ------------------------------------------------------------------------ errors
def test_mae_rmse_per_sample():
    t = torch.zeros(2, 1, 2, 2)
    p = torch.tensor([[[[3.0, -4.0], [3.0, -4.0]]], [[[1.0, 1.0], [1.0, 1.0]]]])
    torch.testing.assert_close(M.mae(p, t), torch.tensor([3.5, 1.0], dtype=torch.float64))
    torch.testing.assert_close(M.rmse(p, t), torch.tensor([math.sqrt(12.5), 1.0], dtype=torch.float64))
    out = M.mae(p.numpy(), t.numpy())
    assert isinstance(out, np.ndarray) and out.shape == (2,)
    with pytest.raises(ValueError, match="shapes differ"):
        M.mae(p, t[:, :, :1])


def test_competition_mae_uses_odd_columns_only():
    t = torch.zeros(3, 1, 70, 70)
    p = torch.zeros(3, 1, 70, 70)
    p[0, ..., 0::2] = 100.0          # even columns: not submitted
    p[1, ..., 1::2] = 10.0           # every submitted column
    p[2, ..., 1] = 7.0               # one submitted column (x_1)
    torch.testing.assert_close(M.competition_mae(p, t),
                               torch.tensor([0.0, 10.0, 7.0 / 35.0], dtype=torch.float64))
    torch.testing.assert_close(M.mae(p, t)[1], torch.tensor(5.0, dtype=torch.float64))


# ------------------------------------------------------------------------- SSIM
def test_ssim_identical_is_one():
    x = torch.rand(2, 1, 30, 25) * 3000 + 1500
    torch.testing.assert_close(M.ssim(x, x, data_range=3000.0), torch.ones(2, dtype=torch.float64))


def test_ssim_constant_offset_by_hand():
    a, d, L = 0.2, 0.1, 1.0
    x = torch.full((1, 1, 16, 16), a)
    c1 = (0.01 * L) ** 2
    # variances and covariance vanish, so cs = C2 / C2 = 1 and SSIM is the luminance term
    expected = (2 * a * (a + d) + c1) / (a ** 2 + (a + d) ** 2 + c1)      # 0.1201 / 0.1301
    assert M.ssim(x, x + d, data_range=L).item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.1201 / 0.1301)


def test_ssim_ramp_offset_by_hand():
    """x[i, j] = j: a symmetric window's mean is the centre column, variances cancel."""
    w, d, L = 20, 3.0, 100.0
    x = torch.arange(w, dtype=torch.float64).expand(1, 1, 15, w).clone()
    c1 = (0.01 * L) ** 2
    mus = np.arange(5, w - 5, dtype=np.float64)          # valid-conv centres
    expected = np.mean((2 * mus * (mus + d) + c1) / (mus ** 2 + (mus + d) ** 2 + c1))
    assert M.ssim(x, x + d, data_range=L).item() == pytest.approx(expected, rel=1e-9)


def test_ssim_rejects_small_maps():
    with pytest.raises(ValueError, match="window"):
        M.ssim(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8), data_range=1.0)


def test_ssim_matches_monai():
    monai_metrics = pytest.importorskip("monai.metrics")
    g = torch.Generator().manual_seed(0)
    t = torch.rand(3, 1, 70, 70, generator=g) * 3000 + 1500
    p = t + 200 * torch.randn(3, 1, 70, 70, generator=g)
    ref = monai_metrics.SSIMMetric(spatial_dims=2, data_range=3000.0, reduction="none")(p, t)
    torch.testing.assert_close(M.ssim(p, t, data_range=3000.0), ref.reshape(-1).double(),
                               rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- boundary IoU
def test_edge_map_by_hand():
    e = M.edge_map(step_map(35), threshold=100.0)[0, 0]
    rows = torch.nonzero(e.any(1)).flatten().tolist()
    assert rows == [34, 35] and e.sum().item() == 140          # gradient 500 on both rows
    assert not M.edge_map(step_map(35), threshold=600.0).any()


def test_boundary_iou_by_hand():
    t = step_map(35)
    assert M.boundary_iou(t, t).item() == 1.0
    # shifted by one row: edges rows 35,36 vs 34,35
    assert M.boundary_iou(step_map(36), t, tolerance=1).item() == 1.0
    assert M.boundary_iou(step_map(36), t, tolerance=0).item() == pytest.approx(70 / 210)
    # shifted by three rows: outside the band
    assert M.boundary_iou(step_map(38), t, tolerance=1).item() == 0.0
    # no edges anywhere: 1; edges in only one map: 0
    flat = torch.full((1, 1, 70, 70), 2500.0)
    assert M.boundary_iou(flat, flat).item() == 1.0
    assert M.boundary_iou(flat, t).item() == 0.0
    # the true boundary plus a spurious one (140 extra predicted edge cells)
    p = t.clone()
    p[..., :10, :] = 1000.0                                   # edges at rows 9, 10
    assert M.boundary_iou(p, t, tolerance=1).item() == pytest.approx(140 / 280)


# ------------------------------------------------------------------------- CRF
def test_crf_energy_reduction_by_hand():
    energies = [torch.tensor([10.0, 0.0, 4.0]), torch.tensor([5.0, 0.0, 3.0]),
                torch.tensor([2.0, 0.0, 1.0])]
    torch.testing.assert_close(M.crf_energy_reduction(energies),
                               torch.tensor([0.8, 0.0, 0.75], dtype=torch.float64))
    arr = np.array([[10.0, 4.0], [2.0, 1.0]])
    np.testing.assert_allclose(M.crf_energy_reduction(arr), [0.8, 0.75])


def test_crf_energy_reduction_from_crf():
    from fwi_core.crf import ContinuousCRF
    crf = ContinuousCRF(iterations=5)
    crf(torch.randn(2, 1, 12, 12))
    red = M.crf_energy_reduction(crf.last_energies)
    assert red.shape == (2,) and ((red > 0) & (red < 1)).all()


# ----------------------------------------------------------------- uncertainty
def test_gaussian_nll_by_hand():
    mean = torch.zeros(2, 1, 1, 2)
    var = torch.tensor([[[[1.0, 1.0]]], [[[4.0, 4.0]]]])
    target = torch.tensor([[[[1.0, -1.0]]], [[[2.0, 0.0]]]])
    expected = [0.5 * (math.log(2 * math.pi) + 1.0),
                0.5 * (math.log(8 * math.pi) + 0.5)]              # (1 + 0) / 2 averaged
    torch.testing.assert_close(M.gaussian_nll(mean, var, target),
                               torch.tensor(expected, dtype=torch.float64))
    ref = torch.nn.GaussianNLLLoss(full=True, reduction="none")(mean, target, var)
    torch.testing.assert_close(M.gaussian_nll(mean, var, target), ref.flatten(1).mean(1).double())


def test_interval_coverage_and_calibration_by_hand():
    # standardised residuals 0.1, 0.5, 1.0, 2.0 (std 2)
    mean = torch.zeros(1, 1, 1, 4)
    var = torch.full((1, 1, 1, 4), 4.0)
    target = torch.tensor([[[[0.2, -1.0, 2.0, 4.0]]]])
    # 90% interval: |z| <= 1.645 holds for 3 of 4; 50%: |z| <= 0.674 for 2 of 4
    assert M.interval_coverage(mean, var, target, level=0.9).item() == 0.75
    assert M.interval_coverage(mean, var, target, level=0.5).item() == 0.5
    expected, observed = M.calibration_curve(mean, var, target, levels=[0.5, 0.9, 0.99])
    torch.testing.assert_close(expected, torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64))
    torch.testing.assert_close(observed, torch.tensor([[0.5, 0.75, 1.0]], dtype=torch.float64))
    err = M.calibration_error(mean, var, target, levels=[0.5, 0.9, 0.99])
    torch.testing.assert_close(err, torch.tensor([(0.0 + 0.15 + 0.01) / 3], dtype=torch.float64))
    e_np, o_np = M.calibration_curve(mean.numpy(), var.numpy(), target.numpy())
    assert e_np.shape == (19,) and o_np.shape == (1, 19)
    with pytest.raises(ValueError, match="level"):
        M.interval_coverage(mean, var, target, level=1.0)


def test_calibrated_gaussian_is_calibrated():
    g = torch.Generator().manual_seed(0)
    mean = torch.zeros(2, 1, 70, 70)
    var = torch.full_like(mean, 9.0)
    target = 3.0 * torch.randn(2, 1, 70, 70, generator=g)
    assert (M.calibration_error(mean, var, target) < 0.02).all()
    assert (M.calibration_error(mean, var / 4, target) > 0.1).all()   # overconfident


# -------------------------------------------------------------------- families
def test_per_family():
    out = M.per_family(torch.tensor([1.0, 3.0, 10.0]), ["FlatVel_A", "FlatVel_A", "Style_B"])
    assert out == {"FlatVel_A": 2.0, "Style_B": 10.0, "all": pytest.approx(14 / 3)}
    with pytest.raises(ValueError):
        M.per_family(np.zeros(2), ["a"])


# -------------------------------------------------------------------- plotting
def _is_png(path):
    data = path.read_bytes()
    return len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_plotting_smoke(tmp_path):
    pytest.importorskip("matplotlib")
    from fwi_core.plotting import plot_curves, plot_predictions, plot_seismic

    truth = torch.cat([step_map(30), step_map(50)]).float()
    pred = truth + 30 * torch.randn_like(truth)
    fig = plot_predictions(pred, truth, uncertainty=torch.full_like(pred, 20.0), titles=["a", "b"])
    assert len(fig.axes) == 2 * 4 * 2                                # panels + colourbars
    assert "MAE" in fig.axes[0].get_title()
    fig.savefig(tmp_path / "pred.png", dpi=50)
    assert _is_png(tmp_path / "pred.png")
    fig = plot_predictions(pred[0, 0].numpy(), truth[0, 0].numpy())
    fig.savefig(tmp_path / "pred1.png", dpi=40)
    assert _is_png(tmp_path / "pred1.png")

    plot_seismic(np.random.default_rng(0).normal(size=(5, 100, 70)), title="gathers").savefig(
        tmp_path / "seis.png", dpi=40)
    assert _is_png(tmp_path / "seis.png")

    history = [{"epoch": i, "train_loss": 1.0 / (i + 1), "val_loss": 1.2 / (i + 1), "val_mae": 80 - i,
                "note": "x"} for i in range(5)]
    plot_curves(history, logy_loss=True).savefig(tmp_path / "curves.png", dpi=40)
    assert _is_png(tmp_path / "curves.png")
    csv_path = tmp_path / "history.csv"
    csv_path.write_text("epoch,train_loss,val_mae\n0,1.0,90\n1,0.5,70\n")
    fig = plot_curves(csv_path)
    assert len(fig.axes) == 2
    fig.savefig(tmp_path / "curves_csv.png", dpi=40)
    assert _is_png(tmp_path / "curves_csv.png")
