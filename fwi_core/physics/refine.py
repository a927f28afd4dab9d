"""Test-time refinement: full-waveform inversion started from a network's prediction.

``refine(velocity, seismic)`` minimises, per sample, the normalised data misfit between
the observed gathers and ``simulate(v)`` (:func:`.misfit.misfit`, accumulated in
float64, scaled by ``cost_scale``) plus a regulariser chosen by the sample's family kind
(:mod:`.kind_routing`; the kinds' parametrisations and priors are in :mod:`.priors`):

- ``"flat"`` (FlatVel): the map is a 1-D depth profile (70 unknowns instead of 4,900),
  regularised by the smoothed total variation along depth ``sum sqrt(d^2 + eps^2)``;
- ``"tv"`` (CurveVel, FlatFault, CurveFault): the full map with the smoothed 2-D total
  variation ``sum sqrt(dx^2 + dz^2 + eps^2)`` (sharp interfaces stay sharp);
- ``"smooth"`` (Style): the full map updated by a Gaussian-blurred field ``w`` with the
  prior ``|w|^2``: a Gaussian-process (squared-exponential covariance) prior on the update.

Every sample has its own optimiser (:mod:`.batch_optim`: L-BFGS with a backtracking line
search and restarts, or Adam) and its own progress through the continuation stages; all
samples still share one :func:`simulate` call per evaluation (one per group of samples
simulated with the same shots), and a sample that has finished leaves
the batch, so a slow sample neither holds back the step length of the others nor makes
them pay for its evaluations. Flat profiles' updates are preconditioned with depth (deep
cells get weak gradients: the update is scaled by ``((z+1)/H)^(depth_power/2)``; the 2-D
kinds' default is none, :data:`~.priors.DEFAULT_DEPTH_POWER`), and the continuation
(``stages``) can fit low-passed data first and lower the regulariser along the way. The
result of each sample is its best evaluated map, kept only where the full-band data misfit
fell below ``accept_ratio`` times the start's; values are clamped to the plausible range.
``time_budget`` (wall clock, whole batch) is checked before every evaluation: none starts
that the measured evaluations (the slowest of the last three) say would overrun the budget,
time for the final misfit check (one forward) included. With ``backend`` not given, the CPU runs the native kernel
(forward and adjoint in compiled C++, :mod:`.native`) where it builds; elsewhere the torch
step is compiled when the whole refinement is long enough to pay for it.

This module is the loop: the simulation it fits (:class:`_Simulator`), the time budget
(:class:`_Budget`), each sample's state (:class:`_Sample`), one batched evaluation
(:func:`_evaluate`), the stages (:func:`_advance`) and the final check
(:func:`_final_check`); the inputs are checked in :mod:`.refine_inputs`.
"""
from __future__ import annotations

import math
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..errors import ParameterError
from ..utils import progress_bar
from .batch_optim import LBFGS, Adam
from .forward import simulate
from .kind_routing import detect_family_kind, family_kind, sample_kinds
from .misfit import misfit
from .native import available as native_available
from .priors import DEFAULT_DEPTH_POWER, DEFAULT_REG_WEIGHT, DEFAULT_TV_EPS, KINDS, Parametrisation
from .refine_inputs import (RefineInputs, Stage, check_options, continuation, per_sample_setting, prior_settings,
                            stage_iterations)
from .stencil import AUTO_COMPILE_MIN_SHOT_STEPS, DEFAULT_SOURCE_COLUMNS, compiled_step, default_source_columns

# the kinds and their defaults (from :mod:`.kind_routing` and :mod:`.priors`) stay importable here
__all__ = ["refine", "lowpass", "detect_family_kind", "family_kind", "KINDS", "DEFAULT_REG_WEIGHT", "DEFAULT_DEPTH_POWER",
           "DEFAULT_TV_EPS", "DEFAULT_ACCEPT_RATIO", "CONTINUATION_STAGES", "LAYERED_STAGES", "FIRST_EVAL_FORWARDS",
           "RefineWarning", "Stage"]

