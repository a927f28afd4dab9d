"""Priors and parametrisations of test-time refinement (:mod:`.refine`), one per family kind.

- ``"flat"`` (FlatVel): the map is a 1-D depth profile (70 unknowns instead of 4,900),
  regularised by the smoothed total variation along depth ``sum sqrt(d^2 + eps^2)``
  (:func:`profile_tv`);
- ``"tv"`` (CurveVel, FlatFault, CurveFault): the full map with the smoothed 2-D total
  variation ``sum sqrt(dx^2 + dz^2 + eps^2)`` (:func:`map_tv`; sharp interfaces stay sharp);
- ``"smooth"`` (Style): the full map updated by a Gaussian-blurred field ``w``
  (:func:`gauss_blur`) with the prior ``|w|^2`` (:func:`smooth_prior`): a Gaussian-process
  (squared-exponential covariance) prior on the update.

:class:`Parametrisation` maps a batch of mixed kinds to velocities, with updates
preconditioned by depth, and evaluates each sample's prior. Which kind a sample gets is
decided in :mod:`.kind_routing`.
"""
from __future__ import annotations

import math
from typing import Dict, List, Union

import torch

KINDS = ("flat", "tv", "smooth")
#: default regulariser weights per kind (on the misfit scaled by ``cost_scale``; velocities
#: in km/s in the regularisers)
DEFAULT_REG_WEIGHT: Dict[str, float] = {"flat": 0.1, "tv": 0.3, "smooth": 0.3}
#: default smoothed-TV epsilon per kind (km/s). ``sqrt(d^2 + eps^2) - eps`` is convex, so it
#: prefers a jump split into a staircase of smaller steps (by about ``eps`` per extra step),
#: which the band-limited data barely see: for 1-D profiles eps is 0.1 m/s (the public
#: record's choice), which leaves interfaces sharp; the 2-D TV keeps 10 m/s, better on
#: curved and faulted maps (BENCHMARKS.md, section "refine")
DEFAULT_TV_EPS: Dict[str, float] = {"flat": 1e-4, "tv": 1e-2}


def per_kind(name: str, value: Union[float, Dict[str, float], None], defaults: Dict[str, float]) -> Dict[str, float]:
    """A per-kind setting: ``defaults`` updated by a dict, or one float for every kind."""
    if isinstance(value, dict):
        unknown = set(value) - set(defaults)
        if unknown:
            raise ValueError(f"refine: {name} has unknown kinds {sorted(unknown)}; expected {sorted(defaults)}")
        return {**defaults, **{k: float(x) for k, x in value.items()}}
    if value is not None:
        return {k: float(value) for k in defaults}
    return dict(defaults)


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


class Parametrisation:
    """Per-kind parametrisation of a batch: v = base + scale * D(z) * update.

    ``flat`` samples are parametrised by one value per row, ``tv`` samples by every cell,
    ``smooth`` samples by a white field blurred by :func:`gauss_blur`. The parameters are
    float64 leaves (one tensor per kind present), in units of ``step_ms`` m/s, scaled with
    depth by ``D(z) = ((z+1)/H)^(depth_power/2)`` (normalised to a maximum of 1).
    """

    def __init__(self, base: torch.Tensor, kinds: List[str], depth_power: float, step_ms: float,
                 smooth_sigma: float):
        self.kinds = kinds
        self.b, self.h, self.w = base.shape
        z = torch.arange(self.h, dtype=torch.float64, device=base.device)
        self.depth = (((z + 1.0) / self.h) ** (depth_power / 2.0))[:, None]  # (H,1)
        self.depth = self.depth / self.depth.max()
        self.step_ms = step_ms
        self.sigma = smooth_sigma
        self.idx = {k: [i for i, kk in enumerate(kinds) if kk == k] for k in KINDS}
        self.reset(base)

    def reset(self, base: torch.Tensor) -> None:
        """Start a new parametrisation around ``base`` (B,H,W) float64: updates at zero."""
        self.base = base.detach().clone()
        self.params = {}
        for k, ids in self.idx.items():
            if not ids:
                continue
            shape = (len(ids), self.h) if k == "flat" else (len(ids), self.h, self.w)
            self.params[k] = torch.zeros(shape, dtype=torch.float64, device=base.device, requires_grad=True)
        flat = self.idx["flat"]
        if flat:  # a flat sample's base is its depth profile (row means)
            self.base[flat] = self.base[flat].mean(dim=2, keepdim=True).expand(-1, -1, self.w)

    def parameters(self) -> List[torch.Tensor]:
        return list(self.params.values())

    def velocity(self) -> torch.Tensor:
        """(B,H,W) float64 maps of the current parameters."""
        parts = [None] * self.b
        for k, p in self.params.items():
            if k == "flat":
                upd = (self.step_ms * self.depth[None] * p[:, :, None]).expand(-1, -1, self.w)
            elif k == "smooth":
                upd = self.step_ms * self.depth[None] * gauss_blur(p, self.sigma)
            else:
                upd = self.step_ms * self.depth[None] * p
            for j, i in enumerate(self.idx[k]):
                parts[i] = self.base[i] + upd[j]
        return torch.stack(parts)

    def regulariser(self, v: torch.Tensor, eps: Dict[str, float]) -> torch.Tensor:
        """(B,) float64 regulariser values (velocities in km/s, sums per map column);
        ``eps``: the TV smoothing per kind."""
        km = v / 1000.0
        out = torch.zeros(self.b, dtype=torch.float64, device=v.device)
        for k, ids in self.idx.items():
            if not ids:
                continue
            if k == "flat":
                r = profile_tv(km[ids], eps["flat"])
            elif k == "tv":
                r = map_tv(km[ids], eps["tv"])
            else:
                r = smooth_prior(self.params["smooth"])
            out = out.index_put((torch.tensor(ids, device=v.device),), r)
        return out
