"""Training recipes side by side at a fixed budget on a held-out synthetic set (BENCHMARKS.md, *Presets*).

    python -m tools.synth --out data/bench_presets --samples-per-family 32 --test-samples 100 --seed 7 --device cpu
    flock /tmp/fwi-heavy.lock python -m tools.bench_presets run base --seconds 300     # one candidate
    flock /tmp/fwi-heavy.lock python -m tools.bench_presets pseudo --from base --seconds 300
    flock /tmp/fwi-heavy.lock python -m tools.bench_presets distill --teachers inversionnet specproj --seconds 300
    python -m tools.bench_presets table                                                 # the markdown tables

Every candidate trains with :func:`fwi_core.train.train` on ``DATA/train_samples`` (all of it:
``folds=0``) for ``--seconds`` (time mode: the schedule spans the budget), from the ``cpu``
preset with the candidate's changes, then predicts ``DATA/test`` (never trained on) and is
scored against ``DATA/test_solution.npz``: MAE in m/s per family, for the raw and the EMA
weights of the same run (so EMA needs no run of its own). Results go to
``runs/bench_presets/<name>/result.json``.

``pseudo``: one round of test-time pseudo-labels with candidate ``--from``'s weights on the
held-out test gathers (their labels are never used), then the same candidate trained again
with ``--pseudo``. ``distill``: an equal-weight ensemble of the ``--teachers`` runs as the
teacher of a student (``--student``, default the ``base`` candidate's model) trained for the
same budget; both scored on the held-out set, with ms per sample.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from tools.bench import machine

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "bench_presets"
OUT = ROOT / "runs" / "bench_presets"

AUG = {"crop": 0.3, "warp": 0.3, "blend": 0.2}
#: name -> (what it changes, TrainConfig values over the cpu preset)
CANDIDATES: Dict[str, Dict[str, Any]] = {
    "base": {"model": "inversionnet_small"},
    "inversionnet": {"model": "inversionnet"},
    "specproj": {"model": "specproj_unet"},
    "convnext": {"model": "convnext_unet"},
    "no_flip": {"model": "inversionnet_small", "flip_prob": 0.0},
    "lr_1e-4": {"model": "inversionnet_small", "lr": 1e-4},
    "ema_0.99": {"model": "inversionnet_small", "ema_decay": 0.99},
    "amp_noise": {"model": "inversionnet_small", "scale_prob": 0.3, "noise_prob": 0.3},
    "sim25": {"model": "inversionnet_small", "sim_fraction": 0.25, "sim_kwargs": {"augment": AUG, "device": "cpu"}},
    "sim25_noaug": {"model": "inversionnet_small", "sim_fraction": 0.25, "sim_kwargs": {"augment": {}, "device": "cpu"}},
}
COMMON = {"preset": "cpu", "folds": 0, "epochs": 0, "batch_size": 16, "num_workers": 0, "device": "cpu",
          "seed": 0, "log_every": 25}


def held_out(data: Path):
    """Normalised test gathers (N, 5, 1000, 70), true maps (N, 70, 70) m/s and families."""
    from fwi_core.data import list_test, load_test_sample, normalize_seismic

    sol = np.load(data / "test_solution.npz", allow_pickle=False)
    truth = {str(o): (v.reshape(70, 70), str(f)) for o, v, f in zip(sol["oids"], sol["velocity"], sol["family"])}
    files = list_test(data)
    x = torch.from_numpy(np.stack([normalize_seismic(load_test_sample(p)) for _, p in files]))
    y = np.stack([truth[o][0] for o, _ in files]).astype(np.float32)
    fams = [truth[o][1] for o, _ in files]
    return x, y, fams


def score(predict, x, y, fams, batch: int = 16) -> Dict[str, Any]:
    """Per-family MAE (m/s) of ``predict(x_batch) -> m/s (B,1,70,70)`` and ms per sample."""
    from fwi_core.metrics import per_family

    preds, t0 = [], time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(x), batch):
            preds.append(predict(x[i:i + batch]).float().cpu().numpy()[:, 0])
    ms = 1000 * (time.perf_counter() - t0) / len(x)
    err = np.abs(np.concatenate(preds) - y).mean((1, 2))
    return {"mae": {k: float(v) for k, v in per_family(err, fams).items()}, "ms_per_sample": ms}


def _model_scores(ckpt: Path, x, y, fams) -> Dict[str, Any]:
    from fwi_core.inference import to_velocity
    from fwi_core.train import load_model

    out = {}
    for weights in ("raw", "ema"):
        try:
            model = load_model(ckpt, weights=weights, device="cpu").eval()
        except Exception:            # no EMA weights
            continue
        out[weights] = score(lambda b, m=model: to_velocity(m(b)), x, y, fams)
    return out


def run(name: str, seconds: float, data: Path, extra: Optional[Dict[str, Any]] = None,
        label: Optional[str] = None) -> Dict[str, Any]:
    from fwi_core.train import TrainConfig, train

    label = label or name
    out = OUT / label
    if out.exists():
        import shutil
        shutil.rmtree(out)
    cfg = TrainConfig.from_dict({**COMMON, **CANDIDATES[name], **(extra or {}), "data": str(data), "out": str(out),
                                 "time_budget": float(seconds)})
    t0 = time.perf_counter()
    res = train(cfg)
    wall = time.perf_counter() - t0
    x, y, fams = held_out(data)
    result = {"name": label, "candidate": name, "changes": {**CANDIDATES[name], **(extra or {})},
              "seconds": seconds, "wall_s": wall, "steps": res["step"], "epochs": res["epoch"],
              "scores": _model_scores(Path(res["last_checkpoint"]), x, y, fams), "machine": machine(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "config": cfg.to_dict()}
    (out / "result.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    best = min(result["scores"].values(), key=lambda s: s["mae"]["all"])
    print(f"{label}: {res['step']} steps in {wall:.0f} s, held-out MAE {best['mae']['all']:.1f} m/s")
    return result


def better_weights(name: str) -> str:
    """``raw`` or ``ema``: the weights of run ``name`` with the lower held-out MAE (at a few
    hundred CPU steps the EMA of 0.999 still carries most of the initial weights)."""
    scores = json.loads((OUT / name / "result.json").read_text())["scores"]
    return min(scores, key=lambda w: scores[w]["mae"]["all"])


def pseudo(source: str, seconds: float, data: Path, rank_by: str) -> Dict[str, Any]:
    from fwi_core.recipes import pseudo_label_round

    ckpt = sorted((OUT / source).glob("ckpt-*.pt"))[-1]
    folder = OUT / f"{source}-pseudo-labels"
    t0 = time.perf_counter()
    weights = better_weights(source)
    rnd = pseudo_label_round([str(ckpt)], data, folder, device="cpu", overwrite=True, rank_by=rank_by,
                             weights=weights)
    round_s = time.perf_counter() - t0
    res = run(source, seconds, data, {"pseudo": str(folder)}, label=f"{source}+pseudo")
    res["pseudo_round"] = {k: rnd[k] for k in ("samples", "candidates", "bytes_per_sample", "bytes", "dtype",
                                                "rank_by", "predict_s", "simulate_s")} | {"round_s": round_s,
                                                                                          "weights": weights}
    (OUT / res["name"] / "result.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    return res


def distill(teachers: List[str], student: str, seconds: float, data: Path) -> Dict[str, Any]:
    from fwi_core.ensemble import Ensemble, EnsembleConfig, EnsembleWeights, MemberSpec
    from fwi_core.recipes import distill_from_json
    from fwi_core.train import TrainConfig

    specs = [MemberSpec(t, str(sorted((OUT / t).glob("ckpt-*.pt"))[-1]), better_weights(t)) for t in teachers]
    ens_json = EnsembleConfig(specs, EnsembleWeights.equal(teachers)).save(OUT / "teacher.json")
    label = f"{student}-student"
    out = OUT / label
    if out.exists():
        import shutil
        shutil.rmtree(out)
    cfg = TrainConfig.from_dict({**COMMON, **CANDIDATES[student], "data": str(data), "out": str(out),
                                 "time_budget": float(seconds)})
    t0 = time.perf_counter()
    dist = distill_from_json(ens_json, cfg, eval_samples=None, device="cpu")
    wall = time.perf_counter() - t0
    x, y, fams = held_out(data)
    ens = Ensemble.from_checkpoints([], config=ens_json, device="cpu")
    result = {"name": label, "teachers": teachers, "student": student, "seconds": seconds, "wall_s": wall,
              "steps": dist["result"]["step"],
              "scores": _model_scores(Path(dist["result"]["last_checkpoint"]), x, y, fams),
              "ensemble": score(lambda b: ens.predict(b)[0], x, y, fams), "machine": machine(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    (out / "result.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    return result


FAMS = ["FlatVel_A", "FlatVel_B", "CurveVel_A", "CurveVel_B", "FlatFault_A", "FlatFault_B", "CurveFault_A",
        "CurveFault_B", "Style_A", "Style_B"]


def table() -> str:
    """The markdown table of every result: per-family MAE of the raw and EMA weights, the
    mean, its ratio to the ``base`` run's (same weights), ms per sample."""
    results = [json.loads(p.read_text()) for p in sorted(OUT.glob("*/result.json"))]
    base = next((r["scores"] for r in results if r["name"] == "base"), {})
    rows = []
    for r in results:
        for weights, s in r["scores"].items():
            rows.append((r["name"], weights, r["steps"], s, base.get(weights)))
        if "ensemble" in r:
            rows.append((f"teacher: {' + '.join(r['teachers'])} (equal weights)", "each run's better", "-",
                         r["ensemble"], base.get("raw")))
    head = "| run | weights | steps | " + " | ".join(FAMS) + " | mean | vs base | ms/sample |"
    lines = [head, "|---|---|" + "---:|" * (head.count("|") - 3)]
    for name, weights, steps, s, ref in rows:
        ratio = f"{s['mae']['all'] / ref['mae']['all']:.3f}" if ref else "-"
        lines.append(f"| {name} | {weights} | {steps} | " + " | ".join(f"{s['mae'].get(f, float('nan')):.0f}"
                                                                      for f in FAMS)
                     + f" | {s['mae']['all']:.1f} | {ratio} | {s['ms_per_sample']:.1f} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.bench_presets", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DATA)
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("names", nargs="+", choices=list(CANDIDATES))
    r.add_argument("--seconds", type=float, default=300.0)
    p = sub.add_parser("pseudo")
    p.add_argument("--from", dest="source", default="base", choices=list(CANDIDATES))
    p.add_argument("--seconds", type=float, default=300.0)
    p.add_argument("--rank-by", default="disagreement")
    d = sub.add_parser("distill")
    d.add_argument("--teachers", nargs="+", required=True)
    d.add_argument("--student", default="base", choices=list(CANDIDATES))
    d.add_argument("--seconds", type=float, default=300.0)
    sub.add_parser("table")
    a = ap.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    os.environ.setdefault("FWI_PROGRESS", "0")
    if a.command == "run":
        for name in a.names:
            run(name, a.seconds, a.data)
    elif a.command == "pseudo":
        pseudo(a.source, a.seconds, a.data, a.rank_by)
    elif a.command == "distill":
        distill(a.teachers, a.student, a.seconds, a.data)
    else:
        print(table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
