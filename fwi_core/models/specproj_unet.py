"""SpecProj-UNet: a physics-guided spectral projector in front of a UNet.

The first stage works in the frequency-wavenumber (f-k) domain, where a plane event that
crosses the receiver line at apparent velocity ``v`` lies on the line ``k = f / v``
(the dispersion relation; f in Hz, k in cycles/m). Fan filters that pass a band of
apparent velocities separate direct waves, refractions and reflections by their moveout,
the classical f-k (velocity) filtering of seismic processing (Yilmaz, "Seismic Data
Analysis", SEG 2001, ch. 6).

Pipeline for normalised seismic (B, 5, 1000, 70), dt = 1 ms, dx = 10 m:

1. :class:`SpectralProjector` (learned, initialised from physics):
   rFFT along time -> keep the band the 15 Hz Ricker occupies (2..40 Hz, 39 bins) ->
   FFT along receivers (70 wavenumbers) -> multiply by M learned f-k masks, initialised as
   fan filters (:func:`fan_filter_masks`) for apparent-velocity bands across 1500..4500 m/s
   plus an all-pass mask -> back to (time, receiver), resampled band-limited (exactly, no
   aliasing) to 288 time samples: (B, 5*M, 288, 70).
2. Stem: BatchNorm, then ConvBnAct at stride (2,1) twice: (B, w, 72, 70), reflect-pad
   receivers to (B, w, 72, 72).
3. UNet encoder 72 -> 36 -> 18 -> 9 (w, 2w, 4w, 8w channels); at the 9x9 bottleneck a
   learned code map (the style embedding) and optional per-family embeddings are added.
4. UNet decoder (pixel shuffle + SCSE + Dropout2d) back to 72x72, a 5x5 head, crop 1 px a
   side to 70x70, add the output bias (and optional per-family depth bias) and apply
   ``tanh(gain * .)``: (B, 1, 70, 70) in [-1, 1].

``family_init`` selects a physics-guided initialisation (same architecture, so the
checkpoints are interchangeable):

- ``None``: plain init, zero output bias.
- ``'flatvel'``: output bias = a smooth velocity ramp increasing with depth
  (1800 -> 3900 m/s, the rough mean trend of the Vel/Fault families), laterally constant.
- ``'curvevel'``: the ramp, and a head kernel shaped by an isotropic Gaussian, so the
  initial output is smooth in both directions and interfaces can bend.
- ``'fault'``: the ramp, a centre-tap (no blur) head kernel and output gain 2, so tanh
  saturates towards piecewise-constant blocks with sharp steps.
- ``'style'``: a weaker ramp and a random (std 0.1) learned bottleneck code map, a style
  embedding for the textured Style maps (zero at the other inits).

``num_families > 0`` adds per-family bias terms (a bottleneck embedding and a depth
profile before tanh, both zero at init) and a family head (a linear classifier on the
pooled bottleneck). ``forward(x, family_idx)`` with a LongTensor (B,) applies the terms of
the given families (training: the true family); ``forward(x)`` applies the mixture of the
terms weighted by the head's predicted family probabilities (inference, where the family
is unknown). The training engine passes the true family index, and adds the head's
cross-entropy (``auxiliary_losses``) weighted by ``family_loss_weight``.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .blocks import ConvBnAct, UNetDecoder, center_crop, check_seismic
from .registry import Capabilities, register_model

__all__ = ["fan_filter_masks", "SpectralProjector", "SpecProjUNet", "specproj_unet",
           "DEFAULT_V_BANDS", "FAMILY_INITS"]

DEFAULT_V_BANDS: Tuple[Tuple[float, float], ...] = (
    (1500.0, 2000.0), (2000.0, 2500.0), (2500.0, 3000.0), (3000.0, 3500.0),
    (3500.0, 4000.0), (4000.0, 4500.0), (4500.0, math.inf))
FAMILY_INITS = (None, "flatvel", "curvevel", "fault", "style")


def fan_filter_masks(f_axis, k_axis, v_bands: Sequence[Tuple[float, float]] = DEFAULT_V_BANDS,
                     taper: float = 0.05) -> torch.Tensor:
    """Fan (apparent-velocity) filters on an f-k grid.

    A cell (f, k) holds events of apparent velocity ``v = |f| / |k|`` (infinite at k = 0).
    Band ``(v_lo, v_hi)`` passes ``v_lo <= v < v_hi`` with logistic edges of width
    ``taper`` in ln(v); ``v_hi = inf`` keeps everything faster than ``v_lo``.

    Args:
        f_axis: frequencies in Hz, shape (F,).
        k_axis: wavenumbers in cycles/m, shape (K,), any order (e.g. fft-shifted).
        v_bands: apparent-velocity bands in m/s.
        taper: edge width in natural-log velocity units (0.05 ~ 5 %).

    Returns:
        float32 tensor (len(v_bands), F, K) with values in [0, 1].
    """
    f = torch.as_tensor(f_axis, dtype=torch.float64).abs()[:, None]
    k = torch.as_tensor(k_axis, dtype=torch.float64).abs()[None, :]
    tiny = 1e-30
    log_v = torch.where(k > 0, torch.log(f.clamp_min(tiny)) - torch.log(k.clamp_min(tiny)),
                        torch.full_like(f * k, math.inf))
    masks = []
    for v_lo, v_hi in v_bands:
        if not 0 < v_lo < v_hi:
            raise ValueError(f"fan_filter_masks: bad velocity band ({v_lo}, {v_hi})")
        m = torch.sigmoid((log_v - math.log(v_lo)) / taper)
        if math.isfinite(v_hi):
            m = m * torch.sigmoid((math.log(v_hi) - log_v) / taper)
        masks.append(m)
    return torch.stack(masks).float()


class SpectralProjector(nn.Module):
    """Band-limited f-k projection of shot gathers onto M (learned) masks.

    Args:
        n_time, n_recv: input samples along time and receivers.
        dt, dx: sampling in s and m.
        f_band: kept frequency band in Hz (inclusive).
        v_bands: fan-filter velocity bands (m/s) for the initial masks.
        allpass: prepend an all-ones mask (the band-limited gather itself).
        learn_masks: masks are parameters (else fixed buffers).
        n_time_out: time samples of the output (band-limited resampling; the band must
            lie below its Nyquist frequency ``n_time_out / (2 * n_time * dt)``).
        taper: fan-filter edge width (see :func:`fan_filter_masks`).

    Shapes: (B, S, n_time, n_recv) -> (B, S * M, n_time_out, n_recv), M = number of masks,
    channel index ``s * M + m``. Masks are (M, F, K) over the kept frequencies and the
    fft-shifted wavenumbers (buffers ``f_axis``, ``k_axis``).
    """

    def __init__(self, n_time: int = 1000, n_recv: int = 70, dt: float = 1e-3, dx: float = 10.0,
                 f_band: Tuple[float, float] = (2.0, 40.0),
                 v_bands: Sequence[Tuple[float, float]] = DEFAULT_V_BANDS, allpass: bool = True,
                 learn_masks: bool = True, n_time_out: int = 288, taper: float = 0.05):
        super().__init__()
        freqs = torch.fft.rfftfreq(n_time, d=dt).double()
        keep = torch.nonzero((freqs >= f_band[0]) & (freqs <= f_band[1])).flatten()
        if keep.numel() == 0:
            raise ValueError(f"SpectralProjector: no frequency bin in band {f_band} Hz")
        self.i0, self.i1 = int(keep[0]), int(keep[-1])
        if self.i1 >= n_time_out // 2 + 1:
            raise ValueError(f"SpectralProjector: band up to {f_band[1]} Hz does not fit "
                             f"n_time_out={n_time_out} samples (Nyquist bin {n_time_out // 2})")
        self.n_time, self.n_recv, self.n_time_out = n_time, n_recv, n_time_out
        f_axis = freqs[self.i0:self.i1 + 1]
        k_axis = torch.fft.fftshift(torch.fft.fftfreq(n_recv, d=dx).double())
        masks = fan_filter_masks(f_axis, k_axis, v_bands, taper)
        if allpass:
            masks = torch.cat([torch.ones_like(masks[:1]), masks])
        self.register_buffer("f_axis", f_axis.float(), persistent=False)
        self.register_buffer("k_axis", k_axis.float(), persistent=False)
        if learn_masks:
            self.masks = nn.Parameter(masks)
        else:
            self.register_buffer("masks", masks)

    @property
    def n_masks(self) -> int:
        return self.masks.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, t, r = x.shape
        if (t, r) != (self.n_time, self.n_recv):
            raise ValueError(f"SpectralProjector: expected (B, S, {self.n_time}, {self.n_recv}), "
                             f"got {tuple(x.shape)}")
        spec = torch.fft.rfft(x.float(), dim=2, norm="forward")[:, :, self.i0:self.i1 + 1]  # (B,S,F,R)
        fk = torch.fft.fftshift(torch.fft.fft(spec, dim=3), dim=3)                         # (B,S,F,K)
        fk = fk.unsqueeze(2) * self.masks.to(fk.real.dtype)                                # (B,S,M,F,K)
        fx = torch.fft.ifft(torch.fft.ifftshift(fk, dim=4), dim=4)                         # (B,S,M,F,R)
        n_bins = self.n_time_out // 2 + 1
        fx = torch.cat([fx.new_zeros(*fx.shape[:3], self.i0, r), fx,
                        fx.new_zeros(*fx.shape[:3], n_bins - self.i1 - 1, r)], dim=3)     # (B,S,M,n_bins,R)
        out = torch.fft.irfft(fx, n=self.n_time_out, dim=3, norm="forward")               # (B,S,M,T',R)
        return out.flatten(1, 2).to(x.dtype)                                               # (B,S*M,T',R)


def _depth_ramp(n: int = 70, v_top: float = 1800.0, v_bottom: float = 3900.0) -> torch.Tensor:
    """A linear velocity ramp over depth in normalised units, shape (1, 1, n, 1)."""
    v = torch.linspace(v_top, v_bottom, n)
    return ((v - 1500.0) / 3000.0 * 2.0 - 1.0).view(1, 1, n, 1)


class SpecProjUNet(nn.Module):
    """Spectral projector + UNet, (B, 5, 1000, 70) -> (B, 1, 70, 70) in [-1, 1].

    Args:
        width: base channels w of the UNet (stages w, 2w, 4w, 8w).
        f_band, v_bands, allpass, learn_masks, taper: passed to :class:`SpectralProjector`.
        drop_rate: ``Dropout2d`` probability in the decoder blocks.
        family_init: None, 'flatvel', 'curvevel', 'fault' or 'style' (module docstring).
        num_families: number of families with their own bias terms (0: none).
    """

    def __init__(self, width: int = 32, f_band: Tuple[float, float] = (2.0, 40.0),
                 v_bands: Sequence[Tuple[float, float]] = DEFAULT_V_BANDS, allpass: bool = True,
                 learn_masks: bool = True, taper: float = 0.05, drop_rate: float = 0.1,
                 family_init: Optional[str] = None, num_families: int = 0):
        super().__init__()
        if family_init not in FAMILY_INITS:
            raise ValueError(f"SpecProjUNet: family_init must be one of {FAMILY_INITS}, got {family_init!r}")
        if num_families < 0:
            raise ValueError(f"SpecProjUNet: num_families must be >= 0, got {num_families}")
        w = width
        self.family_init, self.num_families = family_init, num_families
        self.projector = SpectralProjector(f_band=f_band, v_bands=v_bands, allpass=allpass,
                                           learn_masks=learn_masks, n_time_out=288, taper=taper)
        c_in = 5 * self.projector.n_masks
        self.stem = nn.Sequential(
            nn.BatchNorm2d(c_in),
            ConvBnAct(c_in, w, 3),
            ConvBnAct(w, w, 3, stride=(2, 1)),
            ConvBnAct(w, w, 3, stride=(2, 1)))
        chs = [w, 2 * w, 4 * w, 8 * w]
        self.encoder = nn.ModuleList([nn.Sequential(ConvBnAct(w, w, 3))] + [
            nn.Sequential(ConvBnAct(chs[i - 1], chs[i], 3, stride=2), ConvBnAct(chs[i], chs[i], 3))
            for i in range(1, 4)])
        self.style_code = nn.Parameter(torch.zeros(1, chs[-1], 9, 9))
        self.decoder = UNetDecoder(chs, chs[-2::-1], attention=True, drop_rate=drop_rate)
        self.head = nn.Conv2d(w, 1, 5, padding=2)
        self.out_bias = nn.Parameter(torch.zeros(1, 1, 70, 70))
        self.out_gain = nn.Parameter(torch.ones(()))
        if num_families:
            self.family_embed = nn.Embedding(num_families, chs[-1])
            self.family_depth_bias = nn.Parameter(torch.zeros(num_families, 70))
            nn.init.zeros_(self.family_embed.weight)
            self.family_head = nn.Linear(chs[-1], num_families)
        self.last_family_logits: Optional[torch.Tensor] = None
        self._init_family(family_init)

    @torch.no_grad()
    def _init_family(self, family_init: Optional[str]) -> None:
        if family_init is None:
            return
        gain = 2.0 if family_init == "fault" else 1.0
        ramp = _depth_ramp() * (0.5 if family_init == "style" else 1.0)
        self.out_gain.fill_(gain)
        self.out_bias.copy_((torch.atanh(ramp) / gain).expand(1, 1, 70, 70))
        channel_w = torch.empty(1, self.head.in_channels, 1, 1).uniform_(-1, 1) / math.sqrt(self.head.in_channels)
        if family_init == "curvevel":
            u = torch.arange(5, dtype=torch.float32) - 2.0
            g = torch.exp(-(u[:, None] ** 2 + u[None, :] ** 2) / (2 * 1.2 ** 2))
            self.head.weight.copy_(channel_w * g / g.sum())
        elif family_init == "fault":
            self.head.weight.zero_()
            self.head.weight[:, :, 2, 2] = channel_w[:, :, 0, 0]
        elif family_init == "style":
            self.style_code.normal_(0.0, 0.1)

    def forward(self, x: torch.Tensor, family_idx: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, 5, 1000, 70); family_idx: optional LongTensor (B,) in [0, num_families)."""
        check_seismic(x, type(self).__name__)
        if family_idx is not None:
            self._check_family_idx(family_idx, x.shape[0])
        x = self.projector(x)                         # (B, 5*M, 288, 70)
        x = self.stem(x)                              # (B, w, 72, 70)
        x = F.pad(x, (1, 1, 0, 0), mode="reflect")    # (B, w, 72, 72)
        feats = []
        for stage in self.encoder:
            x = stage(x)                              # (B, w, 72, 72) ... (B, 8w, 9, 9)
            feats.append(x)
        bottleneck = feats[-1] + self.style_code      # (B, 8w, 9, 9)
        weights = None
        if self.num_families:
            logits = self.family_head(bottleneck.mean((2, 3)))        # (B, num_families)
            self.last_family_logits = logits
            weights = (F.one_hot(family_idx, self.num_families).to(logits.dtype)
                       if family_idx is not None else torch.softmax(logits, dim=1))
            bottleneck = bottleneck + (weights @ self.family_embed.weight.to(logits.dtype))[:, :, None, None]
        feats[-1] = bottleneck
        x = self.decoder(feats)                       # (B, w, 72, 72)
        x = center_crop(self.head(x))                 # (B, 1, 70, 70)
        x = x + self.out_bias
        if weights is not None:
            x = x + (weights @ self.family_depth_bias.to(weights.dtype))[:, None, :, None]
        return torch.tanh(self.out_gain * x)          # (B, 1, 70, 70)

    def auxiliary_losses(self, family_idx: Optional[torch.Tensor] = None) -> dict:
        """Training terms of the last forward: ``{"family": cross-entropy of the family
        head against family_idx}`` (empty without families or targets)."""
        if not self.num_families or family_idx is None or self.last_family_logits is None:
            return {}
        return {"family": F.cross_entropy(self.last_family_logits.float(), family_idx)}

    def _check_family_idx(self, family_idx: torch.Tensor, batch: int) -> None:
        if not self.num_families:
            raise ValueError("SpecProjUNet: family_idx given but the model has num_families=0")
        if (not torch.is_tensor(family_idx) or family_idx.dtype != torch.long
                or tuple(family_idx.shape) != (batch,)):
            raise ValueError(f"SpecProjUNet: family_idx must be a LongTensor of shape ({batch},), "
                             f"got {getattr(family_idx, 'dtype', type(family_idx))} "
                             f"{tuple(getattr(family_idx, 'shape', ()))}")
        if batch and (int(family_idx.min()) < 0 or int(family_idx.max()) >= self.num_families):
            raise ValueError(f"SpecProjUNet: family_idx values must lie in [0, {self.num_families})")


@register_model(capabilities=Capabilities(family_terms=True, auxiliary_losses=True))
def specproj_unet(**kwargs) -> SpecProjUNet:
    """Spectral projector (8 f-k masks) + UNet, base width 32."""
    return SpecProjUNet(**kwargs)
