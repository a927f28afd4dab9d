import numpy as np
import pytest

from fwi_core.physics import FAMILIES, generate
from fwi_core.physics.map_augment import affine_warp, augment_map, blend, crop_resize, crop_window, warp


def _interfaces(column):
    return np.flatnonzero(np.diff(column) != 0)


@pytest.fixture
def layered():
    return generate("FlatVel_A", 1, seed=2)[0]  # (1, 70, 70), constant along rows


def test_identity_parameters_are_the_identity(layered):
    np.testing.assert_array_equal(warp(layered), layered)
    np.testing.assert_array_equal(crop_window(layered, 0, 0, 70, 70), layered)
    style = generate("Style_B", 1, seed=0)[0, 0]            # (70, 70) input keeps its shape
    out = warp(style, boundary="replicate")
    assert out.shape == (70, 70) and out.dtype == np.float32
    np.testing.assert_array_equal(out, style)


def test_warp_does_what_it_says(layered):
    v = generate("CurveFault_B", 1, seed=1)[0, 0]
    # a translation of 5 rows (replicate boundary): row r of the result is row r+5 of the map
    shifted = warp(v, translate=(5.0, 0.0), boundary="replicate")
    np.testing.assert_allclose(shifted[:-5], v[5:], atol=1e-3)
    np.testing.assert_allclose(shifted[-5:], np.repeat(v[-1:], 5, axis=0), atol=1e-3)
    # a quarter turn is a 90-degree rotation of the array (counter-clockwise in (row, col))
    np.testing.assert_allclose(warp(v, rotation=90.0), np.rot90(v, 1), atol=1e-2)
    # scale 2 zooms into the centre: output row i is input row 34.5 + (i - 34.5) / 2 (bilinear)
    zoom = warp(layered, scale=2.0)[0]
    col = layered[0, :, 0].astype(np.float64)
    want = np.interp(34.5 + (np.arange(70) - 34.5) / 2, np.arange(70), col)
    np.testing.assert_allclose(zoom, np.repeat(want[:, None], 70, axis=1), atol=1e-2)
    # a shear shifts each row sideways by shear * (row - 34.5): on a map linear in the column,
    # out[r, c] = f(c - shear * (r - 34.5)) away from the side edges
    ramp = np.repeat((1600.0 + 30.0 * np.arange(70))[None], 70, axis=0).astype(np.float32)
    sheared = warp(ramp, shear=0.2, boundary="replicate")
    r, c = np.mgrid[0:70, 0:70]
    want = 1600.0 + 30.0 * (c - 0.2 * (r - 34.5))
    inside = (c - 0.2 * (r - 34.5) > 0) & (c - 0.2 * (r - 34.5) < 69)
    np.testing.assert_allclose(sheared[inside], want[inside], atol=1e-2)
    # a small random warp of a flat map tilts its layers: no longer constant along rows
    tilted = affine_warp(layered, np.random.default_rng(0), max_rotation=8.0, max_shear=0.0, max_scale=0.0)
    assert np.ptp(tilted[0], axis=1).max() > 100
    # reflect vs replicate differ only where the warp reaches outside the map
    r1 = warp(v, rotation=10.0, boundary="reflect")
    r2 = warp(v, rotation=10.0, boundary="replicate")
    np.testing.assert_array_equal(r1[30:40, 30:40], r2[30:40, 30:40])
    assert not np.array_equal(r1, r2)


def test_crop_zooms_and_moves_interfaces(layered):
    col = layered[0, :, 0]
    top_half = crop_window(layered, 0, 0, 35, 70)[0]
    # the top half stretched to full height: every interface at row r moves to about 2r
    ifs = _interfaces(col)
    upper = ifs[ifs < 34]
    assert len(upper)
    new = _interfaces(top_half[:, 0])
    for r in upper:
        assert np.min(np.abs(new - (2 * r + 1))) <= 1, (r, new)
    assert np.all(np.ptp(top_half, axis=1) == 0)          # an axis-aligned crop keeps flat layers flat
    # a random crop: the interfaces move, the values stay within the source map's range
    rng = np.random.default_rng(3)
    out = crop_resize(layered, rng, min_scale=0.5)
    assert out.shape == layered.shape and out.dtype == np.float32
    assert not np.array_equal(_interfaces(out[0, :, 0]), ifs)
    assert out.min() >= layered.min() - 1e-3 and out.max() <= layered.max() + 1e-3
    # same generator state, same crop
    np.testing.assert_array_equal(out, crop_resize(layered, np.random.default_rng(3), min_scale=0.5))


