"""Per-sample optimisers driven in lockstep: each sample of a batch has its own, and one
batched simulation serves them all.

:mod:`.refine` evaluates a batch at once (one :func:`simulate` call), but the samples are
independent problems: a shared optimiser on their summed objective gives them one step
length, so one badly scaled sample slows the others, and one failed line search ends the
run for all. Here every sample has its own optimiser, used through ``ask`` / ``tell``::

    x = opt.ask()           # the point to evaluate next (1-D float64)
    opt.tell(f, g)          # its objective and gradient
    opt.done                # finished (converged, or its line search cannot progress)

so that the caller evaluates all ``ask()`` points together and drops finished samples
from the batch.

- :class:`LBFGS`: limited-memory BFGS (two-loop recursion, ``gamma = s'y / y'y``), with a
  backtracking Armijo line search (quadratic interpolation, at most ``max_backtracks``
  trials) instead of a strong Wolfe search: the float32 simulation makes the objective
  noisy at the 1e-8 relative level near convergence, where a bracketing search spends many
  evaluations for nothing. A curvature pair is stored only when ``s'y > 0``. When a line
  search fails, the history is dropped and a steepest-descent step is tried (a
  restart); a failure on such a step ends the sample (``reason="line search"``).
- :class:`Adam`: one step per evaluation.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch

__all__ = ["LBFGS", "Adam"]


class LBFGS:
    """L-BFGS of one sample (ask/tell).

    Args:
        x0: the start (1-D float64 tensor).
        history_size: curvature pairs kept.
        c1: Armijo constant (sufficient decrease ``f(x+td) <= f(x) + c1 t g'd``).
        max_backtracks: trial steps of one line search before it counts as failed.
        tolerance_change: done once an accepted step changes ``f`` by less than this
            (relative to ``max(1, |f|)``) or moves no parameter by more than it.
    """

    def __init__(self, x0: torch.Tensor, history_size: int = 30, c1: float = 1e-4, max_backtracks: int = 6,
                 tolerance_change: float = 1e-12, first_step: float = 0.1):
        self.x = x0.detach().clone()
        self.first_step = float(first_step)
        self.history_size, self.c1, self.max_backtracks = int(history_size), float(c1), int(max_backtracks)
        self.tolerance_change = float(tolerance_change)
        self.f: Optional[float] = None
        self.g: Optional[torch.Tensor] = None
        self.s_hist: List[torch.Tensor] = []
        self.y_hist: List[torch.Tensor] = []
        self.gamma: Optional[float] = None     # the last history's scale (used after a restart)
        self.d = torch.zeros_like(self.x)
        self.t = 0.0
        self.gtd = 0.0
        self.trial = self.x
        self.backtracks = 0
        self.iterations = 0
        self.evaluations = 0
        self.restarts = 0
        self.done = False
        self.reason = ""

    def ask(self) -> torch.Tensor:
        return self.trial

    def tell(self, f: float, g: torch.Tensor) -> None:
        if self.done:
            return
        self.evaluations += 1
        f = float(f)
        if self.f is None:
            if not math.isfinite(f):
                self._finish("not finite")
                return
            self.f, self.g = f, g.detach().clone()
            self._direction()
        elif math.isfinite(f) and f <= self.f + self.c1 * self.t * self.gtd:
            self._accept(f, g.detach())
        else:
            self._backtrack(f)

    # -- internals ---------------------------------------------------------------------------
    def _finish(self, reason: str) -> None:
        self.done, self.reason, self.trial = True, reason, self.x

    def _accept(self, f: float, g: torch.Tensor) -> None:
        s, y = self.trial - self.x, g - self.g
        sy = float(s @ y)
        if sy > 1e-12 * float(s.norm()) * float(y.norm()):
            self.s_hist.append(s)
            self.y_hist.append(y)
            if len(self.s_hist) > self.history_size:
                self.s_hist.pop(0)
                self.y_hist.pop(0)
        df = self.f - f
        self.x, self.f, self.g = self.trial, f, g.clone()
        self.iterations += 1
        if df <= self.tolerance_change * max(1.0, abs(f)) or float(s.abs().max()) <= self.tolerance_change:
            self._finish("converged")
            return
        self._direction()

    def _backtrack(self, f: float) -> None:
        self.backtracks += 1
        if self.backtracks > self.max_backtracks:
            if not self.s_hist:  # already a steepest-descent step: nothing left to try
                self._finish("line search")
                return
            self._restart()
            return
        t = self.t
        denom = 2.0 * (f - self.f - self.gtd * t) if math.isfinite(f) else 0.0
        t_new = -self.gtd * t * t / denom if denom > 0 else 0.1 * t
        self.t = min(max(t_new, 0.1 * t), 0.5 * t)
        self.trial = self.x + self.t * self.d

    def _restart(self) -> None:
        self.restarts += 1
        self.s_hist.clear()
        self.y_hist.clear()
        self._direction()

    def _direction(self) -> None:
        g = self.g
        if self.s_hist:
            q = g.clone()
            alphas = []
            rhos = [1.0 / float(y @ s) for s, y in zip(self.s_hist, self.y_hist)]
            for s, y, rho in zip(reversed(self.s_hist), reversed(self.y_hist), reversed(rhos)):
                a = rho * float(s @ q)
                alphas.append(a)
                q = q - a * y
            s, y = self.s_hist[-1], self.y_hist[-1]
            self.gamma = float(s @ y) / float(y @ y)
            r = self.gamma * q
            for s, y, rho, a in zip(self.s_hist, self.y_hist, rhos, reversed(alphas)):
                b = rho * float(y @ r)
                r = r + (a - b) * s
            self.d, self.t = -r, 1.0
        elif self.gamma is not None:  # a restart: steepest descent at the last known scale
            self.d, self.t = -self.gamma * g, 1.0
        else:  # the first step: no parameter moves by more than first_step
            gmax = float(g.abs().max())
            if gmax == 0.0:
                self._finish("converged")
                return
            self.d, self.t = -g, self.first_step / gmax
        self.gtd = float(g @ self.d)
        if not self.gtd < 0:
            if self.s_hist:
                self._restart()
                return
            self._finish("converged")
            return
        self.backtracks = 0
        self.trial = self.x + self.t * self.d


class Adam:
    """Adam of one sample (ask/tell): one step per evaluation; ``done`` only when the
    objective is not finite."""

    def __init__(self, x0: torch.Tensor, lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.x = x0.detach().clone()
        self.lr, self.b1, self.b2, self.eps = float(lr), float(betas[0]), float(betas[1]), float(eps)
        self.m = torch.zeros_like(self.x)
        self.v = torch.zeros_like(self.x)
        self.iterations = 0
        self.evaluations = 0
        self.restarts = 0
        self.done = False
        self.reason = ""

    def ask(self) -> torch.Tensor:
        return self.x

    def tell(self, f: float, g: torch.Tensor) -> None:
        if self.done:
            return
        self.evaluations += 1
        if not math.isfinite(float(f)):
            self.done, self.reason = True, "not finite"
            return
        g = g.detach()
        self.iterations += 1
        k = self.iterations
        self.m = self.b1 * self.m + (1 - self.b1) * g
        self.v = self.b2 * self.v + (1 - self.b2) * g * g
        m_hat = self.m / (1 - self.b1 ** k)
        v_hat = self.v / (1 - self.b2 ** k)
        self.x = self.x - self.lr * m_hat / (v_hat.sqrt() + self.eps)
