"""The finite-difference scheme's shared pieces: geometry, coefficients and step kernels.

Scheme (FACTS section 3): second order in time, fourth order in space, on the velocity
map edge-padded by ``nbc`` cells per side, with a quadratic sponge in the pad and a
*periodic* stencil (the host used ``torch.roll``, so the Laplacian wraps around the
padded grid; reproducing the wrap is what makes the replica exact)::

    p_next = (2 + 2*c1*alpha - kappa) * p - (1 - kappa) * p_prev
             + alpha * (c2 * sum(4 neighbours at distance 1) + c3 * sum(4 at distance 2))
    p_next[source] += (v*dt)^2 * wavelet[t];   trace[t] = p_next[receivers]

The coefficients are computed in float32 in the host's order of operations (the traces
are sensitive to their rounding at the 1e-5 level). Fields live in buffers with a 2-cell
halo refreshed by copying the opposite edges (the wrap, :func:`fill_halo`) each step; a
step overwrites p_{t-1} with p_{t+1} in place (:func:`step_fused`, compiled once per
process by :func:`compiled_step` where ``torch.compile`` works, else :class:`EagerStep`).

This module is what :mod:`.forward` (the fast path), :mod:`.adjoint` (the gradient) and
:mod:`.refine` share; it imports nothing else from the package.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch

C1 = -2.5
C2 = 4.0 / 3.0
C3 = -1.0 / 12.0
#: The largest Courant number ``v*dt/dx`` for which this 2-D scheme is stable
#: (alpha * 32/3 <= 4, i.e. sqrt(3/8)).
CFL_LIMIT = math.sqrt(3.0 / 8.0)

DEFAULT_SOURCE_COLUMNS = (0, 17, 34, 52, 69)
#: ``backend="auto"`` compiles the time step for jobs of at least this many shot-steps
#: (4 full samples); smaller jobs run eagerly rather than wait for the compiler.
AUTO_COMPILE_MIN_SHOT_STEPS = 4 * 5 * 1000


def default_source_columns(n_sources: int = 5, nx: int = 70, dx: float = 10.0) -> tuple:
    """Source columns as the host placed them: ``round(linspace(0, (nx-1)*dx, n) / dx)``."""
    xs = np.linspace(0, (nx - 1) * dx, n_sources)
    return tuple(int(c) for c in np.round(xs / dx))


@dataclass(frozen=True)
class Geometry:
    """Acquisition and grid parameters (defaults: the competition's)."""

    source_columns: Sequence[int] = DEFAULT_SOURCE_COLUMNS
    source_row: int = 1
    receiver_row: int = 1
    receiver_columns: Optional[Sequence[int]] = None  # None: every column
    nt: int = 1000
    dt: float = 1e-3
    dx: float = 10.0
    freq: float = 15.0
    nbc: int = 120

    def receivers(self, nx: int) -> list:
        return list(range(nx)) if self.receiver_columns is None else [int(c) for c in self.receiver_columns]


def damping_profile(vel_padded: torch.Tensor, nbc: int, dx: float) -> torch.Tensor:
    """The host's sponge: ``k0 * (d*dx/a)^2`` for a cell ``d`` cells into the pad.

    Computed in float32 with the host's order of operations (the seismic is sensitive
    to the rounding of these coefficients at the 1e-5 level).

    Args:
        vel_padded: (B, Hp, Wp) edge-padded velocity (m/s), float32.
    Returns:
        (B, Hp, Wp) float32 damping in 1/s, zero inside the model; in the corners the
        x-direction (column) profile wins, as in the host code that wrote it over all rows.
    """
    b, hp, wp = vel_padded.shape
    nz, nx = hp - 2 * nbc, wp - 2 * nbc
    dev = vel_padded.device
    a = (nbc - 1) * dx
    vmin = vel_padded.amin(dim=(1, 2))
    k0 = 3.0 * vmin * torch.log(torch.tensor(1e7, device=dev)) / (2.0 * a)  # (B,)
    prof = k0[:, None] * ((torch.arange(nbc, dtype=torch.float32, device=dev) * dx / a) ** 2)
    damp = torch.zeros(b, hp, wp, dtype=torch.float32, device=dev)
    damp[:, :, :nbc] = prof.flip(1)[:, None, :]
    damp[:, :, nx + nbc:] = prof[:, None, :]
    damp[:, :nbc, nbc:nbc + nx] = prof.flip(1)[:, :, None]
    damp[:, nz + nbc:, nbc:nbc + nx] = prof[:, :, None]
    return damp


def scheme_coefficients(vel: torch.Tensor, geom: Geometry) -> dict:
    """Float32 coefficients of the update, computed exactly as the host did.

    Args:
        vel: (B,H,W) float32 velocity.
    Returns:
        dict of (B,Hp,Wp) tensors ``temp1``, ``temp2``, ``alpha``, ``beta``, the padded
        velocity ``vp`` and the sponge's ``kappa = damp * dt``; differentiable w.r.t. ``vel``
        except through the sponge's min(v) (``kappa`` and ``temp2`` are constants).
    """
    nbc = geom.nbc
    vp = torch.nn.functional.pad(vel[:, None], (nbc, nbc, nbc, nbc), mode="replicate")[:, 0]
    # the sponge depends on min(v) only; under autograd that min is a constant (detached)
    damp = damping_profile(vp.detach(), nbc, geom.dx)
    alpha = (vp * geom.dt / geom.dx) ** 2
    kappa = damp * geom.dt
    c1 = torch.tensor(C1, dtype=torch.float32, device=vel.device)
    temp1 = 2 + 2 * c1 * alpha - kappa
    temp2 = 1 - kappa
    beta = (vp * geom.dt) ** 2
    return {"vp": vp, "alpha": alpha, "temp1": temp1, "temp2": temp2, "beta": beta, "kappa": kappa}


def stencil_weights(dtype: torch.dtype = torch.float32) -> tuple:
    """``(c2, c3)`` as the steps use them: float32-rounded Python floats for float32 fields,
    the exact constants otherwise."""
    if dtype == torch.float32:
        return float(torch.tensor(C2, dtype=torch.float32)), float(torch.tensor(C3, dtype=torch.float32))
    return C2, C3


# ---------------------------------------------------------------------------------------
# CPU denormals


def denormals_flushed() -> bool:
    """Whether the CPU currently flushes denormal floats to zero (torch has no getter:
    a denormal times one is zero exactly when flushing is on)."""
    return float(torch.tensor([1e-39], dtype=torch.float32) * 1.0) == 0.0


class FlushDenormals:
    """Scoped ``torch.set_flush_denormal(True)`` when ``on`` (CPU; see
    ``simulate(flush_denormal=)``); the previous mode is restored on exit."""

    def __init__(self, on: bool):
        self.on = on
        self.restore = None

    def __enter__(self):
        if self.on:
            self.restore = denormals_flushed()
            torch.set_flush_denormal(True)
        return self

    def __exit__(self, *exc):
        if self.restore is not None:
            torch.set_flush_denormal(self.restore)
        return False


# ---------------------------------------------------------------------------------------
# step kernels on halo buffers


def fill_halo(buf: torch.Tensor) -> None:
    """Periodic halo of width 2 (the host's ``torch.roll`` wrap): copy opposite edges.

    ``buf`` is (..., H+4, W+4); rows first, then full columns (which fills the corners).
    """
    buf[..., 0:2, 2:-2] = buf[..., -4:-2, 2:-2]
    buf[..., -2:, 2:-2] = buf[..., 2:4, 2:-2]
    buf[..., :, 0:2] = buf[..., :, -4:-2]
    buf[..., :, -2:] = buf[..., :, 2:4]


def step_fused(prev: torch.Tensor, cur: torch.Tensor, temp1: torch.Tensor, neg_temp2: torch.Tensor,
               alpha: torch.Tensor, c2: float, c3: float) -> None:
    """One time step written as a single expression (what ``torch.compile`` fuses into one
    loop): ``prev`` (halo buffer holding p_{t-1}) is overwritten in its interior with p_{t+1}.

    prev, cur: (S, n, H+4, W+4); temp1, neg_temp2, alpha: (S, 1, H, W) (shared by the shots).
    """
    s1 = cur[..., 2:-2, 3:-1] + cur[..., 2:-2, 1:-3] + cur[..., 3:-1, 2:-2] + cur[..., 1:-3, 2:-2]
    s2 = cur[..., 2:-2, 4:] + cur[..., 2:-2, 0:-4] + cur[..., 4:, 2:-2] + cur[..., 0:-4, 2:-2]
    o = prev[..., 2:-2, 2:-2]
    o.copy_(neg_temp2 * o + temp1 * cur[..., 2:-2, 2:-2] + alpha * (c2 * s1 + c3 * s2))


class EagerStep:
    """The same step as :func:`step_fused` with in-place ops on preallocated scratch
    buffers (no per-step allocation); used where ``torch.compile`` is unavailable."""

    def __init__(self):
        self.scratch = None

    def __call__(self, prev, cur, temp1, neg_temp2, alpha, c2, c3):
        shape = prev[..., 2:-2, 2:-2].shape
        if self.scratch is None or self.scratch[0].shape != shape:
            self.scratch = (torch.empty(shape, device=prev.device), torch.empty(shape, device=prev.device))
        s1, s2 = self.scratch
        o = prev[..., 2:-2, 2:-2]
        o.mul_(neg_temp2)
        o.addcmul_(cur[..., 2:-2, 2:-2], temp1)
        torch.add(cur[..., 2:-2, 3:-1], cur[..., 2:-2, 1:-3], out=s1)
        s1.add_(cur[..., 3:-1, 2:-2]).add_(cur[..., 1:-3, 2:-2])
        torch.add(cur[..., 2:-2, 4:], cur[..., 2:-2, 0:-4], out=s2)
        s2.add_(cur[..., 4:, 2:-2]).add_(cur[..., 0:-4, 2:-2])
        s1.mul_(c2).add_(s2, alpha=c3)
        o.addcmul_(s1, alpha)


# ---------------------------------------------------------------------------------------
# compiling kernels (once per process)

_COMPILED: dict = {}


def compile_checked(name: str, fn: Callable, probe: Callable[[Callable], None]) -> Optional[Callable]:
    """``torch.compile(fn)``, built once per process under ``name`` and trusted only after
    ``probe(compiled)`` (a run on a tiny problem, which compiles it) succeeded; None where
    compiling is not possible here (e.g. no C++ compiler)."""
    if name not in _COMPILED:
        # on CPU-only machines torch logs "No CUDA runtime is found" while compiling
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        try:
            cfn = torch.compile(fn, dynamic=False)
            probe(cfn)
            _COMPILED[name] = cfn
        except Exception:  # noqa: BLE001 - any failure means: use the eager step
            _COMPILED[name] = None
    return _COMPILED[name]


def probe_fields() -> tuple:
    """A tiny problem for probing compiled steps: ``(p, p_copy, ones)``, the fields
    (1,1,9,9) with a unit spike in the middle, the coefficient plane (1,1,5,5)."""
    a = torch.zeros(1, 1, 9, 9)
    a[..., 4, 4] = 1.0
    return a, a.clone(), torch.ones(1, 1, 5, 5)


def _probe_step(fn: Callable) -> None:
    a, b, c = probe_fields()
    fn(b, a, c, -c, c, 1.0, 0.5)


def compiled_step() -> Optional[Callable]:
    """``torch.compile`` of :func:`step_fused`, built once per process (None if compiling
    is not possible here, e.g. no C++ compiler)."""
    return compile_checked("step", step_fused, _probe_step)
