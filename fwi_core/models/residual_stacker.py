"""Residual stacker: a second-stage model that corrects a first prediction from the
data residual (stacking on residuals).

Idea (FACTS section 7, a public 15th-place solution: 27.9 -> ~13 MAE): simulate the
first-stage prediction ``y1`` with the exact forward model, and give a second network
the observed gathers ``x``, the residual ``x - F(y1)`` and ``y1``; it predicts a bounded
correction that is added to ``y1``. The residual shows where and when the simulated
wavefield of ``y1`` disagrees with the data, which is the information a single forward
pass of the first network cannot use.

Inputs (all normalised, OpenFWI conventions):

- ``x`` (B, 5, 1000, 70): observed seismic, ``normalize_seismic(observed)``;
- ``prior`` (B, 1, 70, 70): the first-stage prediction, normalised velocity in [-1, 1];
- ``residual`` (B, 5, 1000, 70): ``normalize_seismic(observed) -
  normalize_seismic(simulate(prior in m/s))`` (:func:`compute_residual`).

Output (B, 1, 70, 70) in [-1, 1]: ``prior + correction``. The correction is
``tanh(h)`` scaled per pixel by ``min(max_correction, 1 - prior)`` upwards and
``min(max_correction, 1 + prior)`` downwards, so it is at most ``max_correction``
(0.5 = 750 m/s by default) and the output never leaves [-1, 1] while staying
differentiable (no clamp that would stop gradients).

Called with ``x`` only (as the registry's generic tests and plain training do), it uses
``prior = 0`` (3000 m/s, the middle of the range) and ``residual = x`` (as if the
simulated prior were zero seismic in normalised units): it is then an ordinary
single-stage network whose output is a bounded map around 3000 m/s.

Architecture: the gathers and the residual are stacked (10 channels) and encoded with
time-strided (k,1) convolutions (1000 -> 63 time samples, receivers kept), mixed with
3x3 convolutions, resized to the 70 x 70 grid (time ~ depth), joined with a
receiver-averaged context and the prior, and decoded by 3x3 convolutions with
``Dropout2d`` (MC dropout) to one channel ``h``. The last layer starts small
(``init_scale``) so an untrained stacker starts close to the prior.

Registered with the capabilities ``accepts_prior``, ``accepts_residual`` and ``adds_prior``:
they tell a training or inference wrapper to pass ``prior=`` and ``residual=``.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.normalize import denormalize_velocity, normalize_seismic
from ..physics.forward import simulate
from .blocks import VELOCITY_SHAPE, ConvBnAct, check_prior, check_seismic
from .registry import Capabilities, register_model

__all__ = ["ResidualStacker", "residual_stacker", "compute_residual"]


class ResidualStacker(nn.Module):
    """Second-stage corrector; see the module docstring.

    Args:
        width: base channel count (the encoder uses ``width`` and ``2 * width``).
        max_correction: largest correction in normalised units (0.5 = 750 m/s).
        drop_rate: ``Dropout2d`` probability in the decoder (MC dropout).
        init_scale: the last convolution's initial weights are scaled by this (small:
            the untrained model stays close to the prior).

    Shapes: ``forward(x (B,5,1000,70), prior (B,1,70,70) or None, residual (B,5,1000,70)
    or None) -> (B,1,70,70)`` in [-1, 1].
    """


    def __init__(self, width: int = 32, max_correction: float = 0.5, drop_rate: float = 0.1,
                 init_scale: float = 0.1):
        super().__init__()
        if not 0.0 < max_correction <= 2.0:
            raise ValueError(f"residual_stacker: max_correction must be in (0, 2], got {max_correction}")
        w, w2 = int(width), 2 * int(width)
        self.max_correction = float(max_correction)
        self.encoder = nn.Sequential(
            ConvBnAct(10, w, (7, 1), stride=(2, 1), act="leaky_relu"),      # (B, w, 500, 70)
            ConvBnAct(w, w, (3, 1), stride=(2, 1), act="leaky_relu"),       # (B, w, 250, 70)
            ConvBnAct(w, w2, (3, 1), stride=(2, 1), act="leaky_relu"),      # (B, 2w, 125, 70)
            ConvBnAct(w2, w2, (3, 1), stride=(2, 1), act="leaky_relu"),     # (B, 2w, 63, 70)
            ConvBnAct(w2, w2, 3, act="leaky_relu"),                         # (B, 2w, 63, 70)
        )
        self.decoder = nn.Sequential(
            ConvBnAct(2 * w2 + 1, w2, 3, act="leaky_relu"),                 # (B, 2w, 70, 70)
            nn.Dropout2d(drop_rate),
            ConvBnAct(w2, w, 3, act="leaky_relu"),                          # (B, w, 70, 70)
            nn.Dropout2d(drop_rate),
        )
        self.head = nn.Conv2d(w, 1, 3, padding=1)                           # (B, 1, 70, 70)
        with torch.no_grad():
            self.head.weight.mul_(init_scale)
            self.head.bias.zero_()

    def forward(self, x: torch.Tensor, prior: Optional[torch.Tensor] = None,
                residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        name = type(self).__name__
        check_seismic(x, name)
        b = x.shape[0]
        check_prior(prior, b, name)
        if prior is None:
            prior = x.new_zeros(b, 1, *VELOCITY_SHAPE)
        if residual is None:
            residual = x
        elif residual.shape != x.shape:
            raise ValueError(f"{name}: residual must have the seismic's shape {tuple(x.shape)} "
                             f"(B, 5, 1000, 70), got {tuple(residual.shape)}")
        prior = prior.to(x).clamp(-1.0, 1.0)
        h = self.encoder(torch.cat([x, residual.to(x)], 1))                  # (B, 2w, 63, 70)
        h = F.interpolate(h, size=VELOCITY_SHAPE, mode="bilinear", align_corners=False)  # (B, 2w, 70, 70)
        context = h.mean(-1, keepdim=True).expand_as(h)                      # (B, 2w, 70, 70)
        h = self.decoder(torch.cat([h, context, prior], 1))                  # (B, w, 70, 70)
        t = torch.tanh(self.head(h))                                         # (B, 1, 70, 70)
        return bounded_correction(prior, t, self.max_correction)             # (B, 1, 70, 70)


def bounded_correction(prior: torch.Tensor, t: torch.Tensor, max_correction: float) -> torch.Tensor:
    """``prior + correction`` with ``t`` in [-1, 1] scaled so the result stays in [-1, 1]
    (normalised velocity) and moves at most ``max_correction`` from the prior."""
    up = (1.0 - prior).clamp(0.0, max_correction)
    down = (1.0 + prior).clamp(0.0, max_correction)
    return prior + torch.where(t >= 0, t * up, t * down)


def compute_residual(x_norm: torch.Tensor, prior_norm: torch.Tensor,
                     simulator: Optional[Callable] = None, **simulate_kwargs) -> torch.Tensor:
    """The stacker's ``residual`` input: ``x_norm - normalize_seismic(simulate(prior))``.

    Args:
        x_norm: (B, S, nt, R) normalised observed seismic.
        prior_norm: (B, 1, 70, 70) normalised first prediction (clamped to [-1, 1] before
            simulating).
        simulator: ``f(velocity m/s, **kw) -> seismic``; default
            :func:`fwi_core.physics.simulate` with ``nt = x_norm.shape[-2]``.

    Returns:
        (B, S, nt, R) on ``x_norm``'s device and dtype.
    """
    simulator = simulator or simulate
    simulate_kwargs.setdefault("nt", x_norm.shape[-2])
    with torch.no_grad():
        v = denormalize_velocity(prior_norm.detach().float().clamp(-1.0, 1.0))
        sim = torch.as_tensor(simulator(v, **simulate_kwargs)).to(x_norm)
    if sim.shape != x_norm.shape:
        raise ValueError(f"compute_residual: simulated {tuple(sim.shape)} vs observed {tuple(x_norm.shape)}")
    return x_norm - normalize_seismic(sim)


@register_model(capabilities=Capabilities(accepts_prior=True, accepts_residual=True, adds_prior=True))
def residual_stacker(**kwargs) -> ResidualStacker:
    """Second-stage residual corrector (``forward(x, prior=None, residual=None)``)."""
    return ResidualStacker(**kwargs)
