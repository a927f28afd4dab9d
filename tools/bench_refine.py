"""Test-time refinement benchmark: per family, MAE of a start model and after
``fwi_core.physics.refine`` at a stated wall-clock time per map, on a held-out synthetic
set (maps from ``fwi_core.physics.generate`` with a seed no training set uses, simulated
with the exact forward model).

Starts (``--start``):

- ``network`` (default): the held-out truth with *structured* errors of the kind a good
  network makes, scaled per map until its MAE equals the public CAFormer's cross-validated
  MAE for its family (``NETWORK_MAE``, FACTS section 7). See :func:`structured_error`:
  interfaces blurred (Gaussian, sigma ``0.5 s`` cells), boundaries shifted (a smooth
  vertical displacement of up to ``0.7 s`` cells that varies along x and with depth), and a
  smooth low-frequency bias (a multiplicative field ``1 + 0.004 s g`` with ``g`` a
  Gaussian field of unit deviation and a correlation length of ~17 cells), ``s`` the
  severity that the calibration finds.
- ``blur``: the old degraded truth (5x5 mean filter, replicate edges, x1.01).
- ``--checkpoint PATH``: a trained network's prediction (flip TTA).

All families go through one ``refine`` call per batch of ``--batch`` maps (mixed
families: the planner's case), each sample with its true family name, and the batch's
time budget is ``--seconds`` times its maps.

    python -m tools.bench_refine [--per-family 1] [--seconds 60] [--start network|blur]   # ~10 min per map-minute
    python -m tools.bench_refine --quick      # seconds: 2 families, nt=300, 12 s per map
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

HELD_OUT_SEED = 90210  # the training tools use small seeds; this set is disjoint
#: the public CAFormer's cross-validated MAE per family (m/s; FACTS section 7): the starts' error
NETWORK_MAE: Dict[str, float] = {"FlatVel_A": 1.3, "FlatVel_B": 7.2, "CurveVel_A": 9.2, "CurveVel_B": 38.6,
                                 "FlatFault_A": 2.6, "FlatFault_B": 24.3, "CurveFault_A": 4.0,
                                 "CurveFault_B": 71.1, "Style_A": 34.3, "Style_B": 48.9}
#: the 2nd place's local validation, CAFormer -> refined (m/s; FACTS section 7)
SECOND_PLACE: Dict[str, tuple] = {"FlatVel_A": (1.17, 0.04), "FlatVel_B": (4.85, 0.01), "CurveVel_A": (8.8, 4.3),
                                  "CurveVel_B": (26.6, 5.5), "FlatFault_B": (27.2, 7.7),
                                  "CurveFault_B": (74.6, 19.8), "Style_A": (37.0, 5.2), "Style_B": (47.6, 31.8)}
KAGGLE_TEST_MAPS = 65_818
SESSION_S = 9 * 3600.0
#: forward + gradient samples/s on one H100 at batch 64, nt=1000 (BENCHMARKS.md, section
#: "GPU (CUDA)", measured 2026-11-23 with tools.bench --sections cuda); the T4 is unmeasured
H100_GRADIENT_RATE = 59.3


def degrade(v: np.ndarray, size: int = 5, bias: float = 0.01) -> np.ndarray:
    """The ``blur`` start: (N,1,H,W) maps blurred by a ``size`` x ``size`` mean filter
    (replicate padding) and multiplied by ``1 + bias``."""
    t = torch.from_numpy(np.asarray(v, dtype=np.float32))
    r = size // 2
    p = torch.nn.functional.pad(t, (r, r, r, r), mode="replicate")
    blurred = torch.nn.functional.avg_pool2d(p, size, stride=1)
    return (blurred * (1.0 + bias)).numpy()


def _gauss(t: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N,H,W) float64 (replicate edges), kernel normalised to 1."""
    if sigma <= 1e-3:
        return t
    r = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-r, r + 1, dtype=t.dtype)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    y = torch.nn.functional.pad(t[:, None], (r, r, r, r), mode="replicate")
    y = torch.nn.functional.conv2d(y, k.view(1, 1, 1, -1))
    return torch.nn.functional.conv2d(y, k.view(1, 1, -1, 1))[:, 0]


