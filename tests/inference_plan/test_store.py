"""Disk-backed per-file arrays: windows, reopening, memory that does not grow with the files."""
import numpy as np
import pytest

from fwi_core.inference_plan.store import PredictionStore
from tests.inference_plan.helpers import FakeClock, SleepStage, fake_ensemble, small_source, planner


def test_stored_arrays_round_trip_windows_and_reopen(tmp_path):
    st = PredictionStore(tmp_path / "s", n=10, dtype="float16")
    a = st.array("m")
    a.write(3, np.full((2, 70, 70), 0.25, np.float32))
    assert a.read(0, 10).dtype == np.float16 and a.read(3, 5).min() == 0.25 and a.read(5, 10).max() == 0
    again = PredictionStore(tmp_path / "s", n=10, dtype="float16").array("m")
    assert again.read(4, 5).max() == 0.25
    with pytest.raises(ValueError, match="expected"):
        PredictionStore(tmp_path / "s", n=11, dtype="float16").array("m")
    with pytest.raises(IndexError):
        a.read(8, 11)


def test_stages_see_the_mc_spread_and_arrays_are_read_a_window_at_a_time(tmp_path, monkeypatch):
    from fwi_core.inference_plan.store import StoredArray

    seen = []

    class Probe(SleepStage):
        def run(self, batch):
            seen.append(batch.std)
            return batch.pred

    widest = [0]
    real_read, real_write = StoredArray.read, StoredArray.write

    def read(self, start, stop):
        widest[0] = max(widest[0], stop - start)
        return real_read(self, start, stop)

    def write(self, start, values):
        widest[0] = max(widest[0], len(values))
        return real_write(self, start, values)
    monkeypatch.setattr(StoredArray, "read", read)
    monkeypatch.setattr(StoredArray, "write", write)
    src, _ = small_source(1100)
    s = planner(fake_ensemble(1, drop=0.5), src, tmp_path, batch_size=64, mc_passes=2,
                stages=["members", "mc_dropout", Probe("probe", FakeClock(), 0.0, 1.0)]).run()
    assert s.ran == ["member:m0", "mc_dropout", "probe"]
    assert all(t is not None and t.shape[1:] == (1, 70, 70) and (t > 0).any() for t in seen)
    assert widest[0] <= 1024         # memory does not grow with the number of files


def test_removing_the_state_sweeps_a_killed_writers_temporary_file_and_names_what_is_left(tmp_path):
    """A progress file's temporary (its writer killed) no longer keeps the state folder
    alive after a finished run; anything else left is named in a warning."""
    import pytest

    from fwi_core.inference_plan.store import PredictionStore

    store = PredictionStore(tmp_path / "state", 3)
    store.array("pred0")
    store.commit({"x": 1})
    (tmp_path / "state" / ".progress.json.abc123.json.tmp").write_text("{")     # unlocked: its writer is gone
    store.remove()
    assert not (tmp_path / "state").exists()
    store = PredictionStore(tmp_path / "state2", 3)
    (tmp_path / "state2" / "notes.txt").write_text("mine")
    with pytest.warns(RuntimeWarning, match="notes.txt"):
        store.remove()
