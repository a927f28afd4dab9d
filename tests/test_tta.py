"""The time-budgeted inference planner (fwi_core.tta): deadlines over randomised budgets
and costs on a fake clock, degradation order, resume after an interruption, corrupted
files, the gains table, the stage list, the fast CSV writer."""
import json
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import fwi_core.tta.planner as planner_mod
import fwi_core.tta.store as store_mod
from fwi_core.data import DataFormatError, SubmissionError, SubmissionWriter, validate_submission
from fwi_core.data.normalize import normalize_seismic
from fwi_core.tta import (ArraySource, BudgetedInference, CorruptedFileWarning, Deadline, InsufficientBudgetError,
                          StageError, StageGains, TestFileSource, build_stages, compute_stage_gains,
                          find_stage_gains, format_submission_rows, measure_stage_gains)
from fwi_core.tta.store import PredictionStore, StoredArray
from tests.tta_helpers import FakeClock, FakeCRF, SleepStage, fake_ensemble, write_test_root

SMALL = (5, 10, 7)   # tiny "gathers": the fake models take any size


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def small_source(n, seed=0, bad=()):
    rng = np.random.default_rng(seed)
    data = rng.standard_normal((n,) + SMALL).astype(np.float32)
    ids = [f"{i:03d}{seed:03d}ab" for i in range(n)]

    def read(i):
        if i in bad:
            raise DataFormatError(f"file {ids[i]}: truncated")
        return data[i]
    src = ArraySource(read, ids=ids, n=n)
    src.item_shape = SMALL
    return src, data


def patch_csv_cost(monkeypatch, clock, per_oid, jitter=lambda: 1.0):
    """Make formatting the CSV cost fake time (as it costs real time on 65,818 files)."""
    real = store_mod.format_submission_rows

    def slow(oids, maps):
        clock.sleep(per_oid * len(oids) * jitter())
        return real(oids, maps)
    monkeypatch.setattr(store_mod, "format_submission_rows", slow)
    monkeypatch.setattr(planner_mod, "format_submission_rows", slow)


def planner(ens, src, tmp_path, clock=None, budget=None, **kw):
    clock = clock or FakeClock()
    deadline = Deadline(None if budget is None else clock() + budget, clock, clock())
    kw.setdefault("batch_size", 4)
    kw.setdefault("progress", False)
    kw.setdefault("log", None)
    kw.setdefault("device", "cpu")
    return BudgetedInference(ens, src, tmp_path / "sub.csv", deadline=deadline, state_dir=tmp_path / "state", **kw)


# ----------------------------------------------------------------------------- CSV writer
def test_fast_csv_rows_equal_the_submission_writer_byte_for_byte(tmp_path):
    rng = np.random.default_rng(1)
    v = rng.uniform(1500, 4500, (6, 70, 70)).astype(np.float32)
    v[0, 0], v[0, 1] = 1500.0, 4500.0
    v[0, 2] = np.float32(2000.0625)           # exact ties at the 4th decimal: round half to even
    v[0, 3] = np.float32(2999.9995)
    v[1] = np.round(v[1] * 16) / 16
    for oids in (["a1b2c3d4e5", "0000000000", "ffffffffff", "0a0a0a0a0a", "1111111111", "2222222222"],
                 ["a", "bb", "ccc", "dddd", "e", "ffffffffffff"]):
        with SubmissionWriter(tmp_path / "ref.csv") as w:
            w.write_batch(oids, v)
        ref = (tmp_path / "ref.csv").read_bytes().split(b"\n", 1)[1]
        assert format_submission_rows(oids, v) == ref
    with pytest.raises(ValueError, match="within"):
        format_submission_rows(["x"], np.full((1, 70, 70), 4500.5, np.float32))
    with pytest.raises(ValueError, match="finite"):
        format_submission_rows(["x"], np.full((1, 70, 70), np.nan, np.float32))


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


# ----------------------------------------------------------------------------- deadlines
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


def test_a_first_pass_that_runs_late_fills_the_rest_with_the_fallback(tmp_path):
    clock = FakeClock()
    costs = iter(1.4 ** np.arange(100))    # each batch 1.4 times slower than the one before
    ens = fake_ensemble(1, clock, [1.0], jitter=lambda: float(next(costs)))
    src, _ = small_source(20)
    p = planner(ens, src, tmp_path, clock, budget=30.0, stages=["members"])
    s = p.run()
    assert clock() <= 30.0 and s.met_deadline
    first = s.stages[0]
    assert first["status"] == "partial" and first["files"] == 16 and s.fallback_files == 4
    assert validate_submission(tmp_path / "sub.csv", src.ids)["oids"] == 20


