"""A masked E(n)-equivariant graph network with EDM's architecture, and its dynamics wrapper.

The architecture follows EDM's ``EGNN`` (Hoogeboom et al. 2022; Satorras et al. 2021): blocks of
invariant graph convolutions (edge MLP, optional attention gate, node MLP with residual) followed by
an equivariant coordinate update ``x_i += sum_j (x_i - x_j) / (|x_i - x_j| + c) * phi(m_ij)``, edge
features = current and initial squared distances, ``tanh`` bounded updates, fixed normalisation of
the sums. Inputs are dense and masked: ``x [B, N, 3]``, ``h [B, N, F]``, ``node_mask [B, N, 1]``.

Two choices make it fast on a CPU without changing the function it computes:
* edges are a packed list of the real pairs (i != j, both real), so padding costs nothing;
* the first layer of every edge MLP acts on ``[h_i, h_j, d_ij]``; by linearity we apply its weight
  blocks to the *nodes* once and add per edge, instead of multiplying every edge by a 2F x F matrix.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rgdm.diffusion.com import remove_mean_with_mask


class EdgeIndex:
    """Packed list of the real directed pairs (i, j), i != j, of a masked batch."""

    def __init__(self, node_mask: Tensor, edge_nf: int):
        batch, n_nodes, _ = node_mask.shape
        real = node_mask[..., 0] > 0.5
        pair = real[:, :, None] & real[:, None, :]
        pair &= ~torch.eye(n_nodes, dtype=torch.bool, device=node_mask.device)
        b, i, j = pair.nonzero(as_tuple=True)
        self.row = b * n_nodes + i  # receiving node, flat index into B * N
        self.col = b * n_nodes + j  # sending node
        self.num_nodes = batch * n_nodes
        self.edge_nf = edge_nf
        # Rows of the table `_pair_linear` sums per edge: [receiver's row, sender's row, one row
        # per edge attribute, the bias row]; see `_pair_linear`.
        constant_rows = 2 * self.num_nodes + torch.arange(edge_nf + 1, device=node_mask.device)
        self.bag_rows = torch.cat([2 * self.row[:, None], 2 * self.col[:, None] + 1,
                                   constant_rows.expand(self.row.numel(), edge_nf + 1)], dim=1)

    @property
    def num_edges(self) -> int:
        return self.row.numel()

    def bag_weights(self, edge_attr: Tensor) -> Tensor:
        """Each edge's coefficients on its ``bag_rows``: 1, 1, its attributes, 1."""
        ones = edge_attr.new_ones(self.num_edges, 1)
        return torch.cat([ones, ones, edge_attr, ones], dim=1)

    def receiving(self, values: Tensor) -> Tensor:
        """Per-edge copy of the receiving node's row. (``index_select``, not ``values[row]``: its
        backward is an ``index_add``, several times faster on a CPU than advanced indexing's.)"""
        return values.index_select(0, self.row)

    def sending(self, values: Tensor) -> Tensor:
        return values.index_select(0, self.col)

    def aggregate(self, messages: Tensor, normalization_factor: float) -> Tensor:
        """Sum of messages per receiving node, [B * N, C], divided by a fixed factor (EDM's 'sum')."""
        out = messages.new_zeros(self.num_nodes, messages.shape[-1])
        return out.index_add_(0, self.row, messages, alpha=1.0 / normalization_factor)


def _pair_linear(layer: nn.Linear, h: Tensor, edges: EdgeIndex, edge_attr: Tensor) -> Tensor:
    """``layer(cat[h_i, h_j, edge_attr])`` for every edge, computed through the nodes.

    By linearity the output is W_recv h_i + W_send h_j + W_attr a_ij + b, so the large weight
    blocks multiply the nodes once instead of every edge. Two equivalent ways to add per edge:
    without gradients one weighted ``embedding_bag`` sums each edge's rows of the table
    [W_recv h | W_send h (interleaved per node); rows of W_attr; b] in a single pass (about twice
    as fast as gathers); with gradients, two gathers and a product are faster, because the bag's
    backward is slow on a CPU.
    """
    f_in, f_out = h.shape[-1], layer.out_features
    w = layer.weight
    w_recv, w_send, w_attr = w[:, :f_in], w[:, f_in : 2 * f_in], w[:, 2 * f_in :]
    if torch.is_grad_enabled():
        per_edge = edges.receiving(torch.addmm(layer.bias, h, w_recv.T))
        per_edge += edges.sending(h @ w_send.T)  # in place: neither term is needed by the backward
        return per_edge.addmm_(edge_attr, w_attr.T)
    node_rows = (h @ torch.cat([w_recv, w_send], dim=0).T).reshape(2 * h.shape[0], f_out)
    table = torch.cat([node_rows, w_attr.T, layer.bias[None, :]], dim=0)
    return nn.functional.embedding_bag(edges.bag_rows, table, mode="sum",
                                       per_sample_weights=edges.bag_weights(edge_attr))


