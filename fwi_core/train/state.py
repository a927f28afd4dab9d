"""The shared state of one training run: where it is and what it has seen so far.

Every collaborator of the loop (:mod:`.step`, :mod:`.validate`, :mod:`.checkpoint`,
:mod:`.budget`) reads and updates the one :class:`RunState` the engine holds; resumable
checkpoints carry all of it (:mod:`.checkpoint`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch


@dataclass
class RunState:
    """Position, early-stopping bookkeeping and history of a run."""

    loss_sum: torch.Tensor                 # running train loss of the epoch so far (on the device)
    accum: int                             # micro-batches per optimizer step (doubled on out-of-memory)
    epoch: int = 0
    batch: int = 0                         # position within the epoch
    step: int = 0                          # optimizer steps taken
    loss_count: int = 0
    best_value: float = math.inf           # the monitored metric, as a quantity to minimise
    best_step: int = -1
    bad_evals: int = 0
    history: List[Dict[str, Any]] = field(default_factory=list)
    family_best: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    last_metrics: Optional[Dict[str, Any]] = None
    best_metrics: Optional[Dict[str, Any]] = None
    oom_events: List[Dict[str, int]] = field(default_factory=list)
    wall_before: float = 0.0               # wall time of the runs this one resumes
    stopped_reason: Optional[str] = None
    improved: bool = False                 # the last evaluation improved on the best
    progress0: float = 0.0                 # time mode: schedule progress when this process started
    cycle: int = 0                         # cosine_restarts: the cycle of the last optimizer step
    pde_sum: float = 0.0                   # the PDE term's values this epoch (unweighted), for the log
    pde_count: int = 0

    @classmethod
    def start(cls, accum: int, device: torch.device) -> "RunState":
        return cls(loss_sum=torch.zeros((), device=device), accum=accum)
