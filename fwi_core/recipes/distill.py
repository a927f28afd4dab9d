"""Knowledge distillation: train one fast student on an ensemble's predictions.

    out = distill(ens, train_ds, val_ds, {"model": "inversionnet_small", "epochs": 5, "out": "runs/student"},
                  simulated_dataset=sim_ds)
    out["report"]   # student vs ensemble MAE (m/s, per family) and ms per sample

From the command line (and the train kernel's ``distill_teacher``): the teacher is an
ensemble JSON (``python -m fwi_core.ensemble fit``), the student a training config, the
data and folds the engine's::

    python -m fwi_core.recipes.distill --teacher runs/ensemble.json --data DIR --out runs/student \
        --preset cpu --model inversionnet_small --epochs 10 --folds 5 --fold 0

The teacher (an :class:`~fwi_core.ensemble.Ensemble`) predicts every training map (and
every map of an optional dataset of simulated samples, e.g. generated with
``fwi_core.physics.generate`` + ``simulate``); those predictions, not the labels, are the
student's targets (:class:`TeacherTargets`). The student is trained with the ordinary
engine (``fwi_core.train.train(cfg, datasets=(teacher_targets, val_ds))``), so it is
validated against the true labels of ``val_ds`` and saved as a normal checkpoint that
``Ensemble.from_checkpoints`` or ``load_model`` read. The infer kernel can then trade the
ensemble's accuracy for the student's speed.
"""
from __future__ import annotations

import os
import time
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..data.normalize import denormalize_velocity
from ..ensemble.ensemble import Ensemble
from ..inference import to_velocity
from ..metrics import mae, per_family
from ..models.checkpoint import load_model
from ..platform import detect_platform
from ..train import TrainConfig, train
from ..train.datasets import fold_datasets
from ..utils import default_device, progress_bar

__all__ = ["TeacherTargets", "teacher_targets", "distill", "distill_from_json", "format_report"]


class TeacherTargets(Dataset):
    """Items ``(seismic, teacher prediction, family)`` of a labelled dataset whose label
    is replaced by the teacher's normalised prediction.

    Args:
        base: yields ``(seismic_norm, velocity_norm, family)``.
        targets: (N, 1, H, W) normalised teacher predictions, in ``base`` order.
    """

    def __init__(self, base: Dataset, targets: torch.Tensor):
        if len(base) != len(targets):
            raise ValueError(f"TeacherTargets: {len(base)} samples but {len(targets)} teacher predictions")
        self.base, self.targets = base, targets

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        item = self.base[i]
        return item[0], self.targets[i], (item[2] if len(item) > 2 else "all")

    def families(self) -> List[str]:
        if hasattr(self.base, "families"):
            return [str(f) for f in self.base.families()]
        return [str(self.base[i][2]) if len(self.base[i]) > 2 else "all" for i in range(len(self.base))]


class _Concat(Dataset):
    """Concatenation that keeps ``families()`` (for the engine's family balancing)."""

    def __init__(self, parts: Sequence[TeacherTargets]):
        self.parts = list(parts)
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i):
        k = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return self.parts[k][i - int(self.offsets[k])]

    def families(self) -> List[str]:
        return [f for p in self.parts for f in p.families()]


@torch.no_grad()
def teacher_targets(teacher: Ensemble, dataset: Dataset, batch_size: int = 16, flip_tta: bool = False,
                    use_families: bool = True, device: Optional[Union[str, torch.device]] = None,
                    progress: bool = True) -> torch.Tensor:
    """(N, 1, H, W) normalised ensemble predictions of a dataset's maps (clamped to
    [-1, 1]); with ``use_families`` the dataset's family labels pick per-family weights."""

    dev = torch.device(device) if device is not None else None
    out = []
    bar = progress_bar(total=len(dataset), desc="teacher targets", unit="sample", disable=not progress)
    for x, _, fam in DataLoader(dataset, batch_size=batch_size):
        if dev is not None:
            x = x.to(dev)
        preds = {n: teacher.predict_member(n, x, flip_tta) for n in teacher.member_names}
        fams = [str(f) for f in fam] if use_families else None
        out.append(teacher.combine(preds, fams, x).clamp(-1.0, 1.0).cpu())
        bar.update(len(fam))
    bar.close()
    return torch.cat(out)


@torch.no_grad()
def _evaluate(predict, dataset: Dataset, batch_size: int, max_samples: Optional[int]):
    """Per-family MAE (m/s) of ``predict(x) -> m/s`` on ``dataset`` and its ms per sample
    (the first batch, a warm-up, is not timed unless it is the only one)."""

    errs, fams, times = [], [], []
    for x, y, fam in DataLoader(dataset, batch_size=batch_size):
        if max_samples is not None and len(fams) >= max_samples:
            break
        start = time.perf_counter()
        v = predict(x)
        times.append((time.perf_counter() - start, len(fam)))
        errs.append(mae(v.float().cpu(), denormalize_velocity(y.float())).numpy())
        fams.extend(str(f) for f in fam)
    timed = times[1:] if len(times) > 1 else times
    elapsed = sum(t for t, _ in timed)
    n = sum(k for _, k in timed)
    return per_family(np.concatenate(errs), fams), 1000.0 * elapsed / max(n, 1)


