"""Invertible UNet: a seismic embedding followed by an exactly invertible coupling flow.

Coupling layers: Dinh, Sohl-Dickstein & Bengio, "Density estimation using Real NVP",
ICLR 2017 (affine), Dinh et al., "NICE", 2015 (additive); the U shape with invertible
down/upsampling: Etmann et al., "iUNets: Fully invertible U-Nets with Learnable Up- and
Downsampling", 2020; velocity + auxiliary outputs of an invertible network for an inverse
problem: Ardizzone et al., "Analyzing Inverse Problems with Invertible Neural Networks",
ICLR 2019.

Two parts:

1. Embedding (NOT invertible): (B, 5, 1000, 70) -> ConvBnAct along time at stride (2, 1)
   three times -> (B, 2w, 125, 70) -> bilinear resize to (B, 2w, 70, 70) -> conv ->
   ``Dropout2d`` -> latent z (B, C, 70, 70).
2. Flow (invertible, :class:`InvertibleUNetFlow`): affine (or additive) coupling blocks
   with channel reversal at 70x70, an exact squeeze (pixel unshuffle) to (B, 4C, 35, 35),
   couplings there, an exact unsqueeze (pixel shuffle) back to 70x70 and more couplings:
   y = flow(z), (B, C, 70, 70), with ``flow.inverse(flow(z)) == z`` up to float rounding.

The velocity is ``tanh(y[:, :1])``: (B, 1, 70, 70) in [-1, 1]; the other C - 1 channels
of y are auxiliary. :meth:`InvertibleUNet.latent_penalty` (mean square of the auxiliary
channels) is a training term that makes the velocity carry the latent's information, and
:meth:`InvertibleUNet.inverse_consistency` scores a prediction by how well the velocity
alone (auxiliary channels set to 0) maps back to the latent it came from: near 0 for
predictions the velocity explains, large for saturated or out-of-distribution ones.

MC dropout: the ``Dropout2d`` sits on the latent, before the flow, so the flow stays
exactly invertible for every dropout draw.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .blocks import ConvBnAct, check_seismic
from .registry import Capabilities, register_model

__all__ = ["CouplingBlock", "InvertibleUNetFlow", "InvertibleUNet", "invertible_unet"]


class CouplingBlock(nn.Module):
    """Affine or additive coupling: split channels (x1, x2); y1 = x1;
    y2 = x2 * exp(s(x1)) + t(x1) (affine) or x2 + t(x1) (additive).

    ``s`` is soft-clamped to (-clamp, clamp) for a well-conditioned inverse; the last conv
    of the conditioner starts at zero, so the block starts as the identity.
    Shapes: (B, C, H, W) -> (B, C, H, W), C >= 2.
    """

    def __init__(self, channels: int, hidden: int, additive: bool = False, clamp: float = 2.0):
        super().__init__()
        if channels < 2:
            raise ValueError(f"CouplingBlock: needs at least 2 channels, got {channels}")
        self.c1, self.c2 = channels // 2, channels - channels // 2
        self.additive, self.clamp = additive, clamp
        out = self.c2 if additive else 2 * self.c2
        self.net = nn.Sequential(
            nn.Conv2d(self.c1, hidden, 3, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(hidden, hidden, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(hidden, out, 3, padding=1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def _scale_shift(self, x1: torch.Tensor):
        h = self.net(x1)
        if self.additive:
            return None, h
        s, t = h[:, :self.c2], h[:, self.c2:]
        return self.clamp * torch.tanh(s / self.clamp), t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x[:, :self.c1], x[:, self.c1:]
        s, t = self._scale_shift(x1)
        y2 = x2 + t if s is None else x2 * torch.exp(s) + t
        return torch.cat([x1, y2], dim=1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        y1, y2 = y[:, :self.c1], y[:, self.c1:]
        s, t = self._scale_shift(y1)
        x2 = y2 - t if s is None else (y2 - t) * torch.exp(-s)
        return torch.cat([y1, x2], dim=1)


class InvertibleUNetFlow(nn.Module):
    """Exactly invertible U: couplings at full size, squeeze x2, couplings, unsqueeze, couplings.

    Each coupling is followed by a channel reversal (its own inverse), so both halves get
    transformed. Shapes: (B, C, H, W) -> (B, C, H, W) with H, W even; the middle level
    works on (B, 4C, H/2, W/2).
    """

    def __init__(self, channels: int = 16, hidden: int = 64, blocks_per_level: int = 4,
                 additive: bool = False, clamp: float = 2.0):
        super().__init__()

        def level(c: int, h: int) -> nn.ModuleList:
            return nn.ModuleList(CouplingBlock(c, h, additive, clamp) for _ in range(blocks_per_level))

        self.down = level(channels, hidden)
        self.coarse = level(4 * channels, 2 * hidden)
        self.up = level(channels, hidden)

    @staticmethod
    def _run(blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        for block in blocks:
            x = block(x).flip(1)
        return x

    @staticmethod
    def _run_inverse(blocks: nn.ModuleList, y: torch.Tensor) -> torch.Tensor:
        for block in reversed(blocks):
            y = block.inverse(y.flip(1))
        return y

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.shape[-1] % 2 or z.shape[-2] % 2:
            raise ValueError(f"InvertibleUNetFlow: spatial size must be even, got {tuple(z.shape[-2:])}")
        z = self._run(self.down, z)                        # (B, C, H, W)
        z = F.pixel_unshuffle(z, 2)                        # (B, 4C, H/2, W/2)
        z = self._run(self.coarse, z)                      # (B, 4C, H/2, W/2)
        z = F.pixel_shuffle(z, 2)                          # (B, C, H, W)
        return self._run(self.up, z)                       # (B, C, H, W)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        y = self._run_inverse(self.up, y)
        y = F.pixel_unshuffle(y, 2)
        y = self._run_inverse(self.coarse, y)
        y = F.pixel_shuffle(y, 2)
        return self._run_inverse(self.down, y)


class InvertibleUNet(nn.Module):
    """Seismic embedding + invertible flow, (B, 5, 1000, 70) -> (B, 1, 70, 70) in [-1, 1].

    Args:
        width: channels w of the embedding CNN.
        latent_channels: channels C of the 70x70 latent (>= 2; channel 0 is the velocity).
        hidden: conditioner width of the couplings (doubled at the 35x35 level).
        blocks_per_level: couplings at each of the three levels.
        coupling: 'affine' or 'additive'.
        clamp: soft bound of the affine log-scales.
        drop_rate: ``Dropout2d`` probability on the latent (MC dropout).
    """

    def __init__(self, width: int = 32, latent_channels: int = 16, hidden: int = 64,
                 blocks_per_level: int = 4, coupling: str = "affine", clamp: float = 2.0,
                 drop_rate: float = 0.1):
        super().__init__()
        if coupling not in ("affine", "additive"):
            raise ValueError(f"InvertibleUNet: coupling must be 'affine' or 'additive', got {coupling!r}")
        w = width
        self.encoder = nn.Sequential(
            ConvBnAct(5, w, (7, 1), stride=(2, 1), padding=(3, 0)),
            ConvBnAct(w, w, (3, 1), stride=(2, 1), padding=(1, 0)),
            ConvBnAct(w, 2 * w, (3, 1), stride=(2, 1), padding=(1, 0)),
            ConvBnAct(2 * w, 2 * w, 3))
        self.embed = nn.Sequential(ConvBnAct(2 * w, 2 * w, 3),
                                   nn.Conv2d(2 * w, latent_channels, 3, padding=1))
        self.drop = nn.Dropout2d(drop_rate)
        self.flow = InvertibleUNetFlow(latent_channels, hidden, blocks_per_level,
                                       additive=coupling == "additive", clamp=clamp)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The non-invertible embedding: seismic (B, 5, 1000, 70) -> latent z (B, C, 70, 70)."""
        check_seismic(x, type(self).__name__)
        h = self.encoder(x)                                                # (B, 2w, 125, 70)
        h = F.interpolate(h, size=(70, 70), mode="bilinear", align_corners=False)  # (B, 2w, 70, 70)
        return self.drop(self.embed(h))                                    # (B, C, 70, 70)

    def forward_features(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(z, y): the latent and the flow output, both (B, C, 70, 70)."""
        z = self.encode(x)
        return z, self.flow(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, y = self.forward_features(x)                                    # (B, C, 70, 70)
        self._last_y = y if self.training else None
        return torch.tanh(y[:, :1])                                        # (B, 1, 70, 70)

    def auxiliary_losses(self, family_idx=None) -> dict:
        """Training terms of the last forward in train mode: ``{"latent":
        latent_penalty(y)}``; the engine adds it weighted by ``latent_weight``."""
        y = getattr(self, "_last_y", None)
        return {} if y is None else {"latent": self.latent_penalty(y)}

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """Exact inverse of the flow: y (B, C, 70, 70) -> z (B, C, 70, 70)."""
        return self.flow.inverse(y)

    @staticmethod
    def latent_penalty(y: torch.Tensor) -> torch.Tensor:
        """Mean square of the auxiliary channels y[:, 1:]; add ``lambda * penalty`` to the
        training loss so that the velocity channel carries the latent's content."""
        return y[:, 1:].pow(2).mean()

    def inverse_consistency(self, x: torch.Tensor, drop_aux: bool = True,
                            eps: float = 1e-6, velocity: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Per-sample score (B,): ``||flow^-1(y') - z|| / ||z||``.

        With ``drop_aux`` (default), y' = (atanh of the predicted velocity, clamped inside
        (-1, 1), and zeros for the auxiliary channels): the part of the latent that the
        prediction does not explain. It grows when tanh saturates and, for a model trained
        with :meth:`latent_penalty`, when an input leaves the training distribution: use
        it as a metric and flag predictions above a threshold set on validation data.
        With ``velocity`` (normalised (B, 1, 70, 70), e.g. the ensemble's prediction after
        the CRF) that map replaces the model's own velocity channel: the score then says
        how consistent the final map is with the latent of the input's gathers.
        With ``drop_aux=False``, y' = y: the round-trip error of the flow, about 1e-7 in
        float32 (a numerical-health check).
        """
        z, y = self.forward_features(x)
        if velocity is not None:
            if tuple(velocity.shape) != (x.shape[0], 1, *y.shape[-2:]):
                raise ValueError(f"inverse_consistency: velocity must be ({x.shape[0]}, 1, "
                                 f"{y.shape[-2]}, {y.shape[-1]}) normalised, got {tuple(velocity.shape)}")
            v = velocity.to(y.dtype).clamp(-1 + eps, 1 - eps)
            y = torch.cat([torch.atanh(v), torch.zeros_like(y[:, 1:])], dim=1)
        elif drop_aux:
            v = torch.tanh(y[:, :1]).clamp(-1 + eps, 1 - eps)
            y = torch.cat([torch.atanh(v), torch.zeros_like(y[:, 1:])], dim=1)
        err = (self.inverse(y) - z).flatten(1).norm(dim=1)
        return err / z.flatten(1).norm(dim=1).clamp_min(1e-12)


@register_model(capabilities=Capabilities(auxiliary_losses=True, inverse_consistency=True))
def invertible_unet(**kwargs) -> InvertibleUNet:
    """Invertible UNet: 16-channel 70x70 latent, 3 x 4 affine couplings."""
    return InvertibleUNet(**kwargs)
