"""A refinement-only pass over an existing submission (stage ``prior``,
``python -m fwi_core.predict --prior-submission``): maps change only where refinement ran,
no checkpoints needed, the same bytes under torchrun, clear errors for a bad CSV."""
from pathlib import Path

import numpy as np
import pytest

from fwi_core.data import list_test, validate_submission, write_submission
from fwi_core.data.submission import expand_odd_columns, read_submission_maps
from fwi_core.errors import StageError, SubmissionError
from fwi_core.inference_plan import InferenceOptions, PredictionStore, build_stages, prepare_inference
from fwi_core.inference_plan.stages import NoMembers
from fwi_core.predict import main
from tests.inference_plan.helpers import tiny_checkpoint
from tests.test_sharded_predict import one_and_two_ranks

FLAT = (0, 2, 3)          # files whose gathers are mirror-symmetric: routed to flat layers


def _root(tmp: Path, n: int = 6) -> Path:
    """``tmp/data/test/*.npy``: random gathers; those of FLAT have shot 4 = shot 0 mirrored
    (a laterally flat medium's signature, so refinement routes them to ``flat``)."""
    rng = np.random.default_rng(3)
    (tmp / "data" / "test").mkdir(parents=True)
    for i in range(n):
        g = rng.standard_normal((5, 1000, 70)).astype(np.float32)
        if i in FLAT:
            g[4] = g[0][:, ::-1]
        np.save(tmp / "data" / "test" / f"t{i:03d}abc.npy", g)
    return tmp / "data"


def _prior(root: Path, path: Path) -> Path:
    """A prior submission: layered maps with some lateral noise, 3-decimal values."""
    rng = np.random.default_rng(5)
    oids = [o for o, _ in list_test(root)]
    depth = np.linspace(1800.0, 4000.0, 70)[None, :, None]
    maps = depth + rng.uniform(-30.0, 30.0, (len(oids), 70, 70))
    return write_submission(path, oids, maps.astype(np.float32))


def _lines(path: Path) -> dict:
    """oid -> its 70 CSV lines (bytes)."""
    out = {}
    for line in path.read_bytes().splitlines()[1:]:
        out.setdefault(line.split(b"_y_")[0].decode(), []).append(line)
    return out


@pytest.fixture
def job(tmp_path):
    root = _root(tmp_path)
    return root, _prior(root, tmp_path / "prior.csv")


def test_reading_back_keeps_the_odd_columns_and_interpolates_the_even(tmp_path):
    oids = ["a1", "b2"]
    maps = np.random.default_rng(0).uniform(1500, 4500, (2, 70, 70)).astype(np.float32)
    write_submission(tmp_path / "s.csv", oids, maps)
    odd = read_submission_maps(tmp_path / "s.csv", ["b2", "a1"])           # in the order asked
    assert odd.shape == (2, 70, 35)
    np.testing.assert_allclose(odd[0], maps[1][:, 1::2], atol=5e-4)
    full = expand_odd_columns(odd)
    assert np.array_equal(full[..., 1::2], odd)
    np.testing.assert_allclose(full[..., 4], 0.5 * (odd[..., 1] + odd[..., 2]))
    assert np.array_equal(full[..., 0], full[..., 1])


def test_refinement_only_pass_changes_only_the_refined_maps(job, tmp_path):
    root, prior = job
    opts = InferenceOptions(stages=("prior", "refine_layered"), refine_iters=(2, 2), batch_size=2)
    setup = prepare_inference(root, options=opts, prior_submission=prior)
    assert isinstance(setup.ensemble, NoMembers) and "prior submission" in setup.describe()
    out, state = tmp_path / "refined.csv", tmp_path / "state"
    summary = setup.run(out, state_dir=state, keep_state=True, progress=False, log=None)
    oids = [o for o, _ in list_test(root)]
    assert validate_submission(out, oids)["oids"] == len(oids)
    assert [s["status"] for s in summary.stages] == ["complete", "complete"]
    settled = PredictionStore(state, len(oids), "float32").array("settled", (), "int16").read(0, len(oids))
    assert sorted(np.flatnonzero(settled).tolist()) == list(FLAT)          # refined: the flat-routed files
    before, after = _lines(prior), _lines(out)
    for i, oid in enumerate(oids):
        if i in FLAT:
            assert after[oid] != before[oid], f"{oid} was refined but kept its prior map"
        else:
            assert after[oid] == before[oid], f"{oid} was not refined but its map changed"


