"""Type checks of the kernels' parameters cells.

A kernel's parameters come from its ``parameters`` cell, from papermill or from a person
editing the notebook on Kaggle; a value of the wrong type (``batch_size = "16"``,
``resume = "no"``) would otherwise fail hours later deep inside torch, or be read as
something else (a non-empty string is true). Each kernel calls
``check_parameters("<kernel>", globals())`` right after its imports; ranges and names are
checked by the functions the values go to (``TrainConfig.validate``, the planner, ...).

    check_parameters("train", {"batch_size": "16", ...})
    # ParameterError: train kernel parameter batch_size: expected an integer, got '16' (str)
"""
from __future__ import annotations

import math
import numbers
import os
from typing import Any, Dict, Mapping, Tuple

from .errors import ParameterError

__all__ = ["ParameterError", "KERNEL_PARAMETERS", "check_parameters", "check_value", "int_at_least"]


# kinds of values
INT, FLOAT, BOOL, STR, PATH, LIST, DICT, PAIR, NONE = "int", "float", "bool", "str", "path", "list", "dict", "pair", \
    "none"
_DESCRIBE = {INT: "an integer", FLOAT: "a number", BOOL: "True or False", STR: "a string", PATH: "a path string",
             LIST: "a list", DICT: "a dict", PAIR: "two numbers (low, high)", NONE: "None"}

#: Every parameter of each kernel's parameters cell and the kinds of value it takes
#: (a test keeps these in step with ``kernels/*.py``).
KERNEL_PARAMETERS: Dict[str, Dict[str, Tuple[str, ...]]] = {
    "train": {
        "preset": (STR, NONE), "data_root": (PATH, NONE), "output_dir": (PATH,), "model_name": (STR, NONE),
        "model_kwargs": (DICT,), "epochs": (INT, NONE), "batch_size": (INT, NONE), "lr": (FLOAT, NONE),
        "schedule": (STR, NONE), "restart_epochs": (INT, NONE), "restart_cycles": (INT, NONE),
        "ema_decay": (FLOAT, NONE), "amp": (STR, NONE), "folds": (INT, NONE), "fold": (INT, NONE),
        "time_budget": (FLOAT, NONE), "seed": (INT, NONE), "max_train_samples": (INT, NONE),
        "max_val_samples": (INT, NONE), "flip_prob": (FLOAT, NONE), "scale_prob": (FLOAT, NONE),
        "scale_range": (PAIR, NONE), "noise_prob": (FLOAT, NONE), "noise_std": (FLOAT, NONE),
        "pde_weight": (FLOAT, NONE), "pde_every": (INT, NONE), "pde_samples": (INT, NONE),
        "sim_fraction": (FLOAT, NONE), "sim_kwargs": (DICT,), "backbone_checkpoint": (PATH, NONE),
        "pseudo_dir": (PATH, NONE), "distill_teacher": (PATH, NONE), "num_workers": (INT, NONE), "ensemble_runs": (LIST,), "show_samples": (INT,),
    },
    "infer": {
        "data_root": (PATH, NONE), "checkpoints": (LIST,), "checkpoint_dirs": (LIST,), "checkpoint_kind": (STR,),
        "ensemble_config": (PATH, NONE), "output_dir": (PATH,), "time_budget": (FLOAT, NONE), "stages": (LIST,), "refine_iters": (LIST,),
        "batch_size": (INT,), "flip_tta": (BOOL,), "use_crf": (BOOL,), "mc_passes": (INT,), "resume": (BOOL,),
        "strict": (BOOL,), "limit": (INT, NONE), "num_workers": (INT,), "show_samples": (INT,),
        "prior_submission": (PATH, NONE),
    },
}


def _is(kind: str, v: Any) -> bool:
    if kind == NONE:
        return v is None
    if kind == BOOL:
        return isinstance(v, bool) or type(v).__name__ == "bool_"
    if isinstance(v, bool):
        return False
    if kind == INT:
        return isinstance(v, numbers.Integral)
    if kind == FLOAT:
        return isinstance(v, numbers.Real) and math.isfinite(float(v))
    if kind == STR:
        return isinstance(v, str)
    if kind == PATH:
        return isinstance(v, (str, os.PathLike)) and str(v) != ""
    if kind == LIST:
        return isinstance(v, (list, tuple))
    if kind == DICT:
        return isinstance(v, Mapping)
    if kind == PAIR:
        return isinstance(v, (list, tuple)) and len(v) == 2 and all(_is(FLOAT, x) for x in v)
    raise ValueError(f"unknown parameter kind {kind!r}")


def check_value(where: str, name: str, value: Any, kinds: Tuple[str, ...]) -> None:
    """Raise :class:`ParameterError` unless ``value`` is of one of ``kinds``."""
    if not any(_is(k, value) for k in kinds):
        want = " or ".join(_DESCRIBE[k] for k in kinds)
        raise ParameterError(f"{where} parameter {name}: expected {want}, got {value!r} ({type(value).__name__})")


def check_parameters(kernel: str, values: Mapping[str, Any]) -> None:
    """Check the types of ``kernel``'s parameters in ``values`` (the kernel's globals).

    Raises:
        ParameterError: naming the first parameter of the wrong type and what it takes.
    """
    spec = KERNEL_PARAMETERS[kernel]
    for name, kinds in spec.items():
        if name in values:
            check_value(f"{kernel} kernel", name, values[name], kinds)


def int_at_least(low: int):
    """An ``argparse`` type: an integer >= ``low``, or the error
    ``argument --flag: expected an integer >= low, got 'x'``."""
    import argparse

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse
