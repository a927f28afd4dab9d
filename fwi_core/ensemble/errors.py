"""Errors of the ensemble package."""
from __future__ import annotations

from pathlib import Path


class EnsembleConfigError(ValueError):
    """An ensemble JSON file (or weights table) is malformed: the message names the file
    and the field (e.g. ``ens.json: weights.FlatVel_A.cnx: negative weight -0.1``)."""


def load_saved(path, what: str, fmt: str) -> dict:
    """The dict a ``save`` of the package wrote to ``path`` (a ``.pt`` file whose
    ``format`` is ``fmt``); ``what`` names the object in the errors: FileNotFoundError when
    missing, ValueError when unreadable or of another format."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} not found")
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: not a readable {what} ({type(exc).__name__}: {exc})") from exc
    if not isinstance(d, dict) or d.get("format") != fmt:
        raise ValueError(f"{path}: not a {what} file (format {fmt!r} expected)")
    return d
