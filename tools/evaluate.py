"""Score a checkpoint on any labelled dataset in the competition's train_samples layout.

    python -m tools.evaluate --data DIR --checkpoint FILE [--batch-size 16] [--flip-tta]
                             [--max-samples N] [--families F ...] [--physics N] [--crf]
                             [--mc-dropout T] [--json OUT] [--stage-gains OUT [--stages ...]
                             [--refine-samples K]]

Prints MAE (overall and per family) with the competition's MAE (odd columns), RMSE, SSIM
and boundary IoU; ``--physics N`` adds the seismic misfit (normalised seismic
misfit of the predicted maps, simulated with the exact forward model) on N samples;
``--crf`` also scores the predictions after a continuous-CRF pass (the tuned ``crf.json``
beside the checkpoint when there is one, else the default CRF with its temperature in m/s); ``--mc-dropout T``
predicts with T Monte Carlo dropout passes and reports the uncertainty's calibration
(Gaussian NLL, 90% interval coverage, calibration error). With several checkpoints the
metrics are the (equal-weight) ensemble's, followed by a model comparison: the MAE of each
member and of the ensemble side by side, per family. ``--stage-gains OUT`` runs the
time-budgeted inference stages (the infer kernel's plan: members, flip, CRF, MC dropout,
refinement per family kind on ``--refine-samples`` samples of each kind; ``--stages``
picks others) over the samples and writes the validation MAE each removed to ``OUT``
(nothing else is written: copy it beside the checkpoints as ``stage_gains.json`` for the
planner to use it).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

import numpy as np

import torch

from fwi_core.crf import default_crf_ms, load_crf
from fwi_core.data import FWIDataset, index_train
from fwi_core.ensemble import Ensemble, member_name_for
from fwi_core.errors import FWIError
from fwi_core.inference import predict_dataset
from fwi_core.metrics import mae, per_family
from fwi_core.models.checkpoint import load_model
from fwi_core.params import int_at_least
from fwi_core.physics.misfit import seismic_misfit
from fwi_core.scoring import format_table, score_predictions, score_uncertainty
from fwi_core.inference_plan.measure import measure_stage_gains
from fwi_core.inference_plan.measure import MEASURED_STAGES, REFINE_SAMPLES_PER_KIND
from fwi_core.utils import atomic_write_text


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, type=Path, help="competition root or train_samples folder")
    ap.add_argument("--checkpoint", required=True, nargs="+", type=Path, help="one or more (ensemble) checkpoints")
    ap.add_argument("--weights", default="auto", choices=["auto", "raw", "ema"])
    ap.add_argument("--batch-size", type=int_at_least(1), default=16)
    ap.add_argument("--flip-tta", action="store_true")
    ap.add_argument("--max-samples", type=int_at_least(1), default=None, help="evaluate the first N samples only")
    ap.add_argument("--families", nargs="*", default=None)
    ap.add_argument("--physics", type=int_at_least(0), default=0, metavar="N",
                    help="seismic misfit on the first N samples (about 0.2-0.6 s each)")
    ap.add_argument("--crf", action="store_true",
                    help="also score after a continuous-CRF pass: the tuned crf.json beside the checkpoint, "
                         "else the default CRF in m/s units")
    ap.add_argument("--mc-dropout", type=int_at_least(0), default=0, metavar="T",
                    help="predict with T Monte Carlo dropout passes and score the uncertainty's calibration")
    ap.add_argument("--json", type=Path, default=None, help="write the table as JSON here")
    ap.add_argument("--stage-gains", type=Path, default=None, metavar="OUT",
                    help="measure the inference stages' gains and write the table to OUT (only there)")
    ap.add_argument("--stages", nargs="+", default=None,
                    help="stages measured by --stage-gains (default: the infer kernel's plan)")
    ap.add_argument("--refine-samples", type=int_at_least(1), default=REFINE_SAMPLES_PER_KIND, metavar="K",
                    help="--stage-gains measures refinement on K samples of each family kind")
    a = ap.parse_args(argv)
    if a.mc_dropout == 1:
        ap.error("argument --mc-dropout: expected 0 (off) or at least 2 passes, got 1")


    for c in a.checkpoint:
        if not c.is_file():
            print(f"error: checkpoint {c} does not exist", file=sys.stderr)
            return 2
    try:
        ds = FWIDataset(index_train(a.data, families=a.families))
    except FWIError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.max_samples:
        ds = ds.subset(np.linspace(0, len(ds) - 1, min(a.max_samples, len(ds))).astype(int))
    try:
        models = [load_model(c, weights=a.weights) for c in a.checkpoint]
        if a.crf:
            load_crf(a.checkpoint)          # a damaged crf.json fails now, not after predicting
    except (FWIError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    res = predict_dataset(models, ds, batch_size=a.batch_size, flip_tta=a.flip_tta, mc_passes=a.mc_dropout)
    table = score_predictions(res["pred"], res["true"], res["family"])
    print(f"{len(ds)} samples, {len(models)} checkpoint(s){', flip TTA' if a.flip_tta else ''}")
    print(format_table(table))
    out = {"metrics": table}
    if len(models) > 1:
        out["comparison"] = _compare_members(a.checkpoint, models, res, ds, a.batch_size, a.flip_tta)
        print("\nmodel comparison: MAE (m/s) per family of each member and of the ensemble")
        print(format_table(out["comparison"]))
    if a.mc_dropout:
        unc = score_uncertainty(res["pred"], res["var"], res["true"], res["family"])
        print(f"\nMC dropout ({a.mc_dropout} passes): uncertainty calibration")
        print(format_table(unc))
        out["uncertainty"] = unc
    if a.crf:
        # the CRF the train kernel tuned (crf.json beside the checkpoint) if there is one,
        # else the default CRF with its temperature converted to m/s: predictions are in m/s
        crf = load_crf(a.checkpoint)
        source = "tuned crf.json" if crf is not None else "default, m/s units"
        crf = crf if crf is not None else default_crf_ms()
        with torch.no_grad():
            refined = crf(torch.from_numpy(res["pred"]).float()).numpy()
        crf_mae = per_family(mae(refined, res["true"]), list(res["family"]))
        print(f"\nMAE after CRF ({source}):", ", ".join(f"{k} {v:.2f}" for k, v in crf_mae.items()))
        out["crf_mae"] = crf_mae
        out["crf"] = {"source": source, "config": crf.config()}
    if a.physics:
        n = min(a.physics, len(ds))
        obs = np.stack([ds.raw(i)[0] for i in range(n)])
        score = seismic_misfit(res["pred"][:n], obs)
        pc = per_family(score, list(res["family"][:n]))
        print(f"\nseismic misfit (||sim(pred) - observed|| / ||observed||, {n} samples):",
              ", ".join(f"{k} {v:.3f}" for k, v in pc.items()))
        out["seismic_misfit"] = pc
    if a.stage_gains is not None:
        out["stage_gains"] = _stage_gains(a, ds)
    if a.json:
        atomic_write_text(a.json, json.dumps(out, indent=2))
    return 0


def _compare_members(paths, models, res, ds, batch_size, flip_tta):
    """{family: {member name: MAE, ..., "ensemble": MAE}} (m/s, 'all' included)."""

    names = [member_name_for(p) for p in paths]
    names = [n if names.count(n) == 1 else str(p) for n, p in zip(names, paths)]
    table = {}
    for name, model in zip(names, models):
        r = predict_dataset(model, ds, batch_size=batch_size, flip_tta=flip_tta, progress=False)
        for fam, v in per_family(mae(r["pred"], r["true"]), list(r["family"])).items():
            table.setdefault(fam, {})[name] = v
    for fam, v in per_family(mae(res["pred"], res["true"]), list(res["family"])).items():
        table[fam]["ensemble"] = v
    return table


def _stage_gains(a, ds) -> dict:
    """Measure each inference stage's gain on ``ds`` and save ``stage_gains.json``."""

    ens = Ensemble.from_checkpoints(a.checkpoint)
    true = np.stack([ds.raw(i)[1] for i in range(len(ds))])
    gains = measure_stage_gains(ens, lambda i: ds.raw(i)[0], true, families=ds.families(),
                                stages=a.stages or MEASURED_STAGES, crf=load_crf(a.checkpoint),
                                batch_size=a.batch_size, mc_passes=max(2, a.mc_dropout or 8),
                                refine_samples=a.refine_samples)
    path = gains.save(a.stage_gains)
    print(f"\nstage gains (validation MAE removed, m/s) -> {path}:",
          ", ".join(f"{k} {v:+.3f}" for k, v in gains.gains.items()))
    for stage, kinds in gains.per_kind.items():
        print(f"  {stage} per refined sample:", ", ".join(f"{k} {v:+.2f}" for k, v in kinds.items()))
    return gains.to_dict()


if __name__ == "__main__":
    sys.exit(main())
