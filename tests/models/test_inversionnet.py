import pytest
import torch

from fwi_core.models import count_parameters, create_model
from fwi_core.models.inversionnet import InversionNet


def test_default_is_openfwi_size():
    model = create_model("inversionnet")
    assert isinstance(model, InversionNet)
    assert count_parameters(model) == 24_409_123          # OpenFWI's InversionNet: 24.4M
    assert model.convblock1[0].out_channels == 32 and model.convblock8[0].out_channels == 512
    small = create_model("inversionnet_small")
    assert small.convblock1[0].out_channels == 16 and small.convblock8[0].out_channels == 256


def test_width_and_dim_overrides():
    model = create_model("inversionnet", width=0.25, dim5=40)
    assert [model.convblock1[0].out_channels, model.convblock2_1[0].out_channels,
            model.convblock8[0].out_channels] == [8, 16, 40]
    assert create_model("inversionnet_small", width=0.125).convblock1[0].out_channels == 4
    with pytest.raises(TypeError, match="dim6"):
        create_model("inversionnet", dim6=3)


def test_intermediate_shapes():
    model = create_model("inversionnet", width=0.125).eval()
    shapes = {}
    for name in ("convblock1", "convblock4_1", "convblock7_2", "convblock8", "deconv1_1",
                 "deconv5_2", "deconv6"):
        getattr(model, name).register_forward_hook(
            lambda _m, _i, out, name=name: shapes.__setitem__(name, tuple(out.shape[2:])))
    with torch.no_grad():
        model(torch.randn(1, 5, 1000, 70))
    assert shapes == {"convblock1": (500, 70), "convblock4_1": (63, 70), "convblock7_2": (8, 9),
                      "convblock8": (1, 1), "deconv1_1": (5, 5), "deconv5_2": (80, 80),
                      "deconv6": (70, 70)}
