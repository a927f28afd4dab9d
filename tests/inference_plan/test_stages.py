"""The built-in stages compute the ensemble's predictions (flip, CRF, MC dropout, family
weights); the stage list and the Stage interface are checked."""
import json

import numpy as np
import pytest
import torch

from fwi_core.data import SubmissionWriter
from fwi_core.data.normalize import normalize_seismic
from fwi_core.inference_plan import StageError, build_stages
from tests.inference_plan.helpers import FakeClock, FakeCRF, SleepStage, fake_ensemble, small_source, planner


def test_stages_compute_the_ensembles_flip_and_crf_prediction(tmp_path):
    ens = fake_ensemble(2)
    src, data = small_source(9)
    crf = FakeCRF()
    s = planner(ens, src, tmp_path, stages=["members", "flip", "crf"], crf=crf, keep_state=True).run()
    assert s.ran == ["member:m0", "member:m1", "flip", "crf"]
    x = normalize_seismic(torch.from_numpy(data))
    expected, _ = ens.predict(x, flip_tta=True)
    expected = crf(expected).clamp(1500, 4500)
    ref = tmp_path / "ref.csv"
    with SubmissionWriter(ref) as w:
        w.write_batch(src.ids, expected.numpy())
    got = (tmp_path / "sub.csv").read_text().splitlines()
    want = ref.read_text().splitlines()
    diff = max(abs(float(a) - float(b)) for g, r in zip(got[1:], want[1:])
               for a, b in zip(g.split(",")[1:], r.split(",")[1:]))
    assert diff < 2e-3    # the same maps up to float rounding (printed with 3 decimals)
    summary = json.loads((tmp_path / "sub_summary.json").read_text())
    assert summary["ran" if "ran" in summary else "plan"] is not None and summary["files"] == 9


def test_mc_dropout_stores_a_spread_and_summarises_uncertainty_per_family(tmp_path):
    ens = fake_ensemble(2, drop=0.5)
    src, _ = small_source(6)
    s = planner(ens, src, tmp_path, stages=["members", "mc_dropout"], mc_passes=5).run()
    assert s.ran == ["member:m0", "member:m1", "mc_dropout"]
    u = s.uncertainty["all"]
    assert u["files"] == 6 and u["mean_std"] > 0 and len(u["depth_std"]) == 70
    from fwi_core.plotting import plot_uncertainty_by_family
    fig = plot_uncertainty_by_family(s.uncertainty)
    assert [ax.get_title() for ax in fig.axes] == ["uncertainty per family", "uncertainty against depth"]
    with pytest.raises(ValueError, match="MC dropout did not run"):
        plot_uncertainty_by_family(None)
    no_drop = fake_ensemble(2, drop=0.0)
    s2 = planner(no_drop, src, tmp_path / "b", stages=["members", "mc_dropout"]).run()
    assert s2.stages[-1]["status"] == "skipped" and "dropout" in s2.stages[-1]["note"]


def test_crf_before_a_producer_is_applied_again(tmp_path):
    ens = fake_ensemble(2)
    src, data = small_source(5)
    crf = FakeCRF()
    p = planner(ens, src, tmp_path, stages=["members", "crf", "flip"], crf=crf, keep_state=True)
    assert p.run().ran == ["member:m0", "member:m1", "crf", "flip"]
    expected = crf(ens.predict(normalize_seismic(torch.from_numpy(data)), flip_tta=True)[0])
    np.testing.assert_allclose(p.read_prediction(0, 5), expected[:, 0].numpy(), atol=1e-3)


class _Classifier(torch.nn.Module):
    """A family classifier stand-in: family A when the gathers' mean is positive."""

    def predict(self, x):
        return ["FamA" if v > 0 else "FamB" for v in x.mean(dim=(1, 2, 3)).tolist()]


