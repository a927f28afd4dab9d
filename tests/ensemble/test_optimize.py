"""Optimised weights: they beat equal weights where one member is worse, per family;
optuna and the deterministic fallback (forced, and when optuna cannot be imported)."""
import sys

import numpy as np
import pytest
import torch

from fwi_core.ensemble.optimize import compare_weightings, format_comparison, optimize_weights
from fwi_core.ensemble.optimize import project_simplex, weighted_mean


def per_sample_mae(preds, targets, weights=None) -> np.ndarray:
    """(N,) MAE of the weighted mean of ``preds`` (M, N, ...) (equal weights by default)."""
    p = torch.as_tensor(np.asarray(preds), dtype=torch.float32).flatten(2)
    t = torch.as_tensor(np.asarray(targets), dtype=torch.float32).flatten(1)
    w = torch.full((p.shape[0],), 1.0 / p.shape[0]) if weights is None else torch.as_tensor(weights).float()
    return (weighted_mean(p, w) - t).abs().mean(1).double().numpy()


def constructed(n=60, hw=8, seed=0):
    """Member 0 accurate (noise 10 m/s), member 1 worse (noise 60 m/s + bias 40)
    on family F; on family G the roles swap."""
    rng = np.random.default_rng(seed)
    t = rng.uniform(1500, 4500, (n, hw, hw)).astype(np.float32)
    fams = np.array(["F", "G"] * (n // 2))
    good = t + rng.normal(0, 10, t.shape)
    bad = t + rng.normal(0, 60, t.shape) + 40
    g = (fams == "G")[:, None, None]
    p0 = np.where(g, bad, good)
    p1 = np.where(g, good, bad)
    return np.stack([p0, p1]).astype(np.float32), t, list(fams)


def mae_of(preds, t, w, fams):
    ws = w.for_samples(["m0", "m1"], fams)
    return float((weighted_mean(torch.from_numpy(preds), ws) - torch.from_numpy(t)).abs().mean())


@pytest.mark.parametrize("method", ["projected_gradient", "optuna"])
def test_optimiser_beats_equal_weights(method):
    preds, t, fams = constructed()
    only_f = [i for i, f in enumerate(fams) if f == "F"]
    p, tt = preds[:, only_f], t[only_f]
    w = optimize_weights(p, tt, method=method, n_trials=40, iterations=100)
    assert w.info["method"] == method
    v = w.vector(["m0", "m1"])
    assert float(v.sum()) == pytest.approx(1.0) and (v >= 0).all()
    equal = per_sample_mae(p, tt).mean()
    opt = per_sample_mae(p, tt, v).mean()
    assert opt < 0.8 * equal, (opt, equal)
    assert v[0] > 0.8                                   # most weight on the accurate member


def test_per_family_rows_follow_the_better_member():
    preds, t, fams = constructed()
    w = optimize_weights(preds, t, fams, method="projected_gradient", iterations=100)
    assert set(w.families) == {"F", "G"}
    assert w.row("F")["m0"] > 0.8 and w.row("G")["m1"] > 0.8
    assert mae_of(preds, t, w, fams) < 0.8 * per_sample_mae(preds, t).mean()
    for fam in ("default", "F", "G"):
        assert sum(w.rows[fam].values()) == pytest.approx(1.0)
        assert min(w.rows[fam].values()) >= 0


def test_small_families_use_the_default_row():
    preds, t, fams = constructed(n=14)                    # 7 samples per family: below the default 8
    w = optimize_weights(preds, t, fams, method="projected_gradient", iterations=20)
    assert w.families == []
    preds, t, fams = constructed(n=16)
    assert optimize_weights(preds, t, fams, method="projected_gradient", iterations=20).families == ["F", "G"]
    w = optimize_weights(preds, t, fams, method="projected_gradient", min_family_samples=9, iterations=20)
    assert w.families == []


def test_auto_falls_back_when_optuna_cannot_be_imported(monkeypatch):
    preds, t, fams = constructed(n=20)
    monkeypatch.setitem(sys.modules, "optuna", None)       # import optuna -> ImportError
    w = optimize_weights(preds, t, fams, method="auto", iterations=50)
    assert w.info["method"] == "projected_gradient"
    again = optimize_weights(preds, t, fams, method="projected_gradient", iterations=50)
    assert w == again                                      # deterministic
    with pytest.raises(ImportError, match="pip install optuna"):
        optimize_weights(preds, t, fams, method="optuna")


def test_auto_uses_optuna_when_installed():
    pytest.importorskip("optuna")
    preds, t, fams = constructed(n=20)
    w = optimize_weights(preds, t, fams, method="auto", n_trials=10, per_family=False)
    assert w.info["method"] == "optuna"


def test_bad_method():
    preds, t, fams = constructed(n=4)
    with pytest.raises(ValueError, match="method must be one of"):
        optimize_weights(preds, t, fams, method="grid")


def test_project_simplex():
    for v in (torch.tensor([0.2, 0.3, 0.5]), torch.tensor([3.0, -1.0, 0.0]), torch.tensor([-5.0, -5.0])):
        p = project_simplex(v)
        assert float(p.sum()) == pytest.approx(1.0) and (p >= 0).all()
    assert project_simplex(torch.tensor([0.2, 0.3, 0.5])).tolist() == pytest.approx([0.2, 0.3, 0.5])
    assert project_simplex(torch.tensor([3.0, -1.0, 0.0])).tolist() == pytest.approx([1.0, 0.0, 0.0])


def test_compare_weightings_cross_fitted():
    preds, t, fams = constructed(n=80)
    folds = np.arange(80) % 4
    rep = compare_weightings(preds, t, fams, ["m0", "m1"], folds=folds, method="projected_gradient",
                             iterations=60)
    tab = rep["table"]
    assert rep["cross_fitted"] and set(tab) == {"F", "G", "all"}
    assert tab["all"]["n"] == 80 and tab["F"]["n"] == 40
    assert tab["all"]["optimised"] < 0.8 * tab["all"]["equal"]
    assert tab["all"]["static"] < tab["all"]["equal"]          # inverse-MAE^2 leans to the better member
    assert tab["F"]["m0"] < tab["F"]["m1"] and tab["G"]["m1"] < tab["G"]["m0"]
    assert rep["best"] == "optimised"
    text = format_comparison(rep)
    assert "cross-fitted" in text and "optimised" in text and text.count("\n") >= 5
    # in-sample with given weights: they are scored as given
    rep2 = compare_weightings(preds, t, fams, ["m0", "m1"], static=rep["weights"]["static"],
                              optimised=rep["weights"]["optimised"])
    assert not rep2["cross_fitted"]
    assert rep2["table"]["all"]["optimised"] == pytest.approx(
        mae_of(preds, t, rep["weights"]["optimised"], fams), rel=1e-4)


def test_cross_fitting_scores_each_fold_with_weights_fitted_on_the_others():
    from fwi_core.ensemble.optimize import member_family_mae, weights_from_validation

    preds, t, fams = constructed(n=40, seed=3)
    folds = np.arange(40) % 2
    rep = compare_weightings(preds, t, fams, ["m0", "m1"], folds=folds, method="projected_gradient",
                             iterations=30)
    per_sample = np.zeros(40)
    fam_arr = np.asarray(fams)
    for f in (0, 1):
        tr, te = folds != f, folds == f
        static = weights_from_validation(member_family_mae(preds[:, tr], t[tr], fam_arr[tr], ["m0", "m1"]))
        w = optimize_weights(preds[:, tr], t[tr], list(fam_arr[tr]), method="projected_gradient",
                             member_names=["m0", "m1"], init=static, iterations=30)
        per_sample[te] = per_sample_mae(preds[:, te], t[te], w.for_samples(["m0", "m1"], list(fam_arr[te])))
    assert rep["table"]["all"]["optimised"] == pytest.approx(per_sample.mean(), rel=1e-6)
