import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fwi_core.train import read_metadata
from fwi_core.train.cli import build_parser, config_from_args

from .helpers import write_layout

ROOT = Path(__file__).resolve().parents[2]


def test_flags_cover_every_config_field():
    from fwi_core.train import TrainConfig

    flags = {a.dest for a in build_parser()._actions}
    assert set(TrainConfig.field_names()) <= flags


def test_config_file_then_flags(tmp_path):
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps({"epochs": 7, "lr": 0.01, "model_kwargs": {"width": 0.5}, "amp": "bf16"}))
    cfg = config_from_args(["--config", str(cfg_file), "--lr", "0.002", "--balance-families",
                            "--time-budget", "none", "--resume", "auto"])
    assert (cfg.epochs, cfg.lr, cfg.model_kwargs, cfg.amp) == (7, 0.002, {"width": 0.5}, "bf16")
    assert cfg.balance_families is True and cfg.time_budget is None and cfg.resume == "auto"
    assert config_from_args(["--model-kwargs", '{"width": 0.25}', "--epochs", "2"]).model_kwargs == {"width": 0.25}


def test_bad_flags_exit_with_usage(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--amp", "fp8"])
    assert "invalid choice: 'fp8'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--model-kwargs", "[1]"])
    assert "expected a JSON object" in capsys.readouterr().err


def _run(args, cwd):
    env = dict(os.environ, FWI_PROGRESS="0", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "fwi_core.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_end_to_end_on_layout_data_then_runs_table(tmp_path, capsys):
    root = write_layout(tmp_path / "waveform-inversion", per_family=2)
    out = tmp_path / "runs" / "inv-f0"
    p = _run(["--data", str(root), "--out", str(out), "--model", "inversionnet", "--model-kwargs",
              '{"width": 0.0625}', "--epochs", "2", "--batch-size", "2", "--folds", "2", "--fold", "0",
              "--amp", "off", "--num-workers", "0", "--ema-decay", "0.5", "--time-budget", "0",
              "--seed", "1", "--patience", "3"], tmp_path)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert res["stopped_reason"] == "completed" and res["epoch"] == 2
    for name in ("best.pt", "log.csv", "curves.png", "oof_fold0.npz", "config.json"):
        assert (out / name).is_file(), name
    oof = np.load(out / "oof_fold0.npz")
    assert oof["pred"].shape == (2, 70, 70) and sorted(oof["family"]) == ["CurveFault_A", "FlatVel_A"]
    meta = read_metadata(out / "best.pt")
    assert meta["model_kwargs"] == {"width": 0.0625} and meta["config"]["seed"] == 1

    from tools import runs

    assert runs.main([str(tmp_path / "runs"), "--csv", str(tmp_path / "runs.csv")]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].startswith("| run | model | platform | device | fold | epochs |")
    assert "| inv-f0 | inversionnet | local | cpu (" in table and " | 0/2 | 2 | 2 | " in table
    assert "mae:CurveFault_A" in table and "mae:FlatVel_A" in table
    assert "completed" in table and (tmp_path / "runs.csv").is_file()


def test_cli_reports_config_errors(tmp_path):
    p = _run(["--model", "nope", "--data", str(tmp_path)], tmp_path)
    assert p.returncode == 2 and "unknown model 'nope'" in p.stderr and "Traceback" not in p.stderr
    p = _run(["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")], tmp_path)
    assert p.returncode == 2 and "does not exist" in p.stderr


@pytest.mark.slow
def test_cli_under_torchrun_two_cpu_processes(tmp_path):
    root = write_layout(tmp_path / "wi", per_family=4)
    out = tmp_path / "ddp"
    env = dict(os.environ, FWI_PROGRESS="0", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "fwi_core.train", "--data", str(root), "--out", str(out), "--model", "inversionnet",
                        "--model-kwargs", '{"width": 0.0625}', "--epochs", "1", "--batch-size", "4",
                        "--folds", "2", "--num-workers", "0", "--time-budget", "0", "--device", "cpu"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    meta = read_metadata(out / "best.pt")
    assert meta["world_size"] == 2 and meta["step"] == 1
    assert np.load(out / "oof_fold0.npz")["pred"].shape == (4, 70, 70)


def test_bare_resume_means_auto_and_epochs_zero_and_scale_range():
    from fwi_core.train.cli import config_from_args

    cfg = config_from_args(["--model", "inversionnet", "--resume", "--epochs", "0", "--time-budget", "3600",
                            "--scale-range", "0.8", "1.25", "--scale-prob", "0.5"])
    assert cfg.resume == "auto" and cfg.epochs == 0 and cfg.time_budget == 3600.0
    assert cfg.scale_range == (0.8, 1.25) and cfg.scale_prob == 0.5
    assert config_from_args(["--resume", "runs/x"]).resume == "runs/x"
    assert config_from_args([]).resume is None
