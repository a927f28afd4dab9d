"""The consistency stage: after the ensemble (and CRF), the invertible UNet flags final
maps inconsistent with their gathers; predictions are not changed."""
import numpy as np
import torch

from fwi_core.inverse_consistency import ConsistencyFlagger
from fwi_core.data import normalize_seismic
from fwi_core.models import create_model
from fwi_core.inference_plan import ArraySource, BudgetedInference, Deadline

from .helpers import FakeClock, fake_ensemble


def test_consistency_stage_flags_the_maps_above_the_learned_threshold(tmp_path):
    rng = np.random.default_rng(0)
    data = (rng.standard_normal((4, 5, 1000, 70)) * 3).astype(np.float32)
    ids = [f"{i:03d}cafe" for i in range(4)]
    src = ArraySource(lambda i: data[i], ids=ids, n=4)
    ens = fake_ensemble(2, drop=0.0)
    torch.manual_seed(0)
    inv = create_model("invertible_unet", width=4, latent_channels=4, hidden=8, blocks_per_level=1,
                       drop_rate=0.0).eval()
    x = normalize_seismic(torch.from_numpy(data))
    final = ens.predict(x)[0]                                 # what the members stage leaves
    scores = ConsistencyFlagger(inv, 0.0).score(x, final)
    flagger = ConsistencyFlagger(inv, float(np.median(scores)))
    clock = FakeClock()
    run = BudgetedInference(ens, src, tmp_path / "sub.csv", stages=["members", "consistency"],
                            deadline=Deadline(None, clock, clock()), state_dir=tmp_path / "state", batch_size=4,
                            progress=False, log=None, device="cpu", resources={"consistency": flagger})
    summary = run.run()
    assert "consistency" in summary.ran
    stage = [s for s in run.stages if s.name == "consistency"][0]
    want = {oid: float(s) for oid, s in zip(ids, scores) if s > flagger.threshold}
    assert set(stage.flagged) == set(want) and len(want) == 2 and stage.scored == 4
    for oid in want:
        assert stage.flagged[oid] == pytest_approx(want[oid])
    # without a flagger the stage says why it cannot run, and the run goes on
    run2 = BudgetedInference(ens, src, tmp_path / "sub2.csv", stages=["members", "consistency"],
                             deadline=Deadline(None, clock, clock()), state_dir=tmp_path / "state2", batch_size=4,
                             progress=False, log=None, device="cpu")
    s2 = run2.run()
    assert "consistency" not in s2.ran and (tmp_path / "sub2.csv").read_bytes() == (tmp_path / "sub.csv").read_bytes()


def pytest_approx(v):
    import pytest

    return pytest.approx(v, rel=1e-5)


def test_the_flaggers_own_dict_collects_the_flags():
    from fwi_core.inference_plan import ConsistencyStage

    torch.manual_seed(0)
    inv = create_model("invertible_unet", width=4, latent_channels=4, hidden=8, blocks_per_level=1)
    f = ConsistencyFlagger(inv, 1.0)
    assert ConsistencyStage(f).flagged is f.flagged == {} and ConsistencyStage(None).flagged == {}
