import sys
"""Tests for fwi_core.crf: monotone energy, denoising of a layered map, fixed points,
training through the unrolled iterations, and tuning."""
import math

import pytest
import torch

from fwi_core.crf import ContinuousCRF, tune_crf
from fwi_core.metrics import boundary_iou, crf_energy_reduction, mae


def layered_map(n: int = 70) -> torch.Tensor:
    """(1,1,n,n) m/s: three flat layers plus a dipping fault block in the middle one."""
    r, c = torch.meshgrid(torch.arange(n).float(), torch.arange(n).float(), indexing="ij")
    v = torch.full((n, n), 1800.0)
    v[r >= 20] = 2600.0
    v[r >= 45] = 3500.0
    v[(r >= 30) & (r < 45) & (r > 0.8 * c + 5)] = 3000.0
    return v[None, None]


def _increases(energies):
    e = torch.stack(energies)                      # (T+1, B)
    return (e[1:] - e[:-1]).max().item(), e[0]


CONFIGS = [
    dict(window=3, iterations=15, lambda_spatial=0.3, lambda_feature=1.0, temperature=0.5),
    dict(window=5, iterations=15, lambda_spatial=50.0, lambda_feature=200.0, temperature=2.0,
         unary_weight=0.01),                                 # weights >> unary term
    dict(window=7, iterations=10, lambda_spatial=0.0, lambda_feature=5.0, temperature=0.1,
         theta_feature=3.0),
]


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("guided", [False, True])
def test_energy_never_increases(cfg, guided):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 1, 24, 20, generator=g)
    guide = torch.randn(3, 4, 24, 20, generator=g) if guided else None
    confidence = torch.rand(3, 1, 24, 20, generator=g) * (torch.rand(3, 1, 24, 20, generator=g) > 0.2)
    for dtype, rtol in ((torch.float32, 1e-6), (torch.float64, 1e-12)):
        crf = ContinuousCRF(**cfg).to(dtype)
        for conf in (None, confidence):
            out = crf(z.to(dtype), None if guide is None else guide.to(dtype),
                      None if conf is None else conf.to(dtype))
            assert out.shape == z.shape and out.dtype == dtype
            assert len(crf.last_energies) == cfg["iterations"] + 1
            worst, e0 = _increases(crf.last_energies)
            assert worst <= rtol * e0.max().item(), (dtype, worst)
            # energy() agrees with the tracked energy of the returned map
            e_last = crf.energy(out, z.to(dtype), None if guide is None else guide.to(dtype),
                                None if conf is None else conf.to(dtype))
            torch.testing.assert_close(e_last, crf.last_energies[-1], rtol=1e-6, atol=1e-9)
            assert (crf_energy_reduction(crf.last_energies) > 0).all()


def test_converges_to_exact_map_solution():
    """Many Jacobi steps reach the solution of the linear system grad E = 0."""
    g = torch.Generator().manual_seed(2)
    z = torch.randn(1, 1, 6, 5, dtype=torch.float64, generator=g)
    conf = torch.rand(1, 1, 6, 5, dtype=torch.float64, generator=g) + 0.1
    crf = ContinuousCRF(window=3, iterations=400, lambda_spatial=0.5, lambda_feature=2.0,
                        temperature=1.0).double()
    out = crf(z, confidence=conf)
    # dense A y = a z with A = diag(a) + Laplacian(W)
    w = crf.pairwise_weights(z)[0]                                   # (9, 30)
    n, (h, wd) = 30, z.shape[-2:]
    A = torch.zeros(n, n, dtype=torch.float64)
    for k in range(9):
        dy, dx = k // 3 - 1, k % 3 - 1
        for i in range(n):
            r, c = divmod(i, wd)
            if 0 <= r + dy < h and 0 <= c + dx < wd and w[k, i] > 0:
                j = (r + dy) * wd + c + dx
                A[i, j] -= w[k, i]
                A[i, i] += w[k, i]
    torch.testing.assert_close(A, A.T)                                # symmetric weights
    a = conf.flatten()
    y = torch.linalg.solve(A + torch.diag(a), a * z.flatten())
    torch.testing.assert_close(out.flatten(), y, rtol=1e-8, atol=1e-8)


def test_denoises_layered_map_and_keeps_boundaries():
    torch.manual_seed(0)
    truth = layered_map().repeat(2, 1, 1, 1)
    noisy = truth + 50.0 * torch.randn_like(truth)
    crf = ContinuousCRF(window=5, iterations=20, lambda_spatial=0.0, lambda_feature=2.0,
                        temperature=100.0)                             # temperature in m/s
    out = crf(noisy)                                                  # guide = the noisy map
    assert (mae(out, truth) < 0.5 * mae(noisy, truth)).all()
    assert (boundary_iou(out, truth) >= boundary_iou(noisy, truth) - 0.02).all()
    assert (boundary_iou(out, truth) > 0.9).all()


def test_unit_equivariance_normalised_vs_metres():
    """The same CRF in normalised units (temperature scaled) gives the same map."""
    torch.manual_seed(0)
    v = layered_map() + 40.0 * torch.randn(1, 1, 70, 70)
    out_ms = ContinuousCRF(temperature=90.0)(v.double())
    norm = (v.double() - 1500) / 3000 * 2 - 1
    out_n = ContinuousCRF(temperature=90.0 / 1500.0)(norm)
    torch.testing.assert_close((out_n + 1) / 2 * 3000 + 1500, out_ms, rtol=1e-9, atol=1e-6)


