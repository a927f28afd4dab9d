"""The native CPU kernel (fwi_core.physics.native) against the torch path, the host's data
and finite differences; its build, cache and fallback."""
import warnings

import numpy as np
import pytest
import torch

from fwi_core.physics import FAMILIES, forward, generate, native, simulate
from fwi_core.physics.adjoint import simulate_differentiable
from fwi_core.physics.stencil import step_fused

from .test_gradient import SMALL, _small_map, _weights, check_float32_gradient

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not native.available(), reason=f"native kernel: {native.unavailable_reason()}")]


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture
def torch_reference(monkeypatch):
    """``simulate(..., backend="eager")`` with the step written as one expression
    (:func:`step_fused`, uncompiled): the reference arithmetic the kernel reproduces."""
    monkeypatch.setattr(forward, "EagerStep", lambda: step_fused)

    def run(v, **kw):
        return simulate(v, backend="eager", **kw)
    return run


def test_matches_host_reference_within_1e5(reference):
    vel, seis = reference["velocity"], reference["seismic"]
    out = simulate(vel, backend="native")
    assert out.shape == (4, 5, 1000, 70) and out.dtype == np.float32
    errs = [_rel(out[i], seis[i]) for i in range(len(vel))]
    assert max(errs) <= 1e-5, errs


@pytest.mark.parametrize("flush", [True, False])
def test_bit_for_bit_with_the_torch_reference_on_the_reference_maps(reference, torch_reference, flush):
    """Same float32 operations in the same order, zero cells skipped exactly: equal bits
    (one thread: torch's worker threads would not flush denormals)."""
    v = reference["velocity"]
    a = simulate(v, nt=300, backend="native", flush_denormal=flush)
    b = torch_reference(v, nt=300, flush_denormal=flush)
    assert np.array_equal(a, b), _rel(a, b)


def test_bit_for_bit_with_the_torch_reference_on_every_family(torch_reference):
    v = np.concatenate([generate(f, 1, seed=3) for f in FAMILIES])
    a = simulate(v, nt=250, backend="native")
    b = torch_reference(v, nt=250)
    for i, fam in enumerate(FAMILIES):
        assert np.array_equal(a[i], b[i]), (fam, _rel(a[i], b[i]))


def test_bit_for_bit_once_the_wave_wraps_around(torch_reference):
    """A small padded grid and a long run: the field reaches every edge and the periodic
    wrap (the host's torch.roll) carries it to the far side; other receivers and sources."""
    v = _small_map(seed=5, b=3).float().numpy()
    kw = dict(SMALL, nt=400, receiver_columns=(0, 3, 4, 11), source_row=4, receiver_row=2)
    a = simulate(v, backend="native", **kw)
    b = torch_reference(v, **kw)
    assert np.abs(b[:, :, -1]).min() > 0  # the last samples are far into the wrapped field
    assert np.array_equal(a, b)


def test_against_the_default_torch_path_and_between_thread_counts(reference):
    """Against ``backend="eager"`` (in-place ops: other rounding) the traces agree to float32
    rounding; the kernel itself gives the same bits on 1 and 2 threads and in any chunking."""
    v = reference["velocity"][:2]
    a = simulate(v, nt=400, backend="native")
    assert _rel(a, simulate(v, nt=400, backend="eager")) < 5e-6
    torch.set_num_threads(2)
    assert np.array_equal(a, simulate(v, nt=400, backend="native", batch_chunk=1))


def test_float32_gradient_passes_the_finite_difference_check():
    """The fast path's gradient against float64 central differences (per cell, within 1e-4
    of the largest entry) and against the float64 adjoint (1e-4 relative L2), as the torch
    path's float32 gradient is checked in test_gradient.py."""
    check_float32_gradient("native", [(0, 3, 7), (1, 0, 5), (0, 11, 11), (1, 6, 0)])


def test_gradient_on_the_competition_grid_matches_the_torch_path():
    v = torch.from_numpy(np.concatenate([generate("CurveFault_B", 1, seed=4), generate("Style_B", 1, seed=4)]))
    w = torch.randn(2, 5, 300, 70, generator=torch.Generator().manual_seed(0))
    grads, outs = [], []
    for backend in ("native", "eager"):
        vg = v.clone().requires_grad_()
        out = simulate(vg, nt=300, backend=backend, checkpoint_every=40)
        (out * w).sum().backward()
        grads.append(vg.grad)
        outs.append(out.detach())
    assert torch.equal(outs[0], simulate(v, nt=300, backend="native"))  # the forward is the fast path's
    assert float((grads[0] - grads[1]).norm() / grads[1].norm()) < 1e-4


