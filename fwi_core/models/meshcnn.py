"""MeshCNN: edge convolutions on a triangulated mesh of the velocity map.

Hanocka, Hertz, Fish, Giryes, Fleishman & Cohen-Or, "MeshCNN: A Network with an Edge",
ACM TOG 2019 (reference code: ranahanocka/MeshCNN). Features live on the mesh's edges.
Each interior edge e has 4 neighbours: the other two edges of each of its two triangles,
taken counter-clockwise after e, (a, b) in one triangle and (c, d) in the other. Which
triangle comes first is arbitrary, so the convolution only uses functions that are
symmetric under (a, b) <-> (c, d):

    e' = W_0 e + W_1 |a - c| + W_2 (a + c) + W_3 |b - d| + W_4 (b + d)

(a boundary edge has one triangle; its missing neighbours are zero). Nothing depends on
the order in which the edges are listed, or on the direction in which an edge is stored:
permuting the edge list together with its neighbourhoods leaves the output unchanged
(tested).

The mesh (:func:`grid_mesh`): a regular "union-jack" triangulation of an n x n lattice of
vertices (default 35 x 35, one vertex per 2 x 2 block of map cells, at the block centres),
the diagonal of each quad alternating with the quad's parity, so the left-right flip maps
the mesh onto itself. 35 x 35 vertices give 3,536 edges and 2,312 triangles.

Pipeline: seismic (B, 5, 1000, 70) -> :class:`~fwi_core.models.blocks.GatherToGrid`
(B, C0, 70, 70) -> 2 x 2 average to the vertices (B, C0 + 2 (prior), 35, 35) -> edge
inputs (mean and absolute difference of the end vertices' features, the edge's direction
|dx|, |dz|) (B, E, C) -> N residual blocks of two :class:`MeshConv` (LayerNorm, GELU,
``Dropout``) -> mean of the incident edges at each vertex (B, C, 35, 35) -> bilinear to
70 x 70, concatenated with the encoder grid and the prior -> conv head with ``Dropout2d``
-> tanh: (B, 1, 70, 70) in [-1, 1].

torch_geometric 2.8's ``MeshCNNConv`` is not used: its ``message`` reads all four
"neighbours" from the centre edge's end of the edge index (on 5 edges with features
0, 1, 10, 100, 1000 and unit weights it returns 4444 for edge 0, where its documented
formula gives 2200), it allocates its messages with ``torch.empty`` on the default
device and dtype, and it has no batch dimension. :class:`MeshConv` is the paper's
convolution in plain torch (a gather of the 4 neighbours), batched; this member needs no
optional package.

``forward(x, prior=None)``: ``prior`` (B, 1, 70, 70), a backbone's normalised prediction,
enters the vertex features and the head (stage-wise residual training).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .blocks import VELOCITY_SHAPE, ConvBnAct, GatherToGrid, check_prior, check_seismic, prior_channels
from .registry import Capabilities, register_model

__all__ = ["grid_mesh", "mesh_edges", "MeshConv", "MeshResBlock", "MeshCNN", "meshcnn"]


def grid_mesh(n: int = 35, extent: float = 700.0, spacing: float = 10.0
              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Union-jack triangulation of an n x n vertex lattice over the map.

    Returns:
        (positions (n*n, 2) as (x, depth) in metres at the centres of n x n equal blocks,
        vertex index ``row * n + col``; faces (2 (n-1)^2, 3) counter-clockwise in the
        (x, depth) plane).
    """
    if n < 2:
        raise ValueError(f"grid_mesh: n must be >= 2, got {n}")
    c = (torch.arange(n, dtype=torch.float32) + 0.5) * extent / n - spacing / 2
    depth, x = torch.meshgrid(c, c, indexing="ij")
    pos = torch.stack([x.flatten(), depth.flatten()], dim=1)
    faces = []
    for i in range(n - 1):
        for j in range(n - 1):
            v00, v01, v10, v11 = i * n + j, i * n + j + 1, (i + 1) * n + j, (i + 1) * n + j + 1
            if (i + j) % 2 == 0:                       # diagonal v00 - v11
                faces += [(v00, v01, v11), (v00, v11, v10)]
            else:                                      # diagonal v01 - v10
                faces += [(v00, v01, v10), (v01, v11, v10)]
    faces = torch.tensor(faces, dtype=torch.long)
    return pos, _orient_ccw(pos, faces)