#: before any evaluation is measured, one is assumed to cost this many forwards (the
#: gradient costs about 4 compiled forwards on CPU; more when eager)
FIRST_EVAL_FORWARDS = 8.0
#: continuation stages: (low-pass cutoff in Hz or None for the full band, share of the
#: iterations and of the time budget[, factor on the regulariser weight[, floor on the TV
#: eps, km/s]]); iterations a stage leaves unused (it
#: converged) go to the next. The default fits with eps at least 10 m/s (fast early
#: progress) and, once that has converged, sharpens with the kinds' own eps on whatever
#: budget is left (FlatVel_A in BENCHMARKS.md: 55 -> 2.43 m/s when the first stage
#: converges, -> 0.57 after sharpening; a short run is the first stage alone)
CONTINUATION_STAGES: Tuple[Union[tuple, Stage], ...] = ((None, 1.0, 1.0, 1e-2), (None, 0.0))
#: the continuation with a layers stage first (opt-in: ``stages=LAYERED_STAGES``): flat
#: samples are fitted as a few layers (interface depths and layer velocities from the
#: start's piecewise-constant fit, :func:`~.priors.segment_profile`, no TV), then as free
#: profiles with a weak TV (a factor of 0.01 on the flat kind's weight); the other kinds
#: skip the layers stage. A thin high-contrast layer smeared by a blur comes back sharp
#: (tests/physics/test_refine.py); from starts with a velocity bias and several smeared
#: interfaces the default stages do better in few iterations, so it is not the default.
LAYERED_STAGES: Tuple[Union[tuple, Stage], ...] = (Stage(share=1.0, layers=True), (None, 0.0, 0.01, 1e-2),
                                                    (None, 0.0, 0.01))
#: a sample's refinement is kept where its full-band misfit fell below this share of the
#: start's, per kind (1.0: any decrease)
DEFAULT_ACCEPT_RATIO: Dict[str, float] = {"flat": 1.0, "tv": 1.0, "smooth": 1.0}


class RefineWarning(UserWarning):
    """A refinement that could not do what was asked (e.g. no iteration fitted the budget)."""


def lowpass(x: torch.Tensor, cutoff_hz: float, dt: float) -> torch.Tensor:
    """Zero-phase low-pass along the time axis (dim 2) of (B, n, nt, r) gathers: a
    4th-order Butterworth magnitude ``1/sqrt(1+(f/fc)^8)`` applied in the Fourier domain."""
    nt = x.shape[2]
    n = 2 * nt  # zero padding against wrap-around
    f = torch.fft.rfftfreq(n, d=dt).to(x.device)
    h = (1.0 / torch.sqrt(1.0 + (f / cutoff_hz) ** 8)).to(x.dtype)
    spec = torch.fft.rfft(x, n=n, dim=2) * h[None, None, :, None]
    return torch.fft.irfft(spec, n=n, dim=2)[:, :, :nt]


class _OutOfTime(Exception):
    """Raised before an evaluation that would overrun the budget."""


