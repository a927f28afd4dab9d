"""Short training runs of the zoo's members on synthetic data, per family, and one
residual-stage run on top of the backbone (``python -m tools.bench --sections zoo``).

Every member trains for the same wall-clock budget (time-mode schedule: ``epochs=0``)
on the same freshly simulated training set (the 10 family generators, exact simulator)
and is validated on a held-out simulated set; the table gives the best validation MAE
(m/s) per family. Then ``egnn`` trains for the same budget on the residual of the
backbone's best checkpoint (``backbone_checkpoint``: a ``residual_stage``). Budgets this
short rank the members' early learning speed, not what they reach after hours: read the
figures as such (and on a CPU, with a few samples, as a smoke test of the pipeline).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from fwi_core.physics import FAMILIES

MEMBERS = ("specproj_unet", "egnn", "heat_diffusion", "se3_transformer", "meshcnn")
BACKBONE = "specproj_unet"
STAGE_MEMBER = "egnn"


def _dataset(per_family: int, seed: int, device: str):
    from fwi_core.data import normalize_seismic, normalize_velocity
    from fwi_core.physics import generate, simulate

    from tools.bench_cuda import _Mem

    maps = np.concatenate([generate(f, per_family, seed=seed) for f in FAMILIES])
    fams = [f for f in FAMILIES for _ in range(per_family)]
    v = torch.from_numpy(maps).to(device)
    seis = simulate(v, device=device)
    return _Mem(normalize_seismic(seis).float().cpu(), normalize_velocity(v).float().cpu(), fams)


def _row(name: str, res: Dict, seconds: float) -> str:
    fam = res["val_mae_per_family"]
    cells = " | ".join(f"{fam[f]:.0f}" if f in fam else "-" for f in FAMILIES)
    return f"| {name} | {res['step']} | {seconds:.0f} | {cells} | {res['best_val_mae']:.1f} |"


def run(quick: bool = False, members: Sequence[str] = MEMBERS, budget: Optional[float] = None,
        per_family: Optional[int] = None, device: Optional[str] = None,
        model_kwargs: Optional[Dict[str, Dict]] = None) -> str:
    from fwi_core.train import train

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    per_family = per_family or (2 if quick else (48 if device == "cuda" else 4))
    budget = budget or (20.0 if quick else (60.0 if device == "cuda" else 120.0))
    model_kwargs = model_kwargs or {}
    t = time.perf_counter()
    train_ds, val_ds = _dataset(per_family, 0, device), _dataset(max(1, per_family // 4), 1, device)
    gen = time.perf_counter() - t
    head = "| model | steps | s | " + " | ".join(FAMILIES) + " | mean |"
    lines = [f"Device {device}; {len(train_ds)} training / {len(val_ds)} validation samples simulated "
             f"({per_family} per family, {gen:.0f} s); each run {budget:.0f} s (time-mode cosine, AdamW lr 1e-3, "
             f"batch 16, {'fp16' if device == 'cuda' else 'fp32'}); best validation MAE in m/s per family.", "",
             head, "|" + "---|" * (4 + len(FAMILIES))]
    common = {"epochs": 0, "time_budget": budget, "batch_size": min(16, len(train_ds)), "lr": 1e-3,
              "amp": "fp16" if device == "cuda" else "off", "device": device, "num_workers": 0, "folds": 0,
              "ema_decay": 0.99, "log_every": 10, "patience": 0}
    with tempfile.TemporaryDirectory() as tmp:
        results: Dict[str, Dict] = {}
        for name in members:
            start = time.perf_counter()
            try:
                res = train({**common, "out": str(Path(tmp) / name), "model": name,
                             "model_kwargs": model_kwargs.get(name, {})}, datasets=(train_ds, val_ds))
            except ImportError as exc:
                lines.append(f"| {name} | - | - | skipped: {exc} |")
                continue
            results[name] = res
            lines.append(_row(name, res, time.perf_counter() - start))
        if BACKBONE in results and STAGE_MEMBER in members:
            start = time.perf_counter()
            res = train({**common, "out": str(Path(tmp) / "stage"), "model": STAGE_MEMBER,
                         "model_kwargs": model_kwargs.get(STAGE_MEMBER, {}),
                         "backbone_checkpoint": results[BACKBONE]["best_checkpoint"]}, datasets=(train_ds, val_ds))
            lines.append(_row(f"{STAGE_MEMBER} on {BACKBONE}'s residual", res, time.perf_counter() - start))
    return "\n".join(lines)
