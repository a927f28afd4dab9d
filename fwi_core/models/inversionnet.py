"""InversionNet: the OpenFWI baseline encoder-decoder CNN.

Wu & Lin, "InversionNet: An Efficient and Accurate Data-Driven Full Waveform Inversion",
IEEE Trans. Computational Imaging 2019; Deng et al., "OpenFWI", NeurIPS 2022
(reference code: lanl/OpenFWI ``network.py``).

The encoder squeezes the time axis with (7,1)/(3,1) kernels at stride (2,1), then 3x3
convs at stride 2 bring (1000, 70) down to (8, 9) and an (8, 9) conv to a 1x1 bottleneck;
the decoder grows 1x1 -> 5x5 -> ... -> 80x80 with transposed convs, crops 5 px a side to
70x70 and ends in Tanh.

Input: normalised seismic (B, 5, 1000, 70). Output: normalised velocity (B, 1, 70, 70)
in [-1, 1]. Shapes in the comments of :meth:`InversionNet.forward` are for the default
widths (dim1..dim5 = 32, 64, 128, 256, 512).

MC dropout: ``Dropout2d(drop_rate)`` after each decoder stage from 10x10 on.
"""
from __future__ import annotations

import math
import torch
import torch.nn as nn
import torch.nn.functional as F

from .blocks import check_seismic
from .registry import register_model

__all__ = ["InversionNet", "inversionnet", "inversionnet_small"]


class ConvBlock(nn.Sequential):
    """Conv2d -> BatchNorm2d -> LeakyReLU(0.2), OpenFWI's ``ConvBlock``."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size=3, stride=1, padding=1):
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding),
            nn.BatchNorm2d(out_ch), nn.LeakyReLU(0.2, inplace=True))


class DeconvBlock(nn.Sequential):
    """ConvTranspose2d -> BatchNorm2d -> LeakyReLU(0.2), OpenFWI's ``DeconvBlock``."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size=2, stride=2, padding=0):
        super().__init__(
            nn.ConvTranspose2d(in_ch, out_ch, kernel_size, stride, padding),
            nn.BatchNorm2d(out_ch), nn.LeakyReLU(0.2, inplace=True))


