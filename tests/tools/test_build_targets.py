"""tools.build --target colab|sagemaker (kaggle, the default, is tests/tools/test_build.py)."""
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import nbformat
import pytest

from tools.build import COLAB_CELL, DRIVE_MOUNT, BuildError, build, build_notebook, main

from tests.tools.test_build import make_root
from tests.train.helpers import write_layout

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory) -> Path:
    """A copy of the repository's build inputs: the checkout may change while the tests run."""
    dest = tmp_path_factory.mktemp("snapshot")
    for part in ("fwi_core", "kernels", "kernel-metadata"):
        shutil.copytree(ROOT / part, dest / part, ignore=shutil.ignore_patterns("__pycache__", "*.ipynb"))
    return dest


def _colab_cell(nb):
    return [c for c in nb.cells if c.source.startswith("# Colab: ")]


def test_colab_notebook_has_drive_parameter_colab_cell_and_gpu_runtime(tmp_path):
    root = make_root(tmp_path)
    shutil.rmtree(root / "kernel-metadata")         # Colab needs no Kaggle metadata
    paths = build(["demo"], tmp_path / "out", root, target="colab", drive_folder="/content/drive/MyDrive/x")
    assert paths == [tmp_path / "out" / "demo" / "demo.ipynb"]
    assert sorted(p.name for p in (tmp_path / "out" / "demo").iterdir()) == ["demo.ipynb"]
    nb = nbformat.read(paths[0], as_version=4)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])][0]
    assert params.source.splitlines()[-1].startswith("drive_folder = '/content/drive/MyDrive/x'  # Colab")
    check = [i for i, c in enumerate(nb.cells) if c.source.startswith("import importlib\nimportlib.invalidate")][0]
    assert nb.cells[check + 1] is _colab_cell(nb)[0]
    assert 'output_dir = str(_drive / "outputs" / "demo")' in nb.cells[check + 1].source
    assert nb.metadata.accelerator == "GPU" and nb.metadata.colab.gpuType == "T4"
    assert nb.metadata.fwi_toolkit.target == "colab"
    assert "--target colab" in nb.cells[2].source and not any("--no-index" in c.source for c in nb.cells)
    first = paths[0].read_bytes()
    build(["demo"], tmp_path / "out", root, target="colab", drive_folder="/content/drive/MyDrive/x")
    assert paths[0].read_bytes() == first
    # the Kaggle build is unchanged: no drive_folder, no Colab cell
    kaggle, _, _ = build_notebook("demo", make_root(tmp_path / "k"))
    assert not _colab_cell(kaggle) and "drive_folder" not in json.dumps(kaggle)


def test_colab_cell_mounts_drive_and_names_a_missing_folder(tmp_path, monkeypatch):
    """On Colab (google.colab importable) a folder under /content/drive that is not there
    yet mounts Drive first; a folder that still does not exist is a clear error."""
    mounted = []
    colab = types.ModuleType("google.colab")
    colab.drive = types.SimpleNamespace(mount=mounted.append)
    monkeypatch.setitem(sys.modules, "google", types.ModuleType("google"))
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    code = COLAB_CELL.format(mount=DRIVE_MOUNT, kernel="infer")
    ns = {"drive_folder": "/content/drive/MyDrive/not-there", "data_root": None, "output_dir": "."}
    with pytest.raises(FileNotFoundError, match=r"drive_folder='/content/drive/MyDrive/not-there': no such folder"):
        exec(code, ns)
    assert mounted == ["/content/drive"]
    drive = tmp_path / "drive"
    drive.mkdir()
    ns = {"drive_folder": str(drive), "data_root": None, "output_dir": ".",
          "checkpoint_dirs": [".", "/kaggle/input", "/elsewhere"]}
    exec(code, ns)
    assert mounted == ["/content/drive"]           # not under /content/drive: nothing to mount
    assert (ns["data_root"], ns["output_dir"]) == (str(drive), str(drive / "outputs" / "infer"))
    assert ns["checkpoint_dirs"] == [str(drive / "outputs"), "/elsewhere"]
    ns = {"drive_folder": str(drive), "data_root": "/mine", "output_dir": "/out"}
    exec(code, ns)
    assert (ns["data_root"], ns["output_dir"]) == ("/mine", "/out")


