"""Stage-wise training: a member trained on a frozen backbone's residual (residual_stage)."""
import pytest
import torch

from fwi_core.train import ConfigError, load_checkpoint, load_model, read_metadata, train

from .helpers import write_layout

COMMON = {"epochs": 1, "batch_size": 2, "folds": 0, "num_workers": 0, "device": "cpu", "time_budget": 0,
          "ema_decay": 0.0, "lr": 1e-3}


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bb")
    root = write_layout(tmp / "wi", per_family=2)
    res = train({**COMMON, "data": str(root), "out": str(tmp / "bb"), "model": "inversionnet",
                 "model_kwargs": {"width": 0.125}})
    return root, res["best_checkpoint"]


def test_member_trains_on_the_residual_of_a_frozen_backbone(tmp_path, backbone):
    root, bb_path = backbone
    res = train({**COMMON, "data": str(root), "out": str(tmp_path / "stage"), "model": "heat_diffusion",
                 "model_kwargs": {"width": 4, "channels": 8, "blocks": 2, "mlp_hidden": 8},
                 "backbone_checkpoint": bb_path, "epochs": 2, "schedule": "cosine_restarts", "restart_epochs": 1})
    meta = read_metadata(res["last_checkpoint"])
    assert meta["model"] == "residual_stage"
    assert meta["model_kwargs"]["backbone"] == "inversionnet" and meta["model_kwargs"]["member"] == "heat_diffusion"
    # the backbone's weights travel in the stage checkpoint, unchanged by training
    bb = load_checkpoint(bb_path)["model"]
    stage = load_checkpoint(res["last_checkpoint"])["model"]
    for k, v in bb.items():
        torch.testing.assert_close(stage[f"backbone.{k}"], v, rtol=0, atol=0)
    # the stage rebuilt from its own checkpoint: output = backbone prediction + member's bounded correction
    model = load_model(res["last_checkpoint"], weights="raw")
    backbone_model = load_model(bb_path, weights="raw")
    x = torch.randn(2, 5, 1000, 70) / 3
    with torch.no_grad():
        prior = backbone_model(x).clamp(-1, 1)
        torch.testing.assert_close(model.prior(x), prior)
        out = model(x)
        t = model.member(x, prior=prior)
    up, down = (1 - prior).clamp(0, 0.5), (1 + prior).clamp(0, 0.5)
    torch.testing.assert_close(out, prior + torch.where(t >= 0, t * up, t * down))
    assert not torch.allclose(out, prior)
    # snapshots of the stage load the same way
    snaps = sorted((tmp_path / "stage").glob("snapshot-*.pt"))
    assert len(snaps) == 2 and load_model(snaps[0]).member is not None


def test_residual_stacker_gets_the_data_residual(tmp_path, backbone, monkeypatch):
    from fwi_core.models import residual as rs      # the residual stage calls compute_residual

    root, bb_path = backbone
    calls = []
    original = rs.compute_residual

    def counting(x, prior, *a, **k):
        calls.append(tuple(x.shape))
        return original(x, prior, *a, **k)

    monkeypatch.setattr(rs, "compute_residual", counting)
    res = train({**COMMON, "data": str(root), "out": str(tmp_path / "st"), "model": "residual_stacker",
                 "model_kwargs": {"width": 4}, "backbone_checkpoint": bb_path, "max_steps": 1})
    assert res["step"] == 1 and calls and calls[0] == (2, 5, 1000, 70)


def test_backbone_checkpoint_errors(tmp_path, backbone):
    root, bb_path = backbone
    with pytest.raises(ConfigError, match="no such checkpoint"):
        train({**COMMON, "data": str(root), "out": str(tmp_path / "a"), "model": "heat_diffusion",
               "backbone_checkpoint": str(tmp_path / "missing.pt")})
    with pytest.raises(ConfigError, match="not residual_stage"):
        train({**COMMON, "data": str(root), "out": str(tmp_path / "b"), "model": "residual_stage",
               "backbone_checkpoint": bb_path})
