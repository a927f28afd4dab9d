# %% [markdown]
# # FWI: train a velocity-inversion model
#
# Trains a model from the `fwi_core` zoo on the competition's `train_samples/` with the
# toolkit's engine (AMP, EMA, family-stratified folds, time budget, checkpoints), then
# shows the loss curves, validation metrics per geological family and a few predictions
# against the truth. The best checkpoint lands in `output_dir` for the `infer` kernel.

# %% tags=["parameters"]
data_root = None  # None: find the competition data (Kaggle mounts, $FWI_DATA)
output_dir = "."  # where checkpoints, logs and plots go (/kaggle/working on Kaggle)
model_name = "inversionnet_small"
model_kwargs = {}  # e.g. {"family_init": "flatvel", "num_families": 10} for specproj_unet
epochs = None  # None: on Kaggle 0, i.e. train until the time budget (the schedule spans it); elsewhere 10
batch_size = 16
lr = 1e-3
schedule = "cosine"  # cosine | onecycle | cosine_restarts (a snapshot per cycle) | constant
restart_epochs = 1  # cosine_restarts in epoch mode: epochs per cycle
restart_cycles = 3  # cosine_restarts in time mode (epochs 0): cycles over the budget
ema_decay = 0.999  # EMA of the weights, evaluated beside the raw ones (0: off)
amp = "fp16"  # off | bf16 | fp16 (fp16 on Kaggle T4; degrades gracefully on CPU)
folds = 5
fold = 0
time_budget = None  # seconds of training; None: the platform's default
seed = 0
max_train_samples = 0  # 0: all
max_val_samples = 0  # 0: all
flip_prob = 0.5
scale_prob = 0.0  # amplitude scaling of the gathers (source strength), factor in scale_range
scale_range = (0.5, 2.0)
noise_prob = 0.0  # additive Gaussian noise, noise_std x the sample's RMS
noise_std = 0.05
pde_weight = 0.0  # PDE-consistency term: misfit of simulate(prediction) against the gathers (GPU advised)
pde_every = 4  # ... computed every k-th step, on pde_samples samples of the batch (0: all)
pde_samples = 2
sim_fraction = 0.0  # fraction of each epoch's samples freshly simulated from the 10 family generators
sim_kwargs = {}  # SimulatedDataset options, e.g. {"augment": {"crop": 0.3, "warp": 0.3, "blend": 0.2}}
backbone_checkpoint = None  # stage-wise: train model_name on the residual of this frozen checkpoint
ensemble_runs = []  # earlier run folders (e.g. attached outputs of other folds/models): fit ensemble weights
num_workers = 2
show_samples = 4

# %%
from pathlib import Path

import numpy as np

from fwi_core.data import find_competition_root
from fwi_core.scoring import format_table, score_predictions
from fwi_core.plotting import plot_curves, plot_predictions, show
from fwi_core.params import check_parameters
from fwi_core.train import TrainConfig, default_epochs, detect_platform, train

check_parameters("train", globals())  # a value of the wrong type fails here, naming the parameter
root = find_competition_root(data_root)
out = Path(output_dir)
out.mkdir(parents=True, exist_ok=True)
platform = detect_platform()
print("platform:", platform, "| data:", root, "| output:", out.resolve())
if epochs is None:  # on Kaggle: train until the session's budget, the schedule spanning it
    epochs = default_epochs(platform, time_budget)
print("epochs:", epochs or "until the time budget (time-mode schedule)")

# %%
cfg = TrainConfig(
    data=str(root), out=str(out), model=model_name, model_kwargs=dict(model_kwargs),
    epochs=epochs, batch_size=batch_size, lr=lr, ema_decay=ema_decay, amp=amp, schedule=schedule,
    restart_epochs=restart_epochs, restart_cycles=restart_cycles,
    folds=folds, fold=fold, time_budget=time_budget, seed=seed,
    max_train_samples=max_train_samples, max_val_samples=max_val_samples,
    flip_prob=flip_prob, num_workers=num_workers, scale_prob=scale_prob, scale_range=tuple(scale_range),
    noise_prob=noise_prob, noise_std=noise_std, pde_weight=pde_weight, pde_every=pde_every,
    pde_samples=pde_samples, sim_fraction=sim_fraction, sim_kwargs=dict(sim_kwargs),
    backbone_checkpoint=backbone_checkpoint,
)
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
if model_name == "invertible_unet":
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
# With `ensemble_runs` (run folders of other folds or models trained by this kernel), the
# out-of-fold predictions of all runs fit the ensemble's weights per family (equal, static
# and optimised, compared on held-out folds) and `ensemble.json` is written beside the
# checkpoints for the `infer` kernel's `ensemble_config`.

# %%
if ensemble_runs:
    from fwi_core.ensemble import fit_ensemble

    fitted = fit_ensemble([*ensemble_runs, out], out_json=out / "ensemble.json")
    print("ensemble:", fitted["config"], "| weighting:", fitted["selected"])
    print(format_table({fam: {k: v for k, v in row.items() if k in ("equal", "static", "optimised")}
                        for fam, row in fitted["comparison"]["table"].items()}))

