"""Time-budgeted inference: a planner that spends a deadline on the stages worth most.

    from fwi_core.ensemble import Ensemble
    from fwi_core.inference_plan import Deadline, run_budgeted

    summary = run_budgeted(Ensemble.from_checkpoints(paths), root, "submission.csv",
                           time_budget=11 * 3600)        # seconds from the process start

Modules, each importing only those listed before it:

- :mod:`.deadline`: :class:`Deadline` (counted from the process start);
- :mod:`.source`: test files and arrays, streamed in fixed batches, unreadable files flagged;
- :mod:`.store`: the state folder's disk-backed per-file arrays and progress file;
- :mod:`.submission_csv`: the fast, atomic ``submission.csv`` writer;
- :mod:`.gains`: the validation gains table (``stage_gains.json``);
- :mod:`.stages`: the stage interface, the stage registry and one module per stage;
- :mod:`.progress`: the run's fingerprint, state, commits and restore;
- :mod:`.summary`: :class:`RunSummary`;
- :mod:`.policy`: what to run next (gain per second, estimates, re-planning);
- :mod:`.runner`: running a stage (batches, fallbacks, the CSV);
- :mod:`.planner`: :class:`BudgetedInference` / :func:`run_budgeted`, wiring the above;
- :mod:`.measure`: measuring the gains table on validation data (runs the planner; imported
  by name, ``from fwi_core.inference_plan.measure import measure_stage_gains``, so the infer
  notebook does not carry it);
- :mod:`.setup`: one way to set a run up (:func:`prepare_inference`), for the CLI and the infer kernel;
- :mod:`.scores`: :class:`StageScores`, the MAE per family after each stage when the solution is known.

:mod:`.identity` (content digests of the members, stages and resources) names members in
the run's fingerprint and in the gains table alike.
"""
from ..errors import InsufficientBudgetError, StageError
from .deadline import DEFAULT_SAFETY_MARGIN, Deadline
from .gains import DEFAULT_GAINS, GAINS_FILE, StageGains, find_stage_gains, find_stage_gains_file
from .identity import member_digests
from .planner import BudgetedInference, run_budgeted
from .progress import default_state_dir
from .runner import CorruptedFileWarning
from .scores import StageScores
from .setup import InferenceOptions, InferenceSetup, find_consistency_flagger, plan_stages, prepare_inference
from .source import ArraySource, TestFileSource
from .stages import (DEFAULT_STAGES, BatchState, ConsistencyStage, CRFStage, FlipStage, MCDropoutStage,
                     MemberStage, RefineStage, RunContext, Stage, build_stages, register_stage, registered_stages)
from .store import PredictionStore, StoredArray
from .submission_csv import format_submission_rows, write_submission_csv
from .summary import RunSummary

__all__ = [
    "BudgetedInference", "Deadline", "RunSummary", "InsufficientBudgetError", "CorruptedFileWarning",
    "run_budgeted", "default_state_dir", "DEFAULT_SAFETY_MARGIN", "Stage", "BatchState", "RunContext", "MemberStage",
    "FlipStage", "CRFStage", "MCDropoutStage", "StageError", "build_stages", "register_stage",
    "registered_stages", "DEFAULT_STAGES", "StageGains",
    "find_stage_gains", "DEFAULT_GAINS", "GAINS_FILE", "TestFileSource", "ArraySource",
    "PredictionStore", "StoredArray", "format_submission_rows", "write_submission_csv", "RefineStage",
    "ConsistencyStage", "InferenceOptions", "InferenceSetup", "prepare_inference", "plan_stages",
    "find_consistency_flagger", "find_stage_gains_file", "member_digests", "StageScores",
]
