"""Data misfit between observed gathers and ``simulate(velocity)``: the training loss term
(:func:`pde_loss`), the per-sample score of a prediction (:func:`seismic_misfit`) and the
cost refinement minimises (:func:`misfit`).

``pde_loss(prediction_ms, observed)`` is differentiable with respect to the velocity (the
adjoint of :mod:`.adjoint`), so it can be added to a training loss or minimised at test
time (:mod:`.refine`). Options make it affordable: a subset of shots, the first
``max_time`` samples only (the simulation then runs ``max_time`` steps), every
``time_stride``-th sample. The misfit is normalised per sample by the observed energy of
the selected part, so that loud and quiet samples weigh alike.
"""
from __future__ import annotations

from typing import Callable, Literal, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .forward import DEFAULT_SOURCE_COLUMNS, default_source_columns, simulate

ArrayLike = Union[np.ndarray, torch.Tensor]
Normalize = Literal["per_sample", "none"]
Reduction = Literal["mean", "sum", "none"]


def _as_velocity(velocity: Union[torch.Tensor, np.ndarray]) -> torch.Tensor:
    if isinstance(velocity, np.ndarray):
        velocity = torch.from_numpy(np.asarray(velocity, dtype=np.float32))
    if not torch.is_tensor(velocity):
        raise ValueError(f"pde_loss: velocity must be a tensor or numpy array, got {type(velocity).__name__}")
    if velocity.dim() == 4:
        if velocity.shape[1] != 1:
            raise ValueError(f"pde_loss: velocity of shape {tuple(velocity.shape)} must be (B,1,H,W) or (B,H,W)")
        velocity = velocity[:, 0]
    if velocity.dim() != 3:
        raise ValueError(f"pde_loss: velocity of shape {tuple(velocity.shape)} must be (B,1,H,W) or (B,H,W)")
    return velocity


def select(seismic: torch.Tensor, shots: Optional[Sequence[int]], max_time: Optional[int],
           time_stride: int) -> torch.Tensor:
    """The part of (B, n_shots, nt, n_rec) gathers that the loss compares: the given shots,
    the first ``max_time`` samples, every ``time_stride``-th of them."""
    if shots is not None:
        seismic = seismic[:, list(shots)]
    if max_time is not None:
        seismic = seismic[:, :, :max_time]
    return seismic[:, :, ::time_stride] if time_stride > 1 else seismic


def misfit(sim: torch.Tensor, observed: torch.Tensor, normalize: Normalize = "per_sample") -> torch.Tensor:
    """Per-sample misfit (B,) in float64 between two gathers of the same shape:
    ``||sim - obs||^2 / ||obs||^2`` (``"per_sample"``) or the mean squared difference
    (``"none"``)."""
    d = (sim.double() - observed.double()).flatten(1)
    sq = d.square().sum(1)
    if normalize == "per_sample":
        energy = observed.double().flatten(1).square().sum(1)
        return sq / energy.clamp_min(torch.finfo(torch.float64).tiny)
    return sq / d.shape[1]


