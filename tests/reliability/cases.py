"""The bad-input matrix: everything a user can get wrong at an entry point, one row each.

Every row sets up a workspace (a folder of its own), then runs one entry point the way a
user would (a Python call, a command's ``main(argv)`` or a kernel's cells) with one bad
input. :mod:`tests.reliability.test_bad_inputs` runs the table and checks, for every row:

- the error's type (a named error of the project, or a command's exit status) and that
  its message matches the row's pattern, which names the file or field and what was
  expected;
- that the workspace is exactly as before: no file changed, none added, and no temporary
  file or staging folder of an interrupted write left behind.

Submission values outside [1500, 4500] m/s are a warning (:class:`SubmissionRangeWarning`),
not an error: Kaggle accepts and scores them, and clamping to the range can only lower the
MAE, so the validator says so instead of rejecting a file that would score.

The kernel rows are generated from the kernels' parameters cells: every parameter gets a
value of the wrong type (see :func:`kernel_cases`).
"""
from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from tests.reliability.helpers import SEIS, VEL, mini_root, tiny_checkpoint, write_npy

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Exit:
    """A command that ends with this exit status (returned by ``main`` or SystemExit)."""

    code: int


@dataclass(frozen=True)
class Warns:
    """A call that succeeds with a warning of this category."""

    category: type


@dataclass(frozen=True)
class Case:
    """One bad input: ``setup(ws, env)`` prepares the workspace and returns the action."""

    id: str
    area: str
    setup: Callable[..., Callable[[], Any]]
    expect: Any              # an exception class, Exit or Warns
    match: str               # regex the message must match (file/field and expectation)


CASES: List[Case] = []


def case(area: str, expect, match: str):
    def deco(fn):
        CASES.append(Case(f"{area}:{fn.__name__}", area, fn, expect, match))
        return fn
    return deco


def _errors():
    from fwi_core.errors import DataFormatError, LayoutError, MissingPairError, SubmissionError
    from fwi_core.ensemble import EnsembleConfigError
    from fwi_core.errors import CheckpointError, ConfigError
    return DataFormatError, LayoutError, MissingPairError, SubmissionError, EnsembleConfigError, CheckpointError, \
        ConfigError


(DataFormatError, LayoutError, MissingPairError, SubmissionError, EnsembleConfigError, CheckpointError,
 ConfigError) = _errors()
from fwi_core.data.submission import HEADER, SubmissionRangeWarning  # noqa: E402
from fwi_core.inference_plan import StageError  # noqa: E402
from fwi_core.params import ParameterError  # noqa: E402
from tools.build import BuildError  # noqa: E402
from tools.kaggle_cli import KaggleCLIError  # noqa: E402


