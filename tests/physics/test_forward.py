import numpy as np
import pytest
import torch

from fwi_core.physics import CFL_LIMIT, ForwardModel, ricker, simulate, simulate_host_style


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_matches_host_reference_within_1e5(reference):
    vel, seis = reference["velocity"], reference["seismic"]
    out = simulate(vel, backend="eager")
    assert out.shape == (len(vel), 5, 1000, 70) and out.dtype == np.float32
    errs = [_rel(out[i], seis[i]) for i in range(len(vel))]
    assert max(errs) <= 1e-5, errs


@pytest.mark.slow
def test_compiled_backend_matches_reference(reference):
    vel, seis = reference["velocity"][:2], reference["seismic"][:2]
    out = simulate(vel, backend="compile")
    assert max(_rel(out[i], seis[i]) for i in range(2)) <= 1e-5


def test_host_style_and_fast_agree(reference):
    vel = reference["velocity"][:1]
    a = simulate_host_style(vel, nt=120)
    b = simulate(vel, nt=120, backend="eager")
    assert _rel(b, a) < 1e-5
    assert _rel(b, reference["seismic"][:1, :, :120]) < 1e-5


def _analytic_2d(r, v, nt, dt=1e-3):
    """Wavelet convolved with the 2-D Green's function H(t-T)/sqrt(t^2-T^2), T=r/v,
    integrated exactly over each sample interval."""
    T = r / v
    t = np.arange(nt + 1) * dt
    a, b = np.maximum(t[:-1], T), np.maximum(t[1:], T)
    g = np.arccosh(np.maximum(b / T, 1)) - np.arccosh(np.maximum(a / T, 1))
    return np.convolve(ricker(15.0, dt, nt).astype(np.float64), g)[:nt]


@pytest.mark.parametrize("velocity", [2000.0, 3000.0])
def test_direct_arrival_in_homogeneous_medium(velocity):
    nt = 450
    seis = simulate(np.full((1, 70, 70), velocity, np.float32), nt=nt, backend="eager")[0, 0]
    peaks = []
    for col in (20, 40, 60):
        dist = col * 10.0
        trace = seis[:, col]
        expected = _analytic_2d(dist, velocity, nt)
        t_peak = int(np.argmax(np.abs(trace)))
        # arrival at distance/velocity after the wavelet's peak delay (73 samples), plus
        # the 2-D Green's function's own delay, which the analytic trace carries
        assert abs(t_peak - int(np.argmax(np.abs(expected)))) <= 1
        assert t_peak >= 73 + dist / velocity / 1e-3
        win = slice(0, t_peak + 50)
        assert np.corrcoef(trace[win], expected[win])[0, 1] > 0.99
        peaks.append(t_peak)
    # moveout between receivers is exactly distance / velocity (within a sample)
    for (c0, p0), (c1, p1) in zip(zip((20, 40, 60), peaks), zip((40, 60), peaks[1:])):
        assert abs((p1 - p0) - (c1 - c0) * 10.0 / velocity / 1e-3) <= 1


def test_accepts_tensor_and_3d_input_and_returns_same_kind():
    v = torch.full((2, 1, 70, 70), 2500.0)
    a = simulate(v, nt=30, backend="eager")
    b = simulate(v[:, 0].numpy(), nt=30, backend="eager")
    assert torch.is_tensor(a) and isinstance(b, np.ndarray)
    assert a.shape == (2, 5, 30, 70)
    np.testing.assert_array_equal(a.numpy(), b)
    m = ForwardModel(nt=30, backend="eager")
    np.testing.assert_array_equal(m(v).numpy(), b)


def test_keyword_geometry():
    v = np.full((1, 70, 70), 2500.0, np.float32)
    out = simulate(v, nt=40, source_columns=[10, 60], receiver_columns=[0, 5, 9], backend="eager")
    assert out.shape == (1, 2, 40, 3)
    out = simulate(v, nt=40, nbc=40, batch_chunk=1, backend="eager")
    assert out.shape == (1, 5, 40, 70) and np.isfinite(out).all()


def test_batch_chunking_does_not_change_results(reference):
    v = reference["velocity"][:3]
    a = simulate(v, nt=60, batch_chunk=1, backend="eager")
    b = simulate(v, nt=60, batch_chunk=3, backend="eager")
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bad, match", [
    (np.zeros((70, 70), np.float32) + 2000, "no batch axis"),
    (np.zeros((1, 2, 70, 70), np.float32) + 2000, r"\(B,1,H,W\)"),
    (np.full((1, 70, 70), np.nan, np.float32), "non-finite"),
    (np.full((1, 70, 70), 20.0, np.float32), "plausible range"),
    (np.full((1, 70, 70), 7000.0, np.float32), "CFL"),
    ([[1.0]], "numpy array or torch tensor"),
])
def test_bad_input_raises_clear_error(bad, match):
    with pytest.raises(ValueError, match=match):
        simulate(bad, nt=5)


def test_cfl_limit_value():
    assert abs(CFL_LIMIT * 10 / 1e-3 - 6123.7) < 0.1
    with pytest.raises(ValueError, match="source_columns"):
        simulate(np.full((1, 70, 70), 2000.0, np.float32), nt=5, source_columns=[80])


def test_flush_denormal_is_scoped_and_harmless(reference):
    from fwi_core.physics.forward import denormals_flushed

    v = reference["velocity"][:1]
    before = denormals_flushed()
    a = simulate(v, nt=200, backend="eager", flush_denormal=True)
    assert denormals_flushed() == before  # restored
    b = simulate(v, nt=200, backend="eager", flush_denormal=False)
    assert _rel(a, b) < 5e-6  # float32-rounding level, far below the 1e-5 exactness budget
