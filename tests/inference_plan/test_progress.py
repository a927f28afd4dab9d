"""Progress on disk: resume after an interruption writes the same bytes, another run's state is
not resumed, a finished run only restores its CSV, where the state folder lives."""
import json
import warnings
from pathlib import Path

import pytest

import fwi_core.inference_plan.runner as runner_mod
from fwi_core.inference_plan import CorruptedFileWarning
from fwi_core.inference_plan.store import PredictionStore, StoredArray
from tests.inference_plan.helpers import FakeCRF, fake_ensemble, small_source, planner


def _stages(crf=None):
    return ["members", "flip", "crf", "mc_dropout"]


@pytest.mark.parametrize("where, nth", [("member", 2), ("flip", 1), ("mc", 2), ("commit", 5), ("commit", 13),
                                        ("write", 9), ("write", 30), ("csv", 1), ("csv", 5)])
def test_resume_after_an_interruption_writes_the_same_bytes(tmp_path, monkeypatch, where, nth):
    src, _ = small_source(11, seed=3, bad={4})
    kw = dict(stages=_stages(), crf=FakeCRF(), mc_passes=3, batch_size=3)
    with pytest.warns(CorruptedFileWarning):
        planner(fake_ensemble(2), src, tmp_path / "full", **kw).run()
    whole = (tmp_path / "full" / "sub.csv").read_bytes()

    from fwi_core.inference_plan import stages as stages_mod
    calls = {"n": 0}

    class Interrupted(Exception):
        pass

    def bomb(orig):
        def wrapped(*a, **k):
            calls["n"] += 1
            if calls["n"] == nth:
                raise Interrupted(where)
            return orig(*a, **k)
        return wrapped
    target = {"member": (stages_mod.MemberStage, "run"), "flip": (stages_mod.FlipStage, "run"),
              "mc": (stages_mod.MCDropoutStage, "run"), "commit": (PredictionStore, "commit"),
              "write": (StoredArray, "write"), "csv": (runner_mod, "write_submission_csv")}[where]
    with monkeypatch.context() as m:
        m.setattr(target[0], target[1], bomb(getattr(*target)))
        with pytest.raises(Interrupted), pytest.warns(CorruptedFileWarning):
            planner(fake_ensemble(2), src, tmp_path / "cut", **kw).run()
    state = json.loads((tmp_path / "cut" / "state" / "progress.json").read_text())
    assert not state["finished"]
    commits = {"n": 0}
    real_commit = PredictionStore.commit

    def counting(self, progress):
        commits["n"] += 1
        return real_commit(self, progress)
    monkeypatch.setattr(PredictionStore, "commit", counting)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptedFileWarning)    # the bad file may be met again
        s = planner(fake_ensemble(2), src, tmp_path / "cut", resume=True, **kw).run()
    assert s.resumed and s.bad_files and list(s.bad_files) == [src.ids[4]]
    resumed_commits = commits["n"]
    commits["n"] = 0
    with pytest.warns(CorruptedFileWarning):
        planner(fake_ensemble(2), src, tmp_path / "again", **kw).run()
    assert resumed_commits < commits["n"]      # it continued: fewer batches than a whole run
    assert (tmp_path / "cut" / "sub.csv").read_bytes() == whole
    assert not (tmp_path / "cut" / "state").exists()       # cleaned up after a finished run


def test_resume_ignores_state_of_another_run(tmp_path):
    src, _ = small_source(5)
    p = planner(fake_ensemble(2), src, tmp_path, stages=["members"], keep_state=True)
    p.run()
    other = planner(fake_ensemble(2), src, tmp_path, stages=["members", "flip"], resume=True)
    with pytest.warns(RuntimeWarning, match="another run"):
        s = other.run()
    assert not s.resumed and s.ran == ["member:m0", "member:m1", "flip"]


def test_resuming_a_finished_run_only_restores_a_missing_csv(tmp_path):
    src, _ = small_source(5)
    planner(fake_ensemble(2), src, tmp_path, stages=["members", "flip"], keep_state=True).run()
    first = (tmp_path / "sub.csv").read_bytes()
    (tmp_path / "sub.csv").unlink()
    s = planner(fake_ensemble(2), src, tmp_path, stages=["members", "flip"], resume=True, keep_state=True).run()
    assert s.ran == ["member:m0", "member:m1", "flip"] and (tmp_path / "sub.csv").read_bytes() == first


def test_state_folder_is_beside_the_csv_except_on_kaggle(tmp_path, monkeypatch):
    import tempfile

    from fwi_core.inference_plan import default_state_dir

    for var in ("KAGGLE_KERNEL_RUN_TYPE", "COLAB_RELEASE_TAG", "SM_MODEL_DIR", "SM_CHANNEL_TRAINING"):
        monkeypatch.delenv(var, raising=False)
    assert default_state_dir(tmp_path / "submission.csv") == tmp_path / ".submission.csv.state"
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Batch")
    monkeypatch.setenv("FWI_DATA", "/nonexistent")
    assert default_state_dir("/kaggle/working/submission.csv") == \
        Path(tempfile.gettempdir()) / "fwi-tta" / "submission.csv.state"
