import subprocess

import pytest
import torch

from fwi_core.train import CheckpointError, CheckpointManager, load_checkpoint, load_model, read_metadata, train
from fwi_core.train import checkpoint as ckpt_mod

from .helpers import TinyNet, tiny_cfg


def _payload(step):
    return {"format": ckpt_mod.FORMAT, "metadata": {"step": step}, "model": {"w": torch.full((2,), float(step))},
            "ema": None, "state": {"optimizer": {}}}


def test_manager_keeps_last_n_and_best_without_state(tmp_path):
    m = CheckpointManager(tmp_path, keep_last=2)
    for step in (1, 5, 12):
        m.save(_payload(step), step)
    assert [p.name for p in m.rolling()] == ["ckpt-00000005.pt", "ckpt-00000012.pt"]
    assert m.latest().name == "ckpt-00000012.pt"
    m.save_best(_payload(5))
    best = load_checkpoint(m.best_path)
    assert "state" not in best and best["metadata"]["step"] == 5


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    m = CheckpointManager(tmp_path)
    path = m.save(_payload(3), 3)

    def broken_save(obj, f):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        m.save(_payload(3), 3)
    assert load_checkpoint(path)["metadata"]["step"] == 3          # intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000003.pt"]   # no temp file left


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not an fwi_core.train checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")


def test_resolve_resume(tmp_path):
    from fwi_core.train.checkpoint import resolve_resume

    assert resolve_resume(None, tmp_path) is None
    assert resolve_resume("auto", tmp_path) is None
    CheckpointManager(tmp_path).save(_payload(7), 7)
    assert resolve_resume("auto", tmp_path).name == "ckpt-00000007.pt"
    assert resolve_resume(str(tmp_path), tmp_path / "elsewhere").name == "ckpt-00000007.pt"
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        resolve_resume(str(tmp_path / "missing.pt"), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no ckpt"):
        resolve_resume(str(tmp_path / "empty"), tmp_path)


def test_git_commit_tolerates_failure(monkeypatch, tmp_path):
    monkeypatch.delenv("FWI_GIT_COMMIT", raising=False)

    def boom(*a, **k):
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", boom)
    assert ckpt_mod.git_commit() is None
    monkeypatch.setenv("FWI_GIT_COMMIT", "abc123")
    assert ckpt_mod.git_commit() == "abc123"


def test_git_commit_outside_a_checkout(monkeypatch, tmp_path):
    monkeypatch.delenv("FWI_GIT_COMMIT", raising=False)
    assert ckpt_mod.git_commit(tmp_path) is None


def test_load_model_rebuilds_raw_and_ema(tmp_path, data):
    res = train(tiny_cfg(tmp_path, epochs=1, ema_decay=0.5, model_kwargs={"hidden": 8}), datasets=data)
    ckpt = load_checkpoint(res["best_checkpoint"])
    meta = read_metadata(res["best_checkpoint"])
    auto = load_model(res["best_checkpoint"])
    assert isinstance(auto, TinyNet) and not auto.training and auto.fc1.out_features == 8
    assert auto.fwi_weights == meta["metrics"]["source"] and auto.fwi_metadata["model"] == "tiny_fwi"
    for which in ("raw", "ema"):
        m = load_model(res["best_checkpoint"], weights=which)
        want = ckpt["model" if which == "raw" else "ema"]
        for k, v in m.state_dict().items():
            torch.testing.assert_close(v, want[k])
    raw, ema = load_model(res["best_checkpoint"], "raw"), load_model(res["best_checkpoint"], "ema")
    assert not torch.equal(raw.fc1.weight, ema.fc1.weight)


def test_load_model_without_ema(tmp_path, data):
    res = train(tiny_cfg(tmp_path, epochs=1, ema_decay=0.0), datasets=data)
    assert load_model(res["best_checkpoint"]).fwi_weights == "raw"
    with pytest.raises(CheckpointError, match="no EMA weights"):
        load_model(res["best_checkpoint"], weights="ema")