def test_constant_map_unchanged():
    z = torch.full((2, 1, 70, 70), 2750.0)
    guide = torch.randn(2, 3, 70, 70)
    for g in (None, guide):
        out = ContinuousCRF(iterations=10, lambda_spatial=1.0, lambda_feature=3.0)(z, g)
        torch.testing.assert_close(out, z, rtol=1e-6, atol=0.0)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="window"):
        ContinuousCRF(window=4)
    with pytest.raises(ValueError, match="temperature"):
        ContinuousCRF(temperature=0.0)
    with pytest.raises(ValueError, match="lambda_feature"):
        ContinuousCRF(lambda_feature=0.0, trainable=True)
    with pytest.raises(ValueError, match="prediction"):
        ContinuousCRF()(torch.zeros(1, 2, 8, 8))
    with pytest.raises(ValueError, match="guide"):
        ContinuousCRF()(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 7))


def test_trainable_gradients_and_training_lowers_l1():
    torch.manual_seed(0)
    truth = (layered_map(32) - 1500) / 1500 - 1                          # normalised units
    truth = truth.repeat(2, 1, 1, 1)
    noisy = truth + 0.04 * torch.randn_like(truth)
    crf = ContinuousCRF(window=5, iterations=5, lambda_spatial=0.01, lambda_feature=0.05,
                        temperature=0.2, trainable=True)
    params = dict(crf.named_parameters())
    assert len(params) == 6 and all(isinstance(p, torch.nn.Parameter) for p in params.values())
    loss0 = (crf(noisy) - truth).abs().mean()
    loss0.backward()
    for name, p in params.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in params.values())
    opt = torch.optim.Adam(crf.parameters(), lr=0.1)
    for _ in range(10):
        opt.zero_grad()
        loss = (crf(noisy) - truth).abs().mean()
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = (crf(noisy) - truth).abs().mean()
    assert final < 0.8 * loss0.item()
    assert all(v > 0 for k, v in crf.config().items() if k not in ("window", "iterations"))


def test_tune_crf_grid_improves_on_cnn():
    torch.manual_seed(0)
    truth = layered_map(40).repeat(3, 1, 1, 1)
    preds = truth + 50.0 * torch.randn_like(truth)
    res = tune_crf(preds.numpy(), truth.numpy(), base_config={"iterations": 8})
    assert set(res) >= {"best_config", "crf_mae", "cnn_mae"}
    assert res["crf_mae"] < res["cnn_mae"] and res["improved"]
    assert len(res["trials"]) == 32
    refined = ContinuousCRF(**res["best_config"])(preds)
    assert math.isclose(mae(refined, truth).mean().item(), res["crf_mae"], rel_tol=1e-4)


def test_tune_crf_custom_grid_and_optuna_fallback(monkeypatch):
    torch.manual_seed(1)
    truth = layered_map(24).repeat(2, 1, 1, 1)
    preds = truth + 30.0 * torch.randn_like(truth)
    grid = {"temperature": [1.0, 60.0]}
    res = tune_crf(preds, truth, guides=preds, grid=grid, base_config={"iterations": 5})
    assert res["best_config"]["temperature"] == pytest.approx(60.0)
    # the optuna branch (optuna is a dev requirement): TPE samples the documented ranges
    pytest.importorskip("optuna")
    res = tune_crf(preds, truth, n_trials=6, base_config={"iterations": 3})
    assert len(res["trials"]) == 6
    thetas = {round(cfg["theta_feature"], 6) for cfg, _ in res["trials"]}
    assert len(thetas) == 6 and all(0.5 <= t <= 4.0 for t in thetas)      # sampled, not a grid
    assert all("lambda_spatial" in cfg and cfg["iterations"] == 3 for cfg, _ in res["trials"])
    best_cfg, best = min(res["trials"], key=lambda t: t[1])
    assert res["crf_mae"] == best and res["best_config"]["theta_feature"] == pytest.approx(best_cfg["theta_feature"])
    assert res["crf_mae"] < res["cnn_mae"]
    # without optuna: a warning and the grid
    monkeypatch.setitem(sys.modules, "optuna", None)
    with pytest.warns(UserWarning, match="optuna"):
        res = tune_crf(preds, truth, grid=grid, n_trials=4, base_config={"iterations": 3})
    assert len(res["trials"]) == 2


def test_default_crf_ms_matches_the_default_crf_on_normalised_maps():
    from fwi_core.crf import default_crf_ms
    from fwi_core.data import denormalize_velocity, normalize_velocity

    torch.manual_seed(2)
    truth = layered_map(24).repeat(2, 1, 1, 1)
    preds = (truth + 40.0 * torch.randn_like(truth)).clamp(1500, 4500)
    want = denormalize_velocity(ContinuousCRF()(normalize_velocity(preds)))
    got = default_crf_ms()(preds)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-2)
    assert (got - preds).abs().mean() > 5.0          # it does smooth m/s maps
