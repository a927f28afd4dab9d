"""Benchmark the registered models on CPU: parameters and forward time per sample.

    python -m tools.bench_models            # full: 1 warm-up + 3 timed batches per model
    python -m tools.bench_models --quick    # 1 timed batch, no warm-up

Each model is built at its default size, in eval mode, and timed under ``torch.no_grad``
on a batch of 4 random normalised gathers (4, 5, 1000, 70); the table reports the median
batch time divided by 4. Models whose optional dependency is missing (timm) are listed
with the reason instead of a time.
"""
from __future__ import annotations

import argparse
import re
import statistics
import time
from pathlib import Path
from typing import Dict, Tuple

import torch

from fwi_core.models import count_parameters, create_model, list_models

BATCH = 4


def _time_forward(model: torch.nn.Module, x: torch.Tensor, warmup: int, reps: int) -> float:
    """Median seconds per forward pass of ``model`` on ``x``."""
    with torch.no_grad():
        for _ in range(warmup):
            model(x)
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(quick: bool = False, pattern: str = "*") -> str:
    """Benchmark the models matching ``pattern``; returns a markdown table."""
    warmup, reps = (0, 1) if quick else (1, 3)
    x = torch.randn(BATCH, 5, 1000, 70, generator=torch.Generator().manual_seed(0)).clamp(-3, 3) / 3
    lines = [f"CPU forward, batch {BATCH}, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads, {'quick' if quick else f'median of {reps}'}",
             "",
             "| model | parameters | ms / sample |",
             "|---|---:|---:|"]
    for name in list_models(pattern):
        torch.manual_seed(0)
        try:
            model = create_model(name).eval()
        except ImportError as e:
            lines.append(f"| {name} | - | skipped: {e} |")
            continue
        seconds = _time_forward(model, x, warmup, reps)
        lines.append(f"| {name} | {count_parameters(model):,} | {seconds / BATCH * 1e3:.1f} |")
    return "\n".join(lines)


_BENCH_ROW = re.compile(r"^\| (\w+) \| ([\d,]+) \| ([\d.]+) \|$")
_README_ROW = re.compile(r"^\| `(\w+)` \| (.*) \| ([\d,]+) \| ([\d.]+)\*? \|$")


def parse_table(table: str) -> Dict[str, Tuple[str, str]]:
    """{model: (parameters, ms per sample)} from :func:`run`'s markdown table."""
    rows = {}
    for line in table.splitlines():
        m = _BENCH_ROW.match(line.strip())
        if m:
            rows[m.group(1)] = (m.group(2), m.group(3))
    return rows


def sync_readme(table: str, readme: Path) -> int:
    """Copy parameters and ms/sample of every benchmarked model into the README's model
    table (rows ``| `name` | what | parameters | ms |``), so the two never disagree;
    returns the number of rows updated. Written atomically."""
    from fwi_core.utils import atomic_write_text

    rows = parse_table(table)
    lines, n = readme.read_text().splitlines(keepends=True), 0
    for i, line in enumerate(lines):
        m = _README_ROW.match(line.rstrip("\n"))
        if m and m.group(1) in rows:
            params, ms = rows[m.group(1)]
            lines[i] = f"| `{m.group(1)}` | {m.group(2)} | {params} | {ms} |\n"
            n += 1
    atomic_write_text(readme, "".join(lines))
    return n


def run_and_sync(readme: Path = Path(__file__).resolve().parents[1] / "README.md") -> str:
    """``make bench``'s models section: the table, also copied into the README."""
    table = run()
    sync_readme(table, readme)
    return table


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one timed batch, no warm-up")
    parser.add_argument("--pattern", default="*", help="shell pattern over model names")
    args = parser.parse_args(argv)
    print(run(quick=args.quick, pattern=args.pattern))


if __name__ == "__main__":
    main()
