from fwi_core.train import train
from tools import runs

from .helpers import tiny_cfg


def test_runs_table_compares_runs(tmp_path, data, capsys, monkeypatch):
    train(tiny_cfg(tmp_path / "local", epochs=1), datasets=data)
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Batch")
    train(tiny_cfg(tmp_path / "kaggle", epochs=2, time_budget=0), datasets=data)
    found = runs.find_runs([str(tmp_path)])
    assert [p.parent.name for p in found] == ["kaggle", "local"]
    rows = [runs.run_row(p, tmp_path) for p in found]
    assert [r["platform"] for r in rows] == ["kaggle", "local"]
    assert [r["epochs"] for r in rows] == [2, 1]
    assert all(r["best_mae"] > 0 and r["weights"] in ("raw", "ema") for r in rows)
    assert set(k for k in rows[0] if k.startswith("mae:")) == {"mae:A", "mae:B"}
    assert runs.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| kaggle/run | tiny_fwi | kaggle |" in out and "| local/run | tiny_fwi | local |" in out


def test_runs_without_runs(tmp_path, capsys):
    assert runs.main([str(tmp_path)]) == 1
    assert "no runs" in capsys.readouterr().err
    assert runs.main([str(tmp_path / "missing")]) == 2
