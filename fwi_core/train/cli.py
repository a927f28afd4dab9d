"""``python -m fwi_core.train``: train one fold from the command line.

Every :class:`~fwi_core.train.TrainConfig` field is a flag (``--batch-size``,
``--model-kwargs '{"width": 0.5}'``, ``--balance-families/--no-balance-families``, ...).
``--config FILE`` reads a JSON object with the same keys; flags given on the command line
override it. The result (checkpoint paths, best MAE, stop reason) is printed as JSON.

    python -m fwi_core.train --data DIR --out runs/inv-f0 --model inversionnet --epochs 20 \\
        --batch-size 32 --amp bf16 --folds 5 --fold 0
    torchrun --nproc_per_node 2 -m fwi_core.train --config cfg.json     # DDP
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import typing
from pathlib import Path
from typing import List, Optional

from .config import AMP_MODES, MONITORS, OPTIMIZERS, SCHEDULES, TrainConfig
from .engine import train
from ..errors import FWIError, TrainError

_CHOICES = {"amp": AMP_MODES, "schedule": SCHEDULES, "optimizer": OPTIMIZERS, "monitor": MONITORS}
_HELP = {
    "data": "competition root (holding train_samples/); default: the platform's",
    "out": "run folder; default: <platform output>/<model>-fold<fold>",
    "model_kwargs": "model arguments as a JSON object",
    "batch_size": "global batch (split across DDP processes)",
    "time_budget": "seconds before a clean stop (default: the platform's; 0: none)",
    "resume": "checkpoint file, run folder, or 'auto' (the default when the flag is given bare)",
    "epochs": "passes over the data; 0: train until --time-budget (the schedule spans the budget)",
    "scale_range": "low and high factor of the amplitude-scaling augmentation",
    "pde_weight": "weight of the PDE-consistency term (simulate the prediction, compare with the gathers)",
    "pde_shots": "shot indices used by the PDE term (default: all)",
}


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc}): {text!r}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"width\": 0.5}}', got {text!r}")
    return value


def _optional_float(text: str) -> Optional[float]:
    return None if text.lower() in ("none", "") else float(text)


def _optional_str(text: str) -> Optional[str]:
    return None if text.lower() == "none" else text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fwi_core.train",
                                description="Train one fold of an FWI model (see fwi_core.train.TrainConfig).")
    p.add_argument("--config", help="JSON file with TrainConfig keys (flags override it)")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kw = dict(dest=f.name, default=argparse.SUPPRESS, help=_HELP.get(f.name))
        t = hints[f.name]
        if t is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif f.name in ("model_kwargs", "pde_simulate_kwargs", "sim_kwargs"):
            kw.update(type=_json_object, metavar="JSON")
        elif t is int:
            kw["type"] = int
        elif t is float:
            kw["type"] = float
        elif t == Optional[float]:
            kw["type"] = _optional_float
        elif t == Optional[str]:
            kw["type"] = _optional_str
            if f.name == "resume":
                kw.update(nargs="?", const="auto")
        elif f.name == "scale_range":
            kw.update(type=float, nargs=2, metavar=("LOW", "HIGH"))
        elif f.name == "pde_shots":
            kw.update(type=int, nargs="*", metavar="SHOT")
        if f.name in _CHOICES:
            kw["choices"] = _CHOICES[f.name]
        p.add_argument(flag, **kw)
    return p


def config_from_args(argv: Optional[List[str]] = None) -> TrainConfig:
    """Defaults, then the ``--config`` JSON file, then the flags."""
    args = vars(build_parser().parse_args(argv))
    values = {}
    cfg_file = args.pop("config", None)
    if cfg_file:
        try:
            values = json.loads(Path(cfg_file).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise TrainError(f"--config {cfg_file}: cannot read a JSON object ({exc})") from exc
        if not isinstance(values, dict):
            raise TrainError(f"--config {cfg_file}: expected a JSON object of TrainConfig keys")
    values.update(args)
    return TrainConfig.from_dict(values)


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = config_from_args(argv)
        result = train(cfg)
    except FWIError as exc:        # bad data, config, checkpoint, or a run that cannot go on
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        summary = {k: v for k, v in result.items() if k != "history"}
        print(json.dumps(summary, indent=1, default=str))
    return 0
