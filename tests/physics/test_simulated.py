import json
import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from fwi_core.data import FWIDataset, index_train, normalize_seismic, normalize_velocity
from fwi_core.physics import simulate
from fwi_core.physics.simulated import MixedDataset, SimulatedDataset, mix_datasets
from fwi_core.physics import simulated as simulated_mod

NT = 30   # short records keep these tests fast; items are then (5, NT, 70)


def _ds(n=4, **kw):
    kw.setdefault("nt", NT)
    kw.setdefault("device", "cpu")
    kw.setdefault("backend", "eager")
    kw.setdefault("progress", False)
    return SimulatedDataset(n, **kw)


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_items_shapes_ranges_and_seismic_is_the_simulation_of_the_map():
    ds = _ds(4, seed=3, dtype="float32", augment={"crop": 0.5, "warp": 0.5, "blend": 0.5})
    ds.set_epoch(2)
    assert len(ds) == 4 and ds.epoch == 2
    x, y, fam = ds[1]
    assert x.shape == (5, NT, 70) and y.shape == (1, 70, 70) and x.dtype == y.dtype == torch.float32
    assert fam == ds.families()[1]
    seis, vel, fam_raw = ds.raw(1)
    assert fam_raw == fam and vel.min() >= 1500 and vel.max() <= 4500
    np.testing.assert_allclose(x.numpy(), normalize_seismic(seis), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(y.numpy(), normalize_velocity(vel), rtol=1e-6)
    assert -1 <= float(y.min()) and float(y.max()) <= 1
    maps = np.stack([ds.raw(i)[1] for i in range(4)])
    want = simulate(maps, nt=NT, backend="eager")
    got = np.stack([ds.raw(i)[0] for i in range(4)])
    assert _rel(got, want) < 1e-5
    # float16 storage (the default): the same seismic to float16 rounding
    ds16 = _ds(4, seed=3, augment={"crop": 0.5, "warp": 0.5, "blend": 0.5})
    ds16.set_epoch(2)
    assert ds16._seis.dtype == np.float16
    assert ds16._seis.nbytes == 4 * 5 * NT * 70 * 2                # n * 5 * nt * 70 * 2 bytes
    got16 = np.stack([ds16.raw(i)[0] for i in range(4)])
    np.testing.assert_array_equal(np.stack([ds16.raw(i)[1] for i in range(4)]), maps)
    assert 0 < _rel(got16, want) < 2e-3


def test_deterministic_from_seed_and_fresh_every_epoch():
    a, b = _ds(3, seed=11), _ds(3, seed=11)
    a.set_epoch(1)
    b.set_epoch(1)
    for i in range(3):
        sa, va, fa = a.raw(i)
        sb, vb, fb = b.raw(i)
        np.testing.assert_array_equal(va, vb)
        np.testing.assert_array_equal(sa, sb)
        assert fa == fb and a.applied(i) == b.applied(i)
    fams = a.families()
    b.set_epoch(2)
    assert b.families() == fams                        # positions keep their family
    for i in range(3):
        assert not np.array_equal(a.raw(i)[1], b.raw(i)[1]), i   # ... with a new map
    c = _ds(3, seed=12)
    assert all(not np.array_equal(c.make_map(1, i)[0], a.raw(i)[1]) for i in range(3))
    # an item read before any set_epoch makes epoch 0
    d = _ds(3, seed=11)
    np.testing.assert_array_equal(d.raw(0)[1], a.make_map(0, 0)[0])
    assert d.epoch == 0


def test_family_subset_weights_and_options_are_checked():
    ds = _ds(8, families=["FlatVel_A", "Style_A"], weights={"FlatVel_A": 3, "Style_A": 1}, augment={})
    fams = ds.families()
    assert sorted(fams) == ["FlatVel_A"] * 6 + ["Style_A"] * 2
    flat = [ds.make_map(0, i)[0] for i in range(8) if fams[i] == "FlatVel_A"]
    assert all(np.ptp(m[0], axis=1).max() == 0 for m in flat)   # no augmentation: flat layers
    assert _ds(7, weights=[1] * 10).families().count("FlatVel_A") in (0, 1)
    with pytest.raises(ValueError, match="unknown families"):
        _ds(2, families=["FlatVel_C"])
    with pytest.raises(ValueError, match="weights"):
        _ds(2, families=["FlatVel_A"], weights=[1, 2])
    with pytest.raises(ValueError, match="samples_per_epoch"):
        _ds(0)
    with pytest.raises(ValueError, match="dtype"):
        _ds(2, dtype="int8")
    with pytest.raises(ValueError, match="unknown augmentation"):
        _ds(2, augment={"flip": 0.5})


def test_blend_keeps_the_first_maps_family():
    ds = _ds(12, families=["FlatVel_A", "Style_B"], augment={"blend": 1.0})
    blended_with_style = 0
    for i in range(12):
        m, applied = ds.make_map(0, i)
        assert applied == ["blend"]
        if ds.families()[i] == "FlatVel_A" and np.ptp(m[0], axis=1).max() > 0:
            blended_with_style += 1        # a flat map blended with a Style_B map: still FlatVel_A
    assert blended_with_style >= 1
    unblended = _ds(12, families=["FlatVel_A", "Style_B"], augment={})
    assert all(np.ptp(unblended.make_map(0, i)[0][0], axis=1).max() == 0
               for i in range(12) if unblended.families()[i] == "FlatVel_A")


def test_cache_round_trip_reads_files_without_simulating(tmp_path, monkeypatch):
    calls = []
    real_simulate = simulated_mod.simulate

    def counting(*a, **kw):
        calls.append(len(a[0]))
        return real_simulate(*a, **kw)

    monkeypatch.setattr(simulated_mod, "simulate", counting)
    a = _ds(3, seed=5, cache_dir=tmp_path / "cache", sim_batch=2)
    a.set_epoch(0)
    assert calls == [2, 1] and not a.last_block["from_cache"]
    seis_p, vel_p, meta_p = a.cache_files(0)
    assert seis_p.is_file() and vel_p.is_file() and meta_p.is_file() and a.key in seis_p.name
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted([seis_p.name, vel_p.name, meta_p.name])
    assert np.load(seis_p, mmap_mode="r").dtype == np.float16
    assert json.loads(meta_p.read_text())["config"]["seed"] == 5
    items = [a.raw(i) for i in range(3)]
    calls.clear()
    b = _ds(3, seed=5, cache_dir=tmp_path / "cache", sim_batch=2)
    b.set_epoch(0)
    assert calls == [] and b.last_block["from_cache"]
    assert isinstance(b._seis, np.memmap)
    for i in range(3):
        np.testing.assert_array_equal(b.raw(i)[0], items[i][0])
        np.testing.assert_array_equal(b.raw(i)[1], items[i][1])
        assert b.applied(i) == a.applied(i)
    # pickling (DataLoader workers) reopens the memory maps
    c = pickle.loads(pickle.dumps(b))
    np.testing.assert_array_equal(c.raw(2)[0], items[2][0])
    # another configuration or epoch is simulated, and gets its own files
    _ds(3, seed=6, cache_dir=tmp_path / "cache").set_epoch(0)
    assert calls
    calls.clear()
    b.set_epoch(1)
    assert calls and b.cache_files(1)[0].is_file()
    # a damaged metadata file: simulated again, not trusted
    meta_p.write_text("{not json")
    calls.clear()
    _ds(3, seed=5, cache_dir=tmp_path / "cache", sim_batch=2).set_epoch(0)
    assert calls == [2, 1]


def test_works_in_a_dataloader():
    ds = _ds(4, seed=0, augment={})
    ds.set_epoch(0)
    x, y, fam = next(iter(DataLoader(ds, batch_size=4)))
    assert x.shape == (4, 5, NT, 70) and y.shape == (4, 1, 70, 70) and list(fam) == ds.families()


class _Real(Dataset):
    """A small in-memory 'real' dataset with the FWIDataset item protocol."""

    def __init__(self, n, nt=NT):
        self.x = torch.zeros(n, 5, nt, 70)
        self.y = torch.zeros(n, 1, 70, 70)
        self.fams = ["FlatVel_B"] * n
        self.epochs = []

    def __len__(self):
        return len(self.x)

    def families(self):
        return list(self.fams)

    def set_epoch(self, e):
        self.epochs.append(e)

    def __getitem__(self, i):
        return self.x[i], self.y[i], self.fams[i]


def test_mixed_dataset_fraction_families_and_epochs():
    real = _Real(30)
    mixed = mix_datasets(real, 0.25, nt=NT, device="cpu", backend="eager", progress=False, augment={},
                         families=["Style_A"])
    assert len(mixed) == 40 and mixed.n_sim == 10 and mixed.sim_fraction == 0.25
    assert len(mixed.simulated) == 10
    assert mixed.families() == ["FlatVel_B"] * 30 + ["Style_A"] * 10
    assert sum(mixed.is_simulated(i) for i in range(len(mixed))) == 10
    x, y, fam = mixed[35]
    assert fam == "Style_A" and float(x.abs().sum()) > 0 and x.shape == (5, NT, 70)
    assert mixed[3][2] == "FlatVel_B" and float(mixed[3][0].abs().sum()) == 0
    before = mixed.raw(35)[1].copy()
    mixed.set_epoch(1)
    assert mixed.simulated.epoch == 1 and real.epochs == [1]
    assert not np.array_equal(mixed.raw(35)[1], before)
    # a larger simulated set: only the first n_sim items are used
    big = _ds(20, augment={})
    m2 = MixedDataset(_Real(9), big, 0.1)
    assert m2.n_sim == 1 and len(m2) == 10
    assert MixedDataset(_Real(9), big).n_sim == 20
    with pytest.raises(ValueError, match="samples_per_epoch=30"):
        MixedDataset(_Real(10), big, 0.75)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        MixedDataset(_Real(10), big, 1.0)
    with pytest.raises(ValueError, match="nt=1000"):
        MixedDataset(_Real(3, nt=1000), big, 0.5)


def test_mix_with_fwidataset_checks_nt(fake_root):
    real = FWIDataset(index_train(fake_root))
    with pytest.raises(ValueError, match="nt=1000"):
        mix_datasets(real, 0.5, nt=NT, device="cpu", progress=False)
    mixed = mix_datasets(real, 0.5, device="cpu", progress=False)   # nt=1000: nothing simulated yet
    assert mixed.families()[:len(real)] == real.families() and len(mixed) == 2 * len(real)


def test_bench_section_quick():
    from tools import bench
    from tools.bench_simdata import run

    assert "simdata" in bench.SECTIONS
    text = run(quick=True)
    row = [line for line in text.splitlines() if line.startswith("| cpu |")]
    assert len(row) == 1
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    assert cells[1:5] == ["4", "2", "50", "eager"] and float(cells[6]) > 0



def test_compiled_runs_pad_the_last_call_to_whole_chunks(monkeypatch):
    calls = []

    def fake(maps, nt, device, batch_chunk, backend):
        calls.append(len(maps))
        return np.repeat(maps.mean(axis=(1, 2, 3))[:, None, None, None], 5 * nt * 70, axis=1).reshape(
            len(maps), 5, nt, 70).astype(np.float32)

    monkeypatch.setattr(simulated_mod, "simulate", fake)
    ds = _ds(7, sim_batch=4, batch_chunk=4, backend="compile", dtype="float32")
    ds.set_epoch(0)
    assert calls == [4, 4]                 # 3 maps padded to a whole chunk of 4: one compiled shape
    for i in range(7):
        seis, vel, _ = ds.raw(i)
        np.testing.assert_allclose(seis, vel.mean(), rtol=1e-6)   # each item's own result
    calls.clear()
    _ds(5, sim_batch=4, batch_chunk=2, backend="eager").set_epoch(0)
    assert calls == [4, 1]
