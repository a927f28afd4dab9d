import math

import pytest
import torch

from fwi_core.models import create_model
from fwi_core.models.specproj_unet import (DEFAULT_V_BANDS, FAMILY_INITS, SpectralProjector,
                                           fan_filter_masks)

T, R, DT, DX = 1000, 70, 1e-3, 10.0


def plane_wave(v, f0=15.0, t0=0.3, times=None):
    """A Ricker event crossing the 70 receivers at apparent velocity v (m/s), (1000, 70);
    v < 0 moves from the last receiver to the first."""
    t = torch.arange(T, dtype=torch.float64) * DT if times is None else times
    x = torch.arange(R, dtype=torch.float64) * DX
    tau = t[:, None] - t0 - (x[None, :] if v > 0 else x.flip(0)[None, :]) / abs(v)
    a = (math.pi * f0 * tau) ** 2
    return ((1 - 2 * a) * torch.exp(-a)).float()


def test_fan_filter_masks_follow_dispersion_relation():
    f = torch.tensor([10.0, 20.0])
    k = torch.tensor([-0.02, 0.0, 10.0 / 1750, 20.0 / 3750, 0.02])
    m = fan_filter_masks(f, k, [(1500.0, 2000.0), (3500.0, 4000.0), (4500.0, math.inf)])
    assert m.shape == (3, 2, 5) and m.min() >= 0 and m.max() <= 1
    assert m[0, 0, 2] > 0.85 and m[1, 0, 2] < 1e-3          # f=10, v=1750
    assert m[1, 1, 3] > 0.6 and m[0, 1, 3] < 1e-3           # f=20, v=3750 (narrow band)
    assert torch.all(m[2, :, 1] == 1) and torch.all(m[:2, :, 1] == 0)   # k=0: v=inf
    assert torch.allclose(m[..., 0], m[..., 4])            # symmetric in k (f=10,20: v=500,1000)
    with pytest.raises(ValueError):
        fan_filter_masks(f, k, [(2000.0, 1500.0)])


@pytest.mark.parametrize("v, passing, rejecting", [
    (1750.0, (1500.0, 2000.0), (3500.0, 4000.0)),
    (-1750.0, (1500.0, 2000.0), (3500.0, 4000.0)),
    (2250.0, (2000.0, 2500.0), (4000.0, 4500.0)),
    (6000.0, (4500.0, math.inf), (1500.0, 2000.0)),
])
def test_fk_mask_passes_plane_wave_in_band_and_rejects_out_of_band(v, passing, rejecting):
    proj = SpectralProjector(v_bands=[passing, rejecting], allpass=True, learn_masks=False)
    out = proj(plane_wave(v).expand(1, 5, T, R))              # (1, 5*3, 288, 70)
    energy = out.reshape(5, 3, -1).pow(2).sum((0, 2))            # allpass, passing, rejecting
    assert energy[1] > 0.1 * energy[0]
    assert energy[2] < 0.05 * energy[1], energy.tolist()


def test_allpass_is_band_limited_resampling():
    proj = SpectralProjector(v_bands=DEFAULT_V_BANDS, learn_masks=False)
    assert proj.n_masks == len(DEFAULT_V_BANDS) + 1 and proj.f_axis[0] == 2 and proj.f_axis[-1] == 40
    out = proj(plane_wave(2000.0).expand(2, 5, T, R))
    assert out.shape == (2, 5 * proj.n_masks, 288, 70)
    resampled = plane_wave(2000.0, times=torch.arange(288, dtype=torch.float64) / 288)
    allpass = out[0, 0]
    assert (allpass - resampled).norm() < 0.05 * resampled.norm()


def test_projector_rejects_band_above_output_nyquist():
    with pytest.raises(ValueError, match="n_time_out"):
        SpectralProjector(f_band=(2.0, 40.0), n_time_out=64)


def _train_mode_output(family_init):
    torch.manual_seed(0)
    model = create_model("specproj_unet", width=8, family_init=family_init, drop_rate=0.0)
    x = torch.randn(2, 5, T, R, generator=torch.Generator().manual_seed(1)).clamp(-3, 3) / 3
    with torch.no_grad():
        return model, model.train()(x)


def test_family_inits():
    outs = {}
    for fi in FAMILY_INITS:
        model, y = _train_mode_output(fi)
        assert y.shape == (2, 1, 70, 70) and torch.isfinite(y).all()
        outs[fi] = y
        profile = y.mean((0, 1, 3))
        corr = torch.corrcoef(torch.stack([profile, torch.arange(70.0)]))[0, 1]
        if fi in ("flatvel", "curvevel", "fault"):
            assert corr > 0.9, (fi, corr)        # velocity increasing with depth
        if fi == "fault":
            assert model.out_gain.item() == 2.0
            centre = torch.zeros(5, 5, dtype=torch.bool)
            centre[2, 2] = True
            assert torch.all(model.head.weight[..., centre] != 0)
            assert torch.all(model.head.weight[..., ~centre] == 0)
        assert (model.style_code.abs().sum() > 0) == (fi == "style")

    def roughness(y):
        return (y[..., 1:] - y[..., :-1]).abs().mean() + (y[..., 1:, :] - y[..., :-1, :]).abs().mean()

    assert roughness(outs["curvevel"]) < 0.5 * roughness(outs["flatvel"])
    assert roughness(outs["fault"]) > roughness(outs["flatvel"])
    with pytest.raises(ValueError, match="family_init"):
        create_model("specproj_unet", width=4, family_init="salt")


def test_family_bias_terms():
    torch.manual_seed(0)
    model = create_model("specproj_unet", width=4, num_families=3).eval()
    x = torch.randn(2, 5, T, R) / 3
    idx = torch.tensor([0, 2])
    with torch.no_grad():
        base = model(x, idx)
        assert torch.equal(base, model(x))               # family terms start at zero
        model.family_depth_bias[2].fill_(0.5)
        moved = model(x, idx)
    assert torch.equal(moved[0], base[0]) and not torch.allclose(moved[1], base[1])
    for bad in (idx.float(), idx[:1], torch.tensor([0, 3])):
        with pytest.raises(ValueError, match="family_idx"):
            model(x, bad)
    with pytest.raises(ValueError, match="num_families=0"):
        create_model("specproj_unet", width=4)(x, idx)


def test_family_head_predicts_the_family_at_inference():
    torch.manual_seed(0)
    model = create_model("specproj_unet", width=4, num_families=3).eval()
    x = torch.randn(2, 5, T, R) / 3
    with torch.no_grad():
        model.family_depth_bias[2].fill_(0.5)
        model.family_head.weight.zero_()
        model.family_head.bias.copy_(torch.tensor([0.0, 0.0, 20.0]))   # the head says: family 2
        two = torch.full((2,), 2, dtype=torch.long)
        torch.testing.assert_close(model(x), model(x, two), rtol=1e-5, atol=1e-6)
        model.family_head.bias.copy_(torch.tensor([20.0, 0.0, 0.0]))   # now: family 0
        torch.testing.assert_close(model(x), model(x, torch.zeros(2, dtype=torch.long)), rtol=1e-5, atol=1e-6)
    model.train()
    out = model(x, two)
    aux = model.auxiliary_losses(two)
    assert set(aux) == {"family"} and aux["family"].item() > 5.0      # the head (favouring 0) is wrong
    (out.mean() + aux["family"]).backward()
    assert model.family_head.weight.grad.abs().sum() > 0
