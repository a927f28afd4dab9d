
import pytest
import torch

pytest.importorskip("torch_geometric")

from fwi_core.models import create_model  # noqa: E402
from fwi_core.models.egnn import EGNNLayer  # noqa: E402
from fwi_core.models.survey import knn_edge_index, survey_graph, survey_positions  # noqa: E402

TINY = dict(hidden=16, layers=2, trace_dim=8, trace_width=8, decoder_dim=8, heads=2)


def random_orthogonal(dim, reflect, gen):
    """A random orthogonal matrix, det -1 when ``reflect``."""
    q, r = torch.linalg.qr(torch.randn(dim, dim, dtype=torch.float64, generator=gen))
    q = q * torch.sign(torch.diagonal(r))
    if (torch.det(q) < 0) != reflect:
        q[:, 0] = -q[:, 0]
    return q


def kick(layer, std=0.3):
    """Make the coordinate update large enough that a broken equivariance shows."""
    torch.nn.init.normal_(layer.phi_x[-1].weight, std=std)


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("reflect", [False, True])
def test_layer_is_e_n_equivariant(dim, reflect):
    gen = torch.Generator().manual_seed(dim + 10 * reflect)
    torch.manual_seed(0)
    layer = EGNNLayer(12, edge_dim=3, length_scale=100.0).double().eval()
    kick(layer)
    n = 20
    pos = torch.rand(n, dim, dtype=torch.float64, generator=gen) * 500
    h = torch.randn(n, 12, dtype=torch.float64, generator=gen)
    edge_index = knn_edge_index(pos, 5)
    a = torch.randn(edge_index.shape[1], 3, dtype=torch.float64, generator=gen)
    q = random_orthogonal(dim, reflect, gen)
    t = torch.randn(dim, dtype=torch.float64, generator=gen) * 1000
    with torch.no_grad():
        h1, p1 = layer(h, pos, edge_index, a)
        h2, p2 = layer(h, pos @ q.T + t, edge_index, a)
    assert (p1 - pos).abs().max() > 1.0                  # positions really move (metres)
    assert (h1 - h).abs().max() > 1e-2
    torch.testing.assert_close(h2, h1, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(p2, p1 @ q.T + t, atol=1e-9, rtol=1e-10)


def test_layer_uses_message_passing_and_checks_edge_attr():
    import torch_geometric
    layer = EGNNLayer(8, edge_dim=4)
    assert isinstance(layer, torch_geometric.nn.MessagePassing)
    pos = torch.rand(6, 2) * 100
    with pytest.raises(ValueError, match="edge_attr"):
        layer(torch.randn(6, 8), pos, knn_edge_index(pos, 2), None)
    still = EGNNLayer(8, update_coords=False)
    assert torch.equal(still(torch.randn(6, 8), pos, knn_edge_index(pos, 2))[1], pos)


def test_model_graph_is_equivariant_and_decoder_uses_positions():
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(0)
    model = create_model("egnn", **TINY).double().eval()
    for layer in model.layers:
        kick(layer)
    x = (torch.randn(2, 5, 1000, 70, generator=gen) / 3).double()
    pos = model.node_pos.double()
    q = random_orthogonal(2, True, gen)
    t = torch.tensor([123.0, -45.0], dtype=torch.float64)
    with torch.no_grad():
        h1, p1 = model.encode_graph(x)
        h2, p2 = model.encode_graph(x, pos=pos @ q.T + t)
        assert (p1 - pos).abs().max() > 1.0
        torch.testing.assert_close(h2, h1, atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(p2, p1 @ q.T + t, atol=1e-8, rtol=1e-9)
        # the decoder reads the (moved) node positions: moving them changes the map
        c1 = model.decoder(h1, p1)
        c2 = model.decoder(h1, p1 + torch.tensor([50.0, 0.0], dtype=torch.float64))
    assert c1.shape == (2, TINY["decoder_dim"], 70, 70)
    assert not torch.allclose(c1, c2)


def test_survey_graph_geometry():
    g = survey_graph(k_receivers=4)
    assert g.num_nodes == 75 and g.pos.shape == (75, 2)
    assert torch.equal(g.pos[70:, 0], torch.tensor([0.0, 170.0, 340.0, 520.0, 690.0]))
    assert torch.all(g.pos[:, 1] == 10.0) and torch.equal(g.pos[:70, 0], torch.arange(70.0) * 10)
    src, dst = g.edge_index
    rr = g.trace_index < 0
    assert rr.sum() == 70 * 4 and torch.all(src[rr] < 70) and torch.all(dst[rr] < 70)
    for i in (0, 35, 69):                                # nearest receivers by brute force
        nbrs = sorted(src[rr & (dst == i)].tolist())
        d = (g.pos[:70, 0] - g.pos[i, 0]).abs()
        d[i] = float("inf")
        assert sorted(d.argsort()[:4].tolist()) == nbrs
    sr = ~rr                                             # every source-receiver pair, both ways
    assert sr.sum() == 2 * 5 * 70
    for e in torch.nonzero(sr).flatten()[::37].tolist():
        s_node, r_node = (src[e], dst[e]) if src[e] >= 70 else (dst[e], src[e])
        assert g.trace_index[e] == (s_node - 70) * 70 + r_node
    assert torch.equal(survey_positions(3)[:, [0, 2]], g.pos) and torch.all(survey_positions(3)[:, 1] == 0)
    with pytest.raises(ValueError, match="k must"):
        knn_edge_index(g.pos[:5], 5)


def test_trace_attributes_reach_the_right_edges():
    """The source-receiver edge attribute is the embedding of that pair's trace: changing
    one trace changes only the attributes of its two edges."""
    torch.manual_seed(0)
    model = create_model("egnn", **TINY).eval()
    x = torch.randn(1, 5, 1000, 70) / 3
    seen = []
    orig = model.layers[0].forward
    model.layers[0].forward = lambda h, pos, ei, a: (seen.append(a.clone()), orig(h, pos, ei, a))[1]
    with torch.no_grad():
        model.encode_graph(x)
        x2 = x.clone()
        x2[0, 2, :, 40] += 1.0                           # source 2, receiver 40
        model.encode_graph(x2)
    changed = torch.nonzero((seen[0] - seen[1]).abs().amax(1) > 0).flatten()
    assert set(model.trace_index[changed].tolist()) == {2 * 70 + 40} and changed.numel() == 2
