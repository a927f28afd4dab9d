"""Building blocks shared by the model zoo.

- :class:`ConvBnAct`: Conv2d -> BatchNorm2d -> activation, the unit of every CNN here.
- :class:`SCSE`: concurrent spatial and channel squeeze & excitation
  (Roy, Navab, Wachinger, "Concurrent Spatial and Channel Squeeze & Excitation in Fully
  Convolutional Networks", MICCAI 2018).
- :class:`PixelShuffleUpsample`: sub-pixel convolution (Shi et al., CVPR 2016) with ICNR
  initialisation (Aitken et al. 2017), so that it starts as a nearest-neighbour upsampling
  and shows no checkerboard pattern.
- :class:`DecoderBlock` and :class:`UNetDecoder`: a UNet decoder (Ronneberger et al. 2015)
  that upsamples with pixel shuffle, concatenates the skip, refines with two ConvBnAct,
  gates with SCSE and applies ``Dropout2d`` (MC-dropout ready).
- :func:`check_seismic`: the input-shape check every model runs first.

Shapes use (B, C, H, W); the seismic input is (B, 5, 1000, 70) = (batch, sources, time,
receivers), the velocity output (B, 1, 70, 70) = (batch, 1, depth, x).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

SEISMIC_SHAPE: Tuple[int, int, int] = (5, 1000, 70)   # (sources, time samples, receivers)
VELOCITY_SHAPE: Tuple[int, int] = (70, 70)            # (depth, x)

_Size2 = Union[int, Tuple[int, int]]


def check_seismic(x: torch.Tensor, model_name: str,
                  expected: Sequence[int] = SEISMIC_SHAPE) -> None:
    """Raise ``ValueError`` unless ``x`` is a float tensor of shape (B, *expected)."""
    if not torch.is_tensor(x) or x.dim() != 1 + len(expected) or tuple(x.shape[1:]) != tuple(expected):
        got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ValueError(
            f"{model_name}: expected normalised seismic of shape (B, {', '.join(map(str, expected))}) "
            f"= (batch, sources, time, receivers), got {got}")
    if not x.is_floating_point():
        raise ValueError(f"{model_name}: expected a floating-point tensor, got dtype {x.dtype}")


def center_crop(x: torch.Tensor, size: Tuple[int, int] = VELOCITY_SHAPE) -> torch.Tensor:
    """Crop the last two dims of ``x`` (..., H, W) to ``size`` around the centre."""
    h, w = x.shape[-2:]
    th, tw = size
    if h < th or w < tw:
        raise ValueError(f"center_crop: cannot crop ({h}, {w}) to {size}")
    top, left = (h - th) // 2, (w - tw) // 2
    return x[..., top:top + th, left:left + tw]


def act_layer(name: str) -> nn.Module:
    """Activation by name: 'relu', 'gelu', 'silu', 'leaky_relu' (slope 0.2, as in OpenFWI)."""
    layers = {"relu": lambda: nn.ReLU(inplace=True), "gelu": nn.GELU,
              "silu": lambda: nn.SiLU(inplace=True),
              "leaky_relu": lambda: nn.LeakyReLU(0.2, inplace=True)}
    if name not in layers:
        raise ValueError(f"unknown activation {name!r}; choose from {sorted(layers)}")
    return layers[name]()


class ConvBnAct(nn.Sequential):
    """Conv2d -> BatchNorm2d -> activation. ``padding=None`` keeps the size at stride 1.

    Shapes: (B, in_ch, H, W) -> (B, out_ch, H', W') with the usual conv arithmetic.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size: _Size2 = 3, stride: _Size2 = 1,
                 padding: Optional[_Size2] = None, act: Optional[str] = "relu"):
        k = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        if padding is None:
            padding = (k[0] // 2, k[1] // 2)
        layers: List[nn.Module] = [
            nn.Conv2d(in_ch, out_ch, k, stride=stride, padding=padding, bias=False),
            nn.BatchNorm2d(out_ch)]
        if act is not None:
            layers.append(act_layer(act))
        super().__init__(*layers)


class SCSE(nn.Module):
    """Concurrent spatial and channel squeeze & excitation: ``x * cSE(x) + x * sSE(x)``.

    Shapes: (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.cse = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1), nn.Sigmoid())
        self.sse = nn.Sequential(nn.Conv2d(channels, 1, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.cse(x) + x * self.sse(x)


def icnr_(weight: torch.Tensor, scale: int = 2) -> torch.Tensor:
    """ICNR init in place: every group of ``scale**2`` output channels gets the same kernel,
    so conv + PixelShuffle equals nearest-neighbour upsampling of one conv at init."""
    out_ch = weight.shape[0] // (scale * scale)
    base = torch.empty(out_ch, *weight.shape[1:], dtype=weight.dtype, device=weight.device)
    nn.init.kaiming_normal_(base, nonlinearity="relu")
    with torch.no_grad():
        weight.copy_(base.repeat_interleave(scale * scale, dim=0))
    return weight


class PixelShuffleUpsample(nn.Module):
    """Upsample by ``scale`` with a 3x3 conv to ``out_ch * scale**2`` channels and PixelShuffle.

    Shapes: (B, in_ch, H, W) -> (B, out_ch, scale*H, scale*W).
    """

    def __init__(self, in_ch: int, out_ch: int, scale: int = 2, act: str = "relu"):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch * scale * scale, 3, padding=1)
        icnr_(self.conv.weight, scale)
        nn.init.zeros_(self.conv.bias)
        self.shuffle = nn.PixelShuffle(scale)
        self.act = act_layer(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.shuffle(self.conv(x)))


class DecoderBlock(nn.Module):
    """UNet decoder stage: upsample x2, concatenate the skip, two ConvBnAct, SCSE, dropout.

    Shapes: x (B, in_ch, H, W), skip (B, skip_ch, 2H, 2W) or None -> (B, out_ch, 2H, 2W)
    (the upsampled map is resized to the skip's size when they differ, e.g. odd sizes).
    """

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int, attention: bool = True,
                 drop_rate: float = 0.1, act: str = "relu"):
        super().__init__()
        self.up = PixelShuffleUpsample(in_ch, out_ch, 2, act)
        self.conv1 = ConvBnAct(out_ch + skip_ch, out_ch, 3, act=act)
        self.conv2 = ConvBnAct(out_ch, out_ch, 3, act=act)
        self.attention = SCSE(out_ch) if attention else nn.Identity()
        self.drop = nn.Dropout2d(drop_rate)

    def forward(self, x: torch.Tensor, skip: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.up(x)
        if skip is not None:
            if x.shape[-2:] != skip.shape[-2:]:
                x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = torch.cat([x, skip], dim=1)
        x = self.conv2(self.conv1(x))
        return self.drop(self.attention(x))


class UNetDecoder(nn.Module):
    """UNet decoder over a feature pyramid.

    Args:
        encoder_channels: channels of the encoder features, shallow to deep
            (each deeper map half the size of the previous one).
        decoder_channels: output channels of the decoder blocks, deep to shallow. Block i
            upsamples x2 and takes the (i+1)-th deepest feature as skip; blocks beyond the
            pyramid upsample without a skip.
        attention: SCSE after each block.
        drop_rate: ``Dropout2d`` probability at the end of each block.

    Shapes: features [(B, c_0, H, W), (B, c_1, H/2, W/2), ..., (B, c_n, H/2^n, W/2^n)]
    -> (B, decoder_channels[-1], H/2^n * 2^len(decoder_channels), ...).
    """

    def __init__(self, encoder_channels: Sequence[int], decoder_channels: Sequence[int],
                 attention: bool = True, drop_rate: float = 0.1, act: str = "relu"):
        super().__init__()
        deep_first = list(encoder_channels)[::-1]
        skips = deep_first[1:] + [0] * max(0, len(decoder_channels) - len(deep_first) + 1)
        in_chs = [deep_first[0]] + list(decoder_channels[:-1])
        self.blocks = nn.ModuleList(
            DecoderBlock(i, s, o, attention, drop_rate, act)
            for i, s, o in zip(in_chs, skips, decoder_channels))
        self.out_channels = decoder_channels[-1]

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        deep_first = list(features)[::-1]
        x, skips = deep_first[0], deep_first[1:]
        for i, block in enumerate(self.blocks):
            x = block(x, skips[i] if i < len(skips) else None)
        return x


def check_prior(prior: Optional[torch.Tensor], batch: int, model_name: str) -> None:
    """Raise ``ValueError`` unless ``prior`` is None or a float tensor (batch, 1, 70, 70):
    a backbone's normalised velocity prediction, given to members trained on residuals."""
    if prior is None:
        return
    shape = (batch, 1) + VELOCITY_SHAPE
    if not torch.is_tensor(prior) or tuple(prior.shape) != shape or not prior.is_floating_point():
        got = (f"{tuple(prior.shape)} {prior.dtype}" if torch.is_tensor(prior) else type(prior).__name__)
        raise ValueError(f"{model_name}: prior must be the backbone's normalised velocity, a float "
                         f"tensor (B, 1, 70, 70) = (batch, 1, depth, x), here {shape}, got {got}")


def prior_channels(prior: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Two channels for a prior-aware member: ``[prior, 1]`` with a prior, ``[0, 0]`` without
    (the indicator tells "no prior" from a prior of 0, i.e. 3000 m/s).

    Args:
        prior: (B, 1, 70, 70) or None.
        like: (B, C, H, W) tensor whose batch, size, dtype and device the result takes
            (the prior is resized bilinearly when (H, W) != (70, 70)).
    Returns:
        (B, 2, H, W).
    """
    b, _, h, w = like.shape
    if prior is None:
        return like.new_zeros(b, 2, h, w)
    p = prior.to(like.dtype)
    if tuple(p.shape[-2:]) != (h, w):
        p = F.interpolate(p, size=(h, w), mode="bilinear", align_corners=False)
    return torch.cat([p, torch.ones_like(p)], dim=1)


def interpolation_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) matrix of 1-D linear interpolation with ``align_corners=False``
    (the same sample positions as ``F.interpolate(mode='linear')``); rows sum to 1."""
    eye = torch.eye(n_in, dtype=torch.float64).unsqueeze(0)               # (1, n_in, n_in)
    return F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[0].T.float()


class GatherToGrid(nn.Module):
    """Encoder from shot gathers to a feature grid on the velocity map's 70 x 70 cells.

    Convs along time at stride (2, 1) squeeze 1000 samples to 125 (as InversionNet's
    first blocks), a 3x3 conv mixes neighbouring receivers, then a learned linear map along
    the time axis (125 -> 70 depth rows, shared by every channel and receiver column,
    initialised as linear interpolation) turns time into depth, and a 3x3 conv follows.

    Args:
        width: channels w of the time convs (w, w, 2w).
        out_channels: channels of the output grid.
        act: activation name (:func:`act_layer`).

    Shapes: (B, 5, 1000, 70) -> (B, w, 500, 70) -> (B, w, 250, 70) -> (B, 2w, 125, 70)
    -> time-to-depth (B, 2w, 70, 70) -> (B, out_channels, 70, 70).
    """

    def __init__(self, width: int = 32, out_channels: int = 64, act: str = "relu"):
        super().__init__()
        w = width
        self.time_convs = nn.Sequential(
            ConvBnAct(5, w, (7, 1), stride=(2, 1), padding=(3, 0), act=act),
            ConvBnAct(w, w, (3, 1), stride=(2, 1), padding=(1, 0), act=act),
            ConvBnAct(w, 2 * w, (3, 1), stride=(2, 1), padding=(1, 0), act=act),
            ConvBnAct(2 * w, 2 * w, 3, act=act))
        self.time_to_depth = nn.Parameter(interpolation_matrix(125, VELOCITY_SHAPE[0]))
        self.out = ConvBnAct(2 * w, out_channels, 3, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.time_convs(x)                                             # (B, 2w, 125, 70)
        x = torch.einsum("bctx,dt->bcdx", x, self.time_to_depth.to(x.dtype))  # (B, 2w, 70, 70)
        return self.out(x)                                                 # (B, C, 70, 70)