def pde_loss(
    velocity_ms: Union[torch.Tensor, np.ndarray],
    observed: Union[torch.Tensor, np.ndarray],
    *,
    shots: Optional[Sequence[int]] = None,
    time_stride: int = 1,
    max_time: Optional[int] = None,
    normalize: Normalize = "per_sample",
    reduction: Reduction = "mean",
    clamp: Optional[Tuple[float, float]] = (1500.0, 4500.0),
    source_columns: Optional[Sequence[int]] = None,
    **simulate_kwargs,
) -> torch.Tensor:
    """Misfit between observed gathers and the simulation of a velocity map.

    Args:
        velocity_ms: (B,1,H,W) or (B,H,W) velocity in m/s; gradients flow to it when it
            requires grad (through :func:`simulate`'s adjoint).
        observed: (B, n_sources, nt_obs, W) raw gathers (as in the competition's files),
            tensor or numpy; moved to the velocity's device.
        shots: indices of the shots to compare (default: all); only those are simulated.
        time_stride: compare every ``time_stride``-th time sample (the simulation still
            runs every step: the scheme needs them).
        max_time: compare the first ``max_time`` samples only; the simulation runs
            ``max_time`` steps (default: all ``nt_obs``).
        normalize: ``"per_sample"``: ``||sim - obs||^2 / ||obs||^2`` over the selected
            part of each sample; ``"none"``: mean squared difference.
        reduction: ``"mean"`` or ``"sum"`` over the batch, or ``"none"`` for (B,).
        clamp: clamp the velocity to this range first (a prediction outside the plausible
            range would make the simulation refuse it; the gradient is zero where clamped),
            or None.
        source_columns: source columns of all ``n_sources`` shots (default: the
            competition's 0, 17, 34, 52, 69).
        **simulate_kwargs: passed to :func:`simulate` (``backend``, ``checkpoint_every``,
            ``batch_chunk``, ``nbc``, ...).

    Returns:
        A scalar (or (B,) for ``reduction="none"``) in the velocity's floating dtype
        (float32 for integer input), computed in float64.
    """
    v = _as_velocity(velocity_ms)
    if isinstance(observed, np.ndarray):
        observed = torch.from_numpy(np.asarray(observed, dtype=np.float32))
    if not torch.is_tensor(observed) or observed.dim() != 4:
        raise ValueError(f"pde_loss: observed must be (B, n_sources, nt, n_receivers), got "
                         f"{getattr(observed, 'shape', type(observed).__name__)}")
    b, h, w = v.shape
    if observed.shape[0] != b or observed.shape[3] != w:
        raise ValueError(f"pde_loss: observed of shape {tuple(observed.shape)} does not match velocity "
                         f"(B={b}, W={w}): expected ({b}, n_sources, nt, {w})")
    n_src, nt_obs = observed.shape[1], observed.shape[2]
    if source_columns is None:
        source_columns = DEFAULT_SOURCE_COLUMNS if (w == 70 and n_src == 5) else default_source_columns(n_src, w)
    cols = list(source_columns)
    if len(cols) != n_src:
        raise ValueError(f"pde_loss: observed has {n_src} shots but source_columns has {len(cols)}")
    if shots is not None:
        shots = [int(s) for s in shots]
        if not shots or any(s < 0 or s >= n_src for s in shots):
            raise ValueError(f"pde_loss: shots {shots} must be a non-empty subset of 0..{n_src - 1}")
    if max_time is not None and not 1 <= int(max_time) <= nt_obs:
        raise ValueError(f"pde_loss: max_time={max_time} must lie in 1..{nt_obs} (the observed nt)")
    if int(time_stride) < 1:
        raise ValueError(f"pde_loss: time_stride must be >= 1, got {time_stride}")
    if normalize not in ("per_sample", "none"):
        raise ValueError(f"pde_loss: normalize must be 'per_sample' or 'none', got {normalize!r}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"pde_loss: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if not v.is_floating_point():
        v = v.float()
    if clamp is not None:
        v = v.clamp(float(clamp[0]), float(clamp[1]))
    nt = int(max_time) if max_time is not None else nt_obs
    sim_cols = [cols[s] for s in shots] if shots is not None else cols
    sim = simulate(v, nt=nt, source_columns=sim_cols, **simulate_kwargs)
    obs = select(observed.to(device=sim.device), shots, nt, int(time_stride))
    per_sample = misfit(select(sim, None, None, int(time_stride)), obs, normalize)
    out = per_sample if reduction == "none" else per_sample.mean() if reduction == "mean" else per_sample.sum()
    return out.to(v.dtype)


def _as_float64(x, device=None) -> torch.Tensor:
    t = x if torch.is_tensor(x) else torch.from_numpy(np.asarray(x))
    return (t.to(device) if device is not None else t).to(torch.float64)


def _like_input(t: torch.Tensor, is_np: bool):
    return t.detach().cpu().numpy() if is_np else t


def seismic_misfit(velocity: ArrayLike, observed: ArrayLike,
                   simulator: Optional[Callable] = None, **simulate_kwargs) -> ArrayLike:
    """Normalised seismic misfit ``||simulate(v) - obs|| / ||obs||`` per sample (0 = exact).

    Args:
        velocity: (B,1,70,70) or (B,70,70) predicted velocity in m/s.
        observed: (B, n_sources, nt, n_receivers) observed (or host-simulated) seismic.
        simulator: ``f(velocity, **kw) -> seismic``; default
            :func:`~fwi_core.physics.forward.simulate`.
        **simulate_kwargs: passed on; ``nt`` defaults to ``observed.shape[-2]``.
    """
    is_np = not torch.is_tensor(velocity)
    v = velocity if torch.is_tensor(velocity) else torch.from_numpy(np.asarray(velocity))
    v = v.detach().to(torch.float32)
    obs = _as_float64(observed, v.device)
    if obs.dim() != 4 or obs.shape[0] != v.shape[0]:
        raise ValueError(f"seismic_misfit: observed must be (B, sources, nt, receivers) with "
                         f"B={v.shape[0]}, got {tuple(obs.shape)}")
    simulator = simulator or simulate
    simulate_kwargs.setdefault("nt", obs.shape[-2])
    sim = _as_float64(simulator(v, **simulate_kwargs), v.device)
    if sim.shape != obs.shape:
        raise ValueError(f"seismic_misfit: simulated {tuple(sim.shape)} vs observed "
                         f"{tuple(obs.shape)}: pass matching nt / geometry")
    b = obs.shape[0]
    num = (sim - obs).reshape(b, -1).norm(dim=1)
    den = obs.reshape(b, -1).norm(dim=1)
    return _like_input(num / den.clamp_min(1e-30), is_np)
