import json

import pytest

from fwi_core.train import ConfigError, TrainConfig


def test_roundtrip_and_json_kwargs():
    cfg = TrainConfig(model="inversionnet", model_kwargs={"width": 0.5}, epochs=3)
    d = cfg.to_dict()
    assert TrainConfig.from_dict(json.loads(json.dumps(d))) == cfg
    assert TrainConfig.from_dict({"model_kwargs": '{"width": 0.25}'}).model_kwargs == {"width": 0.25}


def test_unknown_keys_are_listed():
    with pytest.raises(ConfigError, match="unknown TrainConfig keys.*bogus"):
        TrainConfig.from_dict({"bogus": 1})


@pytest.mark.parametrize("change, match", [
    (dict(model="no_such_model"), "unknown model 'no_such_model'; registered models: .*inversionnet"),
    (dict(amp="fp8"), "amp='fp8' is not one of off, bf16, fp16"),
    (dict(schedule="linear"), "schedule='linear' is not one of"),
    (dict(optimizer="lion"), "optimizer='lion'"),
    (dict(monitor="rmse"), "monitor='rmse'"),
    (dict(batch_size=0), "batch_size must be >= 1"),
    (dict(ema_decay=1.0), "ema_decay must be in"),
    (dict(folds=5, fold=5), "fold must be in 0..4"),
    (dict(flip_prob=2.0), "flip_prob"),
    (dict(time_budget=-1.0), "time_budget"),
    (dict(model_kwargs="x"), "model_kwargs must be a dict"),
])
def test_validate_messages(change, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**change).validate()
