import json

import numpy as np
import pytest
import torch

from fwi_core.data import FWIDataset, index_train, list_test, load_test_sample, normalize_seismic
from fwi_core.physics import generate, simulate
from fwi_core.recipes import pseudo_dataset, pseudo_label_round
from tools import pseudo_label


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


class _LayeredPredictor:
    """A stand-in predictor: a FlatVel_A map per input, chosen by the input's content."""

    def __init__(self):
        self.calls = 0

    def __call__(self, x):
        self.calls += 1
        seeds = [int(abs(float(s.sum())) * 1000) % 997 for s in x]
        return torch.from_numpy(np.concatenate([generate("FlatVel_A", 1, seed=s) for s in seeds]))


def test_round_writes_a_readable_layout_of_simulated_predictions(fake_root, tmp_path):
    out = tmp_path / "pseudo"
    pred = _LayeredPredictor()
    res = pseudo_label_round(pred, fake_root, out, limit=2, batch_size=1, samples_per_file=1, device="cpu",
                             backend="eager", progress=False)
    assert res["samples"] == 2 and len(res["files"]) == 2 and pred.calls == 2
    ts = out / "train_samples" / "Pseudo"
    assert (ts / "data/data1.npy").is_file() and (ts / "model/model2.npy").is_file()
    pairs = index_train(out)
    assert [p.family for p in pairs] == ["Pseudo", "Pseudo"] and [p.n for p in pairs] == [1, 1]
    ds = FWIDataset(pairs)
    assert ds.families() == ["Pseudo"] * 2 and len(pseudo_dataset(out)) == 2
    # the maps are the predictions of the first test files, in oid order; the gathers their simulation
    tests = list_test(fake_root)[:2]
    manifest = json.loads((out / "pseudo_labels.json").read_text())
    assert manifest["oids"] == [o for o, _ in tests] and manifest["samples"] == 2
    x = torch.from_numpy(np.stack([normalize_seismic(load_test_sample(p)) for _, p in tests]))
    want_maps = _LayeredPredictor()(x).numpy()
    maps = np.stack([ds.raw(i)[1] for i in range(2)])
    np.testing.assert_array_equal(maps, want_maps)
    assert not np.array_equal(maps[0], maps[1])
    assert _rel(ds.raw(1)[0], simulate(maps[1:], backend="eager")[0]) < 1e-3        # float16 storage
    # a second round needs overwrite; it replaces the folder and leaves no temporary folders
    with pytest.raises(FileExistsError, match="overwrite"):
        pseudo_label_round(pred, fake_root, out, device="cpu", progress=False)
    res2 = pseudo_label_round(pred, fake_root, out, limit=1, device="cpu", backend="eager", overwrite=True,
                              progress=False)
    assert res2["samples"] == 1 and [p.n for p in index_train(out)] == [1]
    assert sorted(p.name for p in out.iterdir()) == ["pseudo_labels.json", "train_samples"]


def test_predictor_output_is_checked(fake_root, tmp_path):
    with pytest.raises(ValueError, match="m/s"):
        pseudo_label_round(lambda x: torch.zeros(len(x), 1, 70, 70), fake_root, tmp_path / "a", device="cpu",
                           progress=False)
    with pytest.raises(ValueError, match=r"\(1, 1, 70, 70\)"):
        pseudo_label_round(lambda x: torch.full((len(x), 2, 70, 70), 3000.0), fake_root, tmp_path / "b",
                           limit=1, device="cpu", progress=False)
    with pytest.raises(ValueError, match="predictor must be"):
        pseudo_label_round([1, 2], fake_root, tmp_path / "c", device="cpu", progress=False)
    # nothing half-written is left behind
    assert not (tmp_path / "a").exists()               # a round whose predictor fails writes nothing


@pytest.fixture
def checkpoint(tmp_path):
    from fwi_core.models import create_model
    from fwi_core.train.checkpoint import FORMAT, save_checkpoint

    torch.manual_seed(0)
    kwargs = {"width": 0.0625}
    model = create_model("inversionnet", **kwargs)
    path = tmp_path / "run" / "best.pt"
    path.parent.mkdir()
    save_checkpoint({"format": FORMAT, "metadata": {"model": "inversionnet", "model_kwargs": kwargs},
                     "model": model.state_dict(), "ema": None}, path)
    return path


