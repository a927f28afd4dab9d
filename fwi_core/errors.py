"""Every error a user of fwi_core can cause, under one root.

An entry point catches :class:`FWIError` and prints its message: each message says what
was wrong, where (the file, argument or parameter) and what to do. The second base of
each class keeps ``except ValueError`` / ``except RuntimeError`` callers working.

    FWIError
    ├── ParameterError            a kernel parameter of the wrong type
    ├── DataError                 the competition data is not what the layout promises
    │   ├── DataFormatError       a file that is not a readable .npy of the expected shape
    │   ├── MissingPairError      a seismic file without its velocity file (or the reverse)
    │   ├── LayoutError           no competition root, or one without the expected folders
    │   └── SubmissionError       a submission Kaggle would reject or score wrongly
    ├── UnknownModelError         a model name the registry does not know
    ├── CheckpointError           a checkpoint that cannot be read or lacks what was asked
    ├── TrainError                the training engine cannot go on
    │   └── ConfigError           a bad training configuration
    ├── EnsembleConfigError       a malformed ensemble JSON file or weights table
    ├── NativeUnavailable         the compiled simulator cannot be built or loaded here
    ├── StageError                an unknown or misconfigured inference stage
    └── InsufficientBudgetError   the time left cannot produce even one complete CSV
"""
from __future__ import annotations

import math

__all__ = ["FWIError", "ParameterError", "DataError", "DataFormatError", "MissingPairError", "LayoutError",
           "SubmissionError", "UnknownModelError", "CheckpointError", "TrainError", "ConfigError",
           "EnsembleConfigError", "NativeUnavailable", "StageError", "InsufficientBudgetError"]


class FWIError(Exception):
    """Root of every error fwi_core raises for a cause the user can fix."""


class ParameterError(FWIError, ValueError):
    """A kernel parameter of the wrong type (the message names it and what was expected)."""


class DataError(FWIError, ValueError):
    """Something in the data is not what the competition layout promises."""


class DataFormatError(DataError):
    """A file that is not a readable .npy of the expected shape/dtype/values."""


class MissingPairError(DataError):
    """A seismic file without its velocity file (or the reverse)."""


class LayoutError(DataError):
    """No competition root, or a root without the expected folders."""


class SubmissionError(DataError):
    """A submission file that Kaggle would reject or score wrongly."""


class UnknownModelError(FWIError, RuntimeError):
    """A model name that no model registered (``create_model``)."""


class CheckpointError(FWIError, RuntimeError):
    """A checkpoint that cannot be read, or lacks what was asked of it."""


class TrainError(FWIError, RuntimeError):
    """The training engine cannot go on (out of memory at batch 1, a diverged loss, ...)."""


class ConfigError(TrainError, ValueError):
    """A bad training configuration: unknown name, value out of range, missing data path."""


class EnsembleConfigError(FWIError, ValueError):
    """An ensemble JSON file (or weights table) is malformed: the message names the file
    and the field (e.g. ``ens.json: weights.FlatVel_A.cnx: negative weight -0.1``)."""


class NativeUnavailable(FWIError, RuntimeError):
    """The native (compiled C++) simulator cannot be built or loaded here: no compiler,
    a failed build, or turned off with ``FWI_NATIVE=0`` (the message says which)."""


class StageError(FWIError, ValueError):
    """An unknown inference stage name, or a stage that cannot run with what it was given."""


class InsufficientBudgetError(FWIError, RuntimeError):
    """The time left cannot cover one pass of the cheapest member over every file.

    Attributes:
        needed: seconds the pass needs (measured on its first batch, CSV included).
        available: seconds the deadline left when the pass started.
        suggested_budget: a ``--time-budget`` (seconds from the process start) that fits.
    """

    def __init__(self, stage: str, files: int, per_file: float, csv_seconds: float, available: float,
                 spent_before: float, batch_files: int):
        self.needed = per_file * files + csv_seconds
        self.available = available
        self.suggested_budget = math.ceil(spent_before + self.needed * 1.2 + 1.0)
        super().__init__(
            f"the time budget is too small: the first pass ({stage} over {files} files) needs about "
            f"{self.needed:.1f} s ({per_file:.4f} s per file measured on the first batch of {batch_files}, "
            f"plus {csv_seconds:.1f} s to write the CSV), but only {max(available, 0.0):.1f} s were left. "
            f"Give a budget of at least {self.suggested_budget} s (counted from the process start) or a "
            "cheaper first member.")
