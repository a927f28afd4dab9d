"""Benchmark budgeted inference on CPU: throughput, memory against the number of test
files, and the projected time for Kaggle's 65,818 test files.

    python -m tools.bench_inference            # full: 96 files for throughput, 250 / 1000 files for memory
    python -m tools.bench_inference --quick    # seconds: 4 files, 8 / 24 files

Throughput: ``fwi_core.inference_plan`` with one member (``inversionnet_small``, random weights) over
random test files: the first pass (read, normalise, predict, store, write the CSV) and
the flip stage, in files per second; the CSV write alone. Memory: the highest resident memory
(``/proc/self/statm``, sampled every 5 ms) of a fresh process while it runs the first pass
of a narrow InversionNet over N files, at two or more N; the test folder holds a few distinct files and symbolic
links to them (the planner reads each link like a file). Returns a markdown report.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
KAGGLE_TEST_FILES = 65_818

_RSS_CHILD = r"""
import json, os, sys, threading, time
sys.path.insert(0, {root!r})
import torch
from fwi_core.ensemble import Ensemble, Member
from fwi_core.models import create_model
from fwi_core.inference_plan import Deadline, TestFileSource, run_budgeted

PAGE = os.sysconf("SC_PAGE_SIZE")
def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2 ** 20
torch.manual_seed(0)
ens = Ensemble([Member("m", create_model("inversionnet", width={width}))])
before = rss_mb()
peak = [before]
done = threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], rss_mb())
        time.sleep(0.005)
th = threading.Thread(target=sample, daemon=True)
th.start()
t = time.perf_counter()
s = run_budgeted(ens, TestFileSource({data!r}), {out!r}, deadline=Deadline(None), stages=["members"],
                 batch_size={batch}, device="cpu", progress=False, log=None)
seconds = time.perf_counter() - t
done.set()
th.join()
print(json.dumps({{"files": s.files, "seconds": seconds, "rss_before_mb": before,
                  "peak_rss_mb": max(peak[0], rss_mb())}}))
"""


def make_test_folder(root: Path, n: int, distinct: int = 8, seed: int = 0) -> Path:
    """``root/test/<oid>.npy``: ``distinct`` random files and links to them up to ``n``."""
    test = root / "test"
    test.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    originals = []
    for i in range(min(distinct, n)):
        p = test / f"{i:010x}.npy"
        np.save(p, (rng.standard_normal((5, 1000, 70)) * 3).astype(np.float32))
        originals.append(p)
    for i in range(len(originals), n):
        os.symlink(originals[i % len(originals)].name, test / f"{i:010x}.npy")
    return root


def _rss(n: int, width: float, batch: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        data = make_test_folder(Path(tmp) / "data", n)
        code = _RSS_CHILD.format(root=str(ROOT), width=width, data=str(data), out=str(Path(tmp) / "sub.csv"),
                                 batch=batch)
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={**os.environ, "FWI_PROGRESS": "0"})
        if r.returncode != 0:
            raise RuntimeError(f"memory run on {n} files failed:\n{r.stderr[-2000:]}")
        return json.loads(r.stdout.strip().splitlines()[-1])


def _throughput(n: int, model: str, batch: int) -> dict:
    import torch

    from fwi_core.ensemble import Ensemble, Member
    from fwi_core.models import create_model
    from fwi_core.inference_plan import Deadline, TestFileSource, run_budgeted, write_submission_csv

    torch.manual_seed(0)
    ens = Ensemble([Member("m", create_model(model))])
    with tempfile.TemporaryDirectory() as tmp:
        data = make_test_folder(Path(tmp) / "data", n)
        s = run_budgeted(ens, TestFileSource(data), Path(tmp) / "sub.csv", deadline=Deadline(None),
                         stages=["members", "flip"], batch_size=batch, device="cpu", progress=False, log=None)
        rates = {st["name"]: st["files_per_s"] for st in s.stages}
        maps = np.full((n, 70, 70), 3000.0, np.float32)
        oids = [f"{i:010x}" for i in range(n)]
        t = time.perf_counter()
        write_submission_csv(Path(tmp) / "csv.csv", oids, lambda a, b: maps[a:b])
        csv_rate = n / (time.perf_counter() - t)
    return {"first": rates["member:m"], "flip": rates["flip"], "csv": csv_rate, "elapsed": s.elapsed_s}


def run(quick: bool = False) -> str:
    """The markdown body of the "Inference" section of BENCHMARKS.md."""
    import torch

    n_tp, sizes, model, batch = (4, [8, 24], "inversionnet_small", 4) if quick else \
        (96, [250, 1000], "inversionnet_small", 16)
    tp = _throughput(n_tp, model, batch)
    mem = [_rss(n, 0.0625, batch) for n in sizes]
    first_s = KAGGLE_TEST_FILES / tp["first"]
    csv_s = KAGGLE_TEST_FILES / tp["csv"]
    lines = [
        f"CPU, {torch.get_num_threads()} threads, batch {batch}, `{model}` with random weights, one member, "
        f"{n_tp} test files (`tools/bench_inference.py`{' --quick' if quick else ''}).",
        "",
        "| stage | files/s | projected for 65,818 files |",
        "|---|---:|---:|",
        f"| first pass (read, normalise, predict, store) | {tp['first']:.1f} | {first_s / 3600:.2f} h |",
        f"| flip TTA (one member) | {tp['flip']:.1f} | {KAGGLE_TEST_FILES / tp['flip'] / 3600:.2f} h |",
        f"| writing submission.csv (vectorised formatting) | {tp['csv']:.0f} | {csv_s:.0f} s per write |",
        "",
        f"A complete first submission on Kaggle's {KAGGLE_TEST_FILES:,} test files with this model on this CPU: "
        f"about {(first_s + csv_s) / 3600:.2f} h; the planner rewrites the CSV after each later stage "
        f"({csv_s:.0f} s each). Each stored map takes {70 * 70 * 4 / 1000:.1f} KB per file in float32 "
        f"({70 * 70 * 4 * KAGGLE_TEST_FILES / 1e9:.2f} GB per array for the full test set).",
        "",
        "Highest resident memory (sampled every 5 ms) of a fresh process while it runs the first pass "
        "(narrow InversionNet, `width=0.0625`) against the number of test files:",
        "",
        "| test files | peak RSS during the run (MB) | RSS before the run (MB) | seconds |",
        "|---:|---:|---:|---:|",
    ]
    lines += [f"| {m['files']} | {m['peak_rss_mb']:.0f} | {m['rss_before_mb']:.0f} | {m['seconds']:.1f} |" for m in mem]
    growth = mem[-1]["peak_rss_mb"] - mem[0]["peak_rss_mb"]
    lines += ["", f"Peak at {mem[-1]['files']} files minus peak at {mem[0]['files']} files: {growth:+.0f} MB "
              "(per-file results live in memory-mapped files; one batch is resident at a time)."]
    return "\n".join(lines)


def main(argv: List[str] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.bench_inference", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    os.environ.setdefault("FWI_PROGRESS", "0")
    print(run(quick=a.quick))
    return 0


if __name__ == "__main__":
    sys.exit(main())