def _silu(values: Tensor) -> Tensor:
    """SiLU of a per-edge tensor; in place when no gradient is recorded (sampling), which saves
    writing a fresh [E, F] tensor, since the backward would need the input."""
    return nn.functional.silu(values, inplace=not torch.is_grad_enabled())


class GraphConvolution(nn.Module):
    """Invariant message passing: m_ij = MLP(h_i, h_j, d_ij) * gate_ij; h_i += MLP(h_i, sum_j m_ij)."""

    def __init__(self, hidden_nf: int, edge_nf: int, normalization_factor: float, attention: bool):
        super().__init__()
        self.normalization_factor = normalization_factor
        self.edge_in = nn.Linear(2 * hidden_nf + edge_nf, hidden_nf)
        self.edge_out = nn.Linear(hidden_nf, hidden_nf)
        self.node_mlp = nn.Sequential(
            nn.Linear(2 * hidden_nf, hidden_nf), nn.SiLU(), nn.Linear(hidden_nf, hidden_nf)
        )
        self.gate = nn.Sequential(nn.Linear(hidden_nf, 1), nn.Sigmoid()) if attention else None

    def forward(self, h: Tensor, edges: EdgeIndex, edge_attr: Tensor, node_mask: Tensor) -> Tensor:
        m = _silu(self.edge_out(_silu(_pair_linear(self.edge_in, h, edges, edge_attr))))
        if self.gate is not None:
            m = m * self.gate(m)
        agg = edges.aggregate(m, self.normalization_factor)
        return (h + self.node_mlp(torch.cat([h, agg], dim=-1))) * node_mask


class CoordinateUpdate(nn.Module):
    """Equivariant update x_i += sum_j unit(x_i - x_j) * tanh(phi(h_i, h_j, d_ij)) * range."""

    def __init__(self, hidden_nf: int, edge_nf: int, normalization_factor: float, tanh: bool,
                 coords_range: float):
        super().__init__()
        self.normalization_factor = normalization_factor
        self.tanh = tanh
        self.coords_range = coords_range
        self.edge_in = nn.Linear(2 * hidden_nf + edge_nf, hidden_nf)
        self.hidden = nn.Linear(hidden_nf, hidden_nf)
        self.out = nn.Linear(hidden_nf, 1, bias=False)
        nn.init.xavier_uniform_(self.out.weight, gain=0.001)  # start close to the identity map

    def forward(self, h: Tensor, x: Tensor, edges: EdgeIndex, edge_attr: Tensor, direction: Tensor,
                node_mask: Tensor) -> Tensor:
        phi = self.out(_silu(self.hidden(_silu(_pair_linear(self.edge_in, h, edges, edge_attr)))))
        if self.tanh:
            phi = torch.tanh(phi) * self.coords_range
        shift = edges.aggregate(direction * phi, self.normalization_factor)
        return (x + shift) * node_mask


class EquivariantBlock(nn.Module):
    edge_nf = 2  # edge attributes: squared distance now and at the network's input

    def __init__(self, hidden_nf: int, inv_sublayers: int, attention: bool, tanh: bool,
                 coords_range: float, norm_constant: float, normalization_factor: float):
        super().__init__()
        edge_nf = self.edge_nf
        self.norm_constant = norm_constant
        self.convolutions = nn.ModuleList(
            GraphConvolution(hidden_nf, edge_nf, normalization_factor, attention) for _ in range(inv_sublayers)
        )
        self.coordinate_update = CoordinateUpdate(hidden_nf, edge_nf, normalization_factor, tanh, coords_range)

    def forward(self, h: Tensor, x: Tensor, edges: EdgeIndex, dist0: Tensor, node_mask: Tensor):
        dist, direction = pair_geometry(x, edges, self.norm_constant)
        edge_attr = torch.cat([dist, dist0], dim=-1)
        for conv in self.convolutions:
            h = conv(h, edges, edge_attr, node_mask)
        x = self.coordinate_update(h, x, edges, edge_attr, direction, node_mask)
        return h * node_mask, x