def _truncate(path: Path, keep: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(keep)


# ============================================================================ data files
@case("data", DataFormatError, r"FlatVel_A/data/data1\.npy: not a readable \.npy seismic file of shape "
                               r"\(N, 5, 1000, 70\) float32")
def truncated_train_file(ws, env):
    root = mini_root(ws)
    _truncate(root / "train_samples/FlatVel_A/data/data1.npy", 5000)
    from fwi_core.data import index_train
    return lambda: index_train(root)


@case("data", DataFormatError, r"vel2_1_0\.npy: not a readable \.npy velocity file")
def non_npy_velocity_file(ws, env):
    root = mini_root(ws)
    (root / "train_samples/FlatFault_A/vel2_1_0.npy").write_text("velocity,1500\n")
    from fwi_core.data import index_train
    return lambda: index_train(root)


@case("data", DataFormatError, r"data1\.npy: seismic has dtype int32, expected float32")
def wrong_dtype_train_file(ws, env):
    root = mini_root(ws)
    write_npy(root / "train_samples/FlatVel_A/data/data1.npy", (2,) + SEIS, dtype=np.int32)
    from fwi_core.data import index_train
    return lambda: index_train(root)


@case("data", DataFormatError, r"seis2_1_0\.npy: seismic has shape \(2, 5, 1000, 69\), expected \(N, 5, 1000, 70\)")
def wrong_shape_train_file(ws, env):
    root = mini_root(ws)
    write_npy(root / "train_samples/FlatFault_A/seis2_1_0.npy", (2, 5, 1000, 69))
    from fwi_core.data import index_train
    return lambda: index_train(root)


@case("data", DataFormatError, r"model1\.npy: sample 1 velocity contains NaN or inf")
def nan_in_train_velocity(ws, env):
    root = mini_root(ws)
    write_npy(root / "train_samples/FlatVel_A/model/model1.npy", (2,) + VEL, fill=3000.0)
    m = np.load(root / "train_samples/FlatVel_A/model/model1.npy", mmap_mode="r+")
    m[1, 0, 5, 5] = np.nan
    m.flush()
    del m
    from fwi_core.data import FWIDataset, index_train
    ds = FWIDataset(index_train(root, families=["FlatVel_A"]))
    return lambda: ds[1]


@case("data", MissingPairError, r"data/data2\.npy: seismic file without its velocity file .*model/model2\.npy")
def data_file_without_model_file(ws, env):
    root = mini_root(ws)
    write_npy(root / "train_samples/FlatVel_A/data/data2.npy", (2,) + SEIS)
    from fwi_core.data import index_train
    return lambda: index_train(root)


@case("data", MissingPairError, r"vel4_1_0\.npy: velocity file without its seismic file seis4_1_0\.npy")
def fault_velocity_without_seismic(ws, env):
    root = mini_root(ws)
    write_npy(root / "train_samples/FlatFault_A/vel4_1_0.npy", (2,) + VEL, fill=3000.0)
    from fwi_core.data import index_train
    return lambda: index_train(root)


@case("data", MissingPairError, r"seis2_1_0\.npy holds 3 samples but .*vel2_1_0\.npy holds 2")
def sample_counts_differ(ws, env):
    root = mini_root(ws)
    write_npy(root / "train_samples/FlatFault_A/seis2_1_0.npy", (3,) + SEIS)
    from fwi_core.data import index_train
    return lambda: index_train(root)


@case("data", LayoutError, r"CurveVel_B: family folder 'CurveVel_B' holds no data/model or seis/vel files")
def empty_family_folder(ws, env):
    root = mini_root(ws)
    (root / "train_samples/CurveVel_B").mkdir()
    from fwi_core.data import index_train
    return lambda: index_train(root)


@case("data", LayoutError, r"test: no \.npy test files")
def empty_test_folder(ws, env):
    root = mini_root(ws, test_oids=())
    from fwi_core.data import list_test
    return lambda: list_test(root)


@case("data", LayoutError, r"comp: no test/ folder")
def missing_test_folder(ws, env):
    root = mini_root(ws, test_oids=())
    (root / "test").rmdir()
    from fwi_core.inference_plan import TestFileSource
    return lambda: TestFileSource(root)


@case("data", DataFormatError, r"33cc44dd55\.npy: not a readable \.npy test seismic file")
def truncated_test_file(ws, env):
    root = mini_root(ws)
    _truncate(root / "test/33cc44dd55.npy", 1000)
    from fwi_core.data import load_test_sample
    return lambda: load_test_sample(root / "test/33cc44dd55.npy")


@case("data", DataFormatError, r"00aa11bb22\.npy: test seismic contains NaN or inf")
def nan_in_test_file(ws, env):
    root = mini_root(ws)
    x = np.zeros(SEIS, np.float32)
    x[2, 10, 3] = np.inf
    np.save(root / "test/00aa11bb22.npy", x)
    from fwi_core.data import TestDataset
    return lambda: TestDataset(root)[0]


@case("data", DataFormatError, r"00aa11bb22\.npy: test seismic has shape \(1, 5, 1000, 70\), expected \(5, 1000, 70\)")
def batched_test_file(ws, env):
    root = mini_root(ws)
    write_npy(root / "test/00aa11bb22.npy", (1,) + SEIS)
    from fwi_core.data import load_test_sample
    return lambda: load_test_sample(root / "test/00aa11bb22.npy")


@case("data", LayoutError, r"00aa11bb22\.npy: duplicate test oid '00aa11bb22' \(each test file must appear once\)")
def duplicate_test_oids(ws, env):
    root = mini_root(ws)
    f = root / "test/00aa11bb22.npy"
    from fwi_core.inference_plan import TestFileSource
    return lambda: TestFileSource(files=[("00aa11bb22", f), ("33cc44dd55", root / "test/33cc44dd55.npy"),
                                         ("00aa11bb22", f)])


@case("data", LayoutError, r"notdata: not a competition root \(expected train_samples/ and/or test/ inside\)")
def not_a_competition_root(ws, env):
    (ws / "notdata" / "images").mkdir(parents=True)
    from fwi_core.data import find_competition_root
    return lambda: find_competition_root(ws / "notdata")


@case("data", LayoutError, r"data root must be a folder path, got 5 \(int\)")
def competition_root_of_wrong_type(ws, env):
    from fwi_core.data import find_competition_root
    return lambda: find_competition_root(5)


# ============================================================================ fwi_core.train
def _train_cli(ws, *extra, data=True):
    from fwi_core.train.cli import main
    root = mini_root(ws) if data else ws / "nodata"
    argv = ["--data", str(root), "--out", str(ws / "run"), "--model", "inversionnet", "--model-kwargs",
            '{"width": 0.0625}', "--epochs", "1", "--batch-size", "2", "--folds", "0", "--num-workers", "0",
            "--device", "cpu", "--time-budget", "0", *extra]
    return lambda: main(argv)


@case("train", Exit(2), r"argument --batch-size: invalid int value: 'two'")
def train_flag_wrong_type(ws, env):
    return _train_cli(ws, "--batch-size", "two")


@case("train", Exit(2), r"batch_size must be >= 1, got 0")
def train_flag_zero_batch(ws, env):
    return _train_cli(ws, "--batch-size", "0")


@case("train", Exit(2), r"lr, weight_decay, grad_clip and min_lr must be >= 0")
def train_flag_negative_lr(ws, env):
    return _train_cli(ws, "--lr", "-0.001")


@case("train", Exit(2), r"ema_decay must be in \[0, 1\) \(0 turns EMA off\), got 1.5")
def train_flag_out_of_range(ws, env):
    return _train_cli(ws, "--ema-decay", "1.5")


@case("train", Exit(2), r"unknown model 'inversionet'; registered models: .*inversionnet")
def train_unknown_model(ws, env):
    return _train_cli(ws, "--model", "inversionet")


@case("train", Exit(2), r"argument --schedule: invalid choice: 'linear'")
def train_unknown_schedule(ws, env):
    return _train_cli(ws, "--schedule", "linear")


@case("train", Exit(2), r"unknown TrainConfig keys \['bach_size'\]; valid keys: .*batch_size")
def train_config_unknown_key(ws, env):
    cfg = ws / "cfg.json"
    cfg.write_text(json.dumps({"bach_size": 4}))
    return _train_cli(ws, "--config", str(cfg))


@case("train", Exit(2), r"patience must be an integer, got 'ten' \(str\)")
def train_config_wrong_type(ws, env):
    cfg = ws / "cfg.json"
    cfg.write_text(json.dumps({"patience": "ten"}))
    return _train_cli(ws, "--config", str(cfg))


@case("train", Exit(2), r"--config .*cfg\.json: cannot read a JSON object")
def train_config_not_json(ws, env):
    cfg = ws / "cfg.json"
    cfg.write_text("epochs: 3\n")
    return _train_cli(ws, "--config", str(cfg))


@case("train", Exit(2), r"model_kwargs \{'widht': 0.5\} do not fit model 'inversionnet'.*widht")
def train_model_kwargs_unknown(ws, env):
    return _train_cli(ws, "--model-kwargs", '{"widht": 0.5}')


@case("train", Exit(2), r"argument --model-kwargs: expected a JSON object")
def train_model_kwargs_not_object(ws, env):
    return _train_cli(ws, "--model-kwargs", "[0.5]")


@case("train", Exit(2), r"fold must be in 0\.\.4 for folds=5, got 5")
def train_fold_out_of_range(ws, env):
    return _train_cli(ws, "--folds", "5", "--fold", "5")


@case("train", Exit(2), r"data path .*nodata does not exist")
def train_missing_data(ws, env):
    return _train_cli(ws, data=False)


@case("train", Exit(2), r"pde_shots must be shot indices 0\.\.4, got \[0, 5\]")
def train_pde_shot_out_of_range(ws, env):
    return _train_cli(ws, "--pde-weight", "0.1", "--pde-shots", "0", "5")


@case("train", Exit(2), r"sim_kwargs: unknown option\(s\) \['augmnet'\]")
def train_sim_kwargs_unknown(ws, env):
    return _train_cli(ws, "--sim-fraction", "0.5", "--sim-kwargs", '{"augmnet": {}}')


@case("train", Exit(2), r"resume=.*nothere\.pt: no such checkpoint file or run folder")
def train_resume_missing(ws, env):
    return _train_cli(ws, "--resume", str(ws / "nothere.pt"))


@case("train", Exit(2), r"scale_range must be two factors 0 < low <= high, got \(2.0, 1.0\)")
def train_scale_range_reversed(ws, env):
    return _train_cli(ws, "--scale-range", "2", "1")


@case("train", Exit(2), r"device='gpu' is not a torch device")
def train_bad_device(ws, env):
    return _train_cli(ws, "--device", "gpu")


# ============================================================================ tools.synth
def _synth(ws, *extra):
    from tools.synth import main
    argv = ["--out", str(ws / "synth"), "--samples-per-family", "1", "--test-samples", "0", "--families",
            "FlatVel_A", "--backend", "eager", "--device", "cpu", *extra]
    return lambda: main(argv)


@case("synth", Exit(2), r"argument --samples-per-family: invalid int value: '1.5'")
def synth_wrong_type(ws, env):
    return _synth(ws, "--samples-per-family", "1.5")


@case("synth", Exit(2), r"--samples-per-family must be >= 1, got 0")
def synth_zero_samples(ws, env):
    return _synth(ws, "--samples-per-family", "0")


@case("synth", Exit(2), r"--test-samples must be >= 0, got -3")
def synth_negative_test_samples(ws, env):
    return _synth(ws, "--test-samples", "-3")


@case("synth", Exit(2), r"--seed must be >= 0, got -1")
def synth_negative_seed(ws, env):
    return _synth(ws, "--seed", "-1")


@case("synth", Exit(2), r"unknown families \['FlatVel_C'\]; choose from .*FlatVel_A")
def synth_unknown_family(ws, env):
    return _synth(ws, "--families", "FlatVel_C")


@case("synth", Exit(2), r"synth exists and is not empty; pass --force to replace it")
def synth_existing_output(ws, env):
    (ws / "synth").mkdir()
    (ws / "synth" / "keep.txt").write_text("a previous dataset\n")
    return _synth(ws)


@case("synth", Exit(2), r"--out .*synth is a file, expected a folder")
def synth_output_is_a_file(ws, env):
    (ws / "synth").write_text("not a folder\n")
    return _synth(ws, "--force")


@case("synth", Exit(2), r"--device cuda: CUDA is not available here; use --device cpu")
def synth_cuda_missing(ws, env):
    import torch
    env.setattr(torch.cuda, "is_available", lambda: False)
    return _synth(ws, "--device", "cuda")


# ============================================================================ tools.evaluate
def _evaluate(ws, *extra, ckpt=None):
    from tools.evaluate import main
    root = mini_root(ws)
    ck = ckpt or tiny_checkpoint(ws / "run" / "best.pt")
    argv = ["--data", str(root), "--checkpoint", str(ck), *extra]
    return lambda: main(argv)


@case("evaluate", Exit(2), r"argument --batch-size: expected an integer >= 1, got '0'")
def evaluate_zero_batch(ws, env):
    return _evaluate(ws, "--batch-size", "0")


@case("evaluate", Exit(2), r"argument --max-samples: expected an integer >= 1, got '-3'")
def evaluate_negative_max_samples(ws, env):
    return _evaluate(ws, "--max-samples", "-3")


@case("evaluate", Exit(2), r"argument --physics: expected an integer >= 0, got '-1'")
def evaluate_negative_physics(ws, env):
    return _evaluate(ws, "--physics", "-1")


@case("evaluate", Exit(2), r"argument --mc-dropout: expected 0 \(off\) or at least 2 passes, got 1")
def evaluate_one_mc_pass(ws, env):
    return _evaluate(ws, "--mc-dropout", "1")


@case("evaluate", Exit(2), r"no family folders with data for \['FlatVel_Z'\]")
def evaluate_unknown_family(ws, env):
    return _evaluate(ws, "--families", "FlatVel_Z")


@case("evaluate", Exit(2), r"best\.pt: not a readable checkpoint")
def evaluate_truncated_checkpoint(ws, env):
    ck = tiny_checkpoint(ws / "run" / "best.pt")
    _truncate(ck, 300)
    return _evaluate(ws, ckpt=ck)


@case("evaluate", Exit(2), r"argument --weights: invalid choice: 'best'")
def evaluate_bad_weights(ws, env):
    return _evaluate(ws, "--weights", "best")


# ============================================================================ tools.build
BUILD_KERNEL = '''# %% [markdown]
# # Demo

# %% tags=["parameters"]
value = 2

# %%
from fwi_core.util import double
print(double(value))
'''
BUILD_META = {"id": "someone/demo-kernel", "title": "Demo Kernel", "code_file": "demo.ipynb",
              "language": "python", "kernel_type": "notebook", "competition_sources": ["waveform-inversion"]}


def _build_repo(ws, kernel: str = BUILD_KERNEL, meta=None, name: str = "demo") -> Path:
    repo = ws / "repo"
    (repo / "fwi_core").mkdir(parents=True, exist_ok=True)
    (repo / "fwi_core" / "__init__.py").write_text('__version__ = "1.0"\n')
    (repo / "fwi_core" / "util.py").write_text("def double(x):\n    return 2 * x\n")
    (repo / "kernels").mkdir(exist_ok=True)
    (repo / "kernel-metadata").mkdir(exist_ok=True)
    (repo / "kernels" / f"{name}.py").write_text(kernel)
    m = dict(BUILD_META) if meta is None else meta
    if name != "demo" and meta is None:
        m.update(id=f"someone/{name}-kernel", title=f"{name.title()} Kernel", code_file=f"{name}.ipynb")
    (repo / "kernel-metadata" / f"{name}.json").write_text(json.dumps(m) if isinstance(m, dict) else m)
    return repo


def _build(ws, repo, kernels=("demo",)):
    from tools.build import build
    out = ws / "build"
    return lambda: build(list(kernels), out, repo)


@case("build", BuildError, r"demo\.json: invalid kernel metadata:\n  - title must have at least 5 characters, got 'FWI'")
def build_short_title(ws, env):
    return _build(ws, _build_repo(ws, meta={**BUILD_META, "title": "FWI"}))


@case("build", BuildError, r"demo\.json: invalid kernel metadata:.*enable_internet must be true or false, got 'no'")
def build_internet_not_bool(ws, env):
    return _build(ws, _build_repo(ws, meta={**BUILD_META, "enable_internet": "no"}))


@case("build", BuildError, r"demo\.json: invalid kernel metadata:.*competition_sources must include 'waveform-inversion'")
def build_missing_competition(ws, env):
    return _build(ws, _build_repo(ws, meta={**BUILD_META, "competition_sources": []}))


@case("build", BuildError, r"demo\.json: invalid JSON")
def build_metadata_not_json(ws, env):
    return _build(ws, _build_repo(ws, meta='{"id": "someone/demo-kernel",'))


@case("build", BuildError, r"kernels/demo\.py imports 'fwi_core\.nowhere', which is not a module of fwi_core")
def build_missing_module(ws, env):
    return _build(ws, _build_repo(ws, kernel=BUILD_KERNEL + "import fwi_core.nowhere\n"))


@case("build", BuildError, r"kernels/demo\.py: syntax error in cell 3 \(line 10 of the file, line 3 of the cell\): ")
def build_syntax_error(ws, env):
    return _build(ws, _build_repo(ws, kernel=BUILD_KERNEL + "print(double(value)\n"))


@case("build", BuildError, r"kernels/demo\.py: syntax error in cell 3 \(line 10 of the file, line 3 of the cell\)")
def build_syntax_error_after_a_good_kernel(ws, env):
    repo = _build_repo(ws, kernel=BUILD_KERNEL + "print(double(value)\n")
    _build_repo(ws, name="good")
    return _build(ws, repo, kernels=("good", "demo"))   # nothing is written, not even "good"


@case("build", Exit(1), r"build failed: .*kernels/nosuch\.py: no such kernel")
def build_unknown_kernel(ws, env):
    from tools.build import main
    return lambda: main(["nosuch", "--out", str(ws / "build")])


# ============================================================================ tools.kaggle_cli
def _no_credentials(ws, env):
    for k in ("KAGGLE_API_TOKEN", "KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_CONFIG_DIR"):
        env.delenv(k, raising=False)
    env.setenv("HOME", str(ws))


@case("kaggle_cli", Exit(2), r"no Kaggle credentials: set KAGGLE_API_TOKEN")
def kaggle_push_without_credentials(ws, env):
    from tools.kaggle_cli import main
    _no_credentials(ws, env)
    return lambda: main(["push", "train"])


@case("kaggle_cli", Exit(2), r"build/nosuch/kernel-metadata\.json does not exist: run `make build` first")
def kaggle_status_unbuilt(ws, env):
    from tools.kaggle_cli import main
    return lambda: main(["status", "nosuch"])


@case("kaggle_cli", KaggleCLIError, r"kernel-metadata\.json: not valid JSON")
def kaggle_built_metadata_corrupt(ws, env):
    from tools.kaggle_cli import kernel_id
    (ws / "build" / "k").mkdir(parents=True)
    (ws / "build" / "k" / "kernel-metadata.json").write_text('{"id": "someone/k"')
    return lambda: kernel_id("k", ws / "build")


@case("kaggle_cli", KaggleCLIError, r"kernel-metadata\.json: no 'id' \(expected \"user/slug\"\)")
def kaggle_built_metadata_without_id(ws, env):
    from tools.kaggle_cli import kernel_id
    (ws / "build" / "k").mkdir(parents=True)
    (ws / "build" / "k" / "kernel-metadata.json").write_text('{"title": "Some Kernel"}')
    return lambda: kernel_id("k", ws / "build")


@case("kaggle_cli", KaggleCLIError, r"the kernel id is still 'your-kaggle-username/k'; write your Kaggle user name")
def kaggle_template_user(ws, env):
    from tools.kaggle_cli import personalise
    (ws / "k").mkdir()
    p = ws / "k" / "kernel-metadata.json"
    p.write_text(json.dumps({"id": "your-kaggle-username/k"}))
    return lambda: personalise(p, env={})


@case("kaggle_cli", Exit(2), r"invalid choice: 'pull'")
def kaggle_unknown_command(ws, env):
    from tools.kaggle_cli import main
    return lambda: main(["pull", "train"])


# ============================================================================ fwi_core.predict
def _predict(ws, *extra, ckpt=None, data=None):
    from fwi_core.predict import main
    root = data or mini_root(ws)
    ck = ckpt or tiny_checkpoint(ws / "runs" / "a" / "best.pt")
    argv = ["--data", str(root), "--checkpoints", str(ck), "--time-budget", "600", "--out", str(ws / "sub.csv"),
            "--stages", "members", *extra]
    return lambda: main(argv)


@case("predict", Exit(2), r"batch_size must be >= 1, got 0")
def predict_zero_batch(ws, env):
    return _predict(ws, "--batch-size", "0")


@case("predict", Exit(2), r"limit must be None or >= 1, got -1")
def predict_negative_limit(ws, env):
    return _predict(ws, "--limit", "-1")


@case("predict", Exit(2), r"argument --time-budget: invalid float value: '1h'")
def predict_budget_wrong_type(ws, env):
    return _predict(ws, "--time-budget", "1h")


@case("predict", Exit(2), r"mc_dropout: need at least 2 passes, got 1")
def predict_one_mc_pass(ws, env):
    return _predict(ws, "--stages", "members", "mc_dropout", "--mc-passes", "1")


@case("predict", Exit(2), r"best\.pt: not a readable checkpoint")
def predict_truncated_checkpoint(ws, env):
    ck = tiny_checkpoint(ws / "runs" / "a" / "best.pt")
    _truncate(ck, 500)
    return _predict(ws, ckpt=ck)


@case("predict", Exit(2), r"crf\.json: not a CRF configuration")
def predict_corrupt_crf_json(ws, env):
    ck = tiny_checkpoint(ws / "runs" / "a" / "best.pt")
    (ck.parent / "crf.json").write_text('{"iterations": 5, "temprature": 1}')
    return _predict(ws, ckpt=ck)


@case("predict", Exit(2), r"stage_gains\.json: not valid JSON")
def predict_corrupt_gains(ws, env):
    ck = tiny_checkpoint(ws / "runs" / "a" / "best.pt")
    (ck.parent / "stage_gains.json").write_text("{")
    return _predict(ws, ckpt=ck)


@case("predict", Exit(2), r"device='cuda' but CUDA is not available")
def predict_cuda_missing(ws, env):
    import torch
    env.setattr(torch.cuda, "is_available", lambda: False)
    return _predict(ws, "--device", "cuda")


# ---------------------------------------------------------------------- ensemble JSON
def _ensemble_json(ws, body) -> Path:
    ck = tiny_checkpoint(ws / "runs" / "a" / "best.pt")
    p = ws / "runs" / "ensemble.json"
    p.write_text(body if isinstance(body, str) else json.dumps(body))
    return ck, p


@case("ensemble", Exit(2), r"ensemble\.json: not valid JSON")
def ensemble_not_json(ws, env):
    ck, p = _ensemble_json(ws, '{"members": [')
    return _predict(ws, "--ensemble-config", str(p), ckpt=ck.parent)


@case("ensemble", Exit(2), r"ensemble\.json: unknown field\(s\) \['wieghts'\]")
def ensemble_unknown_field(ws, env):
    ck, p = _ensemble_json(ws, {"members": [{"name": "a", "checkpoint": "a/best.pt"}], "wieghts": {}})
    return _predict(ws, "--ensemble-config", str(p), ckpt=ck.parent)


@case("ensemble", Exit(2), r"ensemble\.json: members\[0\]\.weights: 'fp16' is not one of auto, raw, ema")
def ensemble_bad_member_weights(ws, env):
    ck, p = _ensemble_json(ws, {"members": [{"name": "a", "checkpoint": "a/best.pt", "weights": "fp16"}]})
    return _predict(ws, "--ensemble-config", str(p), ckpt=ck.parent)


@case("ensemble", Exit(2), r"ensemble\.json: members\['b'\]\.checkpoint: b/best\.pt not found")
def ensemble_missing_checkpoint(ws, env):
    ck, p = _ensemble_json(ws, {"members": [{"name": "a", "checkpoint": "a/best.pt"},
                                            {"name": "b", "checkpoint": "b/best.pt"}]})
    return _predict(ws, "--ensemble-config", str(p), ckpt=ck.parent)


@case("ensemble", Exit(2), r"ensemble\.json: format 'fwi_core\.ensemble/2', expected 'fwi_core\.ensemble/1'")
def ensemble_newer_format(ws, env):
    ck, p = _ensemble_json(ws, {"format": "fwi_core.ensemble/2", "members": [{"name": "a", "checkpoint": "a/best.pt"}]})
    return _predict(ws, "--ensemble-config", str(p), ckpt=ck.parent)


@case("ensemble", ValueError, r"oof_fold0\.npz: not a readable out-of-fold file")
def ensemble_fit_corrupt_oof(ws, env):
    from fwi_core.ensemble.fit import fit_ensemble
    (ws / "runs" / "a-fold0").mkdir(parents=True)
    (ws / "runs" / "a-fold0" / "oof_fold0.npz").write_bytes(b"PK\x03\x04 not really a zip")
    return lambda: fit_ensemble([ws / "runs"], ws / "runs" / "ensemble.json")


def _ensemble_fit(ws, *extra):
    from fwi_core.ensemble.__main__ import main
    from tests.ensemble.test_fit import good_and_bad
    good_and_bad(ws / "runs", n=4)
    argv = ["fit", str(ws / "runs"), "--out", str(ws / "ensemble.json"), "--method", "projected_gradient", *extra]
    return lambda: main(argv)


@case("ensemble", Exit(2), r"argument --iterations: expected an integer >= 1, got '0'")
def ensemble_fit_zero_iterations(ws, env):
    return _ensemble_fit(ws, "--iterations", "0")


@case("ensemble", Exit(2), r"argument --n-trials: expected an integer >= 1, got '-5'")
def ensemble_fit_negative_trials(ws, env):
    return _ensemble_fit(ws, "--n-trials", "-5")


@case("ensemble", Exit(2), r"argument --physics-nt: expected an integer >= 0, got '-3'")
def ensemble_fit_negative_physics_nt(ws, env):
    return _ensemble_fit(ws, "--physics-nt", "-3")


@case("ensemble", Exit(2), r"argument --out: .*runs is a folder, expected the ensemble JSON file to write")
def ensemble_fit_out_is_a_folder(ws, env):
    from fwi_core.ensemble.__main__ import main
    from tests.ensemble.test_fit import good_and_bad
    good_and_bad(ws / "runs", n=4)
    return lambda: main(["fit", str(ws / "runs"), "--out", str(ws / "runs")])


@case("ensemble", Exit(2), r"argument --family-classifier: .*nope\.pt does not exist")
def ensemble_fit_missing_family_classifier(ws, env):
    return _ensemble_fit(ws, "--family-classifier", str(ws / "nope.pt"))


# ============================================================================ tools.pseudo_label
def _pseudo(ws, *extra, ckpt=None):
    from tools.pseudo_label import main
    root = mini_root(ws)
    ck = ckpt or tiny_checkpoint(ws / "runs" / "a" / "best.pt")
    argv = ["--data", str(root), "--checkpoints", str(ck), "--out", str(ws / "pseudo"), "--device", "cpu", *extra]
    return lambda: main(argv)


@case("pseudo_label", Exit(2), r"limit must be >= 1, got 0")
def pseudo_zero_limit(ws, env):
    return _pseudo(ws, "--limit", "0")


@case("pseudo_label", Exit(2), r"family '\.\./x' must be a plain folder name")
def pseudo_family_path(ws, env):
    return _pseudo(ws, "--family", "../x")


@case("pseudo_label", Exit(2), r"best\.pt: not a readable checkpoint")
def pseudo_truncated_checkpoint(ws, env):
    ck = tiny_checkpoint(ws / "runs" / "a" / "best.pt")
    _truncate(ck, 100)
    return _pseudo(ws, ckpt=ck)


@case("pseudo_label", Exit(2), r"device='cuda' but CUDA is not available on this machine")
def pseudo_cuda_missing(ws, env):
    import torch
    env.setattr(torch.cuda, "is_available", lambda: False)
    return _pseudo(ws, "--device", "cuda")


# ============================================================================ checkpoints
def _load_model(ck, **kw):
    from fwi_core.train import load_model
    return lambda: load_model(ck, **kw)


@case("checkpoint", CheckpointError, r"best\.pt: not a readable checkpoint")
def checkpoint_truncated(ws, env):
    ck = tiny_checkpoint(ws / "run" / "best.pt")
    _truncate(ck, ck.stat().st_size // 2)
    return _load_model(ck)


@case("checkpoint", CheckpointError, r"best\.pt: the weights do not fit model 'inversionnet'")
def checkpoint_of_another_model(ws, env):
    import torch
    from fwi_core.train.checkpoint import load_checkpoint, save_checkpoint
    ck = tiny_checkpoint(ws / "run" / "best.pt")
    c = load_checkpoint(ck)
    c["metadata"]["model_kwargs"] = {"width": 0.125}      # the weights are of a narrower model
    save_checkpoint(c, ck)
    del torch
    return _load_model(ck)


@case("checkpoint", CheckpointError, r"best\.pt: written by a newer fwi_core \(format 'fwi_core\.train/2'\); "
                                     r"this version reads 'fwi_core\.train/1'")
def checkpoint_newer_format(ws, env):
    from fwi_core.train.checkpoint import load_checkpoint, save_checkpoint
    ck = tiny_checkpoint(ws / "run" / "best.pt")
    c = load_checkpoint(ck)
    c["format"] = "fwi_core.train/2"
    save_checkpoint(c, ck)
    return _load_model(ck)


@case("checkpoint", CheckpointError, r"best\.pt: checkpoint lacks 'model'")
def checkpoint_missing_keys(ws, env):
    from fwi_core.train.checkpoint import load_checkpoint, save_checkpoint
    ck = tiny_checkpoint(ws / "run" / "best.pt")
    c = load_checkpoint(ck)
    del c["model"]
    save_checkpoint(c, ck)
    return _load_model(ck)


@case("checkpoint", CheckpointError, r"best\.pt: metadata lacks 'model'")
def checkpoint_metadata_without_model(ws, env):
    from fwi_core.train.checkpoint import load_checkpoint, save_checkpoint
    ck = tiny_checkpoint(ws / "run" / "best.pt")
    c = load_checkpoint(ck)
    del c["metadata"]["model"]
    save_checkpoint(c, ck)
    return _load_model(ck)


@case("checkpoint", CheckpointError, r"device='cuda' but CUDA is not available on this machine")
def checkpoint_on_machine_without_cuda(ws, env):
    import torch
    ck = cuda_tagged_checkpoint(ws / "run" / "best.pt")
    env.setattr(torch.cuda, "is_available", lambda: False)
    return _load_model(ck, device="cuda")


@case("checkpoint", Exit(2), r"resume=.*best\.pt: a weights-only checkpoint \(best/snapshot\)")
def checkpoint_resume_from_weights_only(ws, env):
    ck = tiny_checkpoint(ws / "run" / "best.pt")
    (ws / "run2").mkdir()
    return _train_cli(ws, "--resume", str(ck), "--out", str(ws / "run2"))


def cuda_tagged_checkpoint(path: Path) -> Path:
    """A checkpoint whose tensors are recorded as CUDA tensors (as one saved on a GPU is),
    made without a GPU by rewriting the storage locations in the pickle."""
    import zipfile

    tiny_checkpoint(path)
    with zipfile.ZipFile(path) as z:
        items = [(i, z.read(i.filename)) for i in z.infolist()]
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        for info, data in items:
            if info.filename.endswith("data.pkl"):
                assert b"X\x03\x00\x00\x00cpu" in data
                data = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
            z.writestr(info, data)
    return path


# ============================================================================ submissions
def _rows(oid, n=70, val="3000.0"):
    return [f"{oid}_y_{r}," + ",".join([val] * 35) for r in range(n)]


def _csv(ws, rows, header=None) -> Path:
    p = ws / "submission.csv"
    p.write_text(",".join(header or HEADER) + "\n" + "\n".join(rows) + ("\n" if rows else ""))
    return p


def _validate(p, oids=None):
    from fwi_core.data import validate_submission
    return lambda: validate_submission(p, oids)


@case("submission", SubmissionError, r"submission\.csv: header must be 'oid_ypos,x_1,x_3,...,x_69' \(35 odd columns\), "
                                     r"got 'oid_ypos,x_0,")
def submission_wrong_header(ws, env):
    return _validate(_csv(ws, _rows("aaaaaaaaaa"), ["oid_ypos"] + [f"x_{c}" for c in range(0, 70, 2)]))


@case("submission", SubmissionError, r"submission\.csv: 1 test oids missing, e\.g\. \['bbbbbbbbbb'\]")
def submission_missing_oid(ws, env):
    return _validate(_csv(ws, _rows("aaaaaaaaaa")), ["aaaaaaaaaa", "bbbbbbbbbb"])


@case("submission", SubmissionError, r"submission\.csv:72: row 'aaaaaaaaaa_y_0' appears twice")
def submission_duplicated_oid(ws, env):
    return _validate(_csv(ws, _rows("aaaaaaaaaa") + _rows("aaaaaaaaaa")))


@case("submission", SubmissionError, r"submission\.csv:9: x_1 is 'inf', expected a finite number")
def submission_non_finite(ws, env):
    rows = _rows("aaaaaaaaaa")
    rows[7] = rows[7].replace("3000.0", "inf", 1)
    return _validate(_csv(ws, rows))


@case("submission", SubmissionError, r"submission\.csv: oid 'aaaaaaaaaa' lacks rows \[69\]")
def submission_wrong_row_count(ws, env):
    return _validate(_csv(ws, _rows("aaaaaaaaaa", n=69)))


@case("submission", SubmissionError, r"submission\.csv: 1 oids not in the test set, e\.g\. \['cccccccccc'\]")
def submission_extra_oid(ws, env):
    return _validate(_csv(ws, _rows("aaaaaaaaaa") + _rows("cccccccccc")), ["aaaaaaaaaa"])


@case("submission", SubmissionError, r"submission\.csv: not a UTF-8 CSV text file")
def submission_not_text(ws, env):
    p = ws / "submission.csv"
    p.write_bytes(b"oid_ypos,x_1\n\x80\x81\xff" * 3)
    return _validate(p)


@case("submission", SubmissionError, r"submission\.csv: no rows")
def submission_header_only(ws, env):
    return _validate(_csv(ws, []))


@case("submission", Warns(SubmissionRangeWarning), r"submission\.csv: 2 values outside \[1500, 4500\] m/s "
                                                    r"\(first at line 4, x_3 = 1499\.5\)")
def submission_values_out_of_range(ws, env):
    rows = _rows("aaaaaaaaaa")
    rows[2] = rows[2].replace("3000.0,3000.0", "3000.0,1499.5", 1)
    rows[30] = rows[30].replace("3000.0", "4600", 1)
    return _validate(_csv(ws, rows))


@case("submission", SubmissionError, r"prediction for oid '00aa11bb22' contains NaN or inf")
def writer_nan_prediction(ws, env):
    from fwi_core.data import write_submission
    v = np.full((2, 1, 70, 70), 3000.0, np.float32)
    v[1, 0, 3, 3] = np.nan
    return lambda: write_submission(ws / "submission.csv", ["33cc44dd55", "00aa11bb22"], v)


@case("submission", SubmissionError, r"oid 'a,b' is not a valid test id \(no commas, quotes, spaces or newlines\)")
def writer_oid_with_comma(ws, env):
    from fwi_core.data import write_submission
    return lambda: write_submission(ws / "submission.csv", ["a,b"], np.full((1, 70, 70), 3000.0))


@case("submission", SubmissionError, r"prediction for oid 'x' has shape \(70, 35\), expected \(70, 70\) or \(1, 70, 70\)")
def writer_wrong_shape(ws, env):
    from fwi_core.data import write_submission
    previous = ws / "submission.csv"
    previous.write_text("a previous good submission\n")         # must survive the failed write
    return lambda: write_submission(previous, ["x"], np.full((1, 70, 35), 3000.0))


# ============================================================================ kernels
#: a value of the wrong type for each kind of default
_WRONG = {int: "3x", float: "fast", bool: "yes", str: 5, list: 5, dict: [1, 2], tuple: "wide", type(None): {}}


def kernel_parameters(kernel: str) -> Dict[str, Any]:
    """The parameters cell of ``kernels/<kernel>.py``: {name: default}."""
    import ast

    import jupytext

    nb = jupytext.read(ROOT / "kernels" / f"{kernel}.py")
    cell = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])][0]
    out = {}
    for node in ast.parse(cell.source).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            out[node.targets[0].id] = ast.literal_eval(node.value)
    return out


