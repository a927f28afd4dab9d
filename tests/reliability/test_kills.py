"""Kills at every write: ``tools.synth``, ``python -m fwi_core.train``, ``python -m
fwi_core.predict`` (``submission.csv``) and ``tools.build`` are killed with SIGKILL at
randomised points while they write (:mod:`tests.reliability.killer`). After each kill the
previous good state is intact (every file the previous one or a complete new one, nothing
half-written), and a rerun (``--resume`` for training and inference) ends with the same
result as an uninterrupted run, byte for byte, with no temporary file left.

The default run tries ``KILLS_DEFAULT`` points per target; the slow-marked variant (``make
test-slow``) ``KILLS_SLOW``. ``FWI_KILL_SEED=N`` replays a run's kill points. (The
planner's own kill test at chosen commit points is ``tests/test_predict.py``.)
"""
from __future__ import annotations

import random
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.reliability.helpers import temp_leftovers, tree_state
from tests.reliability.killer import (KILLS_DEFAULT, KILLS_SLOW, ROOT, KillPoint, Tally, TempWatch, appears,
                                      kill_points, kill_seed, python, run_and_kill)

COUNTS = [pytest.param(KILLS_DEFAULT, id="default"), pytest.param(KILLS_SLOW, id="slow", marks=pytest.mark.slow)]


# the same arithmetic as the killed subprocesses (one thread), so results compare byte for byte
pytestmark = pytest.mark.usefixtures("one_thread")


def _tally(target: str, n: int, capsys):
    """The kill points' random source and tally; prints the seed first (replay a run with
    ``FWI_KILL_SEED=<seed>``), so a failure anywhere after it can be replayed."""
    seed = kill_seed()
    with capsys.disabled():
        print(f"\nkills[{target}]: FWI_KILL_SEED={seed} (set it to replay these kill points)")
    return random.Random(f"{target}:{seed}:{n}"), Tally(target, seed)


def _report(tally: Tally, capsys) -> None:
    with capsys.disabled():
        print("\n" + tally.line())


def _kill(tally: Tally, rng: random.Random, point: KillPoint, window: float, prepare, launch):
    """Prepare the previous state and launch the run killed at ``point``; a point the run
    outlives (it finished first, or the k-th write was not seen) is replaced by a random
    delay in the first half of the run, so every point counted is a run killed midway.
    Returns (point, outcome)."""
    for _ in range(4):
        prepare()
        outcome = launch(point)
        if outcome.killed:
            break
        assert outcome.returncode == 0, f"{outcome.stderr}\n({tally.line()})"
        tally.outlived += 1
        point = KillPoint(delay=0.5 * window * rng.random())
    tally.add(point, outcome)
    assert outcome.killed, f"four kill points outlived by the run ({tally.line()})"
    return point, outcome


# ------------------------------------------------------------------------------ tools.synth
SYNTH = ["--samples-per-family", "1", "--test-samples", "1", "--families", "FlatVel_A", "FlatFault_A",
         "--samples-per-file", "1", "--backend", "eager", "--device", "cpu", "--seed", "2", "--force"]


@pytest.mark.parametrize("n", COUNTS)
def test_synth_killed_while_writing(tmp_path, n, capsys):
    from tools import synth

    rng, tally = _tally("synth", n, capsys)
    ref = tmp_path / "ref" / "ds"
    t = time.perf_counter()
    with TempWatch(ref.parent) as writes:
        assert synth.main(["--out", str(ref), *SYNTH]) == 0
    window = time.perf_counter() - t
    new = tree_state(ref)
    saved = tmp_path / "previous"
    synth.build(saved, 1, 0, seed=1, families=["FlatVel_A"], backend="eager", device="cpu")   # an older dataset
    previous = tree_state(saved)
    assert previous != new
    parent = tmp_path / "work"
    out = parent / "ds"
    def prepare():
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(saved, out)

    for point in kill_points(rng, n, window, writes.count):
        point, outcome = _kill(tally, rng, point, window, prepare, lambda p: run_and_kill(
            python("-m", "tools.synth", "--out", str(out), *SYNTH), p, start=appears(parent, ".ds.*.staging"),
            watch=parent))
        state = tree_state(out) if out.is_dir() else None
        assert state in (previous, new), f"after a kill {point}: {out} is neither the previous dataset nor " \
                                         f"the new one ({tally.line()})"
        assert synth.main(["--out", str(out), *SYNTH]) == 0          # rerun
        assert tree_state(out) == new, tally.line()
        assert sorted(p.name for p in parent.iterdir()) == ["ds"], f"left beside the dataset: {tally.line()}"
        tally.survived += 1
    _report(tally, capsys)


