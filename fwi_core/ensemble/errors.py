"""Errors of the ensemble package."""
from __future__ import annotations


class EnsembleConfigError(ValueError):
    """An ensemble JSON file (or weights table) is malformed: the message names the file
    and the field (e.g. ``ens.json: weights.FlatVel_A.cnx: negative weight -0.1``)."""
