"""What the planner runs: deadlines over randomised budgets and costs on a fake clock, the
order in which stages are dropped, re-planning, timing stages without an estimate."""
import numpy as np
import pytest

from fwi_core.data import validate_submission
from fwi_core.inference_plan import InsufficientBudgetError, StageError, StageGains
from tests.inference_plan.helpers import FakeClock, FakeCRF, SleepStage, fake_ensemble, small_source, patch_csv_cost, planner


def _one_case(seed, tmp_path, monkeypatch):
    rng = np.random.default_rng(seed)
    clock = FakeClock(100.0)
    n = int(rng.integers(3, 26))
    costs = [float(rng.uniform(0.01, 0.3)) for _ in range(int(rng.integers(1, 4)))]
    full = n * (sum(costs) * (1 + 2 + 2 * 4) + 1.0)
    budget = float(np.exp(rng.uniform(np.log(0.003), np.log(1.2)))) * full

    def jit():
        # every cost varies by 15% from batch to batch, and the machine slows down steadily,
        # by up to 30% over the budget: later batches cost more than the plan measured
        return float(rng.uniform(0.85, 1.15)) * (1.0 + 0.3 * min(1.0, (clock() - 100.0) / budget))
    ens = fake_ensemble(len(costs), clock, costs, jitter=jit)
    src, _ = small_source(n, seed)
    patch_csv_cost(monkeypatch, clock, float(rng.uniform(0.0, 0.02)), jit)
    # slower than its own estimate by up to 30% (times the jitter: within the 1.5 margin)
    refine = SleepStage("refine", clock, float(rng.uniform(0.05, 1.0)), float(rng.uniform(-1, 6)), jitter=jit,
                        surprise=float(rng.uniform(1.0, 1.3)))
    crf = FakeCRF(clock, float(rng.uniform(0.0, 0.05)) * min(costs), jit)   # a CRF pass is cheap
    gains = StageGains(gains={k: float(rng.uniform(-0.5, 3)) for k in ("member", "flip", "crf", "mc_dropout")})
    p = planner(ens, src, tmp_path / str(seed), clock, budget, gains=gains, crf=crf, mc_passes=4,
                batch_size=int(rng.integers(1, 7)), stages=["members", "flip", "crf", "mc_dropout", refine])
    deadline = p.deadline.at
    try:
        summary = p.run()
    except InsufficientBudgetError as e:
        assert e.needed > e.available
        assert not (tmp_path / str(seed) / "sub.csv").exists()
        return "refused"
    assert clock() <= deadline + 1e-9, (seed, clock() - deadline)
    assert summary.met_deadline
    assert validate_submission(tmp_path / str(seed) / "sub.csv", src.ids)["oids"] == n
    return summary


def test_planner_never_passes_the_deadline_over_random_budgets_and_costs(tmp_path, monkeypatch):
    outcomes = [_one_case(seed, tmp_path, monkeypatch) for seed in range(40)]
    refused = sum(o == "refused" for o in outcomes)
    ran = [o for o in outcomes if o != "refused"]
    # the sweep covers refusals, runs that stop stages early, and runs with time to spare
    assert 0 < refused < len(outcomes)
    assert any(any(s["status"] == "partial" for s in o.stages) for o in ran)
    assert any(any(s["status"] == "skipped" for s in o.stages) for o in ran)
    assert any(len(o.ran) >= 4 for o in ran)


def test_first_pass_too_slow_is_refused_with_the_time_it_needs(tmp_path, monkeypatch):
    clock = FakeClock()
    ens = fake_ensemble(1, clock, [1.0])
    src, _ = small_source(20)
    p = planner(ens, src, tmp_path, clock, budget=10.0)
    with pytest.raises(InsufficientBudgetError, match=r"needs about 20\.\d s .*1\.0000 s per file") as e:
        p.run()
    assert 20.0 <= e.value.needed < 21 and e.value.suggested_budget >= 21


def _ran(tmp_path, budget, stages, tag):
    clock = FakeClock()
    ens = fake_ensemble(1, clock, [0.1])
    src, _ = small_source(10)
    p = planner(ens, src, tmp_path / tag, clock, budget, stages=["members"] + stages(clock))
    s = p.run()
    assert clock() <= budget
    return [n for n in s.ran if n != "member:m0"]


def test_drops_the_lowest_gain_per_second_first(tmp_path):
    # gain/s over 10 files: a 0.5, b 1.0, c 0.25, d 2.0 -> dropped in the order c, a, b, d
    def stages(clock):
        return [SleepStage("a", clock, 0.2, 1.0), SleepStage("b", clock, 0.1, 1.0),
                SleepStage("c", clock, 0.4, 1.0), SleepStage("d", clock, 0.05, 1.0)]
    base = 10 * 0.1 * 1.0  # the first pass (no CSV cost on the fake clock)
    seen = []
    for i, extra in enumerate([9.0, 6.5, 2.8, 1.2, 0.1]):
        seen.append(_ran(tmp_path, base + extra + 0.2, stages, f"b{i}"))
    assert seen == [["a", "b", "c", "d"], ["a", "b", "d"], ["b", "d"], ["d"], []]


def test_equal_gain_per_second_drops_the_later_stage_first(tmp_path):
    def stages(clock):
        return [SleepStage("early", clock, 0.1, 1.0), SleepStage("late", clock, 0.1, 1.0)]
    assert _ran(tmp_path, 1.0 + 2.3, stages, "x") == ["early", "late"]
    assert _ran(tmp_path, 1.0 + 1.3, stages, "y") == ["early"]


