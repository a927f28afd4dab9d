"""Which prior of :mod:`.priors` each sample of a refinement gets: its family kind.

A kind comes from an OpenFWI family name (:func:`family_kind`) or, without one, from
simple tests on the map and the observed gathers (:func:`detect_family_kind`).
"""
from __future__ import annotations

from typing import List, Sequence, Union

import numpy as np
import torch

from ..errors import ParameterError
from .families import FAMILIES
from .priors import KINDS


def family_kind(family: str) -> str:
    """The regulariser kind of an OpenFWI family name: ``"flat"``, ``"tv"`` or ``"smooth"``."""
    if family in KINDS:
        return family
    if family not in FAMILIES:
        raise ParameterError(f"refine: unknown family {family!r}; expected one of {', '.join(FAMILIES)} "
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
        raise ParameterError(f"detect_family_kind: velocity of shape {tuple(v.shape)} must be (B,1,H,W) or (B,H,W)")
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


def sample_kinds(family: Union[str, Sequence[str], None], velocity: torch.Tensor, seismic: torch.Tensor,
                 b: int) -> List[str]:
    """The kinds of a batch of ``b`` samples: one family (name or kind) for all, one per
    sample, or None to detect them (:func:`detect_family_kind`)."""
    if family is None:
        return detect_family_kind(velocity, seismic)
    if isinstance(family, str):
        return [family_kind(family)] * b
    fams = list(family)
    if len(fams) != b:
        raise ParameterError(f"refine: family has {len(fams)} entries for a batch of {b}")
    return [family_kind(str(f)) for f in fams]
