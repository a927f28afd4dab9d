"""The time budget of a run and what follows from it: when to stop (keeping time for the
closing work), the schedule's progress in time mode (``epochs=0``: the schedule spans the
budget), and when ``cosine_restarts`` snapshots are due.

The budget is ``time_budget`` seconds from the start, or by default the platform's session
limit less the process's age (:func:`fwi_core.platform.process_age`), or none.

Every duration of the run is read from this module's clock (:meth:`Budget.now`), so one
replacement of ``budget.time`` makes the whole run's timing deterministic in tests.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Optional

import torch

from ..errors import ConfigError
from ..platform import Platform, process_age
from .config import TrainConfig
from .distributed import DistInfo, any_rank
from .state import RunState

log = logging.getLogger("fwi_core.train")

CLOSE_RESERVE = 1.0   # seconds kept for closing work besides validation and checkpoints (the curves)


def clock() -> float:
    """The run's clock (``time.perf_counter``)."""
    return time.perf_counter()


class Budget:
    """The seconds a run may take (``seconds``, None: unlimited) from ``t0``, and the
    measured costs that decide how much of it to keep for the closing work."""

    def __init__(self, cfg: TrainConfig, platform: Platform, t0: float):
        self.t0 = t0
        if cfg.time_budget is not None:     # explicit: seconds from now
            self.seconds: Optional[float] = float(cfg.time_budget) or None
        elif platform.time_budget:         # the platform's session limit, from the process start
            self.seconds = max(0.0, platform.time_budget - process_age())
            log.info("%s session: training stops in %.2f h at the latest", platform.name, self.seconds / 3600)
        else:
            self.seconds = None
        # epochs=0: train until the budget, the schedule spanning it (time mode)
        self.time_mode = cfg.epochs == 0
        self.step_time = 0.0                 # running mean of an optimizer step
        self.val_time: Optional[float] = None    # the last validation of every source
        self.save_time: Optional[float] = None   # the last checkpoint write

    def check(self) -> None:
        if self.time_mode and not self.seconds:
            raise ConfigError("epochs=0 trains until the time budget runs out: set time_budget to a number "
                              "of seconds (--time-budget S), or give epochs >= 1")

    # ------------------------------------------------------------------ clock
    @staticmethod
    def now() -> float:
        return clock()

    def elapsed(self) -> float:
        return clock() - self.t0

    def wall_time(self, before: float) -> float:
        """Wall time of the run, including ``before`` seconds of the runs it resumes."""
        return before + clock() - self.t0

    def record_step(self, start: float) -> None:
        """An optimizer step that began at ``start`` has ended (a running mean)."""
        dt = clock() - start
        self.step_time = dt if self.step_time == 0 else 0.8 * self.step_time + 0.2 * dt

    def left_text(self) -> Optional[str]:
        """The time left as HH:MM:SS (None without a budget)."""
        if self.seconds is None:
            return None
        left = max(0.0, self.seconds - (clock() - self.t0))
        return time.strftime("%H:%M:%S", time.gmtime(left))

    # ------------------------------------------------------------------ stopping
    def reserve(self, n_sources: int, val_batches: int, eval_batch: int, per_rank: int) -> float:
        """Seconds kept for one more step and the closing work: a validation of every
        weight source (``val_batches`` batches of ``eval_batch`` per rank; 0 without a
        validation set), the out-of-fold pass with one source, two checkpoint writes, the
        curves."""
        if not val_batches:
            per_source = 0.0
        elif self.val_time is not None:
            per_source = self.val_time / n_sources
        else:   # a forward pass costs about 1/3 of a training step
            per_source = val_batches * self.step_time * 0.4 * eval_batch / per_rank
        save = self.save_time if self.save_time is not None else 0.5
        return self.step_time + per_source * (n_sources + 1) + 2 * save + CLOSE_RESERVE

    def out_of_time(self, reserve: Callable[[], float], dist: DistInfo) -> bool:
        """Would one more step, then the closing work, overrun the budget (on any rank)?"""
        if self.seconds is None:
            return False
        elapsed = clock() - self.t0
        return any_rank(elapsed + reserve() > self.seconds, dist)

    # ------------------------------------------------------------------ time mode
    def advance_schedule(self, stepper, state: RunState, reserve: float, dist: DistInfo) -> None:
        """Time mode: the schedule's progress = elapsed / (budget - closing reserve),
        going on from where a resumed run stopped; never moves backwards. The same value
        on every rank (rank 0's). ``stepper``: the run's :class:`~.step.Stepper`."""
        elapsed = clock() - self.t0
        horizon = max(1e-6, self.seconds - reserve)
        p = state.progress0 + (1.0 - state.progress0) * elapsed / horizon
        if dist.enabled:
            t = torch.tensor([p], dtype=torch.float64,
                             device=dist.device if torch.distributed.get_backend() == "nccl" else "cpu")
            torch.distributed.broadcast(t, 0)
            p = float(t.item())
        stepper.schedule.progress = min(1.0, max(stepper.schedule.progress, p))
        stepper.set_lr(state.step)


class Snapshots:
    """``cosine_restarts``: the snapshot (1-based cycle) whose weights to save, if any.

    Step mode: every ``restart_epochs`` epochs a cycle ends with the epoch. Time mode: a
    cycle ends when the next step belongs to the next cycle, and the budget's end closes
    the last one.
    """

    def __init__(self, cfg: TrainConfig, time_mode: bool):
        self.on = cfg.schedule == "cosine_restarts"
        self.time_mode = time_mode
        self.restart_epochs = cfg.restart_epochs

    def before_step(self, schedule, state: RunState, save: Callable[[int], object]) -> None:
        """Time mode: when step ``state.step`` starts a new cycle, ``save`` the snapshot
        ending the previous one (its weights were trained at the cycle's minimum rate)."""
        if not (self.on and self.time_mode):
            return
        k = schedule.cycle_index(state.step)
        if k > state.cycle:
            save(state.cycle + 1)
            state.cycle = k

    def at_epoch_end(self, state: RunState) -> Optional[int]:
        """Step mode: the snapshot of the cycle ending with epoch ``state.epoch``."""
        if self.on and not self.time_mode and state.epoch % self.restart_epochs == 0:
            state.cycle = state.epoch // self.restart_epochs
            return state.cycle
        return None

    def at_stop(self, reason: Optional[str], state: RunState) -> Optional[int]:
        """Time mode: the budget's end closes the last cycle."""
        if self.on and self.time_mode and reason == "time_budget":
            return state.cycle + 1
        return None
