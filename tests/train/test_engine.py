import csv
import logging

import numpy as np
import pytest
import torch

from fwi_core.train import ConfigError, load_checkpoint, read_metadata, summarize, train
from fwi_core.train import optim

from .helpers import tiny_cfg


def test_train_result_files_and_logs(tmp_path, data):
    res = train(tiny_cfg(tmp_path, epochs=2), datasets=data)
    out = tmp_path / "run"
    assert res["stopped_reason"] == "completed" and res["step"] == 8 and res["epoch"] == 2
    assert res["best_checkpoint"] == str(out / "best.pt")
    assert res["last_checkpoint"] == str(out / "ckpt-00000008.pt")
    assert {"config.json", "log.csv", "curves.png", "oof_fold0.npz"} <= {p.name for p in out.iterdir()}
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    assert [r["epoch"] for r in res["history"]] == [1.0, 2.0]
    assert set(res["val_mae_per_family"]) == {"A", "B"}
    assert res["best_val_mae"] == min(r["val_mae"] for r in res["history"])

    with open(out / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    for col in ["epoch", "step", "lr", "train_loss", "val_mae_raw", "val_mae_ema", "mae_raw/A",
                "mae_ema/B", "time"]:
        assert col in rows[0]

    oof = np.load(res["oof_path"])
    assert oof["pred"].shape == (8, 6, 6) and oof["target"].shape == (8, 6, 6)
    assert list(oof["indices"]) == list(range(8))
    assert list(oof["family"]) == data[1].families()
    assert 1500 <= oof["pred"].min() and oof["pred"].max() <= 4500
    np.testing.assert_allclose(np.abs(oof["pred"] - oof["target"]).mean((1, 2)), oof["mae"], rtol=1e-5)
    assert oof["mae"].mean() == pytest.approx(res["best_val_mae"], rel=1e-5)


def test_metadata_records_run_and_per_family_choice(tmp_path, data):
    res = train(tiny_cfg(tmp_path, epochs=1), datasets=data)
    meta = read_metadata(res["best_checkpoint"])
    assert meta["model"] == "tiny_fwi" and meta["platform"] == "local" and meta["epoch"] == 1
    assert meta["fwi_core_version"] and meta["wall_time"] > 0 and meta["config"]["epochs"] == 1
    m = meta["metrics"]
    for fam, e in m["per_family"].items():
        assert e["best"] == min(e["raw"], e["ema"])
        assert e["source"] == ("ema" if e["ema"] < e["raw"] else "raw")
        assert meta["family_best"][fam]["mae"] == e["best"]
    assert m["source"] in ("raw", "ema") and m["mae"] == min(m["mae_raw"], m["mae_ema"])


def test_summarize_picks_sources_per_family():
    fams = ["A", "A", "B", "B"]
    s = summarize(fams, {"raw": np.array([10., 20., 5., 5.]), "ema": np.array([12., 14., 9., 9.])})
    assert s["per_family"]["A"] == {"raw": 15.0, "ema": 13.0, "best": 13.0, "source": "ema", "n": 2}
    assert s["per_family"]["B"]["source"] == "raw" and s["per_family"]["B"]["best"] == 5.0
    assert s["source"] == "raw" and s["mae"] == 10.0 and s["mae_ema"] == 11.0
    assert s["family_mae"] == 9.0


def test_early_stopping(tmp_path, data):
    res = train(tiny_cfg(tmp_path, epochs=10, lr=0.0, patience=2, ema_decay=0.0), datasets=data)
    assert res["stopped_reason"] == "early_stopping"
    assert res["epoch"] == 3 and len(res["history"]) == 3


def test_time_budget_stops_cleanly_and_resumably(tmp_path, data):
    cfg = tiny_cfg(tmp_path, epochs=200, time_budget=4.0, model_kwargs={"delay": 0.02})
    res = train(cfg, datasets=data)
    assert res["stopped_reason"] == "time_budget"
    assert res["wall_time"] < 4.0 and res["step"] < 200 * 4
    meta = read_metadata(res["last_checkpoint"])
    assert meta["stopped_reason"] == "time_budget" and meta["step"] == res["step"] > 0
    assert "state" in load_checkpoint(res["last_checkpoint"])
    assert res["history"][-1]["step"] == res["step"]          # evaluated before stopping


def test_time_budget_at_an_epoch_start_is_in_the_last_checkpoint(tmp_path, data, monkeypatch):
    """The budget running out between an epoch's last check and the next step (no batch of
    the next epoch done):
    the last checkpoint still says why the run stopped (it said None under load)."""
    import fwi_core.train.engine as engine

    calls = []

    def out_of_time(self):  # in time at the end of epoch 0 (its last check), out at the next step
        if self.state.epoch >= 1 and self.state.batch == 0:
            calls.append(self.state.step)
            return len(calls) > 1
        return False

    monkeypatch.setattr(engine.Trainer, "_out_of_time", out_of_time)
    res = train(tiny_cfg(tmp_path, epochs=5, time_budget=3600.0), datasets=data)
    assert res["stopped_reason"] == "time_budget" and res["epoch"] == 1
    assert read_metadata(res["last_checkpoint"])["stopped_reason"] == "time_budget"


def test_out_of_memory_halves_the_micro_batch(tmp_path, data, caplog):
    cfg = tiny_cfg(tmp_path, epochs=1, batch_size=8, ema_decay=0.0, model_kwargs={"oom_above": 2})
    with caplog.at_level(logging.WARNING, logger="fwi_core.train"):
        res = train(cfg, datasets=data)
    assert [e["micro_batch"] for e in res["oom_events"] if e["kind"] == "train"] == [4, 2]
    assert [e["micro_batch"] for e in res["oom_events"] if e["kind"] == "eval"] == [8, 4, 2]
    assert "out of memory at step 0: micro-batch 8 -> 4" in caplog.text
    assert res["step"] == 2
    ref = train(cfg.replace(out=str(tmp_path / "ref"), model_kwargs={}, grad_accum=1), datasets=data)
    got, want = load_checkpoint(res["last_checkpoint"])["model"], load_checkpoint(ref["last_checkpoint"])["model"]
    for k in want:   # same effective batch: the same update up to float rounding
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5)


