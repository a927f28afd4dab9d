import pytest
import torch

from fwi_core.models import create_model
from fwi_core.models.invertible_unet import CouplingBlock, InvertibleUNetFlow

TINY = dict(width=4, latent_channels=6, hidden=8, blocks_per_level=2)


def randomise(module, std=0.1):
    """Move the couplings off their identity init so the inverse test means something."""
    torch.manual_seed(1)
    for m in module.modules():
        if isinstance(m, CouplingBlock):
            torch.nn.init.normal_(m.net[-1].weight, std=std)
            torch.nn.init.normal_(m.net[-1].bias, std=std)


@pytest.mark.parametrize("additive", [False, True])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_flow_inverse_is_exact(additive, dtype, tol):
    flow = InvertibleUNetFlow(channels=5, hidden=8, blocks_per_level=2, additive=additive)
    randomise(flow)
    flow.to(dtype)
    z = torch.randn(2, 5, 70, 70, dtype=dtype)
    with torch.no_grad():
        y = flow(z)
        assert (y - z).abs().max() > 0.1
        assert torch.allclose(flow.inverse(y), z, atol=tol, rtol=tol)


def test_model_inverse_of_forward_features():
    model = create_model("invertible_unet", **TINY).eval()
    randomise(model)
    x = torch.randn(2, 5, 1000, 70) / 3
    with torch.no_grad():
        z, y = model.forward_features(x)
        assert y.shape == z.shape == (2, 6, 70, 70)
        assert torch.allclose(model.inverse(y), z, atol=1e-5, rtol=1e-5)
        assert torch.equal(model(x), torch.tanh(y[:, :1]))
        assert model.inverse_consistency(x, drop_aux=False).max() < 1e-5


def test_inverse_consistency_measures_unexplained_latent():
    model = create_model("invertible_unet", **TINY).eval()     # fresh flow = identity
    x = torch.randn(3, 5, 1000, 70) / 3
    with torch.no_grad():
        score = model.inverse_consistency(x)
        z = model.encode(x)
    expected = z[:, 1:].flatten(1).norm(dim=1) / z.flatten(1).norm(dim=1)
    assert score.shape == (3,) and torch.allclose(score, expected, rtol=1e-4)
    assert model.latent_penalty(z) == z[:, 1:].pow(2).mean()


def test_invalid_settings():
    with pytest.raises(ValueError, match="coupling"):
        create_model("invertible_unet", coupling="spline")
    with pytest.raises(ValueError, match="even"):
        InvertibleUNetFlow(channels=4, hidden=4, blocks_per_level=1)(torch.zeros(1, 4, 7, 8))
    with pytest.raises(ValueError, match="2 channels"):
        CouplingBlock(1, 4)
