"""Physics: the host's forward simulator, wavelets and velocity-family generators."""
from .forward import (CFL_LIMIT, DEFAULT_SOURCE_COLUMNS, ForwardModel, Geometry, damping_profile,
                      simulate, simulate_host_style)
from .wavelet import ricker, ricker_peak_delay

__all__ = ["simulate", "simulate_host_style", "ForwardModel", "Geometry", "damping_profile",
           "ricker", "ricker_peak_delay", "CFL_LIMIT", "DEFAULT_SOURCE_COLUMNS"]
from .families import FAMILIES, FAULT_FAMILIES, family_statistics, generate

__all__ += ["FAMILIES", "FAULT_FAMILIES", "generate", "family_statistics"]
