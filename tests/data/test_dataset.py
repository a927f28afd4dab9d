from collections import Counter

import numpy as np
import torch

from fwi_core.data import (FWIDataset, TestDataset, balanced_indices, denormalize_seismic,
                           denormalize_velocity, family_kfold, hflip, index_train,
                           normalize_seismic, normalize_velocity)


def test_items_are_normalised_tensors_with_family(fake_root):
    ds = FWIDataset(index_train(fake_root))
    assert len(ds) == 12
    x, y, fam = ds[0]
    assert x.shape == (5, 1000, 70) and y.shape == (1, 70, 70) and x.dtype == torch.float32
    assert fam == "CurveFault_B"
    assert y.min() >= -1 and y.max() <= 1
    raw_x, raw_y, _ = ds.raw(0)
    np.testing.assert_allclose(denormalize_velocity(y.numpy()), raw_y, rtol=1e-6)
    np.testing.assert_allclose(denormalize_seismic(x.numpy().astype(np.float64)), raw_x, rtol=1e-4, atol=1e-5)
    # global index -> (file, row) across files
    assert ds.locate(4) == (1, 0) and ds.locate(7) == (2, 0) and ds.locate(11) == (3, 1)
    assert ds.families()[4:10] == ["FlatVel_A"] * 6


def test_normalisation_inverse_is_exact_on_known_values():
    v = np.array([1500.0, 3000.0, 4500.0])
    np.testing.assert_allclose(normalize_velocity(v), [-1, 0, 1])
    np.testing.assert_allclose(denormalize_velocity(normalize_velocity(v)), v)
    s = np.array([-26.95, 0.0, 52.77, 3.5])
    n = normalize_seismic(s)
    np.testing.assert_allclose(n[[0, 2]], [-1, 1], atol=1e-12)
    np.testing.assert_allclose(denormalize_seismic(n), s, rtol=1e-12, atol=1e-12)
    t = torch.tensor(s)
    torch.testing.assert_close(normalize_seismic(t), torch.tensor(n))


def test_hflip_is_consistent_and_an_involution():
    s = np.arange(5 * 4 * 3, dtype=np.float32).reshape(5, 4, 3)
    v = np.arange(9, dtype=np.float32).reshape(1, 3, 3)
    fs, fv = hflip(s, v)
    np.testing.assert_array_equal(fs[0, :, 0], s[4, :, 2])  # first source <- last, receivers reversed
    np.testing.assert_array_equal(fv[0, 0], v[0, 0, ::-1])
    bs, bv = hflip(torch.from_numpy(s)[None], torch.from_numpy(v)[None])
    np.testing.assert_array_equal(bs[0].numpy(), fs)
    ffs, ffv = hflip(fs, fv)
    np.testing.assert_array_equal(ffs, s)
    np.testing.assert_array_equal(ffv, v)


def test_flip_augmentation_in_dataset(fake_root):
    pairs = index_train(fake_root)
    plain = FWIDataset(pairs)
    flipped = FWIDataset(pairs, flip_prob=1.0)
    x0, y0, _ = plain[3]
    x1, y1, _ = flipped[3]
    torch.testing.assert_close(x1, torch.flip(x0, (0, 2)))
    torch.testing.assert_close(y1, torch.flip(y0, (2,)))


def family_counts(families):
    return dict(sorted(Counter(families).items()))


def test_balanced_indices_down_and_upsample():
    fams = ["a"] * 10 + ["b"] * 2 + ["c"] * 5
    ix = balanced_indices(fams, per_family=5, seed=1)
    got = family_counts([fams[i] for i in ix])
    assert got == {"a": 5, "b": 5, "c": 5}
    assert len(set(ix[[fams[i] == "a" for i in ix]])) == 5  # downsampled without repeats
    assert set(i for i in ix if fams[i] == "b") == {10, 11}  # small family: all of it
    assert balanced_indices(fams, per_family=4, seed=1).tolist() != balanced_indices(fams, per_family=4, seed=2).tolist()


def test_family_kfold_is_stratified_and_partitions():
    fams = ["a"] * 10 + ["b"] * 5 + ["c"] * 20
    folds = family_kfold(fams, k=5, seed=0)
    all_val = np.concatenate([v for _, v in folds])
    assert sorted(all_val.tolist()) == list(range(35))
    for tr, va in folds:
        assert set(tr).isdisjoint(va) and len(tr) + len(va) == 35
        assert family_counts([fams[i] for i in va]) == {"a": 2, "b": 1, "c": 4}


def test_subset_and_test_dataset(fake_root):
    ds = FWIDataset(index_train(fake_root))
    sub = ds.subset([0, 5])
    assert len(sub) == 2 and sub.families() == ["CurveFault_B", "FlatVel_A"]
    td = TestDataset(fake_root)
    x, oid = td[0]
    assert x.shape == (5, 1000, 70) and oid == "000039dca2"
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=0)
    xb, yb, fb = next(iter(loader))
    assert xb.shape == (4, 5, 1000, 70) and len(fb) == 4
