"""Acoustic forward simulator: an exact replica of the host's finite-difference scheme.

The scheme (FACTS section 3, written out in :mod:`.stencil`): second order in time, fourth
order in space, a quadratic sponge in a 120-cell pad and the host's periodic stencil.

The coefficients are computed in float32 in the host's order of operations (the traces
are sensitive to their rounding at the 1e-5 level). The implementation keeps every field
in a buffer with a 2-cell halo refreshed by copying the opposite edges (the wrap) each
step, reuses two preallocated buffers (p_{t+1} overwrites p_{t-1}), lets the shots of a
map share its coefficient planes, and runs each time step as one fused loop when
``torch.compile`` is available. The same code runs on CPU and CUDA. The scheme's pieces
(geometry, coefficients, step kernels) live in :mod:`.stencil`; inputs that require grad
go through :mod:`.adjoint`.

Public API: :func:`simulate` (a function) and :class:`ForwardModel` (an ``nn.Module``
wrapper), plus :class:`Geometry` and :func:`damping_profile` (from :mod:`.stencil`).
"""
from __future__ import annotations

from typing import Literal, Optional, Sequence, Union

import numpy as np
import torch

from ..utils import progress_bar
from .native import available as native_available
from .native import compact_coefficients, layout, unavailable_reason, warn_fallback
from .native import forward as native_forward
from .adjoint import simulate_differentiable
from .stencil import (AUTO_COMPILE_MIN_SHOT_STEPS, C1, C2, C3, CFL_LIMIT, DEFAULT_SOURCE_COLUMNS, EagerStep,
                      FlushDenormals, Geometry, compiled_step, damping_profile, default_source_columns,
                      denormals_flushed, fill_halo, scheme_coefficients, stencil_weights)
from .wavelet import ricker

# the scheme's names (defined in :mod:`.stencil`) stay importable from here
__all__ = ["simulate", "simulate_host_style", "ForwardModel", "Backend", "resolve_backend", "Geometry", "damping_profile",
           "scheme_coefficients", "default_source_columns", "denormals_flushed", "DEFAULT_SOURCE_COLUMNS",
           "CFL_LIMIT", "AUTO_COMPILE_MIN_SHOT_STEPS", "C1", "C2", "C3"]

ArrayLike = Union[np.ndarray, torch.Tensor]
Backend = Literal["auto", "native", "compile", "eager"]
BACKENDS = ("auto", "native", "compile", "eager")
#: maps propagated per native call when ``batch_chunk`` is not given (the progress bar's step)
NATIVE_CHUNK = 16


def resolve_backend(backend: str, device, shot_steps: int) -> str:
    """The backend a call runs: ``"native"``, ``"compile"``, ``"eager"``, or ``"auto"`` for the
    torch path compiled where ``torch.compile`` works (else eager).

    ``"auto"`` on the CPU is the native kernel where it builds (else a one-time warning and
    the torch path); on other devices, and for the torch path, it compiles for jobs of at
    least ``AUTO_COMPILE_MIN_SHOT_STEPS`` shot-steps (``batch x shots x nt``) and runs small
    jobs eagerly. ``"native"`` raises where the kernel cannot run.
    """
    if backend not in BACKENDS:
        raise ValueError(f"simulate: backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    device = torch.device(device)
    if backend == "native":
        if device.type != "cpu":
            raise ValueError(f"simulate: backend='native' runs on the CPU; got device={device}")
        reason = unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"simulate: backend='native' requested but the native kernel is unavailable "
                               f"here ({reason}); use backend='auto' (falls back to the torch path)")
        return "native"
    if backend == "auto":
        if device.type == "cpu":
            if native_available():
                return "native"
            warn_fallback()
        return "auto" if shot_steps >= AUTO_COMPILE_MIN_SHOT_STEPS else "eager"
    return backend


