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
from .map_augment import DEFAULT_AUGMENT, affine_warp, augment_map, blend, crop_resize, crop_window, warp
from .simulated import MixedDataset, SimulatedDataset, mix_datasets

__all__ += ["SimulatedDataset", "MixedDataset", "mix_datasets", "DEFAULT_AUGMENT", "crop_resize", "crop_window",
            "affine_warp", "warp", "blend", "augment_map"]
