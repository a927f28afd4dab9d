"""What :func:`.refine.refine` is given, checked: the maps, the gathers, the options, the
continuation stages and the per-sample prior settings.

Every problem is an error naming the argument and what was expected
(:class:`~fwi_core.errors.ParameterError` for arguments, :class:`~fwi_core.errors.DataError`
for gathers that hold no usable data), raised before any simulation starts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..errors import DataError, ParameterError
from .kind_routing import family_kind
from .priors import DEFAULT_REG_WEIGHT, DEFAULT_TV_EPS, KINDS

__all__ = ["RefineInputs", "check_options", "continuation", "stage_iterations", "per_sample_setting",
           "prior_settings", "Stage"]


def _shape(x) -> str:
    return str(tuple(x.shape)) if hasattr(x, "shape") else type(x).__name__


@dataclass
class RefineInputs:
    """The checked inputs: start maps ``v0`` (B,H,W) float64 and observed gathers ``obs``
    (B, n_sources, nt, W) float32 on the working device, and what the output must look like."""

    v0: torch.Tensor
    obs: torch.Tensor
    shape: tuple
    dtype: torch.dtype
    device: torch.device
    is_numpy: bool

    @classmethod
    def read(cls, velocity, seismic, device, clamp: Tuple[float, float]) -> "RefineInputs":
        is_numpy = isinstance(velocity, np.ndarray)
        v_in = torch.from_numpy(np.asarray(velocity, dtype=np.float32)) if is_numpy else velocity
        if not torch.is_tensor(v_in) or v_in.dim() not in (3, 4) or (v_in.dim() == 4 and v_in.shape[1] != 1):
            raise ParameterError(f"refine: velocity must be (B,1,H,W) or (B,H,W) maps in m/s, got {_shape(velocity)}")
        obs = torch.from_numpy(np.asarray(seismic, dtype=np.float32)) if isinstance(seismic, np.ndarray) else seismic
        if not torch.is_tensor(obs) or obs.dim() != 4:
            raise ParameterError(f"refine: seismic must be (B, n_sources, nt, n_receivers) gathers, got {_shape(seismic)}")
        in_shape = tuple(v_in.shape)
        b, h, w = in_shape[0], in_shape[-2], in_shape[-1]
        if obs.shape[0] != b or obs.shape[3] != w:
            raise ParameterError(f"refine: seismic of shape {tuple(obs.shape)} does not match velocity {in_shape}: "
                                 f"expected ({b}, n_sources, nt, {w}) (one gather per map, one receiver per column)")
        if h != w:
            raise ParameterError(f"refine: velocity maps must be square (OpenFWI maps are {w}x{w} for {w} "
                                 f"receivers), got {in_shape}: expected ({b},1,{w},{w}) or ({b},{w},{w})")
        if b == 0:
            raise ParameterError("refine: velocity holds no map (batch of 0)")
        dev = torch.device(device) if device is not None else v_in.device
        v0 = (v_in[:, 0] if v_in.dim() == 4 else v_in).detach().to(dev, torch.float64)
        _check_velocity(v0, clamp)
        obs = obs.detach().to(dev, torch.float32)
        _check_seismic(obs)
        return cls(v0, obs, in_shape, v_in.dtype, v_in.device, is_numpy)

    def output(self, v: torch.Tensor):
        """Maps (B,H,W) in the input's shape, dtype (float32 for integer input), device and type."""
        out = v.to(self.device, self.dtype if self.dtype.is_floating_point else torch.float32).reshape(self.shape)
        return out.cpu().numpy() if self.is_numpy else out


def _samples(mask: torch.Tensor) -> str:
    ids = torch.nonzero(mask).flatten().tolist()
    return ", ".join(map(str, ids[:8])) + (" ..." if len(ids) > 8 else "")


def _check_velocity(v: torch.Tensor, clamp: Tuple[float, float]) -> None:
    finite = torch.isfinite(v).flatten(1).all(1)
    if not bool(finite.all()):
        raise ParameterError(f"refine: velocity has non-finite values (NaN or inf) in sample(s) {_samples(~finite)}")
    low = v.flatten(1).amin(1)
    if bool((low <= 0).any()):
        raise ParameterError(f"refine: velocity has values <= 0 m/s in sample(s) {_samples(low <= 0)} (lowest "
                             f"{float(low.min()):.4g}); expected maps in m/s (about {clamp[0]:g}..{clamp[1]:g}). A "
                             "normalised prediction must be mapped back first (fwi_core.data.denormalize_velocity)")
    high = v.flatten(1).amax(1)
    if bool((high < 0.5 * clamp[0]).any()):
        raise ParameterError(f"refine: velocity of sample(s) {_samples(high < 0.5 * clamp[0])} never exceeds "
                             f"{float(high.min()):.4g}: expected m/s (about {clamp[0]:g}..{clamp[1]:g}), not km/s "
                             "or a normalised map")


def _check_seismic(obs: torch.Tensor) -> None:
    finite = torch.isfinite(obs).flatten(1).all(1)
    if not bool(finite.all()):
        raise DataError(f"refine: seismic has non-finite values (NaN or inf) in sample(s) {_samples(~finite)}; "
                        "the data misfit of such a gather is undefined")
    silent = obs.flatten(1).abs().amax(1) == 0
    if bool(silent.any()):
        raise DataError(f"refine: seismic of sample(s) {_samples(silent)} is all zeros: nothing to fit")


