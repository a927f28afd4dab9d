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

All samples of the batch go through one :func:`simulate` call per evaluation (gradients by
the adjoint of :mod:`.adjoint`). Updates are preconditioned with depth (deep cells get
weak gradients: the update is scaled by ``((z+1)/H)^(depth_power/2)``), and an optional
frequency continuation fits low-passed data first (``stages``). L-BFGS
(``torch.optim.LBFGS``, strong Wolfe line search) or Adam. The result of each sample is its
best evaluated map, kept only where the full-band data misfit fell; values are clamped to
the plausible range. ``time_budget`` (wall clock, whole batch) is checked before every
evaluation: none starts that the measured evaluations (the slowest of the last three)
say would overrun the budget, time for the final misfit check (one forward) included. The
budget holds as long as evaluation times are steady; a machine whose load jumps between
evaluations can push the last one over. With ``backend`` not given, the simulation is
compiled when the whole refinement is long enough to pay for it.

This module is the optimisation loop: the inputs (:class:`_Inputs`), the simulation it
fits (:class:`_Simulator`), the time budget (:class:`_Budget`), one evaluation and the
best maps so far (:class:`_Search`), the continuation stages (:func:`_run_stages`) and the
final check (:func:`_final_check`).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..utils import progress_bar
from .forward import simulate
from .kind_routing import detect_family_kind, family_kind, sample_kinds
from .misfit import misfit
from .priors import DEFAULT_REG_WEIGHT, DEFAULT_TV_EPS, KINDS, Parametrisation, per_kind
from .stencil import AUTO_COMPILE_MIN_SHOT_STEPS, DEFAULT_SOURCE_COLUMNS, compiled_step, default_source_columns

# the kinds and their defaults (from :mod:`.kind_routing` and :mod:`.priors`) stay importable here
__all__ = ["refine", "lowpass", "detect_family_kind", "family_kind", "KINDS", "DEFAULT_REG_WEIGHT",
           "DEFAULT_TV_EPS", "CONTINUATION_STAGES", "FIRST_EVAL_FORWARDS"]

#: before any evaluation is measured, one is assumed to cost this many forwards (the
#: gradient costs about 4 compiled forwards on CPU; more when eager)
FIRST_EVAL_FORWARDS = 8.0
#: continuation stages: (low-pass cutoff in Hz or None for the full band, share of the
#: iterations[, factor on the regulariser weight[, floor on the TV eps, km/s]]); iterations a
#: stage leaves unused (it converged) go to the next. The default fits with eps at least
#: 10 m/s (fast early progress) and, once that has converged, sharpens with the kinds' own
#: eps on whatever budget is left (FlatVel_A in BENCHMARKS.md: 55 -> 2.43 m/s when the first
#: stage converges, -> 0.57 after sharpening; a short run is the first stage alone)
CONTINUATION_STAGES: Tuple[tuple, ...] = ((None, 1.0, 1.0, 1e-2), (None, 0.0))


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
    """Raised inside the closure before an evaluation that would overrun the budget."""


@dataclass
class _Inputs:
    """The validated inputs: start maps ``v0`` (B,H,W) float64 and observed gathers ``obs``
    (B, n_sources, nt, W) float32 on the working device, and what the output must look like."""

    v0: torch.Tensor
    obs: torch.Tensor
    shape: tuple
    dtype: torch.dtype
    device: torch.device
    is_numpy: bool

    @classmethod
    def read(cls, velocity, seismic, device) -> "_Inputs":
        is_numpy = isinstance(velocity, np.ndarray)
        v_in = torch.from_numpy(np.asarray(velocity, dtype=np.float32)) if is_numpy else velocity
        if not torch.is_tensor(v_in) or v_in.dim() not in (3, 4) or (v_in.dim() == 4 and v_in.shape[1] != 1):
            raise ValueError(f"refine: velocity must be (B,1,H,W) or (B,H,W), "
                             f"got {getattr(velocity, 'shape', type(velocity))}")
        in_shape = tuple(v_in.shape)
        dev = torch.device(device) if device is not None else v_in.device
        v0 = (v_in[:, 0] if v_in.dim() == 4 else v_in).detach().to(dev, torch.float64)
        obs = torch.from_numpy(np.asarray(seismic, dtype=np.float32)) if isinstance(seismic, np.ndarray) else seismic
        if not torch.is_tensor(obs) or obs.dim() != 4 or obs.shape[0] != v0.shape[0] or obs.shape[3] != v0.shape[2]:
            raise ValueError(f"refine: seismic must be (B, n_sources, nt, W) matching velocity {in_shape}, "
                             f"got {getattr(seismic, 'shape', type(seismic))}")
        return cls(v0, obs.detach().to(dev, torch.float32), in_shape, v_in.dtype, v_in.device, is_numpy)

    def output(self, v: torch.Tensor):
        """Maps (B,H,W) in the input's shape, dtype (float32 for integer input), device and type."""
        out = v.to(self.device, self.dtype if self.dtype.is_floating_point else torch.float32).reshape(self.shape)
        return out.cpu().numpy() if self.is_numpy else out


