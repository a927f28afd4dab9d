"""The SageMaker entry point: SageMaker's environment -> python -m fwi_core.train under torchrun."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from fwi_core.errors import ConfigError
from fwi_core.models.checkpoint import read_metadata
from fwi_core.sagemaker_entry import SageMakerJob, main, publish, train_arguments

from tests.train.helpers import write_layout

ROOT = Path(__file__).resolve().parents[1]


def sm_env(tmp_path, **over):
    env = {"SM_MODEL_DIR": str(tmp_path / "model"), "SM_OUTPUT_DATA_DIR": str(tmp_path / "output"),
           "SM_CHANNEL_TRAINING": str(tmp_path / "data"), "SM_HOSTS": '["algo-1", "algo-2"]',
           "SM_CURRENT_HOST": "algo-2", "SM_NUM_GPUS": "8", "FWI_CHECKPOINT_DIR": str(tmp_path / "ckpt")}
    env.update(over)
    return env


def test_torchrun_command_spans_hosts_and_gpus(tmp_path):
    job = SageMakerJob.from_env(sm_env(tmp_path))
    cmd = job.torchrun_command(job.nproc_per_node(None), ["--model", "inversionnet"])
    assert cmd[1:] == ["-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", "1", "--nproc-per-node", "8",
                       "--master-addr", "algo-1", "--master-port", "29500", "-m", "fwi_core.sagemaker_entry",
                       "--model", "inversionnet"]
    one = SageMakerJob.from_env(sm_env(tmp_path, SM_HOSTS='["algo-1"]', SM_CURRENT_HOST="algo-1", SM_NUM_GPUS="0",
                                       MASTER_PORT="1234"))
    assert one.nproc_per_node(None) == 1 and one.nproc_per_node(2) == 2
    alone = SageMakerJob.from_env({"SM_MODEL_DIR": "/m", "SM_CURRENT_HOST": "algo-3"})     # no SM_HOSTS
    assert (alone.hosts, alone.node_rank, alone.nproc_per_node(None)) == (("algo-3",), 0, 1)
    assert one.torchrun_command(2, [])[3:] == ["--nnodes", "1", "--node-rank", "0", "--nproc-per-node", "2",
                                               "--master-addr", "127.0.0.1", "--master-port", "1234",
                                               "-m", "fwi_core.sagemaker_entry"]


def test_data_out_and_resume_come_from_the_environment(tmp_path):
    job = SageMakerJob.from_env(sm_env(tmp_path))
    assert job.checkpoint_dir is None       # no checkpoint folder: the run lives in SM_MODEL_DIR
    assert train_arguments(job, ["--epochs", "3"]) == ["--epochs", "3", "--data", str(tmp_path / "data"),
                                                       "--out", str(tmp_path / "model" / "run")]
    (tmp_path / "ckpt" / "run").mkdir(parents=True)
    job = SageMakerJob.from_env(sm_env(tmp_path))
    assert train_arguments(job, [])[-2:] == ["--out", str(tmp_path / "ckpt" / "run")]
    (tmp_path / "ckpt" / "run" / "ckpt-00000012.pt").write_bytes(b"x")     # a spot instance came back
    assert train_arguments(job, [])[-2:] == ["--resume", "auto"]
    assert train_arguments(job, ["--data=/d", "--out", "/o"]) == ["--data=/d", "--out", "/o"]
    # a switch among the hyperparameters arrives as --flag "": the empty value is dropped
    assert train_arguments(job, ["--no-balance-families", "", "--lr", "0.1", "--data", "/d", "--out", "/o"]) == \
        ["--no-balance-families", "--lr", "0.1", "--data", "/d", "--out", "/o"]


@pytest.mark.parametrize("over, match", [
    ({"SM_MODEL_DIR": None}, "SM_MODEL_DIR is not set"),
    ({"SM_CHANNEL_TRAINING": None, "SM_CHANNEL_A": "/a", "SM_CHANNEL_B": "/b"}, "no 'training' channel among"),
    ({"SM_NUM_GPUS": "x"}, "SM_NUM_GPUS='x'"),
    ({"SM_HOSTS": "algo-1"}, "SM_HOSTS='algo-1'"),
])
def test_bad_environment_is_a_clear_error(tmp_path, capsys, over, match):
    env = {k: v for k, v in {**sm_env(tmp_path), **over}.items() if v is not None}
    assert main([], env) == 2
    assert match in capsys.readouterr().err
    with pytest.raises(ConfigError, match="this instance has 8 GPUs"):
        SageMakerJob.from_env(sm_env(tmp_path)).nproc_per_node(9)


def test_publish_copies_the_run_without_resumable_checkpoints(tmp_path):
    run = tmp_path / "ckpt" / "run"
    run.mkdir(parents=True)
    for name in ("best.pt", "ckpt-00000004.pt", "log.csv", "config.json", ".best.pt.x.tmp"):
        (run / name).write_text(name)
    target = publish(run, tmp_path / "model")
    assert sorted(p.name for p in target.iterdir()) == ["best.pt", "config.json", "log.csv"]
    assert publish(target, tmp_path / "model") is None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_hosts_train_a_model_from_the_environment_alone(tmp_path):
    """The source folder of ``tools.build --target sagemaker`` on two 'hosts' (algo-1,
    algo-2), one process each on CPU: the entry point on each launches torchrun from
    SM_HOSTS / SM_CURRENT_HOST; the ranks train together over gloo, the run lands in the
    checkpoint folder and is copied to SM_MODEL_DIR."""
    from tools.build import build

    source = build(None, tmp_path / "source", target="sagemaker")[0].parent
    write_layout(tmp_path / "data", per_family=4)
    (tmp_path / "ckpt").mkdir()
    port = _free_port()
    procs = []
    for host in ("algo-1", "algo-2"):
        env = {**os.environ, **sm_env(tmp_path, SM_CURRENT_HOST=host, SM_NUM_GPUS="0"),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "FWI_PROGRESS": "0", "OMP_NUM_THREADS": "1",
               }
        for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "KAGGLE_KERNEL_RUN_TYPE", "COLAB_RELEASE_TAG", "PYTHONPATH"):
            env.pop(k, None)
        procs.append(subprocess.Popen(
            [sys.executable, "train_entry.py", "--model", "inversionnet_small", "--epochs", "1",
             "--batch-size", "4", "--folds", "2", "--amp", "off", "--num-workers", "0", "--device", "cpu",
             "--time-budget", "0", "--ema-decay", "0"],
            cwd=source, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    assert "--nnodes 2 --node-rank 1 --nproc-per-node 1" in outs[1]
    meta = read_metadata(tmp_path / "ckpt" / "run" / "best.pt")
    assert (meta["platform"], meta["world_size"], meta["epoch"]) == ("sagemaker", 2, 1)
    published = sorted(p.name for p in (tmp_path / "model" / "run").iterdir())
    assert "best.pt" in published and not any(n.startswith("ckpt-") for n in published)
    assert json.loads((tmp_path / "model" / "run" / "config.json").read_text())["data"] == str(tmp_path / "data")
