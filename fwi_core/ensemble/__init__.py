"""Ensembles: members with weights that are data, weights from validation, a family
classifier, a meta-learner, MC-dropout uncertainty and OOF fitting (distillation into one
student is a recipe: :mod:`fwi_core.recipes.distill`).

    from fwi_core.ensemble import Ensemble, Member, EnsembleWeights
    ens = Ensemble.from_checkpoints(paths, config="ensemble.json")
    mean, var = ens.predict(x_norm, flip_tta=True, mc_passes=8)

Modules: :mod:`.weights` (EnsembleWeights, JSON), :mod:`.config` (the ensemble file),
:mod:`.ensemble` (Ensemble, Member), :mod:`.optimize` (static / optimised weights and
their comparison), :mod:`.uncertainty` (MC dropout, inverse-variance weights, CRF
confidence), :mod:`.family` (FamilyClassifier), :mod:`.meta` (MetaLearner), :mod:`.fit` (fit_ensemble:
weights and meta-learner from the engine's out-of-fold files), :mod:`.saved` (how the small
networks are saved).
"""
from ..errors import EnsembleConfigError
from .config import EnsembleConfig, MemberSpec
from .ensemble import Ensemble, Member, member_name_for
from .family import (FamilyClassifier, load_oof_proba, oof_proba_path, save_oof_proba, train_family_classifier,
                     train_family_classifier_oof)
from .fit import fit_ensemble
from .meta import (MetaFeatureSpec, MetaLearner, evaluate_meta_learner, meta_features, physics_misfit,
                   train_meta_learner)
from .optimize import (compare_weightings, format_comparison, member_family_mae, optimize_weights,
                       weights_from_validation)
from .uncertainty import (crf_confidence, inverse_variance_weights, mc_dropout_predict, mixture_variance,
                          uncertainty_map)
from .weights import EnsembleWeights

__all__ = [
    "Ensemble", "Member", "EnsembleWeights", "EnsembleConfig", "MemberSpec", "EnsembleConfigError",
    "member_name_for", "weights_from_validation", "optimize_weights", "compare_weightings",
    "format_comparison", "member_family_mae", "mc_dropout_predict", "inverse_variance_weights",
    "mixture_variance", "uncertainty_map", "crf_confidence", "FamilyClassifier", "train_family_classifier",
    "train_family_classifier_oof", "oof_proba_path", "save_oof_proba", "load_oof_proba", "MetaFeatureSpec", "MetaLearner", "meta_features", "physics_misfit", "train_meta_learner",
    "evaluate_meta_learner", "fit_ensemble",
]
