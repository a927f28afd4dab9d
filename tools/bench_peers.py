"""Our simulator against its peers, interleaved in one process (section "peers" of
``python -m tools.bench``; ``make bench-peers`` installs the peers and runs it).

    python -m tools.bench_peers [--batch 8] [--nt 1000] [--rounds 5] [--grad-rounds 3] [--threads 2]

Contenders, all on the competition's set-up (70 x 70 maps, dx 10 m, dt 1 ms, 15 Hz Ricker,
5 shots x 70 receivers at 10 m depth):

* ours: ``simulate(backend="native")`` (the default on the CPU) and the torch path
  ``simulate(backend="compile")``, both exact to the host's data (120-cell sponge,
  310 x 310 grid, periodic wrap);
* Devito (``pip install devito``): the same update written as a Devito operator,
  ``u.forward = (2 - kappa) u - (1 - kappa) u.backward + (v dt)^2 laplace(u)`` at space
  order 4 (the same stencil weights), the same sponge ``kappa``, one ``apply`` per shot, on
  the 120-cell pad (the same 310 x 310 grid) and on a 20-cell pad (110 x 110); Devito's
  boundary is not periodic;
* deepwave (``pip install deepwave``): ``deepwave.scalar`` at accuracy 4 with a PML of
  120 and of 20 cells, one call per batch (a batched model, one shot per row).

Forward: every contender runs the batch once per round, in an order rotated each round;
``ours / peer`` is the median over rounds of our time divided by the peer's in the same
round (below 1: ours is faster). Forward + gradient: ``(out * w).sum().backward()`` for the
differentiable contenders (Devito has no automatic adjoint). Each peer's traces are compared
with ours once (relative L2; deepwave's polarity is opposite and its traces one sample
late, so they are aligned first), which shows that the set-ups compute the same physics.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from fwi_core.physics import generate, simulate
from fwi_core.physics.stencil import DEFAULT_SOURCE_COLUMNS, damping_profile
from fwi_core.physics.wavelet import ricker
from fwi_core.utils import has_module, optional_import

FAMILIES8 = ("FlatVel_A", "CurveVel_B", "FlatFault_B", "CurveFault_A", "Style_A", "Style_B", "FlatVel_B", "CurveVel_A")
DT, DX, FREQ = 1e-3, 10.0, 15.0


def maps(batch: int) -> np.ndarray:
    """(batch, 70, 70) float32 maps, one per family in turn (seed 0)."""
    fams = [FAMILIES8[i % len(FAMILIES8)] for i in range(batch)]
    return np.concatenate([generate(f, 1, seed=i // len(FAMILIES8)) for i, f in enumerate(fams)])[:, 0]


class DevitoPeer:
    """The host's update as a Devito operator on a ``pad``-cell sponge (compiled once)."""

    def __init__(self, pad: int, nt: int, threads: int):
        dv = optional_import("devito", "the Devito peer of the simulator benchmark", "pip install devito")
        dv.configuration["log-level"] = "ERROR"
        dv.configuration["language"] = "openmp"
        self.pad, self.nt, self.threads = pad, nt, threads
        n = 70 + 2 * pad
        grid = dv.Grid(shape=(n, n), extent=((n - 1) * DX, (n - 1) * DX), dtype=np.float32)
        self.u = dv.TimeFunction(name="u", grid=grid, time_order=2, space_order=4)
        self.vp = dv.Function(name="vp", grid=grid, space_order=2)
        self.kap = dv.Function(name="kap", grid=grid, space_order=2)
        self.src = dv.SparseTimeFunction(name="src", grid=grid, npoint=1, nt=nt)
        self.rec = dv.SparseTimeFunction(name="rec", grid=grid, npoint=70, nt=nt)
        self.src.data[:, 0] = ricker(FREQ, DT, nt)
        self.rec.coordinates.data[:] = [((pad + 1) * DX, (pad + j) * DX) for j in range(70)]
        u, vp, kap = self.u, self.vp, self.kap
        eq = dv.Eq(u.forward, (2 - kap) * u - (1 - kap) * u.backward + (vp * DT) ** 2 * u.laplace)
        inject = self.src.inject(field=u.forward, expr=self.src * (vp * DT) ** 2)
        record = self.rec.interpolate(expr=u.forward)
        self.op = dv.Operator([eq] + inject + record)

    def __call__(self, vel: np.ndarray) -> np.ndarray:
        out = np.empty((len(vel), len(DEFAULT_SOURCE_COLUMNS), self.nt, 70), np.float32)
        p = self.pad
        for b, v in enumerate(vel):
            vpad = np.pad(v, p, mode="edge").astype(np.float32)
            self.vp.data[:] = vpad
            self.kap.data[:] = damping_profile(torch.from_numpy(vpad)[None], p, DX)[0].numpy() * np.float32(DT)
            for s, col in enumerate(DEFAULT_SOURCE_COLUMNS):
                self.u.data[:] = 0.0
                self.src.coordinates.data[:] = [((p + 1) * DX, (p + col) * DX)]
                self.op.apply(time_m=0, time_M=self.nt - 1, nthreads=self.threads)
                out[b, s] = self.rec.data
        return out


