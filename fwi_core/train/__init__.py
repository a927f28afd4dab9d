"""Training engine: AMP, EMA, schedules, early stopping, checkpoints, DDP, family folds,
platform defaults.

    from fwi_core.train import TrainConfig, train, load_model, detect_platform
    res = train(TrainConfig(data="/kaggle/input/waveform-inversion", model="inversionnet",
                            epochs=20, amp="bf16", folds=5, fold=0))
    model = load_model(res["best_checkpoint"])        # EMA or raw, whichever validated better

Command line: ``python -m fwi_core.train --help`` (also under ``torchrun``).
"""
from ..models.checkpoint import family_sources, load_checkpoint, load_model, read_metadata
from .checkpoint import CheckpointManager
from .config import AMP_MODES, MONITORS, OPTIMIZERS, SCHEDULES, TrainConfig
from .engine import summarize, train
from ..errors import CheckpointError, ConfigError, TrainError
from .losses import boundary_loss, velocity_loss
from ..platform import Platform, default_epochs, detect_platform

__all__ = ["TrainConfig", "train", "load_model", "family_sources", "detect_platform", "default_epochs", "Platform", "read_metadata",
           "load_checkpoint", "CheckpointManager", "summarize", "boundary_loss", "velocity_loss",
           "TrainError", "ConfigError", "CheckpointError", "AMP_MODES", "SCHEDULES", "OPTIMIZERS",
           "MONITORS"]
