"""Meta-learner: beats the best static weights when members are good on different kinds
of samples of the same family; starts at the static weights; features; files."""
import numpy as np
import pytest
import torch

from fwi_core.ensemble.meta import MetaFeatureSpec, MetaLearner, meta_features, physics_misfit, seismic_statistics
from fwi_core.ensemble.meta_fit import evaluate_meta_learner, train_meta_learner


def two_kinds(n=120, hw=8, seed=0):
    """One family; half the samples are quiet gathers (amplitude 0.1), half loud (1.0).
    Member 0 is accurate on quiet samples and poor on loud ones, member 1 the reverse.
    Returns normalised predictions (2, n, hw, hw), targets, families, seismic, folds."""
    g = torch.Generator().manual_seed(seed)
    loud = (torch.arange(n) % 2 == 1)
    x = torch.randn(n, 5, 16, 8, generator=g) * torch.where(loud, 1.0, 0.1).view(n, 1, 1, 1)
    t = torch.rand(n, hw, hw, generator=g) * 1.6 - 0.8
    small = 0.01 * torch.randn(n, hw, hw, generator=g)
    big = 0.2 * torch.randn(n, hw, hw, generator=g) + 0.1
    lv = loud.view(n, 1, 1)
    p0 = t + torch.where(lv, big, small)
    p1 = t + torch.where(lv, small, big)
    return torch.stack([p0, p1]), t, ["FlatVel_A"] * n, x, np.arange(n) % 3


def test_meta_learner_beats_static_where_it_should():
    preds, t, fams, x, folds = two_kinds()
    spec = MetaFeatureSpec(prediction=False, disagreement=False)      # the kind shows in the seismic only
    feats = meta_features(spec, preds, x)
    rep = evaluate_meta_learner(preds, t, fams, feats, folds, ["a", "b"], spec, hidden=16, epochs=40, lr=2e-2,
                                optimize_kwargs={"iterations": 60})
    tab = rep["table"]["all"]
    assert rep["beats_static"] and rep["folds"] == 3 and rep["gain"] > 0
    assert tab["meta"] < 0.5 * min(tab["static"], tab["equal"]), tab


def test_early_stopping_keeps_the_prior_when_training_only_hurts():
    """Mirrored member errors: the equal prior is the exact answer, any other weights are
    worse, so held-out early stopping must keep the prior (while unchecked training with
    a wild learning rate leaves it)."""
    _, t, fams, x, _ = two_kinds()
    err = 0.1 * torch.randn(t.shape, generator=torch.Generator().manual_seed(4))
    preds = torch.stack([t + err, t - err])
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    feats = meta_features(MetaFeatureSpec(disagreement=False, prediction=False), preds, noise)
    prior = [0.5, 0.5]
    meta = train_meta_learner(preds, t, feats, hidden=0, epochs=5, lr=50.0, prior=prior)
    assert meta.report["best_epoch"] == 0
    assert meta.report["val_mae"] == meta.report["prior_val_mae"]
    assert torch.allclose(meta(feats), torch.tensor(prior).expand(len(t), 2))
    wild = train_meta_learner(preds, t, feats, hidden=0, epochs=5, lr=50.0, prior=prior, val_fraction=0)
    assert not torch.allclose(wild(feats), torch.tensor(prior).expand(len(t), 2), atol=1e-2)


def test_untrained_meta_learner_returns_the_prior_and_round_trips(tmp_path):
    spec = MetaFeatureSpec(seismic=False)
    meta = MetaLearner(["a", "b", "c"], 7, spec, hidden=8, prior=[0.2, 0.3, 0.5])
    w = meta(torch.randn(4, 7))
    assert torch.allclose(w, torch.tensor([0.2, 0.3, 0.5]).expand(4, 3), atol=1e-6)
    preds, t, fams, x, _ = two_kinds(n=12)
    trained = train_meta_learner(preds, t, meta_features(MetaFeatureSpec(), preds, x), ["a", "b"],
                                 epochs=3, batch_size=6)
    path = trained.save(tmp_path / "meta.pt")
    back = MetaLearner.load(path)
    assert back.member_names == ["a", "b"] and back.spec == MetaFeatureSpec()
    assert torch.allclose(back.predict_weights(preds, x), trained.predict_weights(preds, x))


def test_features_shapes_and_requirements():
    preds, t, fams, x, _ = two_kinds(n=6)
    spec = MetaFeatureSpec(family=True, mc_variance=True)
    f = meta_features(spec, preds, x, family_proba=torch.full((6, 3), 1 / 3), mc_var=torch.ones(2, 6, 8, 8))
    assert f.shape == (6, 3 + 5 + 3 * 2 + (2 + 1) + 2)
    assert torch.allclose(f[:, -2:], torch.ones(6, 2))                  # MC std of var 1
    with pytest.raises(ValueError, match="pass family_proba"):
        meta_features(spec, preds, x)
    with pytest.raises(ValueError, match="pass x_norm"):
        meta_features(MetaFeatureSpec(), preds)
    s = seismic_statistics(x)
    assert s.shape == (6, 5) and (s[1::2, 1] > 5 * s[0::2, 1]).all()    # loud samples: larger std


def test_physics_misfit_is_zero_for_the_true_map(reference):
    from fwi_core.data.normalize import normalize_seismic, normalize_velocity

    nt = 80
    v = torch.from_numpy(reference["velocity"][:1]).float()
    x = normalize_seismic(torch.from_numpy(reference["seismic"][:1, :, :nt]).float())
    p = torch.stack([normalize_velocity(v), normalize_velocity(v) + 0.05])    # (2, 1, 1, 70, 70)
    mis = physics_misfit(p, x, nt)
    assert mis.shape == (1, 2)
    assert mis[0, 0] < 1e-4 and mis[0, 1] > 100 * mis[0, 0]
