import pytest
import torch

from fwi_core.models.blocks import (SCSE, ConvBnAct, PixelShuffleUpsample, UNetDecoder,
                                    center_crop, check_seismic)


def test_pixel_shuffle_upsample_starts_without_checkerboard():
    up = PixelShuffleUpsample(6, 4)
    y = up(torch.randn(1, 6, 5, 7))
    assert y.shape == (1, 4, 10, 14)
    for di, dj in ((0, 1), (1, 0), (1, 1)):          # ICNR: the 4 sub-pixels are equal
        assert torch.equal(y[..., ::2, ::2], y[..., di::2, dj::2])


def test_scse_and_conv_bn_act_shapes():
    x = torch.randn(2, 8, 9, 11)
    assert SCSE(8)(x).shape == x.shape
    assert ConvBnAct(8, 4, (3, 1), stride=(2, 1))(x).shape == (2, 4, 5, 11)


def test_unet_decoder_pyramid_and_odd_sizes():
    feats = [torch.randn(1, 4, 35, 35), torch.randn(1, 8, 18, 18), torch.randn(1, 16, 9, 9)]
    dec = UNetDecoder([4, 8, 16], [8, 4, 4], drop_rate=0.0)
    assert dec(feats).shape == (1, 4, 70, 70)            # 9 -> 18 -> 35 (resized) -> 70 (no skip)


def test_check_seismic_and_crop():
    check_seismic(torch.zeros(2, 5, 1000, 70), "m")
    with pytest.raises(ValueError, match="m: expected"):
        check_seismic(torch.zeros(2, 5, 70, 1000), "m")
    with pytest.raises(ValueError, match="floating"):
        check_seismic(torch.zeros(2, 5, 1000, 70, dtype=torch.long), "m")
    assert center_crop(torch.arange(72 * 72.0).view(72, 72))[0, 0] == 73


def test_interpolation_matrix_and_gather_to_grid():
    import torch.nn.functional as F
    from fwi_core.models.blocks import GatherToGrid, interpolation_matrix
    m = interpolation_matrix(125, 70)
    x = torch.randn(3, 125)
    ref = F.interpolate(x[None], size=70, mode="linear", align_corners=False)[0]
    assert m.shape == (70, 125) and torch.allclose(m.sum(1), torch.ones(70))
    assert torch.allclose(x @ m.T, ref, atol=1e-4)       # float32 index rounding in F.interpolate
    enc = GatherToGrid(width=4, out_channels=6).eval()
    seis = torch.randn(2, 5, 1000, 70)
    assert enc(seis).shape == (2, 6, 70, 70)
    t = enc.time_convs(seis)                       # time -> depth starts as a linear resize
    d = torch.einsum("bctx,dt->bcdx", t, enc.time_to_depth)
    ref = F.interpolate(t, size=(70, 70), mode="bilinear", align_corners=False)
    assert torch.allclose(d, ref, atol=1e-4)


def test_prior_channels_and_check_prior():
    from fwi_core.models.blocks import check_prior, prior_channels
    like = torch.zeros(2, 3, 35, 35)
    assert torch.equal(prior_channels(None, like), torch.zeros(2, 2, 35, 35))
    p = torch.full((2, 1, 70, 70), -0.5)
    pc = prior_channels(p, like)
    assert pc.shape == (2, 2, 35, 35) and torch.allclose(pc[:, 0], torch.tensor(-0.5))
    assert torch.equal(pc[:, 1], torch.ones(2, 35, 35))
    check_prior(None, 2, "m")
    check_prior(p, 2, "m")
    for bad in (p[:1], p[:, :, :69], p.long(), p[:, 0]):
        with pytest.raises(ValueError, match=r"m: prior .*\(2, 1, 70, 70\)"):
            check_prior(bad, 2, "m")
