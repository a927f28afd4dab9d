"""tools.sagemaker_job: the estimator's arguments, built without calling AWS."""
import json
import subprocess
import sys
import types

import pytest

from tools import sagemaker_job as job


@pytest.fixture
def source(tmp_path):
    (tmp_path / "sm").mkdir()
    (tmp_path / "sm" / "train_entry.py").write_text("# built\n")
    return tmp_path / "sm"


def test_estimator_arguments(source):
    est = job.estimator_kwargs(source, "arn:aws:iam::1:role/SM", "ml.g5.12xlarge", 2,
                               ["--model", "convnext_unet", "--epochs=30", "--no-balance-families"],
                               checkpoint_s3="s3://b/ckpt", spot=True, max_run_h=10)
    assert est["distribution"] == {"torch_distributed": {"enabled": True}}
    assert (est["entry_point"], est["source_dir"], est["instance_count"]) == ("train_entry.py", str(source), 2)
    assert est["hyperparameters"] == {"model": "convnext_unet", "epochs": "30", "no-balance-families": ""}
    assert (est["checkpoint_s3_uri"], est["checkpoint_local_path"]) == ("s3://b/ckpt", "/opt/ml/checkpoints")
    assert (est["use_spot_instances"], est["max_run"], est["max_wait"]) == (True, 36000, 72000)
    assert job.fit_kwargs("s3://b/data/", job_name="j1") == {"inputs": {"training": "s3://b/data/"}, "wait": False,
                                                             "job_name": "j1"}


@pytest.mark.parametrize("call, match", [
    (lambda s: job.estimator_kwargs(s.parent / "none", None, "ml.g5.xlarge"), "build it first"),
    (lambda s: job.estimator_kwargs(s, None, "g5.xlarge"), "--instance-type 'g5.xlarge'"),
    (lambda s: job.estimator_kwargs(s, None, "ml.g5.xlarge", spot=True), "--spot needs --checkpoint-s3"),
    (lambda s: job.estimator_kwargs(s, None, "ml.g5.xlarge", train_args=["--out", "x"]), "--out: the job decides it"),
    (lambda s: job.estimator_kwargs(s, None, "ml.g5.xlarge", train_args=["epochs"]), "training flag 'epochs'"),
    (lambda s: job.estimator_kwargs(s, None, "ml.g5.xlarge", checkpoint_s3="/tmp/c"), "expected an s3:// URI"),
    (lambda s: job.fit_kwargs("/data"), "--data '/data': expected an s3:// URI"),
])
def test_bad_arguments_name_the_option(source, call, match):
    with pytest.raises(job.JobError, match=match):
        call(source)


def _fake_sdk(monkeypatch, calls):
    class PyTorch:
        def __init__(self, **kw):
            calls.append(("init", kw))
            self.latest_training_job = types.SimpleNamespace(name="fwi-train-0001")

        def fit(self, **kw):
            calls.append(("fit", kw))

    sm = types.ModuleType("sagemaker")
    sm.get_execution_role = lambda: "arn:studio-role"
    sm.pytorch = types.ModuleType("sagemaker.pytorch")
    sm.pytorch.PyTorch = PyTorch
    monkeypatch.setitem(sys.modules, "sagemaker", sm)
    monkeypatch.setitem(sys.modules, "sagemaker.pytorch", sm.pytorch)
    return sm


def test_submit_passes_the_arguments_to_the_sdk(source, monkeypatch, capsys):
    calls = []
    _fake_sdk(monkeypatch, calls)
    assert job.main(["--data", "s3://b/d", "--source", str(source), "--submit", "--", "--epochs", "3"]) == 0
    assert calls[0] == ("init", {**job.estimator_kwargs(source, "arn:studio-role", "ml.g5.xlarge",
                                                        train_args=["--epochs", "3"])})
    assert calls[1] == ("fit", {"inputs": {"training": "s3://b/d"}, "wait": False})
    assert "submitted: fwi-train-0001" in capsys.readouterr().out


def test_written_script_submits_the_same_job(source, tmp_path, capsys):
    """The written script, run with a stand-in SDK on its path, builds the same estimator."""
    out = tmp_path / "submit.py"
    args = ["--data", "s3://b/d", "--source", str(source), "--instance-type", "ml.p4d.24xlarge",
            "--instance-count", "4", "--role", "arn:r", "--write", str(out), "--", "--model", "specproj_unet"]
    assert job.main(args) == 0
    fake = tmp_path / "fake"
    (fake / "sagemaker").mkdir(parents=True)
    (fake / "sagemaker" / "__init__.py").write_text("")
    (fake / "sagemaker" / "pytorch.py").write_text(
        "import json\nclass PyTorch:\n    def __init__(self, **kw):\n        print('INIT', json.dumps(kw, sort_keys=True))\n"
        "        self.latest_training_job = type('J', (), {'name': 'n'})()\n"
        "    def fit(self, **kw):\n        print('FIT', json.dumps(kw, sort_keys=True))\n")
    r = subprocess.run([sys.executable, str(out)], env={"PYTHONPATH": str(fake)}, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = dict(line.split(" ", 1) for line in r.stdout.splitlines() if line.startswith(("INIT", "FIT")))
    assert json.loads(lines["INIT"]) == job.estimator_kwargs(source, "arn:r", "ml.p4d.24xlarge", 4,
                                                             ["--model", "specproj_unet"])
    assert json.loads(lines["FIT"]) == {"inputs": {"training": "s3://b/d"}, "wait": False}


def test_print_and_missing_sdk(source, monkeypatch, capsys):
    assert job.main(["--data", "s3://b/d", "--source", str(source)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["estimator"]["distribution"] == {"torch_distributed": {"enabled": True}}
    monkeypatch.setitem(sys.modules, "sagemaker", None)            # not installed
    monkeypatch.setitem(sys.modules, "sagemaker.pytorch", None)
    assert job.main(["--data", "s3://b/d", "--source", str(source), "--submit"]) == 2
    assert 'pip install "sagemaker>=2.200,<3"' in capsys.readouterr().err
