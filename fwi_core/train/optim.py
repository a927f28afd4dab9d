"""Optimiser, learning-rate schedule and mixed precision for the engine.

Schedules (``constant``, ``cosine``, ``onecycle``, ``cosine_restarts``) are multiplicative
factors of the base learning rate written as functions of *progress*, run by torch's
``LambdaLR`` and stepped once per optimizer step. Progress is either the step count over
the run's length in steps (``epochs > 0``), or the elapsed time over the time budget
(``epochs = 0``: the schedule spans the budget, so cosine and OneCycle reach their minimum
near the deadline and the last warm-restart cycle ends on it). torch's own schedulers
count steps against a length fixed at construction, which can do neither this nor a
resume with a different length, hence :class:`LRSchedule`:

- ``cosine``: linear warm-up over ``warmup_steps`` from 1% of the rate, then a half cosine
  down to ``min_lr``, reached at the last step;
- ``onecycle``: OneCycle (Smith 2018, torch's ``OneCycleLR`` shape): cosine rise from
  1/25 of the rate to the peak at ``warmup_steps`` (30% of the run without warm-up), then
  a cosine down to 1/25/1e4 of it;
- ``cosine_restarts``: cycles of ``restart_epochs`` epochs (or, in time mode,
  ``restart_cycles`` equal slices of the budget), each a half cosine from the rate down
  to ``min_lr`` at its last step, the warm-up inside the first cycle: the snapshot saved
  at each cycle end is taken at the learning-rate minimum (Huang et al. 2017);
- ``constant``: the rate (after the optional warm-up).

Resuming with another length (more epochs, a new budget) rebases the schedule at the
current step: from the rate it has reached, it anneals over the new remainder instead of
jumping (``LRSchedule.rebase``). A run whose schedule had already annealed to its end
(a finished cosine or OneCycle run resumed longer) would stay at the minimum and learn
nothing: it is rebased with a warm-up instead, linear from the rate it reached up to the
peak over ``rewarm`` (``TrainConfig.rewarm_fraction``, default 5%) of the new remainder,
then the schedule's anneal over the rest.
"""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Optional

import torch
from torch.optim import lr_scheduler as sched

from .config import AMP_MODES, OPTIMIZERS, SCHEDULES
from ..errors import ConfigError

log = logging.getLogger("fwi_core.train")

WARMUP_START = 0.01          # warm-up starts at 1% of the learning rate
ONECYCLE_DIV = 25.0          # OneCycle starts at rate / 25 (torch's div_factor)
ONECYCLE_FINAL_DIV = 1e4     # and ends at rate / 25 / 1e4 (final_div_factor)
ONECYCLE_PCT = 0.3           # rising part without warm-up (torch's pct_start)


def build_optimizer(params, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    raise ConfigError(f"optimizer={name!r} is not one of {', '.join(OPTIMIZERS)}")


def _cos(q: float) -> float:
    """Half cosine from 1 (q = 0) to 0 (q = 1), clamped outside."""
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, q))))


