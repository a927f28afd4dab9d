"""``TrainConfig``: every training setting in one dataclass (JSON in, JSON out).

A kernel's parameters cell, a ``--config`` JSON file and command-line flags all fill the
same fields; :meth:`TrainConfig.from_dict` rejects unknown keys and :meth:`validate`
checks names and ranges with messages that say what to change.
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

from ..errors import ConfigError
from ..models import is_model, list_models
from ..params import KERNEL_PARAMETERS
from .presets import AUTO, PRESETS, preset_values, resolve_preset

AMP_MODES = ("off", "bf16", "fp16")
SCHEDULES = ("constant", "cosine", "onecycle", "cosine_restarts")
OPTIMIZERS = ("adamw", "adam", "sgd")
MONITORS = ("mae", "mae_raw", "mae_ema", "family_mae", "boundary_iou", "ssim")
#: Monitors that improve upwards (the others are errors, minimised).
MAXIMISED = ("boundary_iou", "ssim")
#: Train-kernel parameters whose TrainConfig field has another name.
KERNEL_NAMES = {"model_name": "model", "pseudo_dir": "pseudo"}


@dataclass
class TrainConfig:
    """Settings of one training run (one fold).

    Data and output:
        data: competition root (``train_samples/`` inside) or None for the platform's
            default (the attached competition on Kaggle, ``FWI_DATA`` elsewhere).
        out: run folder (checkpoints, ``log.csv``, ``curves.png``, out-of-fold npz);
            None: ``<platform output>/<model>-fold<fold>``.
        max_train_samples, max_val_samples: seeded random subsets (0: all).
        sim_fraction: fraction of each epoch's training items that are freshly simulated
            maps (``physics.simulated.SimulatedDataset``: the 10 family generators plus physical map
            augmentations, simulated with the exact forward model; 0: none);
            sim_kwargs: its options (``families``, ``weights``, ``augment``, ``device``,
            ``cache_dir``, ...). Training datasets with ``set_epoch`` get it every epoch.
        pseudo: a pseudo-label folder (``python -m tools.pseudo_label --out DIR``: it holds
            ``train_samples/Pseudo/``): its samples join every epoch's training items (family
            ``Pseudo``; validation stays real). None: none.
        num_workers: DataLoader worker processes.
    Model:
        model: a name from :func:`fwi_core.models.list_models`; model_kwargs: its arguments.
        sync_bn: convert BatchNorm to SyncBatchNorm under DDP (GPU).
        backbone_checkpoint: stage-wise training: freeze the model of this checkpoint and
            train ``model`` on its residual (``residual_stage``: the output is the backbone's
            prediction plus the member's bounded correction; the member sees the prediction,
            and ``residual_stacker`` also the data residual). The saved model is the stage.
    Optimisation:
        epochs: passes over the training set; 0 trains until the time budget runs out,
            with the schedule spanning the budget (progress = elapsed / budget, so the
            learning rate reaches its minimum near the deadline; needs a budget: the
            platform's on Kaggle/Colab or ``time_budget``). batch_size: the *global* batch (split across DDP processes, so a config
            trains the same on 1 or N GPUs); grad_accum: micro-batches per batch (doubles
            on CUDA out-of-memory); optimizer (adamw|adam|sgd), lr, weight_decay;
            amp (off|bf16|fp16); grad_clip (max gradient norm, 0: off).
        schedule: constant|cosine|onecycle|cosine_restarts, stepped every optimizer step;
            warmup_steps: linear warm-up (onecycle: its rising phase); min_lr: the floor of
            the cosine schedules; restart_epochs: cycle length of cosine_restarts (a weight
            snapshot is saved at each cycle end, at the learning-rate minimum, for snapshot
            ensembles); restart_cycles: the number of cycles when epochs=0 (the budget is
            split into that many equal cycles).
        ema_decay: EMA of the weights (0: off), evaluated beside the raw weights.
        boundary_weight: weight of the L1 penalty on spatial velocity gradients.
        family_loss_weight: weight of the cross-entropy of a model's own family head
            (models with ``num_families`` > 0, e.g. SpecProjUNet): such models get the
            true family index while training and predict it themselves when validating.
        latent_weight: weight of a model's ``latent_penalty`` (the invertible UNet's
            auxiliary channels; models without it ignore the setting).
        pde_weight: weight of the PDE-consistency term (0: off): the normalised misfit
            between a sample's observed gathers and the exact simulation of its predicted
            map, differentiated through the simulator's adjoint (``physics.misfit.pde_loss``).
            Affordability: pde_every (every k-th optimizer step), pde_samples (the first n
            samples of a batch, 0: all), pde_shots (shot indices, empty: all 5), pde_time
            (simulate the first n time samples, 0: all), pde_ramp_steps (the weight ramps
            linearly from 0 over these steps), pde_simulate_kwargs (passed to ``simulate``:
            e.g. ``batch_chunk``, ``checkpoint_every``, ``backend``; the geometry must stay
            the data's).
        scale_prob, scale_range: probability of multiplying a sample's raw gathers by one
            factor drawn log-uniformly from ``scale_range`` (source-strength variation).
        noise_prob, noise_std: probability of adding Gaussian noise to a sample's raw
            gathers, with a standard deviation of ``noise_std`` times the sample's RMS.
        flip_prob: probability of the horizontal flip per training sample.
        balance_families: draw every family equally often in each epoch.
    Validation and stopping:
        folds, fold: family-stratified k-fold split (folds < 2: train on everything,
            no validation); monitor: mae|mae_raw|mae_ema|family_mae ("mae" is the better
            of raw and EMA, "family_mae" the mean over families); patience (evaluations
            without improvement before stopping, 0: never), min_delta;
        time_budget: seconds from the call to ``train`` after which training stops cleanly
            with a checkpoint (0: no limit; None: the platform's session limit, counted
            from the start of the process, e.g. 11.5 h on Kaggle, none locally);
        max_steps: stop (resumably) after this many optimizer steps (0: no limit).
        oof_mc_passes: >= 2: the out-of-fold file also holds the variance of that many
            MC-dropout passes (``mc_var``, m/s^2), a feature for the ensemble's
            meta-learner (0: none; models without dropout give zeros).
    Checkpoints:
        keep_last: rolling full checkpoints to keep (``best.pt`` is kept apart);
        checkpoint_every: also checkpoint every N optimizer steps (0: at epoch ends only);
        resume: a checkpoint file, a run folder (its latest checkpoint), or "auto" (the
            latest in ``out`` if any).
    Misc:
        seed; device ("auto": CUDA if present); log_every (steps between loss syncs,
        progress-bar updates and log lines; the first steps 1, 2, 4, ... are logged too).
        preset: the recipe the values came from (:mod:`fwi_core.train.presets`; set by
        :meth:`from_dict` / the CLI / the kernel, which expand it; None: the defaults).
        rewarm_fraction: resuming a run whose schedule had annealed to its end with a
        longer length warms the learning rate back up to ``lr`` linearly over this
        fraction of the new remainder, then anneals over the rest (0: stay annealed).
    """

    preset: Optional[str] = None
    data: Optional[str] = None
    out: Optional[str] = None
    model: str = "inversionnet"
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    backbone_checkpoint: Optional[str] = None
    epochs: int = 10
    batch_size: int = 16
    grad_accum: int = 1
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    amp: str = "off"
    grad_clip: float = 1.0
    schedule: str = "cosine"
    warmup_steps: int = 0
    min_lr: float = 0.0
    restart_epochs: int = 1
    restart_cycles: int = 3
    ema_decay: float = 0.999
    boundary_weight: float = 0.0
    family_loss_weight: float = 0.1
    latent_weight: float = 0.01
    pde_weight: float = 0.0
    pde_every: int = 4
    pde_samples: int = 2
    pde_shots: Tuple[int, ...] = ()
    pde_time: int = 0
    pde_ramp_steps: int = 0
    pde_simulate_kwargs: Dict[str, Any] = field(default_factory=dict)
    scale_prob: float = 0.0
    scale_range: Tuple[float, float] = (0.5, 2.0)
    noise_prob: float = 0.0
    noise_std: float = 0.05
    flip_prob: float = 0.5
    balance_families: bool = False
    folds: int = 5
    fold: int = 0
    monitor: str = "mae"
    patience: int = 10
    min_delta: float = 0.0
    time_budget: Optional[float] = None
    max_steps: int = 0
    oof_mc_passes: int = 0
    keep_last: int = 2
    checkpoint_every: int = 0
    resume: Optional[str] = None
    seed: int = 0
    max_train_samples: int = 0
    max_val_samples: int = 0
    sim_fraction: float = 0.0
    sim_kwargs: Dict[str, Any] = field(default_factory=dict)
    pseudo: Optional[str] = None
    num_workers: int = 2
    device: str = "auto"
    sync_bn: bool = False
    log_every: int = 50
    rewarm_fraction: float = 0.05

    def __post_init__(self):
        if isinstance(self.scale_range, list):   # from JSON
            self.scale_range = tuple(self.scale_range)
        if isinstance(self.pde_shots, list):
            self.pde_shots = tuple(self.pde_shots)

    # ----------------------------------------------------------------- conversion
    @classmethod
    def field_names(cls):
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainConfig":
        """Build from a dict (e.g. JSON); unknown keys raise :class:`ConfigError`.
        ``model_kwargs`` may be a dict or a JSON string. With a ``preset`` key (a name of
        :data:`~fwi_core.train.presets.PRESETS`, or "auto"), the preset's values fill
        every key ``d`` does not give, and ``preset`` holds the resolved name."""
        if not isinstance(d, dict):
            raise ConfigError(f"a TrainConfig needs a dict (JSON object) of settings, got {type(d).__name__}")
        d = dict(d)
        unknown = sorted(map(repr, set(d) - set(cls.field_names())))
        if unknown:
            raise ConfigError(f"unknown TrainConfig keys [{', '.join(unknown)}]; valid keys: "
                              f"{', '.join(cls.field_names())}")
        if d.get("preset") is not None:
            name = resolve_preset(d["preset"])
            preset = preset_values(name)
            if "model" in d and d["model"] != preset.get("model", d["model"]):
                preset.pop("model_kwargs", None)     # the preset's kwargs are its own model's
            d = {**preset, **d, "preset": name}
        for key in ("model_kwargs", "sim_kwargs", "pde_simulate_kwargs"):
            if isinstance(d.get(key), str):
                try:
                    d[key] = json.loads(d[key] or "{}")
                except json.JSONDecodeError as exc:
                    raise ConfigError(f"{key} is not valid JSON: {exc}") from exc
        if d.get("model_kwargs") is None:
            d["model_kwargs"] = {}
        return cls(**d)

    @classmethod
    def from_kernel(cls, params: Dict[str, Any]) -> "TrainConfig":
        """The train kernel's configuration from its parameters (its ``globals()``):
        ``preset`` (default "auto"), then every parameter that names a field
        (``model_name``: ``model``) and is neither None nor an empty dict (None and {}
        keep the preset's value). The CLI builds the same dict from its flags
        (:func:`fwi_core.train.cli.config_from_args`)."""
        fields = set(cls.field_names())
        values: Dict[str, Any] = {"preset": params.get("preset", AUTO)}
        for name in KERNEL_PARAMETERS["train"]:
            key, value = KERNEL_NAMES.get(name, name), params.get(name)
            if key in fields and key != "preset" and value is not None and not (isinstance(value, dict)
                                                                                and not value):
                values[key] = value
        if values["preset"] is None:
            values.pop("preset")
        for key in ("scale_range", "pde_shots"):
            if isinstance(values.get(key), list):
                values[key] = tuple(values[key])
        return cls.from_dict(values)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    # ----------------------------------------------------------------- validation
    def _check_types(self) -> None:
        """Every field holds a value of its declared type (a kernel parameter or a JSON
        value of the wrong type fails here, not deep inside the engine); integral floats
        become ints and numbers become floats."""
        hints = typing.get_type_hints(type(self))

        def bad(name, value, what):
            raise ConfigError(f"{name} must be {what}, got {value!r} ({type(value).__name__})")

        def number(name, value):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
                bad(name, value, "a finite number")
            return float(value)

        for f in dataclasses.fields(self):
            name, value, hint = f.name, getattr(self, f.name), hints[f.name]
            if typing.get_origin(hint) is typing.Union and value is None:
                continue                                    # Optional[...] = None
            if typing.get_origin(hint) is typing.Union:
                hint = [a for a in typing.get_args(hint) if a is not type(None)][0]
            if hint is bool:
                if not isinstance(value, bool):
                    bad(name, value, "true or false")
            elif hint is int:
                if isinstance(value, numbers.Real) and not isinstance(value, (bool, numbers.Integral)) \
                        and math.isfinite(float(value)) and float(value).is_integer():
                    value = int(value)                      # 10.0 from JSON
                if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                    bad(name, value, "an integer")
                setattr(self, name, int(value))
            elif hint is float:
                setattr(self, name, number(name, value))
            elif hint is str:
                if not isinstance(value, str):
                    bad(name, value, "a string")
            elif typing.get_origin(hint) is dict:
                if not isinstance(value, dict):
                    bad(name, value, "a dict (JSON object)")
            elif name == "pde_shots":
                if not isinstance(value, (list, tuple)) or \
                        any(isinstance(i, bool) or not isinstance(i, numbers.Integral) for i in value):
                    bad(name, value, "a list of shot indices")
                self.pde_shots = tuple(int(i) for i in value)
            elif name == "scale_range":
                if not isinstance(value, (list, tuple)) or len(value) != 2:
                    bad(name, value, "two factors (low, high)")
                self.scale_range = (number(name, value[0]), number(name, value[1]))

    def validate(self) -> "TrainConfig":
        """Check types, names and ranges; returns ``self`` or raises :class:`ConfigError`."""
        self._check_types()

        def choice(name, value, options):
            if value not in options:
                raise ConfigError(f"{name}={value!r} is not one of {', '.join(options)}")

        if self.preset is not None:
            choice("preset", self.preset, list(PRESETS))
        choice("amp", self.amp, AMP_MODES)
        choice("schedule", self.schedule, SCHEDULES)
        choice("optimizer", self.optimizer, OPTIMIZERS)
        choice("monitor", self.monitor, MONITORS)
        if not is_model(self.model):
            raise ConfigError(f"unknown model {self.model!r}; registered models: {', '.join(list_models())}")
        if self.backbone_checkpoint is not None:
            from pathlib import Path

            if not Path(self.backbone_checkpoint).is_file():
                raise ConfigError(f"backbone_checkpoint={self.backbone_checkpoint}: no such checkpoint file")
            if self.model == "residual_stage":
                raise ConfigError("with backbone_checkpoint, model is the member to train (e.g. egnn), "
                                  "not residual_stage")
        if not isinstance(self.model_kwargs, dict):
            raise ConfigError(f"model_kwargs must be a dict (JSON object), got {type(self.model_kwargs).__name__}")
        for name in ("batch_size", "grad_accum", "restart_epochs", "restart_cycles", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("epochs", "warmup_steps", "patience", "max_steps", "keep_last", "checkpoint_every",
                     "max_train_samples", "max_val_samples", "num_workers", "folds"):
            if int(getattr(self, name)) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.keep_last < 1:
            raise ConfigError(f"keep_last must be >= 1 (the resumable checkpoint), got {self.keep_last}")
        if self.lr < 0 or self.weight_decay < 0 or self.grad_clip < 0 or self.min_lr < 0:
            raise ConfigError("lr, weight_decay, grad_clip and min_lr must be >= 0")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay must be in [0, 1) (0 turns EMA off), got {self.ema_decay}")
        if self.oof_mc_passes < 0 or self.oof_mc_passes == 1:
            raise ConfigError(f"oof_mc_passes must be 0 (off) or >= 2, got {self.oof_mc_passes}")
        if not 0.0 <= self.rewarm_fraction < 1.0:
            raise ConfigError(f"rewarm_fraction must be in [0, 1), got {self.rewarm_fraction}")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ConfigError(f"flip_prob must be in [0, 1], got {self.flip_prob}")
        for name in ("pde_every", ):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("pde_samples", "pde_time", "pde_ramp_steps"):
            if int(getattr(self, name)) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if any(not 0 <= int(i) < 5 for i in self.pde_shots):
            raise ConfigError(f"pde_shots must be shot indices 0..4, got {list(self.pde_shots)}")
        for name in ("boundary_weight", "family_loss_weight", "latent_weight", "noise_std", "pde_weight"):
            if not float(getattr(self, name)) >= 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= float(self.sim_fraction) < 1.0:
            raise ConfigError(f"sim_fraction must be in [0, 1), got {self.sim_fraction}")
        if not isinstance(self.sim_kwargs, dict):
            raise ConfigError(f"sim_kwargs must be a dict (JSON object), got {type(self.sim_kwargs).__name__}")
        _check_options("sim_kwargs", self.sim_kwargs, "fwi_core.physics.simulated", "SimulatedDataset",
                       exclude=("samples_per_epoch",))
        _check_options("pde_simulate_kwargs", self.pde_simulate_kwargs, "fwi_core.physics.forward", "simulate",
                       exclude=("velocity", "nt", "source_columns"))
        for name in ("scale_prob", "noise_prob"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        lo_hi = tuple(self.scale_range) if isinstance(self.scale_range, (list, tuple)) else ()
        if len(lo_hi) != 2 or not 0 < float(lo_hi[0]) <= float(lo_hi[1]):
            raise ConfigError(f"scale_range must be two factors 0 < low <= high, got {self.scale_range!r}")
        self.scale_range = (float(lo_hi[0]), float(lo_hi[1]))
        if self.folds >= 2 and not 0 <= self.fold < self.folds:
            raise ConfigError(f"fold must be in 0..{self.folds - 1} for folds={self.folds}, got {self.fold}")
        if self.time_budget is not None and self.time_budget < 0:
            raise ConfigError(f"time_budget must be >= 0 seconds (0: no limit), got {self.time_budget}")
        return self


def _check_options(name: str, options: Dict[str, Any], module: str, target: str, exclude=()) -> None:
    """Raise ConfigError if ``options`` has keys that ``module.target`` does not take."""
    if not options:
        return
    import importlib
    import inspect

    fn = getattr(importlib.import_module(module), target)
    params = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    valid = sorted(k for k in params if k not in exclude and k != "self")
    unknown = sorted(k for k in options if k not in valid)
    if unknown:
        raise ConfigError(f"{name}: unknown option(s) {unknown}; {target} takes {', '.join(valid)}")
