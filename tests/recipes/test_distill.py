"""Distillation: the student's targets are the teacher's predictions (by construction),
simulated samples are added, the student trains with the engine and is compared."""
import pytest
import torch

from fwi_core.ensemble import Ensemble, EnsembleWeights, Member
from fwi_core.recipes.distill import TeacherTargets, distill, teacher_targets

from ..ensemble.helpers import TinyNet
from tests.train.helpers import TinyDataset, tiny_cfg


def teacher():
    torch.manual_seed(100)
    a, b = TinyNet(), TinyNet()
    return Ensemble([Member("a", a), Member("b", b)],
                    EnsembleWeights({"default": {"a": 0.5, "b": 0.5}, "A": {"a": 0.9, "b": 0.1}}))


def test_teacher_targets_are_the_ensemble_predictions():
    ens, ds = teacher(), TinyDataset(10, seed=3)
    t = teacher_targets(ens, ds, batch_size=4, progress=False)
    x = ds.x
    preds = {n: ens.predict_member(n, x) for n in ens.member_names}
    expected = ens.combine(preds, ds.families()).clamp(-1, 1)
    assert torch.allclose(t, expected, atol=1e-6)
    # family A samples use the A row (0.9/0.1), family B the default (0.5/0.5)
    assert torch.allclose(t[0], (0.9 * preds["a"][0] + 0.1 * preds["b"][0]).clamp(-1, 1), atol=1e-6)
    assert torch.allclose(t[1], (0.5 * preds["a"][1] + 0.5 * preds["b"][1]).clamp(-1, 1), atol=1e-6)
    item = TeacherTargets(ds, t)[3]
    assert torch.equal(item[0], ds[3][0]) and torch.equal(item[1], t[3]) and item[2] == ds[3][2]
    with pytest.raises(ValueError, match="10 samples but 9 teacher predictions"):
        TeacherTargets(ds, t[:9])


def test_distill_trains_a_student_on_teacher_targets(tmp_path):
    ens = teacher()
    train_ds, sim_ds, val_ds = TinyDataset(16, seed=0), TinyDataset(8, seed=5), TinyDataset(8, seed=1)
    cfg = tiny_cfg(tmp_path, epochs=3, ema_decay=0.0, lr=1e-2)
    out = distill(ens, train_ds, val_ds, cfg, simulated_dataset=sim_ds, batch_size=8, progress=False)
    tds = out["train_dataset"]
    assert len(tds) == 24 and tds.families() == train_ds.families() + sim_ds.families()
    # by construction: every training target is the teacher's prediction, not the label
    targets = torch.stack([tds[i][1] for i in range(len(tds))])
    xs = torch.cat([train_ds.x, sim_ds.x])
    fams = train_ds.families() + sim_ds.families()
    expected = ens.combine({n: ens.predict_member(n, xs) for n in ens.member_names}, fams).clamp(-1, 1)
    assert torch.allclose(targets, expected, atol=1e-6)
    assert not torch.allclose(targets[:16], train_ds.y, atol=1e-2)
    rep = out["report"]
    assert rep["n_teacher_targets"] == 24
    assert set(rep["student_mae"]) == {"A", "B", "all"} and set(rep["ensemble_mae"]) == {"A", "B", "all"}
    assert rep["student_ms_per_sample"] > 0 and rep["ensemble_ms_per_sample"] > 0
    assert rep["speedup"] == pytest.approx(rep["ensemble_ms_per_sample"] / rep["student_ms_per_sample"])
    hist = out["result"]["history"]
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    # the student moved toward the teacher: closer to the teacher's maps than an untrained model
    torch.manual_seed(0)
    with torch.no_grad():
        before = (TinyNet().eval()(train_ds.x) - expected[:16]).abs().mean()
        after = (out["student"](train_ds.x) - expected[:16]).abs().mean()
    assert after < before


def test_distill_from_the_command_line_with_an_ensemble_json(tmp_path, capsys):
    """``python -m fwi_core.recipes distill --teacher ens.json`` + training flags: the
    student trains on the teacher's predictions of the fold's training maps."""
    import json

    import numpy as np

    from fwi_core.ensemble import EnsembleConfig, MemberSpec
    from fwi_core.models import create_model
    from fwi_core.models.checkpoint import load_model
    from fwi_core.recipes.__main__ import main
    from fwi_core.train.checkpoint import FORMAT, save_checkpoint
    from tests.train.helpers import write_layout

    data = write_layout(tmp_path / "wi", per_family=4)
    torch.manual_seed(0)
    kwargs = {"width": 0.0625}
    for name in ("a", "b"):
        save_checkpoint({"format": FORMAT, "metadata": {"model": "inversionnet", "model_kwargs": kwargs},
                         "model": create_model("inversionnet", **kwargs).state_dict(), "ema": None},
                        tmp_path / "teacher" / name / "best.pt")
    ens_json = EnsembleConfig([MemberSpec("a", "a/best.pt"), MemberSpec("b", "b/best.pt")],
                              EnsembleWeights.equal(["a", "b"])).save(tmp_path / "teacher" / "ensemble.json")
    argv = ["distill", "--teacher", str(ens_json), "--eval-samples", "4", "--data", str(data), "--out",
            str(tmp_path / "student"), "--preset", "cpu", "--model", "inversionnet", "--model-kwargs",
            '{"width": 0.0625}', "--epochs", "1", "--batch-size", "2", "--folds", "2", "--num-workers", "0",
            "--time-budget", "0", "--device", "cpu", "--flip-prob", "0"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "student" in out and "ensemble" in out and "ms per sample" in out and "x faster" in out
    summary = json.loads(out[out.index("{"):])
    assert summary["stopped_reason"] == "completed" and summary["step"] == 2
    student = load_model(summary["best_checkpoint"])
    assert sum(p.numel() for p in student.parameters()) > 0
    with pytest.raises(SystemExit):
        main(["distill", "--teacher", str(tmp_path / "nope.json"), "--data", str(data)])
    assert "is not a file" in capsys.readouterr().err
    np.testing.assert_array_equal(np.load(tmp_path / "student" / "oof_fold0.npz")["indices"].shape, (4,))
