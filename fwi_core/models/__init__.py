"""The model zoo: every model maps normalised seismic (B, 5, 1000, 70) to normalised
velocity (B, 1, 70, 70) in [-1, 1].

    from fwi_core.models import create_model, list_models
    model = create_model("inversionnet")

Importing this package registers every model; the timm-backbone models import timm only
when built, so the package needs only numpy and torch.
"""
from __future__ import annotations

import torch.nn as nn

from ..errors import UnknownModelError
from .registry import Capabilities, create_model, is_model, list_models, model_capabilities, register_model
from . import inversionnet, invertible_unet, specproj_unet, timm_unet  # noqa: F401  (registration)
from . import residual_stacker  # noqa: F401  (registration)
from . import residual  # noqa: F401  (registration: residual_stage)
from . import egnn  # noqa: F401  (registration; torch-geometric is imported when built)
from . import heat_diffusion  # noqa: F401  (registration)
from . import se3_transformer  # noqa: F401  (registration; e3nn is imported when built)
from . import meshcnn  # noqa: F401  (registration)

__all__ = ["create_model", "list_models", "register_model", "is_model", "UnknownModelError", "Capabilities",
           "model_capabilities",
           "enable_mc_dropout", "count_parameters"]


def enable_mc_dropout(model: nn.Module) -> nn.Module:
    """Monte Carlo dropout (Gal & Ghahramani 2016): put ``model`` in eval mode (BatchNorm
    uses running statistics) and switch only its dropout layers back to train mode, so
    repeated forward passes sample different dropout masks. Returns ``model``; call
    ``model.eval()`` to turn MC dropout off again."""
    model.eval()
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.train()
    return model


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable, by default) parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
