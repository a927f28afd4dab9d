"""Engine paths the README promises: family information reaching the model, boundary IoU
and SSIM monitors, augmentation, auxiliary losses, the curves' per-family panel, reduced
precision actually running, and out-of-memory agreement under DDP."""
import csv

import numpy as np
import pytest
import torch

from fwi_core.data import denormalize_seismic
from fwi_core.metrics import boundary_iou, per_family, ssim
from fwi_core.train import load_checkpoint, read_metadata, train

from .helpers import TinyNet, tiny_cfg


def _record_inputs(monkeypatch):
    """(x, training) of every TinyNet forward."""
    seen = []
    original = TinyNet.forward

    def forward(self, x, *a, **k):
        seen.append((x.detach().clone(), self.training))
        return original(self, x, *a, **k)

    monkeypatch.setattr(TinyNet, "forward", forward)
    return seen


def test_family_index_reaches_the_model_in_training_only(tmp_path, data):
    res = train(tiny_cfg(tmp_path, epochs=2, model_kwargs={"num_families": 2}, family_loss_weight=1.0),
                datasets=data)
    ck = load_checkpoint(res["last_checkpoint"])
    meta = ck["metadata"]
    assert meta["family_names"] == ["A", "B"]          # not the competition's names: the data's, sorted
    # the per-family terms (zero at init) were trained: they received gradients through family_idx
    assert ck["model"]["family_bias"].abs().sum() > 0
    from fwi_core.train import load_model

    model = load_model(res["last_checkpoint"], weights="raw")
    seen = model.seen_family_idx
    assert seen == []
    x, _, fams = zip(*[data[1][i] for i in range(8)])
    with torch.no_grad():
        model(torch.stack(x))
    assert model.seen_family_idx == [None]             # inference: the model's own family head


def test_family_path_with_specproj_unet_on_layout_data(tmp_path, monkeypatch):
    from fwi_core.models.specproj_unet import SpecProjUNet

    from .helpers import write_layout

    calls = []
    original = SpecProjUNet.forward

    def forward(self, x, family_idx=None):
        calls.append((self.training, None if family_idx is None else family_idx.tolist()))
        return original(self, x, family_idx)

    monkeypatch.setattr(SpecProjUNet, "forward", forward)
    root = write_layout(tmp_path / "wi", per_family=2, families=("FlatVel_A", "Style_B"))
    res = train({"data": str(root), "out": str(tmp_path / "run"), "model": "specproj_unet",
                 "model_kwargs": {"width": 4, "num_families": 10, "family_init": "flatvel"}, "epochs": 1,
                 "batch_size": 2, "folds": 2, "fold": 0, "num_workers": 0, "device": "cpu", "time_budget": 0,
                 "ema_decay": 0.0, "flip_prob": 0.0})
    from fwi_core.physics import FAMILIES

    train_calls = [c for c in calls if c[0]]
    assert train_calls and all(idx is not None for _, idx in train_calls)
    assert {FAMILIES[i] for _, idx in train_calls for i in idx} == {"FlatVel_A", "Style_B"}
    assert all(idx is None for training, idx in calls if not training)     # validation: predicted family
    ck = load_checkpoint(res["last_checkpoint"])
    assert ck["metadata"]["family_names"] == list(FAMILIES)
    assert ck["model"]["family_head.weight"].shape == (10, 32)


