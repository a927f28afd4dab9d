"""Heat-diffusion network: learned heat kernels exp(-t L) on the 70 x 70 grid alternated
with pointwise MLPs (DiffusionNet on a regular grid).

Sharp, Attaiki, Crane & Ovsjanikov, "DiffusionNet: Discretization Agnostic Learning on
Surfaces", ACM TOG 2022 (reference code: nmwsharp/diffusion-net): each block diffuses
every channel for its own learned time t_c, forms spatial-gradient features of the
diffused field, and mixes [x, diffused x, gradient features] with a per-point MLP, with a
residual connection. Diffusion is a smooth, resolution-independent way to share
information across space; learned times let each channel pick its own range, from a
cell to the whole map.

The heat operator here is exact and spectral: on the grid of cell centres (spacing
h = 10 m, domain [-h/2, (n - 1/2) h] per axis) the eigenfunctions of the Laplacian with
Neumann (insulating, zero-flux) boundaries, sampled at the cell centres, are the DCT-II
basis vectors cos(pi k (i + 1/2) / n), with eigenvalues (pi k / (n h))^2 per axis. So

    exp(-t L) u = D^T [exp(-t (lam_k + lam_l)) * (D u D^T)] D,    D the orthonormal DCT-II,

four 70 x 70 matrix products per channel, no time stepping, no boundary artefacts: a
Gaussian of variance s^2 becomes one of variance s^2 + 2 t (per axis; t in m^2), and
near a wall its mirror image adds in (the method of images), both tested against the
analytic solution. ``laplacian='fd'`` uses the eigenvalues of the 5-point
finite-difference Laplacian instead, 4 sin^2(pi k / (2 n)) / h^2 (second-order accurate).

Pipeline: seismic (B, 5, 1000, 70) -> :class:`~fwi_core.models.blocks.GatherToGrid`
(time convs, learned time-to-depth map) (B, C0, 70, 70) -> concat the prior's two
channels -> 1x1 conv (B, C, 70, 70) -> N x :class:`DiffusionBlock` -> 1x1 conv -> tanh:
(B, 1, 70, 70) in [-1, 1].

``forward(x, prior=None)``: ``prior`` (B, 1, 70, 70), a backbone's normalised prediction,
is an input channel (stage-wise residual training). Plain torch (no optional packages).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .blocks import VELOCITY_SHAPE, GatherToGrid, check_prior, check_seismic, prior_channels
from .registry import Capabilities, register_model

__all__ = ["dct_matrix", "neumann_eigenvalues", "heat_kernel", "grid_gradient", "HeatDiffusion",
           "SpatialGradientFeatures", "DiffusionBlock", "HeatDiffusionNet", "heat_diffusion"]

LAPLACIANS = ("spectral", "fd")


def dct_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Orthonormal DCT-II matrix D (n, n): ``D[k, i] = sqrt(2/n) c_k cos(pi k (i + 1/2) / n)``,
    c_0 = 1/sqrt(2), else 1; ``D @ D.T = I``. Rows are the Neumann Laplacian's eigenvectors."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    d = math.sqrt(2.0 / n) * torch.cos(math.pi * k * (i + 0.5) / n)
    d[0] /= math.sqrt(2.0)
    return d.to(dtype)


def neumann_eigenvalues(n: int, spacing: float, laplacian: str = "spectral",
                        dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Eigenvalues (n,) of -d^2/dx^2 with Neumann boundaries on n cells of width ``spacing``
    for the DCT-II modes k = 0..n-1: 'spectral' (pi k / (n h))^2 (the continuous operator),
    'fd' 4 sin^2(pi k / (2 n)) / h^2 (the 3-point stencil). Units 1 / spacing^2."""
    if laplacian not in LAPLACIANS:
        raise ValueError(f"laplacian must be one of {LAPLACIANS}, got {laplacian!r}")
    if spacing <= 0:
        raise ValueError(f"spacing must be > 0, got {spacing}")
    k = torch.arange(n, dtype=torch.float64)
    if laplacian == "spectral":
        lam = (math.pi * k / (n * spacing)) ** 2
    else:
        lam = 4.0 * torch.sin(math.pi * k / (2 * n)) ** 2 / spacing ** 2
    return lam.to(dtype)


