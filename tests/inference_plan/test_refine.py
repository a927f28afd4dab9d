"""Physics refinement as planner stages: routing by kind (layered first), determinism,
and the stage list / registry."""
import types

import numpy as np
import pytest
import torch

from fwi_core.physics import generate
from fwi_core.inference_plan import BatchState, RefineStage, registered_stages


def _batch(pred, seismic):
    ctx = types.SimpleNamespace(device=torch.device("cpu"))
    return BatchState(start=0, stop=len(pred), rows=np.arange(len(pred)), ids=[str(i) for i in range(len(pred))],
                      pred=pred, seismic=seismic, families=None, ctx=ctx)


def _flat_and_not():
    """Two samples: gathers whose first and mirrored last shots agree (flat), and not."""
    sym = torch.randn(1, 5, 40, 70)
    sym[:, 4] = sym[:, 0].flip(-1)
    asym = torch.randn(1, 5, 40, 70)
    seis = torch.cat([sym, asym])
    pred = torch.from_numpy(np.concatenate([generate("FlatVel_A", 1, seed=0), generate("Style_A", 1, seed=0)]))
    return pred, seis


def test_layered_stage_refines_only_flat_samples(monkeypatch):
    import importlib

    refine_module = importlib.import_module("fwi_core.inference_plan.stages.refine")   # the stage's module

    calls = []

    def fake_refine(v, s, *, family, max_iter, **kw):
        calls.append((v.shape[0], list(family), max_iter))
        return v + 7.0

    monkeypatch.setattr(refine_module, "refine", fake_refine)
    pred, seis = _flat_and_not()
    layered = RefineStage("refine_layered", ("flat",), 60, 1.0)
    b = _batch(pred, seis)
    out = layered.run(b)
    assert calls == [(1, ["flat"], 60)]
    assert b.settle_mask.tolist() == [True, False]             # the refined sample is final
    torch.testing.assert_close(out[0], pred[0] + 7.0)
    torch.testing.assert_close(out[1], pred[1])                 # not flat: untouched
    rest = RefineStage("refine", ("tv", "smooth"), 30, 1.0)
    out2 = rest.run(_batch(out, seis))
    assert calls[1][0] == 1 and calls[1][2] == 30 and calls[1][1][0] in ("tv", "smooth")
    torch.testing.assert_close(out2[0], out[0])                 # already refined by the first stage
    assert "refine_layered" in registered_stages() and "refine" in registered_stages()
    # a sample another settling stage made final is not refined again
    b = _batch(out, seis)
    b.settled, b.code = np.array([0, 5]), 6
    rest.run(b)
    assert len(calls) == 2 and b.settle_mask is None


@pytest.mark.slow
def test_refine_stage_with_the_real_refinement_lowers_the_error():
    """FlatVel map, blurred start: the stage (real FWI, two iterations) moves it toward the truth."""
    from fwi_core.physics import simulate

    truth = torch.from_numpy(generate("FlatVel_A", 1, seed=3))
    seis = simulate(truth, nt=200)             # a short record keeps this test to a minute on 2 CPU cores
    start = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(truth, (4, 4, 4, 4), mode="replicate"), 9, 1)
    stage = RefineStage("refine_layered", ("flat",), 2, 1.0)
    out = stage.run(_batch(start, seis))
    assert stage.last_counts.get("flat") == 1
    assert (out - truth).abs().mean() < (start - truth).abs().mean()


def test_routing_uses_the_family_classifiers_probabilities_summed_per_kind():
    """With a family classifier the kind of a sample is the kind whose families have the
    most probability; without one, the detector on the prediction and the gathers."""
    from fwi_core.ensemble import Ensemble, FamilyClassifier, Member
    from fwi_core.inference_plan.ranking import KIND_NAMES
    from fwi_core.inference_plan.stages.refine import route
    from tests.inference_plan.helpers import TinyVel

    torch.manual_seed(0)
    fams = ["FlatVel_A", "FlatVel_B", "CurveVel_A", "Style_A", "Style_B"]
    clf = FamilyClassifier(fams, width=4).eval()
    with torch.no_grad():                       # a strong, known preference per sample through the bias
        clf.fc.weight.zero_()
        clf.fc.bias.copy_(torch.tensor([0.5, 0.4, 0.0, 0.45, 0.44]))
    ens = Ensemble([Member("m", TinyVel())], family_classifier=clf)
    seis = torch.randn(3, 5, 40, 70)
    ctx = types.SimpleNamespace(device=torch.device("cpu"), ensemble=ens)
    pred = torch.full((3, 1, 70, 70), 3000.0)
    b = BatchState(0, 3, np.arange(3), ["a", "b", "c"], pred, seis, None, ctx)
    codes, probs = route(b, pred)
    p = torch.softmax(torch.tensor([0.5, 0.4, 0.0, 0.45, 0.44]), 0).numpy()
    want = np.array([p[0] + p[1], p[2], p[3] + p[4]])       # flat, tv, smooth
    np.testing.assert_allclose(probs, np.tile(want, (3, 1)), rtol=1e-5)
    assert [KIND_NAMES[c] for c in codes] == ["flat"] * 3     # flat 0.449 beats smooth 0.446 and tv 0.143
    # without a classifier: the detector (a flat map and mirror-symmetric gathers -> flat)
    ens2 = Ensemble([Member("m", TinyVel())])
    ctx2 = types.SimpleNamespace(device=torch.device("cpu"), ensemble=ens2)
    sym = torch.randn(1, 5, 40, 70)
    sym[:, 4] = sym[:, 0].flip(-1)
    flat = torch.from_numpy(generate("FlatVel_A", 1, seed=0))
    b2 = BatchState(0, 1, np.arange(1), ["a"], flat, sym, None, ctx2)
    codes2, probs2 = route(b2, flat)
    assert KIND_NAMES[codes2[0]] == "flat" and probs2[0].tolist() == [1.0, 0.0, 0.0]
