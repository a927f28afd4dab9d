# %% [markdown]
# # FWI: predict the test set and write `submission.csv`
#
# Loads the checkpoints written by the `train` kernel as an ensemble (equal weights, or
# the weights of an ensemble JSON file) and predicts every `test/<oid>.npy` within a time
# budget: the cheapest good member first writes a complete `submission.csv`, then more
# members, flip TTA, the tuned CRF, MC dropout and physics refinement (test-time FWI through
# the exact simulator, flat-layered samples first) run as the time left allows, chosen by
# their validation gain per second (`stage_gains.json` beside the checkpoints). It prints
# the plan and what actually ran, validates the CSV, plots the uncertainty per family (when
# MC dropout ran) and a few predictions. When the data carries the true test velocities
# (`test_solution.npz`, written by the toolkit's synthetic generator), it also prints the
# local MAE.

# %% tags=["parameters"]
data_root = None  # None: find the competition data (Kaggle mounts, $FWI_DATA)
checkpoints = []  # checkpoint files; empty: search checkpoint_dirs for checkpoint_kind
checkpoint_dirs = [".", "/kaggle/input"]
checkpoint_kind = "best"  # best | snapshot | last | all (best + snapshots + last weights)
ensemble_config = None  # ensemble JSON (members, weights); None: the checkpoints, equal weights
prior_submission = None  # an earlier submission.csv to refine: the plan starts from it (stage "prior"), no networks
output_dir = "."
time_budget = None  # seconds from the kernel's start; None: the platform's session limit minus a margin
stages = ["members", "flip", "crf", "mc_dropout", "refine_layered", "refine", "consistency"]  # priority order
refine_iters = [60, 30]  # L-BFGS iterations of physics refinement: flat-layered samples, the others
batch_size = 16
flip_tta = True  # False drops the "flip" stage
use_crf = True  # False drops the "crf" stage (it needs crf.json, tuned by the train kernel)
mc_passes = 8
resume = True  # continue an interrupted run of this kernel (same inputs) instead of starting over
strict = False  # True: an unreadable test file stops the run instead of getting a fallback
limit = None  # predict only the first N test files (quick checks)
num_workers = 2
show_samples = 4

# %%
from pathlib import Path

import numpy as np

from fwi_core.params import check_parameters
from fwi_core.inference_plan import Deadline

check_parameters("infer", globals())  # a value of the wrong type fails here, naming the parameter
# the session limit runs from the kernel's start: fix the deadline before loading anything
deadline = Deadline.from_budget(time_budget) if time_budget else Deadline.platform_default()

from fwi_core.data import load_solution, score_submission, validate_submission
from fwi_core.plotting import plot_predictions, plot_uncertainty_by_family, show
from fwi_core.inference_plan import InferenceOptions, StageScores, prepare_inference

out = Path(output_dir)
out.mkdir(parents=True, exist_ok=True)
# the same setup as `python -m fwi_core.predict` (one function, one set of defaults)
options = InferenceOptions().with_(stages=stages, refine_iters=refine_iters, checkpoint_kind=checkpoint_kind,
                                   flip_tta=flip_tta, use_crf=use_crf, mc_passes=mc_passes,
                                   batch_size=batch_size, num_workers=num_workers)
# with a prior submission and no checkpoints listed, no networks run (the default stages become
# prior, crf, refine_layered, refine, consistency: those without what they need are skipped)
setup = prepare_inference(data_root, checkpoints or ([] if prior_submission else checkpoint_dirs),
                          ensemble_config=ensemble_config, options=options, limit=limit,
                          prior_submission=prior_submission)
root, source, ensemble, crf, flagger = setup.root, setup.source, setup.ensemble, setup.crf, setup.flagger
print(setup.describe())  # members, CRF, consistency flags, which gains and where from, the plan
print("time left:", "no deadline" if deadline.at is None else f"{deadline.remaining() / 3600:.2f} h")

# %%
# what each stage did: the final maps of the first files and, with a solution (a rehearsal), the MAE per family
scores = StageScores(source.ids, root / "test_solution.npz", keep=show_samples)
summary = setup.run(out / "submission.csv", deadline, resume=resume, strict=strict, on_stage_end=scores)
csv = Path(summary.csv)
print("ran:", ", ".join(summary.ran))
if flagger is not None and "consistency" in summary.ran:
    print(f"consistency: {len(flagger.flagged)} test maps flagged as inconsistent with their gathers",
          *sorted(flagger.flagged.items(), key=lambda kv: -kv[1])[:20], sep="\n  ")
print("validated:", validate_submission(csv, source.ids), "->", csv)

# %%
solution = root / "test_solution.npz"
if solution.is_file():
    print(f"local MAE against {solution.name}: {score_submission(csv, load_solution(solution)):.2f} m/s")
    print("MAE per family after each stage (in the order they ran), seconds, samples covered:")
    print(scores.format(summary))
    scores.save(out / "stage_scores.json", summary)

# %% [markdown]
# ## Uncertainty per family (MC dropout) and a few test predictions
#
# Families are the ensemble's family classifier's predictions ("all" without one).

# %%
if summary.uncertainty:
    show(plot_uncertainty_by_family(summary.uncertainty), out / "uncertainty.png")
else:
    print("MC dropout did not run: no uncertainty to plot")

# %%
# the maps submitted for the first files (after every stage that ran, refinement included)
files = source.files[:show_samples]
truth = None
if solution.is_file():
    sol = load_solution(solution)
    truth = np.stack([sol[oid][None] for oid, _ in files])
if scores.maps is not None and len(files):
    fig = plot_predictions(scores.maps[:, None], truth, titles=[oid for oid, _ in files], max_rows=show_samples)
    show(fig, out / "test_predictions.png")