# ------------------------------------------------------------------------------ fwi_core.train
def _train_args(data: Path, out: Path):
    return ["--data", str(data), "--out", str(out), "--model", "inversionnet", "--model-kwargs", '{"width": 0.0625}',
            "--epochs", "3", "--batch-size", "2", "--folds", "2", "--fold", "0", "--num-workers", "0",
            "--device", "cpu", "--time-budget", "0", "--checkpoint-every", "1", "--flip-prob", "0.5",
            "--ema-decay", "0.9", "--log-every", "1", "--keep-last", "2", "--seed", "3"]


def _final(run: Path):
    """The final state of a run: the last checkpoint's weights, EMA, optimizer moments and
    history, best.pt's weights, the out-of-fold predictions."""
    from fwi_core.train import CheckpointManager, load_checkpoint

    last = load_checkpoint(CheckpointManager(run).latest())
    best = load_checkpoint(run / "best.pt")
    oof = np.load(run / "oof_fold0.npz")
    history = [{k: r[k] for k in ("epoch", "step", "val_mae", "train_loss")} for r in last["state"]["history"]]
    return last, best, oof, history


def _assert_same_training(a: Path, b: Path, msg: str) -> None:
    la, ba, oa, ha = _final(a)
    lb, bb, ob, hb = _final(b)
    assert ha == hb, msg
    for part in ("model", "ema"):
        for k, v in la[part].items():
            assert torch.equal(v, lb[part][k]), f"{part}.{k}: {msg}"
    for k, v in ba["model"].items():
        assert torch.equal(v, bb["model"][k]), f"best.{k}: {msg}"
    for i, s in la["state"]["optimizer"]["state"].items():
        assert torch.equal(s["exp_avg"], lb["state"]["optimizer"]["state"][i]["exp_avg"]), msg
    assert np.array_equal(oa["pred"], ob["pred"]), msg
    assert _log_rows(a) == _log_rows(b), msg


@pytest.mark.parametrize("n", COUNTS)
def test_training_killed_while_checkpointing_resumes_to_the_same_result(tmp_path, n, capsys):
    from fwi_core.train import load_checkpoint
    from fwi_core.train.cli import main
    from tests.train.helpers import write_layout

    rng, tally = _tally("train", n, capsys)
    data = write_layout(tmp_path / "data", per_family=4, families=("FlatVel_A", "CurveFault_A"))
    ref = tmp_path / "ref"
    t = time.perf_counter()
    with TempWatch(tmp_path) as writes:
        assert main(_train_args(data, ref)) == 0
    window = time.perf_counter() - t
    run = tmp_path / "run"

    def prepare():
        if run.exists():
            shutil.rmtree(run)

    for point in kill_points(rng, n, window, writes.count):
        point, outcome = _kill(tally, rng, point, window, prepare, lambda p: run_and_kill(
            python("-m", "fwi_core.train", *_train_args(data, run)), p, start=appears(run, "config.json"),
            watch=tmp_path))
        for ck in sorted(run.glob("*.pt")):               # every checkpoint on disk is whole
            load_checkpoint(ck)
        assert main(_train_args(data, run) + ["--resume"]) == 0
        _assert_same_training(ref, run, f"resumed after a kill {point} ({tally.line()})")
        assert not temp_leftovers(run), f"{temp_leftovers(run)} ({tally.line()})"
        tally.survived += 1
    _report(tally, capsys)