def test_out_of_memory_at_micro_batch_one_raises(tmp_path, data):
    from fwi_core.train import TrainError

    with pytest.raises(TrainError, match="micro-batch of 1"):
        train(tiny_cfg(tmp_path, epochs=1, batch_size=2, model_kwargs={"oom_above": 0.5}), datasets=data)


def test_amp_degrades_with_warning(tmp_path, data, monkeypatch, caplog):
    monkeypatch.setattr(optim, "_autocast_works", lambda dev, dtype: dtype == torch.bfloat16)
    with caplog.at_level(logging.WARNING, logger="fwi_core.train"):
        res = train(tiny_cfg(tmp_path, epochs=1, amp="fp16"), datasets=data)
    assert res["amp"] == "bf16" and "using bf16 instead" in caplog.text


def test_options_boundary_flip_balance_sgd_family_mae(tmp_path, data, monkeypatch):
    from fwi_core.data import hflip
    from fwi_core.train import velocity_loss

    from .helpers import TinyDataset, TinyNet

    seen = []
    original = TinyNet.forward

    def forward(self, x, *a, **k):
        out = original(self, x, *a, **k)
        if self.training:
            seen.append((x.detach().clone(), out.detach().clone()))
        return out

    monkeypatch.setattr(TinyNet, "forward", forward)
    # boundary_weight: the first step's loss is L1 + weight x boundary term of the same prediction
    res = train(tiny_cfg(tmp_path / "b", epochs=1, max_steps=1, boundary_weight=0.5, ema_decay=0.0), datasets=data)
    x0, p0 = seen[0]
    match = [i for i in range(16) if torch.equal(data[0].x[i], x0[0])]
    assert match
    y0 = torch.stack([data[0].y[next(i for i in range(16) if torch.equal(data[0].x[i], xi))] for xi in x0])
    assert res["history"][-1]["train_loss"] == pytest.approx(velocity_loss(p0, y0, 0.5).item(), rel=1e-5)
    assert velocity_loss(p0, y0, 0.5) > velocity_loss(p0, y0, 0.0)
    # flip_prob=1: every training input is the flip of a dataset sample
    seen.clear()
    train(tiny_cfg(tmp_path / "f", epochs=1, flip_prob=1.0, ema_decay=0.0), datasets=data)
    flipped = hflip(data[0].x)
    for x, _ in seen:
        for xi in x:
            assert any(torch.equal(xi, f) for f in flipped) and not any(torch.equal(xi, d) for d in data[0].x)
    # balance_families on 12 A / 4 B: an epoch draws both families equally often
    skewed = TinyDataset(16, families=("A", "A", "A", "B"))
    fam_of = {tuple(skewed.x[i].flatten()[:4].tolist()): skewed.fam[i] for i in range(16)}
    for balance, want in ((True, {"A": 8, "B": 8}), (False, {"A": 12, "B": 4})):
        seen.clear()
        train(tiny_cfg(tmp_path / f"bal{balance}", epochs=1, balance_families=balance, ema_decay=0.0),
              datasets=(skewed, data[1]))
        drawn = [fam_of[tuple(xi.flatten()[:4].tolist())] for x, _ in seen for xi in x]
        assert {f: drawn.count(f) for f in ("A", "B")} == want
    # sgd + monitor=family_mae: the best checkpoint is the one with the lowest mean family MAE
    res = train(tiny_cfg(tmp_path / "s", epochs=3, optimizer="sgd", monitor="family_mae", lr=0.05),
                datasets=data)
    meta = read_metadata(res["best_checkpoint"])
    assert meta["best"]["value"] == pytest.approx(min(r["family_mae"] for r in res["history"]))
    assert meta["config"]["optimizer"] == "sgd"


