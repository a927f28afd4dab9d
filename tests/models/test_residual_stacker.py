"""Residual stacker: its extra inputs are used, the output stays in [-1, 1] and within
max_correction of the prior, shapes are checked, and the residual helper is exact."""
import numpy as np
import pytest
import torch

from fwi_core.data.normalize import normalize_seismic, normalize_velocity
from fwi_core.models import create_model, model_capabilities
from fwi_core.models.residual_stacker import ResidualStacker, compute_residual


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("residual_stacker", width=4, init_scale=1.0).eval()


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 1000, 70, generator=g).clamp(-3, 3) / 3
    prior = torch.linspace(-0.9, 0.9, 70).view(1, 1, 70, 1).expand(2, 1, 70, 70).contiguous()
    residual = 0.3 * torch.randn(2, 5, 1000, 70, generator=g)
    return x, prior, residual


def test_flags_and_registry():
    from fwi_core.models import count_parameters

    caps = model_capabilities("residual_stacker")
    assert caps.accepts_prior and caps.accepts_residual and caps.adds_prior
    assert isinstance(create_model("residual_stacker", width=4), ResidualStacker)
    assert count_parameters(create_model("residual_stacker")) == 154_337     # README


@torch.no_grad()
def test_output_uses_prior_and_residual(model, inputs):
    x, prior, residual = inputs
    out = model(x, prior, residual)
    assert out.shape == (2, 1, 70, 70) and out.abs().max() <= 1
    assert not torch.allclose(out, model(x, prior, torch.zeros_like(residual)), atol=1e-4)
    assert not torch.allclose(out, model(x, -prior, residual), atol=1e-4)
    # x alone: zero prior and residual = x
    assert torch.equal(model(x), model(x, torch.zeros_like(prior), x))


@torch.no_grad()
def test_correction_is_bounded(model, inputs):
    x, prior, residual = inputs
    extreme = prior.clone()
    extreme[..., :5, :] = 1.0
    extreme[..., -5:, :] = -1.0
    for scale in (1.0, 100.0):                       # huge head weights: tanh saturates
        with torch.no_grad():
            model.head.weight.mul_(scale)
        out = model(x, extreme, residual * scale)
        with torch.no_grad():
            model.head.weight.div_(scale)
        assert out.abs().max() <= 1.0
        assert (out - extreme).abs().max() <= 0.5 + 1e-6


def test_untrained_model_starts_near_the_prior(inputs):
    x, prior, residual = inputs
    torch.manual_seed(0)
    small = create_model("residual_stacker", width=4).eval()     # init_scale 0.1
    with torch.no_grad():
        assert (small(x, prior, residual) - prior).abs().mean() < 0.1


def test_learns_a_correction_from_the_residual():
    """The target differs from the prior by a shift that only the residual reveals:
    a few steps fit it better than the prior."""
    torch.manual_seed(0)
    m = create_model("residual_stacker", width=4, drop_rate=0.0).train()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 1000, 70, generator=g) / 3
    prior = torch.zeros(2, 1, 70, 70)
    shift = torch.tensor([0.3, -0.3]).view(2, 1, 1, 1)
    residual = shift.expand(2, 5, 1000, 70).contiguous()
    target = prior + shift
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    for _ in range(15):
        opt.zero_grad()
        loss = (m(x, prior, residual) - target).abs().mean()
        loss.backward()
        opt.step()
    m.eval()
    with torch.no_grad():
        err = (m(x, prior, residual) - target).abs().mean()
    assert err < 0.5 * (prior - target).abs().mean(), err


def test_rejects_bad_prior_and_residual(model, inputs):
    x, prior, residual = inputs
    with pytest.raises(ValueError, match=r"prior must be .*\(B, 1, 70, 70\)"):
        model(x, prior[:, :, :69])
    with pytest.raises(ValueError, match=r"residual must have the seismic's shape"):
        model(x, prior, residual[:, :, :999])
    with pytest.raises(ValueError, match="max_correction"):
        ResidualStacker(max_correction=0.0)


def test_compute_residual_is_zero_for_the_true_map(reference):
    vel = torch.from_numpy(reference["velocity"][:1]).float()
    nt = 80
    obs = torch.from_numpy(reference["seismic"][:1, :, :nt]).float()
    x = normalize_seismic(obs)
    r_true = compute_residual(x, normalize_velocity(vel))
    assert r_true.shape == x.shape and r_true.abs().max() < 1e-3
    r_off = compute_residual(x, normalize_velocity(vel) + 0.1)
    assert r_off.abs().mean() > 100 * r_true.abs().mean()
    np.testing.assert_allclose(compute_residual(x, normalize_velocity(vel), simulator=lambda v, nt: obs).numpy(), 0)
