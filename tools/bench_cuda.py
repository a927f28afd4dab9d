"""GPU benchmarks (``python -m tools.bench --sections cuda`` on a machine with CUDA).

Measures on the current CUDA device: the forward simulator (fast path, compiled and
eager) in samples/s, the differentiable simulator's forward + backward (adjoint) in
samples/s with its peak memory, a short training run of the engine (samples/s, fp16
autocast as on Kaggle's T4), test-time refinement (MAE before/after per family at a
fixed time per sample) and simulated-data throughput. Each part reports what it ran; a
part whose feature is missing says so. On a machine without CUDA the section says it
was skipped.
"""
from __future__ import annotations

import tempfile
import time
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch


def _sync():
    torch.cuda.synchronize()


def _timed(fn: Callable, repeat: int = 3) -> List[float]:
    out = []
    for _ in range(repeat):
        _sync()
        t = time.perf_counter()
        fn()
        _sync()
        out.append(time.perf_counter() - t)
    return out


def _maps(n: int, seed: int = 0) -> np.ndarray:
    from fwi_core.physics import FAMILIES, generate

    per = -(-n // len(FAMILIES))
    return np.concatenate([generate(f, per, seed=seed) for f in FAMILIES])[:n]


def bench_simulator(quick: bool = False) -> List[str]:
    from fwi_core.physics import simulate

    lines = ["### Simulator", "", "| what | batch | samples/s (best) | s per sample (best) | peak GPU memory |",
             "|---|---:|---:|---:|---:|"]
    nt = 200 if quick else 1000
    for backend, batch in (("compile", 64), ("compile", 8), ("eager", 64)):
        v = torch.from_numpy(_maps(batch)).cuda()
        simulate(v, backend=backend, nt=min(nt, 20))          # compile / warm up
        torch.cuda.reset_peak_memory_stats()
        ts = _timed(lambda: simulate(v, backend=backend, nt=nt), 2 if quick else 3)
        mem = torch.cuda.max_memory_allocated() / 2 ** 20
        lines.append(f"| forward, `backend='{backend}'`, nt={nt} | {batch} | {batch / min(ts):.1f} | "
                     f"{min(ts) / batch:.4f} | {mem:.0f} MiB |")
    for batch in (16, 64):
        v = torch.from_numpy(_maps(batch)).cuda().requires_grad_(True)
        obs = simulate(v.detach(), nt=nt)

        def grad():
            v.grad = None
            out = simulate(v, nt=nt)
            ((out - obs) ** 2).sum().backward()

        grad()
        torch.cuda.reset_peak_memory_stats()
        ts = _timed(grad, 2 if quick else 3)
        mem = torch.cuda.max_memory_allocated() / 2 ** 20
        lines.append(f"| forward + gradient (adjoint), nt={nt} | {batch} | {batch / min(ts):.1f} | "
                     f"{min(ts) / batch:.4f} | {mem:.0f} MiB ({mem / batch:.0f} MiB per sample) |")
    return lines


class _Mem(torch.utils.data.Dataset):
    def __init__(self, x, y, fam):
        self.x, self.y, self.fam = x, y, fam

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i], self.fam[i]

    def families(self):
        return list(self.fam)


