import numpy as np
import pytest
import torch

from fwi_core.physics import generate, simulate
from fwi_core.physics.misfit import pde_loss, seismic_misfit

from ..test_metrics import step_map

NT = 80  # short traces keep the tests fast; the loss only sees what it simulates


@pytest.fixture(scope="module")
def truth():
    v = np.concatenate([generate("FlatVel_A", 1, seed=3), generate("CurveFault_A", 1, seed=4)])
    obs = simulate(v, nt=NT, backend="eager")
    return torch.from_numpy(v), torch.from_numpy(obs)


def test_zero_at_the_true_map(truth):
    v, obs = truth
    vg = v.clone().requires_grad_()
    loss = pde_loss(vg, obs, max_time=60, backend="eager")
    assert loss.grad_fn is not None
    assert float(loss.detach()) == 0.0  # the differentiable forward is the fast path, bit for bit
    loss.backward()
    assert float(vg.grad.abs().max()) == 0.0


def _independent(v_np, obs_np, shots, max_time, stride):
    """The per-sample normalised misfit from the fast path, in numpy."""
    cols = [0, 17, 34, 52, 69]
    sim = simulate(v_np, nt=max_time, source_columns=[cols[s] for s in shots], backend="eager")
    o = obs_np[:, shots, :max_time][:, :, ::stride].astype(np.float64)
    s = sim[:, :, ::stride].astype(np.float64)
    return np.mean(((s - o) ** 2).reshape(len(s), -1).sum(1) / (o ** 2).reshape(len(o), -1).sum(1))


@pytest.mark.parametrize("shots, max_time, stride", [(None, None, 1), ([0, 4], 60, 3)])
def test_shifted_map_gives_the_independent_value(truth, shots, max_time, stride):
    v, obs = truth
    shifted = v + 100.0
    vg = shifted.clone().requires_grad_()
    loss = pde_loss(vg, obs, shots=shots, max_time=max_time, time_stride=stride, backend="eager")
    expected = _independent(shifted.numpy(), obs.numpy(), shots or [0, 1, 2, 3, 4], max_time or NT, stride)
    assert expected > 1e-3  # a real misfit, not rounding
    assert abs(float(loss.detach()) - expected) <= 1e-5 * expected
    # no grad: same value through the fast path
    assert abs(float(pde_loss(shifted, obs, shots=shots, max_time=max_time, time_stride=stride,
                              backend="eager")) - expected) <= 1e-5 * expected


@pytest.mark.parametrize("layout", ["B1HW", "BHW"])
def test_gradient_flows_and_descends(truth, layout):
    v, obs = truth
    v0 = v + 100.0 if layout == "B1HW" else v[:, 0] + 100.0
    vg = v0.clone().requires_grad_()
    loss = pde_loss(vg, obs, shots=[0, 4], backend="eager")
    loss.backward()
    g = vg.grad
    assert g.shape == v0.shape and torch.isfinite(g).all() and float(g.abs().max()) > 0
    # a small step against the gradient lowers the loss
    step = 20.0 / float(g.abs().max())
    with torch.no_grad():
        lower = pde_loss(v0 - step * g, obs, shots=[0, 4], backend="eager")
    assert float(lower) < float(loss.detach())


def test_reductions_and_numpy_inputs(truth):
    v, obs = truth
    per = pde_loss((v + 50.0).numpy(), obs.numpy(), reduction="none", max_time=40, backend="eager")
    assert per.shape == (2,) and (per > 0).all()
    total = pde_loss(v + 50.0, obs, reduction="sum", max_time=40, backend="eager")
    assert abs(float(total) - float(per.sum())) <= 1e-6 * float(total)
    raw = pde_loss(v + 50.0, obs, normalize="none", max_time=40, backend="eager")
    sim = simulate((v + 50.0).numpy(), nt=40, backend="eager").astype(np.float64)
    assert abs(float(raw) - np.mean((sim - obs.numpy()[:, :, :40]) ** 2)) <= 1e-5 * float(raw)


@pytest.mark.parametrize("kwargs, match", [
    (dict(shots=[5]), "shots"),
    (dict(max_time=5000), "max_time"),
    (dict(time_stride=0), "time_stride"),
    (dict(normalize="l1"), "normalize"),
])
def test_bad_arguments(truth, kwargs, match):
    v, obs = truth
    with pytest.raises(ValueError, match=match):
        pde_loss(v, obs, **kwargs)


def test_shape_mismatch(truth):
    v, obs = truth
    with pytest.raises(ValueError, match="does not match"):
        pde_loss(v[:1], obs)


def test_velocity_is_clamped_to_the_plausible_range(truth):
    v, obs = truth
    low = v.clone()
    low[:, :, :5] = 1400.0  # below 1500 m/s: the loss sees 1500
    at = v.clone()
    at[:, :, :5] = 1500.0
    a = pde_loss(low, obs, max_time=40, backend="eager")
    b = pde_loss(at, obs, max_time=40, backend="eager")
    assert float(a) == float(b) > 0


def test_seismic_misfit_hand_cases():
    from fwi_core.physics import simulate
    v = step_map(30, 2000.0, 3000.0).float()
    obs = simulate(v, nt=150)
    # ||s - 2s|| / ||2s|| = 1/2 exactly when the re-simulated s equals obs / 2
    assert seismic_misfit(v, 2 * obs).item() == pytest.approx(0.5, rel=1e-6)
    # a wrong near-surface velocity misfits (the direct wave moves); numpy in, numpy out
    out = seismic_misfit(step_map(30, 2300.0, 3000.0).numpy(), obs.numpy())
    assert isinstance(out, np.ndarray) and out.shape == (1,) and out[0] > 0.05


def test_seismic_misfit_custom_simulator():
    obs = torch.ones(2, 5, 10, 70)
    fake = lambda v, nt: torch.zeros(v.shape[0], 5, nt, 70)     # noqa: E731
    torch.testing.assert_close(seismic_misfit(torch.zeros(2, 1, 70, 70), obs, simulator=fake),
                               torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="observed"):
        seismic_misfit(torch.zeros(2, 1, 70, 70), obs[0], simulator=fake)
