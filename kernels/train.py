# %% [markdown]
# # FWI: train a velocity-inversion model
#
# Trains a model from the `fwi_core` zoo on the competition's `train_samples/` with the
# toolkit's engine (AMP, EMA, family-stratified folds, time budget, checkpoints), then
# shows the loss curves, validation metrics per geological family and a few predictions
# against the truth. The best checkpoint lands in `output_dir` for the `infer` kernel.

# %% tags=["parameters"]
preset = "auto"  # auto: kaggle_t4 on Kaggle, gpu on another CUDA machine, cpu otherwise; or smoke (fwi_core/train/presets.py)
data_root = None  # None: find the competition data (Kaggle mounts, $FWI_DATA)
output_dir = "."  # where checkpoints, logs and plots go (/kaggle/working on Kaggle)
# Training settings: None (and {}) keep the preset's value (the table printed below lists them all)
model_name = None  # e.g. "convnext_unet", "specproj_unet", "inversionnet"
model_kwargs = {}  # {}: the preset's; e.g. {"family_init": "flatvel", "num_families": 10} for specproj_unet
epochs = None  # 0: train until the time budget (the schedule spans it)
batch_size = None
lr = None
schedule = None  # cosine | onecycle | cosine_restarts (a snapshot per cycle) | constant
restart_epochs = None  # cosine_restarts in epoch mode: epochs per cycle
restart_cycles = None  # cosine_restarts in time mode (epochs 0): cycles over the budget
ema_decay = None  # EMA of the weights, evaluated beside the raw ones (0: off)
amp = None  # off | bf16 | fp16 (fp16 on Kaggle's T4)
folds = None
fold = None
time_budget = None  # seconds of training; None: the preset's (none: the platform's session limit)
seed = None
max_train_samples = None  # 0: all
max_val_samples = None  # 0: all
flip_prob = None
scale_prob = None  # amplitude scaling of the gathers (source strength), factor in scale_range
scale_range = None
noise_prob = None  # additive Gaussian noise, noise_std x the sample's RMS
noise_std = None
pde_weight = None  # PDE-consistency term: misfit of simulate(prediction) against the gathers (GPU advised)
pde_every = None  # ... computed every k-th step, on pde_samples samples of the batch (0: all)
pde_samples = None
sim_fraction = None  # fraction of each epoch's samples freshly simulated from the 10 family generators
sim_kwargs = {}  # {}: the preset's; SimulatedDataset options, e.g. {"augment": {"crop": 0.3, "warp": 0.3, "blend": 0.2}}
backbone_checkpoint = None  # stage-wise: train model_name on the residual of this frozen checkpoint
pseudo_dir = None  # a pseudo-label folder (tools.pseudo_label --out, e.g. an attached dataset): mixed into training
distill_teacher = None  # an ensemble JSON: train a student on its predictions instead of the labels
num_workers = None
ensemble_runs = []  # earlier run folders (e.g. attached outputs of other folds/models): fit ensemble weights
show_samples = 4

# %%
from pathlib import Path

import numpy as np

from fwi_core.data import find_competition_root
from fwi_core.scoring import format_table, score_predictions
from fwi_core.plotting import plot_curves, plot_predictions, show
from fwi_core.params import check_parameters
from fwi_core.train import TrainConfig, detect_platform, train
from fwi_core.train.cli import default_help

check_parameters("train", globals())  # a value of the wrong type fails here, naming the parameter
root = find_competition_root(data_root)
out = Path(output_dir)
out.mkdir(parents=True, exist_ok=True)
platform = detect_platform()
# the preset's values, then every parameter above that is not None (the CLI does the same)
cfg = TrainConfig.from_kernel(globals()).replace(data=str(root), out=str(out))
print("platform:", platform, "| data:", root, "| output:", out.resolve())
print(f"preset {cfg.preset}:")
for key, value in cfg.to_dict().items():
    if key not in ("data", "out"):
        print(f"  {key:<22} {value!r:<28} {default_help(key, getattr(TrainConfig(), key))}")

# %%
if distill_teacher:  # a student of the ensemble: its predictions are the targets, validation on true labels
    from fwi_core.recipes.distill import distill_from_json, format_report

    distilled = distill_from_json(distill_teacher, cfg)
    result = distilled["result"]
    print(format_report(distilled["report"]))
else:
    result = train(cfg)
print("stopped:", result["stopped_reason"], "| best validation MAE:", round(result["best_val_mae"], 2), "m/s")
print("best checkpoint:", result["best_checkpoint"])

# %% [markdown]
# ## Curves

# %%
show(plot_curves(result["history"]), out / "curves.png")

# %% [markdown]
# ## Validation: metrics per family and a few predictions

# %%
# out-of-fold predictions of the best weights (m/s), written by the engine
oof = np.load(result["oof_path"])
res = {"pred": oof["pred"].reshape(-1, 1, 70, 70), "true": oof["target"].reshape(-1, 1, 70, 70),
       "family": oof["family"]}
print(f"{len(res['pred'])} validation samples, weights: {oof['source']}")
print(format_table(score_predictions(res["pred"], res["true"], res["family"])))

