"""Time-aware schedules, snapshots at cycle minima and resume with another length.

A fake clock replaces the run's clock (``fwi_core.train.budget``'s ``time.perf_counter``): every forward pass of the tiny
model advances it by ``delay`` seconds (its ``time.sleep``), so budgets and progress are
exact and independent of the machine's speed. The learning rate of every optimizer step
is recorded by wrapping ``AdamW.step``.
"""
import math
import time
import types

import pytest
import torch

from fwi_core.train import ConfigError, read_metadata, train
from fwi_core.train import budget

from . import helpers
from .helpers import tiny_cfg


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def perf_counter(self):
        return self.t

    def sleep(self, s):
        self.t += s


@pytest.fixture
def clock(monkeypatch):
    c = FakeClock()
    monkeypatch.setattr(budget, "time", types.SimpleNamespace(perf_counter=c.perf_counter, strftime=time.strftime,
                                                               gmtime=time.gmtime))
    monkeypatch.setattr(helpers, "time", types.SimpleNamespace(sleep=c.sleep))
    return c


@pytest.fixture
def lrs(monkeypatch):
    """The learning rate of every optimizer step, in order."""
    seen = []
    original = torch.optim.AdamW.step

    def step(self, *a, **k):
        seen.append(self.param_groups[0]["lr"])
        return original(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    return seen


def _time_cfg(tmp_path, **over):
    base = dict(epochs=0, time_budget=60.0, lr=1.0, model_kwargs={"delay": 1.0}, ema_decay=0.0)
    base.update(over)
    return tiny_cfg(tmp_path, **base)


def test_time_mode_schedule_spans_the_budget(tmp_path, data, clock, lrs):
    res = train(_time_cfg(tmp_path, schedule="cosine"), datasets=data)
    assert res["stopped_reason"] == "time_budget" and res["wall_time"] <= 60.0
    assert len(lrs) == res["step"] >= 30           # 1 s per step, 1 s per validation
    assert lrs[0] == pytest.approx(1.0, abs=0.01)
    assert all(b <= a + 1e-12 for a, b in zip(lrs, lrs[1:]))     # annealing only
    assert lrs[-1] < 0.02                                         # the minimum, near the deadline
    assert lrs[len(lrs) // 2] == pytest.approx(0.5, abs=0.12)     # half way in time, half the rate
    meta = read_metadata(res["last_checkpoint"])
    assert meta["time_mode"] and meta["config"]["epochs"] == 0


def test_time_mode_onecycle_rises_then_anneals(tmp_path, data, clock, lrs):
    train(_time_cfg(tmp_path, schedule="onecycle"), datasets=data)
    peak = max(range(len(lrs)), key=lrs.__getitem__)
    assert 0.2 * len(lrs) <= peak <= 0.4 * len(lrs)               # 30% of the budget
    assert lrs[0] < 0.1 and lrs[peak] == pytest.approx(1.0, abs=0.02) and lrs[-1] < 0.01


def test_time_mode_needs_a_budget(tmp_path, data):
    with pytest.raises(ConfigError, match="epochs=0 trains until the time budget"):
        train(tiny_cfg(tmp_path, epochs=0, time_budget=0), datasets=data)


def test_time_mode_restarts_snapshot_every_cycle_at_its_minimum(tmp_path, data, clock, lrs):
    res = train(_time_cfg(tmp_path, schedule="cosine_restarts", restart_cycles=3, min_lr=0.0), datasets=data)
    snaps = sorted((tmp_path / "run").glob("snapshot-*.pt"))
    assert [p.name for p in snaps] == ["snapshot-01.pt", "snapshot-02.pt", "snapshot-03.pt"]
    steps = [read_metadata(p)["step"] for p in snaps]
    assert steps[-1] == res["step"]                                # the budget's end closes the last cycle
    for s in steps:
        assert lrs[s - 1] < 0.08, (s, lrs[s - 1])                  # the step before: near the minimum
    for s in steps[:-1]:
        assert lrs[s] > 0.85                                       # then the restart


@pytest.mark.parametrize("warmup", [0, 3])
def test_step_mode_restart_snapshots_are_at_the_minimum(tmp_path, data, lrs, warmup):
    res = train(tiny_cfg(tmp_path, epochs=4, schedule="cosine_restarts", restart_epochs=2, warmup_steps=warmup,
                         lr=1.0, min_lr=0.01, ema_decay=0.0), datasets=data)
    snaps = sorted((tmp_path / "run").glob("snapshot-*.pt"))
    steps = [read_metadata(p)["step"] for p in snaps]
    assert steps == [8, 16] == [8, res["step"]]
    for s in steps:
        assert lrs[s - 1] == pytest.approx(0.01)                   # trained at the minimum last
    assert lrs[8] == pytest.approx(1.0)
    if warmup:
        assert lrs[0] == pytest.approx(0.01) and lrs[:4] == sorted(lrs[:4])


def _resume_lrs(tmp_path, data, lrs, schedule, first, second):
    train(tiny_cfg(tmp_path, schedule=schedule, lr=1.0, ema_decay=0.0, restart_epochs=1, **first), datasets=data)
    n = len(lrs)
    res = train(tiny_cfg(tmp_path, schedule=schedule, lr=1.0, ema_decay=0.0, restart_epochs=1, resume="auto",
                         **second), datasets=data)
    return lrs[:n], lrs[n:], res


@pytest.mark.parametrize("schedule", ["cosine", "onecycle", "cosine_restarts", "constant"])
def test_resume_with_more_epochs_rebuilds_the_schedule(tmp_path, data, lrs, schedule):
    before, after, res = _resume_lrs(tmp_path, data, lrs, schedule, dict(epochs=3, max_steps=6),
                                     dict(epochs=6))
    assert res["stopped_reason"] == "completed" and res["step"] == 24 and len(after) == 18
    if schedule == "constant":
        assert set(before + after) == {1.0}
    elif schedule == "cosine_restarts":
        # resumed at step 6; 4-step cycles end on steps 7, 11, ..., 23 and restart on 8, 12, ...
        assert [after[i] for i in range(1, 18, 4)] == pytest.approx([0.0] * 5, abs=1e-9)
        assert [after[i] for i in range(2, 18, 4)] == pytest.approx([1.0] * 4)
    else:
        assert after[0] == pytest.approx(before[-1], rel=0.35)     # goes on from where it was
        assert all(b <= a + 1e-12 for a, b in zip(after, after[1:]))   # never climbs back up
        assert after[len(after) // 2] > 0.15 * after[0]               # the anneal spans the new length
        assert after[-1] < 1e-3


@pytest.mark.parametrize("schedule", ["cosine", "onecycle"])
def test_resume_with_fewer_epochs_and_time_mode(tmp_path, data, lrs, clock, schedule):
    before, after, _ = _resume_lrs(tmp_path, data, lrs, schedule, dict(epochs=6, max_steps=14),
                                   dict(epochs=4))
    assert len(after) == 2 and after[-1] < 1e-3 and after[0] <= before[-1]
    # a third session in time mode (a new budget) without re-warming (rewarm_fraction=0): anneals from the
    # current rate, no jump (test_resume_cli covers the warm-up a finished anneal gets by default)
    n = len(lrs)
    res = train(tiny_cfg(tmp_path, schedule=schedule, lr=1.0, ema_decay=0.0, resume="auto", epochs=0,
                         time_budget=30.0, model_kwargs={"delay": 1.0}, rewarm_fraction=0.0), datasets=data)
    third = lrs[n:]
    assert res["stopped_reason"] == "time_budget" and len(third) > 5
    assert third[0] <= after[-1] + 1e-12 or third[0] == pytest.approx(after[-1], rel=0.3, abs=1e-3)
    assert all(b <= a + 1e-12 for a, b in zip(third, third[1:]))


def test_time_mode_resume_with_a_new_budget_continues_the_progress(tmp_path, data, clock, lrs):
    # a session killed (here: max_steps) half way through its 60 s budget ...
    first = train(_time_cfg(tmp_path, schedule="cosine", max_steps=15), datasets=data)
    n = len(lrs)
    assert first["stopped_reason"] == "max_steps" and 0.2 < lrs[-1] < 0.9
    # ... resumed in a new session with another budget: the remaining anneal spans it
    second = train(_time_cfg(tmp_path, schedule="cosine", time_budget=40.0, resume="auto"), datasets=data)
    after = lrs[n:]
    assert second["stopped_reason"] == "time_budget" and len(after) > 10
    assert after[0] <= lrs[n - 1] + 1e-9                          # no climb at the restart
    assert all(b <= a + 1e-12 for a, b in zip(after, after[1:]))
    assert after[-1] < 0.01 and math.isfinite(second["best_val_mae"])