def test_blend_is_the_convex_combination():
    a = generate("FlatVel_B", 1, seed=0)[0]
    b = generate("Style_A", 1, seed=0)[0]
    out = blend(a, b, np.random.default_rng(7))
    alpha = np.random.default_rng(7).uniform(0.3, 0.7)
    want = (alpha * a.astype(np.float64) + (1 - alpha) * b.astype(np.float64)).astype(np.float32)
    np.testing.assert_array_equal(out, want)
    # alpha recovered from the result lies in 0.3..0.7
    mask = np.abs(a - b) > 100
    est = np.median((out[mask] - b[mask]) / (a[mask] - b[mask]))
    assert 0.3 <= est <= 0.7 and est == pytest.approx(alpha, abs=1e-3)
    with pytest.raises(ValueError, match="shapes"):
        blend(a, b[..., :60], np.random.default_rng(0))


def test_results_stay_in_range_and_clip():
    rng = np.random.default_rng(0)
    for fam in FAMILIES:
        v = generate(fam, 2, seed=5)
        for m in v:
            for out in (crop_resize(m, rng), affine_warp(m, rng, max_rotation=30, max_shear=0.5, max_scale=0.5),
                        blend(m, v[0], rng)):
                assert out.dtype == np.float32 and out.min() >= 1500 and out.max() <= 4500
    wild = np.full((70, 70), 3000.0, np.float32)
    wild[:10] = 1000.0
    wild[-10:] = 6000.0
    for out in (warp(wild, rotation=5.0), crop_window(wild, 0, 0, 70, 70), blend(wild, wild, rng)):
        assert out.min() == 1500 and out.max() == 4500


def test_augment_map_probabilities_and_order():
    v = generate("CurveVel_A", 1, seed=0)[0]
    partner_calls = []

    def partner(r):
        partner_calls.append(1)
        return generate("Style_A", 1, seed=len(partner_calls))[0]

    out, applied = augment_map(v, np.random.default_rng(0), {}, partner=None)
    assert applied == [] and np.array_equal(out, v)
    out, applied = augment_map(v, np.random.default_rng(0), {"crop": 1.0, "warp": 1.0, "blend": 1.0}, partner)
    assert applied == ["blend", "crop", "warp"] and len(partner_calls) == 1
    assert not np.array_equal(out, v) and out.shape == v.shape
    rng = np.random.default_rng(1)
    hits = sum("crop" in augment_map(v, rng, {"crop": 0.3})[1] for _ in range(400))
    assert 0.23 * 400 < hits < 0.37 * 400
    with pytest.raises(ValueError, match="unknown augmentation"):
        augment_map(v, rng, {"zoom": 0.5})
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        augment_map(v, rng, {"crop": 1.5})
    with pytest.raises(ValueError, match="partner"):
        augment_map(v, rng, {"blend": 0.5})
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        warp(np.zeros((2, 70, 70)))


def test_random_draws_follow_the_documented_defaults(layered):
    """crop_resize: window sides uniform in [0.6, 1] of the map's, position uniform inside;
    affine_warp: rotation in ±10 degrees, shear in ±0.15, scale in 1 ± 0.15."""
    v = generate("CurveFault_A", 1, seed=4)[0]
    r = np.random.default_rng(9)
    sy, sx = r.uniform(0.6, 1.0), r.uniform(0.6, 1.0)
    top, left = r.uniform(0, 70 - 70 * sy), r.uniform(0, 70 - 70 * sx)
    np.testing.assert_array_equal(crop_resize(v, np.random.default_rng(9)), crop_window(v, top, left, 70 * sy, 70 * sx))
    r = np.random.default_rng(10)
    rot, shear, scale = r.uniform(-10, 10), r.uniform(-0.15, 0.15), r.uniform(0.85, 1.15)
    np.testing.assert_array_equal(affine_warp(v, np.random.default_rng(10)),
                                  warp(v, rotation=rot, shear=shear, scale=scale, boundary="reflect"))
