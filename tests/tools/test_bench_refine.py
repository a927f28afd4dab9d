import numpy as np
import torch

from fwi_core.physics import FAMILIES, generate
from tools import bench, bench_refine


def test_degrade_blurs_and_biases():
    v = np.full((1, 1, 10, 10), 2000.0, np.float32)
    v[0, 0, 5:] = 3000.0
    d = bench_refine.degrade(v)
    assert d.shape == v.shape
    np.testing.assert_allclose(d[0, 0, 0], 2020.0, rtol=1e-6)  # +1% bias away from edges
    assert 2020.0 < d[0, 0, 4, 0] < 3030.0  # the interface is smeared


def test_network_like_starts_have_the_network_error_per_family():
    """Each start's MAE is the public CAFormer's for its family (to 0.5%), the same for the
    same seed, within 1500..4500 m/s; the errors are structured, not noise: they sit at the
    interfaces of layered maps (shifted and blurred boundaries) and vary smoothly elsewhere."""
    for fam in FAMILIES:
        truth = generate(fam, 2, seed=bench_refine.HELD_OUT_SEED)
        start = bench_refine.network_like_start(truth, bench_refine.NETWORK_MAE[fam])
        mae = np.abs(start - truth).mean(axis=(1, 2, 3))
        np.testing.assert_allclose(mae, bench_refine.NETWORK_MAE[fam], rtol=5e-3)
        np.testing.assert_array_equal(start, bench_refine.network_like_start(truth, bench_refine.NETWORK_MAE[fam]))
        assert start.min() >= 1500.0 and start.max() <= 4500.0
    truth = generate("CurveVel_B", 1, seed=3)[0, 0]
    err = np.abs(bench_refine.network_like_start(truth[None, None], 38.6)[0, 0] - truth)
    near = np.zeros_like(truth, bool)  # cells within 3 rows of an interface
    jumps = np.abs(np.diff(truth, axis=0)) > 0
    for k in range(-3, 4):
        near[max(0, k):70 + min(0, k) - 1] |= jumps[max(0, -k):69 - max(0, k)] if k >= 0 else jumps[-k:][:70 + k - 1]
    assert err[near].mean() > 5 * err[~near].mean() > 0


def test_structured_error_components():
    """Severity 0 is the truth; the shift moves a flat interface by 0.7 s cells where the
    displacement field peaks; the low-frequency bias has no jumps."""
    truth = np.full((1, 1, 40, 40), 2000.0, np.float32)
    truth[0, 0, 20:] = 3000.0
    fields = bench_refine.error_fields(1, 40, 40, seed=0)
    np.testing.assert_allclose(bench_refine.structured_error(truth, np.zeros(1), fields), truth)
    shift = {"shift": torch.ones(1, 40, 40, dtype=torch.float64), "low": torch.zeros(1, 40, 40, dtype=torch.float64)}
    still = {"shift": torch.zeros(1, 40, 40, dtype=torch.float64), "low": torch.zeros(1, 40, 40, dtype=torch.float64)}
    s = np.array([10 / 7])  # a shift of 0.7 s = 1 cell (and a blur of sigma 0.5 s cells)
    moved = np.roll(truth, 1, axis=2)
    moved[0, 0, 0] = 2000.0
    np.testing.assert_allclose(bench_refine.structured_error(truth, s, shift),
                               bench_refine.structured_error(moved, s, still), atol=1e-3)
    low = bench_refine.structured_error(np.full((1, 1, 40, 40), 2500.0, np.float32), np.array([5.0]), fields)
    assert 0 < np.abs(low - 2500.0).max() < 2500.0 * 0.004 * 5 * 5      # a bias of 2% per unit field ...
    assert np.abs(np.diff(low[0, 0], axis=0)).max() < 0.2 * np.abs(low - 2500.0).max()  # ... smooth: no jumps


def test_refine_bench_quick_reports_per_family_the_start_and_the_kaggle_budget():
    assert "refine" in bench.SECTIONS
    text = bench_refine.run(quick=True)
    assert "network-quality" in text and "s per map" in text
    rows = [line for line in text.splitlines() if line.startswith("| FlatVel_A") or line.startswith("| Style_A")]
    assert len(rows) == 4  # the family table and the per-map table
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert abs(float(cells[1]) - bench_refine.NETWORK_MAE["FlatVel_A"]) < 0.01 and float(cells[2]) > 0
    assert "0.49 s per map on one T4" in text and "3.94 s per map on each of 8 H100s" in text
