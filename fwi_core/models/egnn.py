"""EGNN: an E(n)-equivariant graph network over the survey's receivers and sources.

Satorras, Hoogeboom & Welling, "E(n) Equivariant Graph Neural Networks", ICML 2021
(reference code: vgsatorras/egnn). One layer (their eq. 3-6, with the paper's edge-inference
gate and the normalised coordinate differences of the reference code):

    m_ij  = phi_e(h_i, h_j, |x_i - x_j|^2 / L^2, a_ij),   m_ij <- m_ij * sigmoid(phi_inf(m_ij))
    x_i'  = x_i + L / |N(i)| * sum_j (x_i - x_j) / (|x_i - x_j| + L) * tanh(phi_x(m_ij))
    h_i'  = h_i + phi_h(h_i, sum_j m_ij)

with a length scale L (100 m). Node features h only ever see distances, so they are
invariant, and positions x move along differences of positions, so they are equivariant:
rotating, reflecting or translating every input position leaves h' unchanged and
transforms x' the same way (tested).

The graph (:func:`fwi_core.models.survey.survey_graph`): 70 receivers and 5 sources as
nodes at (x, depth) in metres; receiver <-> receiver edges from the 6 nearest receivers,
source <-> receiver edges for every pair, whose attribute a_ij is the embedding of the
trace recorded at that receiver from that source (a shared 1-D temporal CNN,
:class:`~fwi_core.models.survey.TraceEncoder`). Receiver nodes start from the embeddings
of their 5 traces, source nodes from the mean embedding of their shot gather.

Decoder (:class:`QueryDecoder`, deliberately NOT equivariant: depth is special in this
data): every cell of the 70 x 70 map is a query point at (x, depth) in metres; it attends
to the nodes with content logits plus a distance bias ``-|q - x_j|^2 / (2 sigma_h(z)^2)``
whose width grows with the query's depth z (a learned aperture per head), and an MLP
turns the attended node features, a depth embedding and the prior into cell features; a
conv head with ``Dropout2d`` and tanh gives the map.

Shapes: seismic (B, 5, 1000, 70) -> traces (B, 5, 70, T) -> nodes (B, 75, H) at (B, 75, 2)
-> L EGNN layers -> query features (B, C, 70, 70) -> (B, 1, 70, 70) in [-1, 1].

``forward(x, prior=None)``: ``prior`` (B, 1, 70, 70), a backbone's normalised prediction,
enters the query features and the head (stage-wise residual training).

torch-geometric provides ``MessagePassing``; it is imported when a layer is built, so
``fwi_core`` imports without it. Kaggle's image lacks it: ship its wheel through the
kernel metadata's wheels dataset (README, "Packages Kaggle lacks").
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..utils import optional_import
from .blocks import ConvBnAct, check_prior, check_seismic, prior_channels
from .registry import Capabilities, register_model
from .survey import (N_SOURCES, TraceEncoder, batch_edge_index, grid_positions,
                     positions_like, survey_graph)

__all__ = ["import_torch_geometric", "EGNNLayer", "QueryDecoder", "EGNNNet", "egnn"]


def import_torch_geometric():
    """Import torch_geometric or raise an ImportError that says how to get it."""
    how = ("pip install torch-geometric (pure Python; on Kaggle it comes from the wheels dataset named in the "
           "kernel metadata, README 'Packages Kaggle lacks')")
    optional_import("torch_geometric.nn", "the egnn model", how)
    return optional_import("torch_geometric", "the egnn model", how)


def _mlp(sizes: Sequence[int], act_last: bool = False, drop_rate: float = 0.0) -> nn.Sequential:
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2 or act_last:
            layers.append(nn.SiLU())
            if drop_rate and i < len(sizes) - 2:
                layers.append(nn.Dropout(drop_rate))
    return nn.Sequential(*layers)


@functools.lru_cache(maxsize=None)
def _egnn_layer_class():
    MessagePassing = import_torch_geometric().nn.MessagePassing

    class EGNNLayer(MessagePassing):
        """One E(n)-equivariant layer (module docstring) on ``MessagePassing`` (sum aggregation).

        Args:
            hidden: node feature size H (input and output).
            edge_dim: size of the edge attributes a_ij (0: none).
            update_coords: compute x' (else positions pass through unchanged).
            attention: gate messages with sigmoid(phi_inf(m_ij)).
            length_scale: L in the units of the positions (metres here).
            drop_rate: dropout inside phi_h (invariant features: keeps equivariance).

        Shapes: h (N, H), pos (N, D), edge_index (2, E), edge_attr (E, edge_dim) ->
        (h' (N, H), pos' (N, D)).
        """

        def __init__(self, hidden: int, edge_dim: int = 0, update_coords: bool = True,
                     attention: bool = True, length_scale: float = 100.0, drop_rate: float = 0.0):
            super().__init__(aggr="add")
            self.hidden, self.edge_dim = hidden, edge_dim
            self.update_coords, self.length_scale = update_coords, float(length_scale)
            # phi_e = SiLU(Linear(SiLU(W [h_i, h_j, d2, a_ij] + b))); its first layer is split
            # into per-node products W_i h_i, W_j h_j (N rows, not E) gathered per edge.
            self.e_in = nn.Linear(2 * hidden + 1 + edge_dim, hidden)
            self.e_out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())
            self.phi_inf = nn.Sequential(nn.Linear(hidden, 1), nn.Sigmoid()) if attention else None
            if update_coords:
                self.phi_x = _mlp([hidden, hidden, 1])
                nn.init.xavier_uniform_(self.phi_x[-1].weight, gain=0.01)   # small first moves
            self.phi_h = _mlp([2 * hidden, hidden, hidden], drop_rate=drop_rate)

        def forward(self, h: torch.Tensor, pos: torch.Tensor, edge_index: torch.Tensor,
                    edge_attr: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
            if self.edge_dim and (edge_attr is None or edge_attr.shape != (edge_index.shape[1], self.edge_dim)):
                raise ValueError(f"EGNNLayer: edge_attr must be ({edge_index.shape[1]}, {self.edge_dim}), "
                                 f"got {None if edge_attr is None else tuple(edge_attr.shape)}")
            w = self.e_in.weight
            h_dst = h @ w[:, :self.hidden].T + self.e_in.bias                     # (N, H)
            h_src = h @ w[:, self.hidden:2 * self.hidden].T                      # (N, H)
            a = edge_attr @ w[:, 2 * self.hidden + 1:].T if self.edge_dim else None  # (E, H)
            out = self.propagate(edge_index, h_dst=h_dst, h_src=h_src, pos=pos, a=a)  # (N, H + D + 1)
            m_sum = out[:, :self.hidden]                                          # (N, H)
            h = h + self.phi_h(torch.cat([h, m_sum], dim=1))                      # (N, H)
            if self.update_coords:
                dx_sum, deg = out[:, self.hidden:-1], out[:, -1:]                 # (N, D), (N, 1)
                pos = pos + self.length_scale * dx_sum / deg.clamp_min(1.0)       # (N, D)
            return h, pos

        def message(self, h_dst_i: torch.Tensor, h_src_j: torch.Tensor, pos_i: torch.Tensor,
                    pos_j: torch.Tensor, a: Optional[torch.Tensor]) -> torch.Tensor:
            rel = pos_i - pos_j                                                   # (E, D)
            dist = rel.norm(dim=1, keepdim=True)                                  # (E, 1)
            d2_term = (dist / self.length_scale) ** 2 * self.e_in.weight[:, 2 * self.hidden]
            pre = h_dst_i + h_src_j + d2_term + (a if a is not None else 0.0)     # (E, H)
            m = self.e_out(pre)                                                   # (E, H)
            if self.phi_inf is not None:
                m = m * self.phi_inf(m)
            if not self.update_coords:
                return torch.cat([m, torch.zeros_like(rel), torch.ones_like(dist)], dim=1)
            step = rel / (dist + self.length_scale) * torch.tanh(self.phi_x(m))   # (E, D)
            return torch.cat([m, step, torch.ones_like(dist)], dim=1)             # (E, H + D + 1)

    EGNNLayer.__module__, EGNNLayer.__qualname__ = __name__, "EGNNLayer"   # picklable by name
    return EGNNLayer


def __getattr__(name: str):
    """``EGNNLayer`` is created on first use (it subclasses torch_geometric's MessagePassing)."""
    if name == "EGNNLayer":
        return _egnn_layer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def depth_embedding(depth: torch.Tensor, n_freq: int = 8, extent: float = 700.0) -> torch.Tensor:
    """Sinusoidal features of depth (m): (...,) -> (..., 2 * n_freq + 1)."""
    z = depth / extent
    freqs = math.pi * 2.0 ** torch.arange(n_freq, device=depth.device, dtype=depth.dtype)
    ang = z[..., None] * freqs
    return torch.cat([z[..., None], torch.sin(ang), torch.cos(ang)], dim=-1)


class QueryDecoder(nn.Module):
    """Attention from the map's cells to graph nodes, with a depth-dependent distance bias.

    Head h's logit for query q at (x_q, z_q) and node j at p_j:
    ``<W_q e_q, W_k h_j> / sqrt(d) - |(x_q, z_q) - p_j|^2 / (2 sigma_h(z_q)^2)`` with
    ``sigma_h(z) = softplus(a_h) L + softplus(b_h) z`` (the aperture widens with depth);
    e_q is the query's embedding (depth features and the prior's two channels).

    Args:
        node_dim: node feature size H.
        out_dim: cell features C.
        heads, head_dim: attention heads and their size.
        length_scale: L in metres.
        drop_rate: dropout on the attention weights and in the output MLP.

    Shapes: nodes (B, N, H), pos (B, N, 2), prior (B, 1, 70, 70) or None -> (B, C, 70, 70).
    """

    def __init__(self, node_dim: int, out_dim: int = 64, heads: int = 4, head_dim: int = 32,
                 length_scale: float = 100.0, drop_rate: float = 0.0, n_freq: int = 8):
        super().__init__()
        self.heads, self.head_dim, self.length_scale, self.n_freq = heads, head_dim, float(length_scale), n_freq
        q_in = 2 * n_freq + 1 + 2
        self.register_buffer("query_pos", grid_positions(), persistent=False)          # (Q, 2)
        self.query_embed = _mlp([q_in, out_dim, out_dim], act_last=True)
        self.to_q = nn.Linear(out_dim, heads * head_dim)
        self.to_kv = nn.Linear(node_dim, 2 * heads * head_dim)
        # apertures from 20 m to 160 m at the surface, widening by 0.2..0.5 m per m of depth
        a0 = torch.tensor([20.0 * 2 ** (i * 3 / max(heads - 1, 1)) for i in range(heads)]) / length_scale
        b0 = torch.linspace(0.2, 0.5, heads)
        self.aperture_a = nn.Parameter(a0 + torch.log(-torch.expm1(-a0)))        # softplus^-1
        self.aperture_b = nn.Parameter(b0 + torch.log(-torch.expm1(-b0)))
        self.attn_drop = nn.Dropout(drop_rate)
        self.out = _mlp([heads * head_dim + out_dim, out_dim, out_dim], act_last=True, drop_rate=drop_rate)

    def forward(self, nodes: torch.Tensor, pos: torch.Tensor,
                prior: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, n, _ = nodes.shape
        qpos = self.query_pos.to(nodes.dtype)                                          # (Q, 2)
        side = int(round(math.sqrt(qpos.shape[0])))
        pc = prior_channels(prior, nodes.new_empty(b, 1, side, side)).flatten(2).transpose(1, 2)  # (B, Q, 2)
        e = torch.cat([depth_embedding(qpos[:, 1], self.n_freq).expand(b, -1, -1), pc], dim=2)
        e = self.query_embed(e)                                                        # (B, Q, C)
        q = self.to_q(e).view(b, -1, self.heads, self.head_dim).transpose(1, 2)        # (B, h, Q, d)
        k, v = self.to_kv(nodes).view(b, n, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, h, N, d) x2
        d2 = (qpos[None, :, None, :] - pos.to(nodes.dtype)[:, None]).pow(2).sum(-1)   # (B, Q, N)
        sigma = (F.softplus(self.aperture_a)[:, None] * self.length_scale
                 + F.softplus(self.aperture_b)[:, None] * qpos[None, :, 1])            # (h, Q)
        bias = -d2[:, None] / (2 * sigma[None, :, :, None] ** 2)                       # (B, h, Q, N)
        logits = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim) + bias             # (B, h, Q, N)
        attn = self.attn_drop(torch.softmax(logits, dim=-1))
        o = (attn @ v).transpose(1, 2).reshape(b, -1, self.heads * self.head_dim)      # (B, Q, h*d)
        o = self.out(torch.cat([o, e], dim=2))                                         # (B, Q, C)
        return o.transpose(1, 2).reshape(b, -1, side, side)                            # (B, C, 70, 70)


class EGNNNet(nn.Module):
    """EGNN over receivers and sources + query decoder, (B, 5, 1000, 70) -> (B, 1, 70, 70).

    Args:
        hidden: node feature size H.
        layers: EGNN layers.
        trace_dim: trace embedding size (edge attributes and node inputs).
        trace_width: channels of the trace encoder's CNN.
        k_receivers: receiver-receiver neighbours.
        decoder_dim: cell features C of the decoder.
        heads: decoder attention heads.
        length_scale: L in metres (EGNN distances and decoder apertures).
        drop_rate: dropout in phi_h, on the decoder's attention and MLP, ``Dropout2d`` in
            the head (MC dropout).
    """


    def __init__(self, hidden: int = 128, layers: int = 4, trace_dim: int = 64, trace_width: int = 64,
                 k_receivers: int = 6, decoder_dim: int = 64, heads: int = 4,
                 length_scale: float = 100.0, drop_rate: float = 0.1):
        super().__init__()
        layer_cls = _egnn_layer_class()
        graph = survey_graph(k_receivers, dim=2)
        self.register_buffer("node_pos", graph.pos, persistent=False)                # (75, 2)
        self.register_buffer("edge_index", graph.edge_index, persistent=False)       # (2, E)
        self.register_buffer("trace_index", graph.trace_index, persistent=False)     # (E,)
        self.traces = TraceEncoder(trace_dim, trace_width)
        self.receiver_in = nn.Linear(N_SOURCES * trace_dim, hidden)
        self.source_in = nn.Linear(trace_dim, hidden)
        self.type_embed = nn.Parameter(torch.randn(2, hidden) * 0.1)                 # receiver, source
        self.edge_trace = nn.Linear(trace_dim, trace_dim)
        self.edge_geom = nn.Parameter(torch.randn(trace_dim) * 0.1)                  # receiver-receiver
        self.layers = nn.ModuleList(
            layer_cls(hidden, edge_dim=trace_dim, length_scale=length_scale, drop_rate=drop_rate)
            for _ in range(layers))
        self.decoder = QueryDecoder(hidden, decoder_dim, heads, length_scale=length_scale, drop_rate=drop_rate)
        self.head = nn.Sequential(ConvBnAct(decoder_dim + 2, decoder_dim, 3), nn.Dropout2d(drop_rate),
                                  nn.Conv2d(decoder_dim, 1, 3, padding=1))

    def encode_graph(self, x: torch.Tensor, pos: Optional[torch.Tensor] = None
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Node features and positions after the EGNN layers.

        Args:
            x: seismic (B, 5, 1000, 70).
            pos: node positions (75, 2) or (B, 75, 2) in metres (default: the survey's).
        Returns:
            (h (B, 75, H) invariant features, pos' (B, 75, 2) equivariant positions).
        """
        check_seismic(x, type(self).__name__)
        b = x.shape[0]
        z = self.traces(x)                                                     # (B, 5, 70, T)
        h_rec = self.receiver_in(z.permute(0, 2, 1, 3).flatten(2))             # (B, 70, H)
        h_src = self.source_in(z.mean(2))                                      # (B, 5, H)
        h = torch.cat([h_rec + self.type_embed[0], h_src + self.type_embed[1]], dim=1)  # (B, 75, H)
        pos, n = positions_like(self.node_pos if pos is None else pos, b, h)   # (B, 75, 2)
        table = torch.cat([self.edge_geom.to(h.dtype).expand(b, 1, -1),
                           self.edge_trace(z.flatten(1, 2))], dim=1)          # (B, 1 + 350, T)
        a = table[:, self.trace_index + 1]                                     # (B, E, T)
        edge_index = batch_edge_index(self.edge_index, n, b)                  # (2, B*E)
        h, pos = h.reshape(b * n, -1), pos.reshape(b * n, -1)
        a = a.reshape(-1, a.shape[-1])
        for layer in self.layers:
            h, pos = layer(h, pos, edge_index, a)                              # (B*75, H), (B*75, 2)
        return h.view(b, n, -1), pos.view(b, n, -1)

    def forward(self, x: torch.Tensor, prior: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, 5, 1000, 70); prior: optional (B, 1, 70, 70) backbone prediction."""
        check_seismic(x, type(self).__name__)
        check_prior(prior, x.shape[0], type(self).__name__)
        h, pos = self.encode_graph(x)                                          # (B, 75, H), (B, 75, 2)
        q = self.decoder(h, pos, prior)                                        # (B, C, 70, 70)
        q = torch.cat([q, prior_channels(prior, q)], dim=1)                    # (B, C+2, 70, 70)
        return torch.tanh(self.head(q))                                        # (B, 1, 70, 70)


@register_model(capabilities=Capabilities(accepts_prior=True))
def egnn(**kwargs) -> EGNNNet:
    """EGNN over 70 receivers + 5 sources (4 layers, 128 features) with a query decoder."""
    return EGNNNet(**kwargs)
