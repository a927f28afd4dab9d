"""Kill-and-resume: a run stopped mid-epoch and resumed ends with the same weights as an
uninterrupted run with the same seed."""
import pytest
import torch
from torch.utils.data import Dataset

from fwi_core.train import ConfigError, load_checkpoint, train

from .helpers import tiny_cfg

# dropout, BatchNorm, flips, family balancing, warm-up + cosine, EMA, clipping: every
# source of randomness and state the engine must carry across a restart
OPTS = dict(epochs=3, batch_size=4, flip_prob=0.5, balance_families=True, warmup_steps=3,
            ema_decay=0.8, grad_clip=0.5, model_kwargs={"drop": 0.3, "bn": True}, keep_last=3)


def _assert_same_run(a, b):
    ca, cb = load_checkpoint(a["last_checkpoint"]), load_checkpoint(b["last_checkpoint"])
    for part in ("model", "ema"):
        for k in ca[part]:
            torch.testing.assert_close(ca[part][k], cb[part][k], rtol=0, atol=0, msg=f"{part}.{k}")
    sa, sb = ca["state"]["optimizer"]["state"], cb["state"]["optimizer"]["state"]
    for i in sa:
        torch.testing.assert_close(sa[i]["exp_avg"], sb[i]["exp_avg"], rtol=0, atol=0)
    assert ca["state"]["scheduler"]["_last_lr"] == cb["state"]["scheduler"]["_last_lr"]
    full = [r for r in b["history"] if not r["partial"]]
    for key in ("val_mae", "train_loss"):
        assert [r[key] for r in a["history"]] == pytest.approx([r[key] for r in full], abs=0), key


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    from .helpers import datasets

    tmp = tmp_path_factory.mktemp("ref")
    return train(tiny_cfg(tmp, **OPTS), datasets=datasets())


def test_stop_mid_epoch_and_resume(tmp_path, data, uninterrupted):
    first = train(tiny_cfg(tmp_path, max_steps=6, **OPTS), datasets=data)     # 4 steps per epoch
    assert first["stopped_reason"] == "max_steps" and first["step"] == 6
    pos = load_checkpoint(first["last_checkpoint"])["state"]
    assert (pos["epoch"], pos["batch"]) == (1, 2)
    second = train(tiny_cfg(tmp_path, resume="auto", **OPTS), datasets=data)
    assert second["stopped_reason"] == "completed" and second["step"] == 12
    _assert_same_run(uninterrupted, second)
    assert second["wall_time"] > pos["wall_time"]       # wall time accumulates over restarts


class _Crashing(Dataset):
    """Wraps a dataset and raises on the ``crash_at``-th item read (a killed process)."""

    def __init__(self, ds, crash_at):
        self.ds, self.crash_at, self.reads = ds, crash_at, 0

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        self.reads += 1
        if self.reads == self.crash_at:
            raise KeyboardInterrupt("killed")
        return self.ds[i]

    def families(self):
        return self.ds.families()


def test_crash_then_resume_from_periodic_checkpoint(tmp_path, data, uninterrupted):
    crashing = _Crashing(data[0], crash_at=4 * 7 + 2)      # inside step 8 (epoch 1, batch 3)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_cfg(tmp_path, checkpoint_every=3, **OPTS), datasets=(crashing, data[1]))
    latest = load_checkpoint(sorted((tmp_path / "run").glob("ckpt-*.pt"))[-1])["state"]
    assert latest["step"] == 6 and latest["batch"] == 2
    resumed = train(tiny_cfg(tmp_path, resume=str(tmp_path / "run"), **OPTS), datasets=data)
    _assert_same_run(uninterrupted, resumed)


def test_resume_from_weights_only_checkpoint_is_refused(tmp_path, data):
    res = train(tiny_cfg(tmp_path, epochs=1), datasets=data)
    with pytest.raises(ConfigError, match="weights-only checkpoint"):
        train(tiny_cfg(tmp_path, epochs=2, resume=res["best_checkpoint"]), datasets=data)


def test_resume_with_more_epochs_continues(tmp_path, data):
    train(tiny_cfg(tmp_path, epochs=1, schedule="constant"), datasets=data)
    res = train(tiny_cfg(tmp_path, epochs=2, schedule="constant", resume="auto"), datasets=data)
    assert res["epoch"] == 2 and [r["epoch"] for r in res["history"]] == [1.0, 2.0]
