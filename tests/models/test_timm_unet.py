import sys

import pytest
import torch

timm = pytest.importorskip("timm")

from fwi_core.models import create_model  # noqa: E402
from fwi_core.models.timm_unet import TimmUNet  # noqa: E402

TINY_CONVNEXT = dict(backbone_kwargs=dict(dims=(8, 16, 32, 64), depths=(1, 1, 1, 1)),
                     decoder_channels=(16, 8, 8))
TINY_CAFORMER = dict(backbone_kwargs=dict(dims=(16, 32, 64, 128), depths=(1, 1, 1, 1)),
                     decoder_channels=(16, 8, 8))


@pytest.mark.parametrize("name, kwargs", [("convnext_unet", TINY_CONVNEXT),
                                          ("caformer_unet", TINY_CAFORMER)])
def test_stem_gives_square_pyramid(name, kwargs):
    model = create_model(name, **kwargs).eval()
    with torch.no_grad():
        feats = model.encoder(torch.randn(1, 5, 1000, 70))
    assert [tuple(f.shape[2:]) for f in feats] == [(72, 72), (36, 36), (18, 18), (9, 9)]
    assert [f.shape[1] for f in feats] == list(kwargs["backbone_kwargs"]["dims"])


def test_squeeze_conv_starts_as_time_average():
    model = create_model("convnext_unet", **TINY_CONVNEXT)
    squeeze = model.encoder.stem_0[2]
    assert squeeze.stride == (4, 1)
    centre = squeeze.weight[torch.arange(8), torch.arange(8), :, 1]
    assert torch.allclose(centre, torch.full_like(centre, 0.25), atol=0.05)


def test_pretrained_path_loads_local_weights(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("convnext_atto", pretrained=False)     # ImageNet-style, 3 chans
    path = tmp_path / "convnext_atto.pth"
    torch.save(source.state_dict(), path)
    model = create_model("convnext_unet", pretrained_path=str(path))
    ref = source.state_dict()
    for key, value in model.encoder.state_dict().items():
        if key.startswith("stages_"):
            assert torch.equal(value, ref[key.replace("stages_", "stages.", 1)]), key
    stem = model.encoder.stem_0[1].weight                              # adapted to 5 channels
    assert stem.shape[1] == 5
    with pytest.raises(FileNotFoundError):
        create_model("convnext_unet", pretrained_path=str(tmp_path / "missing.pth"))


def test_backbone_choice_is_checked():
    with pytest.raises(ValueError, match="convnext"):
        create_model("convnext_unet", backbone="caformer_s18")
    with pytest.raises(ValueError, match="not supported"):
        TimmUNet(backbone="resnet18")
    with pytest.raises(ValueError, match="stride-4 stem"):
        create_model("convnext_unet", backbone="convnext_atto_ols", **TINY_CONVNEXT)


def test_missing_timm_gives_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ImportError, match="pip install timm"):
        create_model("caformer_unet")
