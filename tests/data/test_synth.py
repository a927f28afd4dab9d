import re

import numpy as np
import pytest

from fwi_core.data import FWIDataset, index_train, list_test, load_solution, validate_submission
from fwi_core.physics import simulate
from tools import synth


def test_synth_writes_the_competition_layout(tmp_path, capsys):
    out = tmp_path / "ds"
    synth.main(["--out", str(out), "--samples-per-family", "1", "--test-samples", "2", "--seed", "5",
                "--families", "FlatVel_B", "CurveFault_A", "--backend", "eager", "--device", "cpu"])
    assert re.search(r"simulated 4 samples \(5 shots x 1000 steps\) on cpu in [0-9.]+ s: [0-9.]+ samples/s",
                     capsys.readouterr().out)
    assert (out / "train_samples/FlatVel_B/data/data1.npy").is_file()
    assert (out / "train_samples/FlatVel_B/model/model1.npy").is_file()
    assert (out / "train_samples/CurveFault_A/seis2_1_0.npy").is_file()
    assert (out / "train_samples/CurveFault_A/vel2_1_0.npy").is_file()
    pairs = index_train(out)
    assert [p.n for p in pairs] == [1, 1]
    tests = list_test(out)
    assert len(tests) == 2 and all(len(o) == 10 and int(o, 16) >= 0 for o, _ in tests)
    sol = load_solution(out / "test_solution.npz")
    assert set(sol) == {o for o, _ in tests}
    # the sample submission is valid for exactly these oids
    assert validate_submission(out / "sample_submission.csv", sol.keys())["oids"] == 2
    # seismic really is the simulation of the stored velocity
    ds = FWIDataset(pairs)
    x, y, _ = ds.raw(0)
    # (to float32 rounding: the scheme amplifies ulp-level differences such as a different
    # batch split across threads to about 1e-6 relative)
    def rel(a, b):
        return np.linalg.norm(a - b) / np.linalg.norm(b)

    assert rel(simulate(y[None], backend="eager")[0], x) < 1e-5
    oid, path = tests[0]
    assert rel(simulate(sol[oid][None], backend="eager")[0], np.load(path)) < 1e-5
    # no leftovers beside the dataset; --force needed to overwrite
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
    with pytest.raises(synth.SynthError, match="--force"):
        synth.build(out, 1, 0, families=["Style_A"], backend="eager")
    synth.main(["--out", str(out), "--samples-per-family", "1", "--test-samples", "0",
                "--families", "Style_A", "--backend", "eager", "--force"])
    assert [p.family for p in index_train(out)] == ["Style_A"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_synth_device_is_checked(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert synth.resolve_device("auto").type == "cpu" and synth.resolve_device(None).type == "cpu"
    with pytest.raises(synth.SynthError, match="CUDA is not available"):
        synth.build(tmp_path / "x", 1, 0, device="cuda")
    assert not (tmp_path / "x").exists()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert synth.resolve_device("auto").type == "cuda"
