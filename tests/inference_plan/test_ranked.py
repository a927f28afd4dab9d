"""Ranked, partial refinement on a fake clock: when the budget refines only part of the
candidates, the refined samples are exactly the highest-ranked ones (expected gain from the
kind's gain, the routing probability, the member disagreement and the misfit); kinds and
stages measured harmful are not run; the summary says how many samples each stage
covered; a resumed ranked stage writes the same bytes."""
import json

import numpy as np
import pytest
import torch

from fwi_core.inference_plan import StageGains
from fwi_core.inference_plan.ranked import GAIN_ARRAY, RANK_ARRAY, disagreement
from fwi_core.inference_plan.ranking import error_weight, expected_gain, rank_rows, screen_count
from fwi_core.inference_plan.stages.refine import KIND_ARRAY, RefineStage
from fwi_core.inference_plan.store import PredictionStore
from tests.inference_plan.helpers import FakeClock, fake_ensemble, planner, small_source

KINDS = ("flat", "tv", "smooth")


class FakeRefine(RefineStage):
    """RefineStage with the physics replaced: fake seconds on the clock (``per_sample`` per
    refined sample, ``per_misfit`` per screened one), a known misfit per file, and kinds
    routed from a table (row -> kind) instead of the detector."""

    def __init__(self, name, kinds, clock, kind_of, misfit, per_sample=10.0, per_misfit=0.5, delta=300.0):
        super().__init__(name, kinds, 4, 2.0)
        self.clock, self.kind_of, self.true_misfit = clock, kind_of, misfit
        self.per_sample, self.per_misfit, self.delta = per_sample, per_misfit, delta
        self.refined = []
        self.sizes = []

    def first_pass(self, batch, pred):
        if batch.ctx.avail.get(KIND_ARRAY, 0) >= batch.stop:
            return
        codes = np.array([KINDS.index(self.kind_of[r]) for r in batch.rows])
        probs = np.full((len(codes), 3), 0.1)
        probs[np.arange(len(codes)), codes] = 0.8
        batch.write(KIND_ARRAY, codes + 1, item_shape=(), dtype="int8")
        batch.write("kind_p", probs, item_shape=(3,), dtype="float16")

    def estimate(self, ctx, before):
        return self.per_sample

    def screen_cost(self, ctx):
        return self.per_misfit

    def misfit(self, batch):
        self.clock.sleep(self.per_misfit * len(batch))
        return self.true_misfit[batch.rows]

    def run(self, batch):
        self.sizes.append((len(batch), batch.time_limit))
        self.clock.sleep(self.per_sample * len(batch))
        pick = np.array([k in self.kinds for k in batch.kinds]) & ~batch.settled_by_others()
        batch.settle(pick)
        self.refined += batch.rows[pick].tolist()
        out = batch.pred.clone()
        out[torch.as_tensor(pick)] += self.delta
        return out


def _setup(n=40, seed=3):
    rng = np.random.default_rng(seed)
    kind_of = {r: KINDS[int(rng.integers(0, 3))] for r in range(n)}
    misfit = rng.uniform(0.01, 1.0, n)
    return kind_of, misfit