def test_per_family_weights_follow_the_family_classifier(tmp_path):
    from fwi_core.ensemble import EnsembleWeights

    ens = fake_ensemble(2, drop=0.3)
    ens.weights = EnsembleWeights({"default": {"m0": 0.5, "m1": 0.5}, "FamA": {"m0": 1.0, "m1": 0.0}},
                                  ["m0", "m1"])
    ens.family_classifier = _Classifier()
    src, data = small_source(8)
    data[:4] += 3.0          # the classifier's family A
    data[4:] -= 3.0
    p = planner(ens, src, tmp_path, stages=["members", "mc_dropout"], keep_state=True, store_dtype="float16")
    s = p.run()
    assert set(s.uncertainty) == {"FamA", "FamB"} and s.uncertainty["FamA"]["files"] == 4
    assert p.store.array("member=m0").read(0, 8).dtype == np.float16
    # the final maps are the ensemble's combination of the members' stored MC means
    mc = {m: torch.from_numpy(p.store.array(f"member={m}.mc").read(0, 8).astype(np.float32))[:, None]
          for m in ("m0", "m1")}
    fams = ens.predict_families(normalize_seismic(torch.from_numpy(data)))
    assert fams == ["FamA"] * 4 + ["FamB"] * 4
    want = (ens.combine(mc, families=fams) + 1) / 2 * 3000 + 1500
    np.testing.assert_allclose(p.read_prediction(0, 8), want.clamp(1500, 4500)[:, 0].numpy(), atol=1e-3)
    np.testing.assert_allclose(p.read_prediction(0, 4), (mc["m0"][:4, 0].numpy() + 1) * 1500 + 1500,
                               atol=0.05)    # family A: member m0 only (float16 storage)


def test_stage_list_errors():
    ens = fake_ensemble(2)
    res = {"ensemble": ens, "crf": None}
    assert [s.name for s in build_stages(["members", "flip"], ["m1", "m0"], res)] == ["member:m1", "member:m0", "flip"]
    with pytest.raises(StageError, match="unknown stage 'tta'"):
        build_stages(["members", "tta"], ["m0", "m1"], res)
    with pytest.raises(StageError, match="first stage must be a member"):
        build_stages(["flip", "members"], ["m0", "m1"], res)
    with pytest.raises(StageError, match="no member 'zz'"):
        build_stages(["member:zz"], ["m0", "m1"], res)
    with pytest.raises(StageError, match="would overwrite"):
        build_stages(["member:m0", SleepStage("refine", FakeClock(), 0, 1), "flip"], ["m0", "m1"], res)
    with pytest.raises(StageError, match="twice"):
        build_stages(["members", "member:m0"], ["m0", "m1"], res)
    build_stages(["member:m0", "crf", "flip"], ["m0", "m1"], res)   # the CRF is re-applied: allowed


def test_stage_classes_must_define_run_and_reapply_stages_a_transform():
    from fwi_core.inference_plan.stages import Stage

    class NoRun(Stage):
        name = "norun"

    with pytest.raises(TypeError, match="abstract"):
        NoRun()
    with pytest.raises(TypeError, match="reapply = True but defines no transform"):
        class NoTransform(Stage):
            reapply = True

            def run(self, batch):
                return batch.pred

    class Plain(Stage):
        name = "plain"

        def run(self, batch):
            return batch.pred

    with pytest.raises(TypeError, match="not a reapply stage"):
        Plain().transform(torch.zeros(1, 1, 70, 70), None)


def test_crf_cost_estimate_is_a_fraction_of_the_cheapest_member():
    from fwi_core.inference_plan import CRFStage, RunContext

    ctx = RunContext(fake_ensemble(2), None, torch.device("cpu"))
    assert CRFStage(FakeCRF()).estimate(ctx, []) is None
    ctx.member_cost = {"m0": 0.4, "m1": 0.2}
    assert CRFStage(FakeCRF()).estimate(ctx, []) == pytest.approx(0.05 * 0.2)
