"""The platform's session limit as the engine's default budget."""


def test_process_age_and_platform_budget(tmp_path, monkeypatch):
    import time

    from fwi_core import platform
    from fwi_core.train import budget, train

    from .helpers import datasets, tiny_cfg

    age = platform.process_age()
    assert 0.0 < age < 24 * 3600
    time.sleep(0.05)
    assert platform.process_age() >= age
    # on Kaggle the default budget is the session's remainder: 11.5 h minus the process age
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Batch")
    monkeypatch.setattr(budget, "process_age", lambda: platform.KAGGLE_BUDGET - 1e-3)
    res = train(tiny_cfg(tmp_path, time_budget=None, epochs=3), datasets=datasets())
    assert res["platform"] == "kaggle" and res["stopped_reason"] == "time_budget" and res["step"] == 0
    assert res["time_budget"] < 1e-2
