"""``python -m fwi_core.predict``: exit codes, the budget from the process start, strict
mode, ensemble configs, kill -9 and resume; ``find_checkpoints(kind=...)``."""
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import fwi_core.platform as platform_mod
from fwi_core.data import list_test, validate_submission
from fwi_core.models.checkpoint import find_checkpoints
from fwi_core.predict import main
from tests.inference_plan.helpers import tiny_checkpoint, write_test_root

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def setup(tmp_path):
    root = write_test_root(tmp_path / "data", 7)
    ck = [tiny_checkpoint(tmp_path / "runs" / "r" / "best.pt", 0),
          tiny_checkpoint(tmp_path / "runs" / "r" / "snapshot-01.pt", 1)]
    return root, ck


def age(monkeypatch, seconds):
    monkeypatch.setattr(platform_mod, "process_age", lambda: float(seconds))


def test_cli_writes_a_complete_valid_csv_with_two_members(setup, tmp_path, monkeypatch, capsys):
    root, _ = setup
    age(monkeypatch, 0.0)
    out = tmp_path / "sub.csv"
    rc = main(["--data", str(root), "--checkpoints", str(tmp_path / "runs"), "--checkpoint-kind", "all",
               "--time-budget", "600", "--out", str(out), "--batch-size", "4", "--mc-passes", "2",
               "--stages", "members", "flip", "crf", "mc_dropout"])
    assert rc == 0
    oids = [o for o, _ in list_test(root)]
    assert validate_submission(out, oids) == {"oids": 7, "rows": 490}
    summary = json.loads((tmp_path / "sub_summary.json").read_text())
    ran = [s["name"] for s in summary["stages"] if s["status"] == "complete"]
    assert ran == ["member:r/best", "member:r/snapshot-01", "flip", "mc_dropout"] or \
        ran == ["member:r/snapshot-01", "member:r/best", "flip", "mc_dropout"]
    crf = [s for s in summary["stages"] if s["name"] == "crf"][0]
    assert crf["status"] == "skipped" and "crf.json" in crf["note"]
    assert summary["uncertainty"]["all"]["files"] == 7
    assert not (tmp_path / ".sub.csv.state").exists()
    assert "plan:" in capsys.readouterr().out