def check_options(optimizer: str, max_iter: int, time_budget: Optional[float], clamp, accept: Dict[str, float]) -> None:
    if optimizer not in ("lbfgs", "adam"):
        raise ParameterError(f"refine: optimizer must be 'lbfgs' or 'adam', got {optimizer!r}")
    if max_iter < 0:
        raise ParameterError(f"refine: max_iter must be >= 0, got {max_iter}")
    if time_budget is not None and not time_budget >= 0:
        raise ParameterError(f"refine: time_budget must be >= 0 seconds, got {time_budget}")
    if len(clamp) != 2 or not 0 < clamp[0] < clamp[1]:
        raise ParameterError(f"refine: clamp must be (low, high) m/s with 0 < low < high, got {clamp}")
    if any(not (0 < x <= 1) for x in accept.values()):
        raise ParameterError(f"refine: accept_ratio must lie in (0, 1] (keep a map where its misfit fell below "
                             f"that share of the start's), got {accept}")


@dataclass(frozen=True)
class Stage:
    """One continuation stage.

    Attributes:
        cutoff: low-pass cutoff of the fitted data (Hz; None: the full band).
        share: share of the iterations (and, with a time budget, of the time).
        reg_factor: factor on the regulariser weight.
        eps_floor: floor on the TV eps (km/s).
        layers: flat samples are parametrised as layers (interface depths and layer
            velocities, :func:`~.priors.segment_profile`); a stage with ``layers`` is for
            flat samples only: the others skip it and take its iterations on.
    """

    cutoff: Optional[float] = None
    share: float = 1.0
    reg_factor: float = 1.0
    eps_floor: float = 0.0
    layers: bool = False


def _bad_stages(stages) -> ParameterError:
    return ParameterError(f"refine: stages must be Stage objects or (cutoff_hz or None, share >= 0[, reg factor[, "
                          f"eps floor >= 0 km/s]]) tuples with a positive share in all, got {stages}")


def continuation(stages: Sequence[Union[tuple, Stage]]) -> List[Stage]:
    """The stages as :class:`Stage` objects, checked."""
    out = []
    for st in stages:
        if not isinstance(st, Stage):
            st = tuple(st)
            if not 2 <= len(st) <= 4:
                raise _bad_stages(stages)
            st = Stage(None if st[0] is None else float(st[0]), float(st[1]), *(float(x) for x in st[2:4]))
        if st.share < 0 or st.eps_floor < 0 or (st.cutoff is not None and not st.cutoff > 0):
            raise _bad_stages(stages)
        out.append(st)
    if not out or not sum(st.share for st in out) > 0:
        raise _bad_stages(stages)
    return out


def stage_iterations(max_iter: int, stages: List[Stage]) -> List[int]:
    """``max_iter`` split over the stages by their shares (at least one for a positive share)."""
    shares = [st.share for st in stages]
    if max_iter <= 0:
        return [0] * len(shares)
    return [max(1, int(round(max_iter * s / sum(shares)))) if s > 0 else 0 for s in shares]


def per_sample_setting(name: str, value: Union[float, Dict[str, float], None], defaults: Dict[str, float],
                       kinds: List[str], families: List[Optional[str]]) -> List[float]:
    """A setting per sample: ``defaults`` (per kind) updated by a dict whose keys are kinds
    or family names (a family's entry wins over its kind's), or one float for all."""
    if value is None:
        return [float(defaults[k]) for k in kinds]
    if not isinstance(value, dict):
        return [float(value)] * len(kinds)
    bad = []
    for key in value:
        try:
            family_kind(key)
        except ValueError:
            bad.append(key)
    if bad or any(key in KINDS and key not in defaults for key in value):
        raise ParameterError(f"refine: {name} has unknown kinds {sorted(set(bad) | (set(value) & set(KINDS) - set(defaults)))}; "
                             f"expected kinds {sorted(defaults)} or family names")
    return [float(value.get(f, value.get(k, defaults[k])) if f is not None else value.get(k, defaults[k]))
            for k, f in zip(kinds, families)]


def prior_settings(kinds: List[str], families: List[Optional[str]], reg_weight, tv_eps,
                   device) -> Tuple[torch.Tensor, List[Dict[str, float]]]:
    """Per-sample regulariser weights (B,) float64 and TV eps (one dict per sample)."""
    lam = torch.tensor(per_sample_setting("reg_weight", reg_weight, DEFAULT_REG_WEIGHT, kinds, families),
                       dtype=torch.float64, device=device)
    if bool((lam < 0).any()):
        raise ParameterError(f"refine: reg_weight must be >= 0, got {reg_weight}")
    tv_kinds = [k if k in DEFAULT_TV_EPS else "tv" for k in kinds]  # the smooth kind has no TV
    eps = per_sample_setting("tv_eps", tv_eps, DEFAULT_TV_EPS, tv_kinds, families)
    if any(not (x > 0) for x in eps):
        raise ParameterError(f"refine: tv_eps must be > 0 km/s, got {tv_eps}")
    return lam, [{k: e} for k, e in zip(tv_kinds, eps)]
