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