def _as_tensor(velocity: ArrayLike, device) -> tuple:
    """Validate and convert the velocity input to a float32 (B,H,W) tensor."""
    is_numpy = isinstance(velocity, np.ndarray)
    if not is_numpy and not torch.is_tensor(velocity):
        raise ValueError(
            f"simulate: velocity must be a numpy array or torch tensor, got {type(velocity).__name__}")
    shape = tuple(velocity.shape)
    if len(shape) == 4:
        if shape[1] != 1:
            raise ValueError(f"simulate: velocity of shape {shape} must be (B,1,H,W) or (B,H,W)")
        v = velocity[:, 0]
    elif len(shape) == 3:
        v = velocity
    elif len(shape) == 2:
        raise ValueError(f"simulate: velocity of shape {shape} has no batch axis; use v[None] "
                         f"for a single map (expected (B,1,H,W) or (B,H,W))")
    else:
        raise ValueError(f"simulate: velocity of shape {shape} must be (B,1,H,W) or (B,H,W)")
    if shape[0] == 0 or v.shape[-1] < 5 or v.shape[-2] < 5:
        raise ValueError(f"simulate: velocity of shape {shape} is empty or smaller than 5x5")
    t = torch.from_numpy(np.array(v, dtype=np.float32)) if is_numpy else v
    if t.is_complex() or not t.is_floating_point():
        if t.dtype in (torch.int16, torch.int32, torch.int64, torch.uint8):
            t = t.to(torch.float32)
        else:
            raise ValueError(f"simulate: velocity dtype {t.dtype} is not a real number type")
    t = t.detach().to(device=device, dtype=torch.float32)
    return t, is_numpy


def _validate_range(v: torch.Tensor, geom: Geometry, vmin_allowed: float, vmax_allowed: float) -> None:
    if not bool(torch.isfinite(v).all()):
        bad = int((~torch.isfinite(v)).sum())
        raise ValueError(f"simulate: velocity contains {bad} non-finite values (NaN or inf)")
    lo, hi = float(v.min()), float(v.max())
    cfl_v = CFL_LIMIT * geom.dx / geom.dt
    upper = min(vmax_allowed, cfl_v)
    if lo < vmin_allowed or hi > upper:
        why = (f"the CFL limit {cfl_v:.0f} m/s for dt={geom.dt}, dx={geom.dx}"
               if cfl_v < vmax_allowed else f"{vmax_allowed:.0f} m/s")
        raise ValueError(
            f"simulate: velocity range [{lo:.1f}, {hi:.1f}] m/s is outside the plausible range "
            f"[{vmin_allowed:.0f}, {upper:.0f}] m/s (upper bound: {why}); velocities must be in m/s")


def _check_geometry(geom: "Geometry", h: int, w: int) -> None:
    for name, cols in (("source_columns", geom.source_columns), ("receiver_columns", geom.receivers(w))):
        if len(cols) == 0:
            raise ValueError(f"simulate: {name} is empty")
        if any(int(c) < 0 or int(c) >= w for c in cols):
            raise ValueError(f"simulate: {name} {list(cols)} must lie in 0..{w - 1}")
    for name, r in (("source_row", geom.source_row), ("receiver_row", geom.receiver_row)):
        if not 0 <= r < h:
            raise ValueError(f"simulate: {name}={r} must lie in 0..{h - 1}")


