"""Physics: the host's forward simulator, wavelets and velocity-family generators."""
from .forward import (CFL_LIMIT, DEFAULT_SOURCE_COLUMNS, ForwardModel, Geometry, damping_profile,
                      simulate, simulate_host_style)
from .wavelet import ricker

__all__ = ["simulate", "simulate_host_style", "ForwardModel", "Geometry", "damping_profile",
           "ricker", "CFL_LIMIT", "DEFAULT_SOURCE_COLUMNS"]
from .families import FAMILIES, FAULT_FAMILIES, generate

__all__ += ["FAMILIES", "FAULT_FAMILIES", "generate"]
from .misfit import pde_loss, seismic_misfit
from .refine import detect_family_kind, family_kind, refine

__all__ += ["pde_loss", "seismic_misfit", "refine", "detect_family_kind", "family_kind"]
# training-only modules are imported by name (a notebook that only predicts does not vendor
# them): fwi_core.physics.simulated (SimulatedDataset, mix_datasets) and
# fwi_core.physics.map_augment (augment_map, warp, blend, ...)
