"""The stages of budgeted inference: the interface and one module per built-in stage.

- :mod:`.base`: :class:`Stage` (the interface), :class:`BatchState` (what a stage sees of
  a batch), :class:`RunContext` (what it sees of the run), stored-array names;
- :mod:`.registry`: stage names (:func:`register_stage`, :func:`build_stages`,
  :data:`DEFAULT_STAGES`);
- one module per stage: :mod:`.members` (``member:<name>``), :mod:`.flip`, :mod:`.crf`,
  :mod:`.mc_dropout`, :mod:`.refine` (``refine_layered`` and ``refine``),
  :mod:`.consistency`, :mod:`.prior` (the first prediction from an existing submission).

**Adding a stage means one new module plus its registration**: the module defines the
:class:`Stage` subclass (importing :mod:`.base`, :mod:`.members` when it looks at member
stages, and what it computes with) and ends with its :func:`register_stage` call (a name
and a factory ``factory(resources) -> Stage``); the registration is then one import line
below, which runs that call. Nothing else in the package changes: the planner knows
stages only through the :class:`Stage` interface.
"""
from __future__ import annotations

from .base import MAP, BatchState, RunContext, Stage, member_array, stage_array
from .members import MemberStage
from .registry import DEFAULT_STAGES, StageFactory, build_stages, register_stage, registered_stages

# the registered stages: importing each module registers its name(s)
from .flip import FlipStage                      # "flip"
from .crf import CRFStage                        # "crf"
from .mc_dropout import MCDropoutStage           # "mc_dropout"
from .refine import RefineStage                  # "refine_layered", "refine"
from .consistency import ConsistencyStage        # "consistency"
from .prior import NoMembers, PriorStage, PriorSubmission   # "prior"

__all__ = ["Stage", "BatchState", "RunContext", "MAP", "member_array", "stage_array", "MemberStage", "FlipStage",
           "CRFStage", "MCDropoutStage", "RefineStage", "ConsistencyStage", "PriorStage", "PriorSubmission", "NoMembers", "DEFAULT_STAGES", "StageFactory",
           "register_stage", "registered_stages", "build_stages"]

