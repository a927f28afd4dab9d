"""Priors and parametrisations of test-time refinement (:mod:`.refine`), one per family kind.

- ``"flat"`` (FlatVel): the map is a 1-D depth profile (70 unknowns instead of 4,900),
  regularised by the smoothed total variation along depth ``sum sqrt(d^2 + eps^2)``
  (:func:`profile_tv`);
- ``"tv"`` (CurveVel, FlatFault, CurveFault): the full map with the smoothed 2-D total
  variation ``sum sqrt(dx^2 + dz^2 + eps^2)`` (:func:`map_tv`; sharp interfaces stay sharp);
- ``"smooth"`` (Style): the full map updated by a Gaussian-blurred field ``w``
  (:func:`gauss_blur`) with the prior ``|w|^2`` (:func:`smooth_prior`): a Gaussian-process
  (squared-exponential covariance) prior on the update.

:class:`Parametrisation` maps each sample's parameters to its velocity map, with updates
preconditioned by depth, and evaluates its prior. A flat sample can also be parametrised
as a few layers (:func:`segment_profile`, :func:`layered_profile`): the depths of its
interfaces and its layers' velocities, a handful of unknowns in which thin high-contrast
layers stay sharp (a free profile with TV smears them and converges slowly). Which kind a sample gets is
decided in :mod:`.kind_routing`.
"""
from __future__ import annotations

import math
from typing import Dict, List, Tuple

import torch

KINDS = ("flat", "tv", "smooth")
#: default regulariser weights per kind (on the misfit scaled by ``cost_scale``; velocities
#: in km/s in the regularisers). From network-quality starts (tools.bench_refine: held-out
#: maps with structured errors at the public CAFormer's MAE per family, 160 L-BFGS
#: iterations, no depth preconditioning for the 2-D kinds): the former 0.1 / 0.3 / 0.3 made
#: the mean MAE 24.2 -> 58 m/s (near the truth the misfit term is small and the TV term
#: outweighs it, paying to flatten true contrasts); 1e-3 for flat profiles; for the ``tv``
#: kind 0.01 (CurveVel_A, FlatFault_A, CurveFault_A 5.27 -> 3.84 m/s on average, 0.003
#: 3.82, 0.03 5.06, 0.1 8.94; their B variants 44.7 -> 37.9, 0.003 39.5, 0.001 40.1);
#: 0.03 for ``smooth`` (Style_A/B 41.6 -> 28.7, 0.003 28.6)
DEFAULT_REG_WEIGHT: Dict[str, float] = {"flat": 1e-3, "tv": 0.01, "smooth": 0.03}
#: default depth-preconditioning exponent per kind (``D(z) = ((z+1)/H)^(p/2)``). Flat
#: profiles get 1: with 2 their deepest rows, which the data constrain least, overshoot to
#: the clamp in the first iterations (FlatVel_A at the host's geometry, 10 iterations: MAE
#: 49.5 -> 117 with 2, -> 41.7 with 1; the same at 30). The 2-D kinds get none (0): from
#: network-quality starts, 160 iterations, the preconditioner let the deep cells wander
#: while the misfit fell (CurveVel_A, FlatFault_A, CurveFault_A 5.27 -> 13.4 m/s with 2,
#: -> 5.1 with 0 at the same weight 0.03; Style_A/B 41.6 -> 37.4 with 2, -> 28.7 with 0)
DEFAULT_DEPTH_POWER: Dict[str, float] = {"flat": 1.0, "tv": 0.0, "smooth": 0.0}
#: default smoothed-TV epsilon per kind (km/s). ``sqrt(d^2 + eps^2) - eps`` is convex, so it
#: prefers a jump split into a staircase of smaller steps (by about ``eps`` per extra step),
#: which the band-limited data barely see: for 1-D profiles eps is 0.1 m/s (the public
#: record's choice), which leaves interfaces sharp; the 2-D TV keeps 10 m/s, better on
#: curved and faulted maps (BENCHMARKS.md, section "refine")
DEFAULT_TV_EPS: Dict[str, float] = {"flat": 1e-4, "tv": 1e-2}