# ----------------------------------------------------------------------------- degradation
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


# ----------------------------------------------------------------------------- what it computes
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


def test_a_stage_stopped_by_the_deadline_improves_only_the_files_it_reached(tmp_path):
    clock = FakeClock()
    ens = fake_ensemble(1, clock, [0.1])
    src, _ = small_source(12)
    # estimated 0.3 s per file (3.6 s: fits the 4 s left), really 1.4 times slower
    slow = SleepStage("refine", clock, 0.3, 5.0, delta=100.0, surprise=1.4)
    p = planner(ens, src, tmp_path, clock, budget=1.2 + 4.0, stages=["members", slow], keep_state=True)
    s = p.run()
    rec = s.stages[-1]
    assert rec["status"] == "partial" and rec["files"] == 4 and clock() <= 5.2
    before = p._buf(1 - p.buffer).read(0, 12)
    after = p._buf(p.buffer).read(0, 12)
    moved = np.abs(after - before).max(axis=(1, 2))
    assert (moved[:rec["files"]] > 50).all() and (moved[rec["files"]:] == 0).all()
    assert validate_submission(tmp_path / "sub.csv", src.ids)["oids"] == 12


# ----------------------------------------------------------------------------- resume
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

    from fwi_core.tta import stages as stages_mod
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
              "write": (StoredArray, "write"), "csv": (planner_mod, "write_submission_csv")}[where]
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


# ----------------------------------------------------------------------------- corrupted files
def test_corrupted_test_file_gets_the_mean_map_a_warning_and_a_summary_line(tmp_path):
    root = write_test_root(tmp_path / "data", 5)
    bad = sorted((root / "test").glob("*.npy"))[2]
    bad.write_bytes(b"\x93NUMPY garbage")
    src = TestFileSource(root)
    p = planner(fake_ensemble(1), src, tmp_path, stages=["members"], keep_state=True)
    with pytest.warns(CorruptedFileWarning, match=bad.stem):
        s = p.run()
    assert list(s.bad_files) == [bad.stem] and "not a readable .npy" in s.bad_files[bad.stem]
    assert bad.stem in s.format() and s.fallback_files == 1
    rows = p._buf(p.buffer).read(0, 5)
    good = [i for i in range(5) if i != 2]
    np.testing.assert_allclose(rows[2], rows[good].mean(0), rtol=1e-6)
    assert validate_submission(tmp_path / "sub.csv", src.ids)["oids"] == 5
    with pytest.raises(DataFormatError, match=f"{bad.stem}.*strict"):
        planner(fake_ensemble(1), src, tmp_path / "strict", stages=["members"], strict=True).run()


def test_when_no_file_is_readable_the_fallback_is_constant(tmp_path):
    src, _ = small_source(3, bad={0, 1, 2})
    with pytest.warns(CorruptedFileWarning):
        p = planner(fake_ensemble(1), src, tmp_path, stages=["members"], keep_state=True)
        s = p.run()
    assert s.fallback_files == 3 and (p._buf(p.buffer).read(0, 3) == 3000.0).all()


# ----------------------------------------------------------------------------- stage list, gains
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
    from fwi_core.tta.stages import Stage

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


def test_first_member_is_the_cheapest_good_one():
    g = StageGains(member_mae={"a": 30.0, "b": 31.0, "c": 60.0})
    assert g.member_order(["a", "b", "c"], {"a": 2.0, "b": 1.0, "c": 0.1}) == ["b", "a", "c"]
    assert StageGains().member_order(["a", "b"], {"a": 2.0, "b": 1.0}) == ["b", "a"]


def test_compute_stage_gains_by_hand_and_round_trip(tmp_path):
    true = np.full((4, 1, 70, 70), 2000.0, np.float32)
    first = true + 100.0
    second = true + np.array([50.0, 50.0, 10.0, 10.0], np.float32)[:, None, None, None]
    g = compute_stage_gains(true, {"member:a": first, "flip": second}, families=["A", "A", "B", "B"],
                            members={"a": first})
    assert g.gains == {"member:a": pytest.approx(900.0), "flip": pytest.approx(70.0)}
    assert g.per_family["flip"] == {"A": pytest.approx(50.0), "B": pytest.approx(90.0)}
    assert g.member_mae == {"a": pytest.approx(100.0)} and g.samples == 4 and g.order == ["member:a", "flip"]
    path = g.save(tmp_path)
    (tmp_path / "best.pt").write_bytes(b"")
    assert path.name == "stage_gains.json" and find_stage_gains([tmp_path / "best.pt"]) == StageGains.load(path)
    stage = build_stages(["members", "flip", "mc_dropout"], ["a"], {"ensemble": fake_ensemble(1)})
    assert [g.gain(s) for s in stage] == [pytest.approx(900.0), pytest.approx(70.0), 0.05]
    bad = json.loads(path.read_text())
    bad["gains"]["flip"] = "lots"
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="gains.flip must be a finite number"):
        StageGains.load(path)