def test_cli_budget_counts_from_the_process_start(setup, tmp_path, monkeypatch, capsys):
    root, ck = setup
    age(monkeypatch, 100.0)     # the process has already used 100 of the 90 s
    out = tmp_path / "sub.csv"
    rc = main(["--data", str(root), "--checkpoints", str(ck[0]), "--time-budget", "90", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "too small" in err and "needs about" in err and "per file measured on the first batch" in err
    assert "Give a budget of at least" in err
    assert not out.exists()
    age(monkeypatch, 0.0)
    assert main(["--data", str(root), "--checkpoints", str(ck[0]), "--time-budget", "90", "--out", str(out),
                 "--stages", "members"]) == 0
    assert validate_submission(out)["oids"] == 7


def test_cli_corrupted_file_fallback_and_strict(setup, tmp_path, monkeypatch, capsys):
    root, ck = setup
    age(monkeypatch, 0.0)
    bad = sorted((root / "test").glob("*.npy"))[3]
    np.save(bad, np.zeros((5, 1000, 69), np.float32))
    out = tmp_path / "sub.csv"
    with pytest.warns(UserWarning, match=bad.stem):
        rc = main(["--data", str(root), "--checkpoints", str(ck[0]), "--time-budget", "600", "--out", str(out),
                   "--stages", "members"])
    assert rc == 0 and validate_submission(out)["oids"] == 7
    summary = json.loads((tmp_path / "sub_summary.json").read_text())
    assert list(summary["bad_files"]) == [bad.stem] and "(5, 1000, 69)" in summary["bad_files"][bad.stem]
    assert bad.stem in capsys.readouterr().out
    rc = main(["--data", str(root), "--checkpoints", str(ck[0]), "--time-budget", "600",
               "--out", str(tmp_path / "strict.csv"), "--strict"])
    err = capsys.readouterr().err
    assert rc == 1 and bad.stem in err and "strict" in err and not (tmp_path / "strict.csv").exists()


def test_cli_bad_inputs_exit_2(setup, tmp_path, monkeypatch, capsys):
    root, ck = setup
    age(monkeypatch, 0.0)
    base = ["--time-budget", "600", "--out", str(tmp_path / "x.csv")]
    assert main(["--data", str(tmp_path / "nowhere"), "--checkpoints", str(ck[0])] + base) == 2
    assert "not a competition root" in capsys.readouterr().err
    assert main(["--data", str(root), "--checkpoints", str(tmp_path / "empty")] + base) == 2
    assert "no checkpoints" in capsys.readouterr().err
    assert main(["--data", str(root), "--checkpoints", str(ck[0]), "--stages", "members", "rotate"] + base) == 2
    assert "unknown stage 'rotate'" in capsys.readouterr().err
    assert main(["--data", str(root), "--checkpoints", str(ck[0]), "--time-budget", "-5"]) == 2
    bad_cfg = tmp_path / "ens.json"
    bad_cfg.write_text(json.dumps({"format": "fwi_core.ensemble/1",
                                   "members": [{"name": "a", "checkpoint": str(ck[0])}],
                                   "weights": {"default": {"a": -1.0}}}))
    capsys.readouterr()
    assert main(["--data", str(root), "--checkpoints", str(ck[0]), "--ensemble-config", str(bad_cfg)] + base) == 2
    assert "negative weight" in capsys.readouterr().err


def test_cli_ensemble_config_weights(setup, tmp_path, monkeypatch):
    root, ck = setup
    age(monkeypatch, 0.0)
    cfg = tmp_path / "runs" / "ensemble.json"
    cfg.write_text(json.dumps({"format": "fwi_core.ensemble/1",
                               "members": [{"name": "a", "checkpoint": "r/best.pt"},
                                           {"name": "b", "checkpoint": "r/snapshot-01.pt"}],
                               "weights": {"default": {"a": 1.0, "b": 0.0}}}))
    out = tmp_path / "cfg.csv"
    assert main(["--data", str(root), "--checkpoints", str(tmp_path / "runs"), "--ensemble-config", str(cfg),
                 "--time-budget", "600", "--out", str(out), "--stages", "members"]) == 0
    only_a = tmp_path / "a.csv"
    assert main(["--data", str(root), "--checkpoints", str(ck[0]), "--time-budget", "600", "--out", str(only_a),
                 "--stages", "members"]) == 0
    assert out.read_bytes() == only_a.read_bytes()      # b weighs 0: the ensemble is member a


@pytest.mark.parametrize("step", ["summary", "state removal"])
def test_killed_after_the_finished_commit_resumes_to_the_same_files(setup, tmp_path, monkeypatch, step):
    """The last steps of a run are: commit "finished", save the summary, remove the state
    folder. A run killed between them (a kill test at the summary's write found it) must
    still end, when resumed, with the CSV, the summary and no state folder."""
    from fwi_core.inference_plan import PredictionStore, RunSummary

    root, ck = setup
    age(monkeypatch, 0.0)
    args = ["--data", str(root), "--checkpoints", str(ck[0]), "--time-budget", "600", "--stages", "members"]
    ref = tmp_path / "ref"
    assert main(args + ["--out", str(ref / "sub.csv")]) == 0
    out = tmp_path / "work" / "sub.csv"
    target = (RunSummary, "save") if step == "summary" else (PredictionStore, "remove")
    real = getattr(*target)
    calls = []

    def die(self, *a):
        if target[1] == "remove" and not calls:      # the fresh start's cleanup: let it pass
            calls.append("start")
            return real(self, *a)
        raise KeyboardInterrupt(f"killed at the {step}")

    with monkeypatch.context() as m:
        m.setattr(*target, die)
        with pytest.raises(KeyboardInterrupt):
            main(args + ["--out", str(out)])
    assert json.loads((tmp_path / "work" / ".sub.csv.state" / "progress.json").read_text())["finished"]
    assert main(args + ["--out", str(out), "--resume"]) == 0
    assert out.read_bytes() == (ref / "sub.csv").read_bytes()
    assert sorted(p.name for p in out.parent.iterdir()) == ["sub.csv", "sub_summary.json"]
    summary = json.loads((out.parent / "sub_summary.json").read_text())
    assert summary["files"] == 7 and summary["stages"][0]["status"] == "complete"


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {root!r})
    from fwi_core.inference_plan.store import PredictionStore
    orig = PredictionStore.commit
    count = [0]
    def commit(self, progress):
        count[0] += 1
        if count[0] == {nth}:            # rows of this batch are written, progress is not
            os.kill(os.getpid(), signal.SIGKILL)
        return orig(self, progress)
    PredictionStore.commit = commit
    from fwi_core.predict import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.slow
@pytest.mark.parametrize("nth", [4, 11, 17])   # in the first pass, the second member, the flip
def test_kill_9_and_resume_gives_the_same_bytes(setup, tmp_path, nth):
    root, _ = setup
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FWI_PROGRESS": "0"}
    args = ["--data", str(root), "--checkpoints", str(tmp_path / "runs"), "--checkpoint-kind", "all",
            "--time-budget", "3000", "--batch-size", "3", "--mc-passes", "2", "--stages", "members", "flip", "crf",
            "mc_dropout"]
    full = subprocess.run([sys.executable, "-m", "fwi_core.predict", *args, "--out", str(tmp_path / "full.csv")],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    assert full.returncode == 0, full.stderr
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT.format(root=str(ROOT), nth=nth))
    out = tmp_path / "cut.csv"
    killed = subprocess.run([sys.executable, str(script), *args, "--out", str(out)], cwd=tmp_path, env=env,
                            capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL
    state = json.loads((tmp_path / ".cut.csv.state" / "progress.json").read_text())
    assert state["running"] and not state["finished"]
    resumed = subprocess.run([sys.executable, "-m", "fwi_core.predict", *args, "--out", str(out), "--resume"],
                             cwd=ROOT, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed a previous run" in resumed.stdout
    assert json.loads((tmp_path / "cut_summary.json").read_text())["resumed"] is True
    assert out.read_bytes() == (tmp_path / "full.csv").read_bytes()


def test_find_checkpoints_kinds(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("best.pt", "snapshot-01.pt", "snapshot-02.pt", "ckpt-00000010.pt", "ckpt-00000020.pt", "other.pt"):
        (run / name).write_bytes(b"x")
    assert find_checkpoints([tmp_path]) == [run / "best.pt"]
    assert find_checkpoints([tmp_path], kind="snapshot") == [run / "snapshot-01.pt", run / "snapshot-02.pt"]
    assert find_checkpoints([tmp_path], kind="last") == [run / "ckpt-00000020.pt"]
    assert find_checkpoints([tmp_path], kind="all") == [run / "best.pt", run / "ckpt-00000020.pt",
                                                       run / "snapshot-01.pt", run / "snapshot-02.pt"]
    assert find_checkpoints([tmp_path], "other*.pt") == [run / "other.pt"]
    assert find_checkpoints([run / "other.pt"], kind="snapshot") == [run / "other.pt"]
    with pytest.raises(ValueError, match="kind must be one of"):
        find_checkpoints([tmp_path], kind="newest")
    with pytest.raises(FileNotFoundError, match="kind 'snapshot'"):
        find_checkpoints([tmp_path / "nothing"], kind="snapshot")


def test_cli_reads_crf_json_and_stage_gains_beside_the_checkpoints(setup, tmp_path, monkeypatch):
    from fwi_core.crf import save_crf_config
    from fwi_core.inference_plan import StageGains

    root, ck = setup
    age(monkeypatch, 0.0)
    save_crf_config({"window": 3, "iterations": 2}, ck[0].parent)
    StageGains(gains={"flip": -0.5, "mc_dropout": 0.0}).save(ck[0].parent)
    out = tmp_path / "sub.csv"
    assert main(["--data", str(root), "--checkpoints", str(ck[0]), "--time-budget", "600", "--out", str(out),
                 "--stages", "members", "flip", "crf", "mc_dropout"]) == 0
    stages = {s["name"]: s for s in json.loads((tmp_path / "sub_summary.json").read_text())["stages"]}
    assert stages["crf"]["status"] == "complete"
    assert stages["flip"]["status"] == "skipped" and stages["flip"]["gain_source"] == "table"
    assert stages["mc_dropout"]["status"] == "skipped"


def _interrupted_run(args, monkeypatch, nth=4):
    """Run the CLI and interrupt it at the nth progress commit (its state stays behind)."""
    from fwi_core.inference_plan.store import PredictionStore

    real, calls = PredictionStore.commit, []

    def commit(self, progress):
        calls.append(1)
        if len(calls) == nth:
            raise KeyboardInterrupt("interrupted")
        return real(self, progress)
    with monkeypatch.context() as m:
        m.setattr(PredictionStore, "commit", commit)
        with pytest.raises(KeyboardInterrupt):
            main(args)


def test_resume_with_a_retrained_checkpoint_under_the_same_name_starts_over_and_says_so(setup, tmp_path,
                                                                                      monkeypatch):
    root, ck = setup
    age(monkeypatch, 0.0)
    out = tmp_path / "work" / "sub.csv"
    args = ["--data", str(root), "--checkpoints", str(ck[0]), "--time-budget", "600", "--stages", "members",
            "flip", "--batch-size", "2", "--out", str(out)]
    _interrupted_run(args, monkeypatch)
    assert (tmp_path / "work" / ".sub.csv.state" / "progress.json").is_file()
    tiny_checkpoint(ck[0], seed=7)                  # retrained: same file name, other weights
    with pytest.warns(RuntimeWarning, match=r"starts over: member\(s\) r/best have other weights"):
        assert main(args) == 0                      # resume is the default
    assert json.loads((tmp_path / "work" / "sub_summary.json").read_text())["resumed"] is False
    fresh = tmp_path / "fresh" / "sub.csv"
    assert main(args[:-1] + [str(fresh)]) == 0
    assert out.read_bytes() == fresh.read_bytes()   # the new weights' CSV, not the old one's


@pytest.mark.parametrize("change, why", [
    (["--refine-iters", "5", "3"], "the stage option refine_iters changed"),
    (["--mc-passes", "3"], "the stage option mc_passes changed"),
    (["--stages", "members", "mc_dropout"], "the stages or their options changed"),
    (["--batch-size", "3"], "batch_size changed"),
])
def test_resume_with_other_options_starts_over_saying_what_changed(setup, tmp_path, monkeypatch, change, why):
    root, ck = setup
    age(monkeypatch, 0.0)
    args = ["--data", str(root), "--checkpoints", str(ck[0]), "--time-budget", "600", "--stages", "members",
            "flip", "--batch-size", "2", "--out", str(tmp_path / "sub.csv")]
    _interrupted_run(args, monkeypatch)
    with pytest.warns(RuntimeWarning, match=why):
        assert main(args + change) == 0


def test_the_same_run_resumes_by_default_and_no_resume_says_it_starts_over(setup, tmp_path, monkeypatch, capsys):
    root, ck = setup
    age(monkeypatch, 0.0)
    args = ["--data", str(root), "--checkpoints", str(ck[0]), "--time-budget", "600", "--stages", "members",
            "flip", "--batch-size", "2", "--out", str(tmp_path / "sub.csv")]
    _interrupted_run(args, monkeypatch)
    assert main(args) == 0
    assert json.loads((tmp_path / "sub_summary.json").read_text())["resumed"] is True
    _interrupted_run(args, monkeypatch)
    capsys.readouterr()
    assert main(args + ["--no-resume"]) == 0
    assert "resume is off: the saved progress there is discarded, starting over" in capsys.readouterr().out
    assert json.loads((tmp_path / "sub_summary.json").read_text())["resumed"] is False


def test_cli_and_kernel_share_one_setup_and_its_defaults(setup, tmp_path, monkeypatch):
    """The infer kernel's parameters are the CLI's defaults (InferenceOptions); the CLI can
    set refinement iterations and finds the consistency flagger as the kernel does."""
    import ast

    from fwi_core.inference_plan import DEFAULT_STAGES, InferenceOptions
    from fwi_core.inference_plan.stages.refine import DEFAULT_ITERS
    from fwi_core.inverse_consistency import ConsistencyFlagger
    from fwi_core.models.checkpoint import load_model
    from fwi_core.predict import _parser, setup_run

    src = (ROOT / "kernels" / "infer.py").read_text()
    params = {}
    for node in ast.parse(src.split("# %% tags=[\"parameters\"]")[1].split("# %%")[0]).body:
        params[node.targets[0].id] = ast.literal_eval(node.value)
    d = InferenceOptions()
    assert tuple(params["stages"] or d.stages) == d.stages == tuple(DEFAULT_STAGES)
    assert tuple(params["refine_iters"] or d.refine_iters) == d.refine_iters == tuple(DEFAULT_ITERS)
    for k in ("checkpoint_kind", "mc_passes", "batch_size", "flip_tta", "use_crf"):
        assert params[k] == getattr(d, k), k
    assert "prepare_inference(" in src and "prepare_inference(" in (ROOT / "fwi_core" / "predict.py").read_text()
    cli = _parser().parse_args(["--data", "x", "--checkpoints", "y"])
    assert (cli.mc_passes, cli.batch_size, cli.checkpoint_kind, cli.resume) == \
        (d.mc_passes, d.batch_size, d.checkpoint_kind, True)

    root, ck = setup
    inv = tiny_checkpoint(tmp_path / "runs" / "inv" / "best.pt", 0, "invertible_unet", width=4, latent_channels=4,
                          hidden=8, blocks_per_level=1, drop_rate=0.0)
    ConsistencyFlagger(load_model(inv), 0.5).save(inv.parent / "consistency.json")
    a = _parser().parse_args(["--data", str(root), "--checkpoints", str(ck[0]), str(inv), "--refine-iters", "5", "3"])
    s = setup_run(a)
    assert s.resources["refine_iters"] == [5, 3] and s.flagger is not None and s.flagger.threshold == 0.5
    assert s.stages == list(DEFAULT_STAGES) and "inv/best, threshold 0.5" in s.describe()
    age(monkeypatch, 0.0)
    out = tmp_path / "c.csv"
    assert main(["--data", str(root), "--checkpoints", str(ck[0]), str(inv), "--time-budget", "600",
                 "--stages", "members", "consistency", "--out", str(out)]) == 0
    stages = {r["name"]: r for r in json.loads((tmp_path / "c_summary.json").read_text())["stages"]}
    assert stages["consistency"]["status"] == "complete"