def pair_geometry(x: Tensor, edges: EdgeIndex, norm_constant: float) -> tuple[Tensor, Tensor]:
    """Squared distances [E, 1] and directions (x_i - x_j) / (|x_i - x_j| + c) [E, 3]."""
    diff = edges.receiving(x) - edges.sending(x)
    dist2 = diff.pow(2).sum(-1, keepdim=True)
    norm = torch.sqrt(dist2 + 1e-8)
    return dist2, diff / (norm + norm_constant)


class EGNN(nn.Module):
    """Maps (h [B,N,F_in], x [B,N,3]) to (h' [B,N,F_out], x' [B,N,3]), E(3)-equivariant in x."""

    def __init__(self, in_nf: int, out_nf: int, hidden_nf: int = 64, n_layers: int = 4,
                 attention: bool = True, tanh: bool = True, coords_range: float = 15.0,
                 norm_constant: float = 1.0, normalization_factor: float = 1.0, inv_sublayers: int = 1):
        super().__init__()
        self.embedding = nn.Linear(in_nf, hidden_nf)
        self.blocks = nn.ModuleList(
            EquivariantBlock(hidden_nf, inv_sublayers, attention, tanh, coords_range / n_layers,
                             norm_constant, normalization_factor)
            for _ in range(n_layers)
        )
        self.embedding_out = nn.Linear(hidden_nf, out_nf)

    def forward(self, h: Tensor, x: Tensor, node_mask: Tensor) -> tuple[Tensor, Tensor]:
        batch, n_nodes, _ = x.shape
        edges = EdgeIndex(node_mask, edge_nf=EquivariantBlock.edge_nf)
        flat_mask = node_mask.reshape(batch * n_nodes, 1)
        h = self.embedding(h.reshape(batch * n_nodes, -1)) * flat_mask
        x = x.reshape(batch * n_nodes, 3)
        dist0, _ = pair_geometry(x, edges, 1.0)
        for block in self.blocks:
            h, x = block(h, x, edges, dist0, flat_mask)
        h = self.embedding_out(h) * flat_mask
        return h.view(batch, n_nodes, -1), x.view(batch, n_nodes, 3)


class EGNNDynamics(nn.Module):
    """EDM's noise model ``phi(x, h, t, node_mask, context) -> (eps_x, eps_h)``.

    Time (t/T in [0, 1]) and the optional context [B, C] are appended to every node's features.
    The position output is the EGNN's displacement x' - x, projected to zero centre of mass, so
    it is E(3)-equivariant; the feature output is invariant.
    """

    def __init__(self, in_node_nf: int, context_nf: int = 0, hidden_nf: int = 64, n_layers: int = 4,
                 attention: bool = True, tanh: bool = True, coords_range: float = 15.0,
                 norm_constant: float = 1.0, normalization_factor: float = 1.0, inv_sublayers: int = 1):
        super().__init__()
        self.in_node_nf = in_node_nf
        self.context_nf = context_nf
        width = in_node_nf + 1 + context_nf
        self.egnn = EGNN(width, width, hidden_nf, n_layers, attention, tanh, coords_range, norm_constant,
                         normalization_factor, inv_sublayers)

    def forward(self, x: Tensor, h: Tensor, t: Tensor, node_mask: Tensor,
                context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        batch, n_nodes, _ = x.shape
        t_nodes = t.to(x.dtype).view(batch, 1, 1).expand(batch, n_nodes, 1)
        features = [h, t_nodes]
        if self.context_nf:
            if context is None or context.shape != (batch, self.context_nf):
                got = None if context is None else tuple(context.shape)
                raise ValueError(f"this model is conditional: expected context of shape "
                                 f"({batch}, {self.context_nf}), got {got}")
            features.append(context.to(x.dtype)[:, None, :].expand(batch, n_nodes, self.context_nf))
        h_in = torch.cat(features, dim=-1) * node_mask
        h_out, x_out = self.egnn(h_in, x, node_mask)
        eps_x = remove_mean_with_mask(x_out - x, node_mask)
        eps_h = h_out[..., : self.in_node_nf] * node_mask
        return eps_x, eps_h