def heat_kernel(u: torch.Tensor, t: torch.Tensor, spacing: float = 10.0,
                laplacian: str = "spectral") -> torch.Tensor:
    """Solve the heat equation du/dt = Laplacian(u) with Neumann boundaries for time ``t``.

    Args:
        u: (..., H, W) fields on a grid of cell centres ``spacing`` apart.
        t: diffusion times in spacing^2 units (m^2 for metres), broadcastable to u.shape[:-2].
        spacing: grid spacing.
        laplacian: 'spectral' or 'fd' (:func:`neumann_eigenvalues`).
    Returns:
        exp(-t L) u, same shape as u.
    """
    h, w = u.shape[-2:]
    dh, dw = dct_matrix(h, u.dtype).to(u.device), dct_matrix(w, u.dtype).to(u.device)
    lam = (neumann_eigenvalues(h, spacing, laplacian, u.dtype)[:, None]
           + neumann_eigenvalues(w, spacing, laplacian, u.dtype)[None, :]).to(u.device)
    return _apply_heat(u, torch.as_tensor(t, dtype=u.dtype, device=u.device), dh, dw, lam)


def _apply_heat(u: torch.Tensor, t: torch.Tensor, dh: torch.Tensor, dw: torch.Tensor,
                lam: torch.Tensor) -> torch.Tensor:
    spec = dh @ u @ dw.T                                                   # (..., H, W) DCT-II
    spec = spec * torch.exp(-t[..., None, None] * lam)                     # decay per mode
    return dh.T @ spec @ dw                                                # inverse DCT


