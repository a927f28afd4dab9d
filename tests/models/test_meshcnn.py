import pytest
import torch

from fwi_core.models import create_model
from fwi_core.models.meshcnn import MeshConv, grid_mesh, mesh_edges

TINY = dict(width=4, grid_channels=4, channels=8, blocks=1, mesh_size=10, head_channels=4)


def signed_area(pos, faces):
    p = pos[faces].double()
    u, v = p[:, 1] - p[:, 0], p[:, 2] - p[:, 0]
    return u[:, 0] * v[:, 1] - u[:, 1] * v[:, 0]


def test_union_jack_mesh():
    pos, faces = grid_mesh(35)
    edges, nbrs = mesh_edges(faces)
    v, e, f = pos.shape[0], edges.shape[0], faces.shape[0]
    assert (v, e, f) == (1225, 3536, 2312) and v - e + f == 1            # a disc
    assert torch.all(signed_area(pos, faces) > 0)                          # counter-clockwise
    assert torch.allclose(pos[:35, 0], torch.arange(35) * 20.0 + 5.0)     # 2x2-block centres
    missing = (nbrs == e).sum(1)                                           # boundary: one face
    assert (missing == 2).sum() == 4 * 34 and set(missing.tolist()) == {0, 2}
    # the left-right flip x -> 690 - x maps the mesh onto itself
    col = torch.round((pos[:, 0] - 5.0) / 20.0).long()
    mirror = torch.arange(v) - 2 * col + 34                                # (row, col) -> (row, 34 - col)
    flipped = torch.sort(mirror[edges], dim=1).values
    assert set(map(tuple, flipped.tolist())) == set(map(tuple, edges.tolist()))


def test_neighbours_are_the_two_triangles_counter_clockwise():
    pos, faces = grid_mesh(6)
    edges, nbrs = mesh_edges(faces)
    e = edges.shape[0]
    face_set = {tuple(sorted(fc)) for fc in faces.tolist()}
    for i in range(e):
        for pair in (nbrs[i, :2], nbrs[i, 2:]):
            if int(pair[0]) == e:
                continue
            a, b = (edges[int(k)].tolist() for k in pair)
            tri = set(edges[i].tolist()) | set(a) | set(b)
            assert tuple(sorted(tri)) in face_set
            # e, a, b follow each other counter-clockwise: e and a share e's second vertex
            # in the face's orientation, which makes the triangle (e0, e1, apex) ccw
            shared = set(edges[i].tolist()) & set(a)
            (s,) = shared
            start = (set(edges[i].tolist()) - {s}).pop()
            apex = (tri - set(edges[i].tolist())).pop()
            assert signed_area(pos, torch.tensor([[start, s, apex]])) > 0


def test_mesh_conv_symmetric_in_the_two_faces_and_local():
    torch.manual_seed(0)
    _, faces = grid_mesh(5)
    edges, nbrs = mesh_edges(faces)
    conv = MeshConv(3, 4).double()
    x = torch.randn(2, edges.shape[0], 3, dtype=torch.float64)
    y = conv(x, nbrs)
    torch.testing.assert_close(conv(x, nbrs[:, [2, 3, 0, 1]]), y, atol=1e-14, rtol=0)
    assert not torch.allclose(conv(x, nbrs[:, [1, 0, 3, 2]]), y)          # (a, b) order matters
    spike = torch.zeros(1, edges.shape[0], 3, dtype=torch.float64)
    spike[0, 7] = 1.0
    moved = (conv(spike, nbrs) - conv(torch.zeros_like(spike), nbrs)).abs().sum(2)[0] > 0
    expected = {7} | {i for i in range(edges.shape[0]) if 7 in nbrs[i].tolist()}
    assert set(torch.nonzero(moved).flatten().tolist()) == expected


def test_model_invariant_to_edge_and_face_ordering():
    torch.manual_seed(0)
    model = create_model("meshcnn", **TINY).double().eval()
    x = (torch.randn(2, 5, 1000, 70) / 3).double()
    prior = (torch.rand(2, 1, 70, 70) * 2 - 1).double()
    with torch.no_grad():
        ref = model(x, prior=prior)
        gen = torch.Generator().manual_seed(5)
        e = model.edges.shape[0]
        perm = torch.randperm(e, generator=gen)
        edges = model.edges[perm]
        swap = torch.rand(e, generator=gen) < 0.5                          # store some edges reversed
        edges[swap] = edges[swap].flip(1)
        faces = model.faces[torch.randperm(model.faces.shape[0], generator=gen)]
        faces = faces.roll(1, dims=1)                                      # same orientation
        new_edges, new_nbrs = mesh_edges(faces, edges=edges)
        assert torch.equal(new_edges, edges) and not torch.equal(new_nbrs, model.neighbours[perm])
        model.set_mesh_edges(new_edges, new_nbrs)
        out = model(x, prior=prior)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)


def test_edges_to_vertices_is_the_incident_mean():
    torch.manual_seed(0)
    model = create_model("meshcnn", **TINY)
    e = model.edges.shape[0]
    x = torch.zeros(1, e, 1)
    x[0, :, 0] = torch.arange(e, dtype=torch.float32)
    v = model.edges_to_vertices(x)[0, 0].flatten()
    for vert in (0, 11, 55):
        inc = ((model.edges == vert).any(1)).nonzero().flatten().float()
        assert torch.isclose(v[vert], inc.mean())


def test_invalid_meshes_and_settings():
    _, faces = grid_mesh(3)
    edges, _ = mesh_edges(faces)
    with pytest.raises(ValueError, match="every side"):
        mesh_edges(faces, edges=edges[1:])
    with pytest.raises(ValueError, match="non-manifold"):
        mesh_edges(torch.cat([faces, faces[:1]]))
    with pytest.raises(ValueError, match="mesh_size"):
        create_model("meshcnn", **dict(TINY, mesh_size=8))
    with pytest.raises(ValueError, match="n must"):
        grid_mesh(1)
