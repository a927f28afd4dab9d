from fwi_core.train import detect_platform
from fwi_core.train.platform import COLAB_BUDGET, KAGGLE_BUDGET


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


def test_real_environment_is_detected_without_error():
    assert detect_platform().name in ("kaggle", "colab", "sagemaker", "local")


def test_process_age_and_platform_budget(tmp_path, monkeypatch):
    import time

    from fwi_core.train import platform, train
    from fwi_core.train import engine

    from .helpers import datasets, tiny_cfg

    age = platform.process_age()
    assert 0.0 < age < 24 * 3600
    time.sleep(0.05)
    assert platform.process_age() >= age
    # on Kaggle the default budget is the session's remainder: 11.5 h minus the process age
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Batch")
    monkeypatch.setattr(engine, "process_age", lambda: platform.KAGGLE_BUDGET - 1e-3)
    res = train(tiny_cfg(tmp_path, time_budget=None, epochs=3), datasets=datasets())
    assert res["platform"] == "kaggle" and res["stopped_reason"] == "time_budget" and res["step"] == 0
    assert res["time_budget"] < 1e-2