def test_measure_stage_gains_on_validation_arrays():
    ens = fake_ensemble(2)
    _, data = small_source(6)
    x = normalize_seismic(torch.from_numpy(data))
    true = ens.predict(x, members=["m0"])[0].numpy()        # member m0 is exact here
    g = measure_stage_gains(ens, data, true, stages=["member:m0", "member:m1", "flip"], device="cpu")
    assert list(g.gains) == ["member:m0", "member:m1", "flip"]
    assert g.mae["member:m0"] == pytest.approx(0.0, abs=1e-3) and g.gains["member:m1"] < 0
    assert g.member_mae["m0"] == pytest.approx(0.0, abs=1e-3) and g.member_mae["m1"] > 1


def test_deadline_counts_from_the_process_start(monkeypatch):
    clock = FakeClock(1000.0)
    d = Deadline.from_budget(60.0, clock, age=15.0)
    assert d.at == 1045.0 and d.remaining() == 45.0 and d.spent() == 15.0
    assert math.isinf(Deadline.from_budget(None, clock, age=1.0).remaining())
    with pytest.raises(ValueError, match="positive"):
        Deadline.from_budget(-1, clock, age=0)
    for var in ("KAGGLE_KERNEL_RUN_TYPE", "COLAB_RELEASE_TAG", "SM_MODEL_DIR", "SM_CHANNEL_TRAINING"):
        monkeypatch.delenv(var, raising=False)
    assert Deadline.platform_default(clock=clock, age=0.0).at is None           # locally: no deadline
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    monkeypatch.setenv("FWI_DATA", "/nonexistent")
    k = Deadline.platform_default(clock=clock, age=20.0)
    assert k.at == 1000.0 - 20.0 + 11.5 * 3600 - 300.0


def test_validate_rejects_a_truncated_csv_so_the_atomic_write_matters(tmp_path):
    src, _ = small_source(4)
    planner(fake_ensemble(1), src, tmp_path, stages=["members"]).run()
    text = (tmp_path / "sub.csv").read_text().splitlines()
    (tmp_path / "cut.csv").write_text("\n".join(text[:100]) + "\n")
    with pytest.raises(SubmissionError):
        validate_submission(tmp_path / "cut.csv", src.ids)
    assert not list(tmp_path.glob(".sub.csv.*.tmp"))


def test_evaluate_writes_the_stage_gains_table_beside_the_checkpoint(fake_root, tmp_path, capsys):
    from fwi_core.crf import save_crf_config
    from tests.tta_helpers import tiny_checkpoint
    from tools import evaluate

    ck = [tiny_checkpoint(tmp_path / "run" / "best.pt", 0), tiny_checkpoint(tmp_path / "run" / "snapshot-01.pt", 1)]
    save_crf_config({"window": 3, "iterations": 2}, tmp_path / "run")
    assert evaluate.main(["--data", str(fake_root), "--checkpoint", *map(str, ck), "--batch-size", "6",
                          "--stage-gains"]) == 0
    assert "stage gains" in capsys.readouterr().out
    g = find_stage_gains(ck)
    assert set(g.order[:2]) == {"member:run/best", "member:run/snapshot-01"}
    assert g.order[2:] == ["flip", "crf", "mc_dropout"] and set(g.gains) == set(g.order)
    assert g.samples == 12 and set(g.member_mae) == {"run/best", "run/snapshot-01"}
    assert g.mae[g.order[0]] == pytest.approx(g.member_mae[g.order[0].split(":", 1)[1]], rel=1e-5)
    for before, after in zip(g.order, g.order[1:]):    # each gain is relative to the stage before
        assert g.gains[after] == pytest.approx(g.mae[before] - g.mae[after], abs=1e-6)
    assert set(g.per_family["flip"]) == {"CurveFault_B", "FlatVel_A", "Style_A"}


def test_crf_before_a_producer_is_applied_again(tmp_path):
    ens = fake_ensemble(2)
    src, data = small_source(5)
    crf = FakeCRF()
    p = planner(ens, src, tmp_path, stages=["members", "crf", "flip"], crf=crf, keep_state=True)
    assert p.run().ran == ["member:m0", "member:m1", "crf", "flip"]
    expected = crf(ens.predict(normalize_seismic(torch.from_numpy(data)), flip_tta=True)[0])
    np.testing.assert_allclose(p._buf(p.buffer).read(0, 5), expected[:, 0].numpy(), atol=1e-3)


