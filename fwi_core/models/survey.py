"""The acquisition as a graph: survey geometry in metres, edges from geometry, and a shared
1-D temporal encoder that turns each recorded trace into a feature vector.

Used by the graph members of the zoo (``egnn``, ``se3_transformer``); plain torch only
(graphs are built with ``torch.cdist`` + ``topk`` and fixed index lists, so nothing needs
pyg-lib or torch-cluster).

Geometry (the competition's, see ``fwi_core.physics.forward.Geometry``): 70 receivers at
every column of the 10 m grid and 5 sources at columns (0, 17, 34, 52, 69), all at depth
10 m (row 1). Node order: receivers 0..69, then sources 0..4. Positions are (x, depth) in
metres, or (x, 0, depth) when embedded in 3-D.

The survey graph has two kinds of directed edges (PyG convention: ``edge_index[0]`` is
the sender j, ``edge_index[1]`` the receiver i of a message j -> i):

- receiver <-> receiver: each receiver hears its ``k`` nearest receivers (geometry only);
- source <-> receiver: all 5 x 70 pairs in both directions; the trace recorded at
  receiver r from source s is the attribute of both edges (s -> r and r -> s).

``trace_index`` maps each edge to its trace, ``s * 70 + r``, or -1 for geometry-only edges.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn as nn

from ..physics.forward import DEFAULT_SOURCE_COLUMNS
from .blocks import SEISMIC_SHAPE, VELOCITY_SHAPE

__all__ = ["N_RECEIVERS", "N_SOURCES", "GRID_SPACING", "SURVEY_DEPTH", "survey_positions",
           "grid_positions", "knn_edge_index", "SurveyGraph", "survey_graph", "batch_edge_index",
           "TraceEncoder", "positions_like"]

N_SOURCES, N_TIME, N_RECEIVERS = SEISMIC_SHAPE
GRID_SPACING = 10.0          # m, the velocity grid and the receiver spacing
SURVEY_DEPTH = 10.0          # m, depth of sources and receivers (row 1)


def _embed(xz: torch.Tensor, dim: int) -> torch.Tensor:
    """(N, 2) (x, depth) -> (N, dim): dim 2 as is, dim 3 as (x, 0, depth)."""
    if dim == 2:
        return xz
    if dim == 3:
        return torch.stack([xz[:, 0], torch.zeros_like(xz[:, 0]), xz[:, 1]], dim=1)
    raise ValueError(f"positions: dim must be 2 or 3, got {dim}")


def survey_positions(dim: int = 2, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Positions in metres of the 70 receivers then the 5 sources: (75, dim)."""
    cols = torch.cat([torch.arange(N_RECEIVERS, dtype=dtype),
                      torch.tensor(DEFAULT_SOURCE_COLUMNS, dtype=dtype)])
    xz = torch.stack([cols * GRID_SPACING, torch.full_like(cols, SURVEY_DEPTH)], dim=1)
    return _embed(xz, dim)