def distill(teacher: Ensemble, train_dataset: Dataset, val_dataset: Optional[Dataset] = None,
            student_cfg: Union[Dict[str, Any], "TrainConfig", None] = None,
            simulated_dataset: Optional[Dataset] = None, batch_size: int = 16, flip_tta: bool = False,
            eval_samples: Optional[int] = 256, device: Optional[Union[str, torch.device]] = None,
            progress: bool = True) -> Dict[str, Any]:
    """Train a student on the teacher's predictions and compare them.

    Args:
        teacher: the ensemble.
        train_dataset: labelled training data (its labels are replaced by the teacher's
            predictions; its families pick the teacher's per-family weights).
        val_dataset: labelled validation data (true labels): the engine validates the
            student on it and the report compares student and teacher on it.
        student_cfg: a :class:`~fwi_core.train.TrainConfig` or a dict of its fields (the
            student's model, epochs, out folder, ...).
        simulated_dataset: extra (simulated) samples, also labelled by the teacher.
        flip_tta: the teacher predicts with flip TTA (targets and timing).
        eval_samples: how many validation samples the report scores and times (None: all).

    Returns:
        ``{"result": train()'s result, "student": the student model (best weights),
        "train_dataset": the teacher-target dataset, "report": {"student_mae",
        "ensemble_mae" ({family: m/s, "all"}), "student_ms_per_sample",
        "ensemble_ms_per_sample", "speedup", "n_teacher_targets"}}``.
    """
    cfg = TrainConfig.from_dict(student_cfg) if isinstance(student_cfg, dict) else (student_cfg or TrainConfig())
    parts = [TeacherTargets(train_dataset, teacher_targets(teacher, train_dataset, batch_size, flip_tta,
                                                           device=device, progress=progress))]
    if simulated_dataset is not None:
        parts.append(TeacherTargets(simulated_dataset, teacher_targets(teacher, simulated_dataset, batch_size,
                                                                       flip_tta, device=device, progress=progress)))
    train_ds = parts[0] if len(parts) == 1 else _Concat(parts)
    result = train(cfg, datasets=(train_ds, val_dataset))
    student = load_model(result["best_checkpoint"], device=device or "cpu")
    report: Dict[str, Any] = {"n_teacher_targets": len(train_ds)}
    if val_dataset is not None:
        sdev = next(student.parameters()).device

        def student_predict(x):
            return to_velocity(student(x.to(sdev)))

        def teacher_predict(x):
            return teacher.predict(x, flip_tta=flip_tta)[0]

        report["student_mae"], report["student_ms_per_sample"] = _evaluate(student_predict, val_dataset,
                                                                           batch_size, eval_samples)
        report["ensemble_mae"], report["ensemble_ms_per_sample"] = _evaluate(teacher_predict, val_dataset,
                                                                             batch_size, eval_samples)
        report["speedup"] = report["ensemble_ms_per_sample"] / max(report["student_ms_per_sample"], 1e-9)
    return {"result": result, "student": student, "train_dataset": train_ds, "report": report}


def distill_from_json(teacher_json: Union[str, os.PathLike], cfg: TrainConfig, flip_tta: bool = False,
                      eval_samples: Optional[int] = 256, device: Optional[Union[str, torch.device]] = None,
                      progress: bool = True) -> Dict[str, Any]:
    """:func:`distill` with the ensemble of ``teacher_json`` as the teacher and the data and
    fold of ``cfg`` (the engine's family folds of ``cfg.data``): the student trains on the
    teacher's predictions of the fold's training maps and is validated on its true labels."""
    cfg = cfg.validate()
    dev = torch.device(device) if device is not None else default_device()
    teacher = Ensemble.from_checkpoints([], config=teacher_json, device=dev)
    train_ds, val_ds = fold_datasets(cfg, detect_platform())
    return distill(teacher, train_ds, val_ds, cfg, flip_tta=flip_tta, eval_samples=eval_samples,
                   device=dev, progress=progress, batch_size=cfg.batch_size)


def format_report(report: Dict[str, Any]) -> str:
    """Student vs ensemble: MAE per family (m/s) and ms per sample, as text."""
    if "student_mae" not in report:
        return f"{report.get('n_teacher_targets', 0)} teacher targets (no validation set: nothing compared)"
    fams = sorted(f for f in report["student_mae"] if f != "all") + ["all"]
    lines = [f"{'family':<14}{'student':>10}{'ensemble':>10}", "-" * 34]
    lines += [f"{f:<14}{report['student_mae'][f]:>10.2f}{report['ensemble_mae'].get(f, float('nan')):>10.2f}"
              for f in fams]
    lines.append(f"ms per sample: student {report['student_ms_per_sample']:.2f}, ensemble "
                 f"{report['ensemble_ms_per_sample']:.2f} ({report['speedup']:.1f}x faster); "
                 f"{report['n_teacher_targets']} teacher targets")
    return "\n".join(lines)