def _propagate(vel: torch.Tensor, geom: "Geometry", samples_per_chunk: int, progress: bool,
               backend: Backend = "auto") -> torch.Tensor:
    """Run every shot of a batch. vel: (B,H,W) float32 on the target device.

    Layout: a chunk of S samples x n shots as (S, n, H+4, W+4) halo buffers; the
    coefficients are (S, 1, H, W) and broadcast over the shots, which keeps the working
    set small. Two buffers suffice: p_{t+1} overwrites p_{t-1} in place.

    Returns (B, n_sources, nt, n_receivers) float32.
    """
    device = vel.device
    b, h, w = vel.shape
    _check_geometry(geom, h, w)
    nbc, nt = geom.nbc, geom.nt
    src = torch.tensor([int(c) for c in geom.source_columns], device=device) + nbc
    rec_cols = [c + nbc for c in geom.receivers(w)]
    contiguous = rec_cols == list(range(rec_cols[0], rec_cols[0] + len(rec_cols)))
    rsel = slice(rec_cols[0], rec_cols[-1] + 1) if contiguous else torch.tensor(rec_cols, device=device)
    ns, nr = len(src), len(rec_cols)
    sz = geom.source_row + nbc
    rz = geom.receiver_row + nbc

    step = None
    if backend in ("auto", "compile"):
        step = compiled_step()
        if step is None and backend == "compile":
            raise RuntimeError("simulate: backend='compile' requested but torch.compile failed here; "
                               "use backend='eager'")
    if step is None:
        step = EagerStep()

    co = scheme_coefficients(vel, geom)
    hp, wp = co["vp"].shape[-2:]
    wav = torch.from_numpy(ricker(geom.freq, geom.dt, nt)).to(device)
    c2, c3 = stencil_weights(torch.float32)
    out = torch.empty(b, ns, nt, nr, device=device)
    bar = None
    if progress:
        bar = progress_bar(total=b, desc="simulate", unit="sample")
    bufs = None
    for s0 in range(0, b, samples_per_chunk):
        s1 = min(b, s0 + samples_per_chunk)
        n = s1 - s0
        if bufs is None or bufs[0].shape[0] != n:
            bufs = [torch.zeros(n, ns, hp + 4, wp + 4, device=device) for _ in range(2)]
        else:
            for buf in bufs:
                buf.zero_()
        t1 = co["temp1"][s0:s1, None].contiguous()
        nt2 = (-co["temp2"][s0:s1, None]).contiguous()
        al = co["alpha"][s0:s1, None].contiguous()
        # source term beta[src] * s(t), laid out as dense source-row planes (nt, n, ns, Wp)
        # so that the injection is one add on a strided view instead of a scatter
        amp = co["beta"][s0:s1][:, sz, src]  # (n, ns)
        src_rows = torch.zeros(nt, n, ns, wp, device=device)
        src_rows[:, :, torch.arange(ns, device=device), src] = wav[:, None, None] * amp[None]
        prev, cur = bufs
        rec = out[s0:s1]
        for it in range(nt):
            fill_halo(cur)
            step(prev, cur, t1, nt2, al, c2, c3)
            o = prev[..., 2:-2, 2:-2]
            o[:, :, sz, :] += src_rows[it]
            rec[:, :, it, :] = o[:, :, rz, rsel]
            prev, cur = cur, prev
        if bar is not None:
            bar.update(n)
    if bar is not None:
        bar.close()
    return out


def _propagate_native(vel: torch.Tensor, geom: "Geometry", samples_per_chunk: int, progress: bool,
                      flush_denormal: bool) -> torch.Tensor:
    """:func:`_propagate` on the native kernel: every shot of a chunk of maps in one call."""
    b, h, w = vel.shape
    _check_geometry(geom, h, w)
    lay = layout(geom, h, w)
    wav = torch.from_numpy(ricker(geom.freq, geom.dt, geom.nt))
    out = torch.empty(b, len(lay.src), geom.nt, len(lay.rec))
    bar = progress_bar(total=b, desc="simulate", unit="sample") if progress else None
    for s0 in range(0, b, samples_per_chunk):
        s1 = min(b, s0 + samples_per_chunk)
        co = compact_coefficients(vel[s0:s1], geom)
        out[s0:s1] = native_forward(lay, co["alpha_rows"], co["kx"], co["kz"], co["amp"], wav,
                                    flush_denormal=flush_denormal)[0]
        if bar is not None:
            bar.update(s1 - s0)
    if bar is not None:
        bar.close()
    return out


