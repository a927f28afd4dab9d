"""The PDE-consistency term in the engine (``pde_weight``): computed correctly (zero at
the true map, the independently simulated misfit for a shifted one, flips undone) and
added to the training loss with its options."""
import pytest
import torch
import torch.nn as nn
from torch.utils.data import Dataset

from fwi_core.data import normalize_seismic, normalize_velocity
from fwi_core.models import is_model, register_model
from fwi_core.physics import simulate
from fwi_core.train import ConfigError, TrainConfig, train
from fwi_core.train.engine import Trainer

NT, N = 150, 10         # 10 x 10 maps, 150 time samples, a 20-cell sponge: cheap to simulate
SIM = {"nbc": 20, "backend": "eager"}


class SmallMaps(Dataset):
    """Layered 10x10 maps and their exact (normalised) gathers."""

    def __init__(self, n=4, seed=0):
        g = torch.Generator().manual_seed(seed)
        top = 1600 + 400 * torch.rand(n, generator=g)
        step = 200 + 300 * torch.rand(n, generator=g)
        depth = torch.arange(N, dtype=torch.float32)
        v = (top[:, None] + step[:, None] * (depth[None] >= 5)).view(n, 1, N, 1).expand(n, 1, N, N).contiguous()
        v[:, :, 7:, 6:] += 150.0                                       # not mirror-symmetric
        self.v = v
        self.raw = simulate(v, nt=NT, **SIM)
        self.x = normalize_seismic(self.raw)
        self.y = normalize_velocity(v)

    def __len__(self):
        return len(self.v)

    def __getitem__(self, i):
        return self.x[i], self.y[i], "FlatVel_A"


class SmallNet(nn.Module):
    """(B, 5, NT, N) -> (B, 1, N, N) in [-1, 1]."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5 * NT * N, N * N)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x):
        return torch.tanh(self.fc(x.flatten(1))).view(-1, 1, N, N) * 0.5 - 0.4


if not is_model("tiny_pde"):
    @register_model
    def tiny_pde(**kwargs):
        return SmallNet()


def _cfg(tmp_path, **over):
    base = dict(out=str(tmp_path / "run"), model="tiny_pde", epochs=1, batch_size=2, num_workers=0, device="cpu",
                ema_decay=0.0, time_budget=0, folds=0, log_every=1, pde_weight=1.0, pde_simulate_kwargs=dict(SIM),
                flip_prob=0.0, pde_every=1, pde_samples=0)
    base.update(over)
    return TrainConfig(**base)


def test_pde_term_zero_at_truth_known_for_a_shift_and_flips_undone(tmp_path):
    ds = SmallMaps()
    trainer = Trainer(_cfg(tmp_path), datasets=(ds, None))
    try:
        truth = ds.y
        assert trainer.loss.pde_term(truth, ds.x).item() < 1e-9
        shifted = normalize_velocity(ds.v + 100.0)
        sim = simulate(ds.v + 100.0, nt=NT, **SIM).double()
        obs = ds.raw.double()
        want = ((sim - obs).flatten(1).square().sum(1) / obs.flatten(1).square().sum(1)).mean()
        got = trainer.loss.pde_term(shifted, ds.x)
        assert got.item() == pytest.approx(want.item(), rel=1e-4) and want.item() > 1e-3
        # a flipped input's prediction is the flipped map: flipped back before simulating
        flipped = torch.ones(len(ds), dtype=torch.bool)
        assert trainer.loss.pde_term(torch.flip(truth, (-1,)), ds.x, flipped).item() < 1e-9
        assert trainer.loss.pde_term(torch.flip(truth, (-1,)), ds.x).item() > 1e-5   # not flipped back: misfit
    finally:
        trainer.close()


def test_pde_options_select_shots_time_and_samples(tmp_path):
    ds = SmallMaps()
    shifted = normalize_velocity(ds.v + 100.0)
    trainer = Trainer(_cfg(tmp_path, pde_shots=(0, 4), pde_time=30, pde_samples=2), datasets=(ds, None))
    try:
        sim = simulate(ds.v[:2] + 100.0, nt=30, source_columns=(0, 9), **SIM).double()
        obs = ds.raw[:2, [0, 4], :30].double()
        want = ((sim - obs).flatten(1).square().sum(1) / obs.flatten(1).square().sum(1)).mean()
        assert trainer.loss.pde_term(shifted, ds.x).item() == pytest.approx(want.item(), rel=1e-4)
    finally:
        trainer.close()


def test_training_loss_includes_the_weighted_pde_term(tmp_path):
    from fwi_core.data import denormalize_velocity
    from fwi_core.physics.misfit import pde_loss

    ds = SmallMaps(n=2)                      # one batch of 2: the first step sees both samples
    loss = {}
    for name, over in (("off", dict(pde_weight=0.0)), ("on", dict(pde_weight=2.0)),
                       ("ramp", dict(pde_weight=2.0, pde_ramp_steps=4))):
        res = train(_cfg(tmp_path / name, max_steps=1, **over), datasets=(ds, None))
        loss[name] = res["history"][-1]["train_loss"]
    with torch.no_grad():                    # the zero-initialised net's first prediction
        term = pde_loss(denormalize_velocity(SmallNet()(ds.x)), ds.raw, **SIM).item()
    assert term > 1e-3
    assert loss["on"] - loss["off"] == pytest.approx(2.0 * term, rel=1e-3)
    assert loss["ramp"] - loss["off"] == pytest.approx(2.0 * term / 4, rel=1e-3)     # weight ramps from 1/4


def test_pde_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="pde_every"):
        _cfg(tmp_path, pde_every=0).validate()
    with pytest.raises(ConfigError, match="pde_shots"):
        _cfg(tmp_path, pde_shots=(-1,)).validate()
    with pytest.raises(ConfigError, match="pde_weight"):
        _cfg(tmp_path, pde_weight=-1.0).validate()
