"""One way to set up a run: the CLI (``python -m fwi_core.predict``) and the infer kernel
both call :func:`prepare_inference`, with the defaults of :class:`InferenceOptions`.

    setup = prepare_inference(root, ["runs/"], options=InferenceOptions(mc_passes=4))
    print(setup.describe())            # members, CRF, consistency, the gains and where from, the plan
    summary = setup.run("submission.csv", deadline=Deadline.from_budget(11 * 3600))

It finds the test files, loads the ensemble (checkpoints, or an ensemble JSON), the tuned
CRF (``crf.json``), the consistency flagger (``consistency.json`` beside an
``invertible_unet`` checkpoint), the gains table (``stage_gains.json``, or a path given)
and builds the stage list from the options: the same plan whichever entry point runs it.

With ``prior_submission`` (a CSV) the plan starts from that submission instead of the
member networks (:mod:`.stages.prior`): checkpoints are then optional (without any the
ensemble is empty, :class:`~.stages.prior.NoMembers`), every test file must be in the CSV
(checked here, before any work), and the default stage list becomes ``prior`` followed by
its transforms (``crf``, ``refine_layered``, ``refine``, ``consistency``: those without
what they need are skipped).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from ..crf import load_crf
from ..data import find_competition_root
from ..errors import StageError
from ..ensemble import Ensemble
from ..inverse_consistency import ConsistencyFlagger
from ..models.checkpoint import find_checkpoints
from .deadline import Deadline
from .gains import StageGains, find_stage_gains_file
from .planner import run_budgeted
from .source import TestFileSource
from .stages import DEFAULT_STAGES
from .stages.prior import PRIOR_RESOURCE, NoMembers, PriorSubmission
from .stages.refine import DEFAULT_ITERS
from .stages.registry import check_stage_names
from .summary import RunSummary

PathLike = Union[str, os.PathLike]

__all__ = ["InferenceOptions", "InferenceSetup", "prepare_inference", "plan_stages", "find_consistency_flagger",
           "PRODUCERS"]

#: The producer stages of the default list: a ``prior`` run replaces them with ``prior``.
PRODUCERS = ("members", "flip", "mc_dropout")


@dataclass(frozen=True)
class InferenceOptions:
    """Every setting of a run, with the defaults the CLI and the infer kernel share.

    Attributes:
        stages: stage names in priority order (:data:`~fwi_core.inference_plan.stages.DEFAULT_STAGES`:
            members, flip, crf, mc_dropout, refine_layered, refine, consistency).
        refine_iters: L-BFGS iterations of physics refinement: flat-layered samples, the others.
        checkpoint_kind: best | snapshot | last | all (which checkpoints of a folder are members).
        flip_tta, use_crf: False drops the ``flip`` / ``crf`` stage.
        mc_passes: MC-dropout passes.
        batch_size, num_workers: batching and file-reading workers.
        store_dtype: dtype of the stored member predictions (float32 or float16).
        seed: seed of the stochastic stages.
        state_limit_gb: what the state folder may hold (None: 40 GB on Kaggle, where it
            lives in the temp folder; elsewhere 90% of the free disk).
        gather_cache: keep a float16 copy of the gathers the limit leaves room for, so
            later passes do not read the test files again.
    """

    stages: Tuple[str, ...] = tuple(DEFAULT_STAGES)
    refine_iters: Tuple[int, int] = tuple(DEFAULT_ITERS)
    checkpoint_kind: str = "best"
    flip_tta: bool = True
    use_crf: bool = True
    mc_passes: int = 8
    batch_size: int = 16
    num_workers: int = 0
    store_dtype: str = "float32"
    seed: int = 0
    state_limit_gb: Optional[float] = None
    gather_cache: bool = True

    def with_(self, **changes: Any) -> "InferenceOptions":
        """A copy with the given fields changed; a None value keeps the default."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise TypeError(f"InferenceOptions: unknown option(s) {unknown}; options: {', '.join(sorted(known))}")
        kept = {k: (tuple(v) if isinstance(v, list) else v) for k, v in changes.items() if v is not None}
        return replace(self, **kept)