class KernelAccepted(AssertionError):
    """The kernel went on past its parameter checks (the wrong value was accepted)."""


def run_kernel(kernel: str, overrides: Dict[str, Any], stop: str) -> None:
    """Run the kernel's code cells as papermill would, with ``overrides`` injected after
    the parameters cell, up to the first cell containing ``stop`` (not run: reaching it
    means the parameters were accepted)."""
    import jupytext

    nb = jupytext.read(ROOT / "kernels" / f"{kernel}.py")
    ns: Dict[str, Any] = {"__name__": "__main__"}
    injected = False
    for c in nb.cells:
        if c.cell_type != "code":
            continue
        if stop in c.source:
            raise KernelAccepted(f"kernel {kernel} reached {stop!r} with {overrides}")
        exec(compile(c.source, f"kernels/{kernel}.py", "exec"), ns)
        if not injected and "parameters" in c.metadata.get("tags", []):
            ns.update(overrides)
            injected = True


def kernel_cases() -> List[Case]:
    """One row per parameter of each kernel: a value of the wrong type is refused, with a
    message naming the parameter, before the kernel does any work."""
    rows = []
    for kernel, stop in (("train", "result = train(cfg)"), ("infer", "summary = run_budgeted(")):
        for name, default in kernel_parameters(kernel).items():
            wrong = _WRONG[type(default)]

            def setup(ws, env, kernel=kernel, name=name, wrong=wrong, stop=stop):
                root = mini_root(ws)
                (ws / "out").mkdir()
                base = {"data_root": str(root), "output_dir": str(ws / "out")}
                if kernel == "infer":
                    ck = tiny_checkpoint(ws / "runs" / "a" / "best.pt")
                    base.update(checkpoints=[str(ck)], checkpoint_dirs=[str(ck.parent)], time_budget=600)
                base[name] = wrong
                return lambda: run_kernel(kernel, base, stop)

            rows.append(Case(f"kernel:{kernel}.{name}", "kernel", setup, ParameterError,
                             rf"{kernel} kernel parameter {name}: expected .+, got {re.escape(repr(wrong))}"))
    return rows