class ConvBlockTanh(nn.Sequential):
    """Conv2d -> BatchNorm2d -> Tanh, OpenFWI's ``ConvBlock_Tanh`` (the output layer)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size=3, stride=1, padding=1):
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding),
            nn.BatchNorm2d(out_ch), nn.Tanh())


class InversionNet(nn.Module):
    """OpenFWI InversionNet, (B, 5, 1000, 70) -> (B, 1, 70, 70) in [-1, 1].

    Args:
        dim1..dim5: channel widths (OpenFWI defaults 32, 64, 128, 256, 512).
        drop_rate: ``Dropout2d`` probability in the decoder (0 disables it).
    """

    def __init__(self, dim1: int = 32, dim2: int = 64, dim3: int = 128, dim4: int = 256,
                 dim5: int = 512, drop_rate: float = 0.1):
        super().__init__()
        self.convblock1 = ConvBlock(5, dim1, kernel_size=(7, 1), stride=(2, 1), padding=(3, 0))
        self.convblock2_1 = ConvBlock(dim1, dim2, kernel_size=(3, 1), stride=(2, 1), padding=(1, 0))
        self.convblock2_2 = ConvBlock(dim2, dim2, kernel_size=(3, 1), padding=(1, 0))
        self.convblock3_1 = ConvBlock(dim2, dim2, kernel_size=(3, 1), stride=(2, 1), padding=(1, 0))
        self.convblock3_2 = ConvBlock(dim2, dim2, kernel_size=(3, 1), padding=(1, 0))
        self.convblock4_1 = ConvBlock(dim2, dim3, kernel_size=(3, 1), stride=(2, 1), padding=(1, 0))
        self.convblock4_2 = ConvBlock(dim3, dim3, kernel_size=(3, 1), padding=(1, 0))
        self.convblock5_1 = ConvBlock(dim3, dim3, stride=2)
        self.convblock5_2 = ConvBlock(dim3, dim3)
        self.convblock6_1 = ConvBlock(dim3, dim4, stride=2)
        self.convblock6_2 = ConvBlock(dim4, dim4)
        self.convblock7_1 = ConvBlock(dim4, dim4, stride=2)
        self.convblock7_2 = ConvBlock(dim4, dim4)
        self.convblock8 = ConvBlock(dim4, dim5, kernel_size=(8, math.ceil(70 / 8)), padding=0)

        self.deconv1_1 = DeconvBlock(dim5, dim5, kernel_size=5)
        self.deconv1_2 = ConvBlock(dim5, dim5)
        self.deconv2_1 = DeconvBlock(dim5, dim4, kernel_size=4, stride=2, padding=1)
        self.deconv2_2 = ConvBlock(dim4, dim4)
        self.deconv3_1 = DeconvBlock(dim4, dim3, kernel_size=4, stride=2, padding=1)
        self.deconv3_2 = ConvBlock(dim3, dim3)
        self.deconv4_1 = DeconvBlock(dim3, dim2, kernel_size=4, stride=2, padding=1)
        self.deconv4_2 = ConvBlock(dim2, dim2)
        self.deconv5_1 = DeconvBlock(dim2, dim1, kernel_size=4, stride=2, padding=1)
        self.deconv5_2 = ConvBlock(dim1, dim1)
        self.deconv6 = ConvBlockTanh(dim1, 1)
        self.drop = nn.Dropout2d(drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_seismic(x, type(self).__name__)
        # Encoder
        x = self.convblock1(x)              # (B, 32, 500, 70)
        x = self.convblock2_1(x)            # (B, 64, 250, 70)
        x = self.convblock2_2(x)            # (B, 64, 250, 70)
        x = self.convblock3_1(x)            # (B, 64, 125, 70)
        x = self.convblock3_2(x)            # (B, 64, 125, 70)
        x = self.convblock4_1(x)            # (B, 128, 63, 70)
        x = self.convblock4_2(x)            # (B, 128, 63, 70)
        x = self.convblock5_1(x)            # (B, 128, 32, 35)
        x = self.convblock5_2(x)            # (B, 128, 32, 35)
        x = self.convblock6_1(x)            # (B, 256, 16, 18)
        x = self.convblock6_2(x)            # (B, 256, 16, 18)
        x = self.convblock7_1(x)            # (B, 256, 8, 9)
        x = self.convblock7_2(x)            # (B, 256, 8, 9)
        x = self.convblock8(x)              # (B, 512, 1, 1)
        # Decoder
        x = self.deconv1_1(x)               # (B, 512, 5, 5)
        x = self.deconv1_2(x)               # (B, 512, 5, 5)
        x = self.deconv2_1(x)               # (B, 256, 10, 10)
        x = self.drop(self.deconv2_2(x))    # (B, 256, 10, 10)
        x = self.deconv3_1(x)               # (B, 128, 20, 20)
        x = self.drop(self.deconv3_2(x))    # (B, 128, 20, 20)
        x = self.deconv4_1(x)               # (B, 64, 40, 40)
        x = self.drop(self.deconv4_2(x))    # (B, 64, 40, 40)
        x = self.deconv5_1(x)               # (B, 32, 80, 80)
        x = self.drop(self.deconv5_2(x))    # (B, 32, 80, 80)
        x = F.pad(x, [-5, -5, -5, -5])      # (B, 32, 70, 70)
        x = self.deconv6(x)                 # (B, 1, 70, 70)
        return x


_DEFAULT_DIMS = (32, 64, 128, 256, 512)


def _create_inversionnet(width: float = 1.0, drop_rate: float = 0.1, **kwargs) -> InversionNet:
    """Widths are OpenFWI's times ``width`` (at least 2 channels); explicit ``dim1``..``dim5``
    keyword arguments override single widths."""
    base = {f"dim{i + 1}": max(2, int(round(d * width))) for i, d in enumerate(_DEFAULT_DIMS)}
    unknown = set(kwargs) - set(base)
    if unknown:
        raise TypeError(f"inversionnet: unexpected keyword arguments {sorted(unknown)}")
    base.update(kwargs)
    return InversionNet(drop_rate=drop_rate, **base)


@register_model
def inversionnet(**kwargs) -> InversionNet:
    """OpenFWI InversionNet at the paper's widths (about 24.4M parameters)."""
    return _create_inversionnet(**kwargs)


@register_model
def inversionnet_small(**kwargs) -> InversionNet:
    """InversionNet at half width (dim1..dim5 = 16..256) for smoke runs."""
    kwargs.setdefault("width", 0.5)
    return _create_inversionnet(**kwargs)