def test_source_amplitude_gradient_is_the_adjoint_at_the_source():
    """d/d amp through the kernel against float64 central differences of the torch path."""
    geom = forward.Geometry(**SMALL)
    v = _small_map(seed=2, b=1).float()
    lay = native.layout(geom, 12, 12)
    co = native.compact_coefficients(v, geom)
    wav = torch.from_numpy(forward.ricker(geom.freq, geom.dt, geom.nt))
    w = _weights((1, 3, 100, 12), seed=9).float()
    out, ck = native.forward(lay, co["alpha_rows"], co["kx"], co["kz"], co["amp"], wav, keep_every=7)
    _, g_amp = native.backward(lay, co["alpha_rows"], co["kx"], co["kz"], co["amp"], wav, w, ck, 7)
    # the traces are linear in the source amplitudes: J(amp) = <out, w> scales shot by shot
    amp = co["amp"].detach()
    for s in range(3):
        bumped = amp.clone()
        bumped[0, s] *= 2
        out2, _ = native.forward(lay, co["alpha_rows"], co["kx"], co["kz"], bumped, wav)
        fd = float(((out2 - out) * w).double().sum()) / float(amp[0, s])
        assert abs(float(g_amp[0, s]) - fd) <= 1e-4 * abs(fd)


def test_fallback_when_no_compiler(monkeypatch, reference):
    monkeypatch.setattr(native, "_STATE", {"lib": None, "error": None, "warned": False})
    monkeypatch.setattr(native, "find_compiler", lambda: None)
    assert not native.available()
    assert "no C++ compiler found" in native.unavailable_reason()
    v = reference["velocity"][:1]
    with pytest.warns(RuntimeWarning, match="native CPU kernel is unavailable .*no C\\+\\+ compiler"):
        out = simulate(v, nt=50)
    assert np.array_equal(out, simulate(v, nt=50, backend="eager"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per process
        simulate(v, nt=20)
    with pytest.raises(RuntimeError, match="backend='native'.*no C\\+\\+ compiler"):
        simulate(v, nt=20, backend="native")


def test_turned_off_by_environment(monkeypatch):
    monkeypatch.setattr(native, "_STATE", {"lib": None, "error": None, "warned": True})
    monkeypatch.setenv("FWI_NATIVE", "0")
    assert native.unavailable_reason() == "turned off by FWI_NATIVE=0"
    assert forward.resolve_backend("auto", "cpu", 10) == "eager"
    monkeypatch.delenv("FWI_NATIVE")
    assert forward.resolve_backend("auto", "cpu", 10) == "native"
    with pytest.raises(ValueError, match="runs on the CPU"):
        forward.resolve_backend("native", "cuda", 10)
    with pytest.raises(ValueError, match="backend must be one of"):
        simulate(np.full((1, 70, 70), 2000.0, np.float32), nt=5, backend="fast")


def test_bad_tensors_are_refused():
    geom = forward.Geometry(**SMALL)
    lay = native.layout(geom, 12, 12)
    co = native.compact_coefficients(_small_map(b=1).float(), geom)
    wav = torch.zeros(100)
    with pytest.raises(ValueError, match="alpha_rows must be a CPU torch.float32 tensor of shape"):
        native.forward(lay, co["alpha_rows"][:, :5], co["kx"], co["kz"], co["amp"], wav)
    with pytest.raises(ValueError, match="backend='native' computes in float32"):
        simulate_differentiable(_small_map(b=1), geom, backend="native")


@pytest.mark.slow
def test_build_caches_by_source_and_cpu(tmp_path, monkeypatch):
    """A fresh cache folder: the first use compiles (a few seconds), the second loads the
    cached library; another source gets another file."""
    monkeypatch.setenv("FWI_NATIVE_DIR", str(tmp_path))
    path = native.build()
    assert path.parent == tmp_path and path.is_file()
    mtime = path.stat().st_mtime_ns
    assert native.build() == path and path.stat().st_mtime_ns == mtime
    monkeypatch.setattr(native, "SOURCE", native.SOURCE + "\n// another version\n")
    assert native.library_path(native.find_compiler()) != path
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary files left