def error_fields(n: int, h: int, w: int, seed: int) -> Dict[str, torch.Tensor]:
    """The random parts of :func:`structured_error` for ``n`` maps: a vertical
    displacement field (unit peak) and a low-frequency field (unit deviation), both smooth."""
    g = torch.Generator().manual_seed(int(seed))
    shift = _gauss(torch.randn(n, h, w, generator=g, dtype=torch.float64), 12.0)
    shift = shift / shift.flatten(1).abs().amax(1).clamp_min(1e-12)[:, None, None]
    low = _gauss(torch.randn(n, h, w, generator=g, dtype=torch.float64), 12.0)
    low = (low - low.mean((1, 2), keepdim=True)) / low.flatten(1).std(1).clamp_min(1e-12)[:, None, None]
    return {"shift": shift, "low": low}


def structured_error(truth: np.ndarray, severity: np.ndarray, fields: Dict[str, torch.Tensor]) -> np.ndarray:
    """(N,1,H,W) maps with network-like errors of the given ``severity`` (N,) per map:
    boundaries shifted vertically by ``0.7 s * shift`` cells (linear interpolation,
    replicate edges), then interfaces blurred by a Gaussian of sigma ``0.5 s`` cells, then
    a multiplicative low-frequency bias ``1 + 0.004 s * low``; clamped to 1500..4500."""
    v = torch.from_numpy(np.asarray(truth, np.float64)[:, 0])
    n, h, w = v.shape
    s = torch.as_tensor(np.asarray(severity, np.float64)).view(n, 1, 1)
    z = torch.arange(h, dtype=torch.float64).view(1, h, 1) - 0.7 * s * fields["shift"]
    z = z.clamp(0, h - 1)
    z0 = z.floor().long().clamp(0, h - 2)
    a = z - z0
    out = torch.gather(v, 1, z0) * (1 - a) + torch.gather(v, 1, z0 + 1) * a
    out = torch.stack([_gauss(out[i:i + 1], 0.5 * float(s[i]))[0] for i in range(n)])
    out = out * (1.0 + 0.004 * s * fields["low"])
    return out.clamp(1500.0, 4500.0)[:, None].numpy().astype(np.float32)


def network_like_start(truth: np.ndarray, target_mae: float, seed: int = HELD_OUT_SEED) -> np.ndarray:
    """Starts whose MAE equals ``target_mae`` per map (bisection on the severity of
    :func:`structured_error`, to 0.5%)."""
    n, _, h, w = truth.shape
    fields = error_fields(n, h, w, seed)
    lo, hi = np.zeros(n), np.full(n, 64.0)
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        mae = np.abs(structured_error(truth, mid, fields) - truth).mean(axis=(1, 2, 3))
        lo, hi = np.where(mae < target_mae, mid, lo), np.where(mae < target_mae, hi, mid)
    return structured_error(truth, 0.5 * (lo + hi), fields)


def network_start(checkpoint: str, seismic: np.ndarray, device: torch.device) -> np.ndarray:
    """A checkpoint's prediction (m/s, (N,1,70,70)) for raw gathers (N,5,1000,70)."""
    from fwi_core.data import normalize_seismic
    from fwi_core.inference import predict_batch, to_velocity
    from fwi_core.models.checkpoint import load_model

    model = load_model(checkpoint, device=device).eval()
    x = normalize_seismic(torch.from_numpy(seismic)).to(device)
    out = [to_velocity(predict_batch(model, x[i:i + 8], flip_tta=True)).cpu() for i in range(0, len(x), 8)]
    return torch.cat(out).numpy()


def held_out(families: Sequence[str], per_family: int, nt: int, device, start: str = "network",
             checkpoint: Optional[str] = None):
    """(truth, seismic, start, family names) of the held-out set, families interleaved
    (map k of every family, then map k+1) so that batches mix families."""
    from fwi_core.physics import generate, simulate

    truths, starts = [], []
    for fam in families:
        t = generate(fam, per_family, seed=HELD_OUT_SEED)
        truths.append(t)
        starts.append(network_like_start(t, NETWORK_MAE[fam]) if start == "network" else degrade(t))
    order = [(k, j) for k in range(per_family) for j in range(len(families))]
    truth = np.stack([truths[j][k] for k, j in order])
    start_maps = np.stack([starts[j][k] for k, j in order])
    names = [families[j] for _, j in order]
    seis = simulate(torch.from_numpy(truth).to(device), nt=nt).cpu().numpy()
    if checkpoint:
        start_maps = network_start(checkpoint, seis, device)
    return truth, seis, start_maps, names