class LRSchedule:
    """The learning-rate factor as a function of the step (``LambdaLR``'s ``lr_lambda``).

    Step mode (``total_steps`` > 0): step ``i`` (0-based) runs at factor ``f(i)`` with
    progress ``i / (total_steps - 1)``. Time mode (``total_steps`` = 0): the engine sets
    :attr:`progress` (elapsed / budget, in [0, 1]) before each step and the factor follows
    it; warm-up still counts steps. All state is plain attributes, so ``LambdaLR`` saves
    it in its ``state_dict`` and a resumed run continues where it stopped.

    Args:
        name: constant | cosine | onecycle | cosine_restarts.
        total_steps: the run's length in optimizer steps, or 0 for time mode.
        warmup_steps: linear warm-up steps (onecycle: the rising phase).
        min_ratio: ``min_lr / lr``, the floor of the cosine schedules.
        cycle_steps: cosine_restarts cycle length in steps (step mode).
        cycles: cosine_restarts number of cycles over the budget (time mode).
    """

    def __init__(self, name: str, total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.0,
                 cycle_steps: int = 0, cycles: int = 1):
        if name not in SCHEDULES:
            raise ConfigError(f"schedule={name!r} is not one of {', '.join(SCHEDULES)}")
        self.name = name
        self.total = max(0, int(total_steps))
        self.warmup = max(0, int(warmup_steps))
        if self.total:
            self.warmup = min(self.warmup, self.total - 1)
        self.min_ratio = float(min_ratio)
        self.cycle_steps = int(cycle_steps)
        self.cycles = max(1, int(cycles))
        if name == "cosine_restarts" and self.total and self.cycle_steps < 2:
            raise ConfigError(f"cosine_restarts: a cycle of {self.cycle_steps} optimizer step(s) cannot anneal; "
                              "raise restart_epochs or lower batch_size (2 steps per cycle at least)")
        self.progress = 0.0      # time mode: set by the engine
        self.step_offset = 0     # rebase: the step and factor a resumed run starts from
        self.base_factor: Optional[float] = None
        self.base_progress = 0.0
        self.rewarm = 0.0        # rebase after a finished anneal: warm-up share of the new remainder

    @property
    def time_mode(self) -> bool:
        return self.total == 0

    # ------------------------------------------------------------------ progress
    def _progress(self, step: int) -> float:
        if self.time_mode:
            return min(1.0, max(0.0, self.progress))
        return min(1.0, step / max(1, self.total - 1))

    def _shape(self, step: int, p: float) -> float:
        """The schedule's own factor at ``step`` / progress ``p`` (no rebase)."""
        if self.name == "onecycle":
            peak = self.warmup if self.warmup else None
            start = 1.0 / ONECYCLE_DIV
            final = start / ONECYCLE_FINAL_DIV
            if peak is not None:
                if step < peak:
                    return start + (1.0 - start) * (1.0 - _cos(step / peak))
                p_peak = peak / max(1, self.total - 1) if not self.time_mode else 0.0
            else:
                p_peak = ONECYCLE_PCT
                if p < p_peak:
                    return start + (1.0 - start) * (1.0 - _cos(p / p_peak))
            return final + (1.0 - final) * _cos((p - p_peak) / max(1e-12, 1.0 - p_peak))
        if step < self.warmup:
            return WARMUP_START + (1.0 - WARMUP_START) * step / self.warmup
        if self.name == "constant":
            return 1.0
        lo = self.min_ratio
        if self.name == "cosine":
            if self.time_mode:
                q = p
            else:
                q = (step - self.warmup) / max(1, self.total - 1 - self.warmup)
            return lo + (1.0 - lo) * _cos(q)
        # cosine_restarts: position within the cycle; the first cycle holds the warm-up
        if self.time_mode:
            k = min(self.cycles - 1, int(p * self.cycles))
            q = p * self.cycles - k
            if k == 0 and self.warmup:
                q = max(0.0, q)   # warm-up is step-based, then the cosine from where q has got to
            return lo + (1.0 - lo) * _cos(q)
        k, i = divmod(step, self.cycle_steps)
        if k == 0:
            q = (i - self.warmup) / max(1, self.cycle_steps - 1 - self.warmup)
        else:
            q = i / (self.cycle_steps - 1)
        return lo + (1.0 - lo) * _cos(q)

    def cycle_index(self, step: int) -> int:
        """cosine_restarts: the 0-based cycle that optimizer step ``step`` belongs to."""
        if self.time_mode:
            return min(self.cycles - 1, int(self._progress(step) * self.cycles))
        return step // max(1, self.cycle_steps)

    def __call__(self, step: int) -> float:
        p = self._progress(step)
        if self.base_factor is None or self.name in ("constant", "cosine_restarts"):
            return self._shape(step, p)
        # rebased (resumed with another length): from the factor reached at the resume
        # point, anneal along the schedule's remaining shape over the new remainder
        if self.time_mode:
            q = (p - self.base_progress) / max(1e-12, 1.0 - self.base_progress)
        else:
            q = (step - self.step_offset) / max(1, self.total - 1 - self.step_offset)
        lo = self.min_ratio if self.name == "cosine" else 1.0 / ONECYCLE_DIV / ONECYCLE_FINAL_DIV
        if self.rewarm > 0:           # back up from where the finished run stopped to the peak, then anneal
            if not self.time_mode:    # in steps: the first new step already climbs, the w-th is at the peak
                i, left = step - self.step_offset, self.total - self.step_offset
                w = max(1, round(self.rewarm * left))
                if i < w:
                    return self.base_factor + (1.0 - self.base_factor) * (i + 1) / w
                return lo + (1.0 - lo) * _cos((i - w + 1) / max(1, left - w))
            if q < self.rewarm:
                return self.base_factor + (1.0 - self.base_factor) * q / self.rewarm
            return lo + (1.0 - lo) * _cos((q - self.rewarm) / (1.0 - self.rewarm))
        return lo + (self.base_factor - lo) * _cos(q)

    def finished(self, progress: float) -> bool:
        """Had the schedule annealed to its end at ``progress``? (constant and cyclic
        schedules never finish: their rate comes back by itself)"""
        return self.name not in ("constant", "cosine_restarts") and progress >= 1.0 - 1e-6

    def rebase(self, step: int, total_steps: int, factor: float, progress: float, rewarm: float = 0.0) -> None:
        """Continue from ``step``, where the factor was ``factor`` and the progress
        ``progress``, with a new length ``total_steps`` (0: time mode, in which the
        engine's progress goes on from ``progress`` to 1 over the new budget).
        ``rewarm`` > 0 (a finished anneal resumed longer): warm up from ``factor`` to 1
        over that share of the new remainder, then anneal over the rest; in time mode
        the new remainder is the whole new budget (``progress`` should then be 0)."""
        new_total = max(0, int(total_steps))
        if self.name == "cosine_restarts" and new_total and self.cycle_steps < 2:
            raise ConfigError("cosine_restarts: a cycle needs 2 optimizer steps at least")
        rising = step < self.warmup or (self.name == "onecycle" and (
            step <= self.warmup if self.warmup else progress < ONECYCLE_PCT))
        self.total = new_total
        if self.total:
            self.warmup = min(self.warmup, self.total - 1)
        if rising or self.name in ("constant", "cosine_restarts"):
            # nothing annealed yet, or fixed-length cycles: the schedule itself goes on
            return
        self.step_offset = int(step)
        self.base_factor = float(factor)
        self.base_progress = float(progress)
        self.rewarm = float(rewarm)


def build_scheduler(optimizer: torch.optim.Optimizer, name: str, total_steps: int,
                    steps_per_epoch: int, warmup_steps: int = 0, min_lr: float = 0.0,
                    restart_epochs: int = 1, restart_cycles: int = 1) -> sched.LambdaLR:
    """A per-step schedule (see the module docstring); ``total_steps = 0`` selects time
    mode, in which the caller sets ``scheduler.lr_lambdas[0].progress`` before each step."""
    base = optimizer.param_groups[0]["lr"]
    fn = LRSchedule(name, total_steps, warmup_steps, min_lr / base if base > 0 else 0.0,
                    cycle_steps=restart_epochs * steps_per_epoch, cycles=restart_cycles)
    return sched.LambdaLR(optimizer, fn)


def schedule_of(scheduler: sched.LambdaLR) -> LRSchedule:
    """The :class:`LRSchedule` behind a scheduler made by :func:`build_scheduler`."""
    return scheduler.lr_lambdas[0]


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
