"""One optimisation step: (micro-batched) forward under autocast, the loss
(:class:`~fwi_core.train.losses.TrainLoss`, from outside), scaled backward (GradScaler),
gradient clipping, optimizer and per-step schedule, EMA update.

Gradient accumulation splits the batch into ``accum`` micro-batches (DDP gradients sync on
the last one only). On out-of-memory the micro-batch is halved (``accum`` doubled, the
effective batch unchanged) and the step retried; under DDP the ranks agree on an
out-of-memory in a forward pass, so all of them retry together.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Optional

import torch

from ..errors import TrainError
from .config import TrainConfig
from .distributed import DistInfo, any_rank
from .losses import Batch, TrainLoss
from .model import TrainedModel
from .optim import autocast, build_optimizer, build_scheduler, make_scaler, resolve_amp, schedule_of
from .state import RunState

log = logging.getLogger("fwi_core.train")

OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


class _AgreedOOM(RuntimeError):
    """Some DDP rank ran out of memory in a forward pass; every rank raises this together."""


class Stepper:
    """The optimizer, schedule, GradScaler and AMP mode of a run, and its step."""

    def __init__(self, cfg: TrainConfig, dist: DistInfo, model: TrainedModel, loss: TrainLoss,
                 state: RunState, total_steps: int, steps_per_epoch: int):
        self.cfg, self.dist, self.model, self.loss, self.state = cfg, dist, model, loss, state
        self.device = dist.device
        self.amp = resolve_amp(cfg.amp, self.device)
        self.scaler = make_scaler(self.amp, self.device)
        self.optimizer = build_optimizer([p for p in model.raw.parameters() if p.requires_grad], cfg.optimizer,
                                         cfg.lr, cfg.weight_decay)
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule, total_steps, steps_per_epoch,
                                         cfg.warmup_steps, cfg.min_lr, cfg.restart_epochs, cfg.restart_cycles)
        self.schedule = schedule_of(self.scheduler)

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def set_lr(self, step: int) -> None:
        """Set every parameter group's rate to the schedule's factor at ``step``."""
        for g, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            g["lr"] = base * self.schedule(step)

    def train_batch(self, batch: Batch) -> torch.Tensor:
        """One optimizer step on ``batch``; returns its (detached) loss. On out-of-memory,
        halve the micro-batch (doubling the accumulation, so the effective batch is
        unchanged) and retry. Under DDP this works for a forward pass that runs out of
        memory on any rank (the ranks agree); running out of memory in the backward pass
        under DDP raises a TrainError that says what to set."""
        state = self.state
        while True:
            try:
                return self._forward_backward(batch)
            except (OOM, _AgreedOOM) as exc:
                agreed = isinstance(exc, _AgreedOOM)
                message = str(exc).splitlines()[0] if str(exc) else "out of memory"
            # outside the except block, so the traceback (and the activations it holds) is freed
            self.optimizer.zero_grad(set_to_none=True)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            micro = -(-len(batch) // state.accum)
            if self.dist.enabled and not agreed:
                raise TrainError(
                    f"{message} in the backward pass under DDP (micro-batch {micro}, rank {self.dist.rank}): "
                    f"restart with grad_accum={2 * state.accum} (--grad-accum {2 * state.accum}) or a smaller "
                    "batch_size, and --resume to go on from the last checkpoint")
            if micro <= 1:
                raise TrainError(f"{message} with a micro-batch of 1: use a smaller model, "
                                 "amp=bf16/fp16, or a larger GPU")
            state.accum *= 2
            new_micro = -(-len(batch) // state.accum)
            state.oom_events.append({"kind": "train", "step": state.step, "micro_batch": new_micro,
                                     "accum": state.accum})
            log.warning("out of memory at step %d: micro-batch %d -> %d, accumulating %d micro-batches "
                        "per step (same effective batch)", state.step, micro, new_micro, state.accum)

    def _forward_backward(self, batch: Batch) -> torch.Tensor:
        n = len(batch)
        self.loss.pde_values.clear()      # a retried step logs its own terms only
        parts = batch.split(self.state.accum)
        total = torch.zeros((), device=batch.x.device)
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            sync = self.model.wrapped.no_sync() if (self.dist.enabled and not last) else contextlib.nullcontext()
            with sync:
                pred = self._forward(part.x, part.family_idx)
                loss = self.loss(pred, part, self.state.step)
                loss = loss * (part.x.shape[0] / n)
                self.scaler.scale(loss).backward()
            total += loss.detach()
        if self.cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.raw.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.model.ema is not None:
            self.model.ema.update_parameters(self.model.raw)
        return total

    def _forward(self, xc: torch.Tensor, fam_idx: Optional[torch.Tensor]) -> torch.Tensor:
        """Forward pass under autocast. Under DDP the ranks agree on out-of-memory: a rank
        that runs out of memory in its forward pass tells the others (one all-reduce of a
        flag per micro-batch), and every rank raises :class:`_AgreedOOM` together, so all
        of them halve the micro-batch in step (no rank is left waiting in a collective)."""
        kwargs = {"family_idx": fam_idx} if fam_idx is not None else {}
        failed = False
        pred = None
        try:
            with autocast(self.amp, self.device):
                pred = self.model.wrapped(xc, **kwargs)
        except OOM:
            if not self.dist.enabled:
                raise
            failed = True
        if self.dist.enabled and any_rank(failed, self.dist):
            pred = None
            # the ranks whose forward pass succeeded expect its backward: reset DDP's reducer
            # on every rank ("forward can run despite previous backward not succeeding")
            reducer = getattr(self.model.wrapped, "reducer", None)
            if reducer is not None and hasattr(reducer, "_reset_state"):
                reducer._reset_state()
            raise _AgreedOOM(f"out of memory in a forward pass on {'this' if failed else 'another'} rank")
        return pred
