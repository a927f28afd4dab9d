"""Resume from the run folder (``--out runs/X --resume``), resuming longer after a finished
anneal, and what the log shows from the first steps (loss, lr, the PDE term, the
simulated block)."""
import json
import logging

import pytest
import torch

from fwi_core.errors import ConfigError
from fwi_core.train import TrainConfig, load_checkpoint, train
from fwi_core.train.cli import main, resolve_config
from fwi_core.train.optim import LRSchedule

from .helpers import datasets, tiny_cfg, write_layout

pytestmark = pytest.mark.usefixtures("one_thread")

FLAGS = ["--model", "inversionnet", "--model-kwargs", '{"width": 0.0625}', "--epochs", "3", "--batch-size", "2",
         "--folds", "2", "--fold", "0", "--num-workers", "0", "--time-budget", "0", "--seed", "3",
         "--device", "cpu", "--ema-decay", "0.5", "--flip-prob", "0.5", "--patience", "0", "--preset", "cpu"]


def _weights(run):
    ck = load_checkpoint(sorted(run.glob("ckpt-*.pt"))[-1])
    return ck, {**{f"model.{k}": v for k, v in ck["model"].items()}, **{f"ema.{k}": v for k, v in ck["ema"].items()}}


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    return write_layout(tmp_path_factory.mktemp("wi") / "waveform-inversion", per_family=4)


def test_resume_from_out_alone_reproduces_the_uninterrupted_run(tmp_path, layout, capsys, caplog):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert main(["--data", str(layout), "--out", str(whole), *FLAGS]) == 0
    assert main(["--data", str(layout), "--out", str(parts), *FLAGS, "--max-steps", "3"]) == 0
    stopped = json.loads(capsys.readouterr().out.split("\n}\n")[-2] + "\n}")
    assert stopped["stopped_reason"] == "max_steps" and stopped["step"] == 3
    caplog.set_level(logging.INFO, logger="fwi_core.train")
    assert main(["--out", str(parts), "--resume"]) == 0          # nothing else: config.json has the rest
    assert f"resuming {parts} with its config.json unchanged" in caplog.text
    a, wa = _weights(whole)
    b, wb = _weights(parts)
    assert a["state"]["step"] == b["state"]["step"] == 6
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0, msg=k)
    assert b["metadata"]["config"]["data"] == str(layout)        # restored, not asked for again


def test_resume_lists_changed_flags_and_refuses_another_model(tmp_path, layout, capsys, caplog):
    run = tmp_path / "run"
    assert main(["--data", str(layout), "--out", str(run), *FLAGS, "--epochs", "1"]) == 0
    cfg, report = resolve_config(["--out", str(run), "--resume", "--epochs", "2", "--lr", "0.01"])
    assert report["restored"] == str(run) and cfg.data == str(layout) and cfg.seed == 3
    assert report["changed"] == {"epochs": (1, 2), "lr": (1e-3, 0.01)}
    caplog.set_level(logging.INFO, logger="fwi_core.train")
    assert main(["--out", str(run), "--resume", "--epochs", "2"]) == 0
    assert "changed by flags: epochs 1 -> 2" in caplog.text
    capsys.readouterr()
    assert main(["--out", str(run), "--resume", "--model", "specproj_unet"]) == 2
    err = capsys.readouterr().err
    assert "was trained with model=inversionnet" in err and "new --out folder" in err and "Traceback" not in err
    with pytest.raises(ConfigError, match="--preset with --resume"):
        resolve_config(["--out", str(run), "--resume", "--preset", "smoke"])


def test_engine_refuses_to_resume_another_model(tmp_path, data):
    train(tiny_cfg(tmp_path, epochs=1), datasets=data)
    with pytest.raises(ConfigError, match=r"the run trained tiny_fwi \{\} but this config builds tiny_fwi "
                                          r"\{\"hidden\": 8\}"):
        train(tiny_cfg(tmp_path, epochs=2, resume="auto", model_kwargs={"hidden": 8}), datasets=data)


