"""Benchmark :class:`fwi_core.physics.simulated.SimulatedDataset`: samples per second of an epoch block.

    python -m tools.bench_simdata            # CPU (and CUDA when available), nt = 1000
    python -m tools.bench_simdata --quick    # tiny: 4 samples, nt = 50, eager (for tests)

A block is what ``set_epoch`` makes: draw the maps from the family generators, apply the
default map augmentations, simulate them (``sim_batch`` maps per ``simulate`` call) and
store the seismic as float16. The first block of each run is a warm-up (it includes the
one-off ``torch.compile``) and is left out. Also measured: the share of the block spent
drawing and augmenting maps, reading a cached block back (``cache_dir``), and reading
items (normalisation included) from a block.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from typing import List, Tuple

import torch

from fwi_core.physics.simulated import SimulatedDataset


def _measure(device: str, n: int, nt: int, sim_batch: int, backend: str, blocks: int) -> Tuple[str, ...]:
    kw = dict(nt=nt, device=device, sim_batch=sim_batch, backend=backend, progress=False, seed=0)
    warm = SimulatedDataset(min(n, sim_batch), **kw)
    warm.set_epoch(0)
    ds = SimulatedDataset(n, **kw)
    times = []
    for epoch in range(blocks):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        ds.set_epoch(epoch)
        times.append(ds.last_block["seconds"])
    t = time.perf_counter()
    for i in range(n):
        ds.make_map(0, i)
    maps_s = time.perf_counter() - t
    t = time.perf_counter()
    for i in range(n):
        ds[i]
    items_s = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        cached = SimulatedDataset(n, cache_dir=tmp, **kw)
        cached.set_epoch(0)
        again = SimulatedDataset(n, cache_dir=tmp, **kw)
        again.set_epoch(0)
        read_s = again.last_block["seconds"]
        assert again.last_block["from_cache"]
    best = min(times)
    return (device, str(n), str(sim_batch), str(nt), backend, f"{best:.2f}", f"{n / best:.2f}",
            f"{100 * maps_s / best:.1f}%", f"{n / max(read_s, 1e-9):,.0f}", f"{n / items_s:,.0f}")


def run(quick: bool = False) -> str:
    """Markdown report; ``quick``: 4 samples at nt=50, eager, one timed block (CPU only)."""
    rows: List[Tuple[str, ...]] = []
    if quick:
        rows.append(_measure("cpu", 4, 50, 2, "eager", 1))
    else:
        rows.append(_measure("cpu", 16, 1000, 8, "compile", 2))
        if torch.cuda.is_available():
            rows.append(_measure("cuda", 2048, 1000, 256, "compile", 2))
    head = ("| device | samples per block | sim batch | nt | backend | block s (best) | samples/s | "
            "maps + augmentation share | cached block read, samples/s | item reads/s |")
    lines = [f"SimulatedDataset block throughput (torch {torch.__version__}, {torch.get_num_threads()} CPU threads; "
             "default augmentations, float16 storage; best of the timed blocks after a warm-up block).", "",
             head, "|" + "---|" * 2 + "---:|" * 8]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.bench_simdata", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    print(run(quick=ap.parse_args().quick))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
