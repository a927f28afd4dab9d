"""What a run is made of, as content digests: the members' weights, the ensemble's weights
and small networks, the stages' options and the resources they use.

Two uses, one naming: the run's fingerprint (:mod:`.progress`: a saved run is resumed only
when these are identical, so a retrained checkpoint under the same name starts over) and
the gains table (:mod:`.gains`: a table measured on validation names its members by the
digest of their weights too, so it applies to the same weights under another member name,
``inv-fold0/best`` loaded from a checkpoint or ``inv-fold0`` from an ensemble JSON).

    member_digests(ensemble)   # {"inv-fold0/best": "3f2a...", ...}  (sha1 of the weights)
"""
from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Dict, Mapping, Optional

import numpy as np
import torch

__all__ = ["module_digest", "member_digests", "ensemble_identity", "resource_id", "resources_identity", "digest_of"]

#: Resources that describe where a run computes, not what it computes.
_NOT_IDENTITY = {"ensemble", "device"}


def module_digest(module: Optional[torch.nn.Module]) -> Optional[str]:
    """sha1 of a module's state (parameter and buffer names, dtypes, shapes and bytes), or None."""
    if module is None:
        return None
    h = hashlib.sha1()
    for name, t in module.state_dict().items():
        t = t.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        arr = t.cpu().contiguous()
        if arr.dtype == torch.bfloat16:
            arr = arr.view(torch.int16)
        h.update(arr.numpy().tobytes())
    return h.hexdigest()


def member_digests(ensemble) -> Dict[str, str]:
    """Member name -> digest of its weights (computed once per ensemble object)."""
    cache = getattr(ensemble, "_fwi_member_digests", None)
    names = list(ensemble.member_names)
    if cache is None or list(cache) != names:
        cache = {m: module_digest(ensemble.members[m].model) for m in names}
        try:
            ensemble._fwi_member_digests = cache
        except AttributeError:  # pragma: no cover - a foreign ensemble without a __dict__
            pass
    return dict(cache)


def ensemble_identity(ensemble) -> Dict[str, Any]:
    """The members' weights, the combination weights, the family classifier and the
    meta-learner of an ensemble, as digests."""
    weights = getattr(ensemble, "weights", None)
    return {"members": member_digests(ensemble),
            "weights": digest_of(weights.to_dict()) if hasattr(weights, "to_dict") else None,
            "family_classifier": module_digest(getattr(ensemble, "family_classifier", None)),
            "meta_learner": module_digest(getattr(ensemble, "meta_learner", None))}


def resource_id(value: Any) -> Any:
    """A JSON-able identity of one resource: plain values as they are, modules by their
    digest, objects with ``config()`` (the CRF) by it, objects with a ``model`` and a
    ``threshold`` (the consistency flagger) by both, anything else by its type name."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (np.integer, np.floating)):
        return resource_id(value.item())
    if isinstance(value, Mapping):
        return {str(k): resource_id(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [resource_id(v) for v in value]
    if isinstance(value, torch.nn.Module):
        return {"module": type(value).__name__, "sha1": module_digest(value)}
    if callable(getattr(value, "config", None)):
        try:
            return {"type": type(value).__name__, "config": resource_id(value.config())}
        except Exception:  # noqa: BLE001 - a foreign object: identify it by its type
            pass
    if hasattr(value, "threshold") and isinstance(getattr(value, "model", None), torch.nn.Module):
        return {"type": type(value).__name__, "threshold": resource_id(float(value.threshold)),
                "model": module_digest(value.model)}
    return {"type": type(value).__name__}


def resources_identity(resources: Mapping[str, Any]) -> Dict[str, Any]:
    """:func:`resource_id` of every resource that changes what a run computes."""
    return {k: resource_id(v) for k, v in sorted(resources.items()) if k not in _NOT_IDENTITY}


def digest_of(obj: Any) -> str:
    """sha1 of a JSON-able object (keys sorted)."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
