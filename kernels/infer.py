# %% [markdown]
# # FWI: predict the test set and write `submission.csv`
#
# Loads one or more checkpoints written by the `train` kernel (an ensemble is their
# average), predicts every `test/<oid>.npy` with horizontal-flip TTA, writes and validates
# `submission.csv`, and plots a few predictions. When the data carries the true test
# velocities (`test_solution.npz`, written by the toolkit's synthetic generator), it also
# prints the local MAE.

# %% tags=["parameters"]
data_root = None  # None: find the competition data (Kaggle mounts, $FWI_DATA)
checkpoints = []  # checkpoint files; empty: search checkpoint_dirs for best*.pt
checkpoint_dirs = [".", "/kaggle/input"]
output_dir = "."
batch_size = 16
flip_tta = True
use_crf = True  # apply the CRF tuned by the train kernel (crf.json beside the checkpoint), if any
limit = None  # predict only the first N test files (quick checks)
num_workers = 2
show_samples = 4

# %%
from pathlib import Path

import numpy as np

from fwi_core.data import find_competition_root, list_test, load_solution, load_test_sample, validate_submission
from fwi_core.data import score_submission
from fwi_core.inference import find_checkpoints, load_crf, predict_batch, predict_test_set, to_velocity
from fwi_core.plotting import plot_predictions, show
from fwi_core.train import load_model

root = find_competition_root(data_root)
out = Path(output_dir)
out.mkdir(parents=True, exist_ok=True)
paths = [Path(p) for p in checkpoints] or find_checkpoints(checkpoint_dirs)
print("data:", root)
print("checkpoints:", *paths, sep="\n  ")
models = [load_model(p) for p in paths]
crf = load_crf(paths) if use_crf else None
print("CRF post-processing:", crf if crf is not None else "off")

# %%
csv = predict_test_set(models, root, out / "submission.csv", batch_size=batch_size, flip_tta=flip_tta,
                       num_workers=num_workers, limit=limit, postprocess=crf)
test_oids = [oid for oid, _ in list_test(root)][:limit]
print("validated:", validate_submission(csv, test_oids), "->", csv)

# %%
solution = root / "test_solution.npz"
if solution.is_file():
    print(f"local MAE against {solution.name}: {score_submission(csv, load_solution(solution)):.2f} m/s")

# %% [markdown]
# ## A few test predictions

# %%
import torch

from fwi_core.data import normalize_seismic

files = list_test(root)[:show_samples]
x = torch.from_numpy(np.stack([normalize_seismic(load_test_sample(p)) for _, p in files])).float()
pred = to_velocity(predict_batch([m.cpu().eval() for m in models], x, flip_tta))
if crf is not None:
    with torch.no_grad():
        pred = crf(pred)
pred = pred.numpy()
truth = None
if solution.is_file():
    sol = load_solution(solution)
    truth = np.stack([sol[oid][None] for oid, _ in files])
fig = plot_predictions(pred, truth, titles=[oid for oid, _ in files], max_rows=show_samples)
show(fig, out / "test_predictions.png")
