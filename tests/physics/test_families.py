import numpy as np
import pytest

from fwi_core.physics import FAMILIES, family_statistics, generate, simulate


@pytest.mark.parametrize("family", FAMILIES)
def test_shape_range_and_determinism(family):
    a = generate(family, 6, seed=3)
    assert a.shape == (6, 1, 70, 70) and a.dtype == np.float32
    assert a.min() >= 1500 and a.max() <= 4500
    np.testing.assert_array_equal(a, generate(family, 6, seed=3))
    assert not np.array_equal(a, generate(family, 6, seed=4))


@pytest.mark.parametrize("kind", ["FlatVel", "CurveVel", "FlatFault", "CurveFault"])
def test_b_variants_have_more_and_non_monotone_layers(kind):
    sa = family_statistics(generate(kind + "_A", 60, seed=0))
    sb = family_statistics(generate(kind + "_B", 60, seed=0))
    assert sb["layers_per_column"] > sa["layers_per_column"] + 1.5
    assert sb["non_monotone_columns"] > 0.8
    assert sa["non_monotone_columns"] < 0.2  # A: velocity increases with depth (faults aside)
    if kind.startswith("Flat") and not kind.endswith("Fault"):
        assert sa["non_monotone_columns"] == 0.0


def test_style_b_is_rougher_and_smooth_fields_are_not_layered():
    sa = family_statistics(generate("Style_A", 40, seed=0))
    sb = family_statistics(generate("Style_B", 40, seed=0))
    assert sb["roughness"] > 1.5 * sa["roughness"]
    assert sa["layers_per_column"] > 30  # continuous, not piecewise constant


def test_curved_interfaces_bend_and_flat_do_not():
    flat = generate("FlatVel_A", 20, seed=1)[:, 0]
    curve = generate("CurveVel_A", 20, seed=1)[:, 0]
    # flat maps are constant along each row; curved ones are not
    assert np.all(np.ptp(flat, axis=2) == 0)
    assert np.mean(np.ptp(curve, axis=2) > 0) > 0.1


def test_unknown_family_is_rejected():
    with pytest.raises(ValueError, match="unknown family"):
        generate("FlatVel_C", 1)


def test_generated_maps_simulate():
    v = generate("CurveFault_B", 1, seed=0)
    out = simulate(v, nt=50, backend="eager")
    assert np.isfinite(out).all()
