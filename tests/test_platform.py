import pytest

from fwi_core.train import detect_platform
from fwi_core.platform import COLAB_BUDGET, KAGGLE_BUDGET


def test_kaggle():
    p = detect_platform({"KAGGLE_KERNEL_RUN_TYPE": "Batch"})
    assert p.name == "kaggle" and p.out_dir.startswith("/kaggle/working")
    assert p.time_budget == KAGGLE_BUDGET == 11.5 * 3600


def test_colab():
    p = detect_platform({"COLAB_RELEASE_TAG": "release-colab_20250601"})
    assert p.name == "colab" and p.time_budget == COLAB_BUDGET == 11 * 3600


def test_sagemaker_paths():
    p = detect_platform({"SM_MODEL_DIR": "/opt/ml/model", "SM_CHANNEL_TRAINING": "/opt/ml/input/data/training"})
    assert (p.name, p.data_dir, p.out_dir, p.time_budget) == \
        ("sagemaker", "/opt/ml/input/data/training", "/opt/ml/model", None)


def test_local_and_fwi_data_override():
    p = detect_platform({})
    assert (p.name, p.data_dir, p.out_dir, p.time_budget) == ("local", None, "runs", None)
    assert detect_platform({"FWI_DATA": "/data/wi"}).data_dir == "/data/wi"
    assert detect_platform({"KAGGLE_KERNEL_RUN_TYPE": "Interactive", "FWI_DATA": "/d"}).data_dir == "/d"


def test_real_environment_reads_os_environ(monkeypatch, tmp_path):
    """Without an explicit mapping, detect_platform reads os.environ (and looks for the
    google.colab module); each platform's variable switches it."""
    import fwi_core.platform as platform

    for var in ("KAGGLE_KERNEL_RUN_TYPE", "COLAB_RELEASE_TAG", "SM_MODEL_DIR", "SM_CHANNEL_TRAINING",
                "SM_OUTPUT_DATA_DIR", "FWI_DATA"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(platform, "has_module", lambda name: False)
    assert detect_platform().name == "local"
    monkeypatch.setattr(platform, "has_module", lambda name: name == "google.colab")
    assert detect_platform().name == "colab"
    monkeypatch.setattr(platform, "has_module", lambda name: False)
    monkeypatch.setenv("SM_MODEL_DIR", "/opt/ml/model")
    assert detect_platform().out_dir == "/opt/ml/model"
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    (tmp_path / "train_samples").mkdir()
    (tmp_path / "test").mkdir()
    monkeypatch.setenv("FWI_DATA", str(tmp_path))
    p = detect_platform()
    assert (p.name, p.data_dir, p.time_budget) == ("kaggle", str(tmp_path), KAGGLE_BUDGET)


def test_default_epochs_is_time_mode_where_sessions_end():
    from fwi_core.train import default_epochs

    kaggle = detect_platform({"KAGGLE_KERNEL_RUN_TYPE": "Batch"})
    local = detect_platform({})
    assert default_epochs(kaggle) == 0 and default_epochs(kaggle, time_budget=0) == 10
    assert default_epochs(local) == 10 and default_epochs(local, time_budget=600.0) == 0


def test_sagemaker_hosts_gpus_and_channels():
    from fwi_core.platform import sagemaker_channels

    env = {"SM_MODEL_DIR": "/opt/ml/model", "SM_HOSTS": '["algo-1", "algo-2"]', "SM_CURRENT_HOST": "algo-2",
           "SM_NUM_GPUS": "8", "SM_CHANNEL_TRAINING": "/opt/ml/input/data/training",
           "SM_CHANNEL_CHECKPOINTS": "/opt/ml/input/data/checkpoints"}
    p = detect_platform(env)
    assert (p.hosts, p.current_host, p.gpus) == (("algo-1", "algo-2"), "algo-2", 8)
    assert p.describe() == "sagemaker: no session limit, 2 hosts (this: algo-2), 8 GPUs here"
    assert sagemaker_channels(env) == {"checkpoints": "/opt/ml/input/data/checkpoints",
                                       "training": "/opt/ml/input/data/training"}
    assert p.to_dict()["hosts"] == ["algo-1", "algo-2"]


@pytest.mark.parametrize("env, match", [
    ({"SM_HOSTS": "algo-1"}, "SM_HOSTS='algo-1': expected a JSON list"),
    ({"SM_HOSTS": "[]"}, "expected a JSON list"),
    ({"SM_HOSTS": '["algo-1"]', "SM_CURRENT_HOST": "algo-9"}, "SM_CURRENT_HOST='algo-9' is not one of"),
    ({"SM_MODEL_DIR": "/m", "SM_NUM_GPUS": "eight"}, "SM_NUM_GPUS='eight': expected an integer"),
    ({"FWI_TIME_LIMIT": "2h"}, "FWI_TIME_LIMIT='2h': expected a number"),
])
def test_bad_platform_variables_name_the_variable(env, match):
    from fwi_core.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        detect_platform(env)


def test_cluster_from_slurm_or_multi_machine_torchrun(monkeypatch):
    import fwi_core.platform as platform

    monkeypatch.setattr(platform.time, "time", lambda: 1_000_000.0)
    p = detect_platform({"SLURM_JOB_ID": "77", "SLURM_JOB_NUM_NODES": "4", "SLURM_NODEID": "2",
                         "SLURM_JOB_END_TIME": str(1_000_000 + 7200)})
    assert (p.name, p.hosts, p.current_host, p.time_budget) == \
        ("cluster", ("node-0", "node-1", "node-2", "node-3"), "node-2", 7200.0)
    p = detect_platform({"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8", "GROUP_WORLD_SIZE": "2", "GROUP_RANK": "1"})
    assert (p.name, len(p.hosts), p.current_host, p.time_budget) == ("cluster", 2, "node-1", None)
    # one machine under torchrun is still local
    assert detect_platform({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}).name == "local"


def test_time_limit_variable_sets_or_lifts_the_session_limit():
    assert detect_platform({"FWI_TIME_LIMIT": "5400"}).time_budget == 5400.0
    assert detect_platform({"KAGGLE_KERNEL_RUN_TYPE": "Batch", "FWI_TIME_LIMIT": "3600"}).time_budget == 3600.0
    assert detect_platform({"COLAB_RELEASE_TAG": "x", "FWI_TIME_LIMIT": "0"}).time_budget is None


def test_device_label_names_the_device():
    import torch

    from fwi_core.platform import device_label

    assert device_label(torch.device("cpu")) == f"cpu ({torch.get_num_threads()} threads)"
    if torch.cuda.is_available():
        assert device_label(torch.device("cuda:0")).startswith("cuda:0 ")
