"""Ensembles: members with weights that are data, a family classifier, a meta-learner and
MC-dropout uncertainty, everything that predicts (distillation into one student is a
recipe: :mod:`fwi_core.recipes.distill`).

    from fwi_core.ensemble import Ensemble, Member, EnsembleWeights
    ens = Ensemble.from_checkpoints(paths, config="ensemble.json")
    mean, var = ens.predict(x_norm, flip_tta=True, mc_passes=8)

Modules: :mod:`.weights` (EnsembleWeights, JSON), :mod:`.config` (the ensemble file),
:mod:`.ensemble` (Ensemble, Member), :mod:`.uncertainty` (MC dropout, inverse-variance
weights, CRF confidence), :mod:`.family` (FamilyClassifier), :mod:`.meta` (MetaLearner),
:mod:`.saved` (how the small networks are saved).

Fitting is training-side and imported by module name, so a notebook that only predicts
does not carry it: :mod:`.optimize` (static / optimised weights and their comparison:
``from fwi_core.ensemble.optimize import optimize_weights``), :mod:`.meta_fit` (training
and cross-fitting the meta-learner), :mod:`.family_fit` (training the family classifier,
out-of-fold probabilities), :mod:`.fit` (``fit_ensemble``: weights and
meta-learner from the engine's out-of-fold files).
"""
from ..errors import EnsembleConfigError
from .config import EnsembleConfig, MemberSpec
from .ensemble import Ensemble, Member, member_name_for
from .family import FamilyClassifier
from .meta import MetaFeatureSpec, MetaLearner, meta_features, physics_misfit
from .uncertainty import (crf_confidence, inverse_variance_weights, mc_dropout_predict, mixture_variance,
                          uncertainty_map)
from .weights import EnsembleWeights

__all__ = [
    "Ensemble", "Member", "EnsembleWeights", "EnsembleConfig", "MemberSpec", "EnsembleConfigError",
    "member_name_for", "mc_dropout_predict", "inverse_variance_weights",
    "mixture_variance", "uncertainty_map", "crf_confidence", "FamilyClassifier",
    "MetaFeatureSpec", "MetaLearner", "meta_features", "physics_misfit",
]
