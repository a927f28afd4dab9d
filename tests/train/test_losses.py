import pytest
import torch
import torch.nn.functional as F

from fwi_core.train import boundary_loss, velocity_loss


def test_boundary_loss_ignores_offsets_and_sees_edges():
    t = torch.zeros(2, 1, 8, 8)
    t[..., 4:, :] = 1.0                                    # a layer boundary at depth 4
    assert boundary_loss(t + 0.3, t).item() == pytest.approx(0, abs=1e-6)   # a shift keeps gradients
    blurred = t.clone()
    blurred[..., 4, :] = 0.5
    assert boundary_loss(blurred, t) > 0
    # per column the 7 depth differences err by 0.5 twice (rows 3-4 and 4-5): mean 1/7
    assert boundary_loss(blurred, t).item() == pytest.approx(1.0 / 7)


def test_velocity_loss_weights():
    p, t = torch.rand(3, 1, 6, 6), torch.rand(3, 1, 6, 6)
    assert velocity_loss(p, t) == pytest.approx(F.l1_loss(p, t).item())
    assert velocity_loss(p, t, 0.5).item() == pytest.approx(F.l1_loss(p, t).item() + 0.5 * boundary_loss(p, t).item())
    assert velocity_loss(p.bfloat16(), t).dtype == torch.float32
    with pytest.raises(ValueError, match="differ"):
        velocity_loss(p, t[:, :, :5])


def test_micro_batches_are_never_empty():
    """After out-of-memory halvings the accumulation can exceed the batch (3 samples, 4
    micro-batches): the split gives 3 non-empty parts covering the batch, not an empty one
    whose mean loss would be NaN and stop training."""
    from fwi_core.train.losses import Batch

    b = Batch(x=torch.randn(3, 5, 8, 7), y=torch.randn(3, 1, 4, 4), family_idx=torch.arange(3))
    parts = b.split(4)
    assert [len(p) for p in parts] == [1, 1, 1]
    torch.testing.assert_close(torch.cat([p.x for p in parts]), b.x)
    assert all(torch.isfinite(F.l1_loss(p.y, torch.zeros_like(p.y))) for p in parts)
    assert [len(p) for p in b.split(2)] == [2, 1] and b.split(1) == [b]