def _check_options(optimizer: str, max_iter: int, time_budget: Optional[float]) -> None:
    if optimizer not in ("lbfgs", "adam"):
        raise ValueError(f"refine: optimizer must be 'lbfgs' or 'adam', got {optimizer!r}")
    if max_iter < 0:
        raise ValueError(f"refine: max_iter must be >= 0, got {max_iter}")
    if time_budget is not None and time_budget < 0:
        raise ValueError(f"refine: time_budget must be >= 0 seconds, got {time_budget}")


def _continuation(stages: Sequence[tuple]) -> List[tuple]:
    """The stages as complete (cutoff, share, reg factor, eps floor) tuples, checked."""
    stages = [tuple(st) + (1.0, 0.0)[len(st) - 2:] if 2 <= len(st) <= 4 else tuple(st) for st in stages]
    if not stages or any(len(st) != 4 or st[1] < 0 or st[3] < 0 for st in stages) or \
            not sum(float(st[1]) for st in stages) > 0:
        raise ValueError(f"refine: stages must be (cutoff_hz or None, share >= 0[, reg factor[, eps floor "
                         f">= 0 km/s]]) tuples with a positive share in all, got {stages}")
    return stages


def _stage_iterations(max_iter: int, stages: List[tuple]) -> List[int]:
    """``max_iter`` split over the stages by their shares (at least one for a positive share)."""
    shares = [float(st[1]) for st in stages]
    if max_iter <= 0:
        return [0] * len(shares)
    return [max(1, int(round(max_iter * s / sum(shares)))) if s > 0 else 0 for s in shares]


def _prior_settings(kinds: List[str], reg_weight, tv_eps, device) -> Tuple[torch.Tensor, Dict[str, float]]:
    """Per-sample regulariser weights (B,) float64 and the TV eps per kind, checked."""
    weights = per_kind("reg_weight", reg_weight, DEFAULT_REG_WEIGHT)
    lam = torch.tensor([weights[k] for k in kinds], dtype=torch.float64, device=device)
    eps = per_kind("tv_eps", tv_eps, DEFAULT_TV_EPS)
    if any(not (x > 0) for x in eps.values()):
        raise ValueError(f"refine: tv_eps must be > 0 km/s, got {tv_eps}")
    return lam, eps


