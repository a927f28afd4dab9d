"""EnsembleWeights and the ensemble JSON: hand-computed weights, sums, round trips and
clear errors for bad files."""
import json
import math

import pytest
import torch

from fwi_core.ensemble import EnsembleConfig, EnsembleConfigError, EnsembleWeights, MemberSpec
from fwi_core.ensemble.optimize import weights_from_validation


def test_inverse_mae_weights_hand_computed():
    w = weights_from_validation({"a": {"all": 10.0, "F": 10.0}, "b": {"all": 30.0, "F": 10.0}}, power=1.0)
    assert w.row() == pytest.approx({"a": 0.75, "b": 0.25})       # 1/10 : 1/30
    assert w.row("F") == pytest.approx({"a": 0.5, "b": 0.5})
    w2 = weights_from_validation({"a": {"all": 10.0}, "b": {"all": 30.0}}, power=2.0)
    assert w2.row() == pytest.approx({"a": 0.9, "b": 0.1})        # 1/100 : 1/900


def test_softmin_and_physics_hand_computed():
    w = weights_from_validation({"a": {"all": 10.0}, "b": {"all": 11.0}}, method="softmin", temperature=0.1)
    e = math.exp(-1.0)
    assert w.row() == pytest.approx({"a": 1 / (1 + e), "b": e / (1 + e)})
    # equal MAE, misfit twice as large for b -> weights 2:1 with physics_power 1
    w = weights_from_validation({"a": {"all": 5.0}, "b": {"all": 5.0}},
                                physics={"a": {"all": 0.1}, "b": {"all": 0.2}})
    assert w.row() == pytest.approx({"a": 2 / 3, "b": 1 / 3})


def test_default_row_is_mean_over_families_without_all():
    w = weights_from_validation({"a": {"F": 10.0, "G": 30.0}, "b": {"F": 20.0, "G": 20.0}}, power=1.0)
    assert w.row() == pytest.approx({"a": 0.5, "b": 0.5})        # means 20 and 20
    assert w.row("G") == pytest.approx({"a": 0.4, "b": 0.6})     # 1/30 : 1/20


def test_rows_sum_to_one_and_per_sample_lookup():
    w = EnsembleWeights({"default": {"a": 0.2, "b": 0.3, "c": 0.5}, "F": {"a": 1.0}})
    ws = w.for_samples(["a", "b", "c"], ["F", "other", "F"])
    assert ws.shape == (3, 3)
    assert torch.allclose(ws.sum(1), torch.ones(3))
    assert ws[0].tolist() == [1.0, 0.0, 0.0] and ws[1].tolist() == pytest.approx([0.2, 0.3, 0.5])
    # a subset of the members: renormalised over it
    assert w.for_samples(["b", "c"]).tolist() == pytest.approx([0.375, 0.625])
    # a subset whose weights are all zero in that family: equal weights
    assert w.for_samples(["b", "c"], ["F"])[0].tolist() == pytest.approx([0.5, 0.5])
    with pytest.raises(ValueError, match="no weight for member"):
        w.for_samples(["a", "zzz"])


def test_flat_table_is_global_and_equal_default():
    w = EnsembleWeights({"a": 0.25, "b": 0.75})
    assert w.families == [] and w.row("anything") == {"a": 0.25, "b": 0.75}
    per_fam_only = EnsembleWeights({"F": {"a": 1.0, "b": 0.0}}, members=["a", "b"])
    assert per_fam_only.row() == {"a": 0.5, "b": 0.5}


def test_weights_json_round_trip(tmp_path):
    w = EnsembleWeights({"default": {"a": 0.4, "b": 0.6}, "FlatVel_A": {"a": 0.9, "b": 0.1}})
    path = w.save(tmp_path / "w.json")
    assert EnsembleWeights.load(path) == w
    data = json.loads(path.read_text())
    assert data["format"] == "fwi_core.ensemble/1" and data["weights"]["FlatVel_A"]["a"] == 0.9