def test_command_runs_one_round_with_checkpoints(fake_root, checkpoint, tmp_path, capsys):
    from fwi_core.inference import predict_batch, to_velocity
    from fwi_core.train import load_model

    out = tmp_path / "out"
    assert pseudo_label.main(["--data", str(fake_root), "--checkpoints", str(checkpoint.parent), "--out", str(out),
                              "--limit", "1", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "pseudo-labelled 1 test samples with 1 checkpoint(s) on cpu" in text and "samples/s" in text
    ds = FWIDataset(index_train(out))
    seis, vel, fam = ds.raw(0)
    assert fam == "Pseudo"
    _, path = list_test(fake_root)[0]
    x = torch.from_numpy(normalize_seismic(load_test_sample(path)))[None]
    want = to_velocity(predict_batch([load_model(checkpoint)], x)).numpy()[0]
    np.testing.assert_allclose(vel, want, rtol=1e-5)
    assert _rel(seis, simulate(vel[None])[0]) < 1e-3                      # float16 storage
    # a second run without --force is refused with a clear message
    assert pseudo_label.main(["--data", str(fake_root), "--checkpoints", str(checkpoint), "--out", str(out),
                              "--limit", "1", "--device", "cpu"]) == 2
    assert "--force" in capsys.readouterr().err


def test_models_are_averaged_and_defaults(tmp_path):
    import inspect

    from fwi_core.inference import predict_batch, to_velocity
    from fwi_core.recipes import pseudo_label as pl

    assert inspect.signature(pseudo_label_round).parameters["samples_per_file"].default == 500
    torch.manual_seed(0)
    from fwi_core.models import create_model

    models = [create_model("inversionnet", width=0.0625).eval() for _ in range(2)]
    x = torch.randn(2, 5, 1000, 70) / 3
    fn, desc = pl._predict_fn(models, torch.device("cpu"), False, "auto")
    np.testing.assert_allclose(fn(x).numpy(), to_velocity(predict_batch(models, x)).numpy(), rtol=1e-6)
    assert len(desc) == 2
    one, _ = pl._predict_fn(models[0], torch.device("cpu"), True, "auto")
    np.testing.assert_allclose(one(x).numpy(), to_velocity(predict_batch(models[0], x, flip_tta=True)).numpy(),
                               rtol=1e-6)


def test_a_round_keeps_the_most_confident_that_fit_the_size(fake_root, tmp_path):
    """float16 gathers (719,600 bytes a sample with the map); max_gb / max_samples keep the
    samples ranked most confident: by the flip disagreement, or by the data misfit."""
    from fwi_core.models import create_model
    from fwi_core.recipes.pseudo_label import bytes_per_sample

    assert bytes_per_sample() == 719_600 and bytes_per_sample(dtype="float32") == 1_419_600
    torch.manual_seed(0)
    model = create_model("inversionnet", width=0.0625).eval()
    res = pseudo_label_round(model, fake_root, tmp_path / "d", max_gb=2.5 * 719_600 / 1e9, device="cpu",
                             backend="eager", progress=False)
    assert res["candidates"] == 3 and res["samples"] == 2 and res["bytes"] == 2 * 719_600
    assert res["rank_by"] == "disagreement" and res["dtype"] == "float16"
    manifest = json.loads((tmp_path / "d" / "pseudo_labels.json").read_text())
    # the scores of the kept samples: the two lowest flip disagreements of the three
    from fwi_core.data import hflip
    from fwi_core.inference import to_velocity

    tests = list_test(fake_root)
    x = torch.from_numpy(np.stack([normalize_seismic(load_test_sample(p)) for _, p in tests]))
    with torch.no_grad():
        dis = (to_velocity(model(x)) - to_velocity(torch.flip(model(hflip(x)), (-1,)))).abs().mean((1, 2, 3))
    keep = sorted(np.argsort(dis.numpy())[:2].tolist())
    assert manifest["oids"] == [tests[i][0] for i in keep]
    np.testing.assert_allclose(manifest["scores"], dis.numpy()[keep], rtol=1e-4)
    data = np.load(tmp_path / "d" / "train_samples" / "Pseudo" / "data" / "data1.npy", mmap_mode="r")
    assert data.dtype == np.float16 and data.shape == (2, 5, 1000, 70)
    # misfit ranking: the kept map explains its test gathers best
    res = pseudo_label_round(_LayeredPredictor(), fake_root, tmp_path / "m", max_samples=1, rank_by="misfit",
                             device="cpu", backend="eager", progress=False)
    assert res["samples"] == 1 and res["rank_by"] == "misfit" and res["score_kept_max"] <= res["score_median"]
    with pytest.raises(ValueError, match="rank_by='disagreement' needs models"):
        pseudo_label_round(_LayeredPredictor(), fake_root, tmp_path / "x", rank_by="disagreement", device="cpu",
                           progress=False)