def _synthetic_set(n: int, seed: int, device: str = "cuda"):
    """n (seismic_norm, velocity_norm, family) samples from the family generators, simulated on ``device``."""
    from fwi_core.data import normalize_seismic, normalize_velocity
    from fwi_core.physics import FAMILIES, generate, simulate

    per = -(-n // len(FAMILIES))
    maps, fams = [], []
    for f in FAMILIES:
        maps.append(generate(f, per, seed=seed))
        fams += [f] * per
    v = torch.from_numpy(np.concatenate(maps)[:n]).to(device)
    seis = simulate(v)
    return _Mem(normalize_seismic(seis).cpu(), normalize_velocity(v).cpu(), fams[:n])


def bench_training(quick: bool = False) -> List[str]:
    from fwi_core.train import train

    n = 64 if quick else 640
    t = time.perf_counter()
    train_ds, val_ds = _synthetic_set(n, 0), _synthetic_set(n // 8, 1)
    gen_s = time.perf_counter() - t
    lines = ["### Training engine", "", f"{n} training samples from the 10 family generators simulated on the GPU "
             f"in {gen_s:.1f} s ({n / gen_s:.0f} samples/s incl. generation); {len(val_ds)} validation samples.", "",
             "| model | amp | batch | epochs | samples/s (median epoch) | best val MAE (m/s) |", "|---|---|---:|---:|---:|---:|"]
    for model, kwargs, batch in (("specproj_unet", {}, 32), ("convnext_unet", {}, 32)):
        with tempfile.TemporaryDirectory() as tmp:
            epochs = 1 if quick else 4
            res = train({"out": tmp, "model": model, "model_kwargs": kwargs, "epochs": epochs, "batch_size": batch,
                         "amp": "fp16", "device": "cuda", "num_workers": 2, "time_budget": 0, "lr": 1e-3,
                         "folds": 0, "ema_decay": 0.99, "log_every": 10}, datasets=(train_ds, val_ds))
            times = [r["time"] for r in res["history"]]
            per_epoch = np.diff([0.0] + times)
            rate = n / float(np.median(per_epoch[1:] if len(per_epoch) > 1 else per_epoch))
            lines.append(f"| {model} | fp16 | {batch} | {epochs} | {rate:.0f} | {res['best_val_mae']:.1f} |")
    return lines


def bench_pde(quick: bool = False, device: str = "cuda") -> List[str]:
    """Seconds per training step of specproj_unet without and with the PDE-consistency
    term, at full cost and in an affordable setting (GPU: batch 16, fp16; CPU: batch 4)."""
    from fwi_core.train import train

    cuda = device == "cuda"
    batch = 16 if cuda else 4
    n = (32 if quick else 64) if cuda else 2 * batch
    train_ds = _synthetic_set(n, 2, device)
    lines = [f"### PDE-consistency term: cost per training step ({device}, specproj_unet, batch {batch})", "",
             "| setting | s per step | steps |", "|---|---:|---:|"]
    settings = (("no PDE term", {}),
                (f"pde_weight=1, {batch} samples, 5 shots, 1000 steps", {"pde_weight": 1.0}),
                ("pde_weight=1, 2 samples, shots 0 and 4, 500 steps",
                 {"pde_weight": 1.0, "pde_samples": 2, "pde_shots": (0, 4), "pde_time": 500}))
    for name, extra in settings:
        with tempfile.TemporaryDirectory() as tmp:
            res = train({"out": tmp, "model": "specproj_unet", "epochs": 2, "batch_size": batch,
                         "amp": "fp16" if cuda else "off", "device": device, "num_workers": 0, "time_budget": 0,
                         "folds": 0, "ema_decay": 0.0, "max_steps": (4 if quick else 8) if cuda else 3,
                         "log_every": 1, **extra}, datasets=(train_ds, None))
            lines.append(f"| {name} | {res['wall_time'] / max(1, res['step']):.3f} | {res['step']} |")
    lines += ["", "(wall time of the run divided by its steps: includes setup and the first steps, compiling ones "
              "included)"]
    return lines


def run_cpu_pde() -> str:
    """``make bench``'s CPU section for the PDE term."""
    return "\n".join(bench_pde(device="cpu"))


def run(quick: bool = False, parts: Optional[Sequence[str]] = None) -> str:
    if not torch.cuda.is_available():
        return "Skipped: no CUDA device on this machine."
    name = torch.cuda.get_device_name(0)
    parts = [f"Device: {name}, torch {torch.__version__}, CUDA {torch.version.cuda}.", ""]
    fns = {"simulator": bench_simulator, "training": bench_training, "pde": bench_pde}
    for fn in [fns[k] for k in (parts or fns)]:
        t = time.perf_counter()
        try:
            parts += fn(quick)
        except Exception as exc:  # noqa: BLE001 - report and go on with the other parts
            parts += [f"{fn.__name__} failed: {type(exc).__name__}: {exc}"]
        parts += ["", f"_{fn.__name__} took {time.perf_counter() - t:.0f} s_", ""]
        print("\n".join(parts), flush=True)   # partial results survive a time limit
    return "\n".join(parts)
