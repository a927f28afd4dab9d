"""One GPU session's measurements for BENCHMARKS.md (run on a machine with CUDA):

    python -m tools.gpu_session OUT.md

PDE term cost, refinement per family, the zoo's short runs and simulated-data throughput,
each written to OUT.md as soon as it is done (a time limit keeps what finished).
"""
from __future__ import annotations

import sys
import time
import traceback
from pathlib import Path


def main(out: str) -> int:
    import torch

    from tools import bench_cuda, bench_refine, bench_simdata, bench_zoo

    path = Path(out)
    dev = torch.cuda.get_device_name(0)
    parts = [("PDE-consistency cost (GPU)", lambda: bench_cuda.run(parts=["pde"])),
             ("Refinement per family (GPU)", lambda: bench_refine.run(per_family=4, seconds=5.0)),
             ("Zoo: short training runs per member (GPU)", lambda: bench_zoo.run(budget=25.0, per_family=32)),
             ("Simulated data throughput (GPU)", lambda: bench_simdata.run())]
    text = f"# GPU session on {dev}, torch {torch.__version__}\n\n"
    for title, fn in parts:
        t = time.perf_counter()
        try:
            body = fn()
        except Exception:  # noqa: BLE001
            body = "failed:\n```\n" + traceback.format_exc()[-3000:] + "\n```"
        text += f"## {title}\n\n{body}\n\n_took {time.perf_counter() - t:.0f} s_\n\n"
        path.write_text(text)
        print(f"== {title}\n{body}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