def evaluate(families: Sequence[str], per_family: int, seconds_per_sample: float, *, max_iter: int = 10000,
             checkpoint: Optional[str] = None, device: Optional[str] = None, nt: int = 1000, batch_size: int = 10,
             start: str = "network", refine_kwargs: Optional[dict] = None) -> Dict[str, object]:
    """Refine the held-out set in mixed-family batches of up to ``batch_size`` maps, each
    batch with ``seconds_per_sample`` x its maps as its budget. Returns per-sample rows
    (family, MAE start/refined, misfits, kept, iterations, evaluations) and the totals."""
    from fwi_core.physics import refine

    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    truth, seis, start_maps, names = held_out(families, per_family, nt, dev, start, checkpoint)
    rows, t_all, evals = [], 0.0, 0
    for i in range(0, len(names), batch_size):
        sl = slice(i, min(len(names), i + batch_size))
        n = sl.stop - sl.start
        t = time.perf_counter()
        r, info = refine(torch.from_numpy(start_maps[sl]).to(dev), torch.from_numpy(seis[sl]).to(dev),
                         family=names[sl], time_budget=seconds_per_sample * n, max_iter=max_iter, return_info=True,
                         **(refine_kwargs or {}))
        t_all += time.perf_counter() - t
        r = r.cpu().numpy()
        for j, inf in enumerate(info):
            k = sl.start + j
            evals += inf["evaluations"]
            rows.append({"family": names[k], "mae_start": float(np.abs(start_maps[k] - truth[k]).mean()),
                         "mae_refined": float(np.abs(r[j] - truth[k]).mean()),
                         **{key: inf[key] for key in ("misfit_before", "misfit_after", "misfit_candidate", "kept",
                                                      "iterations", "evaluations", "restarts", "stopped")}})
    return {"rows": rows, "seconds": t_all, "maps": len(names), "sample_evaluations": evals}


