"""``torchrun -m fwi_core.predict``: each rank its shard of the test files, rank 0 merges;
the CSV of one process, byte for byte; a killed rank resumes its shard."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fwi_core.data import list_test, validate_submission
from tests.inference_plan.helpers import tiny_checkpoint, write_test_root
from tests.test_sharding import _descendants

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = {**os.environ, "FWI_PROGRESS": "0", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "KAGGLE_KERNEL_RUN_TYPE",
              "COLAB_RELEASE_TAG", "FWI_TIME_LIMIT"):
        env.pop(k, None)
    return env


def _predict(n, *args):
    head = [sys.executable] if n == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n),
                                            "--master-addr", "127.0.0.1", "--master-port", str(_free_port())]
    return head + ["-m", "fwi_core.predict", *args]


def one_and_two_ranks(tmp_path, *args):
    """Run ``fwi_core.predict *args`` in one process and under torchrun with 2 ranks:
    (one.csv, two.csv, the 2-rank run's stdout), each run checked to exit 0."""
    one, two = tmp_path / "one.csv", tmp_path / "two.csv"
    for n, out in ((1, one), (2, two)):
        res = subprocess.run(_predict(n, *args, "--out", str(out)), env=_env(), cwd=ROOT, capture_output=True,
                             text=True)
        assert res.returncode == 0, res.stderr[-4000:]
    return one, two, res.stdout


@pytest.fixture
def job(tmp_path):
    root = write_test_root(tmp_path / "data", 11)
    ck = tiny_checkpoint(tmp_path / "runs" / "r" / "best.pt", 0)
    return root, ck


@pytest.mark.slow
def test_two_ranks_write_the_csv_of_one_process(job, tmp_path):
    root, ck = job
    one, two, stdout = one_and_two_ranks(tmp_path, "--data", str(root), "--checkpoints", str(ck), "--stages",
                                         "members", "flip", "--batch-size", "2")
    assert two.read_bytes() == one.read_bytes()
    assert validate_submission(tmp_path / "two.csv", [o for o, _ in list_test(root)])["oids"] == 11
    summary = json.loads((tmp_path / "two_summary.json").read_text())
    # 11 files in batches of 2: 6 batches, 3 per rank (6 + 5 files)
    assert (summary["ranks"], summary["files"], [s["files"] for s in summary["shards"]]) == (2, 11, [6, 5])
    assert all(s["stages"][1]["status"] == "complete" for s in summary["shards"])
    assert "merged 2 shards (11 oids)" in stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "one.csv", "one_summary.json", "runs", "two.csv",
                                                          "two_summary.json"]


@pytest.mark.slow
def test_more_ranks_than_batches(job, tmp_path):
    root, ck = job
    one, two, _ = one_and_two_ranks(tmp_path, "--data", str(root), "--checkpoints", str(ck), "--stages",
                                    "members", "--batch-size", "8", "--limit", "3")
    assert two.read_bytes() == one.read_bytes()
    assert [s["files"] for s in json.loads((tmp_path / "two_summary.json").read_text())["shards"]] == [3, 0]


@pytest.mark.slow
def test_a_killed_rank_resumes_its_shard(tmp_path):
    """Kill the job while rank 1 is part-way through its shard; the same command resumes
    every shard (rank 1 from its committed progress) and merges a complete, valid CSV equal
    to one process's."""
    root = write_test_root(tmp_path / "data", 24)
    ck = tiny_checkpoint(tmp_path / "runs" / "r" / "best.pt", 0, width=0.5)     # ~0.1 s per file
    args = ["--data", str(root), "--checkpoints", str(ck), "--stages", "members", "flip", "--batch-size", "2"]
    progress = tmp_path / ".two.csv.shards" / ".rank-00001-of-00002.csv.state" / "progress.json"
    proc = subprocess.Popen(_predict(2, *args, "--out", str(tmp_path / "two.csv")), env=_env(), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        done = 0
        while time.time() < deadline and done == 0:
            try:
                records = json.loads(progress.read_text()).get("records", {})
                done = sum(r.get("done", 0) for r in records.values())
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        assert done > 0 and proc.poll() is None, "rank 1 never committed a batch before the job ended"
    finally:
        for pid in [proc.pid] + _descendants(proc.pid):
            os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert not (tmp_path / "two.csv").exists()
    again = subprocess.run(_predict(2, *args, "--out", str(tmp_path / "two.csv"), "--resume"), env=_env(), cwd=ROOT,
                           capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-4000:]
    shards = json.loads((tmp_path / "two_summary.json").read_text())["shards"]
    assert shards[1]["resumed"] is True
    one = subprocess.run(_predict(1, *args, "--out", str(tmp_path / "one.csv")), env=_env(), cwd=ROOT,
                         capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    assert (tmp_path / "two.csv").read_bytes() == (tmp_path / "one.csv").read_bytes()
    assert validate_submission(tmp_path / "two.csv", [o for o, _ in list_test(root)])["oids"] == 24
    assert not (tmp_path / ".two.csv.shards").exists()
