"""Model registry (timm-style): ``@register_model`` fills a dict; ``create_model`` builds.

Every registered model maps normalised seismic (B, 5, 1000, 70) to normalised velocity
(B, 1, 70, 70) in [-1, 1]; the parametrised tests run over ``list_models()``.

What a model can do beyond ``forward(x)`` is declared where it is registered, as
:class:`Capabilities`, and read with :func:`model_capabilities` (the engine, the residual
stage and the tests ask the registry, not the model's attributes)::

    @register_model(capabilities=Capabilities(accepts_prior=True))
    def my_model(**kwargs): ...
"""
from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Union

import torch.nn as nn

from ..errors import UnknownModelError

__all__ = ["Capabilities", "register_model", "list_models", "is_model", "create_model", "model_capabilities"]


@dataclass(frozen=True)
class Capabilities:
    """What a registered model offers besides ``forward(x)``.

    Attributes:
        accepts_prior: ``forward(x, prior=...)`` takes a first prediction (B, 1, 70, 70),
            normalised (a residual stage passes its backbone's).
        accepts_residual: ``forward(x, residual=...)`` takes the data residual
            ``x - normalize(simulate(prior))`` (B, 5, 1000, 70).
        adds_prior: the output already is ``prior + correction`` (the residual stage then
            passes it through instead of bounding a correction itself).
        family_terms: the model has per-family terms when built with ``num_families > 0``:
            ``forward(x, family_idx=...)`` and ``model.num_families``.
        auxiliary_losses: ``model.auxiliary_losses(family_idx) -> {name: loss}`` after a
            forward pass (the engine adds them, weighted per name).
        inverse_consistency: ``model.inverse_consistency(x, velocity=...)`` scores how well
            a final map explains the gathers (the consistency stage).
    """

    accepts_prior: bool = False
    accepts_residual: bool = False
    adds_prior: bool = False
    family_terms: bool = False
    auxiliary_losses: bool = False
    inverse_consistency: bool = False

    def names(self) -> List[str]:
        """The capabilities this model declares."""
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name)]


NONE = Capabilities()
_MODELS: Dict[str, Callable[..., nn.Module]] = {}
_CAPABILITIES: Dict[str, Capabilities] = {}


def register_model(fn: Optional[Callable[..., nn.Module]] = None, *, capabilities: Capabilities = NONE):
    """Decorator: register a model factory under its function name, with what it can do
    (``@register_model`` or ``@register_model(capabilities=Capabilities(...))``)."""
    if not isinstance(capabilities, Capabilities):
        raise TypeError(f"register_model: capabilities must be a Capabilities, got {type(capabilities).__name__}")

    def add(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = factory.__name__
        if name in _MODELS and _MODELS[name] is not factory:
            raise ValueError(f"model {name!r} is registered twice")
        _MODELS[name] = factory
        _CAPABILITIES[name] = capabilities
        return factory

    return add(fn) if fn is not None else add


def list_models(pattern: str = "*", capability: Optional[str] = None) -> List[str]:
    """Sorted names of the registered models matching a shell-style ``pattern`` (and
    declaring ``capability``, a :class:`Capabilities` field name, when given)."""
    if capability is not None and capability not in {f.name for f in dataclasses.fields(Capabilities)}:
        raise ValueError(f"list_models: unknown capability {capability!r}; known: "
                         f"{', '.join(f.name for f in dataclasses.fields(Capabilities))}")
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern)
                  and (capability is None or getattr(_CAPABILITIES[n], capability)))


def is_model(name: str) -> bool:
    return name in _MODELS


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model by name; ``kwargs`` go to its factory. The model remembers
    its registry name (``model.fwi_model_name``) so :func:`model_capabilities` finds it."""
    if name not in _MODELS:
        raise UnknownModelError(
            f"Unknown model {name!r}; registered models: {', '.join(list_models()) or '(none)'}")
    model = _MODELS[name](**kwargs)
    model.fwi_model_name = name
    return model


def model_capabilities(model: Union[str, nn.Module]) -> Capabilities:
    """The capabilities declared for a registered model name, or for a model built by
    :func:`create_model` (a module built otherwise declares none)."""
    name = model if isinstance(model, str) else getattr(model, "fwi_model_name", None)
    if isinstance(model, str) and name not in _MODELS:
        raise UnknownModelError(f"Unknown model {name!r}; registered models: {', '.join(list_models())}")
    return _CAPABILITIES.get(name, NONE)
