"""Named training recipes: the one place the CLI, the train kernel and the docs read.

A preset is a set of :class:`~fwi_core.train.config.TrainConfig` values over the
dataclass defaults; whatever a caller sets explicitly (a flag, a kernel parameter that is
not None, a key of a ``--config`` file) overrides it:

    defaults (TrainConfig)  <  preset  <  --config file  <  flags / kernel parameters

- ``cpu``: the dataclass defaults with a small backbone (``inversionnet_small``), which the
  CPU comparison favours over ``inversionnet`` (BENCHMARKS.md, *Presets*); what a local run
  without a GPU gets.
- ``smoke``: the toy run of ``make smoke`` (a small model for a few minutes).
- ``kaggle_t4``: a Kaggle T4 session (16 GB, fp16, 4 CPU cores, 12 h): a CAFormer UNet
  trained until the session budget (the schedule spans it) on the competition data mixed
  half and half with freshly simulated, augmented maps.
- ``gpu``: another CUDA machine (bf16 where the GPU has it, fp16 otherwise), a fixed
  number of epochs.

``preset="auto"`` (the CLI's and the kernel's default) is :func:`default_preset`:
``kaggle_t4`` on Kaggle, ``gpu`` where CUDA is available, ``cpu`` otherwise. The Python
API's ``TrainConfig()`` is the dataclass defaults (``inversionnet``). :data:`EVIDENCE` says, per preset, which
settings were measured and which are choices from the public record.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional

import torch

from ..errors import ConfigError
from ..platform import Platform, detect_platform

__all__ = ["PRESETS", "EVIDENCE", "AUTO", "default_preset", "resolve_preset", "preset_values",
           "list_presets", "describe_presets"]

AUTO = "auto"

#: The map augmentations of simulated data in the GPU presets (physics.map_augment's keys).
SIM_AUGMENT = {"crop": 0.3, "warp": 0.3, "blend": 0.2}

#: Every preset's values over the TrainConfig defaults.
PRESETS: Dict[str, Dict[str, Any]] = {
    "cpu": {"model": "inversionnet_small"},
    "smoke": {
        "model": "inversionnet_small", "epochs": 12, "batch_size": 8, "lr": 1e-3, "ema_decay": 0.95,
        "schedule": "cosine_restarts", "restart_epochs": 4, "time_budget": 240.0, "num_workers": 0,
        "amp": "off", "scale_prob": 0.3, "noise_prob": 0.3, "folds": 5,
    },
    "kaggle_t4": {
        "model": "caformer_unet", "model_kwargs": {"backbone": "caformer_s18", "drop_rate": 0.1},
        "epochs": 0, "batch_size": 32, "amp": "fp16", "lr": 5e-4, "warmup_steps": 500, "schedule": "cosine",
        "ema_decay": 0.999, "flip_prob": 0.5, "balance_families": True, "num_workers": 3,
        "sim_fraction": 0.5, "sim_kwargs": {"augment": dict(SIM_AUGMENT)},
        "checkpoint_every": 2000, "log_every": 200,
    },
}
#: ``gpu``: kaggle_t4's recipe in bf16 with a larger batch, more workers and a fixed number of epochs
PRESETS["gpu"] = {**copy.deepcopy(PRESETS["kaggle_t4"]), "epochs": 30, "batch_size": 64, "amp": "bf16",
                  "num_workers": 4}

#: What each preset rests on (the README and ``--help`` print it).
EVIDENCE: Dict[str, str] = {
    "cpu": ("measured (BENCHMARKS.md, Presets; 300 s on 2 cores, held-out MAE): inversionnet_small 358 and "
            "344 m/s in two runs, specproj_unet 342 (within that spread, 7.5x slower to predict), inversionnet "
            "465 (fewer steps in the budget), so the small backbone; the other values are the TrainConfig "
            "defaults. At a few hundred steps the EMA weights lose (710 m/s at 0.999); validation scores both "
            "and load_model(weights='auto') loads the better."),
    "smoke": "a toy run that exercises the whole pipeline (restart snapshots for the infer kernel) in minutes.",
    "kaggle_t4": ("choices from the public record (FACTS section 7; not measured on a GPU here): a CAFormer UNet "
                  "(the strongest public notebook's design, the s18 size for one T4), freshly simulated "
                  "augmented maps (what every top team trained on), flips, EMA, fp16 (the T4 has no bf16), "
                  "the schedule spanning the session."),
    "gpu": "kaggle_t4's choices with bf16, a larger batch and a fixed number of epochs (not measured here).",
}


def list_presets() -> List[str]:
    return list(PRESETS)


def default_preset(platform: Optional[Platform] = None, cuda: Optional[bool] = None) -> str:
    """The preset ``"auto"`` stands for: ``kaggle_t4`` on Kaggle, ``gpu`` where CUDA is
    available, else ``cpu``."""
    platform = platform or detect_platform()
    if platform.name == "kaggle":
        return "kaggle_t4"
    if torch.cuda.is_available() if cuda is None else cuda:
        return "gpu"
    return "cpu"


def resolve_preset(name: Optional[str], platform: Optional[Platform] = None) -> Optional[str]:
    """``name`` checked (``"auto"`` resolved by :func:`default_preset`; None stays None)."""
    if name is None:
        return None
    if not isinstance(name, str):
        raise ConfigError(f"preset must be a name ({', '.join([AUTO, *PRESETS])}), got {name!r}")
    if name == AUTO:
        return default_preset(platform)
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join([AUTO, *PRESETS])}")
    return name


def preset_values(name: str) -> Dict[str, Any]:
    """A copy of the values preset ``name`` sets (``"auto"`` resolved)."""
    return copy.deepcopy(PRESETS[resolve_preset(name)])


def describe_presets() -> str:
    """One paragraph per preset: its values and what they rest on (for ``--help``)."""
    lines = []
    for name, values in PRESETS.items():
        shown = ", ".join(f"{k}={v}" for k, v in values.items()) or "the TrainConfig defaults"
        lines.append(f"{name}: {shown}. {EVIDENCE[name]}")
    return "\n".join(lines)
