"""Ensemble: hand-computed combinations, family weights, subsets, MC dropout, and
loading members from checkpoints and from an ensemble JSON."""
import json

import pytest
import torch

from fwi_core.ensemble import Ensemble, EnsembleConfigError, EnsembleWeights, Member
from fwi_core.inference import predict_batch

from .helpers import R, T, Const, TinyNet, make_checkpoint


def x_batch(b=3, seed=0):
    return torch.randn(b, 5, T, R, generator=torch.Generator().manual_seed(seed))


def test_combine_reproduces_hand_computed_weights():
    ens = Ensemble([Member("a", Const(0.1)), Member("b", Const(-0.5))],
                   EnsembleWeights({"default": {"a": 0.75, "b": 0.25}, "F": {"a": 0.2, "b": 0.8}}))
    x = x_batch()
    preds = {n: ens.predict_member(n, x) for n in ens.member_names}
    out = ens.combine(preds)
    assert torch.allclose(out, torch.full_like(out, 0.75 * 0.1 + 0.25 * -0.5))
    out = ens.combine(preds, families=["F", "other", "F"])
    assert out[0, 0, 0, 0].item() == pytest.approx(0.2 * 0.1 + 0.8 * -0.5)
    assert out[1, 0, 0, 0].item() == pytest.approx(0.75 * 0.1 + 0.25 * -0.5)
    only_a = ens.combine({"a": preds["a"]})                       # a subset: renormalised
    assert torch.allclose(only_a, preds["a"])
    mean, var = ens.predict(x)                                    # m/s
    assert var is None
    assert mean[0, 0, 0, 0].item() == pytest.approx((0.075 - 0.125 + 1) / 2 * 3000 + 1500, rel=1e-5)


def test_equal_weights_by_default_and_unknown_names():
    ens = Ensemble([Member("a", Const(0.2)), Member("b", Const(0.4))])
    x = x_batch()
    assert ens.combine({n: ens.predict_member(n, x) for n in "ab"})[0, 0, 0, 0].item() == pytest.approx(0.3)
    with pytest.raises(KeyError, match="no member 'c'"):
        ens.predict_member("c", x)
    with pytest.raises(ValueError, match="unknown member"):
        Ensemble([Member("a", Const(0.2))], EnsembleWeights({"a": 0.5, "z": 0.5}))
    with pytest.raises(ValueError, match="duplicate"):
        Ensemble([Member("a", Const(0.2)), Member("a", Const(0.1))])


def test_predict_member_matches_flip_tta_of_inference():
    torch.manual_seed(0)
    net = TinyNet()
    ens = Ensemble([Member("n", net)])
    x = x_batch()
    assert torch.equal(ens.predict_member("n", x, flip_tta=True), predict_batch(net, x, flip_tta=True))
    assert not torch.equal(ens.predict_member("n", x, flip_tta=True), ens.predict_member("n", x))


def test_predict_with_mc_dropout_gives_mixture_variance():
    torch.manual_seed(0)
    ens = Ensemble([Member("a", Const(-0.3, drop=0.5)), Member("b", Const(0.5))])
    mean, var = ens.predict(x_batch(), mc_passes=6)
    assert var.shape == mean.shape == (3, 1, 6, 6)
    # member b has no MC variance; the mixture variance is at least the disagreement
    assert (var > 0).all()
    assert not any(m.training for m in ens.members["a"].model.modules())
    with pytest.raises(ValueError, match="mc_passes"):
        ens.predict(x_batch(), mc_passes=1)


def test_inverse_variance_prefers_the_certain_member():
    torch.manual_seed(0)
    ens = Ensemble([Member("noisy", Const(-0.5, drop=0.5)), Member("sure", Const(0.5))])
    m_iv, _ = ens.predict(x_batch(), mc_passes=16, inverse_variance=True)
    m_st, _ = ens.predict(x_batch(), mc_passes=16)
    target = 0.5 * 1500 + 3000                                    # the certain member's value
    assert (m_iv - target).abs().mean() < 0.05 * (m_st - target).abs().mean()


def test_from_checkpoints_one_member_each(tmp_path):
    a = make_checkpoint(tmp_path / "run-a" / "best.pt", 0, 100, metrics_source="raw")
    b = make_checkpoint(tmp_path / "run-b" / "best.pt", 1, 101, metrics_source="ema")
    ens = Ensemble.from_checkpoints([tmp_path], device="cpu")
    assert ens.member_names == ["run-a/best", "run-b/best"]
    assert ens.members["run-a/best"].model.fwi_weights == "raw"
    assert ens.members["run-b/best"].kind == "ema"
    assert ens.weights.row() == {"run-a/best": 0.5, "run-b/best": 0.5}
    assert ens.members["run-a/best"].path == a and ens.members["run-b/best"].path == b


def test_from_config_raw_and_ema_members(tmp_path):
    make_checkpoint(tmp_path / "run-a" / "best.pt", 0, 100)
    cfg = {"format": "fwi_core.ensemble/1",
           "members": [{"name": "raw", "checkpoint": "run-a/best.pt", "weights": "raw"},
                       {"name": "ema", "checkpoint": "run-a/best.pt", "weights": "ema", "kind": "ema"}],
           "weights": {"default": {"raw": 0.25, "ema": 0.75}}}
    (tmp_path / "ens.json").write_text(json.dumps(cfg))
    ens = Ensemble.from_checkpoints([], config=tmp_path / "ens.json", device="cpu")
    x = x_batch()
    pr, pe = ens.predict_member("raw", x), ens.predict_member("ema", x)
    assert not torch.allclose(pr, pe)
    assert torch.allclose(ens.combine({"raw": pr, "ema": pe}), 0.25 * pr + 0.75 * pe, atol=1e-6)
    torch.manual_seed(0)
    assert torch.allclose(pr, TinyNet().eval()(x))                  # raw = the seed-0 weights


def test_from_config_finds_moved_checkpoints_and_reports_missing(tmp_path):
    make_checkpoint(tmp_path / "elsewhere" / "run-a" / "best.pt")
    cfg = {"members": [{"name": "a", "checkpoint": "run-a/best.pt"}]}
    (tmp_path / "ens.json").write_text(json.dumps(cfg))
    ens = Ensemble.from_checkpoints([tmp_path / "elsewhere"], config=tmp_path / "ens.json", device="cpu")
    assert ens.members["a"].path == tmp_path / "elsewhere" / "run-a" / "best.pt"
    with pytest.raises(EnsembleConfigError, match=r"members\['a'\]\.checkpoint: run-a/best.pt not found"):
        Ensemble.from_checkpoints([], config=tmp_path / "ens.json", device="cpu")