# ------------------------------------------------------------------------------ fwi_core.predict
@pytest.mark.parametrize("n", COUNTS)
def test_predict_killed_while_writing_the_submission_resumes_to_the_same_bytes(tmp_path, n, capsys):
    from fwi_core.data import list_test, validate_submission, write_submission
    from fwi_core.predict import main
    from tests.inference_plan.helpers import tiny_checkpoint, write_test_root

    rng, tally = _tally("predict", n, capsys)
    root = write_test_root(tmp_path / "data", 7)
    tiny_checkpoint(tmp_path / "runs" / "r" / "best.pt", 0)
    tiny_checkpoint(tmp_path / "runs" / "r" / "snapshot-01.pt", 1)
    oids = [o for o, _ in list_test(root)]
    args = ["--data", str(root), "--checkpoints", str(tmp_path / "runs"), "--checkpoint-kind", "all",
            "--time-budget", "100000", "--batch-size", "3", "--mc-passes", "2",
            "--stages", "members", "flip", "crf", "mc_dropout"]
    ref = tmp_path / "ref"
    t = time.perf_counter()
    with TempWatch(ref) as writes:
        assert main(args + ["--out", str(ref / "submission.csv")]) == 0
    window = time.perf_counter() - t
    full = (ref / "submission.csv").read_bytes()
    work = tmp_path / "work"
    out = work / "submission.csv"
    previous = write_submission(tmp_path / "previous.csv", oids,
                                np.full((len(oids), 70, 70), 3000.0, np.float32)).read_bytes()

    def prepare():                                        # a previous submission, no saved progress
        if work.exists():
            shutil.rmtree(work)
        work.mkdir()
        out.write_bytes(previous)

    for point in kill_points(rng, n, window, writes.count):
        point, outcome = _kill(tally, rng, point, window, prepare, lambda p: run_and_kill(
            python("-m", "fwi_core.predict", *args, "--out", str(out)), p,
            start=appears(work, ".submission.csv.state"), watch=work))
        if out.read_bytes() != previous:                  # a stage finished: a complete, valid CSV
            assert validate_submission(out, oids)["oids"] == len(oids), tally.line()
        assert main(args + ["--out", str(out), "--resume"]) == 0, tally.line()
        assert out.read_bytes() == full, f"resumed after a kill {point} ({tally.line()})"
        assert not temp_leftovers(work), f"{temp_leftovers(work)} after a kill {point} ({tally.line()})"
        tally.survived += 1
    _report(tally, capsys)


# ------------------------------------------------------------------------------ tools.build
def _repo_copy(dest: Path, marker: str = "") -> Path:
    """A snapshot of the repository's build inputs (the checkout may change meanwhile);
    ``marker`` adds a markdown cell to every kernel (an older version of them)."""
    for part in ("fwi_core", "kernels", "kernel-metadata"):
        shutil.copytree(ROOT / part, dest / part, ignore=shutil.ignore_patterns("__pycache__", "*.ipynb"))
    if marker:
        for k in (dest / "kernels").glob("*.py"):
            k.write_text(k.read_text() + f"\n# %% [markdown]\n# {marker}\n")
    return dest


@pytest.mark.parametrize("n", COUNTS)
def test_build_killed_while_writing_keeps_the_previous_build(tmp_path, n, capsys):
    from tools.build import build

    rng, tally = _tally("build", n, capsys)
    repo = _repo_copy(tmp_path / "repo")
    old_repo = _repo_copy(tmp_path / "old", marker="an older version of this kernel")
    ref = tmp_path / "ref"
    t = time.perf_counter()
    with TempWatch(ref) as writes:
        reference = run_and_kill(python("-m", "tools.build", "--root", str(repo), "--out", str(ref)),
                                 KillPoint(delay=600))
    window = time.perf_counter() - t
    assert reference.returncode == 0, reference.stderr
    new = tree_state(ref)[0]
    out = tmp_path / "build"
    build(None, tmp_path / "old-build", old_repo)
    old = tree_state(tmp_path / "old-build")[0]
    assert old.keys() == new.keys() and old != new

    def prepare():
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(tmp_path / "old-build", out)

    for point in kill_points(rng, n, window, writes.count):
        point, outcome = _kill(tally, rng, point, window, prepare, lambda p: run_and_kill(
            python("-m", "tools.build", "--root", str(repo), "--out", str(out)), p, watch=out))
        now = {k: v for k, v in tree_state(out)[0].items() if not k.endswith(".tmp")}
        assert now.keys() == old.keys()
        for k, v in now.items():                           # each file the previous build's or the new one
            assert v in (old[k], new[k]), f"{k} after a kill {point} ({tally.line()})"
        build(None, out, repo)                             # rerun
        assert tree_state(out)[0] == new, tally.line()
        assert not temp_leftovers(out), f"{temp_leftovers(out)} ({tally.line()})"
        tally.survived += 1
    _report(tally, capsys)