class _Simulator:
    """The simulation refine fits: per sample, the chosen shots of its observed gathers
    against :func:`simulate` of its clamped map with the matching source columns."""

    def __init__(self, obs: torch.Tensor, kinds: List[str], shots: Optional[Sequence[int]], max_iter: int,
                 clamp: Tuple[float, float], simulate_kwargs: dict):
        kw = dict(simulate_kwargs)
        b, n_src, nt, w = obs.shape
        self.cols = list(kw.pop("source_columns", None) or
                         (DEFAULT_SOURCE_COLUMNS if (w == 70 and n_src == 5) else default_source_columns(n_src, w)))
        if len(self.cols) != n_src:
            raise ParameterError(f"refine: source_columns has {len(self.cols)} entries for gathers of {n_src} shots")
        if shots is not None:
            shots = tuple(int(s) for s in shots)
            if not shots or any(not 0 <= s < n_src for s in shots):
                raise ParameterError(f"refine: shots {list(shots)} must be a non-empty subset of 0..{n_src - 1}")
        # a laterally flat medium makes the shots translations of one another: the two end
        # shots carry the information of all, with the longest offsets
        end_shots = (0, n_src - 1) if n_src > 2 else tuple(range(n_src))
        self.shots = [shots if shots is not None else end_shots if k == "flat" else tuple(range(n_src))
                      for k in kinds]
        self.obs = obs
        self.nt = nt
        self.dt = float(kw.get("dt", 1e-3))
        if kw.get("backend", "auto") == "auto":
            if obs.device.type == "cpu" and native_available():
                kw["backend"] = "native"  # forward and adjoint in the compiled C++ kernel
            else:
                # the whole refinement, not one call, decides whether compiling pays off
                work = sum(len(s) for s in self.shots) * nt * max(1, max_iter)
                kw["backend"] = ("compile" if work >= 4 * AUTO_COMPILE_MIN_SHOT_STEPS
                                 and compiled_step() is not None else "eager")
        self.kwargs = kw
        self.lo, self.hi = float(clamp[0]), float(clamp[1])
        self._targets: Dict[tuple, torch.Tensor] = {}

    def clamp(self, v: torch.Tensor) -> torch.Tensor:
        return v.clamp(self.lo, self.hi)

    def observed(self, i: int, cutoff: Optional[float] = None) -> torch.Tensor:
        """Sample ``i``'s observed gathers on its shots (1, n, nt, W), low-passed to ``cutoff``."""
        key = (i, cutoff)
        if key not in self._targets:
            o = self.obs[i:i + 1, list(self.shots[i])]
            self._targets[key] = o if cutoff is None else lowpass(o.double(), cutoff, self.dt)
        return self._targets[key]

    def groups(self, ids: Sequence[int]) -> Dict[tuple, List[int]]:
        """Positions in ``ids`` grouped by what one simulate call can share (the shots)."""
        out: Dict[tuple, List[int]] = {}
        for p, i in enumerate(ids):
            out.setdefault(self.shots[i], []).append(p)
        return out

    def __call__(self, v: torch.Tensor, shots: tuple) -> torch.Tensor:
        return simulate(self.clamp(v).float(), nt=self.nt, source_columns=[self.cols[s] for s in shots],
                        **self.kwargs)

    def misfits(self, v: torch.Tensor) -> torch.Tensor:
        """(B,) full-band misfit of maps ``v`` (B,H,W) with the exact scheme, no gradient."""
        out = torch.empty(v.shape[0], dtype=torch.float64, device=v.device)
        with torch.no_grad():
            for shots, pos in self.groups(range(v.shape[0])).items():
                sim = self(v[pos], shots)
                out[pos] = misfit(sim, torch.cat([self.observed(i) for i in pos]))
        return out


class _Budget:
    """The wall-clock budget of one call: no evaluation starts that the measured ones say
    would overrun it, time for the final misfit check (one forward) kept."""

    def __init__(self, clock: Callable[[], float], t0: float, time_budget: Optional[float]):
        self.clock, self.t0, self.time_budget = clock, t0, time_budget
        self.t_forward = 0.0  # what a forward costs (measured on the start's misfit)
        self.eval_times: List[float] = []

    def remaining(self) -> float:
        return math.inf if self.time_budget is None else self.time_budget - (self.clock() - self.t0)

    def eval_estimate(self) -> float:
        """What the next evaluation will cost: the slowest of the last three measured
        (the first one, which may include compiling, only while it is the only one), or
        FIRST_EVAL_FORWARDS forwards before any."""
        if not self.eval_times:
            return FIRST_EVAL_FORWARDS * self.t_forward
        return max(self.eval_times[1:][-3:]) if len(self.eval_times) > 1 else self.eval_times[0]

    def check(self) -> None:
        """Raise :class:`_OutOfTime` if the next evaluation and the final check do not fit."""
        if self.remaining() < self.eval_estimate() + self.t_forward:
            raise _OutOfTime

    def stage_over(self, end_share: float) -> bool:
        """Whether the stages up to a cumulative time share ``end_share`` (0..1) are out of time."""
        return self.time_budget is not None and end_share < 1.0 and \
            self.clock() - self.t0 >= end_share * self.time_budget


