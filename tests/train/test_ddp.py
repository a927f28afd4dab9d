"""Two CPU processes (gloo) train like one process with the same global batch."""
import json
import socket

import pytest
import torch
import torch.multiprocessing as mp

from fwi_core.train import load_checkpoint, train

from .helpers import datasets, ddp_worker, tiny_cfg


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_matches_single_process(tmp_path):
    # no BatchNorm or dropout (per-process statistics/masks differ by design); flips and
    # family balancing are drawn per global batch, so they match
    opts = dict(epochs=2, batch_size=8, flip_prob=0.5, balance_families=True, ema_decay=0.8,
                warmup_steps=2, checkpoint_every=3)
    single = train(tiny_cfg(tmp_path / "single", **opts), datasets=datasets())

    cfg = tiny_cfg(tmp_path / "ddp", **opts).to_dict()
    result_path = tmp_path / "ddp_result.json"
    mp.spawn(ddp_worker, args=(2, _free_port(), cfg, str(result_path)), nprocs=2, join=True)
    ddp = json.loads(result_path.read_text())

    assert ddp["step"] == single["step"] == 4 and ddp["stopped_reason"] == "completed"
    a, b = load_checkpoint(single["last_checkpoint"]), load_checkpoint(ddp["last_checkpoint"])
    assert b["metadata"]["world_size"] == 2 and len(b["state"]["ranks"]) == 2
    for part in ("model", "ema"):
        for k in a[part]:
            torch.testing.assert_close(b[part][k], a[part][k], rtol=1e-4, atol=1e-6, msg=f"{part}.{k}")
    hist_a, hist_b = a["state"]["history"], b["state"]["history"]
    assert [r["train_loss"] for r in hist_b] == pytest.approx([r["train_loss"] for r in hist_a], rel=1e-5)
    assert [r["val_mae_ema"] for r in hist_b] == pytest.approx([r["val_mae_ema"] for r in hist_a], rel=1e-5)
    assert ddp["best_val_mae"] == pytest.approx(single["best_val_mae"], rel=1e-5)
    import numpy as np

    oa, ob = np.load(single["oof_path"]), np.load(ddp["oof_path"])
    np.testing.assert_array_equal(oa["indices"], ob["indices"])
    np.testing.assert_allclose(ob["pred"], oa["pred"], rtol=1e-4, atol=1e-2)   # m/s


def test_ddp_ranks_agree_on_out_of_memory(tmp_path):
    """Only rank 1 runs out of memory (micro-batches above 2 of its 4): both ranks halve
    together and the run ends with the weights of a run without out-of-memory."""
    opts = dict(epochs=1, batch_size=8, ema_decay=0.0)
    single = train(tiny_cfg(tmp_path / "single", **opts), datasets=datasets())
    cfg = tiny_cfg(tmp_path / "ddp", model_kwargs={"oom_above": 2, "oom_rank": 1}, **opts).to_dict()
    result_path = tmp_path / "ddp_result.json"
    mp.spawn(ddp_worker, args=(2, _free_port(), cfg, str(result_path)), nprocs=2, join=True)
    ddp = json.loads(result_path.read_text())
    assert ddp["stopped_reason"] == "completed" and ddp["step"] == single["step"] == 2
    train_events = [e for e in ddp["oom_events"] if e["kind"] == "train"]
    assert train_events == [{"kind": "train", "step": 0, "micro_batch": 2, "accum": 2}]   # seen on rank 0 too
    a, b = load_checkpoint(single["last_checkpoint"]), load_checkpoint(ddp["last_checkpoint"])
    assert b["state"]["accum"] == 2
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-4, atol=1e-5, msg=k)
