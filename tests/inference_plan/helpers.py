"""Fakes for the budgeted-inference tests: a fake clock, models that spend fake time,
tiny real checkpoints and test folders (fast on 2 CPU cores), small sources and a
planner on a fake clock."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import fwi_core.inference_plan.runner as runner_mod
import fwi_core.inference_plan.submission_csv as csv_mod
from fwi_core.ensemble import Ensemble, Member
from fwi_core.errors import DataFormatError
from fwi_core.inference_plan import ArraySource, BudgetedInference, Deadline, Stage

SMALL = (5, 10, 7)   # tiny "gathers": the fake models take any size


class FakeClock:
    """A clock that only moves when something sleeps on it."""

    def __init__(self, t: float = 0.0):
        self.t = float(t)

    def __call__(self) -> float:
        return self.t

    def sleep(self, dt: float) -> None:
        assert dt >= 0
        self.t += dt


class TinyVel(nn.Module):
    """(B,5,T,R) gathers of any size -> (B,1,70,70) normalised velocity; column-asymmetric
    (so the flip changes it), with dropout (MC dropout); ``cost`` fake seconds per sample
    (times ``jitter()``) on ``clock``."""

    def __init__(self, seed: int = 0, drop: float = 0.2, clock: Optional[FakeClock] = None, cost: float = 0.0,
                 jitter: Callable[[], float] = lambda: 1.0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(5, 70, generator=g) * 0.3)
        self.b = nn.Parameter(torch.linspace(-0.8, 0.6, 70)[:, None] + 0.1 * torch.randn(70, 70, generator=g))
        self.drop = nn.Dropout(drop)
        self.clock, self.cost, self.jitter = clock, cost, jitter

    def forward(self, x):
        if self.clock is not None:
            self.clock.sleep(self.cost * x.shape[0] * self.jitter())
        e = F.adaptive_avg_pool2d(x.abs(), (1, 70))[:, :, 0]                    # (B,5,70)
        cols = (e * self.w).sum(1)                                               # (B,70)
        out = torch.tanh(self.b[None] + 0.5 * self.drop(cols)[:, None, :])       # (B,70,70)
        return out[:, None]


def fake_ensemble(n_members: int = 2, clock: Optional[FakeClock] = None, costs=None, drop: float = 0.2,
                  jitter: Callable[[], float] = lambda: 1.0) -> Ensemble:
    costs = costs or [0.0] * n_members
    return Ensemble([Member(f"m{i}", TinyVel(seed=i, drop=drop, clock=clock, cost=costs[i], jitter=jitter))
                     for i in range(n_members)])


class FakeCRF(nn.Module):
    """A CRF stand-in: a 3x3 mean filter, ``cost`` fake seconds per sample."""

    def __init__(self, clock: Optional[FakeClock] = None, cost: float = 0.0, jitter=lambda: 1.0):
        super().__init__()
        self.clock, self.cost, self.jitter = clock, cost, jitter

    def forward(self, pred, confidence=None):
        if self.clock is not None:
            self.clock.sleep(self.cost * pred.shape[0] * self.jitter())
        return F.avg_pool2d(F.pad(pred, (1, 1, 1, 1), mode="replicate"), 3, stride=1)

    def config(self):
        return {"fake": 1.0}


class SleepStage(Stage):
    """A transform stage (like physics refinement): adds ``delta`` m/s, ``cost`` fake
    seconds per file; its gain comes from ``default_gain``; ``knows_cost``: its
    ``estimate`` returns the cost (else the planner has to time it); it really costs
    ``surprise`` times that."""

    needs_seismic = False

    def __init__(self, name: str, clock: FakeClock, cost: float, gain: float, delta: float = 1.0,
                 jitter=lambda: 1.0, knows_cost: bool = True, surprise: float = 1.0):
        self.name = self.kind = name
        self.clock, self.cost, self.default_gain, self.delta, self.jitter = clock, cost, gain, delta, jitter
        self.knows_cost, self.surprise = knows_cost, surprise

    def estimate(self, ctx, before):
        return self.cost if self.knows_cost else None

    def run(self, batch):
        self.clock.sleep(self.cost * self.surprise * len(batch) * self.jitter())
        return batch.pred + self.delta


def write_test_root(root: Path, n: int, shape=(5, 1000, 70), seed: int = 0) -> Path:
    """``root/test/<oid>.npy`` for n random files; returns root."""
    rng = np.random.default_rng(seed)
    (root / "test").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        np.save(root / "test" / f"{i:04d}{seed:02d}abcd.npy", rng.standard_normal(shape).astype(np.float32))
    return root


def tiny_checkpoint(path: Path, seed: int = 0, model_name: str = "inversionnet", **kwargs) -> Path:
    """An engine-format checkpoint of a very narrow InversionNet (real shapes, dropout), or
    of another registered model with ``kwargs``."""
    from fwi_core.models import create_model
    from fwi_core.train.checkpoint import FORMAT, save_checkpoint

    torch.manual_seed(seed)
    kwargs = kwargs or ({"width": 0.0625} if model_name == "inversionnet" else {})
    model = create_model(model_name, **kwargs)
    meta = {"model": model_name, "model_kwargs": kwargs, "metrics": None}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint({"format": FORMAT, "metadata": meta, "model": model.state_dict(), "ema": None}, path)
    return path


def small_source(n, seed=0, bad=()):
    rng = np.random.default_rng(seed)
    data = rng.standard_normal((n,) + SMALL).astype(np.float32)
    ids = [f"{i:03d}{seed:03d}ab" for i in range(n)]

    def read(i):
        if i in bad:
            raise DataFormatError(f"file {ids[i]}: truncated")
        return data[i]
    src = ArraySource(read, ids=ids, n=n)
    src.item_shape = SMALL
    return src, data


def patch_csv_cost(monkeypatch, clock, per_oid, jitter=lambda: 1.0):
    """Make formatting the CSV cost fake time (as it costs real time on 65,818 files)."""
    real = csv_mod.format_submission_rows

    def slow(oids, maps):
        clock.sleep(per_oid * len(oids) * jitter())
        return real(oids, maps)
    monkeypatch.setattr(csv_mod, "format_submission_rows", slow)       # writing the CSV
    monkeypatch.setattr(runner_mod, "format_submission_rows", slow)    # timing it


def planner(ens, src, tmp_path, clock=None, budget=None, **kw):
    clock = clock or FakeClock()
    deadline = Deadline(None if budget is None else clock() + budget, clock, clock())
    kw.setdefault("batch_size", 4)
    kw.setdefault("progress", False)
    kw.setdefault("log", None)
    kw.setdefault("device", "cpu")
    kw.setdefault("gather_cache", False)     # float32 gathers in every pass: outputs compare with Ensemble.predict
    kw.setdefault("stages", ["members", "flip", "crf", "mc_dropout"])   # tiny fake gathers: no physics
    return BudgetedInference(ens, src, tmp_path / "sub.csv", deadline=deadline, state_dir=tmp_path / "state", **kw)
