"""Optimiser, learning-rate schedule and mixed precision for the engine.

Schedules are torch's, stepped once per optimizer step: ``cosine``
(CosineAnnealingLR), ``cosine_restarts`` (CosineAnnealingWarmRestarts, one cycle per
``restart_epochs``: the snapshot-ensemble schedule of Huang et al. 2017), ``onecycle``
(OneCycleLR, whose rising phase is the warm-up) and ``constant``; all but onecycle get a
linear warm-up over ``warmup_steps`` through SequentialLR + LinearLR.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Optional

import torch
from torch.optim import lr_scheduler as sched

from .config import AMP_MODES, OPTIMIZERS, SCHEDULES
from .errors import ConfigError

log = logging.getLogger("fwi_core.train")

WARMUP_START = 0.01   # warm-up starts at 1% of the learning rate


def build_optimizer(params, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    raise ConfigError(f"optimizer={name!r} is not one of {', '.join(OPTIMIZERS)}")


def build_scheduler(optimizer: torch.optim.Optimizer, name: str, total_steps: int,
                    steps_per_epoch: int, warmup_steps: int = 0, min_lr: float = 0.0,
                    restart_epochs: int = 1) -> sched.LRScheduler:
    """A per-step schedule over ``total_steps`` optimizer steps (see the module docstring)."""
    total_steps = max(1, int(total_steps))
    warmup = min(int(warmup_steps), total_steps - 1)
    if name == "onecycle":
        max_lr = [g["lr"] for g in optimizer.param_groups]
        pct = (warmup + 1) / total_steps if warmup else 0.3   # peak at step `warmup`, as LinearLR
        return sched.OneCycleLR(optimizer, max_lr=max_lr, total_steps=total_steps,
                                pct_start=min(pct, 1.0), anneal_strategy="cos",
                                cycle_momentum=False)
    if name == "cosine":
        main = sched.CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup), eta_min=min_lr)
    elif name == "cosine_restarts":
        main = sched.CosineAnnealingWarmRestarts(optimizer, T_0=max(1, restart_epochs * steps_per_epoch),
                                                 eta_min=min_lr)
    elif name == "constant":
        main = sched.ConstantLR(optimizer, factor=1.0, total_iters=0)
    else:
        raise ConfigError(f"schedule={name!r} is not one of {', '.join(SCHEDULES)}")
    if not warmup:
        return main
    ramp = sched.LinearLR(optimizer, start_factor=WARMUP_START, end_factor=1.0, total_iters=warmup)
    return sched.SequentialLR(optimizer, [ramp, main], milestones=[warmup])


def _autocast_works(device_type: str, dtype: torch.dtype) -> bool:
    """Whether autocast to ``dtype`` runs a matmul on this device type."""
    try:
        if device_type == "cuda" and dtype == torch.bfloat16 and \
                not torch.cuda.is_bf16_supported(including_emulation=False):
            return False
        a = torch.ones(2, 2, device=device_type)
        with torch.autocast(device_type, dtype=dtype):
            return (a @ a).dtype == dtype
    except (RuntimeError, TypeError, ValueError, AssertionError):
        return False


def resolve_amp(amp: str, device: torch.device) -> str:
    """The AMP mode that will actually run on ``device``: ``amp`` if autocast supports
    it there, else the next best (fp16 -> bf16 -> off, bf16 -> fp16 on GPUs without
    bfloat16 such as the T4 -> off), with a logged warning."""
    if amp not in AMP_MODES:
        raise ConfigError(f"amp={amp!r} is not one of {', '.join(AMP_MODES)}")
    if amp == "off":
        return amp
    order = {"fp16": ["fp16", "bf16"], "bf16": ["bf16", "fp16" if device.type == "cuda" else "off"]}[amp]
    for mode in order:
        if mode == "off":
            break
        if _autocast_works(device.type, amp_dtype(mode)):
            if mode != amp:
                log.warning("amp=%s is not supported on %s; using %s instead", amp, device.type, mode)
            return mode
    log.warning("amp=%s is not supported on %s; mixed precision is off", amp, device.type)
    return "off"


def amp_dtype(mode: str) -> Optional[torch.dtype]:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[mode]


def autocast(mode: str, device: torch.device):
    """The autocast context for a resolved mode (a null context for "off")."""
    if mode == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype(mode))


def make_scaler(mode: str, device: torch.device) -> torch.amp.GradScaler:
    """A GradScaler, enabled for fp16 only (bf16 has float32's exponent range)."""
    return torch.amp.GradScaler(device.type, enabled=(mode == "fp16"))