def grid_positions(n: int = VELOCITY_SHAPE[0], extent: float = VELOCITY_SHAPE[0] * GRID_SPACING,
                   dim: int = 2, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Positions in metres of an n x n grid of cells covering the velocity map, row-major
    (row = depth): (n * n, dim). For n = 70 these are the map's cells (x = 10 * col,
    depth = 10 * row); a coarser n places points at the centres of n x n equal blocks,
    the positions ``F.interpolate(align_corners=False)`` assumes."""
    cell = extent / n
    offset = (cell - GRID_SPACING) / 2          # block centre, in the 10 m cells' frame
    c = torch.arange(n, dtype=dtype) * cell + offset
    depth, x = torch.meshgrid(c, c, indexing="ij")
    return _embed(torch.stack([x.flatten(), depth.flatten()], dim=1), dim)


def knn_edge_index(pos: torch.Tensor, k: int, targets: torch.Tensor = None,
                   sources: torch.Tensor = None) -> torch.Tensor:
    """Edges to each target node from its ``k`` nearest source nodes (``cdist`` + ``topk``).

    Args:
        pos: (N, D) node positions.
        k: neighbours per target (self excluded).
        targets, sources: LongTensors of node indices (default: all nodes).
    Returns:
        LongTensor (2, len(targets) * k): row 0 the senders j, row 1 the targets i.
    """
    n = pos.shape[0]
    targets = torch.arange(n) if targets is None else targets
    sources = torch.arange(n) if sources is None else sources
    d = torch.cdist(pos[targets].double(), pos[sources].double())            # (T, S)
    d[targets[:, None] == sources[None, :]] = float("inf")                  # no self-loops
    if not 0 < k <= int(torch.isfinite(d).sum(1).min()):
        raise ValueError(f"knn_edge_index: k must lie in [1, {int(torch.isfinite(d).sum(1).min())}], got {k}")
    nearest = d.topk(k, dim=1, largest=False).indices                       # (T, k)
    return torch.stack([sources[nearest].flatten(), targets.repeat_interleave(k)])


@dataclass
class SurveyGraph:
    """A fixed graph over the survey: positions (N, D) in metres, ``edge_index`` (2, E),
    ``trace_index`` (E,) (``s * 70 + r`` or -1), ``node_type`` (N,) (0 receiver, 1 source)."""

    pos: torch.Tensor
    edge_index: torch.Tensor
    trace_index: torch.Tensor
    node_type: torch.Tensor

    @property
    def num_nodes(self) -> int:
        return self.pos.shape[0]


def survey_graph(k_receivers: int = 6, dim: int = 2) -> SurveyGraph:
    """The survey graph (module docstring): receivers with their ``k_receivers`` nearest
    receivers, and every source-receiver pair in both directions with its trace."""
    pos = survey_positions(dim)
    rec = torch.arange(N_RECEIVERS)
    rr = knn_edge_index(pos, k_receivers, targets=rec, sources=rec)
    s, r = torch.meshgrid(torch.arange(N_SOURCES), rec, indexing="ij")
    s, r = s.flatten(), r.flatten()
    src_node = N_RECEIVERS + s
    trace = s * N_RECEIVERS + r
    edge_index = torch.cat([rr, torch.stack([src_node, r]), torch.stack([r, src_node])], dim=1)
    trace_index = torch.cat([torch.full((rr.shape[1],), -1, dtype=torch.long), trace, trace])
    node_type = torch.cat([torch.zeros(N_RECEIVERS, dtype=torch.long),
                           torch.ones(N_SOURCES, dtype=torch.long)])
    return SurveyGraph(pos, edge_index, trace_index, node_type)


def batch_edge_index(edge_index: torch.Tensor, num_nodes: int, batch: int) -> torch.Tensor:
    """Disjoint union of ``batch`` copies of a graph: (2, E) -> (2, batch * E), copy b's
    node indices offset by ``b * num_nodes`` (node tensors flattened to (batch * N, ...))."""
    offsets = torch.arange(batch, device=edge_index.device) * num_nodes
    return (edge_index[:, None, :] + offsets[None, :, None]).reshape(2, -1)


class TraceEncoder(nn.Module):
    """A small 1-D temporal CNN shared by every trace: (1000,) samples -> ``out_dim`` features.

    Four Conv1d -> BatchNorm1d -> GELU stages (stride 4, 2, 2, 2; 1000 -> 250 -> 125 -> 63
    -> 32 samples) keep the arrival times; the (channels x 32) map is flattened and a
    linear layer gives the trace's feature vector.

    Args:
        out_dim: features per trace.
        width: channels c of the stages (c/4, c/2, c, c).

    Shapes: seismic (B, 5, 1000, 70) -> (B, 5, 70, out_dim) = (batch, source, receiver, feature).
    """

    def __init__(self, out_dim: int = 64, width: int = 64):
        super().__init__()
        c1, c2, c3 = max(width // 4, 1), max(width // 2, 1), width

        def stage(i: int, o: int, k: int, s: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv1d(i, o, k, stride=s, padding=k // 2, bias=False),
                                 nn.BatchNorm1d(o), nn.GELU())

        self.convs = nn.Sequential(stage(1, c1, 9, 4), stage(c1, c2, 5, 2), stage(c2, c3, 5, 2),
                                   stage(c3, c3, 5, 2))
        self.n_out_time = self._out_len(N_TIME)
        self.proj = nn.Linear(c3 * self.n_out_time, out_dim)
        self.out_dim = out_dim

    def _out_len(self, n: int) -> int:
        for st in self.convs:
            conv = st[0]
            n = (n + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1
        return n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, t, r = x.shape
        traces = x.permute(0, 1, 3, 2).reshape(b * s * r, 1, t)           # (B*5*70, 1, 1000)
        h = self.convs(traces)                                             # (B*5*70, c, 32)
        return self.proj(h.flatten(1)).view(b, s, r, self.out_dim)         # (B, 5, 70, out_dim)


def positions_like(pos: torch.Tensor, batch: int, ref: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """Expand fixed positions (N, D) or per-sample positions (B, N, D) to (B, N, D) in the
    dtype and device of ``ref``; returns (positions, N)."""
    pos = pos.to(dtype=ref.dtype, device=ref.device)
    if pos.dim() == 2:
        pos = pos.unsqueeze(0).expand(batch, -1, -1)
    if pos.dim() != 3 or pos.shape[0] != batch:
        raise ValueError(f"positions must be (N, D) or ({batch}, N, D), got {tuple(pos.shape)}")
    return pos, pos.shape[1]