def test_a_partial_refinement_covers_exactly_the_highest_ranked_samples(tmp_path):
    n = 80
    kind_of, misfit = _setup(n)
    clock = FakeClock()
    ens = fake_ensemble(2, clock, [0.01, 0.01])
    src, _ = small_source(n, seed=1)
    stage = FakeRefine("refine", ("tv", "smooth"), clock, kind_of, misfit)
    gains = StageGains(gains={"refine": 2.0}, per_kind={"refine": {"tv": 3.0, "smooth": 1.0}})
    # the members pass, then refinement: about 8 samples' worth of time of the ~50 candidates
    p = planner(ens, src, tmp_path, clock, budget=150.0, keep_state=True, gains=gains, stages=["members", stage],
                batch_size=4)
    s = p.run()
    rec = {r["name"]: r for r in s.stages}["refine"]
    cand = np.array([r for r in range(n) if kind_of[r] in ("tv", "smooth")])
    assert rec["status"] == "partial" and 0 < rec["samples"] < len(cand)
    assert rec["candidates"] == len(cand) and f"{rec['samples']} of {len(cand)} candidate samples" in rec["note"]
    order = p.store.array(RANK_ARRAY.format("refine"), (), "int64").read(0, len(cand))
    # exactly the top of the ranking was refined
    assert sorted(stage.refined) == sorted(order[:rec["samples"]].tolist())
    assert len(set(stage.refined)) == rec["samples"]
    # and the ranking is the expected gain, recomputed here from its parts
    spread = disagreement(p.ctx, cand)
    screened = rec["screened"]
    assert rec["samples"] <= screened < len(cand)           # the misfit ranked the top of the cheap ranking
    top_rows = np.sort(order[:screened])
    g_kind = {"flat": 0.0, "tv": 3.0, "smooth": 1.0}
    codes = np.array([KINDS.index(kind_of[r]) for r in cand])
    cheap = expected_gain(codes, np.where(np.eye(3)[codes] > 0, 0.8, 0.1), g_kind, error_weight(spread))
    cheap_order = rank_rows(cand, cheap)
    assert set(cheap_order[:screened]) == set(top_rows)     # the screened rows: the cheap ranking's top
    idx = np.searchsorted(cand, top_rows)
    full = expected_gain(codes[idx], np.where(np.eye(3)[codes[idx]] > 0, 0.8, 0.1), g_kind,
                         error_weight(spread[idx], misfit[top_rows]))
    np.testing.assert_array_equal(order[:screened], rank_rows(top_rows, full))
    stored = p.store.array(GAIN_ARRAY.format("refine"), (), "float32").read_rows(top_rows)
    np.testing.assert_allclose(stored, full, rtol=1e-3)      # kind probabilities are stored as float16
    # the refined rows moved by delta, the others kept the members' prediction
    final = p.read_prediction(0, n)
    before = p.read_prediction(0, n, previous=True)
    moved = np.flatnonzero(np.abs(final - before).max((1, 2)) > 1)
    assert sorted(moved.tolist()) == sorted(stage.refined)
    assert clock() <= p.deadline.at
    # the first batch is one sample (the estimate checked first), then whole batches, the last fitted to the share
    assert stage.sizes[0][0] == 1 and max(n for n, _ in stage.sizes) == 4
    assert all(limit is not None and 0 < limit < 150 for _, limit in stage.sizes)


def test_kinds_and_stages_measured_harmful_are_not_run(tmp_path):
    n = 20
    kind_of, misfit = _setup(n, seed=5)
    clock = FakeClock()
    src, _ = small_source(n, seed=2)
    stage = FakeRefine("refine", ("tv", "smooth"), clock, kind_of, misfit)
    gains = StageGains(gains={"refine": 0.5}, per_kind={"refine": {"tv": 2.0, "smooth": -0.4}})
    p = planner(fake_ensemble(2), src, tmp_path / "a", clock, budget=1e6, gains=gains, stages=["members", stage])
    s = p.run()
    assert stage.refined and all(kind_of[r] == "tv" for r in stage.refined)
    assert sorted(stage.refined) == [r for r in range(n) if kind_of[r] == "tv"]
    assert {r["name"]: r for r in s.stages}["refine"]["status"] == "complete"
    # the stage as a whole measured harmful: not run at all
    stage2 = FakeRefine("refine", ("tv", "smooth"), clock, kind_of, misfit)
    bad = StageGains(gains={"refine": -0.2})
    s2 = planner(fake_ensemble(2), src, tmp_path / "b", clock, budget=1e6, gains=bad,
                 stages=["members", stage2]).run()
    rec = {r["name"]: r for r in s2.stages}["refine"]
    assert rec["status"] == "skipped" and "<= 0" in rec["note"] and not stage2.refined
    # every kind it refines measured harmful: skipped, saying so
    stage3 = FakeRefine("refine", ("tv", "smooth"), clock, kind_of, misfit)
    worse = StageGains(gains={"refine": 0.3}, per_kind={"refine": {"tv": -1.0, "smooth": 0.0}})
    s3 = planner(fake_ensemble(2), src, tmp_path / "c", clock, budget=1e6, gains=worse,
                 stages=["members", stage3]).run()
    rec = {r["name"]: r for r in s3.stages}["refine"]
    assert rec["status"] == "skipped" and "measured harmful: tv, smooth" in rec["note"] and not stage3.refined