def plan_stages(options: InferenceOptions, prior: bool = False) -> List[str]:
    """The stage list of ``options`` (``flip`` / ``crf`` dropped when switched off); with a
    ``prior`` submission and the default list, ``prior`` in place of its producers.

    Raises:
        StageError: a prior submission with a stage list (not the default) without ``prior``.
    """
    stages = list(options.stages)
    if prior and "prior" not in stages:
        if tuple(stages) != tuple(DEFAULT_STAGES):
            raise StageError(f"a prior submission is given but the stage list {stages} has no 'prior' "
                             "(e.g. --stages prior refine_layered refine)")
        stages = ["prior"] + [s for s in stages if s not in PRODUCERS]
    return [s for s in stages if (options.flip_tta or s != "flip") and (options.use_crf or s != "crf")]


def find_consistency_flagger(ensemble) -> Tuple[Optional[ConsistencyFlagger], str]:
    """The consistency flagger of the first ``invertible_unet`` member with a
    ``consistency.json`` beside its checkpoint (the train kernel writes it), and where it
    came from; (None, why not) without one."""
    for name, member in ensemble.members.items():
        marker = member.path.parent / "consistency.json" if member.path is not None else None
        if marker is not None and marker.is_file() and hasattr(member.model, "inverse_consistency"):
            flagger = ConsistencyFlagger.load(member.model, marker)
            return flagger, f"{name}, threshold {flagger.threshold:.4g} ({marker})"
    return None, "off (no consistency.json beside an invertible_unet checkpoint)"


@dataclass
class InferenceSetup:
    """A run, set up (see the module doc): what :meth:`run` needs and :meth:`describe` prints."""

    root: Path
    source: TestFileSource
    ensemble: Ensemble
    options: InferenceOptions
    stages: List[str]
    crf: Any = None
    crf_from: str = "off"
    flagger: Optional[ConsistencyFlagger] = None
    flagger_from: str = "off"
    gains: StageGains = field(default_factory=StageGains)
    gains_from: str = "built-in defaults (no stage_gains.json beside the checkpoints)"
    prior: Optional[PriorSubmission] = None

    @property
    def resources(self) -> Dict[str, Any]:
        """The stage factories' resources besides the ensemble, CRF and MC passes."""
        out = {"refine_iters": list(self.options.refine_iters), "consistency": self.flagger}
        if self.prior is not None:
            out[PRIOR_RESOURCE] = self.prior
        return out

    def describe(self) -> str:
        """What the run will use: data, members, CRF, consistency flags, the gains and
        where they come from, the plan."""
        lines = [f"data: {self.root} ({len(self.source)} test files)"]
        if self.prior is not None:
            lines.append(f"prior submission: {self.prior.path} (the first prediction; even columns interpolated)")
        lines.append("members:" if len(self.ensemble) else "members: none")
        lines += [f"  {n} ({m.path})" for n, m in self.ensemble.members.items()]
        lines.append(f"CRF: {self.crf_from}")
        lines.append(f"consistency flags: {self.flagger_from}")
        lines.append(f"gains: {self.gains_from}")
        lines += [f"  {line}" for line in self.gains.describe(self.ensemble, self.stages)]
        lines.append(f"plan (priority order): {', '.join(self.stages)}; refinement iterations "
                     f"{list(self.options.refine_iters)} (flat layers, others)")
        return "\n".join(lines)

    def run(self, out_csv: PathLike, deadline: Optional[Deadline] = None, resume: bool = True, **kwargs) -> RunSummary:
        """Run the planner (:func:`~fwi_core.inference_plan.run_budgeted`); ``kwargs`` go to
        :class:`~fwi_core.inference_plan.BudgetedInference` (``strict``, ``state_dir``,
        ``keep_state``, ``device``, ``log``, ``on_stage_end``...)."""
        o = self.options
        resources = {**self.resources, **kwargs.pop("resources", {})}
        return run_budgeted(self.ensemble, self.source, out_csv, deadline=deadline, stages=self.stages,
                            gains=self.gains, crf=self.crf, mc_passes=o.mc_passes, batch_size=o.batch_size,
                            num_workers=o.num_workers, store_dtype=o.store_dtype, seed=o.seed, resume=resume,
                            resources=resources, state_limit_gb=o.state_limit_gb, gather_cache=o.gather_cache,
                            **kwargs)


