import contextlib

import pytest
import torch

pytest.importorskip("e3nn")

from e3nn import o3  # noqa: E402

from fwi_core.models import create_model  # noqa: E402
from fwi_core.models.se3_transformer import (SE3AttentionLayer, _segment_softmax,  # noqa: E402
                                             lattice_positions)
from fwi_core.models.survey import knn_edge_index  # noqa: E402

TINY = dict(irreps_hidden="4x0e + 2x1o + 1x2e", scalars_out=4, layers=2, lattice=(4, 3),
            trace_dim=8, trace_width=8, decoder_dim=8, n_anchors=4, k_lattice=3)


@contextlib.contextmanager
def float64_default():
    """e3nn computes its constants (generators, Clebsch-Gordan coefficients) in the default
    dtype: build modules and D-matrices under float64 for a 1e-10 test."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def wigner(irreps, rot):
    """D-matrix (float64) of ``irreps`` for the 3x3 matrix ``rot``."""
    with float64_default():
        return o3.Irreps(irreps).D_from_matrix(rot)


def random_rotation(seed):
    torch.manual_seed(seed)
    return o3.rand_matrix(dtype=torch.float64)


@pytest.mark.parametrize("gate", [True, False])
@pytest.mark.parametrize("improper", [False, True])
def test_layer_is_equivariant(gate, improper):
    irreps_in, irreps_out = "3x0e + 2x1o + 1x2e", "4x0e + 2x1o + 1x2e"
    torch.manual_seed(0)
    with float64_default():
        layer = SE3AttentionLayer(irreps_in, irreps_out, edge_scalars=2, max_radius=12.0, gate=gate)
    gen = torch.Generator().manual_seed(1)
    n = 16
    pos = torch.rand(n, 3, dtype=torch.float64, generator=gen) * 5
    f = o3.Irreps(irreps_in).randn(n, -1, dtype=torch.float64)
    edge_index = knn_edge_index(pos, 5)
    a = torch.randn(edge_index.shape[1], 2, dtype=torch.float64, generator=gen)
    rot = random_rotation(2) * (-1.0 if improper else 1.0)          # with inversion: O(3)
    t = torch.randn(3, dtype=torch.float64, generator=gen) * 10
    with torch.no_grad():
        out = layer(f, pos, edge_index, a)
        out_rot = layer(f @ wigner(irreps_in, rot).T, pos @ rot.T + t, edge_index, a)
    d_out = wigner(irreps_out, rot)
    assert out[:, 4:].abs().max() > 1e-2                             # non-trivial l > 0 outputs
    torch.testing.assert_close(out_rot, out @ d_out.T, atol=1e-10, rtol=1e-9)


def test_model_scalars_invariant_and_hidden_features_rotate():
    torch.manual_seed(0)
    with float64_default():
        model = create_model("se3_transformer", **TINY).eval()
    x = (torch.randn(2, 5, 1000, 70) / 3).double()
    pos = model.node_pos.double()
    with torch.no_grad():
        f, hidden = model.encode_graph(x, return_hidden=True)
        for seed in (3, 4):
            rot = random_rotation(seed)
            t = torch.randn(3, dtype=torch.float64) * 300
            f2, hidden2 = model.encode_graph(x, pos=pos @ rot.T + t, return_hidden=True)
            torch.testing.assert_close(f2, f, atol=1e-10, rtol=1e-9)
            torch.testing.assert_close(hidden2, hidden @ wigner(TINY["irreps_hidden"], rot).T,
                                       atol=1e-10, rtol=1e-9)
        # every node lies in the plane y = 0: the mirror y -> -y maps the graph onto itself,
        # so the features are fixed by it (vectors have no y component): the group that
        # acts on this data reduces to rotations and reflections in the plane
        mirror = torch.diag(torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64))
        torch.testing.assert_close(hidden @ wigner(TINY["irreps_hidden"], mirror).T, hidden,
                                   atol=1e-10, rtol=1e-9)
    assert hidden[..., 4:].abs().max() > 1e-3


def test_graph_geometry():
    torch.manual_seed(0)
    model = create_model("se3_transformer", **TINY)
    assert model.node_pos.shape == (75 + 12, 3) and torch.all(model.node_pos[:, 1] == 0)
    lat = lattice_positions((14, 7))
    assert lat.shape == (98, 3)
    assert torch.allclose(lat[:7, 0], torch.tensor([45.0, 145, 245, 345, 445, 545, 645]))
    assert torch.allclose(lat[::7, 2], torch.arange(14) * 50.0 + 20.0)
    src, dst = model.edge_index
    to_lattice = model.edge_type == 2
    anchors = torch.unique(src[to_lattice])
    assert anchors.tolist() == [0, 23, 46, 69, 70, 71, 72, 73, 74]
    assert set((69 - anchors[anchors < 70]).tolist()) == set(anchors[anchors < 70].tolist())  # flip-symmetric
    assert torch.all(dst[to_lattice] >= 75) and to_lattice.sum() == 9 * 12
    assert torch.equal(model.trace_index >= 0, model.edge_type == 1)
    with pytest.raises(ValueError, match="n_anchors"):
        create_model("se3_transformer", **dict(TINY, n_anchors=1))


def test_segment_softmax_normalises_per_target():
    logits = torch.tensor([1.0, 2.0, 3.0, 500.0, -1.0])
    index = torch.tensor([0, 0, 2, 2, 1])
    alpha = _segment_softmax(logits, index, 3)
    sums = torch.zeros(3).index_add(0, index, alpha)
    assert torch.allclose(sums, torch.ones(3)) and torch.isfinite(alpha).all()
    assert torch.allclose(alpha[:2], torch.softmax(logits[:2], 0))


def test_runs_under_autocast():
    """The engine trains with fp16/bf16 autocast: the e3nn layers run in float32 inside."""
    torch.manual_seed(0)
    model = create_model("se3_transformer", **TINY).train()
    x = torch.randn(2, 5, 1000, 70) / 3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    y.float().mean().backward()
    assert y.shape == (2, 1, 70, 70) and torch.isfinite(y.float()).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