@case("kernel", ConfigError, r"batch_size must be >= 1, got -4")
def train_kernel_negative_batch(ws, env):
    root = mini_root(ws)
    (ws / "out").mkdir()
    return lambda: run_kernel("train", {"data_root": str(root), "output_dir": str(ws / "out"), "batch_size": -4},
                              "plot_curves(result")


@case("kernel", ConfigError, r"unknown model 'caformer'; registered models")
def train_kernel_unknown_model(ws, env):
    root = mini_root(ws)
    (ws / "out").mkdir()
    return lambda: run_kernel("train", {"data_root": str(root), "output_dir": str(ws / "out"), "model_name": "caformer"},
                              "plot_curves(result")


@case("kernel", StageError, r"unknown stage 'rotate'")
def infer_kernel_unknown_stage(ws, env):
    root = mini_root(ws)
    (ws / "out").mkdir()
    ck = tiny_checkpoint(ws / "runs" / "a" / "best.pt")
    return lambda: run_kernel("infer", {"data_root": str(root), "output_dir": str(ws / "out"), "checkpoints": [str(ck)],
                                        "stages": ["members", "rotate"], "time_budget": 600}, "test_solution.npz")


@case("kernel", ValueError, r"find_checkpoints: kind must be one of best, snapshot, last, all, got 'newest'")
def infer_kernel_unknown_checkpoint_kind(ws, env):
    root = mini_root(ws)
    (ws / "out").mkdir()
    tiny_checkpoint(ws / "runs" / "a" / "best.pt")
    return lambda: run_kernel("infer", {"data_root": str(root), "output_dir": str(ws / "out"),
                                        "checkpoint_dirs": [str(ws / "runs")], "checkpoint_kind": "newest",
                                        "time_budget": 600}, "test_solution.npz")


@case("kernel", ValueError, r"time budget must be a positive number of seconds, got -60")
def infer_kernel_negative_budget(ws, env):
    root = mini_root(ws)
    (ws / "out").mkdir()
    ck = tiny_checkpoint(ws / "runs" / "a" / "best.pt")
    return lambda: run_kernel("infer", {"data_root": str(root), "output_dir": str(ws / "out"), "checkpoints": [str(ck)],
                                        "time_budget": -60}, "test_solution.npz")


CASES.extend(kernel_cases())
