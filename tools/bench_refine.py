"""Test-time refinement benchmark: per family, MAE of a start model and after
``fwi_core.physics.refine`` at a fixed wall-clock time per sample, on a held-out synthetic
set (maps from ``fwi_core.physics.generate`` with a seed no training set uses, simulated
with the exact forward model).

The start is a checkpoint's prediction (``--checkpoint``) or, by default, a degraded truth:
the true map blurred by a 5x5 mean filter (replicate edges) and scaled by 1.01 (a +1%
velocity bias). The output says which start was used.

    python -m tools.bench_refine [--checkpoint PATH] [--per-family 2] [--seconds 60]   # ~20 min on CPU
    python -m tools.bench_refine --quick      # seconds: 2 families, nt=300, an 8 s budget per map
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

HELD_OUT_SEED = 90210  # the training tools use small seeds; this set is disjoint


def degrade(v: np.ndarray, size: int = 5, bias: float = 0.01) -> np.ndarray:
    """The default start: (N,1,H,W) maps blurred by a ``size`` x ``size`` mean filter
    (replicate padding) and multiplied by ``1 + bias``."""
    t = torch.from_numpy(np.asarray(v, dtype=np.float32))
    r = size // 2
    p = torch.nn.functional.pad(t, (r, r, r, r), mode="replicate")
    blurred = torch.nn.functional.avg_pool2d(p, size, stride=1)
    return (blurred * (1.0 + bias)).numpy()


def network_start(checkpoint: str, seismic: np.ndarray, device: torch.device) -> np.ndarray:
    """A checkpoint's prediction (m/s, (N,1,70,70)) for raw gathers (N,5,1000,70)."""
    from fwi_core.data import normalize_seismic
    from fwi_core.inference import predict_batch, to_velocity
    from fwi_core.models.checkpoint import load_model

    model = load_model(checkpoint, device=device).eval()
    x = normalize_seismic(torch.from_numpy(seismic)).to(device)
    out = [to_velocity(predict_batch(model, x[i:i + 8], flip_tta=True)).cpu() for i in range(0, len(x), 8)]
    return torch.cat(out).numpy()


def evaluate(families: Sequence[str], per_family: int, seconds_per_sample, *, max_iter: int = 10000,
             checkpoint: Optional[str] = None, device: Optional[str] = None, nt: int = 1000,
             batch_size: int = 8, refine_kwargs: Optional[dict] = None) -> Dict[str, dict]:
    """Refine a held-out synthetic set; per family: start and refined MAE (m/s), misfits,
    share of samples kept, seconds per sample.

    Samples are refined in batches of up to ``batch_size`` maps of one family; each batch
    gets ``seconds_per_sample`` (a number, or a ``{family: seconds}`` dict) x its size as
    its time budget.
    """
    from fwi_core.physics import generate, refine, simulate

    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = {}
    for fam in families:
        truth = generate(fam, per_family, seed=HELD_OUT_SEED)
        seis = simulate(torch.from_numpy(truth).to(dev), nt=nt).cpu().numpy()
        start = network_start(checkpoint, seis, dev) if checkpoint else degrade(truth)
        refined, infos, t_all = [], [], 0.0
        for i in range(0, per_family, batch_size):
            sl = slice(i, min(per_family, i + batch_size))
            n = sl.stop - sl.start
            t = time.perf_counter()
            r, info = refine(torch.from_numpy(start[sl]).to(dev), torch.from_numpy(seis[sl]).to(dev), family=fam,
                             time_budget=_seconds(seconds_per_sample, fam) * n, max_iter=max_iter, return_info=True,
                             **(refine_kwargs or {}))
            t_all += time.perf_counter() - t
            refined.append(r.cpu().numpy())
            infos += info
        refined = np.concatenate(refined)
        out[fam] = {
            "mae_start": float(np.abs(start - truth).mean()),
            "mae_refined": float(np.abs(refined - truth).mean()),
            "misfit_before": float(np.median([i["misfit_before"] for i in infos])),
            "misfit_after": float(np.median([i["misfit_after"] for i in infos])),
            "kept": float(np.mean([i["kept"] for i in infos])),
            "iterations": float(np.mean([i["iterations"] for i in infos])),
            "seconds_per_sample": t_all / per_family,
        }
    return out


def _seconds(spec, family: str) -> float:
    return float(spec[family]) if isinstance(spec, dict) else float(spec)


#: CPU time per sample of the default (``make bench``) run: the layered families, where the
#: public record's refinement gains most, get the time their 1-D profiles need to converge
LAYERED_SECONDS, OTHER_SECONDS = 600.0, 60.0


def table(res: Dict[str, dict]) -> List[str]:
    lines = ["| family | MAE start | MAE refined | misfit before (median) | misfit after (median) | kept | "
             "L-BFGS iterations | s per sample |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for fam, r in res.items():
        lines.append(f"| {fam} | {r['mae_start']:.2f} | {r['mae_refined']:.2f} | {r['misfit_before']:.2e} | "
                     f"{r['misfit_after']:.2e} | {r['kept']:.0%} | {r['iterations']:.0f} | {r['seconds_per_sample']:.1f} |")
    if len(res) > 1:
        lines.append(f"| mean | {np.mean([r['mae_start'] for r in res.values()]):.2f} | "
                     f"{np.mean([r['mae_refined'] for r in res.values()]):.2f} | | | | | |")
    return lines


def run(quick: bool = False, checkpoint: Optional[str] = None, device: Optional[str] = None,
        per_family: Optional[int] = None, seconds: Optional[float] = None) -> str:
    """Markdown body for ``tools.bench`` (section "refine")."""
    from fwi_core.physics import FAMILIES

    if quick:
        families, n, secs, nt = ["FlatVel_A", "Style_A"], per_family or 1, seconds or 8.0, 300
    else:
        families, n, nt = list(FAMILIES), per_family or 1, 1000
        secs = seconds or {f: LAYERED_SECONDS if f.startswith("FlatVel") else OTHER_SECONDS for f in families}
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t = time.perf_counter()
    res = evaluate(families, n, secs, checkpoint=checkpoint, device=str(dev), nt=nt,
                   refine_kwargs={"backend": "eager"} if quick else None)
    start = (f"the prediction of checkpoint `{checkpoint}` (flip TTA)" if checkpoint else
             "a degraded truth (5x5 mean blur, replicate edges, then x1.01: a +1% velocity bias), not a network")
    budget = (f"{secs:g} s" if not isinstance(secs, dict) else
              f"{LAYERED_SECONDS:g} s for FlatVel, {OTHER_SECONDS:g} s for the others")
    lines = [f"Held-out synthetic set: {n} map(s) per family from `fwi_core.physics.generate` "
             f"(seed {HELD_OUT_SEED}), simulated with the exact forward model (nt={nt}). Start: {start}. "
             f"Refinement: `refine(..., family=<true family>, time_budget=<{budget}> x maps per batch)` on "
             f"{dev.type.upper()} ({torch.get_num_threads()} threads); batches of flat layers use the two end "
             "shots. MAE in m/s over the 70x70 map.", ""]
    lines += table(res)
    lines += ["", f"_took {time.perf_counter() - t:.0f} s_"]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.bench_refine", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=None, help="start from this checkpoint's predictions")
    ap.add_argument("--per-family", type=int, default=None)
    ap.add_argument("--seconds", type=float, default=None, help="wall-clock budget per sample")
    ap.add_argument("--device", default=None)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    print(run(quick=a.quick, checkpoint=a.checkpoint, device=a.device, per_family=a.per_family, seconds=a.seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
