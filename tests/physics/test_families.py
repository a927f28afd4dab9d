import numpy as np
import pytest

from fwi_core.physics import FAMILIES, generate, simulate
from fwi_core.physics.families import SIZE


def family_statistics(maps: np.ndarray) -> dict:
    """Summary statistics of a stack of maps (n,1,70,70) used to compare A and B variants:
    mean distinct values per column (layer count), share of columns whose velocity ever
    decreases with depth, mean absolute vertical+horizontal gradient (roughness) and range."""
    m = np.asarray(maps, dtype=np.float64).reshape(-1, SIZE, SIZE)
    dz = np.diff(m, axis=1)
    layer_counts = [(np.abs(dz[i]) > 1e-3).sum(axis=0).mean() + 1 for i in range(len(m))]
    non_monotone = (dz < -1e-3).any(axis=1).mean()
    rough = (np.abs(dz).mean() + np.abs(np.diff(m, axis=2)).mean()) / 2
    return {
        "layers_per_column": float(np.mean(layer_counts)),
        "non_monotone_columns": float(non_monotone),
        "roughness": float(rough),
        "min": float(m.min()),
        "max": float(m.max()),
    }


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


def test_generated_maps_simulate_physically():
    """Seismic of a generated map obeys mirror symmetry and causality: the mirrored map
    with mirrored sources gives the mirrored gathers (to float32 rounding), and nothing
    reaches a receiver before the fastest possible arrival."""
    v = generate("CurveFault_B", 1, seed=0)
    cols = (0, 17, 52, 69)                         # a mirror-symmetric source line
    nt = 400
    out = simulate(v, nt=nt, backend="eager", source_columns=cols)
    mirrored = simulate(v[..., ::-1].copy(), nt=nt, backend="eager", source_columns=cols)
    np.testing.assert_allclose(mirrored, out[:, ::-1, :, ::-1], rtol=0, atol=1e-5 * np.abs(out).max())
    assert not np.allclose(out[:, 0], out[:, -1][..., ::-1], atol=1e-3 * np.abs(out).max())  # the map is not symmetric
    # causality: the source at column 0 cannot be heard 600 m away before 600 m / vmax
    # (plus the Ricker's onset: it reaches 1e-3 of its peak about 40 samples before the peak at 73)
    trace = np.abs(out[0, 0, :, 60])
    heard = np.flatnonzero(trace > 1e-3 * np.abs(out[0, 0]).max())
    assert heard.size, "no arrival within the record"
    earliest = 600.0 / float(v.max()) / 1e-3 + 73 - 40
    assert heard[0] >= earliest - 2