@pytest.mark.parametrize("at", ["after a batch", "after the next batch's size"])
def test_a_ranked_stage_interrupted_and_resumed_writes_the_same_bytes(tmp_path, monkeypatch, at):
    n = 24
    kind_of, misfit = _setup(n, seed=8)
    src, _ = small_source(n, seed=4)

    def run(where, resume=False, **kw):
        clock = FakeClock()
        stage = FakeRefine("refine", ("tv", "smooth"), clock, kind_of, misfit)
        layered = FakeRefine("refine_layered", ("flat",), clock, kind_of, misfit, delta=-200.0)
        return planner(fake_ensemble(2), src, tmp_path / where, clock, budget=None, resume=resume,
                       stages=["members", layered, stage], batch_size=3, gains=StageGains(gains={"refine": 1.0}),
                       **kw).run()

    run("full")
    whole = (tmp_path / "full" / "sub.csv").read_bytes()
    real, calls = PredictionStore.commit, []

    class Killed(Exception):
        pass

    def commit(self, progress):
        calls.append(1)
        rec = progress["records"].get("refine", {})
        if progress.get("running") == "refine" and rec.get("done", 0) >= 3 and \
                (at == "after a batch" or rec.get("next")):
            raise Killed()
        return real(self, progress)
    with monkeypatch.context() as m:
        m.setattr(PredictionStore, "commit", commit)
        with pytest.raises(Killed):
            run("cut")
    saved = json.loads((tmp_path / "cut" / "state" / "progress.json").read_text())
    assert saved["running"] == "refine" and saved["records"]["refine"]["ranked"]
    s = run("cut", resume=True)
    assert s.resumed and (tmp_path / "cut" / "sub.csv").read_bytes() == whole


def test_screen_count_spends_at_most_a_quarter_of_the_share_on_misfits():
    assert screen_count(100, share=1000.0, per_sample=5.0, screen_per_sample=0.5, batch=4) == 0   # all fit
    assert screen_count(1000, share=100.0, per_sample=10.0, screen_per_sample=0.1, batch=4) == 30  # 3 x 10
    assert screen_count(1000, share=100.0, per_sample=10.0, screen_per_sample=2.0, batch=4) == 12  # 25 s / 2
    assert screen_count(1000, share=100.0, per_sample=10.0, screen_per_sample=None, batch=4) == 0


def test_the_real_stage_times_one_evaluation_at_the_batch_size_and_its_shots():
    import types

    ctx = types.SimpleNamespace(device=torch.device("cpu"), io_cost=0.0, batch_size=3)
    layered = RefineStage("refine_layered", ("flat",), 60, 1.0)
    rest = RefineStage("refine", ("tv", "smooth"), 30, 1.0)
    a, b = layered.estimate(ctx, []), rest.estimate(ctx, [])
    assert set(layered._timed) == {("cpu", 3, 2)} and set(rest._timed) == {("cpu", 3, 5)}
    ev, fwd = layered._timed[("cpu", 3, 2)]
    assert a == pytest.approx((60 * 1.5 * ev + 2 * fwd) / 3)
    ev5, fwd5 = rest._timed[("cpu", 3, 5)]
    assert b == pytest.approx((30 * 1.5 * ev5 + 2 * fwd5) / 3)
    assert rest.screen_cost(ctx) == pytest.approx(rest._timed[("cpu", 3, 2)][1] / 3)


def test_one_member_without_mc_dropout_ranks_by_kind_and_misfit_alone(tmp_path):
    """No disagreement signal (a single member, no MC dropout): the ranking still works,
    on the kinds' gains and, for the screened top, the misfit."""
    n = 30
    kind_of, misfit = _setup(n, seed=9)
    clock = FakeClock()
    src, _ = small_source(n, seed=3)
    stage = FakeRefine("refine", ("tv", "smooth"), clock, kind_of, misfit)
    gains = StageGains(gains={"refine": 2.0}, per_kind={"refine": {"tv": 3.0, "smooth": 1.0}})
    p = planner(fake_ensemble(1, clock, [0.01]), src, tmp_path, clock, budget=80.0, keep_state=True, gains=gains,
                stages=["members", stage], batch_size=4)
    s = p.run()
    rec = {r["name"]: r for r in s.stages}["refine"]
    assert rec["status"] == "partial" and rec["samples"] > 0
    order = p.store.array(RANK_ARRAY.format("refine"), (), "int64").read(0, rec["candidates"])
    assert sorted(stage.refined) == sorted(order[:rec["samples"]].tolist())
    np.testing.assert_array_equal(error_weight(None, None, n=3), np.ones(3))