def test_no_validation_set(tmp_path, data):
    res = train(tiny_cfg(tmp_path, epochs=2), datasets=(data[0], None))
    assert res["oof_path"] is None and np.isnan(res["best_val_mae"])
    best, last = load_checkpoint(res["best_checkpoint"]), load_checkpoint(res["last_checkpoint"])
    for k in last["model"]:
        torch.testing.assert_close(best["model"][k], last["model"][k])
    assert "val_mae" not in res["history"][-1]


def test_max_samples_subsets(tmp_path, data):
    res = train(tiny_cfg(tmp_path, epochs=1, max_train_samples=8, max_val_samples=3), datasets=data)
    assert res["step"] == 2
    oof = np.load(res["oof_path"])
    assert len(oof["indices"]) == 3 and len(set(oof["indices"].tolist())) == 3


def test_config_errors(tmp_path, data):
    with pytest.raises(ConfigError, match="no training data"):
        train(tiny_cfg(tmp_path, data=None))
    with pytest.raises(ConfigError, match="does not exist"):
        train(tiny_cfg(tmp_path, data=str(tmp_path / "missing")))
    with pytest.raises(ConfigError, match="exceeds the 16 training samples"):
        train(tiny_cfg(tmp_path, batch_size=32), datasets=data)
    with pytest.raises(ConfigError, match="needs EMA"):
        train(tiny_cfg(tmp_path, ema_decay=0.0, monitor="mae_ema"), datasets=data)
    train(tiny_cfg(tmp_path, epochs=1), datasets=data)
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        train(tiny_cfg(tmp_path, epochs=1), datasets=data)


def test_dict_config_and_data_path_with_family_folds(tmp_path):
    from .helpers import write_layout

    root = write_layout(tmp_path / "wi", per_family=2)
    res = train({"data": str(root), "out": str(tmp_path / "run"), "model": "inversionnet",
                 "model_kwargs": {"width": 0.0625}, "epochs": 1, "batch_size": 2, "folds": 2,
                 "fold": 1, "num_workers": 0, "device": "cpu", "time_budget": 0, "ema_decay": 0.5})
    oof = np.load(res["oof_path"])
    assert res["oof_path"].endswith("oof_fold1.npz")
    assert sorted(oof["family"].tolist()) == ["CurveFault_A", "FlatVel_A"]   # one of each family
    assert oof["pred"].shape == (2, 70, 70)
    assert set(oof["indices"].tolist()) <= {0, 1, 2, 3}


def test_progress_bar_shows_budget_left(tmp_path, data, monkeypatch, capsys):
    pytest.importorskip("tqdm")
    monkeypatch.setenv("FWI_PROGRESS", "1")
    train(tiny_cfg(tmp_path, epochs=1, time_budget=3600, log_every=1), datasets=data)
    err = capsys.readouterr().err
    assert "tiny_fwi fold 0" in err and "budget_left=00:59:" in err and "loss=" in err