def test_prior_alone_writes_the_prior_back_byte_for_byte(job, tmp_path, capsys):
    root, prior = job
    (root / "test" / "t001abc.npy").write_bytes(b"not a npy file")    # unreadable: keeps its prior map
    out = tmp_path / "same.csv"
    assert main(["--data", str(root), "--prior-submission", str(prior), "--stages", "prior",
                 "--out", str(out), "--batch-size", "4"]) == 0
    assert out.read_bytes() == prior.read_bytes()


def _fails(capsys, *argv) -> str:
    assert main(list(argv)) == 2
    return capsys.readouterr().err


def test_bad_prior_submissions_are_clear_errors(job, tmp_path, capsys):
    root, prior = job
    out = str(tmp_path / "x.csv")
    base = ["--data", str(root), "--out", out, "--stages", "prior"]
    assert "no such file" in _fails(capsys, *base, "--prior-submission", str(tmp_path / "nope.csv"))
    lines = prior.read_text().splitlines(keepends=True)
    oids = [o for o, _ in list_test(root)]
    short = tmp_path / "short.csv"
    short.write_text("".join(lines[:1 + 70 * 3]))                         # the first three oids only
    err = _fails(capsys, *base, "--prior-submission", str(short))
    assert "3 of the 6 oids wanted are missing" in err and oids[3] in err and str(short) in err
    bad = tmp_path / "bad.csv"
    bad.write_text("".join(lines[:5]) + lines[5].replace(lines[5].split(",")[3], "abc", 1) + "".join(lines[6:]))
    err = _fails(capsys, *base, "--prior-submission", str(bad))
    assert f"{bad}:6: x_5='abc' is not a number" in err
    assert sorted(p.name for p in tmp_path.iterdir() if "x.csv" in p.name) == []  # refused before any work
    nan = tmp_path / "nan.csv"
    nan.write_text("".join(lines[:2]) + lines[2].replace(lines[2].split(",")[1], "nan", 1) + "".join(lines[3:]))
    assert "x_1 is 'nan', expected a finite number" in _fails(capsys, *base, "--prior-submission", str(nan))
    header = tmp_path / "header.csv"
    header.write_text("id,a\n" + "".join(lines[1:]))
    assert "header must be" in _fails(capsys, *base, "--prior-submission", str(header))
    # a stage list without prior, prior without a CSV, prior beside members, no checkpoints at all
    assert "has no 'prior'" in _fails(capsys, "--data", str(root), "--out", out, "--prior-submission", str(prior),
                                      "--stages", "refine")
    ck = tiny_checkpoint(tmp_path / "runs" / "best.pt")
    assert "needs a prior submission" in _fails(capsys, "--data", str(root), "--out", out, "--checkpoints",
                                                str(ck), "--stages", "prior", "refine")
    assert "--prior-submission" in _fails(capsys, "--data", str(root), "--out", out)
    with pytest.raises(StageError, match="replaces the members"):
        setup = prepare_inference(root, options=InferenceOptions(stages=("prior",)), prior_submission=prior)
        build_stages(["prior", "flip"], [], {"ensemble": NoMembers(), "prior_submission": setup.prior})
    with pytest.raises(SubmissionError, match="missing"):
        read_submission_maps(prior, ["nobody"])


@pytest.mark.slow
def test_two_ranks_refine_to_the_bytes_of_one_process(job, tmp_path):
    root, prior = job
    one, two, _ = one_and_two_ranks(tmp_path, "--data", str(root), "--prior-submission", str(prior), "--stages",
                                    "prior", "refine_layered", "--refine-iters", "2", "2", "--batch-size", "2")
    assert two.read_bytes() == one.read_bytes()
    assert one.read_bytes() != prior.read_bytes()      # refinement did run
    assert not (tmp_path / ".two.csv.shards").exists()


def test_infer_kernel_refines_a_prior_submission_without_checkpoints(job, tmp_path, monkeypatch):
    """The infer kernel's ``prior_submission``: no checkpoints listed, so no networks; the
    plan starts from the CSV and the flat-routed maps are refined, the others kept."""
    from tests.reliability.cases import run_kernel

    root, prior = job
    monkeypatch.setenv("MPLBACKEND", "Agg")
    out = tmp_path / "kout"
    run_kernel("infer", {"data_root": str(root), "output_dir": str(out), "prior_submission": str(prior),
                         "stages": ["prior", "refine_layered"], "refine_iters": [2, 2], "batch_size": 2,
                         "num_workers": 0, "time_budget": 600}, stop="a marker no cell holds")
    before, after = _lines(prior), _lines(out / "submission.csv")
    oids = [o for o, _ in list_test(root)]
    assert [oid for i, oid in enumerate(oids) if after[oid] != before[oid]] == [oids[i] for i in FLAT]