class _Simulator:
    """The simulation refine fits: the chosen shots of the observed gathers (``observed``)
    against :func:`simulate` of the clamped maps with the matching source columns."""

    def __init__(self, obs: torch.Tensor, kinds: List[str], shots: Optional[Sequence[int]], max_iter: int,
                 clamp: Tuple[float, float], simulate_kwargs: dict):
        kw = dict(simulate_kwargs)
        b, n_src, nt, w = obs.shape
        cols = list(kw.pop("source_columns", None) or
                    (DEFAULT_SOURCE_COLUMNS if (w == 70 and n_src == 5) else default_source_columns(n_src, w)))
        if shots is None and n_src > 2 and all(k == "flat" for k in kinds):
            shots = (0, n_src - 1)
        shot_ids = list(range(n_src)) if shots is None else [int(s) for s in shots]
        self.columns = [cols[s] for s in shot_ids]
        self.observed = obs[:, shot_ids]
        self.nt = nt
        self.dt = float(kw.get("dt", 1e-3))
        if kw.get("backend", "auto") == "auto":
            # the whole refinement, not one call, decides whether compiling pays off
            work = b * len(shot_ids) * nt * max(1, max_iter)
            kw["backend"] = ("compile" if work >= 4 * AUTO_COMPILE_MIN_SHOT_STEPS
                             and compiled_step() is not None else "eager")
        self.kwargs = kw
        self.lo, self.hi = float(clamp[0]), float(clamp[1])

    def clamp(self, v: torch.Tensor) -> torch.Tensor:
        return v.clamp(self.lo, self.hi)

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        return simulate(self.clamp(v).float(), nt=self.nt, source_columns=self.columns, **self.kwargs)


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


def _start_misfit(sim: _Simulator, v0: torch.Tensor, budget: _Budget) -> torch.Tensor:
    """(B,) misfit of the start maps (fast path); also measures what a forward costs."""
    ts = budget.clock()
    with torch.no_grad():
        before = misfit(sim(v0), sim.observed)
    budget.t_forward = budget.clock() - ts
    return before


@dataclass
class _Stage:
    """One continuation stage's objective: low-pass cutoff (None: full band), target
    gathers, per-sample regulariser weights (B,) and TV eps per kind."""

    cutoff: Optional[float]
    target: torch.Tensor
    lam: torch.Tensor
    eps: Dict[str, float]


class _Search:
    """One refinement's state: the parametrisation, each sample's best map and objective in
    the current stage, the counts of evaluations and iterations."""

    def __init__(self, model: Parametrisation, v0: torch.Tensor, sim: _Simulator, budget: _Budget,
                 cost_scale: float, bar=None):
        self.model, self.sim, self.budget, self.cost_scale, self.bar = model, sim, budget, cost_scale, bar
        self.best_v = v0.clone()
        self.best_obj = torch.full((v0.shape[0],), math.inf, dtype=torch.float64, device=v0.device)
        self.evals = 0
        self.iters = 0

    def start(self, v: torch.Tensor) -> None:
        """A new stage from ``v`` (B,H,W) float64: parameters at zero, objectives unknown."""
        self.model.reset(v)
        self.best_obj.fill_(math.inf)

    def evaluate(self, st: _Stage) -> torch.Tensor:
        """The closure: the batch's objective with its gradient; records each sample's best map."""
        self.budget.check()
        te = self.budget.clock()
        for p in self.model.parameters():
            p.grad = None
        v = self.model.velocity()
        sim = self.sim(v)
        if st.cutoff is not None:
            sim = lowpass(sim.double(), float(st.cutoff), self.sim.dt)
        per = self.cost_scale * misfit(sim, st.target) + st.lam * self.model.regulariser(v, st.eps)
        total = per.sum()
        total.backward()
        with torch.no_grad():
            better = per.detach() < self.best_obj
            if bool(better.any()):
                self.best_obj[better] = per.detach()[better]
                self.best_v[better] = v.detach()[better]
        self.evals += 1
        self.budget.eval_times.append(self.budget.clock() - te)
        if self.bar is not None:
            self.bar.update(1)
        return total


def _lbfgs_iterations(opt: torch.optim.LBFGS) -> int:
    return int(opt.state[opt._params[0]].get("n_iter", 0))


def _optimise(search: _Search, st: _Stage, n_iter: int, optimizer: str, history_size: int,
              lr: float) -> Tuple[int, bool]:
    """Up to ``n_iter`` iterations of the optimiser on one stage: (iterations done, whether
    the time budget ran out)."""
    params = search.model.parameters()

    def closure():
        return search.evaluate(st)

    if optimizer == "lbfgs":
        opt = torch.optim.LBFGS(params, lr=1.0, max_iter=n_iter, max_eval=int(n_iter * 2.5) + 1,
                                history_size=history_size, line_search_fn="strong_wolfe",
                                tolerance_grad=0.0, tolerance_change=1e-12)
        try:
            opt.step(closure)
        except _OutOfTime:
            return _lbfgs_iterations(opt), True
        return _lbfgs_iterations(opt), False
    opt = torch.optim.Adam(params, lr=lr)
    done = 0
    try:
        for _ in range(n_iter):
            opt.zero_grad()
            opt.step(closure)
            done += 1
    except _OutOfTime:
        return done, True
    return done, False