# %%
# one sample per family first, so the plot covers the families
first = list(dict.fromkeys(res["family"]))
pick = [int(np.flatnonzero(res["family"] == f)[0]) for f in first][:show_samples]
fig = plot_predictions(res["pred"][pick], res["true"][pick], titles=[str(res["family"][i]) for i in pick],
                       max_rows=show_samples)
show(fig, out / "val_predictions.png")

# %% [markdown]
# ## Continuous-CRF post-processing, tuned on the validation predictions
#
# The CRF smooths within layers but not across sharp contrasts; its configuration is kept
# (as `crf.json` beside the checkpoint, for the `infer` kernel) only if it lowers the
# validation MAE.

# %%
from fwi_core.crf import save_crf_config, tune_crf

tuned = tune_crf(res["pred"], res["true"])
print(f"validation MAE: CNN {tuned['cnn_mae']:.2f} m/s, CNN + CRF {tuned['crf_mae']:.2f} m/s")
if tuned["improved"]:
    print("saved", save_crf_config(tuned["best_config"], Path(result["best_checkpoint"]).parent))

# %% [markdown]
# ## Inverse-consistency threshold (invertible UNet only)
#
# For an `invertible_unet` run: the consistency score of the final validation maps (after
# the CRF) against the latent of their gathers, and the threshold that best separates the
# worst predictions, saved as `consistency.json` beside the checkpoint; the `infer`
# kernel's `consistency` stage flags test maps above it.

# %%
if cfg.model == "invertible_unet":
    import torch

    from fwi_core.inverse_consistency import ConsistencyFlagger
    from fwi_core.crf import ContinuousCRF
    from fwi_core.data import FWIDataset, index_train, normalize_seismic
    from fwi_core.models.checkpoint import load_model

    val = FWIDataset(index_train(root))
    x_val = torch.from_numpy(np.stack([normalize_seismic(val.raw(int(i))[0]) for i in oof["indices"]]))
    final = torch.from_numpy(res["pred"]).float()
    if tuned["improved"]:
        with torch.no_grad():
            final = ContinuousCRF(**tuned["best_config"])(final)
    flagger = ConsistencyFlagger.fit(load_model(result["best_checkpoint"]), x_val, final,
                                     torch.from_numpy(res["true"]).float())
    print("consistency threshold", round(flagger.threshold, 4), "->",
          flagger.save(Path(result["best_checkpoint"]).parent / "consistency.json"))

# %% [markdown]
# ## Ensemble weights from out-of-fold predictions
#
# With `ensemble_runs` (run folders of other folds or models, e.g. earlier outputs of this
# kernel attached under `/kaggle/input/<name>/`; folders that trained the same model on
# other folds count as one model whatever their names), the out-of-fold predictions of all
# runs score equal, static and optimised weights and the single best model on held-out
# folds, as the infer kernel will apply them; the best is written to `ensemble.json` for the
# `infer` kernel's `ensemble_config`, and its score is the one printed.

# %%
if ensemble_runs:
    from fwi_core.ensemble.optimize import format_comparison
    from fwi_core.ensemble.fit import fit_ensemble

    fitted = fit_ensemble([*ensemble_runs, out], out_json=out / "ensemble.json")
    print(format_comparison(fitted["comparison"]))
    print(f"ensemble: {fitted['config']} | deployed weighting: {fitted['selected']}, held-out OOF MAE "
          f"{fitted['deployed_mae']:.2f} m/s" + (f" | warning: {fitted['warning']}" if fitted["warning"] else ""))

# %% [markdown]
# ## Stage gains on the validation fold (for the infer kernel's planner)
#
# The infer kernel spends its time on the stages that removed the most validation MAE per
# second. This cell measures them on this run's validation fold, in the infer kernel's plan:
# each checkpoint of the run as a member, flip TTA, the tuned CRF, MC dropout and physics
# refinement per family kind (on a few samples of each kind, within
# `fwi_core.inference_plan.measure.GAINS_TIME_BUDGET` seconds), and writes
# `stage_gains.json` beside the checkpoints, where the infer kernel reads it (members are
# matched by their weights, whatever the infer kernel names them).

# %%
from fwi_core.crf import load_crf
from fwi_core.data import FWIDataset, index_train
from fwi_core.ensemble import Ensemble
from fwi_core.inference_plan import InferenceOptions
from fwi_core.inference_plan.measure import GAINS_TIME_BUDGET, MEASURED_STAGES, measure_stage_gains
from fwi_core.models.checkpoint import find_checkpoints

run_dir = Path(result["best_checkpoint"]).parent
run_members = Ensemble.from_checkpoints(find_checkpoints([run_dir], kind="all"))
gains_ds = FWIDataset(index_train(root))
gains_rows = [int(i) for i in oof["indices"]]
stage_gains = measure_stage_gains(run_members, lambda i: gains_ds.raw(gains_rows[i])[0], res["true"],
                                  families=[str(f) for f in res["family"]], crf=load_crf([run_dir]),
                                  batch_size=InferenceOptions().batch_size, time_budget=GAINS_TIME_BUDGET)
print("stage gains ->", stage_gains.save(run_dir), f"(measured on {stage_gains.samples} validation samples)")
print(*stage_gains.describe(run_members, MEASURED_STAGES), sep="\n  ")
