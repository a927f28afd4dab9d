"""MC-dropout uncertainty: inverse-variance weights, the mixture-variance map, and the
CRF confidence (low-confidence pixels move more under the CRF)."""
import pytest
import torch

from fwi_core.crf import ContinuousCRF
from fwi_core.ensemble import (crf_confidence, inverse_variance_weights, mc_dropout_predict,
                               mixture_variance, uncertainty_map)

from .helpers import Const


def test_inverse_variance_weights_hand_computed():
    var = torch.tensor([1.0, 3.0]).view(2, 1, 1, 1, 1).expand(2, 2, 1, 2, 2)
    w = inverse_variance_weights(var, eps=0.0)
    assert torch.allclose(w[:, 0, 0, 0, 0], torch.tensor([0.75, 0.25]))      # 1/1 : 1/3
    w = inverse_variance_weights(var, prior=torch.tensor([0.25, 0.75]), eps=0.0)
    assert torch.allclose(w[:, 0, 0, 0, 0], torch.tensor([0.5, 0.5]))        # 0.25/1 : 0.75/3
    prior = torch.tensor([[1.0, 0.0], [0.0, 1.0]])                           # (B, M)
    w = inverse_variance_weights(var, prior=prior, eps=0.0)
    assert torch.allclose(w[:, 0, 0, 0, 0], torch.tensor([1.0, 0.0]))
    assert torch.allclose(w[:, 1, 0, 0, 0], torch.tensor([0.0, 1.0]))
    assert torch.allclose(w.sum(0), torch.ones(2, 1, 2, 2))
    with pytest.raises(ValueError, match=">= 0"):
        inverse_variance_weights(-var)


def test_mixture_variance_and_map():
    means = torch.tensor([0.0, 2.0]).view(2, 1, 1, 1, 1)
    var = torch.tensor([1.0, 3.0]).view(2, 1, 1, 1, 1)
    w = torch.tensor([[0.5, 0.5]])
    # 0.5*(1 + 1) + 0.5*(3 + 1) = 3
    assert mixture_variance(means, var, w).item() == pytest.approx(3.0)
    assert uncertainty_map(means, var).item() == pytest.approx(3.0 ** 0.5)
    assert uncertainty_map(means).item() == pytest.approx(1.0)                 # disagreement only


def test_mc_dropout_predict():
    torch.manual_seed(0)
    model = Const(0.5, drop=0.5)
    x = torch.zeros(2, 5, 4, 4)
    mean, var = mc_dropout_predict(model, x, passes=32)
    assert mean.shape == var.shape == (2, 1, 6, 6)
    # dropout(0.5) of 0.5: values 0 or 1, mean 0.5, variance 0.25 (up to sampling)
    assert mean.mean().item() == pytest.approx(0.5, abs=0.05)
    assert var.mean().item() == pytest.approx(0.25, abs=0.05)
    assert not model.training
    det_mean, det_var = mc_dropout_predict(Const(0.5), x, passes=3)
    assert torch.all(det_var == 0)


def test_crf_confidence_range():
    var = torch.tensor([0.0, 1.0, 3.0, 100.0]).view(1, 1, 2, 2)
    c = crf_confidence(var, reference=1.0, floor=0.05)
    assert c.flatten().tolist() == pytest.approx([1.0, 0.5, 0.25, 0.05])
    c = crf_confidence(var)                                                      # median reference: 2
    assert c.flatten()[1].item() == pytest.approx(0.5)                          # torch median: lower of the two
    with pytest.raises(ValueError, match="B,1,H,W"):
        crf_confidence(var[0])


def test_low_confidence_pixels_move_more_under_the_crf():
    g = torch.Generator().manual_seed(0)
    smooth = torch.linspace(-0.5, 0.5, 16).view(1, 1, 16, 1).expand(1, 1, 16, 16)
    noise = 0.2 * torch.randn(1, 1, 16, 16, generator=g)
    noise = torch.cat([noise[..., :8], noise[..., :8]], -1)                      # same noise in both halves
    pred = smooth + noise
    var = torch.ones(1, 1, 16, 16)
    var[..., :8] = 50.0                                                          # left half: uncertain
    conf = crf_confidence(var, reference=1.0)
    crf = ContinuousCRF(window=5, iterations=10, lambda_spatial=0.05, lambda_feature=0.0, unary_weight=1.0)
    with torch.no_grad():
        moved = (crf(pred, confidence=conf) - pred).abs()
        moved_plain = (crf(pred) - pred).abs()
    inner = slice(2, 14)
    left, right = moved[..., inner, 2:6].mean(), moved[..., inner, 10:14].mean()
    assert left > 1.5 * right, (left, right)
    # the confident half moves less than it would with uniform confidence 1 (its confidence is 0.5)
    # and the uncertain half more
    assert left > moved_plain[..., inner, 2:6].mean()