def simulate(
    velocity: ArrayLike,
    *,
    source_columns: Optional[Sequence[int]] = None,
    source_row: int = 1,
    receiver_row: int = 1,
    receiver_columns: Optional[Sequence[int]] = None,
    nt: int = 1000,
    dt: float = 1e-3,
    dx: float = 10.0,
    freq: float = 15.0,
    nbc: int = 120,
    device: Optional[Union[str, torch.device]] = None,
    batch_chunk: Optional[int] = None,
    vmin: float = 300.0,
    vmax: float = 10000.0,
    backend: Backend = "auto",
    flush_denormal: bool = True,
    progress: bool = False,
    checkpoint_every: Optional[int] = None,
) -> ArrayLike:
    """Simulate shot gathers for a batch of velocity maps with the host's scheme.

    Args:
        velocity: (B,1,H,W) or (B,H,W) velocities in m/s (numpy array or tensor).
        source_columns: source columns (default: 5 sources at 0, 17, 34, 52, 69).
        source_row, receiver_row: depth rows of sources and receivers (default 1 = 10 m).
        receiver_columns: receiver columns (default: every column).
        nt, dt, dx, freq, nbc: time samples, time step (s), grid step (m), Ricker peak
            frequency (Hz), sponge width (cells).
        device: where to compute (default: the input tensor's device, CPU for numpy).
        batch_chunk: how many velocity maps to propagate together (all their shots at
            once; default 2 on CPU, which keeps the working set in cache, 64 on CUDA).
        vmin, vmax: the plausible velocity range; values outside it (or above the CFL
            limit ``sqrt(3/8)*dx/dt``) raise ``ValueError``.
        backend: ``"native"`` runs the C++ kernel of :mod:`.native` on the CPU (built with
            the system's compiler at first use and cached on disk; equal bit for bit to the
            torch path's step written as one expression, :func:`.stencil.step_fused`);
            ``"compile"`` fuses each torch time step into one loop with ``torch.compile``
            (CPU or CUDA; the first call in a process compiles for 5-30 s); ``"eager"`` uses
            in-place PyTorch ops; ``"auto"`` (default) is ``"native"`` on a CPU where the
            kernel builds (else a one-time warning and the torch path) and, on CUDA, compiles
            for jobs of at least ``AUTO_COMPILE_MIN_SHOT_STEPS`` shot-steps and runs smaller
            ones eagerly (:func:`resolve_backend`). On the native path ``batch_chunk`` (default
            ``NATIVE_CHUNK``) only sets the progress bar's step.
        flush_denormal: on CPU, flush denormal floats to zero while simulating. The
            stencil spreads values of 1e-38 and below ahead of the wavefront, and denormal
            arithmetic is slow on x86: flushing makes the simulation about 25% faster. The
            scheme amplifies rounding, so traces change at the float32-rounding level
            (relative L2 up to about 1e-6 on the reference maps, still within the 1e-5
            agreement with the host's data). The calling thread's previous mode is restored
            afterwards; worker threads that torch starts during the call may keep flushing,
            which only affects values below 1e-38.
        progress: show a progress bar (not used by the differentiable path).
        checkpoint_every: differentiable path only: time steps between the wavefield
            checkpoints kept for the backward pass (default 50, see :mod:`.adjoint`).

    Returns:
        float32 seismic of shape (B, n_sources, nt, n_receivers), a numpy array when the
        input was numpy, else a tensor on ``device``.

    Gradients: when ``velocity`` is a tensor that requires grad and grad mode is on, the
    result carries a ``grad_fn`` and back-propagates to ``velocity`` through the adjoint of
    the discrete scheme with wavefield checkpointing (:mod:`fwi_core.physics.adjoint`):
    about 180 MB per sample for nt=1000 at the default ``checkpoint_every=50`` on the torch
    path; the native path keeps the same 73 MB of checkpoints per sample plus, per worker
    thread, the ``checkpoint_every`` fields of the segment being back-propagated (19 MB).
    The sponge's min(v) is treated as a constant. The forward values are the fast path's.
    """
    if device is None:
        device = velocity.device if torch.is_tensor(velocity) else torch.device("cpu")
    device = torch.device(device)
    v, is_numpy = _as_tensor(velocity, device)
    geom = Geometry(
        source_columns=tuple(source_columns) if source_columns is not None
        else default_source_columns(5, v.shape[-1], dx) if v.shape[-1] != 70 else DEFAULT_SOURCE_COLUMNS,
        source_row=source_row, receiver_row=receiver_row,
        receiver_columns=None if receiver_columns is None else tuple(receiver_columns),
        nt=int(nt), dt=float(dt), dx=float(dx), freq=float(freq), nbc=int(nbc))
    if geom.nt <= 0 or geom.nbc < 2 or geom.dt <= 0 or geom.dx <= 0:
        raise ValueError(f"simulate: need nt > 0, nbc >= 2, dt > 0, dx > 0; got nt={nt}, nbc={nbc}, "
                         f"dt={dt}, dx={dx}")
    if len(geom.source_columns) == 0:
        raise ValueError("simulate: source_columns is empty")
    _validate_range(v, geom, vmin, vmax)
    chunk_given = batch_chunk is not None
    if batch_chunk is None:
        batch_chunk = 64 if device.type == "cuda" else 2
    if batch_chunk < 1:
        raise ValueError(f"simulate: batch_chunk must be >= 1, got {batch_chunk}")
    backend = resolve_backend(backend, device, v.shape[0] * len(geom.source_columns) * geom.nt)
    if torch.is_tensor(velocity) and velocity.requires_grad and torch.is_grad_enabled():
        vg = velocity[:, 0] if velocity.dim() == 4 else velocity
        if not vg.is_floating_point():
            raise ValueError(f"simulate: velocity dtype {vg.dtype} cannot require grad")
        if not chunk_given and device.type == "cuda":
            batch_chunk = 32  # the backward keeps checkpoint_every + 4 fields per map of a chunk
        return simulate_differentiable(vg.to(device=device, dtype=torch.float32), geom,
                                       batch_chunk=int(batch_chunk), checkpoint_every=checkpoint_every,
                                       backend=backend, flush_denormal=flush_denormal)
    if backend == "native":
        with torch.no_grad():
            out = _propagate_native(v, geom, int(batch_chunk) if chunk_given else NATIVE_CHUNK, progress,
                                    flush_denormal)
        return out.numpy() if is_numpy else out
    with FlushDenormals(flush_denormal and device.type == "cpu"), torch.no_grad():
        out = _propagate(v, geom, int(batch_chunk), progress, backend)
    return out.cpu().numpy() if is_numpy else out


