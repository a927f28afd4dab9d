"""Errors a user of the training engine can cause, one type per failure."""
from __future__ import annotations


class TrainError(RuntimeError):
    """Base class of the training engine's errors."""


class ConfigError(TrainError, ValueError):
    """A bad training configuration: unknown name, value out of range, missing data path."""


class CheckpointError(TrainError):
    """A checkpoint that cannot be read, or lacks what was asked of it."""