def _orient_ccw(pos: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Reorder each face's vertices counter-clockwise (positive signed area in (x, depth))."""
    p = pos[faces].double()                                        # (F, 3, 2)
    u, v = p[:, 1] - p[:, 0], p[:, 2] - p[:, 0]
    cw = (u[:, 0] * v[:, 1] - u[:, 1] * v[:, 0]) < 0
    faces = faces.clone()
    faces[cw] = faces[cw][:, [0, 2, 1]]
    return faces


def mesh_edges(faces: torch.Tensor, edges: Optional[torch.Tensor] = None
               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Edges of a triangle mesh and MeshCNN's 4 neighbours of each edge.

    Args:
        faces: (F, 3) vertex indices, counter-clockwise.
        edges: optional (E, 2) edge list to use (any order, either direction per edge);
            default: the unique edges, sorted.
    Returns:
        (edges (E, 2), neighbours (E, 4)): for edge e, (a, b) are the other edges of one
        incident face and (c, d) of the other, each pair counter-clockwise after e; a
        boundary edge's missing pair is (E, E), an index of a zero row.
    """
    tri = faces.long()
    pairs = torch.stack([tri, tri.roll(-1, dims=1)], dim=2).reshape(-1, 2)   # (3F, 2): (p, q) per face side
    key_of = lambda p: torch.minimum(p[:, 0], p[:, 1]) * (int(tri.max()) + 1) + torch.maximum(p[:, 0], p[:, 1])
    if edges is None:
        lo = torch.minimum(pairs[:, 0], pairs[:, 1])
        hi = torch.maximum(pairs[:, 0], pairs[:, 1])
        edges = torch.unique(torch.stack([lo, hi], dim=1), dim=0)
    edges = edges.long()
    n_e = edges.shape[0]
    keys = key_of(edges)
    order = torch.argsort(keys)
    pos_in_sorted = torch.searchsorted(keys[order], key_of(pairs))
    side_edge = order[pos_in_sorted.clamp_max(n_e - 1)].view(-1, 3)         # (F, 3): edge of each side
    if not torch.equal(keys[side_edge.flatten()], key_of(pairs)):
        raise ValueError("mesh_edges: the edge list does not contain every side of every face")
    # one record (e, a, b) per face side: e the side, (a, b) the face's next two sides ccw
    e = side_edge.flatten()                                                  # (3F,)
    a = side_edge[:, [1, 2, 0]].flatten()
    b = side_edge[:, [2, 0, 1]].flatten()
    counts = torch.bincount(e, minlength=n_e)
    if counts.max() > 2:
        raise ValueError(f"mesh_edges: edge {int(counts.argmax())} has more than two faces (non-manifold)")
    order = torch.argsort(e, stable=True)                                    # faces' order within an edge
    e, a, b = e[order], a[order], b[order]
    slot = torch.arange(e.numel()) - (torch.cumsum(counts, 0) - counts)[e]   # 0: first face, 1: second
    nbrs = torch.full((n_e, 4), n_e, dtype=torch.long)
    nbrs[e, 2 * slot] = a
    nbrs[e, 2 * slot + 1] = b
    return edges, nbrs


class MeshConv(nn.Module):
    """MeshCNN's edge convolution (module docstring), batched.

    Args:
        in_channels, out_channels: feature sizes.

    Shapes: x (B, E, in_channels), neighbours (E, 4) with E meaning "missing" ->
    (B, E, out_channels).
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(5 * in_channels, out_channels)

    def forward(self, x: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
        b, e, c = x.shape
        padded = torch.cat([x, x.new_zeros(b, 1, c)], dim=1)                  # (B, E+1, C)
        nb = padded[:, neighbours]                                            # (B, E, 4, C)
        a, bb, cc, d = nb.unbind(2)
        feats = torch.cat([x, (a - cc).abs(), a + cc, (bb - d).abs(), bb + d], dim=2)  # (B, E, 5C)
        return self.linear(feats)                                             # (B, E, out)


class MeshResBlock(nn.Module):
    """x + LN(MeshConv(Dropout(GELU(LN(MeshConv(x)))))), then GELU. Shapes: (B, E, C) -> (B, E, C)."""

    def __init__(self, channels: int, drop_rate: float = 0.1):
        super().__init__()
        self.conv1, self.conv2 = MeshConv(channels, channels), MeshConv(channels, channels)
        self.norm1, self.norm2 = nn.LayerNorm(channels), nn.LayerNorm(channels)
        self.drop = nn.Dropout(drop_rate)

    def forward(self, x: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
        h = self.drop(F.gelu(self.norm1(self.conv1(x, neighbours))))
        return F.gelu(x + self.norm2(self.conv2(h, neighbours)))


class MeshCNN(nn.Module):
    """Gather encoder + MeshCNN edge convolutions on a 35 x 35 mesh + grid head,
    (B, 5, 1000, 70) -> (B, 1, 70, 70) in [-1, 1].

    Args:
        width: channels of the gather encoder's time convs.
        grid_channels: C0, channels of the encoder's 70 x 70 grid.
        channels: C, edge feature size.
        blocks: residual blocks (two edge convolutions each).
        mesh_size: vertices per side (70 must be a multiple: 35, 14, 10, 7, 5, ...).
        head_channels: channels of the conv head.
        drop_rate: ``Dropout`` in the blocks, ``Dropout2d`` in the head (MC dropout).
    """


    def __init__(self, width: int = 32, grid_channels: int = 48, channels: int = 64, blocks: int = 4,
                 mesh_size: int = 35, head_channels: int = 48, drop_rate: float = 0.1):
        super().__init__()
        n = VELOCITY_SHAPE[0]
        if mesh_size < 2 or n % mesh_size:
            raise ValueError(f"MeshCNN: mesh_size must be >= 2 and divide {n}, got {mesh_size}")
        self.mesh_size = mesh_size
        pos, faces = grid_mesh(mesh_size)
        edges, nbrs = mesh_edges(faces)
        self.register_buffer("vertex_pos", pos, persistent=False)            # (V, 2) metres
        self.register_buffer("faces", faces, persistent=False)               # (F, 3)
        self.set_mesh_edges(edges, nbrs)
        self.encoder = GatherToGrid(width, grid_channels)
        self.edge_in = nn.Linear(2 * (grid_channels + 2) + 2, channels)
        self.blocks = nn.ModuleList(MeshResBlock(channels, drop_rate) for _ in range(blocks))
        self.head = nn.Sequential(ConvBnAct(channels + grid_channels + 2, head_channels, 3),
                                  nn.Dropout2d(drop_rate), nn.Conv2d(head_channels, 1, 3, padding=1))

    def set_mesh_edges(self, edges: torch.Tensor, neighbours: torch.Tensor) -> None:
        """Use another listing of the mesh's edges (E, 2) and their neighbours (E, 4), e.g.
        a permutation (the output does not depend on it) or from :func:`mesh_edges`."""
        device = self.faces.device
        self.register_buffer("edges", edges.long().to(device), persistent=False)        # (E, 2)
        self.register_buffer("neighbours", neighbours.long().to(device), persistent=False)  # (E, 4)
        pos = self.vertex_pos.double()
        d = (pos[self.edges[:, 0]] - pos[self.edges[:, 1]]).abs()
        # float64 (cast in forward), so a relisting reproduces the features exactly
        self.register_buffer("edge_dir", d / d.norm(dim=1, keepdim=True), persistent=False)  # (E, 2)

    def edges_to_vertices(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of the incident edges' features at each vertex: (B, E, C) -> (B, C, n, n)."""
        b, _, c = x.shape
        v = self.vertex_pos.shape[0]
        idx = self.edges.flatten()                                            # (2E,)
        acc = x.new_zeros(b, v, c).index_add(1, idx, x.repeat_interleave(2, dim=1))
        deg = x.new_zeros(v).index_add(0, idx, x.new_ones(idx.shape[0]))
        return (acc / deg[None, :, None]).transpose(1, 2).reshape(b, c, self.mesh_size, self.mesh_size)

    def forward(self, x: torch.Tensor, prior: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, 5, 1000, 70); prior: optional (B, 1, 70, 70) backbone prediction."""
        check_seismic(x, type(self).__name__)
        check_prior(prior, x.shape[0], type(self).__name__)
        grid = self.encoder(x)                                                # (B, C0, 70, 70)
        grid = torch.cat([grid, prior_channels(prior, grid)], dim=1)          # (B, C0+2, 70, 70)
        k = VELOCITY_SHAPE[0] // self.mesh_size
        vert = F.avg_pool2d(grid, k).flatten(2).transpose(1, 2)               # (B, V, C0+2)
        fa, fb = vert[:, self.edges[:, 0]], vert[:, self.edges[:, 1]]         # (B, E, C0+2) x2
        e = torch.cat([(fa + fb) / 2, (fa - fb).abs(),
                       self.edge_dir.to(vert.dtype).expand(vert.shape[0], -1, -1)], dim=2)
        e = self.edge_in(e)                                                   # (B, E, C)
        for block in self.blocks:
            e = block(e, self.neighbours)                                     # (B, E, C)
        v = self.edges_to_vertices(e)                                         # (B, C, 35, 35)
        v = F.interpolate(v, size=VELOCITY_SHAPE, mode="bilinear", align_corners=False)  # (B, C, 70, 70)
        return torch.tanh(self.head(torch.cat([v, grid], dim=1)))             # (B, 1, 70, 70)


@register_model(capabilities=Capabilities(accepts_prior=True))
def meshcnn(**kwargs) -> MeshCNN:
    """MeshCNN edge convolutions on a 35 x 35 union-jack mesh (4 blocks, 64 features)."""
    return MeshCNN(**kwargs)