def test_sagemaker_source_folder(tmp_path, snapshot, capsys):
    out = tmp_path / "sm"
    entry = build(None, out, snapshot, target="sagemaker", requirements=["timm==1.0.31"])[0]
    assert entry == out / "train_entry.py"
    info = json.loads((out / "build-info.json").read_text())
    assert "fwi_core.sagemaker_entry" in info["modules"] and "fwi_core.train.cli" in info["modules"]
    assert not any(m.startswith("fwi_core.inference_plan") for m in info["modules"])   # only what training needs
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*.py") if p.name != "train_entry.py")
    assert len(files) == len(info["modules"])
    assert (out / "requirements.txt").read_text() == "timm==1.0.31\n"
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    build(None, out, snapshot, target="sagemaker", requirements=["timm==1.0.31"])    # replaces it, identically
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]            # no staging left behind
    # the folder stands alone: its entry point imports the vendored copy (no fwi_core elsewhere)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SM_") and k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "train_entry.py"], cwd=out, env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "SM_MODEL_DIR is not set" in r.stderr, r.stderr


@pytest.mark.parametrize("argv, match", [
    (["train", "--target", "sagemaker"], "builds a source folder, not kernels"),
    (["--target", "sagemaker", "--requirements", "timm; rm -rf /"], "pip requirement specifiers"),
])
def test_bad_target_arguments_fail_clearly(tmp_path, capsys, argv, match):
    assert main(argv + ["--out", str(tmp_path / "o")]) == 1
    assert match in capsys.readouterr().err
    with pytest.raises(BuildError, match="choose one of kaggle, colab, sagemaker"):
        build(None, tmp_path, target="aws")


@pytest.mark.slow
def test_colab_train_notebook_runs_with_a_fake_drive(tmp_path, snapshot):
    """The real train kernel built for Colab, run by papermill 'on Colab' (COLAB_RELEASE_TAG)
    with a Drive folder holding the data: the run lands in <drive>/outputs/train."""
    papermill = pytest.importorskip("papermill")
    build(["train"], tmp_path / "build", snapshot, target="colab")
    drive = tmp_path / "MyDrive" / "fwi"
    write_layout(drive / "waveform-inversion", per_family=4)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    saved = {k: os.environ.get(k) for k in ("COLAB_RELEASE_TAG", "PYTHONPATH", "FWI_PROGRESS", "OMP_NUM_THREADS")}
    os.environ.update(COLAB_RELEASE_TAG="release-colab-test", FWI_PROGRESS="0", OMP_NUM_THREADS="1")
    os.environ.pop("PYTHONPATH", None)          # fwi_core comes from the notebook, not the checkout
    try:
        papermill.execute_notebook(
            str(tmp_path / "build/train/train.ipynb"), str(run_dir / "out.ipynb"), cwd=str(run_dir),
            kernel_name="python3", progress_bar=False,
            parameters={"drive_folder": str(drive), "model_name": "inversionnet_small", "epochs": 1,
                        "batch_size": 2, "folds": 2, "amp": "off", "num_workers": 0, "ema_decay": 0.0})
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    nb = nbformat.read(run_dir / "out.ipynb", as_version=4)
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "colab: session limit 11.0 h, 1 host, 0 GPUs here | cpu (" in text
    assert f"| data: {drive} | outputs: {drive / 'outputs' / 'train'}" in text
    assert "no GPU in this runtime" in text
    from fwi_core.models.checkpoint import read_metadata

    meta = read_metadata(drive / "outputs" / "train" / "best.pt")
    assert meta["platform"] == "colab" and meta["epoch"] == 1
    assert (drive / "outputs" / "train" / "curves.png").is_file() and not (run_dir / "best.pt").exists()
