"""Benchmarks (``make bench``): writes BENCHMARKS.md with the figures, the command and
the machine. Sections: forward simulator, its peers (Devito, deepwave), models, training
engine, inference.

    python -m tools.bench [--sections physics models train] [--out BENCHMARKS.md]
"""
from __future__ import annotations

import argparse
import importlib
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} logical cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), Python {platform.python_version()}, {platform.system()}")


def _time(fn, repeat: int = 2) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


_GRAD_MEMORY_CHILD = """
import resource, sys
import numpy as np, torch
from fwi_core.physics import generate, simulate
nt, batch, backend = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
v = torch.from_numpy(np.concatenate([generate("CurveVel_B", batch, seed=0)]))
simulate(v, nt=nt, backend=backend)
vg = v.clone().requires_grad_(True)
simulate(vg, nt=10, backend=backend).square().sum().backward()
page_kb = resource.getpagesize() / 1024
base = int(open("/proc/self/statm").read().split()[1]) * page_kb  # resident now (kB)
simulate(vg, nt=nt, backend=backend).square().sum().backward()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024 / batch)
"""


def _gradient_peak_mb(nt: int, batch: int, backend: str) -> float:
    """Peak resident memory that forward + backward adds to a process that has already run
    the forward (and a short gradient), per sample (MB): ``ru_maxrss`` minus the resident
    size just before, in a fresh process (Linux)."""
    out = subprocess.run([sys.executable, "-c", _GRAD_MEMORY_CHILD, str(nt), str(batch), backend], cwd=ROOT,
                         capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return float(out.stdout.strip().splitlines()[-1])


def bench_physics(quick: bool = False) -> str:
    """Forward simulator and its gradient; ``quick`` runs short traces (nt=60) of one map,
    eagerly, for tests."""
    from fwi_core.physics import generate, simulate, simulate_host_style
    from fwi_core.physics.adjoint import DEFAULT_CHECKPOINT_EVERY, gradient_memory_bytes

    vel = np.concatenate([generate(f, 1, seed=0) for f in ("FlatVel_A", "CurveVel_B", "FlatFault_B", "CurveFault_A",
                                                          "Style_A", "Style_B", "FlatVel_B", "CurveVel_A")])
    nt, batch, fast = (60, 1, "eager") if quick else (1000, 8, "native")
    vel = vel[:batch]
    rows = []

    def timed(name, batch, fn, repeat):
        ts = [_time(fn, repeat=1) / batch for _ in range(repeat)]
        rows.append((name, batch, min(ts), float(np.median(ts)), repeat))
        return min(ts)

    def gradient(backend=fast):
        v = torch.from_numpy(vel).requires_grad_(True)
        simulate(v, nt=nt, backend=backend).square().sum().backward()

    if not quick:
        timed("host-style (`torch.roll`, 5 shots together)", 1, lambda: simulate_host_style(vel[:1], nt=nt), 2)
        timed("`simulate(backend='eager')`", batch, lambda: simulate(vel, nt=nt, backend="eager"), 2)
        simulate(vel[:2], backend="compile", nt=10)
        timed("`simulate(backend='compile')` (the torch path)", batch,
              lambda: simulate(vel, nt=nt, backend="compile"), 3)
        gradient("compile")  # compiles the backward's steps
        timed("forward + backward (adjoint), `backend='compile'`", batch, lambda: gradient("compile"), 2)
    t0 = time.perf_counter()
    simulate(vel[:2], backend=fast, nt=10)
    compile_s = time.perf_counter() - t0
    t_fwd = timed(f"`simulate(backend='{fast}')`", batch, lambda: simulate(vel, nt=nt, backend=fast), 1 if quick else 5)
    gradient()  # compiles the backward's steps
    t_grad = timed(f"forward + backward (adjoint), `backend='{fast}'`", batch, gradient, 1 if quick else 3)
    peak = _gradient_peak_mb(nt, batch, fast)
    expected = gradient_memory_bytes(nt, DEFAULT_CHECKPOINT_EVERY)["total"] / 1e6
    lines = [f"nt = {nt}.", "", "| propagator | batch | s per sample, best | s per sample, median | runs |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {name} | {b} | {lo:.3f} | {med:.3f} | {n} |" for name, b, lo, med, n in rows]
    lines.append(f"| peak memory of forward + backward (fresh process, max RSS over the resident size before) | {batch} | "
                 f"{peak:.0f} MB per sample | | 1 |")
    lines.append("")
    lines.append(f"Gradient (forward + backward) / forward: {t_grad / t_fwd:.1f}x (target: at most about 3x). "
                 f"Checkpoints every {DEFAULT_CHECKPOINT_EVERY} steps; the torch path allocates "
                 f"{expected:.0f} MB per sample at nt={nt} (`gradient_memory_bytes`), the native path the same "
                 "checkpoints plus one segment per worker thread.")
    lines.append(f"First use of the `{fast}` path in this process (a build of the native kernel is cached on disk): "
                 f"{compile_s:.1f} s. Target: at most 0.2 s per sample for a batch of 8 on 2 cores; "
                 "the section \"Simulator against its peers\" compares with Devito and deepwave.")
    return "\n".join(lines)


def _section(module: str) -> str:
    mod = importlib.import_module(module)
    return mod.run()


SECTIONS = {
    "physics": ("Forward simulator", bench_physics),
    "peers": ("Simulator against its peers (Devito, deepwave)", lambda: _section("tools.bench_peers")),
    "models": ("Models (CPU forward time)", lambda: importlib.import_module("tools.bench_models").run_and_sync()),
    "train": ("Training engine overhead", lambda: _section("tools.bench_train")),
    "simdata": ("Simulated data (SimulatedDataset throughput)", lambda: _section("tools.bench_simdata")),
    "inference": ("Inference (time-budgeted, CPU)", lambda: _section("tools.bench_inference")),
    "refine": ("Test-time refinement (FWI)", lambda: _section("tools.bench_refine")),
    "pde": ("PDE-consistency term (CPU)", lambda: importlib.import_module("tools.bench_cuda").run_cpu_pde()),
}
#: Sections that run only when named (``--sections cuda`` on a GPU machine): ``make bench``
#: on a CPU machine keeps their last text instead of overwriting it with "skipped".
EXTRA_SECTIONS = {
    "cuda": ("GPU (CUDA)", lambda: _section("tools.bench_cuda")),
    "zoo": ("Zoo: short training runs per member", lambda: _section("tools.bench_zoo")),
}


def _split_sections(text: str) -> "dict":
    """``## Title`` -> that section's text (up to the next ``## `` heading)."""
    out, title, buf = {}, None, []
    for line in text.splitlines(keepends=True):
        if line.startswith("## "):
            if title is not None:
                out[title] = "".join(buf)
            title, buf = line[3:].strip(), [line]
        elif title is not None:
            buf.append(line)
    if title is not None:
        out[title] = "".join(buf)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--sections", nargs="*", default=list(SECTIONS), choices=list(SECTIONS) + list(EXTRA_SECTIONS))
    ap.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    a = ap.parse_args(argv)
    os.environ.setdefault("FWI_PROGRESS", "0")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = ""
    cmd = "make bench" if a.sections == list(SECTIONS) else \
        f"python -m tools.bench --sections {' '.join(a.sections)}"
    stamp = (f"`{cmd}`, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"
             f"{f', commit {commit}' if commit else ''}; {machine()}")
    # sections not run this time keep their previous text (each names its own command and machine)
    previous = _split_sections(a.out.read_text()) if a.out.is_file() else {}
    fresh = {}
    for key in a.sections:
        title, fn = {**SECTIONS, **EXTRA_SECTIONS}[key]
        print(f"== {title}", flush=True)
        t = time.perf_counter()
        body = fn()
        print(body, flush=True)
        fresh[title] = (f"## {title}\n\n_Measured by {stamp}. Section took "
                        f"{time.perf_counter() - t:.0f} s._\n\n{body}\n\n")
    order = [title for title, _ in list(SECTIONS.values()) + list(EXTRA_SECTIONS.values())]
    parts = [fresh.get(t) or previous.get(t) for t in order]
    parts += [text for t, text in previous.items() if t not in order and t not in fresh]
    head = ("# Benchmarks\n\nWritten by `make bench` (all sections) or `python -m tools.bench --sections ...` "
            "(those sections; the others keep their text). Each section names the command, date, commit and "
            "machine that produced it. Timings on the shared 2-core VM drift by 25% or more between runs: "
            "compare figures within one section, not across sections.\n\n")
    from fwi_core.utils import atomic_write_text
    atomic_write_text(a.out, head + "".join(p for p in parts if p))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