def _run_stages(search: _Search, stages: List[tuple], max_iter: int, lam: torch.Tensor, eps: Dict[str, float],
                optimizer: str, history_size: int, lr: float) -> None:
    """The continuation: each stage starts from the best maps so far; iterations a stage
    leaves unused (L-BFGS converged) go to the next; none starts once out of time."""
    carry = 0  # iterations earlier stages left unused
    observed = search.sim.observed
    for (cutoff, _, reg_factor, eps_floor), n_stage in zip(stages, _stage_iterations(max_iter, stages)):
        n_iter = n_stage + carry
        if n_iter == 0:
            continue
        search.start(search.best_v)
        target = observed if cutoff is None else lowpass(observed.double(), float(cutoff), search.sim.dt)
        st = _Stage(cutoff, target, lam * float(reg_factor), {k: max(x, float(eps_floor)) for k, x in eps.items()})
        done, out_of_time = _optimise(search, st, n_iter, optimizer, history_size, lr)
        search.iters += done
        if out_of_time:
            return
        carry = max(0, n_iter - done) if optimizer == "lbfgs" else 0


def _final_check(search: _Search, before: torch.Tensor, v0: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor]:
    """Keep a sample's refinement only where the full-band misfit fell: (maps, candidates'
    misfit, kept), maps clamped."""
    sim = search.sim
    with torch.no_grad():
        cand = sim.clamp(search.best_v)
        after = misfit(sim(cand), sim.observed) if search.evals else before.clone()
    kept = after < before
    return torch.where(kept[:, None, None], cand, sim.clamp(v0)), after, kept


def _info(kinds: List[str], before: torch.Tensor, after: torch.Tensor, kept: torch.Tensor, iters: int, evals: int,
          elapsed: float) -> List[dict]:
    return [{"kind": kinds[i], "misfit_before": float(before[i]),
             "misfit_after": float(after[i]) if bool(kept[i]) else float(before[i]),
             "misfit_candidate": float(after[i]), "iterations": iters, "evaluations": evals,
             "kept": bool(kept[i]), "time": elapsed} for i in range(len(kinds))]