@pytest.mark.parametrize("rewarm", [0.25, 0.0])
def test_resuming_a_finished_anneal_longer_warms_back_up(tmp_path, data, rewarm, caplog):
    """A completed cosine run ends at lr 0; resumed with more epochs it must learn again:
    with rewarm_fraction the rate climbs back to lr over that share of the new steps, then
    anneals (the weights change); without, it stays at 0 (and nothing changes)."""
    first = train(tiny_cfg(tmp_path, epochs=2, ema_decay=0.0, rewarm_fraction=rewarm), datasets=data)
    assert first["history"][-1]["lr"] == 0.0
    before = load_checkpoint(first["last_checkpoint"])["model"]
    seen = []
    original = torch.optim.AdamW.step

    def step(self, *a, **k):
        seen.append(self.param_groups[0]["lr"])
        return original(self, *a, **k)

    caplog.set_level(logging.INFO, logger="fwi_core.train")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.optim.AdamW, "step", step)
        second = train(tiny_cfg(tmp_path, epochs=6, ema_decay=0.0, rewarm_fraction=rewarm, resume="auto"),
                       datasets=data)
    after = load_checkpoint(second["last_checkpoint"])["model"]
    change = max((after[k] - before[k]).abs().max().item() for k in before)
    assert len(seen) == 16                                  # 4 more epochs of 4 steps
    if rewarm:
        peak = seen.index(max(seen))
        assert max(seen) == pytest.approx(3e-3) and peak == 3   # the 4th of the 16 new steps (25%)
        assert seen[:peak] == sorted(seen[:peak]) and seen[peak:] == sorted(seen[peak:], reverse=True)
        assert seen[-1] == pytest.approx(0.0, abs=1e-12)
        assert change > 1e-3 and "warming the learning rate back up" in caplog.text
    else:
        assert max(seen) == 0.0 and change == 0.0


def test_time_mode_rewarm_schedule():
    fn = LRSchedule("cosine", 0)
    fn.progress = 1.0
    assert fn.finished(1.0) and not LRSchedule("cosine_restarts", 0).finished(1.0)
    fn.rebase(100, 0, fn(100), 0.0, rewarm=0.1)
    for p, want in ((0.0, 0.0), (0.05, 0.5), (0.1, 1.0), (0.55, 0.5), (1.0, 0.0)):
        fn.progress = p
        assert fn(100) == pytest.approx(want, abs=1e-9), p


def test_loss_and_lr_logged_from_the_first_steps(tmp_path, data, caplog):
    caplog.set_level(logging.INFO, logger="fwi_core.train")
    train(tiny_cfg(tmp_path, epochs=3, log_every=10), datasets=data)      # 12 steps
    steps = [int(r.getMessage().split()[1]) for r in caplog.records if r.getMessage().startswith("step ")]
    assert steps == [1, 2, 4, 8, 10]
    first = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("step 1 "))
    assert "loss " in first and "lr " in first and "s/step" in first


def test_pde_term_in_log_history_and_csv(tmp_path, caplog):
    from .test_pde import SmallMaps, _cfg

    caplog.set_level(logging.INFO, logger="fwi_core.train")
    res = train(_cfg(tmp_path, epochs=2, pde_every=2, pde_weight=0.5), datasets=(SmallMaps(), None))
    values = [r["pde_loss"] for r in res["history"]]
    assert all(v > 1e-4 for v in values)                     # the misfit of untrained predictions
    assert "pde " in next(r.getMessage() for r in caplog.records if r.getMessage().startswith("step 1 "))
    header = (tmp_path / "run" / "log.csv").read_text().splitlines()[0].split(",")
    assert header[:5] == ["epoch", "step", "lr", "train_loss", "pde_loss"]
    assert "pde_loss" not in train(tiny_cfg(tmp_path / "nopde", epochs=1), datasets=datasets())["history"][0]


def test_simulated_block_has_a_progress_line(tmp_path, caplog):
    from .test_simdata import Real

    caplog.set_level(logging.INFO, logger="fwi_core.train")
    cfg = TrainConfig(out=str(tmp_path / "run"), model="tiny_pool", epochs=2, batch_size=2, num_workers=0,
                      device="cpu", ema_decay=0.0, time_budget=0, folds=0, sim_fraction=0.5,
                      sim_kwargs={"augment": {}, "device": "cpu", "families": ["CurveVel_A"], "backend": "eager"})
    train(cfg, datasets=(Real(), None))
    text = caplog.text
    assert "epoch 0: simulating 4 fresh samples on cpu" in text and "epoch 0: 4 simulated samples made in" in text
    assert "epoch 1: simulating 4 fresh samples on cpu (blocks of 8), about" in text   # the last block's rate
