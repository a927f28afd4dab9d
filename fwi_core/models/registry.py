"""Model registry (timm-style): ``@register_model`` fills a dict; ``create_model`` builds.

Every registered model maps normalised seismic (B, 5, 1000, 70) to normalised velocity
(B, 1, 70, 70) in [-1, 1]; the parametrised tests run over ``list_models()``.
"""
from __future__ import annotations

import fnmatch
from typing import Callable, Dict, List

import torch.nn as nn

_MODELS: Dict[str, Callable[..., nn.Module]] = {}


class UnknownModelError(RuntimeError):
    """Raised by :func:`create_model` for a name that no model registered."""


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register a model factory under its function name."""
    name = fn.__name__
    if name in _MODELS and _MODELS[name] is not fn:
        raise ValueError(f"model {name!r} is registered twice")
    _MODELS[name] = fn
    return fn


def list_models(pattern: str = "*") -> List[str]:
    """Sorted names of the registered models matching a shell-style ``pattern``."""
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def is_model(name: str) -> bool:
    return name in _MODELS


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model by name; ``kwargs`` go to its factory."""
    if name not in _MODELS:
        raise UnknownModelError(
            f"Unknown model {name!r}; registered models: {', '.join(list_models()) or '(none)'}")
    return _MODELS[name](**kwargs)
