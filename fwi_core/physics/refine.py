"""Test-time refinement: full-waveform inversion started from a network's prediction.

``refine(velocity, seismic)`` minimises, per sample, the normalised data misfit between
the observed gathers and ``simulate(v)`` (:func:`.pde_loss.misfit`, accumulated in
float64, scaled by ``cost_scale``) plus a regulariser chosen by the sample's family kind:

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
"""
from __future__ import annotations

import math
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .families import FAMILIES
from .forward import simulate
from .pde_loss import misfit
from .stencil import AUTO_COMPILE_MIN_SHOT_STEPS, DEFAULT_SOURCE_COLUMNS, compiled_step, default_source_columns

KINDS = ("flat", "tv", "smooth")
#: default regulariser weights per kind (on the misfit scaled by ``cost_scale``; velocities
#: in km/s in the regularisers)
DEFAULT_REG_WEIGHT: Dict[str, float] = {"flat": 0.1, "tv": 0.3, "smooth": 0.3}
#: default smoothed-TV epsilon per kind (km/s). ``sqrt(d^2 + eps^2) - eps`` is convex, so it
#: prefers a jump split into a staircase of smaller steps (by about ``eps`` per extra step),
#: which the band-limited data barely see: for 1-D profiles eps is 0.1 m/s (the public
#: record's choice), which leaves interfaces sharp; the 2-D TV keeps 10 m/s, better on
#: curved and faulted maps (BENCHMARKS.md, section "refine")
DEFAULT_TV_EPS: Dict[str, float] = {"flat": 1e-4, "tv": 1e-2}
#: before any evaluation is measured, one is assumed to cost this many forwards (the
#: gradient costs about 4 compiled forwards on CPU; more when eager)
FIRST_EVAL_FORWARDS = 8.0
#: continuation stages: (low-pass cutoff in Hz or None for the full band, share of the
#: iterations[, factor on the regulariser weight[, floor on the TV eps, km/s]]); iterations a
#: stage leaves unused (it converged) go to the next. The default fits with eps at least
#: 10 m/s (fast early progress) and, once that has converged, sharpens with the kinds' own
#: eps on whatever budget is left (FlatVel_A in BENCHMARKS.md: 55 -> 2.43 m/s when the first
#: stage converges, -> 0.57 after sharpening; a short run is the first stage alone)
DEFAULT_STAGES: Tuple[tuple, ...] = ((None, 1.0, 1.0, 1e-2), (None, 0.0))


def family_kind(family: str) -> str:
    """The regulariser kind of an OpenFWI family name: ``"flat"``, ``"tv"`` or ``"smooth"``."""
    if family in KINDS:
        return family
    if family not in FAMILIES:
        raise ValueError(f"refine: unknown family {family!r}; expected one of {', '.join(FAMILIES)} "
                         f"or a kind {', '.join(KINDS)}")
    if family.startswith("FlatVel"):
        return "flat"
    if family.startswith("Style"):
        return "smooth"
    return "tv"


