"""Moved to :mod:`fwi_core.physics.misfit` (kept while refine.py still imports it)."""
from .misfit import misfit, pde_loss, select  # noqa: F401
