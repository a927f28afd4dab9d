"""Time-budgeted inference: a planner that spends a deadline on the stages worth most.

    from fwi_core.ensemble import Ensemble
    from fwi_core.tta import Deadline, run_budgeted

    summary = run_budgeted(Ensemble.from_checkpoints(paths), root, "submission.csv",
                           time_budget=11 * 3600)        # seconds from the process start

Modules: :mod:`.planner` (the planner, deadline, run summary), :mod:`.stages` (the stage
interface and the built-in stages), :mod:`.gains` (the validation gains table),
:mod:`.store` (disk-backed per-file arrays, the fast CSV writer), :mod:`.source` (test
files and arrays, streamed with unreadable files flagged).
"""
from .gains import (DEFAULT_GAINS, GAINS_FILE, StageGains, compute_stage_gains, find_stage_gains,
                    measure_stage_gains)
from .planner import (DEFAULT_SAFETY_MARGIN, BudgetedInference, CorruptedFileWarning, Deadline,
                      InsufficientBudgetError, RunSummary, default_state_dir, run_budgeted)
from .source import ArraySource, TestFileSource
from .stages import (DEFAULT_STAGES, BatchState, CRFStage, FlipStage, MCDropoutStage, MemberStage,
                     RunContext, Stage, StageError, build_stages, register_stage, registered_stages)
from .store import PredictionStore, StoredArray, format_submission_rows, write_submission_csv
from . import refine_stage  # noqa: E402,F401  (registers the refine_layered and refine stages)
from .refine_stage import RefineStage
from . import consistency_stage  # noqa: E402,F401  (registers the consistency stage)
from .consistency_stage import ConsistencyStage

__all__ = [
    "BudgetedInference", "Deadline", "RunSummary", "InsufficientBudgetError", "CorruptedFileWarning",
    "run_budgeted", "default_state_dir", "DEFAULT_SAFETY_MARGIN", "Stage", "BatchState", "RunContext", "MemberStage",
    "FlipStage", "CRFStage", "MCDropoutStage", "StageError", "build_stages", "register_stage",
    "registered_stages", "DEFAULT_STAGES", "StageGains", "compute_stage_gains", "measure_stage_gains",
    "find_stage_gains", "DEFAULT_GAINS", "GAINS_FILE", "TestFileSource", "ArraySource",
    "PredictionStore", "StoredArray", "format_submission_rows", "write_submission_csv", "RefineStage",
    "ConsistencyStage",
]