def table(res: Dict[str, object]) -> List[str]:
    rows = res["rows"]
    fams = list(dict.fromkeys(r["family"] for r in rows))
    lines = ["| family | MAE start | MAE refined | refined / start | 2nd place (start -> refined) | misfit before "
             "(median) | misfit after (median) | kept | L-BFGS iterations | evaluations |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    for fam in fams:
        rs = [r for r in rows if r["family"] == fam]
        m0, m1 = np.mean([r["mae_start"] for r in rs]), np.mean([r["mae_refined"] for r in rs])
        ref = SECOND_PLACE.get(fam)
        lines.append(f"| {fam} | {m0:.2f} | {m1:.2f} | {m1 / m0:.2f} | "
                     f"{f'{ref[0]:g} -> {ref[1]:g}' if ref else ''} | "
                     f"{np.median([r['misfit_before'] for r in rs]):.2e} | "
                     f"{np.median([r['misfit_after'] for r in rs]):.2e} | "
                     f"{np.mean([r['kept'] for r in rs]):.0%} | {np.mean([r['iterations'] for r in rs]):.0f} | "
                     f"{np.mean([r['evaluations'] for r in rs]):.0f} |")
    if len(fams) > 1:
        m0, m1 = np.mean([r["mae_start"] for r in rows]), np.mean([r["mae_refined"] for r in rows])
        lines.append(f"| mean | {m0:.2f} | {m1:.2f} | {m1 / m0:.2f} | 23.3 -> 8.0 (their 10 families) | | | | | |")
    return lines


def acceptance_table(res: Dict[str, object]) -> List[str]:
    """Per sample: misfit after / before of the refined map against its MAE change, the
    evidence for ``accept_ratio`` (a map whose misfit fell but whose error rose shows here)."""
    lines = ["| family | misfit after / before | MAE start | MAE refined | kept |", "|---|---:|---:|---:|---|"]
    for r in res["rows"]:
        ratio = r["misfit_candidate"] / r["misfit_before"] if r["misfit_before"] > 0 else float("nan")
        lines.append(f"| {r['family']} | {ratio:.3g} | {r['mae_start']:.2f} | {r['mae_refined']:.2f} | "
                     f"{'yes' if r['kept'] else 'no'} |")
    return lines


def budget_lines(res: Dict[str, object], seconds: float) -> List[str]:
    """The seconds per map at which Kaggle's test set fits a 9-hour session, and what
    this run's seconds per map are worth there, from measured rates."""
    rate = res["sample_evaluations"] / max(res["seconds"], 1e-9)  # sample-evaluations per second, this CPU
    t4 = SESSION_S / KAGGLE_TEST_MAPS
    h100 = 8 * SESSION_S / KAGGLE_TEST_MAPS
    evals_per_map = res["sample_evaluations"] / res["maps"]
    cpu = (f"which this CPU does in {h100 * H100_GRADIENT_RATE / rate:.0f} s; so this run's {seconds:g} s per map "
           f"is worth {evals_per_map / H100_GRADIENT_RATE:.2f} H100-seconds per map") if rate > 0 else \
        "(no evaluation ran here to compare with)"
    return [f"Measured here: {rate:.2f} sample-evaluations (forward + gradient of one map) per second on this CPU, "
            f"{evals_per_map:.0f} per map at {seconds:g} s per map.",
            f"Kaggle's {KAGGLE_TEST_MAPS:,} test maps fit a 9-hour session at **{t4:.2f} s per map on one T4** "
            f"(all of the session; the network's own time comes off it) and at **{h100:.2f} s per map on each of 8 "
            f"H100s**. At the H100's measured {H100_GRADIENT_RATE:g} gradient samples/s (batch 64, BENCHMARKS.md "
            f"\"GPU (CUDA)\") that is {h100 * H100_GRADIENT_RATE:.0f} evaluations per map, {cpu}. The T4's gradient rate was not measured "
            "(no T4 here), so its evaluations per map are not stated."]


def run(quick: bool = False, checkpoint: Optional[str] = None, device: Optional[str] = None,
        per_family: Optional[int] = None, seconds: Optional[float] = None, start: str = "network",
        batch_size: int = 10, refine_kwargs: Optional[dict] = None) -> str:
    """Markdown body for ``tools.bench`` (section "refine")."""
    from fwi_core.physics import FAMILIES

    if quick:
        families, n, secs, nt = ["FlatVel_A", "Style_A"], per_family or 1, seconds or 12.0, 300
        kw = {"backend": "eager", **(refine_kwargs or {})}
    else:
        families, n, secs, nt, kw = list(FAMILIES), per_family or 1, seconds or 60.0, 1000, refine_kwargs
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t = time.perf_counter()
    res = evaluate(families, n, secs, checkpoint=checkpoint, device=str(dev), nt=nt, batch_size=batch_size,
                   start=start, refine_kwargs=kw)
    how = {"network": "network-quality: the truth with structured errors (boundaries shifted by a smooth vertical "
                      "displacement, interfaces blurred, a smooth multiplicative low-frequency bias; "
                      "`tools.bench_refine.structured_error`) scaled per map until its MAE equals the public "
                      "CAFormer's CV MAE for the family (FACTS 7)",
           "blur": "a degraded truth (5x5 mean blur, replicate edges, then x1.01), not a network"}[start]
    if checkpoint:
        how = f"the prediction of checkpoint `{checkpoint}` (flip TTA)"
    lines = [f"Held-out synthetic set: {n} map(s) per family from `fwi_core.physics.generate` "
             f"(seed {HELD_OUT_SEED}), simulated with the exact forward model (nt={nt}). Start: {how}. "
             f"Refinement: `refine(..., family=<true family per map>, time_budget={secs:g} s x maps)` in "
             f"mixed-family batches of up to {batch_size} maps{f', options {kw}' if kw else ''}, on "
             f"{dev.type.upper()} ({torch.get_num_threads()} threads): **{secs:g} s per map**. MAE in m/s over "
             "the 70x70 map.", ""]
    lines += table(res)
    lines += [""] + budget_lines(res, secs)
    lines += ["", "Per map (the evidence for the acceptance rule):", ""] + acceptance_table(res)
    lines += ["", f"_took {time.perf_counter() - t:.0f} s_"]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.bench_refine", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=None, help="start from this checkpoint's predictions")
    ap.add_argument("--start", choices=("network", "blur"), default="network")
    ap.add_argument("--per-family", type=int, default=None)
    ap.add_argument("--seconds", type=float, default=None, help="wall-clock budget per map")
    ap.add_argument("--batch", type=int, default=10, help="maps per refine call (families mixed)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    print(run(quick=a.quick, checkpoint=a.checkpoint, device=a.device, per_family=a.per_family, seconds=a.seconds,
              start=a.start, batch_size=a.batch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
