"""Workflows that combine the layers below them: trained models, inference, the simulator
and the training engine.

- :mod:`.pseudo_label`: test-time pseudo-labels (predict the test set, simulate the
  predictions, write them as a training family);
- :mod:`.distill`: a fast student trained on an ensemble's predictions.
"""
from .distill import TeacherTargets, distill, distill_from_json, teacher_targets
from .pseudo_label import MANIFEST, PSEUDO_FAMILY, bytes_per_sample, pseudo_dataset, pseudo_label_round

__all__ = ["pseudo_label_round", "pseudo_dataset", "bytes_per_sample", "PSEUDO_FAMILY", "MANIFEST", "distill",
           "distill_from_json", "teacher_targets", "TeacherTargets"]
