"""fwi_core.sharding: a rank's share, the merge, files to rank 0 across 'machines'; tools.synth on torchrun."""
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from fwi_core.data.submission import HEADER
from fwi_core.errors import ConfigError, SubmissionError
from fwi_core.sharding import Ranks, deal, file_digest, merge_csv_shards, shard_range

ROOT = Path(__file__).resolve().parents[1]


def test_ranks_from_torchrun_variables():
    assert Ranks.from_env({}) == Ranks(0, 1, 0) and not Ranks.from_env({}).enabled
    r = Ranks.from_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"})
    assert (r.rank, r.world, r.local_rank, r.is_main, r.tag) == (3, 8, 1, False, "rank-00003-of-00008")
    assert r.device("cpu") == "cpu"
    with pytest.raises(ConfigError, match="RANK=8 with WORLD_SIZE=8"):
        Ranks.from_env({"RANK": "8", "WORLD_SIZE": "8"})
    with pytest.raises(ConfigError, match="WORLD_SIZE='two'"):
        Ranks.from_env({"WORLD_SIZE": "two"})


def test_shards_are_contiguous_whole_batches_covering_everything():
    seed = random.randrange(2 ** 31)
    rng = random.Random(seed)
    print("seed", seed)
    for _ in range(300):
        n, world, align = rng.randrange(0, 200), rng.randrange(1, 9), rng.randrange(1, 20)
        parts = [shard_range(n, world, r, align) for r in range(world)]
        assert [i for p in parts for i in p] == list(range(n)), (seed, n, world, align)
        assert all(p.start % align == 0 for p in parts if len(p))
        blocks = [-(-len(p) // align) for p in parts]
        assert max(blocks) - min(blocks) <= 1, (seed, n, world, align)


def test_deal_balances_unequal_units():
    seed = random.randrange(2 ** 31)
    rng = random.Random(seed)
    print("seed", seed)
    for _ in range(200):
        sizes = [rng.randrange(1, 9) for _ in range(rng.randrange(0, 40))]
        world = rng.randrange(1, 6)
        owned = [deal(sizes, world, r) for r in range(world)]
        assert sorted(i for o in owned for i in o) == list(range(len(sizes))), seed
        loads = [sum(sizes[i] for i in o) for o in owned]
        assert max(loads) - min(loads) <= max(sizes, default=0), (seed, sizes, world)
    assert deal([2, 1, 2, 1, 5], 2, 0) == [3, 4] and deal([2, 1, 2, 1, 5], 2, 1) == [0, 1, 2]   # 6 and 5


def _shard(path, oids, rows=70, header=True):
    lines = ([",".join(HEADER)] if header else []) + [f"{o}_y_{r},1" for o in oids for r in range(rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_merge_concatenates_in_rank_order_and_refuses_incomplete_shards(tmp_path):
    a = _shard(tmp_path / "a.csv", ["o1", "o2"])
    b = _shard(tmp_path / "b.csv", [])
    c = _shard(tmp_path / "c.csv", ["o3"])
    out = tmp_path / "sub.csv"
    merge_csv_shards([a, b, c], out, [2, 0, 1], ["o1", None, "o3"])
    body = lambda p: p.read_text().split("\n", 1)[1]      # noqa: E731
    assert out.read_text() == ",".join(HEADER) + "\n" + body(a) + body(c)
    before = out.read_bytes()
    _shard(c, ["o3"], rows=69)                                 # a shard cut short
    with pytest.raises(SubmissionError, match="c.csv: 69 rows, expected 70"):
        merge_csv_shards([a, b, c], out, [2, 0, 1])
    _shard(c, ["o3"], header=False)
    with pytest.raises(SubmissionError, match="not a submission shard"):
        merge_csv_shards([a, b, c], out, [2, 0, 1])
    _shard(c, ["o9"])
    with pytest.raises(SubmissionError, match="expected oid 'o3'"):
        merge_csv_shards([a, b, c], out, [2, 0, 1], ["o1", None, "o3"])
    assert out.read_bytes() == before and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _collect_worker(rank, world, port, base, results):
    """Each rank in its own folder (its 'machine'), the same relative paths."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK="0")
    from fwi_core import sharding

    sharding.CHUNK = 1000                 # several messages per file
    os.chdir(Path(base) / f"host{rank}")
    Path("out").mkdir()
    mine = Path("out") / f"part-{rank}.bin"
    mine.write_bytes(bytes(range(256)) * (10 + 7 * rank))
    coord = sharding.Coordinator(sharding.Ranks.from_env())
    try:
        lists = coord.collect([mine])
    finally:
        coord.close()
    results[rank] = [str(p) for ps in lists for p in ps]


@pytest.mark.slow
def test_collect_brings_files_from_other_machines_to_rank_0(tmp_path):
    for r in range(2):
        (tmp_path / f"host{r}").mkdir()
    results = mp.Manager().dict()
    mp.spawn(_collect_worker, args=(2, _free_port(), str(tmp_path), results), nprocs=2)
    assert results[0] == results[1] == ["out/part-0.bin", "out/part-1.bin"]
    got = tmp_path / "host0" / "out" / "part-1.bin"
    assert got.read_bytes() == bytes(range(256)) * 17                  # 4352 bytes in 5 messages
    assert not (tmp_path / "host1" / "out" / "part-0.bin").exists()    # only rank 0 gathers
    assert file_digest(got) == file_digest(tmp_path / "host1" / "out" / "part-1.bin")


SYNTH = ["--samples-per-family", "3", "--test-samples", "5", "--families", "FlatVel_A", "CurveFault_A",
         "--samples-per-file", "2", "--backend", "eager", "--device", "cpu", "--seed", "3"]


def _env():
    env = {**os.environ, "FWI_PROGRESS": "0", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _torchrun(n, port, *args):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-addr",
            "127.0.0.1", "--master-port", str(port), *args]


def _descendants(pid: int):
    """Every live process below ``pid`` (torchrun starts its workers in their own sessions)."""
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        parent[int(stat.parent.name)] = int(text[text.rindex(")") + 2:].split()[1])
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        todo += kids
    return out


def _files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_synth_on_two_ranks_writes_the_files_of_one_process(tmp_path):
    one = subprocess.run([sys.executable, "-m", "tools.synth", "--out", str(tmp_path / "one"), *SYNTH],
                         env=_env(), cwd=ROOT, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    two = subprocess.run(_torchrun(2, _free_port(), "-m", "tools.synth", "--out", str(tmp_path / "two"), *SYNTH),
                         env=_env(), cwd=ROOT, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "on 2 processes" in two.stdout and "rank 1/2: simulated 5 samples" in two.stdout, two.stdout
    a, b = _files(tmp_path / "one"), _files(tmp_path / "two")
    assert len(a) == 15 and a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]      # no shards left behind


@pytest.mark.slow
def test_killed_synth_job_resumes_its_chunks(tmp_path):
    """Kill the job once two chunks are saved; the same command keeps the saved chunks
    (simulates only the rest) and ends with the dataset of an uninterrupted run."""
    import re
    import signal
    import time

    out = tmp_path / "data"
    shards = tmp_path / ".data.synth-shards" / "parts"
    cmd = ["-m", "tools.synth", "--out", str(out), *SYNTH]
    proc = subprocess.Popen(_torchrun(2, _free_port(), *cmd), env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and len(list(shards.glob("*.npy"))) < 2:
            time.sleep(0.1)
        assert len(list(shards.glob("*.npy"))) >= 2, proc.poll()
    finally:
        for pid in [proc.pid] + _descendants(proc.pid):       # the whole job: torchrun and both ranks
            os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert not out.exists()
    kept = len(list(shards.glob("*.npy")))
    again = subprocess.run(_torchrun(2, _free_port(), *cmd), env=_env(), cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    simulated = sum(int(n) for n in re.findall(r"rank \d/2: simulated (\d+) samples", again.stdout))
    assert simulated < 11, (kept, again.stdout)       # 2 x 3 train + 5 test maps: the kept chunks were not redone
    ref = subprocess.run([sys.executable, "-m", "tools.synth", "--out", str(tmp_path / "ref"), *SYNTH],
                         env=_env(), cwd=ROOT, capture_output=True, text=True)
    assert ref.returncode == 0 and _files(out) == _files(tmp_path / "ref")
    assert not shards.parent.exists()


def test_one_process_predict_is_a_pass_through(tmp_path):
    from fwi_core.sharding import ShardedPredict

    shard = ShardedPredict(tmp_path / "sub.csv", 4, ranks=Ranks())
    calls = []
    assert shard.run(lambda out, state, keep: calls.append((out, state, keep)) or "summary", None, True) == "summary"
    assert calls == [(tmp_path / "sub.csv", None, True)] and shard.finish() == tmp_path / "sub.csv"
    src = object()
    assert shard.take(src) is src and shard.device(None) is None


def test_each_gpu_rank_takes_the_gpu_of_its_local_rank(monkeypatch):
    import torch

    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    assert Ranks(11, 16, 3).device(None) == "cuda:3" and chosen == [3]
    assert Ranks(11, 16, 3).device("cpu") == "cpu"                # an explicit --device wins
    assert Ranks(0, 1, 0).device(None) is None                   # one process: the caller's default