class DeepwavePeer:
    """``deepwave.scalar`` (accuracy 4, a ``pml``-cell PML), one batched call per batch."""

    def __init__(self, pml: int, nt: int, checkpoint_segments: Optional[int] = None):
        self.dw = optional_import("deepwave", "the deepwave peer of the simulator benchmark", "pip install deepwave")
        self.pml, self.nt, self.segments = pml, nt, checkpoint_segments
        self.wav = torch.from_numpy(ricker(FREQ, DT, nt))

    def __call__(self, vel: torch.Tensor) -> torch.Tensor:
        """(B,70,70) -> (B, 5, nt, 70), differentiable."""
        b, ns = vel.shape[0], len(DEFAULT_SOURCE_COLUMNS)
        v = vel.repeat_interleave(ns, 0)  # one model per shot
        src_loc = torch.tensor([[[1, c]] for c in DEFAULT_SOURCE_COLUMNS]).repeat(b, 1, 1)
        rec_loc = torch.tensor([[1, j] for j in range(70)])[None].repeat(b * ns, 1, 1)
        amp = self.wav[None, None].repeat(b * ns, 1, 1)
        out = self.dw.scalar(v, DX, DT, source_amplitudes=amp, source_locations=src_loc, receiver_locations=rec_loc,
                             accuracy=4, pml_width=self.pml, pml_freq=FREQ, checkpoint_segments=self.segments)
        return out.receiver_amplitudes.reshape(b, ns, 70, self.nt).transpose(2, 3)


def relative_l2(peer: np.ndarray, ours: np.ndarray, align: bool = False, upto: Optional[int] = None) -> float:
    """||peer - ours|| / ||ours|| over the first ``upto`` samples (all by default); ``align``:
    negate the peer and move it one sample earlier."""
    if align:
        peer, ours = -peer[:, :, 1:], ours[:, :, :-1]
    peer, ours = peer[:, :, :upto], ours[:, :, :upto]
    return float(np.linalg.norm(peer - ours) / np.linalg.norm(ours))


def agreement(peer: np.ndarray, ours: np.ndarray, align: bool = False) -> str:
    """Relative L2 over the first three quarters of the traces and over all of them: the
    last quarter is weak (3% of the energy) and carries what each boundary (our periodic
    wrap, Devito's zero edge, deepwave's PML) sends back, so it differs between all three."""
    nt = ours.shape[2]
    return f"{relative_l2(peer, ours, align, 3 * nt // 4):.1e} ({relative_l2(peer, ours, align):.1e})"


def summarize(times: Dict[str, List[float]], ours: str) -> Dict[str, tuple]:
    """Per contender: (median s per call, median over rounds of ours/that, rounds)."""
    out = {}
    for name, ts in times.items():
        ratios = [a / b for a, b in zip(times[ours], ts)]
        out[name] = (float(np.median(ts)), float(np.median(ratios)), len(ts))
    return out


def _interleaved(contenders: Dict[str, Callable[[], object]], rounds: int) -> Dict[str, List[float]]:
    names = list(contenders)
    times: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            t = time.perf_counter()
            contenders[n]()
            times[n].append(time.perf_counter() - t)
    return times