class ForwardModel(torch.nn.Module):
    """``nn.Module`` wrapper of :func:`simulate` with a fixed geometry.

    ``ForwardModel(**simulate_kwargs)(velocity)`` returns what ``simulate(velocity, **kwargs)``
    returns (no gradients: use the differentiable propagator for refinement).
    """

    def __init__(self, **kwargs):
        super().__init__()
        self.kwargs = dict(kwargs)

    def forward(self, velocity: torch.Tensor) -> torch.Tensor:
        return simulate(velocity, **self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())


def simulate_host_style(velocity: ArrayLike, nt: int = 1000, **kw) -> np.ndarray:
    """The straightforward host-style propagator: ``torch.roll`` on the padded grid, the
    shots of one map propagated together, a fresh tensor per operation and step.

    Slow; kept as the readable statement of the scheme and as the benchmark baseline.
    Takes (B,1,H,W) or (B,H,W) m/s, returns numpy (B, n_sources, nt, W).
    """
    geom = Geometry(nt=nt, **kw)
    v, _ = _as_tensor(velocity, torch.device("cpu"))
    b, h, w = v.shape
    _check_geometry(geom, h, w)
    nbc = geom.nbc
    co = scheme_coefficients(v, geom)
    wav = torch.from_numpy(ricker(geom.freq, geom.dt, nt))
    c2 = torch.tensor(C2)
    c3 = torch.tensor(C3)
    sz, rz = geom.source_row + nbc, geom.receiver_row + nbc
    sx = torch.tensor([int(c) + nbc for c in geom.source_columns])
    shots = torch.arange(len(sx))
    out = np.zeros((b, len(sx), nt, w), np.float32)
    r = torch.roll
    with torch.no_grad():
        for i in range(b):
            t1, t2, al = co["temp1"][i], co["temp2"][i], co["alpha"][i]
            p0 = torch.zeros(len(sx), *t1.shape)
            p1 = torch.zeros_like(p0)
            for it in range(nt):
                lap = (c2 * (r(p1, 1, 2) + r(p1, -1, 2) + r(p1, 1, 1) + r(p1, -1, 1))
                       + c3 * (r(p1, 2, 2) + r(p1, -2, 2) + r(p1, 2, 1) + r(p1, -2, 1)))
                p = t1 * p1 - t2 * p0 + al * lap
                p[shots, sz, sx] += co["beta"][i, sz, sx] * wav[it]
                out[i, :, it] = p[:, rz, nbc:nbc + w].numpy()
                p0, p1 = p1, p
    return out