def prepare_inference(data_root: Optional[PathLike], checkpoints: Sequence[PathLike] = (), *,
                      ensemble_config: Optional[PathLike] = None, options: Optional[InferenceOptions] = None,
                      gains_path: Optional[PathLike] = None, limit: Optional[int] = None,
                      device: Optional[str] = None,
                      prior_submission: Optional[PathLike] = None) -> InferenceSetup:
    """Set up a run (see the module doc).

    Args:
        data_root: the competition root (None: find it, :func:`~fwi_core.data.find_competition_root`).
        checkpoints: checkpoint files or folders (searched for ``options.checkpoint_kind``);
            with ``ensemble_config``, where to look for its checkpoints.
        ensemble_config: an ensemble JSON (members, weights, classifier, meta-learner).
        options: the run's :class:`InferenceOptions` (default: the defaults).
        gains_path: a ``stage_gains.json`` (default: beside the first checkpoint holding one).
        limit: only the first N test files (quick checks).
        device: where the models run (default: CUDA when available).
        prior_submission: a submission CSV the plan starts from (stage ``prior``; see the
            module doc); checkpoints are then optional.

    Raises:
        FWIError (bad data, checkpoints, ensemble file; StageError: an unknown stage name;
        SubmissionError: a prior submission missing, lacking test files or malformed),
        FileNotFoundError (no
        checkpoints), ValueError (a bad crf.json or gains table).
    """
    options = options or InferenceOptions()
    root = find_competition_root(data_root)
    source = TestFileSource(root, limit=limit)
    paths = [Path(p) for p in checkpoints]
    prior = None
    if prior_submission is not None:
        prior = PriorSubmission(prior_submission)
        prior.check(source.ids)          # every test file, before any work (and on every rank alike)
    if ensemble_config is not None:
        ensemble = Ensemble.from_checkpoints(paths, config=ensemble_config, device=device)
    elif prior is not None and not paths:
        ensemble = NoMembers()
    else:
        ensemble = Ensemble.from_checkpoints(find_checkpoints(paths, kind=options.checkpoint_kind), device=device)
    files = [m.path for m in ensemble.members.values() if m.path is not None]
    stages = plan_stages(options, prior=prior is not None)
    check_stage_names(stages, ensemble.member_names)
    if "prior" in stages and prior is None:
        raise StageError("stage 'prior' needs a prior submission (--prior-submission CSV)")
    crf, crf_from = None, "off (use_crf is False)"
    if options.use_crf:
        crf = load_crf(files)
        crf_from = "tuned crf.json beside the checkpoints" if crf is not None else \
            "none (no crf.json beside the checkpoints: the crf stage is skipped)"
    flagger, flagger_from = (find_consistency_flagger(ensemble) if "consistency" in stages
                             else (None, "off (not in the stage list)"))
    setup = InferenceSetup(root, source, ensemble, options, stages, crf, crf_from, flagger, flagger_from, prior=prior)
    found = Path(gains_path) if gains_path is not None else find_stage_gains_file(files)
    if found is not None:
        setup.gains = StageGains.load(found).for_ensemble(ensemble)
        setup.gains_from = f"{found} (measured on {setup.gains.samples} validation samples)"
    return setup