def test_negative_gain_skips_a_stage_and_a_registered_stage_runs_by_name(tmp_path):
    from fwi_core.tta import register_stage, registered_stages

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


def test_a_stage_without_estimate_is_timed_on_one_file_only_with_time_to_spare(tmp_path):
    clock = FakeClock()
    src, _ = small_source(10)
    unknown = SleepStage("refine", clock, 0.2, 3.0, knows_cost=False)
    p = planner(fake_ensemble(1, clock, [0.1]), src, tmp_path, clock, budget=20.0, stages=["members", unknown])
    s = p.run()
    assert s.ran == ["member:m0", "refine"] and p.probe_cost["refine"] == pytest.approx(0.2)
    assert clock() == pytest.approx(1.0 + 0.2 + 2.0)          # first pass, timing one file, the stage
    clock2 = FakeClock()
    late = SleepStage("refine", clock2, 0.2, 3.0, knows_cost=False)
    # the first pass leaves less than 10% of the budget: the stage is not timed, not run
    p2 = planner(fake_ensemble(1, clock2, [0.1]), src, tmp_path / "b", clock2, budget=1.05,
                 stages=["members", late], batch_size=10)
    s2 = p2.run()
    assert s2.ran == ["member:m0"] and "too little time" in s2.stages[-1]["note"] and clock2() == 1.0


def test_progress_bar_names_the_stage_and_the_deadline(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FWI_PROGRESS", "1")
    clock = FakeClock()
    src, _ = small_source(6)
    planner(fake_ensemble(1, clock, [0.01]), src, tmp_path, clock, budget=7200.0, stages=["members"],
            progress=True).run()
    err = capsys.readouterr().err
    assert "member:m0" in err and "deadline in 1:59:59" in err
    assert re.search(r"6/6 \[\d\d:\d\d<\d\d:\d\d", err)     # elapsed<ETA


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


def test_the_cheapest_member_runs_first(tmp_path):
    clock = FakeClock()
    src, _ = small_source(4)
    s = planner(fake_ensemble(2, clock, [0.5, 0.1]), src, tmp_path, clock, stages=["members"]).run()
    assert s.ran == ["member:m1", "member:m0"]


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
    np.testing.assert_allclose(p._buf(p.buffer).read(0, 8), want.clamp(1500, 4500)[:, 0].numpy(), atol=1e-3)
    np.testing.assert_allclose(p._buf(p.buffer).read(0, 4), (mc["m0"][:4, 0].numpy() + 1) * 1500 + 1500,
                               atol=0.05)    # family A: member m0 only (float16 storage)


def test_stages_see_the_mc_spread_and_arrays_are_read_a_window_at_a_time(tmp_path, monkeypatch):
    from fwi_core.tta.store import StoredArray

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


def test_crf_cost_estimate_is_a_fraction_of_the_cheapest_member():
    from fwi_core.tta import CRFStage, RunContext

    ctx = RunContext(fake_ensemble(2), None, torch.device("cpu"))
    assert CRFStage(FakeCRF()).estimate(ctx, []) is None
    ctx.member_cost = {"m0": 0.4, "m1": 0.2}
    assert CRFStage(FakeCRF()).estimate(ctx, []) == pytest.approx(0.05 * 0.2)


def test_resuming_a_finished_run_only_restores_a_missing_csv(tmp_path):
    src, _ = small_source(5)
    planner(fake_ensemble(2), src, tmp_path, stages=["members", "flip"], keep_state=True).run()
    first = (tmp_path / "sub.csv").read_bytes()
    (tmp_path / "sub.csv").unlink()
    s = planner(fake_ensemble(2), src, tmp_path, stages=["members", "flip"], resume=True, keep_state=True).run()
    assert s.ran == ["member:m0", "member:m1", "flip"] and (tmp_path / "sub.csv").read_bytes() == first


def test_state_folder_is_beside_the_csv_except_on_kaggle(tmp_path, monkeypatch):
    import tempfile

    from fwi_core.tta import default_state_dir

    for var in ("KAGGLE_KERNEL_RUN_TYPE", "COLAB_RELEASE_TAG", "SM_MODEL_DIR", "SM_CHANNEL_TRAINING"):
        monkeypatch.delenv(var, raising=False)
    assert default_state_dir(tmp_path / "submission.csv") == tmp_path / ".submission.csv.state"
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Batch")
    monkeypatch.setenv("FWI_DATA", "/nonexistent")
    assert default_state_dir("/kaggle/working/submission.csv") == \
        Path(tempfile.gettempdir()) / "fwi-tta" / "submission.csv.state"
