from tools import bench


def test_physics_bench_quick_has_gradient_rows():
    text = bench.bench_physics(quick=True)
    assert "forward + backward (adjoint)" in text
    assert "peak memory of forward + backward" in text
    assert "Gradient (forward + backward) / forward:" in text
    row = next(line for line in text.splitlines() if line.startswith("| peak memory"))
    assert float(row.split("|")[3].split()[0]) > 0  # a measured, positive figure
