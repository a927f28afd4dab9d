"""``python -m fwi_core.train``: train one fold from the command line.

Every :class:`~fwi_core.train.TrainConfig` field is a flag (``--batch-size``,
``--model-kwargs '{"width": 0.5}'``, ``--balance-families/--no-balance-families``, ...);
``--help`` shows each default and the presets that change it. The values come from, in
order (later wins): the defaults, the preset (``--preset NAME``; default ``auto``: the
platform's, see :mod:`fwi_core.train.presets`), a ``--config FILE`` JSON object, the flags.

Resuming: ``--out runs/X --resume`` (or ``--resume runs/X``) restores the run's own
``config.json`` instead of the defaults and the preset; flags given with it override it
and are listed; ``--max-steps`` is not restored (it stops one invocation); a different
model is refused. The result (checkpoint paths, best MAE, stop reason) is printed as JSON.

    python -m fwi_core.train --data DIR --out runs/inv-f0 --preset kaggle_t4 --folds 5 --fold 0
    python -m fwi_core.train --out runs/inv-f0 --resume --epochs 30     # resume, longer
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
from typing import Any, Dict, List, Optional, Tuple

from ..errors import ConfigError, FWIError, TrainError
from .config import AMP_MODES, MONITORS, OPTIMIZERS, SCHEDULES, TrainConfig
from .engine import train
from .presets import AUTO, PRESETS, describe_presets

log = logging.getLogger("fwi_core.train")

_CHOICES = {"amp": AMP_MODES, "schedule": SCHEDULES, "optimizer": OPTIMIZERS, "monitor": MONITORS,
            "preset": (AUTO, *PRESETS)}
#: Settings a resumed run does not take from its config.json: they belong to one invocation.
NOT_RESTORED = ("resume", "max_steps")
#: Settings that decide the architecture: a resumed run cannot change them (other
#: ``model_kwargs`` are refused by the engine when the saved weights do not fit them).
ARCHITECTURE = ("model", "backbone_checkpoint")
_HELP = {
    "preset": "recipe of defaults (auto: kaggle_t4 on Kaggle, gpu with CUDA, cpu otherwise)",
    "data": "competition root (holding train_samples/); None: the platform's",
    "out": "run folder; None: <platform output>/<model>-fold<fold>",
    "model": "a registered model (fwi_core.models.list_models())",
    "model_kwargs": "model arguments as a JSON object",
    "batch_size": "global batch (split across DDP processes)",
    "lr": "peak learning rate",
    "amp": "mixed precision (fp16 on a T4)",
    "ema_decay": "EMA of the weights (0: off)",
    "time_budget": "seconds before a clean stop (None: the platform's; 0: none)",
    "resume": "checkpoint file, run folder, or 'auto' (the default when the flag is given bare)",
    "epochs": "passes over the data; 0: train until --time-budget (the schedule spans the budget)",
    "scale_range": "low and high factor of the amplitude-scaling augmentation",
    "flip_prob": "probability of the horizontal flip per sample",
    "pde_weight": "weight of the PDE-consistency term (simulate the prediction, compare with the gathers)",
    "pde_every": "the PDE term every k-th optimizer step",
    "pde_samples": "the PDE term on the first n samples of a batch (0: all)",
    "pde_shots": "shot indices used by the PDE term (default: all)",
    "sim_fraction": "fraction of each epoch's samples freshly simulated",
    "sim_kwargs": "SimulatedDataset options as a JSON object",
    "pseudo": "a pseudo-label folder (python -m tools.pseudo_label --out DIR) whose samples join training",
    "max_steps": "stop (resumably) after this many optimizer steps (0: no limit; not restored on resume)",
    "log_every": "steps between loss/lr log lines (the first steps are logged too)",
    "rewarm_fraction": "resuming an annealed run longer: warm back up over this fraction of the new steps",
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


def _show(value: Any) -> str:
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(list(value) if isinstance(value, tuple) else value, separators=(",", ":"))
    return str(value)


def default_help(name: str, default: Any) -> str:
    """``(default: X; smoke: Y, kaggle_t4: Z)``: the default and the presets that change it."""
    others = [f"{p}: {_show(v[name])}" for p, v in PRESETS.items() if name in v and v[name] != default]
    text = f"default: {_show(default)}"
    return f"({text}; {', '.join(others)})" if others else f"({text})"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fwi_core.train", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train one fold of an FWI model (see fwi_core.train.TrainConfig). Values come from the "
                    "defaults, then the preset, then --config, then the flags; --out RUN --resume restores "
                    "the run's config.json instead.",
        epilog="presets (fwi_core/train/presets.py):\n" + describe_presets())
    p.add_argument("--config", help="JSON file with TrainConfig keys (flags override it)")
    hints = typing.get_type_hints(TrainConfig)
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = AUTO if f.name == "preset" else getattr(defaults, f.name)
        text = " ".join(x for x in (_HELP.get(f.name), default_help(f.name, default)) if x)
        kw = dict(dest=f.name, default=argparse.SUPPRESS, help=text.replace("%", "%%"))
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


def _read_json(path: Path, what: str) -> Dict[str, Any]:
    try:
        values = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise TrainError(f"{what} {path}: cannot read a JSON object ({exc})") from exc
    if not isinstance(values, dict):
        raise TrainError(f"{what} {path}: expected a JSON object of TrainConfig keys")
    return values


def _run_folder(resume: str, given: Dict[str, Any]) -> Optional[Path]:
    """The run folder a ``--resume`` continues: ``--out`` for "auto" (None without it:
    the engine's default folder, whose config is not restored), else the folder (or the
    checkpoint's folder) it names."""
    if str(resume).lower() == "auto":
        return Path(given["out"]) if given.get("out") else None
    p = Path(resume)
    return p if p.is_dir() else p.parent


def resolve_config(argv: Optional[List[str]] = None) -> Tuple[TrainConfig, Dict[str, Any]]:
    """The config the command line asks for, and what it did: ``{"restored": the run
    folder whose config.json was restored, or None, "changed": {key: (old, new)} the
    flags changed in it}``."""
    args = vars(build_parser().parse_args(argv))
    cfg_file = args.pop("config", None)
    given = dict(_read_json(Path(cfg_file), "--config")) if cfg_file else {}
    given.update(args)
    report: Dict[str, Any] = {"restored": None, "changed": {}}
    resume = given.get("resume")
    run = _run_folder(resume, given) if resume else None
    saved = run / "config.json" if run is not None else None
    if saved is None or not saved.is_file():
        given.setdefault("preset", AUTO)
        return TrainConfig.from_dict(given), report
    if "preset" in given:
        raise ConfigError(f"--preset with --resume: {run} keeps the settings of its config.json; "
                          "change single settings with their flags")
    old = {k: v for k, v in _read_json(saved, "resume: the run's").items() if k not in NOT_RESTORED}
    base = TrainConfig.from_dict(old).to_dict()
    new = TrainConfig.from_dict({**old, **given, "out": given.get("out") or str(run)}).to_dict()
    changed = {k: (base[k], new[k]) for k in given if k not in NOT_RESTORED and k != "out" and base[k] != new[k]}
    wrong = [k for k in ARCHITECTURE if k in changed]
    if wrong:
        raise ConfigError(f"{run} was trained with " + ", ".join(f"{k}={_show(base[k])}" for k in wrong)
                          + f"; {', '.join('--' + k.replace('_', '-') for k in wrong)} "
                          f"{_show(new[wrong[0]])} cannot load its weights: train it in a new --out folder")
    report.update(restored=str(run), changed=changed)
    return TrainConfig.from_dict(new), report


def config_from_args(argv: Optional[List[str]] = None) -> TrainConfig:
    """Defaults, preset and ``--config`` file, then the flags (or, resuming, the run's
    ``config.json`` then the flags); see :func:`resolve_config`."""
    return resolve_config(argv)[0]


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg, report = resolve_config(argv)
        if report["restored"]:
            changes = ", ".join(f"{k} {_show(a)} -> {_show(b)}" for k, (a, b) in report["changed"].items())
            log.info("resuming %s with its config.json%s", report["restored"],
                     f"; changed by flags: {changes}" if changes else " unchanged")
        else:
            log.info("preset %s", cfg.preset)
        result = train(cfg)
    except FWIError as exc:        # bad data, config, checkpoint, or a run that cannot go on
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        summary = {k: v for k, v in result.items() if k != "history"}
        print(json.dumps(summary, indent=1, default=str))
    return 0