def detect_family_kind(velocity: Union[torch.Tensor, np.ndarray], seismic: Union[torch.Tensor, np.ndarray, None] = None,
                       *, flat_data_tol: float = 1e-3, flat_map_tol: float = 25.0,
                       layered_share: float = 0.5, jump: float = 5.0) -> List[str]:
    """Guess each sample's regulariser kind from simple tests.

    - ``"flat"``: with ``seismic``, the first shot and the mirrored last shot agree (a
      laterally flat medium makes them mirror images: relative L2 difference below
      ``flat_data_tol``); without it, the lateral standard deviation of every row of the
      map is below ``flat_map_tol`` m/s.
    - ``"tv"``: layered (piecewise-constant) maps: more than ``layered_share`` of the
      neighbour differences are below ``jump`` m/s.
    - ``"smooth"``: the rest (Style-like smooth fields).

    Args:
        velocity: (B,1,H,W) or (B,H,W) m/s.
        seismic: optional (B, n_sources, nt, W) observed gathers (sources symmetric about
            the centre, as the competition's).
    Returns:
        a list of B kinds.
    """
    v = torch.as_tensor(np.asarray(velocity) if isinstance(velocity, np.ndarray) else velocity).detach().double()
    if v.dim() == 4:
        v = v[:, 0]
    if v.dim() != 3:
        raise ValueError(f"detect_family_kind: velocity of shape {tuple(v.shape)} must be (B,1,H,W) or (B,H,W)")
    if seismic is not None:
        s = torch.as_tensor(np.asarray(seismic) if isinstance(seismic, np.ndarray) else seismic).detach().double()
        a, b = s[:, 0], s[:, -1].flip(-1)
        flat = ((a - b).flatten(1).norm(dim=1) / a.flatten(1).norm(dim=1).clamp_min(1e-30)) < flat_data_tol
    else:
        flat = v.std(dim=2).amax(dim=1) < flat_map_tol
    dz = (v[:, 1:, :] - v[:, :-1, :]).abs().flatten(1)
    dx = (v[:, :, 1:] - v[:, :, :-1]).abs().flatten(1)
    share = torch.cat([dz, dx], 1).lt(jump).double().mean(1)
    return ["flat" if bool(f) else "tv" if float(sh) > layered_share else "smooth" for f, sh in zip(flat, share)]


def _kinds(family, velocity, seismic, b: int) -> List[str]:
    if family is None:
        return detect_family_kind(velocity, seismic)
    if isinstance(family, str):
        return [family_kind(family)] * b
    fams = list(family)
    if len(fams) != b:
        raise ValueError(f"refine: family has {len(fams)} entries for a batch of {b}")
    return [family_kind(str(f)) for f in fams]


def lowpass(x: torch.Tensor, cutoff_hz: float, dt: float) -> torch.Tensor:
    """Zero-phase low-pass along the time axis (dim 2) of (B, n, nt, r) gathers: a
    4th-order Butterworth magnitude ``1/sqrt(1+(f/fc)^8)`` applied in the Fourier domain."""
    nt = x.shape[2]
    n = 2 * nt  # zero padding against wrap-around
    f = torch.fft.rfftfreq(n, d=dt).to(x.device)
    h = (1.0 / torch.sqrt(1.0 + (f / cutoff_hz) ** 8)).to(x.dtype)
    spec = torch.fft.rfft(x, n=n, dim=2) * h[None, None, :, None]
    return torch.fft.irfft(spec, n=n, dim=2)[:, :, :nt]


