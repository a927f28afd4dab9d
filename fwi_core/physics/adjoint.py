"""Gradients of the simulator: the adjoint (reverse-time) propagation of the discrete scheme.

:func:`simulate` returns a differentiable tensor when its input requires grad; it calls
:func:`simulate_differentiable` here. The velocity gradient is split in two parts:

1. ``velocity -> (temp1, temp2, alpha, beta at the sources)``: the host's coefficient
   computation (replicate padding, ``alpha = (v dt/dx)^2``, ``temp1 = 2 + 2 c1 alpha -
   kappa``, ``beta = (v dt)^2``), differentiated by autograd. The sponge's ``min(v)``
   (:func:`damping_profile`'s ``vmin``) is treated as a constant (detached): ``min`` is not
   smooth, and the public record's refinement did the same. So ``kappa`` and ``temp2``
   carry no gradient.
2. ``(temp1, temp2, alpha, source amplitudes) -> seismic``: a ``torch.autograd.Function``
   whose backward is the exact adjoint of the discrete time stepping. With the forward
   ``p_t = T1 p_{t-1} - T2 p_{t-2} + A L(p_{t-1}) + s_t`` (``L`` the periodic, symmetric
   off-centre stencil) and traces ``d_t = R p_t``, the adjoint field for an output
   gradient ``g`` runs backwards in time::

       q_t = T1 q_{t+1} + L(A q_{t+1}) - T2 q_{t+2} + R^T g_t
       dJ/dT1 = sum_t q_t p_{t-1},  dJ/dA = sum_t q_t L(p_{t-1}),  dJ/dT2 = -sum_t q_t p_{t-2}
       dJ/d(source amplitude of shot s) = sum_t q_t[source cell] * wavelet[t]

   (summed over the shots, which share the coefficient planes). ``L`` is symmetric on the
   periodic grid. The implementation propagates the scaled adjoint ``r_t = A q_t``
   (``A > 0``), whose recursion ``r_t = T1 r_{t+1} + A L(r_{t+1}) - T2 r_{t+2} + A R^T g_t``
   is the forward step itself (the same fused, compiled kernel), accumulates the sums with
   ``r`` and divides them by ``A`` once at the end.

Memory: the forward keeps the two fields ``(p_{t-1}, p_{t-2})`` every ``k`` steps
(checkpoints); the backward recomputes one segment of ``k`` steps at a time from its
checkpoint and runs the adjoint through it. With ``k = DEFAULT_CHECKPOINT_EVERY = 50``,
nt = 1000 and the competition grid (5 shots on 310 x 310, 1.92 MB per field), a sample
keeps 2 * 19 = 38 fields = 73 MB between forward and backward, and the chunk being
back-propagated needs another (k + 4) fields = 106 MB per sample of the chunk: about
180 MB per sample in all (:func:`gradient_memory_bytes`), against about 2 GB to store every
time step and about 10 GB for plain autograd. The checkpoints grow as nt/k, the segment as
k. Cost: the forward, one recomputation of the forward and the adjoint pass.

The buffers use the halo layout and (where ``torch.compile`` works) compiled fused steps of
:mod:`.stencil`; the same code runs on CUDA (the device follows the input). Float64 inputs
propagate in float64 (eager steps), which the tests use for finite-difference checks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .native import backward as native_backward
from .native import compact_coefficients, layout
from .native import forward as native_forward
from .stencil import (AUTO_COMPILE_MIN_SHOT_STEPS, C1, EagerStep, FlushDenormals, Geometry, compile_checked,
                      compiled_step, damping_profile, fill_halo, probe_fields, scheme_coefficients, step_fused,
                      stencil_weights)
from .wavelet import ricker

#: steps between wavefield checkpoints (balances checkpoint memory nt/k against segment memory k)
DEFAULT_CHECKPOINT_EVERY = 50


def gradient_memory_bytes(nt: int = 1000, checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY, *,
                          n_shots: int = 5, height: int = 70, width: int = 70, nbc: int = 120,
                          itemsize: int = 4) -> dict:
    """Memory per sample of the differentiable simulator (what the implementation allocates).

    Returns:
        dict with ``field`` (bytes of one wavefield, all shots), ``checkpoints`` (bytes kept
        per sample between forward and backward), ``segment`` (working bytes per sample of
        the chunk being back-propagated: k recomputed fields, two adjoint fields, two
        restored states) and ``total`` (their sum).
    """
    k = max(1, int(checkpoint_every))
    field = n_shots * (height + 2 * nbc) * (width + 2 * nbc) * itemsize
    n_ck = max(0, math.ceil(nt / k) - 1)
    ckpt = 2 * n_ck * field
    seg = (min(k, nt) + 4) * n_shots * (height + 2 * nbc + 4) * (width + 2 * nbc + 4) * itemsize
    return {"field": field, "checkpoints": ckpt, "segment": seg, "total": ckpt + seg}


# ---------------------------------------------------------------------------------------
# fused steps (compiled once per process when possible)


def _step_into(out: torch.Tensor, prev: torch.Tensor, cur: torch.Tensor, temp1: torch.Tensor,
               neg_temp2: torch.Tensor, alpha: torch.Tensor, c2: float, c3: float) -> None:
    """:func:`.stencil.step_fused` writing p_{t+1} into ``out`` (same arithmetic, same order)."""
    s1 = cur[..., 2:-2, 3:-1] + cur[..., 2:-2, 1:-3] + cur[..., 3:-1, 2:-2] + cur[..., 1:-3, 2:-2]
    s2 = cur[..., 2:-2, 4:] + cur[..., 2:-2, 0:-4] + cur[..., 4:, 2:-2] + cur[..., 0:-4, 2:-2]
    out[..., 2:-2, 2:-2].copy_(neg_temp2 * prev[..., 2:-2, 2:-2] + temp1 * cur[..., 2:-2, 2:-2]
                               + alpha * (c2 * s1 + c3 * s2))


def _accumulate(g_t1: torch.Tensor, g_al: torch.Tensor, r: torch.Tensor, p: torch.Tensor,
                c2: float, c3: float) -> None:
    """``g_t1 += sum_shots r_t p_{t-1}``, ``g_al += sum_shots r_t L(p_{t-1})``.

    g_t1, g_al: (S, 1, H, W); r (scaled adjoint r_t), p (p_{t-1}, halo filled):
    (S, n, H+4, W+4).
    """
    q = r[..., 2:-2, 2:-2]
    s1 = p[..., 2:-2, 3:-1] + p[..., 2:-2, 1:-3] + p[..., 3:-1, 2:-2] + p[..., 1:-3, 2:-2]
    s2 = p[..., 2:-2, 4:] + p[..., 2:-2, 0:-4] + p[..., 4:, 2:-2] + p[..., 0:-4, 2:-2]
    g_t1.add_((q * p[..., 2:-2, 2:-2]).sum(1, keepdim=True))
    g_al.add_((q * (c2 * s1 + c3 * s2)).sum(1, keepdim=True))


def _accumulate_t2(g_n: torch.Tensor, lam: torch.Tensor, p2: torch.Tensor) -> None:
    """``g_n += sum_shots r_t p_{t-2}`` (the gradient of ``-temp2``, times A); halo buffers."""
    g_n.add_((lam[..., 2:-2, 2:-2] * p2[..., 2:-2, 2:-2]).sum(1, keepdim=True))


def _probe(name: str, fn) -> None:
    """Run a compiled function once on a tiny problem (compiles it; raises if broken)."""
    a, b, c = probe_fields()
    if name == "into":
        fn(torch.zeros_like(a), b, a, c, -c, c, 1.0, 0.5)
    else:
        fn(torch.zeros_like(c), torch.zeros_like(c), b, a, 1.0, 0.5)


def _compiled(name: str):
    """The ``torch.compile`` of one of the fused steps, or None where compiling fails."""
    fn = {"into": _step_into, "accumulate": _accumulate}[name]
    return compile_checked(f"adjoint.{name}", fn, lambda cfn: _probe(name, cfn))


# ---------------------------------------------------------------------------------------
# the autograd Function


@dataclass
class _Plan:
    """Everything about one propagation that is not a tensor input."""

    geom: Geometry
    width: int
    chunk: int
    k: int
    compile: bool
    flush_denormal: bool

    def __post_init__(self):
        g = self.geom
        self.src = [int(c) + g.nbc for c in g.source_columns]
        self.rec = [int(c) + g.nbc for c in g.receivers(self.width)]
        self.contiguous = self.rec == list(range(self.rec[0], self.rec[0] + len(self.rec)))
        self.sz = g.source_row + g.nbc
        self.rz = g.receiver_row + g.nbc
        w = ricker(g.freq, g.dt, g.nt)
        nz = [i for i in range(len(w)) if w[i] != 0.0]
        self.src_steps = (nz[-1] + 1) if nz else 0  # source terms vanish from here on
        self.n_segments = math.ceil(g.nt / self.k)


def _steps(plan: _Plan, dtype: torch.dtype):
    """The (step_into, step_in_place, accumulate) callables for this run: the compiled ones
    where asked for and available, else eager (float32 in place: the fast path's own eager
    step, so that the forward values are the fast path's)."""
    if plan.compile and dtype == torch.float32:
        fused = compiled_step()
        into, acc = _compiled("into"), _compiled("accumulate")
        if None not in (fused, into, acc):
            return into, fused, acc
    return _step_into, (EagerStep() if dtype == torch.float32 else step_fused), _accumulate


def _source_rows(plan: _Plan, amp: torch.Tensor, wav: torch.Tensor, wp: int) -> torch.Tensor:
    """Dense source-row planes (nt, S, n_shots, Wp) as the fast path builds them."""
    ns = len(plan.src)
    dev = amp.device
    rows = torch.zeros(plan.geom.nt, amp.shape[0], ns, wp, device=dev, dtype=amp.dtype)
    rows[:, :, torch.arange(ns, device=dev), torch.tensor(plan.src, device=dev)] = wav[:, None, None] * amp[None]
    return rows


class _WaveFunction(torch.autograd.Function):
    """(temp1, temp2, alpha: (B,Hp,Wp); amp: (B,n_shots)) -> seismic (B, n_shots, nt, n_rec)."""

    @staticmethod
    def forward(ctx, temp1, temp2, alpha, amp, plan: _Plan):  # noqa: D401
        geom = plan.geom
        dev, dtype = temp1.device, temp1.dtype
        b, hp, wp = temp1.shape
        ns, nr, nt, k = len(plan.src), len(plan.rec), geom.nt, plan.k
        need_grad = any(ctx.needs_input_grad[:4])
        _, fused, _ = _steps(plan, dtype)
        c2, c3 = stencil_weights(dtype)
        wav = torch.from_numpy(ricker(geom.freq, geom.dt, nt)).to(device=dev, dtype=dtype)
        rsel = slice(plan.rec[0], plan.rec[-1] + 1) if plan.contiguous else torch.tensor(plan.rec, device=dev)
        sz, rz = plan.sz, plan.rz
        n_ck = plan.n_segments - 1
        ckpt = torch.empty(b, n_ck, 2, ns, hp, wp, device=dev, dtype=dtype) if need_grad else None
        out = torch.empty(b, ns, nt, nr, device=dev, dtype=dtype)
        with FlushDenormals(plan.flush_denormal and dev.type == "cpu"):
            for s0 in range(0, b, plan.chunk):
                s1 = min(b, s0 + plan.chunk)
                n = s1 - s0
                prev, cur = [torch.zeros(n, ns, hp + 4, wp + 4, device=dev, dtype=dtype) for _ in range(2)]
                t1 = temp1[s0:s1, None].contiguous()
                nt2 = (-temp2[s0:s1, None]).contiguous()
                al = alpha[s0:s1, None].contiguous()
                src_rows = _source_rows(plan, amp[s0:s1], wav, wp)
                rec = out[s0:s1]
                for it in range(nt):
                    if ckpt is not None and it % k == 0 and it > 0:
                        j = it // k - 1
                        ckpt[s0:s1, j, 0] = cur[..., 2:-2, 2:-2]  # p_{it-1}
                        ckpt[s0:s1, j, 1] = prev[..., 2:-2, 2:-2]  # p_{it-2}
                    fill_halo(cur)
                    fused(prev, cur, t1, nt2, al, c2, c3)
                    o = prev[..., 2:-2, 2:-2]
                    o[:, :, sz, :] += src_rows[it]
                    rec[:, :, it, :] = o[:, :, rz, rsel]
                    prev, cur = cur, prev
        if need_grad:
            ctx.save_for_backward(temp1, temp2, alpha, amp, ckpt)
            ctx.plan = plan
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        temp1, temp2, alpha, amp, ckpt = ctx.saved_tensors
        plan: _Plan = ctx.plan
        geom = plan.geom
        dev, dtype = temp1.device, temp1.dtype
        b, hp, wp = temp1.shape
        ns, nt, k = len(plan.src), geom.nt, plan.k
        need_t1, need_t2, need_al, need_amp = ctx.needs_input_grad[:4]
        into, step, acc = _steps(plan, dtype)
        c2, c3 = stencil_weights(dtype)
        g = grad_out.to(dtype).contiguous()
        wav = torch.from_numpy(ricker(geom.freq, geom.dt, nt)).to(device=dev, dtype=dtype)
        sz, rz = plan.sz, plan.rz
        ridx = None if plan.contiguous else torch.tensor(plan.rec, device=dev)
        shot_idx = torch.arange(ns, device=dev)
        src_idx = torch.tensor(plan.src, device=dev)
        g_t1 = torch.zeros(b, 1, hp, wp, device=dev, dtype=dtype)
        g_al = torch.zeros_like(g_t1)
        g_n = torch.zeros_like(g_t1) if need_t2 else None
        g_amp = torch.zeros(b, ns, device=dev, dtype=dtype)
        with FlushDenormals(plan.flush_denormal and dev.type == "cpu"):
            for s0 in range(0, b, plan.chunk):
                s1 = min(b, s0 + plan.chunk)
                n = s1 - s0
                t1 = temp1[s0:s1, None].contiguous()
                nt2 = (-temp2[s0:s1, None]).contiguous()
                al = alpha[s0:s1, None].contiguous()
                # the receiver term of r_t = A q_t is A[receivers] * g_t
                al_rec = al[:, :, rz, plan.rec[0]:plan.rec[-1] + 1] if plan.contiguous else al[:, :, rz][..., ridx]
                src_rows = _source_rows(plan, amp[s0:s1], wav, wp)
                gt1, gal = g_t1[s0:s1], g_al[s0:s1]
                gn = g_n[s0:s1] if g_n is not None else None
                seg = torch.zeros(min(k, nt) + 2, n, ns, hp + 4, wp + 4, device=dev, dtype=dtype)
                r_prev, r_cur = [torch.zeros(n, ns, hp + 4, wp + 4, device=dev, dtype=dtype) for _ in range(2)]
                gch = g[s0:s1] * al_rec[:, :, None, :]  # (n, ns, nt, nr)
                r_src = torch.zeros(n, ns, device=dev, dtype=dtype)
                for j in range(plan.n_segments - 1, -1, -1):
                    t0, t_end = j * k, min(nt, (j + 1) * k)
                    # restore the state before step t0 and recompute the segment's fields
                    if j == 0:
                        seg[0:2].zero_()
                    else:
                        seg[1][..., 2:-2, 2:-2] = ckpt[s0:s1, j - 1, 0]
                        seg[0][..., 2:-2, 2:-2] = ckpt[s0:s1, j - 1, 1]
                    for i in range(t_end - t0):
                        fill_halo(seg[i + 1])
                        into(seg[i + 2], seg[i], seg[i + 1], t1, nt2, al, c2, c3)
                        seg[i + 2][..., 2 + sz, 2:-2] += src_rows[t0 + i]
                    # adjoint steps t_end-1 .. t0 on r = A q: seg[t - t0 + 1] holds p_{t-1} (halo
                    # filled by the recomputation), seg[t - t0] holds p_{t-2}
                    for t in range(t_end - 1, t0 - 1, -1):
                        fill_halo(r_cur)
                        step(r_prev, r_cur, t1, nt2, al, c2, c3)
                        r = r_prev  # r_t before its receiver term
                        if plan.contiguous:
                            r[:, :, 2 + rz, 2 + plan.rec[0]:2 + plan.rec[-1] + 1] += gch[:, :, t, :]
                        else:
                            r[:, :, 2 + rz, 2:-2].index_add_(-1, ridx, gch[:, :, t, :])
                        acc(gt1, gal, r, seg[t - t0 + 1], c2, c3)
                        if gn is not None:
                            _accumulate_t2(gn, r, seg[t - t0])
                        if need_amp and t < plan.src_steps:
                            r_src += wav[t] * r[:, shot_idx, 2 + sz, 2 + src_idx]
                        r_prev, r_cur = r_cur, r_prev
                # back from r = A q to q
                gt1.div_(al)
                gal.div_(al)
                if gn is not None:
                    gn.div_(al)
                g_amp[s0:s1] = r_src / al[:, 0, sz, src_idx]
        return (g_t1[:, 0] if need_t1 else None, -g_n[:, 0] if need_t2 else None,
                g_al[:, 0] if need_al else None, g_amp if need_amp else None, None)


class _NativeWave(torch.autograd.Function):
    """The native kernel's propagation (:mod:`.native`): (alpha_rows (B,h,Wp), amp (B,n_shots))
    -> seismic; ``kx``, ``kz`` (the sponge) and the wavelet are constants. The backward
    recomputes each checkpointed segment and runs the adjoint in the kernel."""

    @staticmethod
    def forward(ctx, alpha_rows, amp, kx, kz, wav, lay, k, flush):  # noqa: D401
        need = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        out, ckpt = native_forward(lay, alpha_rows, kx, kz, amp, wav, keep_every=k if need else 0,
                                   flush_denormal=flush)
        if need:
            ctx.save_for_backward(alpha_rows, amp, kx, kz, wav, ckpt)
            ctx.meta = (lay, k, flush)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        alpha_rows, amp, kx, kz, wav, ckpt = ctx.saved_tensors
        lay, k, flush = ctx.meta
        g_rows, g_amp = native_backward(lay, alpha_rows, kx, kz, amp, wav, grad_out, ckpt, k, flush_denormal=flush)
        return (g_rows if ctx.needs_input_grad[0] else None, g_amp if ctx.needs_input_grad[1] else None,
                None, None, None, None, None, None)


def _coefficients(vel: torch.Tensor, geom: Geometry) -> dict:
    """Scheme coefficients, differentiable w.r.t. ``vel`` (B,H,W); vmin of the sponge is a
    constant. Float32: exactly :func:`.stencil.scheme_coefficients` (the host's rounding);
    float64: the same formulas in float64 (the sponge profile from the float32 code)."""
    if vel.dtype == torch.float32:
        return scheme_coefficients(vel, geom)
    nbc = geom.nbc
    vp = torch.nn.functional.pad(vel[:, None], (nbc, nbc, nbc, nbc), mode="replicate")[:, 0]
    damp = damping_profile(vp.detach().float(), nbc, geom.dx).to(vel.dtype)
    alpha = (vp * geom.dt / geom.dx) ** 2
    kappa = damp * geom.dt
    return {"vp": vp, "alpha": alpha, "temp1": 2 + 2 * C1 * alpha - kappa, "temp2": 1 - kappa,
            "beta": (vp * geom.dt) ** 2}


def simulate_differentiable(vel: torch.Tensor, geom: Geometry, *, batch_chunk: int = 2,
                            checkpoint_every: Optional[int] = None, backend: str = "auto",
                            flush_denormal: bool = True) -> torch.Tensor:
    """Differentiable propagation (what :func:`simulate` runs for inputs that require grad).

    Args:
        vel: (B,H,W) float32 (or float64, for tests) velocity in m/s on the target device;
            already validated by :func:`simulate`.
        geom: the acquisition geometry.
        batch_chunk: maps propagated together (forward and backward).
        checkpoint_every: steps between wavefield checkpoints (default
            ``DEFAULT_CHECKPOINT_EVERY``).
        backend: ``"native"`` (the C++ kernel of :mod:`.native`, float32 on the CPU),
            ``"compile"``, ``"eager"`` or ``"auto"`` (the torch path, compiled for large jobs;
            :func:`simulate` resolves ``"auto"`` to ``"native"`` on the CPU first). Float64
            always runs the torch path eagerly.
        flush_denormal: flush denormals on CPU during the forward and the backward.

    Returns:
        (B, n_sources, nt, n_receivers) seismic with a ``grad_fn`` when ``vel`` requires grad.
    """
    if vel.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"simulate_differentiable: vel dtype must be float32 or float64, got {vel.dtype}")
    k = DEFAULT_CHECKPOINT_EVERY if checkpoint_every is None else int(checkpoint_every)
    if k < 1:
        raise ValueError(f"simulate: checkpoint_every must be >= 1, got {checkpoint_every}")
    b, h, w = vel.shape
    if backend == "native":
        if vel.dtype != torch.float32 or vel.device.type != "cpu":
            raise ValueError(f"simulate: backend='native' computes in float32 on the CPU, got {vel.dtype} "
                             f"on {vel.device}")
        co = compact_coefficients(vel, geom)
        wav = torch.from_numpy(ricker(geom.freq, geom.dt, geom.nt))
        return _NativeWave.apply(co["alpha_rows"], co["amp"], co["kx"], co["kz"], wav, layout(geom, h, w),
                                 min(k, geom.nt), flush_denormal)
    shot_steps = b * len(geom.source_columns) * geom.nt
    use_compile = backend == "compile" or (backend == "auto" and shot_steps >= AUTO_COMPILE_MIN_SHOT_STEPS)
    plan = _Plan(geom=geom, width=w, chunk=int(batch_chunk), k=min(k, geom.nt), compile=use_compile,
                 flush_denormal=flush_denormal)
    if backend == "compile" and vel.dtype == torch.float32 and _steps(plan, vel.dtype)[0] is _step_into:
        raise RuntimeError("simulate: backend='compile' requested but torch.compile failed here; "
                           "use backend='eager'")
    co = _coefficients(vel, geom)
    src = torch.tensor(plan.src, device=vel.device)
    amp = co["beta"][:, plan.sz, src]  # (B, n_shots)
    return _WaveFunction.apply(co["temp1"], co["temp2"], co["alpha"], amp, plan)
