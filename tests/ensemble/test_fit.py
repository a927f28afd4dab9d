"""fit_ensemble: OOF files of several models and folds -> aligned, weighted, JSON written
beside the runs and loadable; meta-learner written when it wins; engine end to end."""
import json

import numpy as np
import pytest
import torch

from fwi_core.ensemble import Ensemble, EnsembleConfig
from fwi_core.ensemble.fit import align_oof, find_oof_files, fit_ensemble

from .helpers import H, W, make_checkpoint


def write_run(root, name, fold, indices, pred, target, families, source="raw", checkpoint=True):
    run = root / name
    run.mkdir(parents=True, exist_ok=True)
    np.savez(run / f"oof_fold{fold}.npz", indices=np.asarray(indices), pred=pred.astype(np.float32),
             target=target.astype(np.float32), family=np.asarray(families, dtype=str),
             mae=np.abs(pred - target).mean((1, 2)), fold=np.int64(fold), source=np.asarray(source))
    if checkpoint:
        make_checkpoint(run / "best.pt", seed=fold)
    return run


def good_and_bad(root, n=20, seed=0, shift=None):
    """Models "good" (noise 10 m/s) and "bad" (noise 80 m/s + bias), folds 0 and 1."""
    rng = np.random.default_rng(seed)
    for fold in (0, 1):
        idx = np.arange(n) + fold * n
        t = rng.uniform(1500, 4500, (n, H, W))
        fams = ["FlatVel_A", "Style_B"] * (n // 2)
        write_run(root, f"good-fold{fold}", fold, idx, t + rng.normal(0, 10, t.shape), t, fams)
        write_run(root, f"bad_fold{fold}", fold, idx, t + rng.normal(0, 80, t.shape) + 50, t, fams, source="ema")


def test_fit_writes_a_loadable_ensemble(tmp_path):
    runs = tmp_path / "runs"
    good_and_bad(runs)
    rep = fit_ensemble([runs], method="projected_gradient", iterations=60)
    path = rep["config"]
    assert path == runs / "ensemble.json"
    cfg = EnsembleConfig.load(path)
    assert [m.name for m in cfg.members] == ["bad_fold0", "bad_fold1", "good-fold0", "good-fold1"]
    assert {m.group for m in cfg.members} == {"bad", "good"}
    assert [m.weights for m in cfg.members] == ["ema", "ema", "raw", "raw"]
    assert cfg.members[2].checkpoint == "good-fold0/best.pt" and cfg.members[0].kind == "fold"
    w = cfg.weights
    for fam in ["default"] + w.families:
        row = w.rows[fam]
        assert sum(row.values()) == pytest.approx(1.0)
        assert row["good-fold0"] == pytest.approx(row["good-fold1"])          # shared within the model
        assert row["good-fold0"] + row["good-fold1"] > 0.8
    tab = rep["comparison"]["table"]
    assert rep["comparison"]["cross_fitted"] and tab["all"]["n"] == 40
    assert tab["all"]["optimised"] < 0.5 * tab["all"]["equal"]
    assert rep["selected"] in ("optimised", "static") and rep["selected"] == rep["comparison"]["best"]
    data = json.loads(path.read_text())
    assert data["report"]["selected"] == rep["selected"] and "FlatVel_A" in data["report"]["comparison"]
    ens = Ensemble.from_checkpoints([], config=path, device="cpu")
    assert len(ens) == 4 and ens.members["good-fold1"].group == "good"


def test_align_by_fold_and_index(tmp_path):
    rng = np.random.default_rng(1)
    t = rng.uniform(1500, 4500, (6, H, W))
    fams = ["A"] * 6
    # model b predicted the samples in another order and one more; a only 5 of them
    write_run(tmp_path, "a-fold0", 0, [0, 1, 2, 3, 4], t[:5] + 1, t[:5], fams[:5], checkpoint=False)
    order = [5, 3, 1, 0, 2, 4]
    write_run(tmp_path, "b-fold0", 0, order, t[order] + 2, t[order], fams, checkpoint=False)
    with pytest.warns(UserWarning, match="using the 5 samples every model predicted"):
        groups, preds, targets, _, folds, _, keys = align_oof(find_oof_files([tmp_path]))
    assert groups == ["a", "b"] and keys == [(0, i) for i in range(5)]
    np.testing.assert_allclose(preds[0] - t[:5], 1, rtol=0, atol=1e-3)
    np.testing.assert_allclose(preds[1] - t[:5], 2, rtol=0, atol=1e-3)
    np.testing.assert_allclose(targets, t[:5], rtol=1e-6)


def test_errors(tmp_path):
    t = np.full((2, H, W), 3000.0)
    write_run(tmp_path / "dup", "m-fold0", 0, [0, 1], t, t, ["A", "A"], checkpoint=False)
    write_run(tmp_path / "dup" / "again", "m-fold0", 0, [0, 1], t, t, ["A", "A"], checkpoint=False)
    with pytest.raises(ValueError, match="model 'm' has two predictions of fold 0 sample 0"):
        fit_ensemble([tmp_path / "dup"])
    write_run(tmp_path / "disjoint", "a-fold0", 0, [0, 1], t, t, ["A", "A"], checkpoint=False)
    write_run(tmp_path / "disjoint", "b-fold1", 1, [2, 3], t, t, ["A", "A"], checkpoint=False)
    with pytest.raises(ValueError, match="share no"):
        fit_ensemble([tmp_path / "disjoint"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no oof_fold"):
        fit_ensemble([tmp_path / "empty"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fit_ensemble([tmp_path / "nowhere"])
    bad = tmp_path / "bad" / "x-fold0"
    bad.mkdir(parents=True)
    np.savez(bad / "oof_fold0.npz", pred=t)
    with pytest.raises(ValueError, match=r"missing key\(s\) \['indices', 'target', 'family', 'fold'\]"):
        fit_ensemble([tmp_path / "bad"])


def test_meta_learner_written_when_it_wins(tmp_path):
    """One family; model "lo" is accurate on slow maps and poor on fast ones, "hi" the
    reverse; the map's mean (a prediction feature) tells which: meta beats static."""
    rng = np.random.default_rng(0)
    runs = tmp_path / "runs"
    for fold in (0, 1, 2):
        n = 30
        fast = np.arange(n) % 2 == 1
        t = np.where(fast[:, None, None], 4000.0, 2000.0) + rng.normal(0, 50, (n, H, W))
        small, big = rng.normal(0, 5, t.shape), rng.normal(0, 150, t.shape) + 100
        f = fast[:, None, None]
        idx = np.arange(n) + fold * n
        write_run(runs, f"lo-fold{fold}", fold, idx, t + np.where(f, big, small), t, ["A"] * n)
        write_run(runs, f"hi-fold{fold}", fold, idx, t + np.where(f, small, big), t, ["A"] * n)
    rep = fit_ensemble([runs], runs / "ens.json", method="projected_gradient", iterations=40, meta=True,
                       meta_kwargs={"hidden": 16, "epochs": 40, "lr": 2e-2})
    assert rep["meta"]["beats_static"] and rep["meta_written"]
    assert rep["meta"]["table"]["all"]["meta"] < 0.5 * rep["meta"]["table"]["all"]["static"]
    cfg = EnsembleConfig.load(runs / "ens.json")
    assert cfg.meta_learner == "meta_learner.pt" and (runs / "meta_learner.pt").is_file()
    ens = Ensemble.from_checkpoints([], config=runs / "ens.json", device="cpu")
    assert ens.meta_learner is not None and ens.meta_learner.member_names == ["hi", "lo"]
    # combining the models' fold-0 OOF maps: the meta-learner's weights beat the static ones
    from fwi_core.data.normalize import normalize_velocity
    oof = {g: np.load(runs / f"{g}-fold0" / "oof_fold0.npz") for g in ("lo", "hi")}
    truth = normalize_velocity(torch.from_numpy(oof["lo"]["target"])).unsqueeze(1)
    preds = {name: normalize_velocity(torch.from_numpy(oof[m.group]["pred"])).unsqueeze(1)
             for name, m in ens.members.items()}
    static = Ensemble(list(ens.members.values()), ens.weights)
    meta_err = (ens.combine(preds) - truth).abs().mean()
    static_err = (static.combine(preds) - truth).abs().mean()
    assert meta_err < 0.5 * static_err, (meta_err, static_err)


def test_engine_oof_end_to_end(tmp_path):
    from fwi_core.train import train
    from tests.train.helpers import datasets, tiny_cfg

    runs = tmp_path / "runs"
    for name, hidden in (("wide-fold0", 32), ("narrow-fold0", 4)):
        train(tiny_cfg(tmp_path, out=str(runs / name), model_kwargs={"hidden": hidden}, epochs=1,
                       ema_decay=0.0), datasets=datasets(16, 8))
    with pytest.warns(UserWarning, match="only 8 aligned OOF samples"):
        rep = fit_ensemble([runs], method="projected_gradient", iterations=20, select="equal")
    ens = Ensemble.from_checkpoints([], config=rep["config"], device="cpu")
    assert sorted(ens.member_names) == ["narrow-fold0", "wide-fold0"]
    x = datasets(16, 8)[1].x[:3]
    mean, var = ens.predict(x)
    assert mean.shape == (3, 1, H, W) and var is None
    assert rep["n_samples"] == 8


def test_meta_with_seismic_physics_and_family_classifier(fake_root, tmp_path):
    """With data=: the meta-learner also uses seismic statistics, the physics residual and
    the family classifier's probabilities; the JSON references both files."""
    from fwi_core.data import FWIDataset, family_kfold, index_train
    from fwi_core.ensemble.family_fit import oof_proba_path, save_oof_proba, train_family_classifier_oof
    from fwi_core.physics import generate

    ds = FWIDataset(index_train(fake_root))
    clf, oof = train_family_classifier_oof(ds, folds=2, seed=0, epochs=1, batch_size=4, width=4, progress=False)
    clf_path = clf.save(tmp_path / "runs" / "family_classifier.pt")
    save_oof_proba(oof_proba_path(clf_path), oof)
    rng = np.random.default_rng(0)
    fams = ds.families()
    truth = np.stack([ds[i][1][0].numpy() for i in range(len(ds))]) * 1500 + 3000
    runs = tmp_path / "runs"
    for fold, (_, idx) in enumerate(family_kfold(fams, 2, 0)):
        t = truth[idx]
        f = [fams[i] for i in idx]
        for model, noise in (("a", 20.0), ("b", 60.0)):
            write_run(runs, f"{model}-fold{fold}", fold, idx, np.clip(t + rng.normal(0, noise, t.shape), 1500, 4500),
                      t, f)
    rep = fit_ensemble([runs], method="projected_gradient", iterations=10, meta="always", data=fake_root,
                       family_classifier=clf_path, physics_nt=8, meta_kwargs={"epochs": 3, "hidden": 4})
    cfg = EnsembleConfig.load(rep["config"])
    assert cfg.meta_learner == "meta_learner.pt" and cfg.family_classifier == "family_classifier.pt"
    ens = Ensemble.from_checkpoints([], config=rep["config"], device="cpu")
    spec = ens.meta_learner.spec
    assert spec.seismic and spec.family and spec.physics_nt == 8
    # features: 3 family probabilities + 5 seismic + 3*2 prediction + 3 disagreement + 2 physics
    assert ens.meta_learner.n_features == 3 + 5 + 6 + 3 + 2
    assert set(ens.family_classifier.families) == {"CurveFault_B", "FlatVel_A", "Style_A"}
    x = torch.stack([ds[i][0] for i in range(3)])
    maps = torch.from_numpy(generate("FlatVel_A", 3, seed=1)).float()
    from fwi_core.data.normalize import normalize_velocity
    preds = {n: normalize_velocity(maps + (10.0 if ens.members[n].group == "a" else -40.0))
             for n in ens.member_names}
    w_meta = ens.sample_weights(ens.member_names, 3, None, x, torch.stack(list(preds.values())))
    w_static = ens.sample_weights(ens.member_names, 3, ["FlatVel_A"] * 3)
    assert w_meta.shape == (3, 4) and torch.allclose(w_meta.sum(1), torch.ones(3))
    group_preds = torch.stack([preds["a-fold0"], preds["b-fold0"]])
    gw = ens.meta_learner.predict_weights(group_preds, x, family_proba=ens.family_classifier.predict_proba(x))
    for i, name in enumerate(ens.member_names):                       # a group's weight, shared by its 2 runs
        j = ens.meta_learner.member_names.index(ens.members[name].group)
        assert torch.allclose(w_meta[:, i], gw[:, j] / 2)
    # without the seismic the meta-learner cannot run: static weights of the given families
    assert torch.allclose(ens.sample_weights(ens.member_names, 3, ["FlatVel_A"] * 3, None,
                                             torch.stack(list(preds.values()))), w_static)
    assert len(ens.predict_families(x)) == 3


def test_command_line(tmp_path, capsys):
    from fwi_core.ensemble.__main__ import main

    runs = tmp_path / "runs"
    good_and_bad(runs)
    assert main(["fit", str(runs), "--out", str(tmp_path / "e.json"), "--method", "projected_gradient",
                 "--iterations", "30", "--meta", "--meta-epochs", "10"]) == 0
    out = capsys.readouterr().out
    assert "40 aligned OOF samples, models: bad (2 runs), good (2 runs)" in out
    assert "optimised" in out and "meta-learner on held-out folds" in out and "wrote" in out
    assert EnsembleConfig.load(tmp_path / "e.json").member_names[0] == "bad_fold0"
    assert main(["fit", str(tmp_path / "nothing")]) == 2
    assert "error:" in capsys.readouterr().err


def test_package_needs_only_numpy_and_torch():
    import subprocess
    import sys

    from tests.conftest import ROOT

    code = ("import sys\n"
            "for m in ('optuna', 'scipy', 'timm', 'torch_geometric', 'e3nn', 'monai'): sys.modules[m] = None\n"
            "import numpy as np\n"
            "from fwi_core.ensemble import Ensemble, MetaLearner\n"
            "from fwi_core.ensemble.optimize import optimize_weights\n"
            "from fwi_core.ensemble.fit import fit_ensemble\n"
            "from fwi_core.recipes import distill\n"
            "p = np.random.default_rng(0).normal(size=(2, 10, 4, 4)).astype('float32')\n"
            "w = optimize_weights(p, p[0], method='auto', iterations=5)\n"
            "print(w.info['method'])\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "projected_gradient", res.stderr


def test_meta_learner_not_referenced_when_it_does_not_win(tmp_path):
    """Mirrored errors: the equal weights are exact, nothing can beat them; the
    meta-learner file is written but the JSON does not point to it (unless 'always')."""
    rng = np.random.default_rng(0)
    runs = tmp_path / "runs"
    for fold in (0, 1, 2):
        t = rng.uniform(2000, 4000, (20, H, W))
        e = rng.normal(0, 30, t.shape)
        idx = np.arange(20) + 20 * fold
        write_run(runs, f"p-fold{fold}", fold, idx, t + e, t, ["A"] * 20, checkpoint=False)
        write_run(runs, f"m-fold{fold}", fold, idx, t - e, t, ["A"] * 20, checkpoint=False)
    with pytest.warns(UserWarning, match="does not exist"):
        rep = fit_ensemble([runs], method="projected_gradient", iterations=20, meta=True,
                           meta_kwargs={"epochs": 20})
    assert not rep["meta"]["beats_static"] and not rep["meta_written"]
    assert EnsembleConfig.load(rep["config"]).meta_learner is None
    assert (runs / "meta_learner.pt").is_file()
    with pytest.warns(UserWarning):
        rep = fit_ensemble([runs], method="projected_gradient", iterations=20, meta="always",
                           meta_kwargs={"epochs": 2})
    assert EnsembleConfig.load(rep["config"]).meta_learner == "meta_learner.pt"
