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
import statistics
import time

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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one timed batch, no warm-up")
    parser.add_argument("--pattern", default="*", help="shell pattern over model names")
    args = parser.parse_args(argv)
    print(run(quick=args.quick, pattern=args.pattern))


if __name__ == "__main__":
    main()
