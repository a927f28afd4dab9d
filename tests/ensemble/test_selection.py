"""fit_ensemble's choice: held-out scores of every weighting as deployed, never worse than
the best member; the family classifier's out-of-fold probabilities (never its own
training samples'); MC-dropout variances from the OOF files; Kaggle's folder names."""
import json

import numpy as np
import pytest
import torch

from fwi_core.ensemble import EnsembleConfig
from fwi_core.ensemble.optimize import compare_weightings
from fwi_core.ensemble.fit import fit_ensemble

from .helpers import H, W, make_checkpoint
from .test_fit import write_run

pytestmark = pytest.mark.filterwarnings("ignore:fit_ensemble. only")


def _fold_flatterers(root, n=30, seed=0):
    """Model "steady" errs 20 m/s everywhere. "even" looks excellent on fold 1 and is
    poor on fold 0, "odd" the reverse: weights fitted on one fold and scored on the
    other pick the wrong one, so only the single best model holds up on held-out folds."""
    rng = np.random.default_rng(seed)
    for fold in (0, 1):
        idx = np.arange(n) + fold * n
        t = rng.uniform(2000, 4000, (n, H, W))
        fams = ["FlatVel_A", "Style_B"] * (n // 2)
        good, poor = rng.normal(0, 5, t.shape), rng.normal(0, 400, t.shape) + 300
        write_run(root, f"steady-fold{fold}", fold, idx, t + rng.normal(0, 20, t.shape), t, fams)
        write_run(root, f"even-fold{fold}", fold, idx, t + (good if fold == 1 else poor), t, fams)
        write_run(root, f"odd-fold{fold}", fold, idx, t + (good if fold == 0 else poor), t, fams)


def test_clearly_best_member_is_selected_and_never_beaten(tmp_path):
    runs = tmp_path / "runs"
    _fold_flatterers(runs)
    rep = fit_ensemble([runs], method="projected_gradient", iterations=60)
    members = rep["comparison"]["table"]["all"]
    best_member = min(("steady", "even", "odd"), key=members.get)
    assert best_member == "steady" and rep["comparison"]["single"] == "steady"
    # fitted weightings flatter on one fold and fail on the other: each is worse than steady
    for k in ("equal", "static", "optimised"):
        assert rep["mae"][k] > 1.5 * members["steady"], k
    assert rep["selected"] == "single" and rep["deployed_mae"] == pytest.approx(members["steady"])
    assert rep["deployed_mae"] <= min(members[m] for m in ("steady", "even", "odd"))
    cfg = EnsembleConfig.load(rep["config"])
    assert [m.name for m in cfg.members] == ["steady-fold0", "steady-fold1"]      # the others get no weight
    report = json.loads(rep["config"].read_text())["report"]
    assert report["deployed"] == {"weighting": "single", "mae": pytest.approx(members["steady"]),
                                  "scored_with": "the default row", "cross_fitted": True}


def _per_family_specialists(root, n=40, seed=1):
    """"flat" is good on FlatVel_A and poor on Style_B, "style" the reverse."""
    rng = np.random.default_rng(seed)
    for fold in (0, 1):
        idx = np.arange(n) + fold * n
        t = rng.uniform(2000, 4000, (n, H, W))
        fams = np.array(["FlatVel_A", "Style_B"] * (n // 2))
        is_flat = (fams == "FlatVel_A")[:, None, None]
        small, big = rng.normal(0, 10, t.shape), rng.normal(0, 200, t.shape) + 150
        write_run(root, f"flat-fold{fold}", fold, idx, t + np.where(is_flat, small, big), t, fams)
        write_run(root, f"style-fold{fold}", fold, idx, t + np.where(is_flat, big, small), t, fams)
    return idx


def test_rows_are_scored_as_deployed(tmp_path):
    """Per-family rows only help when a classifier picks them: without one the reported
    score is the default row's; with a (perfect) classifier's OOF predictions, the rows'."""
    runs = tmp_path / "runs"
    _per_family_specialists(runs)
    plain = fit_ensemble([runs], tmp_path / "a.json", method="projected_gradient", iterations=60)
    from fwi_core.ensemble.fit import align_oof, find_oof_files

    groups, preds, targets, fams, folds, _, keys = align_oof(find_oof_files([runs]))
    true_scored = compare_weightings(preds, targets, list(fams), groups, folds=folds,
                                     method="projected_gradient", iterations=60)
    assert true_scored["table"]["all"]["optimised"] < 0.5 * plain["mae"]["optimised"]
    assert plain["comparison"]["scored_with"] == "the default row"
    # a classifier whose out-of-fold predictions are the true families
    names = np.array(["FlatVel_A", "Style_B"])
    proba = (fams[:, None] == names[None]).astype(np.float32)
    clf = tmp_path / "clf" / "family_classifier.pt"
    clf.parent.mkdir()
    clf.write_bytes(b"not read by fit_ensemble")
    np.savez(clf.with_suffix(".oof.npz"), fold=np.array([k[0] for k in keys]), index=np.array([k[1] for k in keys]),
             proba=proba, families=names)
    with_clf = fit_ensemble([runs], tmp_path / "b.json", method="projected_gradient", iterations=60,
                            family_classifier=clf)
    assert with_clf["mae"]["optimised"] == pytest.approx(true_scored["table"]["all"]["optimised"], rel=1e-6)
    assert with_clf["comparison"]["scored_with"] == "the classifier's families"
    assert EnsembleConfig.load(tmp_path / "b.json").family_classifier == "clf/family_classifier.pt"


def test_classifier_without_oof_probabilities_is_refused(tmp_path):
    runs = tmp_path / "runs"
    _per_family_specialists(runs, n=10)
    clf = tmp_path / "family_classifier.pt"
    clf.write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="would leak their labels: train it with python -m fwi_core.ensemble "
                                                "train-classifier"):
        fit_ensemble([runs], family_classifier=clf)


def test_classifier_probabilities_come_only_from_held_out_folds(fake_root, tmp_path, monkeypatch):
    """train-classifier: every sample's probabilities come from the classifier of its fold,
    which never trained on it; fit uses those, never the deployed classifier's output."""
    from fwi_core.data import FWIDataset, family_kfold, index_train
    from fwi_core.ensemble import FamilyClassifier
    from fwi_core.ensemble.family_fit import load_oof_proba, train_family_classifier_oof
    from fwi_core.ensemble import fit as fit_module
    from fwi_core.ensemble.__main__ import main

    from fwi_core.ensemble import family_fit as family_module

    ds = FWIDataset(index_train(fake_root))
    trained = []                        # the samples each classifier really trained on
    original_train = family_module.train_family_classifier

    def record(dataset, *a, **k):
        trained.append(set(np.asarray(dataset.indices).tolist()))
        return original_train(dataset, *a, **k)

    monkeypatch.setattr(family_module, "train_family_classifier", record)
    _, oof = train_family_classifier_oof(ds, folds=2, seed=0, epochs=1, batch_size=4, width=4, progress=False)
    monkeypatch.undo()
    assert len(trained) == 3 and trained[2] == set(range(len(ds)))           # 2 folds, then the deployed one
    assert sorted(oof["index"].tolist()) == list(range(len(ds)))            # each sample once
    for fold, index in zip(oof["fold"], oof["index"]):
        assert index not in trained[int(fold)] and index not in oof["trained_on"][int(fold)]
    for fold, (tr, va) in enumerate(family_kfold(ds.families(), 2, 0)):    # the engine's folds
        assert sorted(oof["index"][oof["fold"] == fold].tolist()) == sorted(va.tolist())
        assert sorted(oof["trained_on"][fold].tolist()) == sorted(tr.tolist())

    clf_path = tmp_path / "runs" / "family_classifier.pt"
    assert main(["train-classifier", "--data", str(fake_root), "--out", str(clf_path), "--folds", "2",
                 "--epochs", "1", "--batch-size", "4", "--device", "cpu"]) == 0
    saved = load_oof_proba(clf_path.with_suffix(".oof.npz"))
    rng = np.random.default_rng(0)
    truth = np.stack([ds[i][1][0].numpy() for i in range(len(ds))]) * 1500 + 3000
    fams = ds.families()
    for fold, (_, idx) in enumerate(family_kfold(fams, 2, 0)):
        for model, noise in (("a", 20.0), ("b", 60.0)):
            t = truth[idx]
            write_run(tmp_path / "runs", f"{model}-fold{fold}", fold, idx,
                      np.clip(t + rng.normal(0, noise, t.shape), 1500, 4500), t, [fams[i] for i in idx])

    def refuse(*a, **k):
        raise AssertionError("the classifier predicted during fit: its own training samples")

    monkeypatch.setattr(FamilyClassifier, "forward", refuse)
    seen = {}
    original = fit_module.evaluate_meta_learner

    def spy(preds, targets, families, features, folds, *a, **k):
        seen["features"], seen["folds"] = features, folds
        return original(preds, targets, families, features, folds, *a, **k)

    monkeypatch.setattr(fit_module, "evaluate_meta_learner", spy)
    rep = fit_ensemble([tmp_path / "runs"], method="projected_gradient", iterations=10, meta=True,
                       family_classifier=clf_path, meta_kwargs={"epochs": 2, "hidden": 4})
    assert rep["meta"] is not None
    where = {(int(f), int(i)): r for r, (f, i) in enumerate(zip(saved["fold"], saved["index"]))}
    from fwi_core.ensemble.fit import align_oof, find_oof_files

    keys = align_oof(find_oof_files([tmp_path / "runs"]))[6]
    want = saved["proba"][[where[k] for k in keys]]
    torch.testing.assert_close(seen["features"][:, :want.shape[1]], torch.from_numpy(want))


def test_mc_variance_from_the_engine_reaches_the_meta_learner(tmp_path):
    from fwi_core.train import train
    from tests.train.helpers import TinyDataset, tiny_cfg

    runs = tmp_path / "runs"
    for fold in (0, 1):                                  # two folds: the meta-learner is cross-fitted
        for name, hidden in (("wide", 32), ("narrow", 4)):
            train(tiny_cfg(tmp_path, out=str(runs / f"{name}-fold{fold}"), model_kwargs={"hidden": hidden, "drop": 0.3},
                           epochs=1, ema_decay=0.0, oof_mc_passes=4, fold=fold),
                  datasets=(TinyDataset(16, seed=0), TinyDataset(8, seed=1 + fold)))
    oof = np.load(runs / "wide-fold0" / "oof_fold0.npz")
    assert oof["mc_var"].shape == oof["pred"].shape and oof["mc_var"].max() > 0
    rep = fit_ensemble([runs], method="projected_gradient", iterations=5, meta="always",
                       meta_kwargs={"epochs": 2, "hidden": 4})
    from fwi_core.ensemble import MetaLearner

    meta = MetaLearner.load(runs / "meta_learner.pt")
    assert meta.spec.mc_variance and json.loads(rep["config"].read_text())["report"]["mc_variance"]
    with pytest.raises(ValueError, match="--oof-mc-passes"):
        write_run(tmp_path / "novar", "x-fold0", 0, [0, 1], np.ones((2, H, W)), np.ones((2, H, W)), ["A", "A"],
                  checkpoint=False)
        fit_ensemble([tmp_path / "novar"], mc_variance=True)


def test_kaggle_folder_names_one_model_several_folds(tmp_path):
    """On Kaggle the current run is /kaggle/working and earlier folds are attached under
    /kaggle/input/<name>/: folders that trained the same model on disjoint folds are one
    model whatever their names; another model (other kwargs) stays apart."""
    kaggle = tmp_path / "kaggle"
    rng = np.random.default_rng(0)
    n = 6
    t = {f: rng.uniform(2000, 4000, (n, H, W)) for f in (0, 1, 2)}
    fams = ["FlatVel_A"] * n
    folders = {0: kaggle / "working", 1: kaggle / "input" / "fwi-train-fold1", 2: kaggle / "input" / "fwi-train-v2"}
    for fold, run in folders.items():
        write_run(run.parent, run.name, fold, np.arange(n) + n * fold, t[fold] + 10, t[fold], fams)
        (run / "config.json").write_text(json.dumps({"model": "tiny_fwi", "model_kwargs": {}}))
    for fold, name in ((0, "wide-a"), (1, "wide-b"), (2, "wide-c")):
        run = write_run(kaggle / "input", name, fold, np.arange(n) + n * fold, t[fold] + 40, t[fold], fams)
        make_checkpoint(run / "best.pt")
        (run / "config.json").write_text(json.dumps({"model": "tiny_fwi", "model_kwargs": {"hidden": 32}}))
    sources = [kaggle / "input" / "fwi-train-fold1", kaggle / "input" / "fwi-train-v2",
               *[kaggle / "input" / f"wide-{c}" for c in "abc"], kaggle / "working"]
    rep = fit_ensemble(sources, kaggle / "working" / "ensemble.json", select="equal",
                       method="projected_gradient", iterations=5)
    assert rep["n_samples"] == 3 * n
    assert rep["groups"] == {"tiny_fwi": ["working", "fwi-train-fold1", "fwi-train-v2"],
                             "wide-a+wide-b+wide-c": ["wide-a", "wide-b", "wide-c"]}
    cfg = EnsembleConfig.load(kaggle / "working" / "ensemble.json")
    assert {m.checkpoint for m in cfg.members} >= {"best.pt", "../input/fwi-train-fold1/best.pt"}