def test_builtin_stages_degrade_in_the_stated_order(tmp_path, monkeypatch):
    """Default gains: a further member (1.0 m/s), flip (0.6), CRF (0.2), MC dropout (0.05).
    Two members of 0.5 s per file, 8 files: timing both members on the first batch and
    the first pass take 8 s; then the second member 4 s, flip 8 s, CRF 0.2 s and MC
    dropout (4 passes, flipped) 64 s. Shrinking budgets drop MC dropout, then the flip,
    then the second member; the cheap CRF stays longest."""
    results = []
    for budget in (100.0, 40.0, 16.0, 10.0):
        clock = FakeClock()
        ens = fake_ensemble(2, clock, [0.5, 0.5])
        src, _ = small_source(8)
        p = planner(ens, src, tmp_path / str(budget), clock, budget, crf=FakeCRF(clock, 0.01), mc_passes=4)
        s = p.run()
        assert clock() <= budget and validate_submission(tmp_path / str(budget) / "sub.csv", src.ids)
        results.append(s.ran[1:])
    assert results == [["member:m1", "flip", "crf", "mc_dropout"], ["member:m1", "flip", "crf"],
                       ["member:m1", "crf"], ["crf"]]


#: a positive gain for the stages named "refine" here (the built-in default is 0: unmeasured
#: 2-D refinement is not run)
REFINE_GAINS = StageGains(gains={"refine": 1.0})


def test_a_stage_stopped_by_the_deadline_improves_only_the_files_it_reached(tmp_path):
    clock = FakeClock()
    ens = fake_ensemble(1, clock, [0.1])
    src, _ = small_source(12)
    # estimated 0.3 s per file (3.6 s: fits the 4 s left), really 1.4 times slower
    slow = SleepStage("refine", clock, 0.3, 5.0, delta=100.0, surprise=1.4)
    p = planner(ens, src, tmp_path, clock, budget=1.2 + 4.0, stages=["members", slow], keep_state=True,
                gains=REFINE_GAINS)
    s = p.run()
    rec = s.stages[-1]
    assert rec["status"] == "partial" and rec["files"] == 4 and clock() <= 5.2
    before = p.read_prediction(0, 12, previous=True)
    after = p.read_prediction(0, 12)
    moved = np.abs(after - before).max(axis=(1, 2))
    assert (moved[:rec["files"]] > 50).all() and (moved[rec["files"]:] == 0).all()
    assert validate_submission(tmp_path / "sub.csv", src.ids)["oids"] == 12


def test_a_stage_slower_than_planned_gives_way_to_stages_worth_more(tmp_path):
    # planned: a (0.2 s/file, gain 1) then b (0.1 s/file, gain 3) in the 3.1 s left; a really
    # costs 0.29 s/file, so finishing it would leave no time for b: it stops, b runs
    clock = FakeClock()
    src, _ = small_source(10)
    a = SleepStage("a", clock, 0.2, 1.0, surprise=1.45)
    b = SleepStage("b", clock, 0.1, 3.0)
    p = planner(fake_ensemble(1, clock, [0.1]), src, tmp_path, clock, budget=1.0 + 3.1, batch_size=2,
                stages=["members", a, b])
    s = p.run()
    rec = {r["name"]: r for r in s.stages}
    assert s.plan == ["a", "b"] and rec["b"]["status"] == "complete"
    assert rec["a"]["status"] == "partial" and rec["a"]["files"] == 4 and "abandoned" in rec["a"]["note"]
    assert clock() <= 4.1


def test_a_stage_without_estimate_is_timed_on_one_file_only_with_time_to_spare(tmp_path):
    clock = FakeClock()
    src, _ = small_source(10)
    unknown = SleepStage("refine", clock, 0.2, 3.0, knows_cost=False)
    p = planner(fake_ensemble(1, clock, [0.1]), src, tmp_path, clock, budget=20.0, stages=["members", unknown],
                gains=REFINE_GAINS)
    s = p.run()
    assert s.ran == ["member:m0", "refine"] and p.probe_cost["refine"] == pytest.approx(0.2)
    assert clock() == pytest.approx(1.0 + 0.2 + 2.0)          # first pass, timing one file, the stage
    clock2 = FakeClock()
    late = SleepStage("refine", clock2, 0.2, 3.0, knows_cost=False)
    # the first pass leaves less than 10% of the budget: the stage is not timed, not run
    p2 = planner(fake_ensemble(1, clock2, [0.1]), src, tmp_path / "b", clock2, budget=1.05,
                 stages=["members", late], batch_size=10, gains=REFINE_GAINS)
    s2 = p2.run()
    assert s2.ran == ["member:m0"] and "too little time" in s2.stages[-1]["note"] and clock2() == 1.0


def test_negative_gain_skips_a_stage_and_a_registered_stage_runs_by_name(tmp_path):
    from fwi_core.inference_plan import register_stage, registered_stages

    clock = FakeClock()
    register_stage("test_shift", lambda r: SleepStage("test_shift", clock, 0.0, 2.0, delta=7.0))
    assert "test_shift" in registered_stages()
    src, _ = small_source(4)
    s = planner(fake_ensemble(1), src, tmp_path, stages=["members", "flip", "test_shift"],
                gains=StageGains(gains={"flip": -0.1})).run()
    assert s.ran == ["member:m0", "test_shift"]
    flip = [r for r in s.stages if r["name"] == "flip"][0]
    assert flip["status"] == "skipped" and "expected gain -0.1 <= 0" in flip["note"]
    with pytest.raises(StageError, match="reserved"):
        register_stage("members", lambda r: None)


def test_the_cheapest_member_runs_first(tmp_path):
    clock = FakeClock()
    src, _ = small_source(4)
    s = planner(fake_ensemble(2, clock, [0.5, 0.1]), src, tmp_path, clock, stages=["members"]).run()
    assert s.ran == ["member:m1", "member:m0"]
