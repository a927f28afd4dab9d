import numpy as np
import pytest

from fwi_core.data import (DataFormatError, FWIDataset, LayoutError, MissingPairError, find_competition_root,
                           index_train, list_test, load_test_sample)


def test_find_root_from_path_env_and_parent(fake_root, tmp_path, monkeypatch):
    assert find_competition_root(fake_root) == fake_root
    assert find_competition_root(tmp_path) == fake_root  # a parent holding the root
    monkeypatch.setenv("FWI_DATA", str(fake_root))
    assert find_competition_root() == fake_root
    monkeypatch.delenv("FWI_DATA")
    assert find_competition_root(search=[tmp_path / "nope", fake_root]) == fake_root
    with pytest.raises(LayoutError, match="not a competition root"):
        find_competition_root(tmp_path / "nope")


def test_index_both_naming_schemes(fake_root):
    pairs = index_train(fake_root)
    assert [(p.family, p.seismic.name, p.velocity.name, p.n) for p in pairs] == [
        ("CurveFault_B", "seis6_1_0.npy", "vel6_1_0.npy", 4),
        ("FlatVel_A", "data1.npy", "model1.npy", 3),
        ("FlatVel_A", "data2.npy", "model2.npy", 3),
        ("Style_A", "data1.npy", "model1.npy", 2),
    ]
    assert [p.family for p in index_train(fake_root, families=["Style_A"])] == ["Style_A"]
    # the index reads headers only: a memory map, not the data
    ds = FWIDataset(pairs)
    s, _ = ds._arrays(0)
    assert isinstance(s, np.memmap)


def test_missing_partner_is_named(fake_root):
    (fake_root / "train_samples" / "CurveFault_B" / "vel6_1_0.npy").unlink()
    with pytest.raises(MissingPairError, match="seis6_1_0.npy.*vel6_1_0.npy"):
        index_train(fake_root)


def test_model_without_data_is_named(fake_root):
    (fake_root / "train_samples" / "FlatVel_A" / "data" / "data2.npy").unlink()
    with pytest.raises(MissingPairError, match="model2.npy"):
        index_train(fake_root)


def test_truncated_and_non_npy_files(fake_root):
    f = fake_root / "train_samples" / "Style_A" / "data" / "data1.npy"
    f.write_bytes(f.read_bytes()[:5000])
    with pytest.raises(DataFormatError, match=r"data1.npy.*not a readable .npy"):
        index_train(fake_root)
    f.write_text("hello")
    with pytest.raises(DataFormatError, match="data1.npy"):
        index_train(fake_root)


def test_wrong_shape_dtype_and_count(fake_root):
    d = fake_root / "train_samples" / "Style_A"
    np.save(d / "data" / "data1.npy", np.zeros((2, 5, 999, 70), np.float32))
    with pytest.raises(DataFormatError, match=r"shape \(2, 5, 999, 70\), expected \(N, 5, 1000, 70\)"):
        index_train(fake_root)
    np.save(d / "data" / "data1.npy", np.zeros((2, 5, 1000, 70), np.int32))
    with pytest.raises(DataFormatError, match="dtype int32"):
        index_train(fake_root)
    np.save(d / "data" / "data1.npy", np.zeros((3, 5, 1000, 70), np.float32))
    with pytest.raises(MissingPairError, match="3 samples but"):
        index_train(fake_root)


def test_nan_sample_is_reported_with_file_and_index(fake_root):
    d = fake_root / "train_samples" / "Style_A" / "model" / "model1.npy"
    v = np.load(d)
    v[1, 0, 3, 3] = np.nan
    np.save(d, v)
    ds = FWIDataset(index_train(fake_root))
    ds[len(ds) - 2]
    with pytest.raises(DataFormatError, match="model1.npy: sample 1 velocity contains NaN"):
        ds[len(ds) - 1]


def test_test_listing_and_loading(fake_root):
    files = list_test(fake_root)
    assert [o for o, _ in files] == ["000039dca2", "0a1b2c3d4e", "ffffffffff"]
    assert load_test_sample(files[0][1]).shape == (5, 1000, 70)
    np.save(files[1][1], np.zeros((5, 1000, 69), np.float32))
    with pytest.raises(DataFormatError, match=r"0a1b2c3d4e.npy: test seismic has shape"):
        load_test_sample(files[1][1])
    with pytest.raises(LayoutError):
        list_test(fake_root / "train_samples")
