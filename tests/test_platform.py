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
