"""Test-set I/O and the state folder's disk: the first pass keeps a float16 copy of the
gathers the limit leaves room for, later passes read it instead of the files; the disk use
is reported up front and a stage whose arrays would pass the limit is skipped."""
import numpy as np
import pytest

from fwi_core.inference_plan.store import state_limit
from tests.inference_plan.helpers import FakeCRF, fake_ensemble, planner, small_source

MAP = 70 * 70 * 4


def _counting(n, seed=0):
    src, data = small_source(n, seed=seed)
    reads = []
    inner = src.read

    def read(i):
        reads.append(i)
        return inner(i)
    src.read = read
    return src, data, reads


def test_later_passes_read_the_float16_copy_instead_of_the_files(tmp_path):
    n = 9
    src, data, reads = _counting(n)
    logs = []
    p = planner(fake_ensemble(2), src, tmp_path, gather_cache=True, stages=["members", "flip", "mc_dropout"],
                mc_passes=3, keep_state=True, log=logs.append)
    s = p.run()
    assert s.ran == ["member:m0", "member:m1", "flip", "mc_dropout"]
    assert p.state.cache_rows == n
    # time_members reads the first batch, the first pass every file; the other passes none
    assert sorted(set(reads)) == list(range(n)) and len(reads) == n + 4
    cached = np.load(tmp_path / "state" / "gathers.npy")
    assert cached.dtype == np.float16 and cached.shape == (n,) + data.shape[1:]
    np.testing.assert_array_equal(cached, data.astype(np.float16))
    report = [line for line in logs if line.startswith("state folder")]
    assert report and "float16 gathers of 9 of 9 files" in report[0] and "within its limit of" in report[0]
    # the predictions with the copy differ from the float32 gathers' by float16 rounding only
    c16 = planner(fake_ensemble(2), small_source(n)[0], tmp_path / "f16", stages=["members", "flip"],
                  keep_state=True, gather_cache=True)
    c16.run()
    p32 = planner(fake_ensemble(2), small_source(n)[0], tmp_path / "f32", stages=["members", "flip"],
                  keep_state=True)
    p32.run()
    diff = np.abs(p32.read_prediction(0, n) - c16.read_prediction(0, n))
    assert 0 < diff.mean() < 0.5 and diff.max() < 5.0                      # m/s


def test_a_small_limit_caches_part_of_the_files_and_skips_what_does_not_fit(tmp_path):
    n = 10
    src, data, reads = _counting(n, seed=1)
    per_file = int(np.prod(data.shape[1:])) * 2
    arrays = 2 * n * MAP + 2 * n * MAP           # prediction buffers, two members
    limit = arrays + 4 * per_file                # room for the members and 4 files' gathers, not for the flip
    p = planner(fake_ensemble(2), src, tmp_path, gather_cache=True, stages=["members", "flip"],
                state_limit_gb=limit / 1e9, keep_state=True)
    # the cache leaves the flip's arrays their room: with them projected, only a few files fit
    s = p.run()
    stages = {r["name"]: r for r in s.stages}
    flip_bytes = 2 * n * MAP
    assert p.state.cache_rows == max(0, (limit - arrays - flip_bytes) // per_file)
    assert stages["flip"]["status"] == "skipped" and "over its" in stages["flip"]["note"]
    assert stages["member:m1"]["status"] == "complete"
    # a limit with room for everything: the flip runs and every file is cached
    src2, _, _ = _counting(n, seed=1)
    big = planner(fake_ensemble(2), src2, tmp_path / "big", gather_cache=True, stages=["members", "flip"],
                  state_limit_gb=1.0).run()
    assert "flip" in big.ran


def test_the_limit_defaults_to_40_gb_on_kaggle_and_never_passes_the_free_disk(tmp_path, monkeypatch):
    import shutil

    for var in ("KAGGLE_KERNEL_RUN_TYPE", "COLAB_RELEASE_TAG", "SM_MODEL_DIR", "SM_CHANNEL_TRAINING"):
        monkeypatch.delenv(var, raising=False)
    free = shutil.disk_usage(tmp_path).free
    assert state_limit(tmp_path / "s", None) == pytest.approx(0.9 * free, rel=0.01)
    assert state_limit(tmp_path / "s", 0.001) == 1_000_000
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Batch")
    assert state_limit(tmp_path / "s", None) == min(int(40e9), int(0.9 * free))