class _Sample:
    """One sample's refinement: its stage, optimiser and best map in that stage."""

    def __init__(self, i: int, v0: torch.Tensor):
        self.i = i
        self.stage = -1
        self.n_iter = 0           # iterations the current stage may use
        self.opt = None
        self.best_v = v0.clone()
        self.best_obj = math.inf
        self.iterations = 0       # over all stages
        self.evaluations = 0
        self.restarts = 0
        self.finished = False
        self.reason = ""


class _Run:
    """What every sample shares: the parametrisation, simulation, budget, stages and the
    per-sample prior settings."""

    def __init__(self, model: Parametrisation, sim: _Simulator, budget: _Budget, stages: List[Stage],
                 iters: List[int], lam: torch.Tensor, eps: List[Dict[str, float]], cost_scale: float,
                 optimizer: str, history_size: int, lr: float, bar=None):
        self.model, self.sim, self.budget, self.stages, self.iters = model, sim, budget, stages, iters
        self.lam, self.eps, self.cost_scale, self.bar = lam, eps, cost_scale, bar
        self.optimizer, self.history_size, self.lr = optimizer, history_size, lr
        total = sum(st.share for st in stages)
        self.end_share = [float(x) for x in np.cumsum([st.share / total for st in stages])]
        self.end_share[-1] = 1.0

    def advance(self, s: _Sample, carry: int = 0) -> None:
        """Sample ``s`` moves to its next stage with a positive iteration count (or finishes),
        starting from its best map so far."""
        while True:
            s.stage += 1
            if s.stage >= len(self.stages):
                s.finished = True
                return
            n_iter = self.iters[s.stage] + carry
            if self.stages[s.stage].layers and self.model.kinds[s.i] != "flat":
                carry = n_iter  # a layers stage is for flat samples: the others take its iterations on
                continue
            s.n_iter, carry = n_iter, 0
            if s.n_iter > 0 and not self.budget.stage_over(self.end_share[s.stage]):
                break
        self.model.rebase(s.i, s.best_v, layers=self.stages[s.stage].layers)
        x0 = self.model.zeros(s.i)
        s.opt = LBFGS(x0, history_size=self.history_size) if self.optimizer == "lbfgs" else Adam(x0, lr=self.lr)
        s.best_obj = math.inf

    def objective(self, s: _Sample, x: torch.Tensor, v: torch.Tensor, sim: torch.Tensor) -> torch.Tensor:
        """Sample ``s``'s objective in its stage: scaled misfit plus weighted prior."""
        st = self.stages[s.stage]
        if st.cutoff is not None:
            sim = lowpass(sim.double(), st.cutoff, self.sim.dt)
        eps = {k: max(e, st.eps_floor) for k, e in self.eps[s.i].items()}
        data = self.cost_scale * misfit(sim, self.sim.observed(s.i, st.cutoff))[0]
        return data + self.lam[s.i] * st.reg_factor * self.model.regulariser(s.i, x, v, eps)

    def evaluate(self, active: List[_Sample]) -> None:
        """One batched evaluation of every active sample's ``ask()`` point: objectives and
        gradients (one simulate call per group), told to each optimiser."""
        self.budget.check()
        te = self.budget.clock()
        with torch.enable_grad():  # callers may run under no_grad (the inference planner does)
            xs = [s.opt.ask().detach().clone().requires_grad_(True) for s in active]
            vs = [self.model.velocity(s.i, x) for s, x in zip(active, xs)]
            per: List[Optional[torch.Tensor]] = [None] * len(active)
            for shots, pos in self.sim.groups([s.i for s in active]).items():
                sim = self.sim(torch.stack([vs[p] for p in pos]), shots)
                for j, p in enumerate(pos):
                    per[p] = self.objective(active[p], xs[p], vs[p], sim[j:j + 1])
            torch.stack(per).sum().backward()
        for s, x, v, f in zip(active, xs, vs, per):
            f = float(f.detach())
            if f < s.best_obj:
                s.best_obj, s.best_v = f, v.detach().clone()
            before = s.opt.iterations
            s.opt.tell(f, x.grad)
            s.iterations += s.opt.iterations - before
            s.evaluations += 1
        self.budget.eval_times.append(self.budget.clock() - te)
        if self.bar is not None:
            self.bar.update(1)
        for s in active:
            self._maybe_next_stage(s)

    def _maybe_next_stage(self, s: _Sample) -> None:
        if s.opt.done:
            s.restarts += s.opt.restarts
            s.reason = s.opt.reason
            # iterations a converged L-BFGS leaves go to the next stage
            self.advance(s, carry=max(0, s.n_iter - s.opt.iterations))
        elif s.opt.iterations >= s.n_iter or self.budget.stage_over(self.end_share[s.stage]):
            s.restarts += s.opt.restarts
            self.advance(s)