def grid_gradient(u: torch.Tensor, spacing: float = 10.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Central-difference gradient (d/dx, d/dz) of (..., H, W) fields with zero normal
    derivative at the walls (one-sided halves there). Returns two (..., H, W) tensors."""
    pad_x = F.pad(u.flatten(0, -3).unsqueeze(1), (1, 1, 0, 0), mode="replicate").squeeze(1)
    pad_z = F.pad(u.flatten(0, -3).unsqueeze(1), (0, 0, 1, 1), mode="replicate").squeeze(1)
    gx = (pad_x[..., 2:] - pad_x[..., :-2]) / (2 * spacing)
    gz = (pad_z[..., 2:, :] - pad_z[..., :-2, :]) / (2 * spacing)
    return gx.view_as(u), gz.view_as(u)


class HeatDiffusion(nn.Module):
    """Learned heat diffusion: channel c of the input is diffused for its own time t_c.

    Args:
        channels: C.
        size: grid (H, W).
        spacing: grid spacing in metres.
        laplacian: 'spectral' or 'fd'.
        init_time: (t_min, t_max) in cells^2; initial times are log-spaced over the
            channels (diffusion lengths sqrt(2 t) from 0.45 to 14 cells by default).

    ``time`` (C,) is t in m^2 (``exp(log_time) * spacing^2``, positive by construction).
    Shapes: (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, channels: int, size: Tuple[int, int] = VELOCITY_SHAPE, spacing: float = 10.0,
                 laplacian: str = "spectral", init_time: Tuple[float, float] = (0.1, 100.0)):
        super().__init__()
        self.spacing, self.size = float(spacing), tuple(size)
        h, w = self.size
        lo, hi = init_time
        self.log_time = nn.Parameter(torch.linspace(math.log(lo), math.log(hi), channels))
        # float64 buffers (cast to the input's dtype in forward): exact in float64 tests
        self.register_buffer("dct_h", dct_matrix(h), persistent=False)
        self.register_buffer("dct_w", dct_matrix(w), persistent=False)
        lam = (neumann_eigenvalues(h, spacing, laplacian)[:, None]
               + neumann_eigenvalues(w, spacing, laplacian)[None, :])
        self.register_buffer("eigenvalues", lam, persistent=False)           # (H, W), 1/m^2

    @property
    def time(self) -> torch.Tensor:
        """Diffusion times in m^2, (C,)."""
        return self.log_time.exp() * self.spacing ** 2

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        if tuple(u.shape[-2:]) != self.size or u.shape[-3] != self.log_time.shape[0]:
            raise ValueError(f"HeatDiffusion: expected (B, {self.log_time.shape[0]}, {self.size[0]}, "
                             f"{self.size[1]}), got {tuple(u.shape)}")
        # the spectral transforms run outside autocast, in float32 at least (in float16 the
        # DCT's sums of 70 terms would lose the small modes)
        dt = torch.promote_types(u.dtype, torch.float32)
        with torch.autocast(device_type=u.device.type, enabled=False):
            out = _apply_heat(u.to(dt), self.time.to(dt), self.dct_h.to(dt), self.dct_w.to(dt),
                              self.eigenvalues.to(dt))
        return out.to(u.dtype)


class SpatialGradientFeatures(nn.Module):
    """DiffusionNet's gradient features on a grid: with g_c = grad(u_c) (a 2-vector per
    point and channel) and b_c = sum_d A_cd g_d, where A acts on 2-vectors as a learned
    rotation-scaling (real and imaginary parts, i.e. complex multiplication), the feature
    is tanh(<g_c, b_c>): invariant to rotating the gradient field, sensitive to how the
    channels' gradients align (e.g. along an interface).

    Shapes: (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, channels: int, spacing: float = 10.0):
        super().__init__()
        self.spacing = float(spacing)
        self.a_re = nn.Parameter(torch.empty(channels, channels))
        self.a_im = nn.Parameter(torch.empty(channels, channels))
        for a in (self.a_re, self.a_im):
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))                    # as nn.Linear

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        gx, gz = grid_gradient(u, self.spacing)
        g = torch.cat([gx, gz], dim=1) * self.spacing                      # (B, 2C, H, W), per cell
        a = torch.cat([torch.cat([self.a_re, -self.a_im], 1),
                       torch.cat([self.a_im, self.a_re], 1)], 0)           # (2C, 2C) complex product
        b = F.conv2d(g, a.to(g.dtype)[:, :, None, None])                  # (B, 2C, H, W): (bx, bz)
        c = u.shape[1]
        return torch.tanh(g[:, :c] * b[:, :c] + g[:, c:] * b[:, c:])       # (B, C, H, W)


class DiffusionBlock(nn.Module):
    """x + MLP([x, diffuse(x), gradient features(diffuse(x))]), the MLP per point (1x1
    convs) with ``Dropout`` (MC dropout). Shapes: (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, channels: int, mlp_hidden: int, spacing: float = 10.0,
                 laplacian: str = "spectral", gradient_features: bool = True, drop_rate: float = 0.1):
        super().__init__()
        self.diffusion = HeatDiffusion(channels, spacing=spacing, laplacian=laplacian)
        self.gradient = SpatialGradientFeatures(channels, spacing) if gradient_features else None
        n_in = (3 if gradient_features else 2) * channels
        self.mlp = nn.Sequential(nn.Conv2d(n_in, mlp_hidden, 1), nn.GELU(), nn.Dropout(drop_rate),
                                 nn.Conv2d(mlp_hidden, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xd = self.diffusion(x)                                             # (B, C, H, W)
        feats = [x, xd] + ([self.gradient(xd)] if self.gradient is not None else [])
        return x + self.mlp(torch.cat(feats, dim=1))                       # (B, C, H, W)


class HeatDiffusionNet(nn.Module):
    """Gather encoder + DiffusionNet blocks on the 70 x 70 grid, (B, 5, 1000, 70) ->
    (B, 1, 70, 70) in [-1, 1].

    Args:
        width: channels of the gather encoder's time convs.
        channels: C, channels of the diffusion blocks.
        blocks: number of :class:`DiffusionBlock`.
        mlp_hidden: hidden size of the per-point MLPs.
        laplacian: 'spectral' (exact heat kernel) or 'fd'.
        gradient_features: DiffusionNet's spatial-gradient features.
        drop_rate: ``Dropout`` in the MLPs (MC dropout).
    """


    def __init__(self, width: int = 32, channels: int = 64, blocks: int = 4, mlp_hidden: int = 96,
                 laplacian: str = "spectral", gradient_features: bool = True, drop_rate: float = 0.1):
        super().__init__()
        self.encoder = GatherToGrid(width, channels)
        self.inp = nn.Conv2d(channels + 2, channels, 1)
        self.blocks = nn.ModuleList(
            DiffusionBlock(channels, mlp_hidden, laplacian=laplacian,
                           gradient_features=gradient_features, drop_rate=drop_rate)
            for _ in range(blocks))
        self.head = nn.Conv2d(channels, 1, 1)

    def forward(self, x: torch.Tensor, prior: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, 5, 1000, 70); prior: optional (B, 1, 70, 70) backbone prediction."""
        check_seismic(x, type(self).__name__)
        check_prior(prior, x.shape[0], type(self).__name__)
        h = self.encoder(x)                                                # (B, C, 70, 70)
        h = self.inp(torch.cat([h, prior_channels(prior, h)], dim=1))      # (B, C, 70, 70)
        for block in self.blocks:
            h = block(h)                                                   # (B, C, 70, 70)
        return torch.tanh(self.head(h))                                    # (B, 1, 70, 70)


@register_model(capabilities=Capabilities(accepts_prior=True))
def heat_diffusion(**kwargs) -> HeatDiffusionNet:
    """DiffusionNet on the 70 x 70 grid: 4 blocks of 64 channels, exact spectral heat kernels."""
    return HeatDiffusionNet(**kwargs)
