import numpy as np

from tools import bench, bench_refine


def test_degrade_blurs_and_biases():
    v = np.full((1, 1, 10, 10), 2000.0, np.float32)
    v[0, 0, 5:] = 3000.0
    d = bench_refine.degrade(v)
    assert d.shape == v.shape
    np.testing.assert_allclose(d[0, 0, 0], 2020.0, rtol=1e-6)  # +1% bias away from edges
    assert 2020.0 < d[0, 0, 4, 0] < 3030.0  # the interface is smeared


def test_refine_bench_quick_reports_per_family_and_the_start():
    assert "refine" in bench.SECTIONS
    text = bench_refine.run(quick=True)
    assert "degraded truth" in text and "not a network" in text
    rows = [line for line in text.splitlines() if line.startswith("| FlatVel_A") or line.startswith("| Style_A")]
    assert len(rows) == 2
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[1]) > 0 and float(cells[2]) > 0       # MAE start, MAE refined
        assert float(cells[7]) > 0                              # s per sample (the budget logic: test_refine)