def gauss_blur(w: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian filter of (N,H,W) with replicate padding, scaled so that white
    noise of unit variance becomes a smooth field of unit variance (a draw from a
    Gaussian process with squared-exponential covariance of length ``sigma * sqrt(2)``)."""
    r = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-r, r + 1, dtype=w.dtype, device=w.device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.square().sum().sqrt()
    y = torch.nn.functional.pad(w[:, None], (r, r, r, r), mode="replicate")
    y = torch.nn.functional.conv2d(y, k.view(1, 1, 1, -1))
    y = torch.nn.functional.conv2d(y, k.view(1, 1, -1, 1))
    return y[:, 0]


def profile_tv(m: torch.Tensor, eps: float) -> torch.Tensor:
    """Smoothed TV along depth of laterally flat maps (N,H,W) in km/s (column 0): (N,)."""
    d = m[:, 1:, 0] - m[:, :-1, 0]
    return (torch.sqrt(d ** 2 + eps ** 2) - eps).sum(1)


def map_tv(m: torch.Tensor, eps: float) -> torch.Tensor:
    """Smoothed 2-D TV of maps (N,H,W) in km/s, per map column: (N,)."""
    dz = m[:, 1:, :-1] - m[:, :-1, :-1]
    dx = m[:, :-1, 1:] - m[:, :-1, :-1]
    return (torch.sqrt(dz ** 2 + dx ** 2 + eps ** 2) - eps).sum((1, 2)) / m.shape[2]


def smooth_prior(w: torch.Tensor) -> torch.Tensor:
    """The Gaussian-process prior ``|w|^2`` on the white fields (N,H,W) of the smooth kind,
    per map column: (N,)."""
    return (w ** 2).sum((1, 2)) / w.shape[2]


def segment_profile(profile: torch.Tensor, split_ms: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """The best piecewise-constant fit of a depth profile (N,) m/s (dynamic programming):
    least squares plus ``split_ms^2`` per layer, i.e. a layer is split off where it lowers
    the squared error by more than one cell ``split_ms`` m/s off would. Returns the
    interface depths (K,) in cells (layer k+1 starts at row ``z_k``) and the K+1 layer
    velocities, float64."""
    p = profile.detach().double().cpu()
    n = p.shape[0]
    c = torch.cat([torch.zeros(1, dtype=torch.float64), p.cumsum(0)])
    c2 = torch.cat([torch.zeros(1, dtype=torch.float64), (p * p).cumsum(0)])
    best = [0.0] + [math.inf] * n
    arg = [0] * (n + 1)
    penalty = float(split_ms) ** 2
    for j in range(1, n + 1):
        i = torch.arange(j, dtype=torch.long)
        s = c[j] - c[i]
        cost = torch.tensor(best[:j], dtype=torch.float64) + (c2[j] - c2[i]) - s * s / (j - i) + penalty
        k = int(torch.argmin(cost))
        best[j], arg[j] = float(cost[k]), k
    cuts, j = [], n
    while j > 0:
        cuts.append(j)
        j = arg[j]
    bounds = [0] + sorted(cuts)
    values = torch.stack([p[bounds[k]:bounds[k + 1]].mean() for k in range(len(bounds) - 1)])
    return torch.tensor(bounds[1:-1], dtype=torch.float64), values


def layered_profile(z: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    """The depth profile (n,) of layers with interfaces at depths ``z`` (K,) cells and
    velocities ``values`` (K+1,): cell i (rows i..i+1) takes each layer's share of its
    height (an interface inside a cell mixes the two layers), so the profile is
    differentiable in the interface depths."""
    i = torch.arange(n, dtype=values.dtype, device=values.device)
    out = values[0] + torch.zeros(n, dtype=values.dtype, device=values.device)
    for k in range(z.shape[0]):
        out = out + (values[k + 1] - values[k]) * (i + 1.0 - z[k]).clamp(0.0, 1.0)
    return out


class Parametrisation:
    """Per-sample parametrisation of a batch of mixed kinds: ``v_i = base_i + step_ms * D(z) * U(x_i)``.

    Each sample has its own parameter vector ``x_i`` (float64, 1-D, in units of ``step_ms``
    m/s), so that an optimiser can move every sample on its own (:mod:`.batch_optim`):
    ``flat`` samples have one value per row (``U`` repeats it along the row), ``tv`` samples
    one per cell, ``smooth`` samples a white field that ``U`` blurs (:func:`gauss_blur`).
    ``D(z) = ((z+1)/H)^(p_i/2)`` (maximum 1) scales updates with depth, ``p_i`` the
    sample's ``depth_power`` (one per sample).
    """

    def __init__(self, base: torch.Tensor, kinds: List[str], depth_power: List[float], step_ms: float,
                 smooth_sigma: float, layer_split_ms: float = 150.0):
        self.kinds = list(kinds)
        self.split_ms = float(layer_split_ms)
        self.layers: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}  # sample -> (interfaces, velocities)
        self.b, self.h, self.w = base.shape
        z = torch.arange(self.h, dtype=torch.float64, device=base.device)
        self.depths = [(((z + 1.0) / self.h) ** (float(p) / 2.0))[:, None] for p in depth_power]  # (H,1) each, max 1
        self.step_ms = step_ms
        self.sigma = smooth_sigma
        self.base = base.detach().clone()
        for i in range(self.b):
            self.rebase(i, self.base[i])

    def rebase(self, i: int, v: torch.Tensor, layers: bool = False) -> None:
        """Sample ``i``'s parameters start (at zero) from the map ``v`` (H,W); a flat
        sample's base is the depth profile of ``v`` (its row means), and with ``layers``
        its parameters are the interface depths and layer velocities of that profile's
        piecewise-constant fit (:func:`segment_profile`)."""
        v = v.detach().to(self.base)
        self.layers.pop(i, None)
        if self.kinds[i] != "flat":
            self.base[i] = v
            return
        profile = v.mean(dim=1)
        if layers:
            z, vals = segment_profile(profile, self.split_ms)
            self.layers[i] = (z.to(self.base.device), vals.to(self.base.device))
            profile = layered_profile(*self.layers[i], self.h)
        self.base[i] = profile[:, None].expand(-1, self.w)

    def size(self, i: int) -> int:
        """Number of parameters of sample ``i``."""
        if i in self.layers:
            return 2 * self.layers[i][0].shape[0] + 1
        return self.h if self.kinds[i] == "flat" else self.h * self.w

    def zeros(self, i: int) -> torch.Tensor:
        return torch.zeros(self.size(i), dtype=torch.float64, device=self.base.device)

    def velocity(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """The (H,W) float64 map of sample ``i`` at parameters ``x`` (a layered sample's:
        interface depths in cells, then layer velocities in units of ``step_ms``)."""
        if i in self.layers:
            z, vals = self.layers[i]
            k = z.shape[0]
            return layered_profile(z + x[:k], vals + self.step_ms * x[k:], self.h)[:, None].expand(-1, self.w)
        kind, depth = self.kinds[i], self.depths[i]
        if kind == "flat":
            upd = (depth * x[:, None]).expand(-1, self.w)
        elif kind == "smooth":
            upd = depth * gauss_blur(x.view(1, self.h, self.w), self.sigma)[0]
        else:
            upd = depth * x.view(self.h, self.w)
        return self.base[i] + self.step_ms * upd

    def regulariser(self, i: int, x: torch.Tensor, v: torch.Tensor, eps: Dict[str, float]) -> torch.Tensor:
        """Sample ``i``'s prior (a 0-dim float64 tensor): velocities in km/s, sums per map
        column; ``eps``: the TV smoothing per kind. A layered sample has none: its few
        layers are the prior."""
        if i in self.layers:
            return torch.zeros((), dtype=torch.float64, device=v.device)
        kind = self.kinds[i]
        if kind == "flat":
            return profile_tv(v[None] / 1000.0, eps["flat"])[0]
        if kind == "tv":
            return map_tv(v[None] / 1000.0, eps["tv"])[0]
        return smooth_prior(x.view(1, self.h, self.w))[0]