def _log_rows(run: Path):
    import csv

    with open(run / "log.csv", newline="") as f:
        return [{k: v for k, v in r.items() if k != "time"} for r in csv.DictReader(f)]


@pytest.mark.parametrize("after", ["first write", "checkpoint"])
def test_training_stopped_at_the_end_of_an_epoch_resumes_to_the_same_files(tmp_path, monkeypatch, after):
    """The end of an epoch writes best.pt, the resumable checkpoint and a log row; a run
    killed right after the first of these writes, or right after the checkpoint, still ends
    with the uninterrupted run's best.pt and log.csv."""
    import fwi_core.train.checkpoint as ckmod
    from fwi_core.train import load_checkpoint, train
    from tests.train.helpers import datasets, tiny_cfg

    opts = dict(epochs=3, checkpoint_every=1, keep_last=3)
    ref = train(tiny_cfg(tmp_path / "a", **opts), datasets=datasets())
    real, calls = ckmod.save_checkpoint, []

    def save_then_die(payload, path):       # 4 steps per epoch: step 4 ends epoch 1
        out = real(payload, path)
        meta = payload["metadata"]
        if meta["step"] == 4 and meta["position"]["batch"] == 0 and (after == "first write" or
                                                                    path.name.startswith("ckpt-")):
            calls.append(path.name)
            raise KeyboardInterrupt(f"killed after writing {path.name}")
        return out

    monkeypatch.setattr(ckmod, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_cfg(tmp_path / "b", **opts), datasets=datasets())
    monkeypatch.setattr(ckmod, "save_checkpoint", real)
    assert len(calls) == 1
    res = train(tiny_cfg(tmp_path / "b", resume="auto", **opts), datasets=datasets())
    assert Path(res["best_checkpoint"]).name == "best.pt"
    a, b = load_checkpoint(ref["best_checkpoint"]), load_checkpoint(res["best_checkpoint"])
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert _log_rows(tmp_path / "b" / "run") == _log_rows(tmp_path / "a" / "run")


def test_predict_removes_what_a_killed_run_left_half_written(tmp_path):
    """Temporary files of a killed run (the CSV, the summary, the state folder's progress
    file) are deleted by the next run, which then leaves nothing behind."""
    from fwi_core.data import validate_submission
    from fwi_core.predict import main
    from tests.inference_plan.helpers import tiny_checkpoint, write_test_root

    root = write_test_root(tmp_path / "data", 3)
    ck = tiny_checkpoint(tmp_path / "runs" / "r" / "best.pt", 0)
    work = tmp_path / "work"
    state = work / ".submission.csv.state"
    state.mkdir(parents=True)
    debris = [work / ".submission.csv.a1b2c3d4.csv.tmp", work / ".submission_summary.json.x.json.tmp",
              state / ".progress.json.k3j4.json.tmp"]
    for p in debris:
        p.write_text("half")
    assert main(["--data", str(root), "--checkpoints", str(ck), "--time-budget", "100000", "--out",
                 str(work / "submission.csv"), "--stages", "members", "--resume"]) == 0
    assert validate_submission(work / "submission.csv")["oids"] == 3
    assert not temp_leftovers(work) and sorted(p.name for p in work.iterdir()) == ["submission.csv",
                                                                                   "submission_summary.json"]
