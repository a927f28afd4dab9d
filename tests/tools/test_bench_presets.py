"""tools.bench_presets: the held-out score is the per-family MAE of the predictions; every
candidate is a valid config of the cpu preset."""
import numpy as np
import pytest
import torch

from fwi_core.train import TrainConfig
from tools import bench_presets


def test_score_is_the_per_family_mae_of_the_predictions():
    rng = np.random.default_rng(0)
    y = rng.uniform(1500, 4500, (6, 70, 70)).astype(np.float32)
    fams = ["A", "A", "B", "B", "B", "C"]
    offsets = torch.tensor([10.0, 20.0, 30.0, 40.0, 50.0, 60.0])
    x = offsets.view(6, 1, 1, 1).expand(6, 5, 4, 3)              # the "gathers" carry the error to make

    seen = [0]

    def batched(b):                                              # the truth of this batch + its error
        out = torch.from_numpy(y[seen[0]:seen[0] + len(b)])[:, None] + b[:, :1, :1, :1]
        seen[0] += len(b)
        return out

    s = bench_presets.score(batched, x, y, fams, batch=4)
    assert s["mae"]["A"] == pytest.approx(15.0) and s["mae"]["B"] == pytest.approx(40.0)
    assert s["mae"]["C"] == pytest.approx(60.0) and s["mae"]["all"] == pytest.approx(35.0)
    assert s["ms_per_sample"] > 0


def test_every_candidate_is_a_valid_config():
    for name, changes in bench_presets.CANDIDATES.items():
        cfg = TrainConfig.from_dict({**bench_presets.COMMON, **changes, "time_budget": 300.0}).validate()
        assert cfg.preset == "cpu" and cfg.epochs == 0 and cfg.folds == 0, name