def _final_check(run: _Run, samples: List[_Sample], before: torch.Tensor, v0: torch.Tensor,
                 accept: List[float]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep a sample's refinement only where the full-band misfit fell below ``accept``
    times the start's: (maps, candidates' misfit, kept), maps clamped."""
    sim = run.sim
    cand = sim.clamp(torch.stack([s.best_v for s in samples]))
    tried = torch.tensor([s.evaluations > 0 for s in samples], device=v0.device)
    after = before.clone()
    if bool(tried.any()):
        ids = torch.nonzero(tried).flatten()
        after[ids] = sim.misfits(cand[ids])
    kept = tried & (after < before * torch.tensor(accept, dtype=torch.float64, device=v0.device))
    return torch.where(kept[:, None, None], cand, sim.clamp(v0)), after, kept


def _info(kinds: List[str], samples: List[_Sample], before: torch.Tensor, after: torch.Tensor, kept: torch.Tensor,
          elapsed: float) -> List[dict]:
    return [{"kind": kinds[i], "misfit_before": float(before[i]),
             "misfit_after": float(after[i]) if bool(kept[i]) else float(before[i]),
             "misfit_candidate": float(after[i]), "iterations": s.iterations, "evaluations": s.evaluations,
             "restarts": s.restarts, "stage": max(s.stage, 0), "stopped": s.reason or ("finished" if s.finished
                                                                                     else "budget"),
             "kept": bool(kept[i]), "time": elapsed} for i, s in enumerate(samples)]


def _warn_idle(samples: List[_Sample], max_iter: int, time_budget: Optional[float], budget: Optional[_Budget]) -> None:
    idle = [s.i for s in samples if s.iterations == 0]
    if max_iter <= 0 or not idle:
        return
    if budget is None:
        why = "time_budget=0 allows no simulation"
    else:
        need = budget.t0 + budget.t_forward * 2 + budget.eval_estimate() * 3
        why = (f"time_budget={time_budget:g} s: a forward took {budget.t_forward:.2g} s and an evaluation "
               f"{budget.eval_estimate():.2g} s (give at least about {max(need - budget.t0, 0):.3g} s, or fewer "
               "maps per call)") if time_budget is not None else "the optimiser stopped at once"
    warnings.warn(f"refine: {len(idle)} of {len(samples)} map(s) got no iteration and are returned as they "
                  f"started ({why})", RefineWarning, stacklevel=3)


def refine(
    velocity: Union[torch.Tensor, np.ndarray],
    seismic: Union[torch.Tensor, np.ndarray],
    *,
    family: Union[str, Sequence[str], None] = None,
    time_budget: Optional[float] = None,
    max_iter: int = 100,
    optimizer: str = "lbfgs",
    reg_weight: Union[float, Dict[str, float], None] = None,
    tv_eps: Union[float, Dict[str, float], None] = None,
    depth_power: Union[float, Dict[str, float], None] = None,
    stages: Sequence[tuple] = CONTINUATION_STAGES,
    step_ms: float = 100.0,
    smooth_sigma: float = 2.5,
    cost_scale: float = 1e4,
    history_size: int = 30,
    lr: float = 0.05,
    shots: Optional[Sequence[int]] = None,
    clamp: Tuple[float, float] = (1500.0, 4500.0),
    layer_split_ms: float = 150.0,
    accept_ratio: Union[float, Dict[str, float], None] = None,
    return_info: bool = False,
    clock: Callable[[], float] = time.perf_counter,
    device: Union[str, torch.device, None] = None,
    progress: bool = False,
    **simulate_kwargs,
):
    """Refine velocity maps by regularised full-waveform inversion against observed gathers.

    Args:
        velocity: (B,1,W,W) or (B,W,W) start maps in m/s (tensor or numpy), e.g. a
            network's prediction; square, one column per receiver of ``seismic``.
        seismic: (B, n_sources, nt, W) observed raw gathers (tensor or numpy).
        family: one family name for the batch, a per-sample list of names (``"FlatVel_A"``
            ... ``"Style_B"``, or the kinds ``"flat"``, ``"tv"``, ``"smooth"``), or None to
            detect the kind per sample (:func:`detect_family_kind`).
        time_budget: wall-clock seconds for the whole batch (None: only ``max_iter``). No
            evaluation starts that the measured ones say would overrun it; 0 returns the
            start at once.
        max_iter: optimiser iterations per sample in all (L-BFGS iterations or Adam
            steps), split over ``stages``.
        optimizer: ``"lbfgs"`` (backtracking line search, restarts) or ``"adam"``.
        reg_weight: regulariser weight: one float, or a dict whose keys are kinds or family
            names (a family's entry wins over its kind's; default ``DEFAULT_REG_WEIGHT``).
        tv_eps: smoothing of the TV terms, km/s (one float, or a dict with the kinds
            ``"flat"`` and/or ``"tv"`` or family names; default ``DEFAULT_TV_EPS``: 1e-4 for
            flat profiles, 1e-2 for the 2-D TV).
        depth_power: depth preconditioning exponent (0: none): one float, or a dict of
            kinds or family names (default ``DEFAULT_DEPTH_POWER``: 1 for flat profiles, 0
            for the 2-D kinds).
        stages: continuation as (cutoff Hz or None for the full band, share of the
            iterations and of the time budget[, factor on the regulariser weight[, floor on
            the TV eps, km/s]]) tuples (or :class:`Stage` objects), run in order by each
            sample; each starts from the sample's best map of the previous one, iterations a stage leaves unused (L-BFGS
            converged) go to the next (a share of 0: only those), and with a
            ``time_budget`` a stage also ends when its share of the time is spent. Default
            ``CONTINUATION_STAGES``: full band with eps at least 10 m/s, then, on what that
            leaves, the kinds' own eps.
        step_ms: velocity scale of one unit of the parameters (m/s).
        smooth_sigma: correlation length (cells) of the Style prior's Gaussian blur.
        cost_scale: factor on the normalised misfit (keeps the optimiser's tolerances
            meaningful as the misfit falls).
        history_size: L-BFGS history.
        lr: Adam's learning rate (in parameter units of ``step_ms`` m/s).
        shots: shots used in the misfit (default: all, except for samples of kind
            ``"flat"``: the two end shots, 0 and n-1. In a laterally invariant medium the
            shots are translations of one another, so two carry the information of five,
            with the longest offsets, at 2/5 of the cost per evaluation).
        clamp: plausible velocity range (m/s); results are clamped to it.
        accept_ratio: a sample's refinement is kept where its full-band misfit fell below
            this share of the start's (one float in (0, 1], or a dict per kind or family;
            default ``DEFAULT_ACCEPT_RATIO``); otherwise the (clamped) start is returned.
        return_info: also return one dict per sample: ``kind``, ``misfit_before``,
            ``misfit_after`` (full-band normalised misfit of the returned map),
            ``misfit_candidate`` (of the refined map, kept or not), ``iterations``,
            ``evaluations``, ``restarts`` (line-search restarts), ``stage`` (the last one
            reached), ``stopped`` (why it stopped), ``kept``, ``time`` (s, the batch's).
        clock: the wall clock (injectable for tests).
        device: where to compute (default: the velocity's device).
        progress: show a progress bar over evaluations.
        **simulate_kwargs: passed to :func:`simulate` (``backend``, ``checkpoint_every``,
            ``nbc``, ``source_columns`` ...).

    Returns:
        refined maps of the input's shape and type (numpy in, numpy out), and with
        ``return_info`` the list of per-sample dicts.

    Raises:
        ParameterError: a map of the wrong shape (not square, or not matching the gathers'
            receivers), non-finite or non-positive velocities, a bad option.
        DataError: gathers with NaN/inf values or no signal.

    Warns:
        RefineWarning: when a map got no iteration (the budget allowed none).
    """
    t0 = clock()
    inp = RefineInputs.read(velocity, seismic, device, clamp)
    b = inp.v0.shape[0]
    fams = [family] * b if isinstance(family, str) else list(family) if family is not None else [None] * b
    kinds = sample_kinds(family, inp.v0, inp.obs, b)
    names = [f if f is not None and f not in KINDS else None for f in map(lambda x: None if x is None else str(x),
                                                                          fams)]
    accept = per_sample_setting("accept_ratio", accept_ratio, DEFAULT_ACCEPT_RATIO, kinds, names)
    check_options(optimizer, max_iter, time_budget, clamp, dict(enumerate(accept)))
    stage_list = continuation(stages)
    lam, eps = prior_settings(kinds, names, reg_weight, tv_eps, inp.v0.device)
    powers = per_sample_setting("depth_power", depth_power, DEFAULT_DEPTH_POWER, kinds, names)
    if any(not (p >= 0) for p in powers):
        raise ParameterError(f"refine: depth_power must be >= 0, got {depth_power}")
    sim = _Simulator(inp.obs, kinds, shots, max_iter, clamp, simulate_kwargs)
    samples = [_Sample(i, inp.v0[i]) for i in range(b)]
    if time_budget is not None and time_budget == 0:  # no time at all: not even the start's misfit
        _warn_idle(samples, max_iter, time_budget, None)
        result = inp.output(sim.clamp(inp.v0))
        if not return_info:
            return result
        nan = torch.full((b,), math.nan, dtype=torch.float64)
        return result, _info(kinds, samples, nan, nan, torch.zeros(b, dtype=torch.bool), clock() - t0)

    budget = _Budget(clock, t0, time_budget)
    ts = clock()
    before = sim.misfits(inp.v0)
    budget.t_forward = clock() - ts
    bar = progress_bar(total=max_iter, desc="refine", unit="eval") if progress else None
    run = _Run(Parametrisation(inp.v0, kinds, powers, step_ms, smooth_sigma, layer_split_ms), sim, budget, stage_list,
               stage_iterations(max_iter, stage_list), lam, eps, cost_scale, optimizer, history_size, lr, bar)
    for s in samples:
        run.advance(s)
    while True:
        active = [s for s in samples if not s.finished]
        if not active:
            break
        try:
            run.evaluate(active)
        except _OutOfTime:
            break
    if bar is not None:
        bar.close()
    out, after, kept = _final_check(run, samples, before, inp.v0, accept)
    _warn_idle(samples, max_iter, time_budget, budget)
    result = inp.output(out)
    if not return_info:
        return result
    return result, _info(kinds, samples, before, after, kept, clock() - t0)
