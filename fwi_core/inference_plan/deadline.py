"""The deadline of a budgeted run, counted from the process start.

    Deadline.from_budget(3 * 3600)        # three hours after this process started
    Deadline.platform_default()           # the platform's session limit minus a safety margin
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

from .. import platform

__all__ = ["Deadline", "DEFAULT_SAFETY_MARGIN"]

#: Seconds kept free before the platform's session limit by the default deadline.
DEFAULT_SAFETY_MARGIN = 300.0


@dataclass
class Deadline:
    """An absolute deadline on ``clock`` (None: no deadline).

    Attributes:
        at: the deadline, in ``clock()`` seconds, or None.
        clock: the time source (``time.monotonic``; tests pass a fake clock).
        origin: ``clock()`` value of the process start (budgets count from there).
    """

    at: Optional[float]
    clock: Callable[[], float] = time.monotonic
    origin: Optional[float] = None

    def remaining(self) -> float:
        """Seconds left (inf without a deadline)."""
        return math.inf if self.at is None else self.at - self.clock()

    @classmethod
    def from_budget(cls, seconds: Optional[float], clock: Callable[[], float] = time.monotonic,
                    age: Optional[float] = None) -> "Deadline":
        """``seconds`` after the process start (``age``: seconds since then; default the
        real process age from :func:`fwi_core.platform.process_age`)."""
        now = clock()
        origin = now - (platform.process_age() if age is None else float(age))
        if seconds is None:
            return cls(None, clock, origin)
        if not math.isfinite(float(seconds)) or seconds <= 0:
            raise ValueError(f"time budget must be a positive number of seconds, got {seconds!r}")
        return cls(origin + float(seconds), clock, origin)

    @classmethod
    def platform_default(cls, safety_margin: float = DEFAULT_SAFETY_MARGIN,
                         clock: Callable[[], float] = time.monotonic, age: Optional[float] = None) -> "Deadline":
        """The platform's session limit (:func:`fwi_core.platform.detect_platform`: 11.5 h
        on Kaggle, 11 h on Colab, none locally) minus ``safety_margin`` seconds, from
        the process start."""
        limit = platform.detect_platform().time_budget
        return cls.from_budget(None if limit is None else max(1.0, limit - safety_margin), clock, age)

    def spent(self) -> float:
        return 0.0 if self.origin is None else self.clock() - self.origin
