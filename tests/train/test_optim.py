import logging

import pytest
import torch

from fwi_core.train import ConfigError
from fwi_core.train import optim


def _lrs(name, total=20, per_epoch=5, **kw):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1.0)
    s = optim.build_scheduler(opt, name, total, per_epoch, **kw)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        s.step()
    return out


def test_cosine_with_linear_warmup():
    lrs = _lrs("cosine", warmup_steps=4)
    assert lrs[0] == pytest.approx(optim.WARMUP_START)
    assert all(a < b for a, b in zip(lrs[:4], lrs[1:5]))        # rising during warm-up
    assert lrs[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))        # then decaying
    assert lrs[-1] < 0.05


def test_cosine_restarts_cycle_per_epoch_block():
    lrs = _lrs("cosine_restarts", total=20, per_epoch=5, restart_epochs=2)
    assert lrs[0] == pytest.approx(1.0) and lrs[10] == pytest.approx(1.0)   # restart every 10 steps
    assert lrs[9] < 0.05


def test_onecycle_peaks_after_warmup_and_constant():
    lrs = _lrs("onecycle", warmup_steps=5)
    assert max(range(20), key=lambda i: lrs[i]) == 5
    assert _lrs("constant") == [1.0] * 20


def test_unknown_schedule():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ConfigError, match="schedule='step'"):
        optim.build_scheduler(opt, "step", 10, 5)


def test_amp_resolution_and_degradation(monkeypatch, caplog):
    cpu = torch.device("cpu")
    assert optim.resolve_amp("off", cpu) == "off"
    assert optim.resolve_amp("bf16", cpu) == "bf16"
    monkeypatch.setattr(optim, "_autocast_works", lambda dev, dtype: dtype == torch.bfloat16)
    with caplog.at_level(logging.WARNING, logger="fwi_core.train"):
        assert optim.resolve_amp("fp16", cpu) == "bf16"
    assert "amp=fp16 is not supported on cpu; using bf16" in caplog.text
    monkeypatch.setattr(optim, "_autocast_works", lambda dev, dtype: False)
    assert optim.resolve_amp("fp16", cpu) == "off"
    with pytest.raises(ConfigError):
        optim.resolve_amp("fp32", cpu)


def test_scaler_enabled_for_fp16_only():
    cpu = torch.device("cpu")
    assert optim.make_scaler("fp16", cpu).is_enabled()
    assert not optim.make_scaler("bf16", cpu).is_enabled()