def run(batch: int = 8, nt: int = 1000, rounds: int = 5, grad_rounds: int = 3, threads: int = 2,
        pads=(120, 20)) -> str:
    torch.set_num_threads(threads)
    vel = maps(batch)
    vt = torch.from_numpy(vel)
    weights = torch.randn(batch, 5, nt, 70, generator=torch.Generator().manual_seed(0))
    have_devito, have_deepwave = has_module("devito"), has_module("deepwave")
    ours_out = simulate(vel, nt=nt, backend="native")
    simulate(vel[:1], nt=10, backend="compile")  # compiles the torch path's step
    fwd: Dict[str, Callable[[], object]] = {
        "ours, `simulate` (native), 310x310, exact to the host": lambda: simulate(vel, nt=nt, backend="native"),
        "ours, torch path (`backend='compile'`), 310x310": lambda: simulate(vel, nt=nt, backend="compile")}
    agree: Dict[str, str] = {}
    if have_devito:
        for pad in pads:
            peer = DevitoPeer(pad, nt, threads)
            name = f"Devito {optional_import('devito', 'peers').__version__}, space order 4, {pad}-cell pad " \
                   f"({70 + 2 * pad}x{70 + 2 * pad})"
            agree[name] = agreement(peer(vel), ours_out) if pad == 120 else "(thinner sponge)"
            fwd[name] = (lambda p: lambda: p(vel))(peer)
    if have_deepwave:
        for pad in pads:
            peer = DeepwavePeer(pad, nt)
            name = f"deepwave {optional_import('deepwave', 'peers').__version__}, accuracy 4, PML {pad}"
            with torch.no_grad():
                out = peer(vt).numpy()
                agree[name] = agreement(out, ours_out, align=True) if pad == 120 else "(thinner PML)"
                fwd[name] = (lambda p: lambda: p(vt))(peer)
    # warm-up (Devito and deepwave compile at first use), then the rounds
    for fn in fwd.values():
        with torch.no_grad():
            fn()
    with torch.no_grad():
        f_times = _interleaved(fwd, rounds)
    ours_f = next(iter(fwd))
    fs = summarize(f_times, ours_f)

    def ours_grad(backend):
        def fn():
            v = vt.clone().requires_grad_(True)
            (simulate(v, nt=nt, backend=backend) * weights).sum().backward()
        return fn

    def dw_grad(peer):
        def fn():
            v = vt.clone().requires_grad_(True)
            (peer(v) * weights).sum().backward()
        return fn

    grad: Dict[str, Callable[[], object]] = {"ours, `simulate` (native), adjoint with checkpoints every 50 steps":
                                             ours_grad("native"),
                                             "ours, torch path (`backend='compile'`)": ours_grad("compile")}
    if have_deepwave:
        for pad in pads:
            seg = 10 if pad >= 60 else None  # the wavefield history of a 120-cell PML does not fit otherwise
            grad[f"deepwave, accuracy 4, PML {pad}" + (f" (checkpoint_segments={seg})" if seg else "")] = \
                dw_grad(DeepwavePeer(pad, nt, checkpoint_segments=seg))
    for fn in grad.values():
        fn()
    g_times = _interleaved(grad, grad_rounds)
    ours_g = next(iter(grad))
    gs = summarize(g_times, ours_g)
    ratio = float(np.median([g / f for g, f in zip(g_times[ours_g], f_times[ours_f])]))

    lines = [f"Batch {batch}, nt = {nt}, 5 shots x 70 receivers, {threads} threads (torch, Devito's OpenMP); "
             f"medians of {rounds} (forward) and {grad_rounds} (gradient) interleaved rounds; `ours / peer` is the "
             "median of the per-round ratios of our time to the peer's (below 1: ours is faster). Agreement: "
             "relative L2 of the peer's gathers against ours on the same maps over the first three quarters of "
             "the traces (over all of them in brackets: the weak last quarter carries what each boundary sends "
             "back).", "",
             "| propagator, forward | s per sample | ours / peer | agreement with ours |", "|---|---:|---:|---:|"]
    for name, (t, r, _) in fs.items():
        lines.append(f"| {name} | {t / batch:.3f} | {r:.2f} | {agree.get(name, '')} |")
    lines += ["", "| forward + gradient | s per sample | ours / peer |", "|---|---:|---:|"]
    for name, (t, r, _) in gs.items():
        lines.append(f"| {name} | {t / batch:.3f} | {r:.2f} |")
    lines += ["", f"Our gradient (forward + backward, native) / our forward (native), median of the per-round ratios: "
              f"{ratio:.2f}x (target: at most 3x)."]
    missing = [n for n, ok in (("devito", have_devito), ("deepwave", have_deepwave)) if not ok]
    if missing:
        lines.append(f"Not installed, so not measured: {', '.join(missing)} (`make bench-peers` installs them).")
    if os.path.exists("/proc/loadavg"):
        lines.append(f"Load average at the end (1, 5, 15 min): {' '.join(open('/proc/loadavg').read().split()[:3])}.")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.bench_peers", description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--nt", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--grad-rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    print(run(a.batch, a.nt, a.rounds, a.grad_rounds, a.threads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
