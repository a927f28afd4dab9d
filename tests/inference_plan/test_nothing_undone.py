"""Nothing undone: a sample a settling stage (physics refinement) made final keeps its map
whatever the planner runs after it, in whatever order it re-plans; what an observing stage
(the consistency flags) found is discarded when a later stage changes the maps, and it may
run again. The orders are forced on a fake clock (the planner re-plans after every stage)."""
import itertools

import numpy as np
import pytest

from fwi_core.inference_plan import Stage
from fwi_core.inference_plan.policy import Policy
from fwi_core.inference_plan.submission_csv import format_submission_rows
from tests.inference_plan.helpers import FakeClock, FakeCRF, SleepStage, fake_ensemble, planner, small_source


class RefineLike(SleepStage):
    """A settling transform like physics refinement: moves the even rows by ``delta`` and
    makes them final."""

    settles = True

    def run(self, batch):
        self.clock.sleep(self.cost * len(batch))
        pick = (batch.rows % 2 == 0) & ~batch.settled_by_others()
        out = batch.pred.clone()
        out[pick] += self.delta
        batch.settle(pick)
        return out


class Observer(Stage):
    """Describes the maps without changing them (like the consistency flags)."""

    name = kind = "observer"
    default_gain = 0.01
    needs_seismic = False
    observes = True

    def __init__(self):
        self.seen = {}

    def run(self, batch):
        for oid, p in zip(batch.ids, batch.pred):
            self.seen[oid] = float(p.mean())
        return batch.pred

    def reset(self, ctx):
        self.seen.clear()


def forced(order):
    """A ``Policy.choose`` that runs the stages in ``order`` (one at a time, re-planned)."""
    todo = list(order)

    def choose(self, pool, seconds):
        names = {s.name: s for s in pool}
        while todo:
            name = todo.pop(0)
            if name in names:
                return [names[name]]
        return []
    return choose


LATER = ["refine_like", "member:m1", "flip", "crf"]


@pytest.mark.parametrize("order", list(itertools.permutations(LATER)), ids="-".join)
def test_refined_rows_keep_their_values_whatever_order_the_replan_chooses(tmp_path, monkeypatch, order):
    n = 7
    src, _ = small_source(n, seed=5)
    clock = FakeClock()
    refine = RefineLike("refine_like", clock, cost=0.5, gain=3.0, delta=250.0)
    after = {}
    monkeypatch.setattr(Policy, "choose", forced(order))
    p = planner(fake_ensemble(2, clock, [0.01, 0.01]), src, tmp_path, clock, budget=1e6, keep_state=True,
                crf=FakeCRF(), stages=["members", "flip", "crf", "mc_dropout", refine],
                on_stage_end=lambda name, read: after.setdefault(name, read(0, n).copy()))
    s = p.run()
    assert [x for x in p.ctx.executed if x not in ("member:m0", "mc_dropout")] == list(order)
    final = p.read_prediction(0, n)
    even = np.arange(n) % 2 == 0
    # the refined rows: exactly the values right after refinement, in the CSV too
    np.testing.assert_array_equal(final[even], after["refine_like"][even])
    csv = (tmp_path / "sub.csv").read_text().splitlines()
    refined_lines = format_submission_rows([src.ids[i] for i in np.flatnonzero(even)], after["refine_like"][even])
    for line in refined_lines.decode().splitlines():
        assert line in csv
    # the others kept improving: every stage after refinement changed them
    later = order[order.index("refine_like") + 1:]
    if later:
        assert not np.allclose(final[~even], after["refine_like"][~even])
    s_rec = {r["name"]: r for r in s.stages}
    assert s_rec["refine_like"]["status"] == "complete"


def test_without_the_settled_rows_a_later_member_undoes_refinement(tmp_path, monkeypatch):
    """The failure the rule prevents: the same order with a transform that does not settle
    ends equal to the plain member average."""
    n = 5
    src, _ = small_source(n, seed=5)
    clock = FakeClock()
    plain = SleepStage("refine_like", clock, cost=0.5, gain=3.0, delta=250.0)
    monkeypatch.setattr(Policy, "choose", forced(["refine_like", "member:m1"]))
    p = planner(fake_ensemble(2), src, tmp_path / "a", clock, budget=1e6, keep_state=True,
                stages=["members", plain])
    p.run()
    monkeypatch.setattr(Policy, "choose", forced(["member:m1"]))
    q = planner(fake_ensemble(2), src, tmp_path / "b", clock, budget=1e6, keep_state=True, stages=["members"])
    q.run()
    np.testing.assert_array_equal(p.read_prediction(0, n), q.read_prediction(0, n))


def test_an_observers_findings_are_discarded_when_the_maps_change_and_it_runs_again(tmp_path, monkeypatch):
    n = 6
    src, _ = small_source(n, seed=2)
    obs = Observer()
    logs = []
    monkeypatch.setattr(Policy, "choose", forced(["observer", "member:m1", "observer"]))
    p = planner(fake_ensemble(2), src, tmp_path, budget=1e6, keep_state=True, stages=["members", obs],
                log=logs.append)
    s = p.run()
    final = p.read_prediction(0, n)
    assert obs.seen == {oid: pytest.approx(float(m.mean()), rel=1e-6) for oid, m in zip(src.ids, final)}
    assert any("observer] discarded: member:m1 changed the maps" in line for line in logs)
    assert {r["name"]: r["status"] for r in s.stages}["observer"] == "complete"
