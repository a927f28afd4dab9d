"""``--pseudo DIR`` (the train kernel's ``pseudo_dir``): a pseudo-label folder joins training."""
import json
import logging

import numpy as np
import pytest

from fwi_core.train.cli import main

from .helpers import write_layout

pytestmark = pytest.mark.usefixtures("one_thread")

FLAGS = ["--model", "inversionnet", "--model-kwargs", '{"width": 0.0625}', "--epochs", "1", "--batch-size", "2",
         "--folds", "2", "--num-workers", "0", "--time-budget", "0", "--device", "cpu", "--preset", "cpu",
         "--ema-decay", "0"]


def _pseudo_folder(root, n=4):
    from fwi_core.physics import generate

    d = root / "train_samples" / "Pseudo"
    (d / "data").mkdir(parents=True)
    (d / "model").mkdir()
    rng = np.random.default_rng(1)
    np.save(d / "data" / "data1.npy", rng.standard_normal((n, 5, 1000, 70)).astype(np.float16))
    np.save(d / "model" / "model1.npy", generate("FlatVel_B", n, seed=2))
    return root


def test_pseudo_folder_joins_training_not_validation(tmp_path, capsys, caplog):
    data = write_layout(tmp_path / "wi", per_family=4)
    pseudo = _pseudo_folder(tmp_path / "pseudo")
    caplog.set_level(logging.INFO, logger="fwi_core.train")
    assert main(["--data", str(data), "--out", str(tmp_path / "plain"), *FLAGS]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(["--data", str(data), "--out", str(tmp_path / "mixed"), *FLAGS, "--pseudo", str(pseudo)]) == 0
    mixed = json.loads(capsys.readouterr().out)
    assert (plain["step"], mixed["step"]) == (2, 4)            # 4 real training samples, then + 4 pseudo
    assert f"training on 4 real + 4 pseudo-labelled samples ({pseudo})" in caplog.text
    oof = np.load(tmp_path / "mixed" / "oof_fold0.npz")
    assert "Pseudo" not in set(oof["family"]) and len(oof["family"]) == 4        # validation stays real
    assert main(["--data", str(data), "--out", str(tmp_path / "bad"), *FLAGS, "--pseudo", str(tmp_path)]) == 2
    assert "pseudo=" in capsys.readouterr().err


def test_kernel_parameter_maps_to_the_field():
    from fwi_core.train import TrainConfig

    assert TrainConfig.from_kernel({"preset": "cpu", "pseudo_dir": "/kaggle/input/pl"}).pseudo == "/kaggle/input/pl"