def test_config_round_trip(tmp_path):
    cfg = EnsembleConfig([MemberSpec("a", "ra/best.pt"), MemberSpec("a:ema", "ra/best.pt", "ema", "ema", "ra"),
                          MemberSpec("b", "/abs/rb/best.pt", group="rb")],
                         EnsembleWeights({"default": {"a": 0.5, "a:ema": 0.25, "b": 0.25}}),
                         meta_learner="meta.pt", report={"note": 1})
    path = cfg.save(tmp_path / "ens.json")
    back = EnsembleConfig.load(path)
    assert back.to_dict() == cfg.to_dict()
    assert back.resolve("ra/best.pt") == (tmp_path / "ra" / "best.pt").resolve()
    assert str(back.resolve("/abs/rb/best.pt")) == "/abs/rb/best.pt"
    assert EnsembleWeights.load(path).members == ["a", "a:ema", "b"]


def _write(tmp_path, data, name="bad.json"):
    p = tmp_path / name
    p.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return p


MEMBERS = [{"name": "a", "checkpoint": "a.pt"}, {"name": "b", "checkpoint": "b.pt"}]


@pytest.mark.parametrize("weights, message", [
    ({"default": {"a": 0.5, "zzz": 0.5}}, r"weights\.default\.zzz: unknown member 'zzz'"),
    ({"default": {"a": 1.2, "b": -0.2}}, r"weights\.default\.b: negative weight -0\.2"),
    ({"F": {"a": 0.5, "b": 0.2}}, r"weights\.F: weights sum to 0\.7, expected 1"),
    ({"default": {"a": "x", "b": 1.0}}, r"weights\.default\.a: weight must be a finite number"),
    ({"default": {"a": 0.5, "b": 0.5}, "G": 0.3}, r"weights: mix of numbers and rows"),
])
def test_bad_weights_name_file_and_field(tmp_path, weights, message):
    p = _write(tmp_path, {"format": "fwi_core.ensemble/1", "members": MEMBERS, "weights": weights})
    for load in (EnsembleConfig.load, EnsembleWeights.load):
        with pytest.raises(EnsembleConfigError, match=message) as info:
            load(p)
        assert str(p) in str(info.value)


@pytest.mark.parametrize("data, message", [
    ("{not json", "not valid JSON"),
    ({"format": "other/2", "members": MEMBERS}, "format 'other/2'"),
    ({"members": []}, "members: expected a non-empty list"),
    ({"members": [{"name": "a"}]}, r"members\[0\]\.checkpoint: expected a non-empty string"),
    ({"members": [{"name": "a", "checkpoint": "a.pt", "weights": "best"}]}, r"members\[0\]\.weights: 'best'"),
    ({"members": MEMBERS + [{"name": "a", "checkpoint": "c.pt"}]}, r"duplicate name\(s\) \['a'\]"),
    ({"members": MEMBERS, "wieghts": {}}, r"unknown field\(s\) \['wieghts'\]"),
    ({"members": [{"name": "a", "checkpoint": "a.pt", "path": "x"}]}, r"members\[0\]: unknown field\(s\) \['path'\]"),
])
def test_bad_config_files(tmp_path, data, message):
    p = _write(tmp_path, data)
    with pytest.raises(EnsembleConfigError, match=message) as info:
        EnsembleConfig.load(p)
    assert str(p) in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(EnsembleConfigError, match="not found"):
        EnsembleConfig.load(tmp_path / "nope.json")


def test_file_rows_are_renormalised_within_tolerance(tmp_path):
    p = _write(tmp_path, {"members": MEMBERS, "weights": {"default": {"a": 0.333, "b": 0.666}}})
    w = EnsembleWeights.load(p)
    assert sum(w.row().values()) == pytest.approx(1.0, abs=1e-12)
    assert w.row()["a"] == pytest.approx(1 / 3, abs=1e-9)
