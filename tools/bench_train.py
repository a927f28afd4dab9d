"""Benchmark the training engine against a bare PyTorch loop (CPU or GPU).

    python -m tools.bench_train                 # InversionNet at 1/4 width, 48 samples, 3 epochs
    python -m tools.bench_train --width 0.5 --samples 128 --epochs 4 --batch-size 16 --rounds 3

Like for like: the same model and initial weights, in-memory data, batch, AdamW, AMP off,
no gradient clipping, constant learning rate, a seeded shuffle and one DataLoader per
epoch in both; the engine runs with EMA off and no validation set, so what it adds
is its own bookkeeping: the per-batch sampler and step logic, loss accumulation, the
progress bar, the time-budget and OOM guards, and an end-of-epoch checkpoint
(``ckpt-*.pt`` plus ``best.pt``, which the bare loop does not write).

Each loop runs ``rounds`` times in ABBA order so that drifts in the load of a shared machine
cancel; throughput is samples per second of the best and of the median epoch (the first
epoch of each run is warm-up and left out); "total" includes setup and the final curves.
Returns / prints a markdown report.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from fwi_core.models import create_model
from fwi_core.train import TrainConfig, train


class _Random(Dataset):
    """``n`` random normalised (seismic, velocity, family) samples, generated once."""

    def __init__(self, n: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = (torch.randn(n, 5, 1000, 70, generator=g) / 3).clamp(-1, 1)
        self.y = torch.rand(n, 1, 70, 70, generator=g) * 2 - 1

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i], "FlatVel_A"


def _bare(ds, model_kwargs, epochs, batch, lr, device, seed):
    """The reference: a plain loop. Returns (per-epoch seconds, total seconds)."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    model = create_model("inversionnet", **model_kwargs).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    times = []
    for epoch in range(epochs):
        t = time.perf_counter()
        loader = DataLoader(ds, batch_size=batch, shuffle=True, drop_last=True,
                            generator=torch.Generator().manual_seed(seed + epoch))
        for x, y, _ in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = torch.nn.functional.l1_loss(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return times, time.perf_counter() - start


def _engine(ds, model_kwargs, epochs, batch, lr, device, seed, out):
    start = time.perf_counter()
    cfg = TrainConfig(out=str(out), model="inversionnet", model_kwargs=model_kwargs, epochs=epochs,
                      batch_size=batch, lr=lr, amp="off", grad_clip=0.0, schedule="constant",
                      ema_decay=0.0, folds=0, num_workers=0, device=str(device), seed=seed,
                      time_budget=0, keep_last=1, patience=0)
    res = train(cfg, datasets=(ds, None))
    total = time.perf_counter() - start
    stamps = [0.0] + [r["time"] for r in res["history"]]
    return [b - a for a, b in zip(stamps, stamps[1:])], total


def run(width: float = 0.25, samples: int = 128, epochs: int = 3, batch_size: int = 8,
        device: str = "auto", rounds: int = 4) -> str:
    """Run the two loops ``rounds`` times each in ABBA order (bare, engine, engine, bare,
    ...: slow drifts in machine load cancel) and return the markdown report."""
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    ds = _Random(samples)
    kw = {"width": width}
    steps = samples // batch_size
    epoch_times = {"bare": [], "engine": []}
    totals = {"bare": [], "engine": []}
    order = [("bare", "engine") if r % 2 == 0 else ("engine", "bare") for r in range(rounds)]
    with tempfile.TemporaryDirectory() as tmp:
        for r, pair in enumerate(order):
            for name in pair:
                if name == "bare":
                    ep, total = _bare(ds, kw, epochs, batch_size, 1e-3, dev, 0)
                else:
                    ep, total = _engine(ds, kw, epochs, batch_size, 1e-3, dev, 0, Path(tmp) / f"run{r}")
                epoch_times[name] += ep[1:]          # the first epoch of a run is warm-up
                totals[name].append(total)
    per_epoch = steps * batch_size
    lines = [
        f"### Training engine overhead ({dev.type}, {torch.get_num_threads()} threads, torch {torch.__version__})",
        "",
        f"InversionNet width {width}, {samples} in-memory samples (5, 1000, 70), batch {batch_size}, "
        f"{epochs} epochs of {steps} steps per run, {rounds} runs of each loop in ABBA order, AdamW, "
        "AMP off; engine: EMA off, no validation, checkpoint (ckpt + best.pt) at each epoch end.",
        "",
        "| loop | samples/s (best epoch) | samples/s (median epoch) | best / median epoch s | mean total s |",
        "|---|---|---|---|---|",
    ]
    best, med = {}, {}
    for name, label in (("bare", "bare PyTorch loop"), ("engine", "fwi_core.train")):
        best[name], med[name] = min(epoch_times[name]), statistics.median(epoch_times[name])
        lines.append(f"| {label} | {per_epoch / best[name]:.2f} | {per_epoch / med[name]:.2f} | "
                     f"{best[name]:.3f} / {med[name]:.3f} | {statistics.mean(totals[name]):.2f} |")
    lines += ["", f"Engine overhead per epoch: {100 * (best['engine'] / best['bare'] - 1):+.1f}% on the best "
                  f"epochs, {100 * (med['engine'] / med['bare'] - 1):+.1f}% on the medians (target < 5%); "
                  f"per run in total (setup, checkpoints, curves): "
                  f"{100 * (statistics.mean(totals['engine']) / statistics.mean(totals['bare']) - 1):+.1f}%."]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.bench_train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--width", type=float, default=0.25, help="InversionNet width multiplier")
    ap.add_argument("--samples", type=int, default=48)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2, help="runs of each loop (ABBA order)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    print(run(args.width, args.samples, args.epochs, args.batch_size, args.device, args.rounds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
