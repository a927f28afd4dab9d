"""UNets on timm backbones (ConvNeXt, CAFormer) adapted to 1000 x 70 shot gathers.

Backbones: ConvNeXt (Liu et al., "A ConvNet for the 2020s", CVPR 2022) and CAFormer
(Yu et al., "MetaFormer Baselines for Vision", TPAMI 2023), built by
``timm.create_model(name, pretrained=False, features_only=True, in_chans=5)``. The design
follows the strongest public notebook of the competition (B. Artley's CAFormer UNet):
5 sources as input channels, stem stride (4, 1), UNet decoder with pixel shuffle and SCSE.

Stem adaptation (so the 70 receivers are not cut to 17 columns by the stride-4 stem): the
gather is reflect-padded so that the backbone's own stem conv, set to stride (4, 1) and no
padding, gives (288, 72); a new conv of kernel (4, 3) at stride (4, 1), initialised as a
4-sample average per channel so pretrained stem features pass through, gives (72, 72).
The stages then give a 72 / 36 / 18 / 9 pyramid; the decoder climbs back to 72 x 72, and a
3x3 head, a 1 px crop per side and tanh give the velocity.

Shapes: (B, 5, 1000, 70) -> pad (B, 5, 1148 + kh, 71 + kw) -> stem (B, C0, 72, 72)
-> features (B, C0, 72, 72), (B, C1, 36, 36), (B, C2, 18, 18), (B, C3, 9, 9)
-> decoder (B, D, 72, 72) -> (B, 1, 70, 70) in [-1, 1].

timm is imported lazily, when a model is built: ``fwi_core`` itself needs only numpy and
torch. ``pretrained_path`` loads a local timm checkpoint (ImageNet classification
weights, 3 input channels; timm adapts the first conv to 5 channels and drops the head);
nothing is downloaded.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..utils import optional_import
from .blocks import UNetDecoder, center_crop, check_seismic
from .registry import register_model

__all__ = ["TimmUNet", "convnext_unet", "caformer_unet", "import_timm"]

_STEM_OUT = 72          # square stem output (time, receivers)


def import_timm():
    """Import timm or raise an ImportError that says how to get it."""
    return optional_import("timm", "the timm-backbone models (convnext_unet, caformer_unet)",
                           "pip install timm (Kaggle's image ships it; offline, attach a wheels dataset)")


def _stem_conv(backbone: nn.Module, name: str) -> Tuple[nn.Module, str]:
    """(parent module, attribute) of the first conv of a features_only timm backbone."""
    if name.startswith("convnext"):
        return backbone, "stem_0"
    if name.startswith("caformer"):
        return backbone.stem, "conv"
    raise ValueError(f"TimmUNet: backbone {name!r} not supported; use a convnext_* or caformer_* model")


def _create_encoder(timm, backbone: str, pretrained: bool, **kwargs) -> nn.Module:
    """``timm.create_model(backbone, ...)``; a CAFormer with ``depths``/``dims`` overrides
    (timm's caformer_* entry points fix both) is built from timm's MetaFormer class with
    CAFormer's token mixers and norms (conv, conv, attention, attention)."""
    if not (backbone.startswith("caformer") and {"depths", "dims"} & set(kwargs)):
        return timm.create_model(backbone, pretrained=pretrained, **kwargs)
    mf = optional_import("timm.models.metaformer", "caformer_unet with custom depths/dims")
    kwargs.setdefault("token_mixers", [mf.SepConv, mf.SepConv, mf.Attention, mf.Attention])
    kwargs.setdefault("norm_layers", [mf.LayerNorm2dNoBias] * 2 + [mf.LayerNormNoBias] * 2)
    out_indices = kwargs.pop("out_indices")
    return mf.build_model_with_cfg(mf.MetaFormer, backbone, pretrained, pretrained_filter_fn=mf.checkpoint_filter_fn,
                                   feature_cfg=dict(flatten_sequential=True, out_indices=out_indices), **kwargs)


class TimmUNet(nn.Module):
    """UNet with a timm ConvNeXt / CAFormer encoder, (B, 5, 1000, 70) -> (B, 1, 70, 70).

    Args:
        backbone: timm model name (convnext_atto/femto/pico/nano/tiny/..., caformer_s18/
            s36/m36/b36).
        decoder_channels: channels of the three decoder blocks (9 -> 18 -> 36 -> 72).
        drop_rate: ``Dropout2d`` probability in the decoder blocks (MC dropout).
        drop_path_rate: stochastic depth of the backbone.
        pretrained_path: local timm checkpoint file (.pth/.bin/.safetensors) of ``backbone``.
        backbone_kwargs: extra keyword arguments for ``timm.create_model``, e.g.
            ``dims``/``depths`` for a tiny test model (ConvNeXt and CAFormer).
    """

    def __init__(self, backbone: str = "convnext_atto",
                 decoder_channels: Sequence[int] = (256, 128, 64), drop_rate: float = 0.1,
                 drop_path_rate: float = 0.0, pretrained_path: Optional[str] = None,
                 backbone_kwargs: Optional[dict] = None):
        super().__init__()
        if not backbone.startswith(("convnext", "caformer")):
            raise ValueError(f"TimmUNet: backbone {backbone!r} not supported; "
                             "use a convnext_* or caformer_* model")
        timm = import_timm()
        if len(decoder_channels) != 3:
            raise ValueError(f"TimmUNet: decoder_channels needs 3 entries, got {tuple(decoder_channels)}")
        kwargs = dict(features_only=True, in_chans=5, out_indices=(0, 1, 2, 3),
                      drop_path_rate=drop_path_rate, **(backbone_kwargs or {}))
        if pretrained_path is not None:
            if not os.path.isfile(pretrained_path):
                raise FileNotFoundError(f"TimmUNet: pretrained_path {pretrained_path!r} is not a file")
            kwargs["pretrained_cfg_overlay"] = dict(file=os.fspath(pretrained_path), source="file")
        self.backbone_name = backbone
        self.encoder = _create_encoder(timm, backbone, pretrained_path is not None, **kwargs)
        self._adapt_stem()
        channels = self.encoder.feature_info.channels()
        self.decoder = UNetDecoder(channels, decoder_channels, attention=True, drop_rate=drop_rate)
        self.head = nn.Conv2d(decoder_channels[-1], 1, 3, padding=1)

    def _adapt_stem(self) -> None:
        """Stride (4, 1), no padding, plus a time-reducing conv: (1000, 70) -> (72, 72)."""
        parent, attr = _stem_conv(self.encoder, self.backbone_name)
        conv: nn.Conv2d = getattr(parent, attr)
        if not isinstance(conv, nn.Conv2d) or tuple(conv.stride) != (4, 4):
            raise ValueError(f"TimmUNet: {self.backbone_name!r} has no single stride-4 stem conv "
                             "(overlapping '_ols' stems are not supported); use e.g. convnext_atto")
        kh, kw = conv.kernel_size
        conv.stride, conv.padding = (4, 1), (0, 0)
        pad_t = 4 * (4 * _STEM_OUT - 1) + kh - 1000     # time rows to add
        pad_x = _STEM_OUT - 1 + kw - 70                 # receiver columns to add
        c = conv.out_channels
        squeeze = nn.Conv2d(c, c, (4, 3), stride=(4, 1), padding=(0, 1))
        with torch.no_grad():
            squeeze.weight.normal_(0.0, 0.01)
            squeeze.weight[torch.arange(c), torch.arange(c), :, 1] += 0.25
            squeeze.bias.zero_()
        self.stem_pad = (pad_x // 2, pad_x - pad_x // 2, pad_t // 2, pad_t - pad_t // 2)
        setattr(parent, attr, nn.Sequential(nn.ReflectionPad2d(self.stem_pad), conv, squeeze))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_seismic(x, f"TimmUNet({self.backbone_name})")
        feats = self.encoder(x)                 # [(B,C0,72,72), (B,C1,36,36), (B,C2,18,18), (B,C3,9,9)]
        x = self.decoder(feats)                 # (B, D, 72, 72)
        x = center_crop(self.head(x))           # (B, 1, 70, 70)
        return torch.tanh(x)


def _check_family(name: str, backbone: str, prefix: str) -> None:
    if not backbone.startswith(prefix):
        raise ValueError(f"{name}: backbone must be a {prefix}* model, got {backbone!r}")


@register_model
def convnext_unet(backbone: str = "convnext_atto", **kwargs) -> TimmUNet:
    """ConvNeXt UNet; default backbone convnext_atto (3.4M encoder parameters)."""
    _check_family("convnext_unet", backbone, "convnext")
    return TimmUNet(backbone=backbone, **kwargs)


@register_model
def caformer_unet(backbone: str = "caformer_s18", **kwargs) -> TimmUNet:
    """CAFormer UNet; default backbone caformer_s18 (23M encoder parameters); the public
    notebook used caformer_b36."""
    _check_family("caformer_unet", backbone, "caformer")
    return TimmUNet(backbone=backbone, **kwargs)
