"""Small ensemble networks (family classifier, meta-learner) saved as one file each.

A saved file is a ``torch.save`` dict that ``weights_only`` loading reads: ``format``
(the class's file format), the constructor's fields, ``state`` (the weights) and
``report`` (what training measured). A class opts in by subclassing :class:`SavedModule`
and saying which fields rebuild it.
"""
from __future__ import annotations

import abc
import os
from pathlib import Path
from typing import Any, Dict, Union

import torch

from ..utils import atomic_path

PathLike = Union[str, os.PathLike]


def load_saved(path: PathLike, what: str, fmt: str) -> dict:
    """The dict a ``save`` of the package wrote to ``path`` (a ``.pt`` file whose
    ``format`` is ``fmt``); ``what`` names the object in the errors: FileNotFoundError when
    missing, ValueError when unreadable or of another format."""
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


class SavedModule(abc.ABC):
    """Mixin for an ``nn.Module`` saved by :meth:`save` and rebuilt by :meth:`load`.

    Subclasses set ``FORMAT`` (the file format string) and ``WHAT`` (its name in errors)
    and implement :meth:`saved_fields` and :meth:`from_saved_fields`."""

    FORMAT: str = ""
    WHAT: str = ""

    @abc.abstractmethod
    def saved_fields(self) -> Dict[str, Any]:
        """The constructor's fields (plain values) that :meth:`from_saved_fields` takes."""

    @classmethod
    @abc.abstractmethod
    def from_saved_fields(cls, fields: Dict[str, Any]):
        """A new, untrained instance built from :meth:`saved_fields`."""

    def save(self, path: PathLike) -> Path:
        """Write the fields, weights and report (atomic, weights_only-safe)."""
        path = Path(path)
        with atomic_path(path, suffix=".pt") as tmp:
            torch.save({"format": self.FORMAT, **self.saved_fields(),
                        "state": {k: v.detach().cpu() for k, v in self.state_dict().items()},
                        "report": getattr(self, "report", None)}, tmp)
        return path

    @classmethod
    def load(cls, path: PathLike, device: Union[str, torch.device] = "cpu"):
        """The saved instance in eval mode on ``device`` (FileNotFoundError when missing,
        ValueError when unreadable or of another format)."""
        d = load_saved(path, cls.WHAT, cls.FORMAT)
        obj = cls.from_saved_fields(d)
        obj.load_state_dict(d["state"])
        obj.report = d.get("report")
        return obj.to(device).eval()