def _gauss_blur(w: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian filter of (N,H,W) with replicate padding, scaled so that white
    noise of unit variance becomes a smooth field of unit variance (a draw from a
    Gaussian process with squared-exponential covariance of length ``sigma * sqrt(2)``)."""
    r = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-r, r + 1, dtype=w.dtype, device=w.device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.square().sum().sqrt()
    y = torch.nn.functional.pad(w[:, None], (r, r, r, r), mode="replicate")
    y = torch.nn.functional.conv2d(y, k.view(1, 1, 1, -1))
    y = torch.nn.functional.conv2d(y, k.view(1, 1, -1, 1))
    return y[:, 0]


class _OutOfTime(Exception):
    """Raised inside the closure before an evaluation that would overrun the budget."""


class _Model:
    """Per-kind parametrisation of a batch: v = base + scale * D(z) * update."""

    def __init__(self, base: torch.Tensor, kinds: List[str], depth_power: float, step_ms: float,
                 smooth_sigma: float):
        self.kinds = kinds
        self.b, self.h, self.w = base.shape
        z = torch.arange(self.h, dtype=torch.float64, device=base.device)
        self.depth = (((z + 1.0) / self.h) ** (depth_power / 2.0))[:, None]  # (H,1)
        self.depth = self.depth / self.depth.max()
        self.step_ms = step_ms
        self.sigma = smooth_sigma
        self.idx = {k: [i for i, kk in enumerate(kinds) if kk == k] for k in KINDS}
        self.reset(base)

    def reset(self, base: torch.Tensor) -> None:
        """Start a new parametrisation around ``base`` (B,H,W) float64: updates at zero."""
        self.base = base.detach().clone()
        self.params = {}
        for k, ids in self.idx.items():
            if not ids:
                continue
            shape = (len(ids), self.h) if k == "flat" else (len(ids), self.h, self.w)
            self.params[k] = torch.zeros(shape, dtype=torch.float64, device=base.device, requires_grad=True)
        flat = self.idx["flat"]
        if flat:  # a flat sample's base is its depth profile (row means)
            self.base[flat] = self.base[flat].mean(dim=2, keepdim=True).expand(-1, -1, self.w)

    def parameters(self) -> List[torch.Tensor]:
        return list(self.params.values())

    def velocity(self) -> torch.Tensor:
        """(B,H,W) float64 maps of the current parameters."""
        parts = [None] * self.b
        for k, p in self.params.items():
            if k == "flat":
                upd = (self.step_ms * self.depth[None] * p[:, :, None]).expand(-1, -1, self.w)
            elif k == "smooth":
                upd = self.step_ms * self.depth[None] * _gauss_blur(p, self.sigma)
            else:
                upd = self.step_ms * self.depth[None] * p
            for j, i in enumerate(self.idx[k]):
                parts[i] = self.base[i] + upd[j]
        return torch.stack(parts)

    def regulariser(self, v: torch.Tensor, eps: Dict[str, float]) -> torch.Tensor:
        """(B,) float64 regulariser values (velocities in km/s, sums per map column);
        ``eps``: the TV smoothing per kind."""
        km = v / 1000.0
        out = torch.zeros(self.b, dtype=torch.float64, device=v.device)
        for k, ids in self.idx.items():
            if not ids:
                continue
            m = km[ids]
            if k == "flat":
                d = m[:, 1:, 0] - m[:, :-1, 0]
                e = eps["flat"]
                r = (torch.sqrt(d ** 2 + e ** 2) - e).sum(1)
            elif k == "tv":
                dz = m[:, 1:, :-1] - m[:, :-1, :-1]
                dx = m[:, :-1, 1:] - m[:, :-1, :-1]
                e = eps["tv"]
                r = (torch.sqrt(dz ** 2 + dx ** 2 + e ** 2) - e).sum((1, 2)) / self.w
            else:
                r = (self.params["smooth"] ** 2).sum((1, 2)) / self.w
            out = out.index_put((torch.tensor(ids, device=v.device),), r)
        return out


def _per_kind(name: str, value: Union[float, Dict[str, float], None], defaults: Dict[str, float]) -> Dict[str, float]:
    """A per-kind setting: ``defaults`` updated by a dict, or one float for every kind."""
    if isinstance(value, dict):
        unknown = set(value) - set(defaults)
        if unknown:
            raise ValueError(f"refine: {name} has unknown kinds {sorted(unknown)}; expected {sorted(defaults)}")
        return {**defaults, **{k: float(x) for k, x in value.items()}}
    if value is not None:
        return {k: float(value) for k in defaults}
    return dict(defaults)


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
    stages: Sequence[tuple] = DEFAULT_STAGES,
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
            0: only those). Default ``DEFAULT_STAGES``: full band with eps at least 10 m/s,
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
    is_numpy = isinstance(velocity, np.ndarray)
    v_in = torch.from_numpy(np.asarray(velocity, dtype=np.float32)) if is_numpy else velocity
    if not torch.is_tensor(v_in) or v_in.dim() not in (3, 4) or (v_in.dim() == 4 and v_in.shape[1] != 1):
        raise ValueError(f"refine: velocity must be (B,1,H,W) or (B,H,W), got {getattr(velocity, 'shape', type(velocity))}")
    in_shape, in_dtype, in_device = tuple(v_in.shape), v_in.dtype, v_in.device
    dev = torch.device(device) if device is not None else in_device
    v0 = (v_in[:, 0] if v_in.dim() == 4 else v_in).detach().to(dev, torch.float64)
    obs = torch.from_numpy(np.asarray(seismic, dtype=np.float32)) if isinstance(seismic, np.ndarray) else seismic
    if not torch.is_tensor(obs) or obs.dim() != 4 or obs.shape[0] != v0.shape[0] or obs.shape[3] != v0.shape[2]:
        raise ValueError(f"refine: seismic must be (B, n_sources, nt, W) matching velocity {in_shape}, "
                         f"got {getattr(seismic, 'shape', type(seismic))}")
    obs = obs.detach().to(dev, torch.float32)
    if optimizer not in ("lbfgs", "adam"):
        raise ValueError(f"refine: optimizer must be 'lbfgs' or 'adam', got {optimizer!r}")
    if max_iter < 0:
        raise ValueError(f"refine: max_iter must be >= 0, got {max_iter}")
    if time_budget is not None and time_budget < 0:
        raise ValueError(f"refine: time_budget must be >= 0 seconds, got {time_budget}")
    stages = [tuple(st) + (1.0, 0.0)[len(st) - 2:] if 2 <= len(st) <= 4 else tuple(st) for st in stages]
    if not stages or any(len(st) != 4 or st[1] < 0 or st[3] < 0 for st in stages) or \
            not sum(float(st[1]) for st in stages) > 0:
        raise ValueError(f"refine: stages must be (cutoff_hz or None, share >= 0[, reg factor[, eps floor "
                         f">= 0 km/s]]) tuples with a positive share in all, got {stages}")
    shares = [float(st[1]) for st in stages]
    b, h, w = v0.shape
    kinds = _kinds(family, v0, obs, b)
    weights = _per_kind("reg_weight", reg_weight, DEFAULT_REG_WEIGHT)
    lam = torch.tensor([weights[k] for k in kinds], dtype=torch.float64, device=dev)
    eps = _per_kind("tv_eps", tv_eps, DEFAULT_TV_EPS)
    if any(not (x > 0) for x in eps.values()):
        raise ValueError(f"refine: tv_eps must be > 0 km/s, got {tv_eps}")

    n_src, nt = obs.shape[1], obs.shape[2]
    cols = list(simulate_kwargs.pop("source_columns", None) or
                (DEFAULT_SOURCE_COLUMNS if (w == 70 and n_src == 5) else default_source_columns(n_src, w)))
    if shots is None and n_src > 2 and all(k == "flat" for k in kinds):
        shots = (0, n_src - 1)
    shot_ids = list(range(n_src)) if shots is None else [int(s) for s in shots]
    sim_cols = [cols[s] for s in shot_ids]
    obs_sel = obs[:, shot_ids]
    dt = float(simulate_kwargs.get("dt", 1e-3))
    if simulate_kwargs.get("backend", "auto") == "auto":
        # the whole refinement, not one call, decides whether compiling pays off
        work = b * len(shot_ids) * nt * max(1, max_iter)
        simulate_kwargs["backend"] = ("compile" if work >= 4 * AUTO_COMPILE_MIN_SHOT_STEPS
                                      and compiled_step() is not None else "eager")
    lo, hi = float(clamp[0]), float(clamp[1])

    def forward(v: torch.Tensor) -> torch.Tensor:
        return simulate(v.clamp(lo, hi).float(), nt=nt, source_columns=sim_cols, **simulate_kwargs)

    if time_budget is not None and time_budget == 0:  # no time at all: not even the start's misfit
        out = v0.clamp(lo, hi).to(in_device, in_dtype if in_dtype.is_floating_point else torch.float32)
        out = out.reshape(in_shape).cpu().numpy() if is_numpy else out.reshape(in_shape)
        nan = float("nan")
        info0 = [{"kind": k, "misfit_before": nan, "misfit_after": nan, "misfit_candidate": nan, "iterations": 0,
                  "evaluations": 0, "kept": False, "time": clock() - t0} for k in kinds]
        return (out, info0) if return_info else out

    # misfit of the start (fast path); also measures what a forward costs
    ts = clock()
    with torch.no_grad():
        before = misfit(forward(v0), obs_sel)
    t_forward = clock() - ts
    best_v = v0.clone()
    evals = [0]
    iters = 0
    eval_times: List[float] = []

    def remaining() -> float:
        return math.inf if time_budget is None else time_budget - (clock() - t0)

    def eval_estimate() -> float:
        """What the next evaluation will cost: the slowest of the last three measured
        (the first one, which may include compiling, only while it is the only one), or
        FIRST_EVAL_FORWARDS forwards before any."""
        if not eval_times:
            return FIRST_EVAL_FORWARDS * t_forward
        return max(eval_times[1:][-3:]) if len(eval_times) > 1 else eval_times[0]

    model = _Model(v0, kinds, depth_power, step_ms, smooth_sigma)
    best_obj = torch.full((b,), math.inf, dtype=torch.float64, device=dev)
    bar = None
    if progress:
        from ..utils import progress_bar
        bar = progress_bar(total=max_iter, desc="refine", unit="eval")

    budget_iters = ([max(1, int(round(max_iter * s / sum(shares)))) if s > 0 else 0 for s in shares]
                    if max_iter > 0 else [0] * len(shares))
    stop = False
    carry = 0  # iterations earlier stages left unused
    for (cutoff, _, reg_factor, eps_floor), n_stage in zip(stages, budget_iters):
        n_iter = n_stage + carry
        if stop:
            break
        if n_iter == 0:
            continue
        iters_before = iters
        model.reset(best_v)
        best_obj.fill_(math.inf)
        lam_stage = lam * float(reg_factor)
        eps_stage = {k: max(x, float(eps_floor)) for k, x in eps.items()}
        target = obs_sel if cutoff is None else lowpass(obs_sel.double(), float(cutoff), dt)

        def closure():
            # never start an evaluation that the measured ones say would overrun (keeping
            # time for the final misfit check, one forward)
            need = eval_estimate() + t_forward
            if remaining() < need:
                raise _OutOfTime
            te = clock()
            for p in model.parameters():
                p.grad = None
            v = model.velocity()
            sim = forward(v)
            if cutoff is not None:
                sim = lowpass(sim.double(), float(cutoff), dt)
            per = cost_scale * misfit(sim, target) + lam_stage * model.regulariser(v, eps_stage)
            total = per.sum()
            total.backward()
            with torch.no_grad():
                better = per.detach() < best_obj
                if bool(better.any()):
                    best_obj[better] = per.detach()[better]
                    best_v[better] = v.detach()[better]
            evals[0] += 1
            eval_times.append(clock() - te)
            if bar is not None:
                bar.update(1)
            return total

        params = model.parameters()
        try:
            if optimizer == "lbfgs":
                opt = torch.optim.LBFGS(params, lr=1.0, max_iter=n_iter, max_eval=int(n_iter * 2.5) + 1,
                                        history_size=history_size, line_search_fn="strong_wolfe",
                                        tolerance_grad=0.0, tolerance_change=1e-12)
                opt.step(closure)
                iters += int(opt.state[opt._params[0]].get("n_iter", 0))
                carry = max(0, n_iter - (iters - iters_before))
            else:
                opt = torch.optim.Adam(params, lr=lr)
                for _ in range(n_iter):
                    opt.zero_grad()
                    opt.step(closure)
                    iters += 1
                carry = 0
        except _OutOfTime:
            stop = True
            if optimizer == "lbfgs":
                iters += int(opt.state[opt._params[0]].get("n_iter", 0))
    if bar is not None:
        bar.close()

    # final check: keep a sample's refinement only where the full-band misfit fell
    with torch.no_grad():
        cand = best_v.clamp(lo, hi)
        after = misfit(forward(cand), obs_sel) if evals[0] else before.clone()
    kept = after < before
    out = torch.where(kept[:, None, None], cand, v0.clamp(lo, hi))
    elapsed = clock() - t0
    result = out.to(in_device, in_dtype if in_dtype.is_floating_point else torch.float32).reshape(in_shape)
    if is_numpy:
        result = result.cpu().numpy()
    if not return_info:
        return result
    info = [{"kind": kinds[i], "misfit_before": float(before[i]),
             "misfit_after": float(after[i]) if bool(kept[i]) else float(before[i]),
             "misfit_candidate": float(after[i]), "iterations": iters, "evaluations": evals[0],
             "kept": bool(kept[i]), "time": elapsed} for i in range(b)]
    return result, info