def _untouched_info(kinds: List[str], elapsed: float) -> List[dict]:
    """Info of a call with no time at all (not even the start's misfit)."""
    nan = float("nan")
    return [{"kind": k, "misfit_before": nan, "misfit_after": nan, "misfit_candidate": nan, "iterations": 0,
             "evaluations": 0, "kept": False, "time": elapsed} for k in kinds]


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
    depth_power: float = 2.0,
    stages: Sequence[tuple] = CONTINUATION_STAGES,
    step_ms: float = 100.0,
    smooth_sigma: float = 2.5,
    cost_scale: float = 1e4,
    history_size: int = 30,
    lr: float = 0.05,
    shots: Optional[Sequence[int]] = None,
    clamp: Tuple[float, float] = (1500.0, 4500.0),
    return_info: bool = False,
    clock: Callable[[], float] = time.perf_counter,
    device: Union[str, torch.device, None] = None,
    progress: bool = False,
    **simulate_kwargs,
):
    """Refine velocity maps by regularised full-waveform inversion against observed gathers.

    Args:
        velocity: (B,1,70,70) or (B,70,70) start maps in m/s (tensor or numpy), e.g. a
            network's prediction.
        seismic: (B, 5, nt, 70) observed raw gathers (tensor or numpy).
        family: one family name for the batch, a per-sample list of names (``"FlatVel_A"``
            ... ``"Style_B"``, or the kinds ``"flat"``, ``"tv"``, ``"smooth"``), or None to
            detect the kind per sample (:func:`detect_family_kind`).
        time_budget: wall-clock seconds for the whole batch (None: only ``max_iter``). No
            evaluation starts that the measured ones say would overrun it; 0 returns the
            start at once.
        max_iter: optimiser iterations in all (L-BFGS iterations or Adam steps), split over
            ``stages``.
        optimizer: ``"lbfgs"`` (strong Wolfe line search) or ``"adam"``.
        reg_weight: regulariser weight (one float or a dict per kind; default
            ``DEFAULT_REG_WEIGHT``).
        tv_eps: smoothing of the TV terms, km/s (one float for both, or a dict with the
            kinds ``"flat"`` and/or ``"tv"``; default ``DEFAULT_TV_EPS``: 1e-4 for flat
            profiles, 1e-2 for the 2-D TV).
        depth_power: depth preconditioning exponent (0: none).
        stages: continuation as (cutoff Hz or None for the full band, share of the
            iterations[, factor on the regulariser weight[, floor on the TV eps, km/s]])
            tuples, run in order; each starts from the previous one's best maps, and
            iterations a stage leaves unused (L-BFGS converged) go to the next (a share of
            0: only those). Default ``CONTINUATION_STAGES``: full band with eps at least 10 m/s,
            then, on what that leaves, the kinds' own eps.
        step_ms: velocity scale of one unit of the parameters (m/s).
        smooth_sigma: correlation length (cells) of the Style prior's Gaussian blur.
        cost_scale: factor on the normalised misfit (keeps the optimiser's tolerances
            meaningful as the misfit falls).
        history_size: L-BFGS history.
        lr: Adam's learning rate (in parameter units of ``step_ms`` m/s).
        shots: shots used in the misfit (default: all, except for a batch whose samples are
            all of kind ``"flat"``: the two end shots, 0 and n-1. In a laterally invariant
            medium the shots are translations of one another, so two carry the information
            of five, with the longest offsets, at 2/5 of the cost per evaluation).
        clamp: plausible velocity range (m/s); results are clamped to it.
        return_info: also return one dict per sample: ``kind``, ``misfit_before``,
            ``misfit_after`` (full-band normalised misfit of the returned map),
            ``iterations``, ``evaluations``, ``kept``, ``time`` (s, the batch's).
        clock: the wall clock (injectable for tests).
        device: where to compute (default: the velocity's device).
        progress: show a progress bar over evaluations.
        **simulate_kwargs: passed to :func:`simulate` (``backend``, ``checkpoint_every``,
            ``nbc``, ``source_columns`` ...).

    Returns:
        refined maps of the input's shape and type (numpy in, numpy out), and with
        ``return_info`` the list of per-sample dicts.
    """
    t0 = clock()
    inp = _Inputs.read(velocity, seismic, device)
    _check_options(optimizer, max_iter, time_budget)
    stages = _continuation(stages)
    kinds = sample_kinds(family, inp.v0, inp.obs, inp.v0.shape[0])
    lam, eps = _prior_settings(kinds, reg_weight, tv_eps, inp.v0.device)
    sim = _Simulator(inp.obs, kinds, shots, max_iter, clamp, simulate_kwargs)
    if time_budget is not None and time_budget == 0:  # no time at all: not even the start's misfit
        result = inp.output(sim.clamp(inp.v0))
        return (result, _untouched_info(kinds, clock() - t0)) if return_info else result

    budget = _Budget(clock, t0, time_budget)
    before = _start_misfit(sim, inp.v0, budget)
    bar = progress_bar(total=max_iter, desc="refine", unit="eval") if progress else None
    model = Parametrisation(inp.v0, kinds, depth_power, step_ms, smooth_sigma)
    search = _Search(model, inp.v0, sim, budget, cost_scale, bar)
    _run_stages(search, stages, max_iter, lam, eps, optimizer, history_size, lr)
    if bar is not None:
        bar.close()
    out, after, kept = _final_check(search, before, inp.v0)
    elapsed = clock() - t0
    result = inp.output(out)
    if not return_info:
        return result
    return result, _info(kinds, before, after, kept, search.iters, search.evals, elapsed)
