"""Training on a mix of real and freshly simulated samples (``sim_fraction``)."""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from fwi_core.data import normalize_seismic, normalize_velocity
from fwi_core.models import is_model, register_model
from fwi_core.physics import generate, simulate
from fwi_core.train import TrainConfig, train

NT = 80


class Real(Dataset):
    """4 FlatVel_A maps (70 x 70) with NT-sample gathers."""

    def __init__(self):
        self.v = torch.from_numpy(generate("FlatVel_A", 4, seed=5))
        self.x = normalize_seismic(simulate(self.v, nt=NT, backend="eager"))
        self.y = normalize_velocity(self.v)

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return self.x[i], self.y[i], "FlatVel_A"


class Pool(nn.Module):
    """(B, 5, NT, 70) -> (B, 1, 70, 70)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(5, 2, 3, padding=1)
        self.out = nn.Conv2d(2, 1, 3, padding=1)

    def forward(self, x):
        return torch.tanh(self.out(F.adaptive_avg_pool2d(F.relu(self.conv(x)), (70, 70))))


if not is_model("tiny_pool"):
    @register_model
    def tiny_pool(**kwargs):
        return Pool()


def test_sim_fraction_mixes_fresh_simulated_samples_every_epoch(tmp_path, monkeypatch):
    from fwi_core.physics.simulated import SimulatedDataset

    maps = []
    original = SimulatedDataset.__getitem__

    def getitem(self, i):
        item = original(self, i)
        maps.append(item[1].clone())
        return item

    monkeypatch.setattr(SimulatedDataset, "__getitem__", getitem)
    cfg = TrainConfig(out=str(tmp_path / "run"), model="tiny_pool", epochs=2, batch_size=2, num_workers=0,
                      device="cpu", ema_decay=0.0, time_budget=0, folds=0, sim_fraction=0.5,
                      sim_kwargs={"augment": {}, "device": "cpu", "families": ["CurveVel_A"], "backend": "eager"})
    res = train(cfg, datasets=(Real(), None))
    assert res["stopped_reason"] == "completed" and res["step"] == 8      # 4 real + 4 simulated per epoch
    assert len(maps) == 8                                                  # 4 simulated items per epoch
    keys = {tuple(np.round(m.flatten()[::97].numpy(), 4)) for m in maps}
    assert len(keys) == 8                                                  # all different: fresh every epoch
    first, second = torch.stack(maps[:4]), torch.stack(maps[4:])
    assert not any(torch.equal(a, b) for a in first for b in second)
