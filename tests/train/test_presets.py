"""One set of defaults: the presets, the CLI and the built train notebook agree."""
import ast
import json

import pytest

from fwi_core.errors import ConfigError
from fwi_core.params import KERNEL_PARAMETERS
from fwi_core.platform import detect_platform
from fwi_core.train import TrainConfig
from fwi_core.train.cli import build_parser, config_from_args
from fwi_core.train.presets import EVIDENCE, PRESETS, default_preset


def _notebook_parameters(kernel: str):
    """The built notebook's parameters cell, evaluated ({name: value}), and its code."""
    from tools.build import build_notebook

    nb, _, _ = build_notebook(kernel)
    cell = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])][0]
    values = {}
    for node in ast.parse(cell.source).body:
        if isinstance(node, ast.Assign):
            values[node.targets[0].id] = ast.literal_eval(node.value)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    return values, code


def _comparable(cfg: TrainConfig):
    d = cfg.to_dict()
    d.pop("data"), d.pop("out")
    return json.loads(json.dumps(d))


def test_every_preset_sets_real_fields_and_validates():
    fields = set(TrainConfig.field_names())
    for name, values in PRESETS.items():
        assert set(values) <= fields, (name, set(values) - fields)
        cfg = TrainConfig.from_dict({"preset": name})
        cfg.validate()
        assert cfg.preset == name and name in EVIDENCE
        for key, value in values.items():
            assert getattr(cfg, key) == (tuple(value) if isinstance(value, list) else value), (name, key)
    # cpu: the dataclass defaults with the measured backbone (BENCHMARKS.md, Presets)
    assert PRESETS["cpu"] == {"model": "inversionnet_small"}
    cpu, plain = TrainConfig.from_dict({"preset": "cpu"}).to_dict(), TrainConfig(preset="cpu").to_dict()
    assert {k for k in cpu if cpu[k] != plain[k]} == {"model"} and cpu["model"] == "inversionnet_small"


@pytest.mark.parametrize("preset", [None, *PRESETS])
def test_built_notebook_and_cli_make_the_same_config(preset):
    """The train notebook (parameters as built, ``preset`` as papermill would inject it)
    and ``python -m fwi_core.train --preset P`` give the same TrainConfig; both notebooks
    build."""
    params, code = _notebook_parameters("train")
    _notebook_parameters("infer")
    assert "TrainConfig.from_kernel(globals())" in code          # the kernel reads the presets
    kernel_names = set(KERNEL_PARAMETERS["train"])
    assert set(params) == kernel_names
    # no training default is written in the notebook: each is None or {} (the preset's)
    from fwi_core.train.config import KERNEL_NAMES

    fields = set(TrainConfig.field_names())
    for name, value in params.items():
        if KERNEL_NAMES.get(name, name) in fields:
            assert value in (None, {}) or name == "preset", (name, value)
    if preset is not None:
        params["preset"] = preset
    argv = [] if preset is None else ["--preset", preset]
    assert _comparable(TrainConfig.from_kernel(params)) == _comparable(config_from_args(argv))
    assert TrainConfig.from_kernel(params).preset == (preset or default_preset())


def test_kernel_and_cli_overrides_agree_and_beat_the_preset():
    params, _ = _notebook_parameters("train")
    params.update(preset="kaggle_t4", lr=2e-3, model_name="inversionnet", flip_prob=0.0)
    kernel = TrainConfig.from_kernel(params)
    cli = config_from_args(["--preset", "kaggle_t4", "--lr", "0.002", "--model", "inversionnet",
                            "--flip-prob", "0"])
    assert _comparable(kernel) == _comparable(cli)
    assert kernel.lr == 2e-3 and kernel.flip_prob == 0.0 and kernel.amp == "fp16"     # the rest: the preset's
    assert kernel.model_kwargs == {}        # the preset's kwargs belong to its own model (caformer_unet)


def test_auto_is_the_platforms_preset(monkeypatch):
    from fwi_core.platform import Platform

    kaggle = Platform("kaggle", None, "/kaggle/working", 41400.0)
    local = Platform("local", None, ".", None)
    assert default_preset(kaggle, cuda=False) == "kaggle_t4"
    assert default_preset(local, cuda=True) == "gpu" and default_preset(local, cuda=False) == "cpu"
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    assert detect_platform().name == "kaggle"
    assert config_from_args([]).preset == "kaggle_t4"
    params, _ = _notebook_parameters("train")
    assert TrainConfig.from_kernel(params).preset == "kaggle_t4"


def test_help_shows_defaults_and_presets():
    text = build_parser().format_help()
    assert "--lr LR" in text and f"(default: {TrainConfig().lr};" in text
    assert "kaggle_t4: fp16" in text              # --amp: the preset that changes it
    assert "--preset {auto," in text and "presets (fwi_core/train/presets.py)" in text
    assert "(default: auto" in text


def test_bad_preset_is_a_clear_error():
    with pytest.raises(ConfigError, match="unknown preset 'fast'; presets: auto, cpu"):
        TrainConfig.from_dict({"preset": "fast"})
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--preset", "fast"])