def test_boundary_iou_and_ssim_are_logged_per_family_and_monitorable(tmp_path, data):
    res = train(tiny_cfg(tmp_path, epochs=6, lr=0.0, patience=2, ema_decay=0.0, monitor="boundary_iou"),
                datasets=data)
    assert res["stopped_reason"] == "early_stopping" and res["epoch"] == 3   # a plateau (lr 0)
    with open(tmp_path / "run" / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for col in ("val_biou_raw", "val_ssim_raw", "biou_raw/A", "ssim_raw/B"):
        assert col in rows[0]
    # the logged values are the metrics of the out-of-fold predictions (m/s)
    oof = np.load(res["oof_path"])
    p, t = torch.from_numpy(oof["pred"][:, None]), torch.from_numpy(oof["target"][:, None])
    biou = per_family(boundary_iou(p, t).numpy(), list(oof["family"]))
    s = per_family(ssim(p, t, data_range=3000.0, win_size=5).numpy(), list(oof["family"]))
    assert float(rows[-1]["biou_raw/A"]) == pytest.approx(biou["A"], rel=1e-4)
    assert float(rows[-1]["val_ssim_raw"]) == pytest.approx(s["all"], rel=1e-4)
    meta = read_metadata(res["best_checkpoint"])
    assert meta["best"]["monitor"] == "boundary_iou" and meta["best"]["value"] == pytest.approx(biou["all"], rel=1e-4)


def test_amplitude_scaling_and_noise_are_applied(tmp_path, data, monkeypatch):
    seen = _record_inputs(monkeypatch)
    train(tiny_cfg(tmp_path, epochs=1, ema_decay=0.0, scale_prob=1.0, scale_range=(2.0, 2.0),
                   balance_families=False), datasets=data)
    xs = torch.cat([x for x, training in seen if training])
    raw_seen = denormalize_seismic(xs.double())
    raw_data = denormalize_seismic(data[0].x.double())
    # every training input is some dataset sample with its raw amplitude doubled
    for r in raw_seen:
        ratios = [(r - 2 * d).abs().max().item() / d.abs().max().item() for d in raw_data]
        assert min(ratios) < 1e-4
    seen.clear()
    train(tiny_cfg(tmp_path / "n", epochs=1, ema_decay=0.0, noise_prob=1.0, noise_std=0.1), datasets=data)
    xs = torch.cat([x for x, training in seen if training])
    raw_seen = denormalize_seismic(xs.double())
    for r in raw_seen:
        d = min(raw_data, key=lambda d: (r - d).abs().mean().item())
        noise = r - d
        rel = noise.pow(2).mean().sqrt() / d.pow(2).mean().sqrt()
        assert rel.item() == pytest.approx(0.1, rel=0.15)     # noise_std x the sample's RMS
        assert abs(noise.mean().item()) < 4 * noise.std().item() / noise.numel() ** 0.5   # zero-mean


def test_augmentation_is_reproducible(tmp_path, data, monkeypatch):
    seen = _record_inputs(monkeypatch)
    cfg = dict(epochs=1, ema_decay=0.0, scale_prob=0.5, noise_prob=0.5)
    train(tiny_cfg(tmp_path / "a", **cfg), datasets=data)
    first = [x for x, t in seen if t]
    seen.clear()
    train(tiny_cfg(tmp_path / "b", **cfg), datasets=data)
    second = [x for x, t in seen if t]
    assert all(torch.equal(a, b) for a, b in zip(first, second)) and len(first) == len(second) == 4


def test_latent_penalty_is_added_for_the_invertible_unet(tmp_path):
    from .helpers import write_layout

    root = write_layout(tmp_path / "wi", per_family=2)
    common = {"data": str(root), "model": "invertible_unet", "epochs": 1, "batch_size": 2, "folds": 0,
              "num_workers": 0, "device": "cpu", "time_budget": 0, "ema_decay": 0.0, "max_steps": 1,
              "log_every": 1, "model_kwargs": {"width": 4, "latent_channels": 4, "hidden": 8,
                                               "blocks_per_level": 1, "drop_rate": 0.0}}
    losses = {}
    for w in (0.0, 10.0):
        res = train({**common, "out": str(tmp_path / f"run{w}"), "latent_weight": w})
        losses[w] = res["history"][-1]["train_loss"]
    # same first step, same data: the difference is 10 x the latent penalty (> 0)
    assert losses[10.0] > losses[0.0] + 1e-4


def test_curves_have_the_per_family_panel(tmp_path, data, monkeypatch):
    import fwi_core.plotting as plotting

    asked = {}
    original = plotting.plot_curves

    def plot_curves(history, x="epoch", keys=None, **kw):
        asked["keys"] = list(keys)
        return original(history, x=x, keys=keys, **kw)

    monkeypatch.setattr(plotting, "plot_curves", plot_curves)
    train(tiny_cfg(tmp_path, epochs=1), datasets=data)
    assert {"train_loss", "val_mae_raw", "val_mae_ema", "mae_raw/A", "mae_ema/B"} <= set(asked["keys"])
    assert (tmp_path / "run" / "curves.png").stat().st_size > 1000


@pytest.mark.parametrize("amp,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_amp_runs_the_forward_in_reduced_precision(tmp_path, data, monkeypatch, amp, dtype):
    dtypes = []
    original = TinyNet.forward

    def forward(self, x, *a, **k):
        out = original(self, x, *a, **k)
        dtypes.append(self.fc1(torch.zeros(1, self.fc1.in_features)).dtype)   # a matmul under the same autocast
        return out

    monkeypatch.setattr(TinyNet, "forward", forward)
    res = train(tiny_cfg(tmp_path, epochs=1, amp=amp), datasets=data)
    assert res["amp"] == amp and dtypes and set(dtypes) == {dtype}
    scaler = load_checkpoint(res["last_checkpoint"])["state"]["scaler"]
    assert bool(scaler) == (amp == "fp16")          # GradScaler state only when enabled
    dtypes.clear()
    train(tiny_cfg(tmp_path / "off", epochs=1, amp="off"), datasets=data)
    assert set(dtypes) == {torch.float32}
