"""Tiny model and in-memory datasets for the training-engine tests (fast on 2 CPU cores)."""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from fwi_core.models import Capabilities, is_model, register_model

T, R, H, W = 12, 8, 6, 6   # tiny "gathers" (5, T, R) and "velocity maps" (1, H, W)


class TinyNet(nn.Module):
    """(B, 5, T, R) -> (B, 1, H, W) in [-1, 1].

    Args:
        drop: dropout probability (exercises the RNG in resume tests).
        oom_above: raise a (fake) out-of-memory error for batches larger than this.
        oom_rank: with ``oom_above``, only the DDP process of this rank runs out of memory.
        delay: seconds to sleep per forward (for time-budget tests).
        bn: include a BatchNorm layer.
        num_families: > 0 adds per-family output biases and a family head, like
            SpecProjUNet: ``forward(x, family_idx)`` / ``auxiliary_losses(family_idx)``.
    """

    def __init__(self, hidden: int = 16, drop: float = 0.0, oom_above: int = 0, delay: float = 0.0,
                 bn: bool = False, num_families: int = 0, oom_rank: int = -1):
        super().__init__()
        self.conv = nn.Conv2d(5, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4) if bn else nn.Identity()
        self.fc1 = nn.Linear(4 * T * R, hidden)
        self.fc2 = nn.Linear(hidden, H * W)
        self.drop = nn.Dropout(drop)
        self.oom_above, self.delay, self.oom_rank = oom_above, delay, oom_rank
        self.num_families = num_families
        if num_families:
            self.family_bias = nn.Parameter(torch.zeros(num_families, H * W))
            self.family_head = nn.Linear(hidden, num_families)
        self.seen_family_idx = []

    def forward(self, x, family_idx=None):
        import os

        if self.oom_above and x.shape[0] > self.oom_above and \
                (self.oom_rank < 0 or int(os.environ.get("RANK", "0")) == self.oom_rank):
            raise torch.cuda.OutOfMemoryError(f"fake OOM: batch {x.shape[0]} > {self.oom_above}")
        if self.delay:
            time.sleep(self.delay)
        h = F.relu(self.bn(self.conv(x))).flatten(1)
        h = self.drop(F.relu(self.fc1(h)))
        out = self.fc2(h)
        if self.num_families:
            self.last_family_logits = self.family_head(h)
            w = (F.one_hot(family_idx, self.num_families).float() if family_idx is not None
                 else torch.softmax(self.last_family_logits, 1))
            out = out + w @ self.family_bias
            self.seen_family_idx.append(None if family_idx is None else family_idx.tolist())
        return torch.tanh(out).view(-1, 1, H, W)

    def auxiliary_losses(self, family_idx=None):
        if not self.num_families or family_idx is None:
            return {}
        return {"family": F.cross_entropy(self.last_family_logits, family_idx)}


if not is_model("tiny_fwi"):
    @register_model(capabilities=Capabilities(family_terms=True, auxiliary_losses=True))
    def tiny_fwi(**kwargs) -> TinyNet:
        """Test-only tiny model."""
        return TinyNet(**kwargs)


class TinyDataset(Dataset):
    """``n`` learnable (x, y, family) samples: y is a smooth function of x; the family
    shifts the map so families differ."""

    def __init__(self, n: int, families=("A", "B"), seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 5, T, R, generator=g)
        proj = torch.randn(5 * T * R, H * W, generator=torch.Generator().manual_seed(123)) / 20
        fam_idx = torch.arange(n) % len(families)
        self.y = torch.tanh(self.x.flatten(1) @ proj + 0.3 * fam_idx[:, None].float()).view(n, 1, H, W)
        self.fam = [families[i] for i in fam_idx.tolist()]

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i], self.fam[i]

    def families(self):
        return list(self.fam)


def tiny_cfg(tmp_path, **over):
    """A TrainConfig for the tiny model writing into ``tmp_path/run``."""
    from fwi_core.train import TrainConfig

    base = dict(out=str(tmp_path / "run"), model="tiny_fwi", epochs=2, batch_size=4, lr=3e-3,
                num_workers=0, device="cpu", ema_decay=0.9, patience=0, log_every=1,
                time_budget=0, schedule="cosine", folds=0, flip_prob=0.0, pde_every=1, pde_samples=0)
    base.update(over)
    return TrainConfig(**base)


def datasets(n_train: int = 16, n_val: int = 8):
    return TinyDataset(n_train, seed=0), TinyDataset(n_val, seed=1)


def write_layout(root, per_family: int = 2, families=("FlatVel_A", "CurveFault_A"), seed: int = 0):
    """A competition-layout tree with random seismic (real shapes) and generated maps."""
    from fwi_core.physics import generate

    rng = np.random.default_rng(seed)
    ts = root / "train_samples"
    for fam in families:
        if "Fault" in fam:
            s, v = ts / fam / "seis2_1_0.npy", ts / fam / "vel2_1_0.npy"
        else:
            s, v = ts / fam / "data" / "data1.npy", ts / fam / "model" / "model1.npy"
        s.parent.mkdir(parents=True, exist_ok=True)
        v.parent.mkdir(parents=True, exist_ok=True)
        np.save(s, rng.standard_normal((per_family, 5, 1000, 70)).astype(np.float32))
        np.save(v, generate(fam, per_family, seed=seed))
    return root


def ddp_worker(rank: int, world: int, port: int, cfg_dict: dict, result_path: str) -> None:
    """One process of a CPU/gloo DDP run (for ``torch.multiprocessing.spawn``): trains on
    :func:`datasets` and, on rank 0, writes the result (without history) as JSON."""
    import json
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), FWI_PROGRESS="0")
    torch.set_num_threads(1)
    from fwi_core.train import TrainConfig, train

    res = train(TrainConfig.from_dict(cfg_dict), datasets=datasets())
    if rank == 0:
        with open(result_path, "w") as f:
            json.dump(res, f, default=str)
