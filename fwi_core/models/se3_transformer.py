"""SE(3)-Transformer: equivariant graph attention over the survey and a subsurface lattice,
built with e3nn.

Fuchs, Worrall, Fischer & Welling, "SE(3)-Transformers: 3D Roto-Translation Equivariant
Attention Networks", NeurIPS 2020; implemented with e3nn (Geiger & Smidt, "e3nn: Euclidean
Neural Networks", 2022), following its equivariant-transformer recipe and NequIP's
depthwise ('uvu') tensor-product convolution (Batzner et al., Nat. Commun. 2022).

Nodes live in 3-D at (x, y = 0, depth) in metres: the 70 receivers and 5 sources of the
survey (features from their traces, as in ``egnn``) and a lattice of latent subsurface
nodes (default 14 depths x 7 positions across the map) that start from one learned
scalar embedding, so whatever they learn about their place comes from the geometry.
Node features are e3nn irreps (default ``32x0e + 8x1o + 4x2e``: scalars, vectors,
rank-2 tensors). One attention layer, for the edges j -> i into each node i:

    Y_ij  = spherical harmonics (l <= 2) of the unit vector from i to j
    w_ij  = MLP(radial basis of |x_j - x_i|, edge scalars a_ij)          (invariant)
    k_ij  = Linear(TP_uvu(f_j, Y_ij; w^k_ij)),  v_ij = Linear(TP_uvu(f_j, Y_ij; w^v_ij))
    q_i   = Linear(f_i),   alpha_ij = softmax_j(<q_i, k_ij>)                 (invariant)
    f_i'  = Gate(Linear(f_i) + sum_j alpha_ij v_ij)   (+ f_i when the irreps agree)

Every step commutes with rotations (the tensor products couple irreps with Clebsch-Gordan
coefficients; the logits and the gates are scalars), so rotating and translating every
position leaves the scalar outputs unchanged and rotates the l > 0 outputs by their
Wigner D-matrices (tested with random rotations, float64). The last layer outputs
scalars only; the lattice's scalars, reshaped to (B, C, 14, 7), go to a CNN decoder
(upsampling to 70 x 70, the prior's channels, ``Dropout2d``, tanh).

Edges: receiver <-> receiver (6 nearest) and source <-> receiver (every pair, the trace
embedding as edge scalar), as in ``egnn``; survey -> lattice from 8 anchor receivers
(columns 0, 10, 20, 30, 39, 49, 59, 69: a set the left-right flip maps onto itself) and
the 5 sources to every lattice node; lattice <-> lattice (8 nearest).

What the equivariance buys for this data (be honest): little by itself. The survey is a
line at depth 10 m and every node lies in the plane y = 0, so the group reduces to
rotations and reflections in that plane (l > 0 features have no y component), and the
wave physics is not rotation-invariant anyway: depth is special (the free surface, the
layering, the sources' position). The only exact symmetry of the competition data is the
approximate left-right flip. Relative positions, distances and angles are what the
network is given, which is a sensible prior for travel-time geometry; the absolute depth
of a lattice node is only implicit (its distance to the survey line). It is a prior to
test against the CNNs, not a guarantee; for a 3-D survey (receivers on a surface) the
same code would handle survey rotations exactly.

Shapes: seismic (B, 5, 1000, 70) -> traces (B, 5, 70, T) -> nodes (B, 75 + 98, irreps)
-> L layers -> lattice scalars (B, C, 14, 7) -> (B, 1, 70, 70) in [-1, 1].

e3nn is imported when a model is built (``fwi_core`` imports without it). Kaggle's image
lacks it: ship e3nn and opt-einsum-fx (+ opt-einsum) wheels through the kernel metadata's
wheels dataset (README, "Packages Kaggle lacks").
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..utils import optional_import
from .blocks import ConvBnAct, check_prior, check_seismic, prior_channels
from .registry import Capabilities, register_model
from .survey import (N_RECEIVERS, N_SOURCES, TraceEncoder, batch_edge_index, knn_edge_index,
                     positions_like, survey_graph)

__all__ = ["import_e3nn", "SE3AttentionLayer", "lattice_positions", "SE3Transformer", "se3_transformer"]


def import_e3nn():
    """Import e3nn or raise an ImportError that says how to get it."""
    how = ("pip install e3nn (pure Python, with opt-einsum-fx; on Kaggle it comes from the wheels dataset "
           "named in the kernel metadata, README 'Packages Kaggle lacks')")
    for sub in ("e3nn.math", "e3nn.nn", "e3nn.o3"):
        optional_import(sub, "the se3_transformer model", how)
    return optional_import("e3nn", "the se3_transformer model", how)


def lattice_positions(shape: Tuple[int, int] = (14, 7), extent: float = 700.0,
                      spacing: float = 10.0) -> torch.Tensor:
    """Centres of a (depths, positions) lattice of equal blocks over the map, in metres,
    row-major (depth first), embedded as (x, 0, depth): (n_z * n_x, 3). The centres are the
    sample positions of ``F.interpolate(align_corners=False)`` from that lattice to 70 x 70."""
    nz, nx = shape
    z = (torch.arange(nz, dtype=torch.float32) + 0.5) * extent / nz - spacing / 2
    x = (torch.arange(nx, dtype=torch.float32) + 0.5) * extent / nx - spacing / 2
    zz, xx = torch.meshgrid(z, x, indexing="ij")
    return torch.stack([xx.flatten(), torch.zeros(nz * nx), zz.flatten()], dim=1)


def _segment_softmax(logits: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """Softmax of (E,) logits over the edges that share a target index."""
    m = logits.new_full((n,), -math.inf).scatter_reduce(0, index, logits, "amax", include_self=True)
    ex = torch.exp(logits - m[index])
    return ex / logits.new_zeros(n).index_add(0, index, ex)[index]


def _uvu_tensor_product(o3, irreps_in, irreps_sh, irreps_target):
    """NequIP-style depthwise tensor product: each input channel couples with the
    spherical harmonics into every l of ``irreps_target``; weights come per edge."""
    mid, instructions = [], []
    for i, (mul, ir_in) in enumerate(irreps_in):
        for j, (_, ir_sh) in enumerate(irreps_sh):
            for ir_out in ir_in * ir_sh:
                if ir_out in irreps_target:
                    instructions.append((i, j, len(mid), "uvu", True))
                    mid.append((mul, ir_out))
    mid = o3.Irreps(mid)
    mid_sorted, perm, _ = mid.sort()
    instructions = [(a, b, perm[c], mode, train) for a, b, c, mode, train in instructions]
    tp = o3.TensorProduct(irreps_in, irreps_sh, mid_sorted, instructions,
                          shared_weights=False, internal_weights=False)
    return tp, mid_sorted


class SE3AttentionLayer(nn.Module):
    """One SE(3)-equivariant graph attention layer (module docstring).

    Args:
        irreps_in, irreps_out: e3nn irreps (strings or ``o3.Irreps``) of the node features.
        edge_scalars: size of the invariant edge attributes a_ij.
        max_radius: edge lengths are embedded on [0, max_radius] (same units as positions).
        irreps_sh: spherical harmonics of the edge directions.
        irreps_key: irreps of queries and keys.
        n_basis, radial_hidden: radial basis functions and the hidden size of the MLPs
            that turn (radial basis, edge scalars) into per-edge tensor-product weights.
        gate: end with an e3nn ``Gate`` (SiLU on scalars, sigmoid gates on l > 0); else
            the output is linear.

    Shapes: f (N, irreps_in.dim), pos (N, 3), edge_index (2, E) (row 0 senders j, row 1
    targets i), edge_attr (E, edge_scalars) -> (N, irreps_out.dim).
    """

    def __init__(self, irreps_in, irreps_out, edge_scalars: int = 0, max_radius: float = 1.0,
                 irreps_sh="1x0e + 1x1o + 1x2e", irreps_key="8x0e + 4x1o + 2x2e",
                 n_basis: int = 10, radial_hidden: int = 32, gate: bool = True):
        super().__init__()
        e3nn = import_e3nn()
        o3, enn = e3nn.o3, e3nn.nn
        self.irreps_in, self.irreps_out = o3.Irreps(irreps_in), o3.Irreps(irreps_out)
        self.irreps_sh, irreps_key = o3.Irreps(irreps_sh), o3.Irreps(irreps_key)
        self.edge_scalars, self.max_radius, self.n_basis = edge_scalars, float(max_radius), n_basis
        if gate:
            scalars = o3.Irreps([(m, ir) for m, ir in self.irreps_out if ir.l == 0])
            gated = o3.Irreps([(m, ir) for m, ir in self.irreps_out if ir.l > 0])
            gates = o3.Irreps(f"{gated.num_irreps}x0e") if gated.num_irreps else o3.Irreps("")
            self.gate = enn.Gate(scalars, [F.silu] * len(scalars), gates, [torch.sigmoid] * len(gates), gated)
            irreps_pre = self.gate.irreps_in
        else:
            self.gate, irreps_pre = None, self.irreps_out
        self.query = o3.Linear(self.irreps_in, irreps_key)
        self.tp_k, mid_k = _uvu_tensor_product(o3, self.irreps_in, self.irreps_sh, irreps_key)
        self.tp_v, mid_v = _uvu_tensor_product(o3, self.irreps_in, self.irreps_sh, irreps_pre)
        self.lin_k, self.lin_v = o3.Linear(mid_k, irreps_key), o3.Linear(mid_v, irreps_pre)
        n_radial = n_basis + edge_scalars
        self.fc_k = enn.FullyConnectedNet([n_radial, radial_hidden, self.tp_k.weight_numel], F.silu)
        self.fc_v = enn.FullyConnectedNet([n_radial, radial_hidden, self.tp_v.weight_numel], F.silu)
        self.dot = o3.FullyConnectedTensorProduct(irreps_key, irreps_key, "0e")
        self.self_interaction = o3.Linear(self.irreps_in, irreps_pre)
        self.residual = self.irreps_in == self.irreps_out
        self._soft_one_hot = e3nn.math.soft_one_hot_linspace
        self._spherical_harmonics = o3.spherical_harmonics

    def forward(self, f: torch.Tensor, pos: torch.Tensor, edge_index: torch.Tensor,
                edge_attr: Optional[torch.Tensor] = None) -> torch.Tensor:
        src, dst = edge_index                                                   # j, i
        vec = pos[src] - pos[dst]                                               # (E, 3)
        length = vec.norm(dim=1)                                                # (E,)
        unit = vec / length.clamp_min(1e-9)[:, None]      # coincident nodes: Y = (1, 0, ...)
        sh = self._spherical_harmonics(self.irreps_sh, unit, normalize=False,
                                       normalization="component")               # (E, sh)
        radial = self._soft_one_hot(length, 0.0, self.max_radius, self.n_basis,
                                    basis="smooth_finite", cutoff=True) * self.n_basis ** 0.5
        if self.edge_scalars:
            radial = torch.cat([radial, edge_attr], dim=1)                      # (E, n_basis + S)
        k = self.lin_k(self.tp_k(f[src], sh, self.fc_k(radial)))                # (E, key)
        v = self.lin_v(self.tp_v(f[src], sh, self.fc_v(radial)))                # (E, pre)
        logits = self.dot(self.query(f)[dst], k).squeeze(1)                     # (E,)
        alpha = _segment_softmax(logits, dst, f.shape[0])                       # (E,)
        out = self.self_interaction(f).index_add(0, dst, alpha[:, None] * v)    # (N, pre)
        out = self.gate(out) if self.gate is not None else out                  # (N, out)
        return out + f if self.residual else out


class SE3Transformer(nn.Module):
    """SE(3)-equivariant attention over survey + lattice nodes and a CNN decoder,
    (B, 5, 1000, 70) -> (B, 1, 70, 70) in [-1, 1].

    Args:
        irreps_hidden: node irreps between layers.
        scalars_out: scalar features per lattice node at the end.
        layers: attention layers.
        lattice: (depths, positions) of the latent lattice.
        trace_dim, trace_width: trace encoder size (node inputs and edge scalars).
        k_receivers, k_lattice: neighbours among receivers and among lattice nodes.
        n_anchors: receivers (evenly spread, flip-symmetric) that, with the sources, send
            to every lattice node.
        decoder_dim: channels of the CNN decoder.
        length_scale: positions are divided by it (metres -> units of ~100 m).
        drop_rate: ``Dropout`` on the lattice scalars and ``Dropout2d`` in the decoder
            (MC dropout; l > 0 features are never dropped, which keeps equivariance).
    """


    def __init__(self, irreps_hidden: str = "32x0e + 8x1o + 4x2e", scalars_out: int = 32,
                 layers: int = 3, lattice: Sequence[int] = (14, 7), trace_dim: int = 32,
                 trace_width: int = 32, k_receivers: int = 6, k_lattice: int = 8,
                 n_anchors: int = 8, decoder_dim: int = 48, length_scale: float = 100.0,
                 drop_rate: float = 0.1):
        super().__init__()
        o3 = import_e3nn().o3
        if layers < 1:
            raise ValueError(f"SE3Transformer: layers must be >= 1, got {layers}")
        self.lattice, self.length_scale = tuple(int(n) for n in lattice), float(length_scale)
        pos, edge_index, edge_type, trace_index = self._graph(k_receivers, k_lattice, n_anchors)
        self.register_buffer("node_pos", pos, persistent=False)                 # (N, 3) metres
        self.register_buffer("edge_index", edge_index, persistent=False)        # (2, E)
        self.register_buffer("edge_type", edge_type, persistent=False)          # (E,) 0..3
        self.register_buffer("trace_index", trace_index, persistent=False)      # (E,)
        self.n_survey = N_RECEIVERS + N_SOURCES
        irreps_hidden = o3.Irreps(irreps_hidden)
        n_scalar_in = irreps_hidden.count("0e")
        self.irreps_in = o3.Irreps(f"{n_scalar_in}x0e")
        self.traces = TraceEncoder(trace_dim, trace_width)
        self.receiver_in = nn.Linear(N_SOURCES * trace_dim, n_scalar_in)
        self.source_in = nn.Linear(trace_dim, n_scalar_in)
        self.type_embed = nn.Parameter(torch.randn(3, n_scalar_in) * 0.5)       # receiver, source, lattice
        self.edge_trace = nn.Linear(trace_dim, trace_dim)
        self.edge_type_embed = nn.Parameter(torch.randn(4, trace_dim) * 0.5)    # rr, sr, survey->lattice, ll
        max_radius = float((pos[edge_index[0]] - pos[edge_index[1]]).norm(dim=1).max()) * 1.05 / length_scale
        irreps = [self.irreps_in] + [irreps_hidden] * (layers - 1) + [o3.Irreps(f"{scalars_out}x0e")]
        self.layers = nn.ModuleList(
            SE3AttentionLayer(irreps[i], irreps[i + 1], edge_scalars=trace_dim, max_radius=max_radius,
                              gate=i < layers - 1)
            for i in range(layers))
        self.drop = nn.Dropout(drop_rate)
        self.decoder_in = ConvBnAct(scalars_out, decoder_dim, 3)
        self.decoder = nn.Sequential(ConvBnAct(decoder_dim + 2, decoder_dim, 3), nn.Dropout2d(drop_rate),
                                     ConvBnAct(decoder_dim, decoder_dim, 3), nn.Conv2d(decoder_dim, 1, 3, padding=1))

    def _graph(self, k_receivers: int, k_lattice: int, n_anchors: int):
        g = survey_graph(k_receivers, dim=3)
        n_s = g.num_nodes
        lat = lattice_positions(self.lattice)
        n_l = lat.shape[0]
        if not 2 <= n_anchors <= N_RECEIVERS:
            raise ValueError(f"SE3Transformer: n_anchors must lie in [2, {N_RECEIVERS}], got {n_anchors}")
        anchors = torch.cat([torch.linspace(0, N_RECEIVERS - 1, n_anchors, dtype=torch.float64).round().long(),
                             torch.arange(N_RECEIVERS, N_RECEIVERS + N_SOURCES)])
        targets = torch.arange(n_l) + n_s
        s2l = torch.stack([anchors.repeat(n_l), targets.repeat_interleave(anchors.numel())])
        ll = knn_edge_index(lat, k_lattice) + n_s
        edge_index = torch.cat([g.edge_index, s2l, ll], dim=1)
        sr = (g.trace_index >= 0).long()
        edge_type = torch.cat([sr, torch.full((s2l.shape[1],), 2), torch.full((ll.shape[1],), 3)])
        trace_index = torch.cat([g.trace_index, torch.full((s2l.shape[1] + ll.shape[1],), -1)])
        return torch.cat([g.pos, lat]), edge_index, edge_type, trace_index

    def encode_graph(self, x: torch.Tensor, pos: Optional[torch.Tensor] = None,
                     return_hidden: bool = False):
        """Node features after the attention layers.

        Args:
            x: seismic (B, 5, 1000, 70).
            pos: node positions (N, 3) or (B, N, 3) in metres, survey nodes then lattice
                nodes (default: ``node_pos``); e.g. rotated for an equivariance test.
            return_hidden: also return the features before the last layer (irreps_hidden).
        Returns:
            (B, N, scalars_out) invariant scalars (and (B, N, irreps_hidden.dim)).
        """
        check_seismic(x, type(self).__name__)
        b = x.shape[0]
        z = self.traces(x)                                                      # (B, 5, 70, T)
        h_rec = self.receiver_in(z.permute(0, 2, 1, 3).flatten(2)) + self.type_embed[0]  # (B, 70, S)
        h_src = self.source_in(z.mean(2)) + self.type_embed[1]                 # (B, 5, S)
        n_lat = self.node_pos.shape[0] - self.n_survey
        h_lat = self.type_embed[2].expand(b, n_lat, -1)                        # (B, 98, S)
        f = torch.cat([h_rec, h_src, h_lat], dim=1)                            # (B, N, S)
        pos, n = positions_like(self.node_pos if pos is None else pos, b, f)    # (B, N, 3)
        table = torch.cat([self.edge_type_embed.to(f.dtype).expand(b, -1, -1),
                           self.edge_trace(z.flatten(1, 2))], dim=1)           # (B, 4 + 350, T)
        a = table[:, torch.where(self.trace_index >= 0, self.trace_index + 4, self.edge_type)]  # (B, E, T)
        edge_index = batch_edge_index(self.edge_index, n, b)                  # (2, B*E)
        # e3nn's tensor products need one dtype throughout: the equivariant layers run
        # outside autocast, in the parameters' dtype (float32; float64 in the tests)
        dt = self.type_embed.dtype
        with torch.autocast(device_type=x.device.type, enabled=False):
            f, a = f.reshape(b * n, -1).to(dt), a.reshape(-1, a.shape[-1]).to(dt)
            pos = pos.reshape(b * n, 3).to(dt) / self.length_scale
            hidden = f
            for layer in self.layers:
                hidden, f = f, layer(f, pos, edge_index, a)                     # (B*N, irreps)
        f = f.view(b, n, -1)
        return (f, hidden.view(b, n, -1)) if return_hidden else f

    def forward(self, x: torch.Tensor, prior: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, 5, 1000, 70); prior: optional (B, 1, 70, 70) backbone prediction."""
        check_seismic(x, type(self).__name__)
        check_prior(prior, x.shape[0], type(self).__name__)
        f = self.encode_graph(x)[:, self.n_survey:]                            # (B, 98, C)
        b, _, c = f.shape
        g = self.drop(f).transpose(1, 2).reshape(b, c, *self.lattice)          # (B, C, 14, 7)
        g = self.decoder_in(g)                                                 # (B, D, 14, 7)
        g = F.interpolate(g, size=(70, 70), mode="bilinear", align_corners=False)  # (B, D, 70, 70)
        g = torch.cat([g, prior_channels(prior, g)], dim=1)                    # (B, D+2, 70, 70)
        return torch.tanh(self.decoder(g))                                     # (B, 1, 70, 70)


@register_model(capabilities=Capabilities(accepts_prior=True))
def se3_transformer(**kwargs) -> SE3Transformer:
    """SE(3)-equivariant attention (e3nn) over 75 survey + 14x7 lattice nodes, 3 layers."""
    return SE3Transformer(**kwargs)
