"""PointNet-style networks for point clouds: a diffusion denoiser and a shape classifier.

Both networks see a cloud as a *set*: every layer either acts on each point alone (shared
per-point MLPs), on each point's k nearest neighbours (a max over the neighbours), or pools over
all points with a symmetric function (max and mean). The denoiser is therefore
permutation-equivariant (permuting the input points permutes the output noise the same way) and
the classifier permutation-invariant.

Denoiser block (a PointNet with a global feature fed back, as in PointFlow's / PVD's point branch,
plus an EdgeConv-style neighbourhood feature, as DGCNN)::

    u  =  LayerNorm(h) * (1 + scale(c)) + shift(c)                        FiLM by time and class
    h  <-  h + gate(c) * MLP( W u + local_k(u) + global(max_p u, mean_p u) )

c is the embedding of the diffusion time and (for a conditional model) the class one-hot. Time
enters every block as a *scale and shift* of the normalised features (FiLM, Perez et al. 2018;
the adaptive LayerNorm of DiT), not only as an added vector: the same point feature has to mean
"move toward the surface" at low noise and "predict almost all of z_t" at high noise, which an
additive offset expresses badly (the earlier, additive network plateaued near the loss of a
Gaussian ball). The gates start at zero, so every block starts as the identity.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def sinusoidal_embedding(t_frac: Tensor, dim: int) -> Tensor:
    """[B] times in [0, 1] -> [B, dim] sin/cos features at geometric frequencies (DDPM's embedding)."""
    half = dim // 2
    frequencies = torch.exp(-math.log(10_000.0) * torch.arange(half, device=t_frac.device) / max(half - 1, 1))
    angles = 1000.0 * t_frac.float().unsqueeze(1) * frequencies.unsqueeze(0)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def masked_pool(h: Tensor, node_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Max and mean over the points of h [B, P, C] (padded points ignored), each [B, 1, C]."""
    if node_mask is None:
        return h.amax(dim=1, keepdim=True), h.mean(dim=1, keepdim=True)
    mask = node_mask.to(h.dtype)
    maximum = h.masked_fill(mask == 0, float("-inf")).amax(dim=1, keepdim=True)
    mean = (h * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
    return maximum, mean


def knn_indices(points: Tensor, k: int) -> Tensor:
    """[B, P, k] indices of the k nearest other points of every point of points [B, P, 3]."""
    distances = torch.cdist(points, points)  # [B, P, P]; once per forward, shared by every block
    k = min(k, points.shape[1] - 1)
    return distances.topk(k + 1, dim=-1, largest=False).indices[..., 1:]  # drop the point itself


def gather_neighbours(values: Tensor, neighbours: Tensor) -> Tensor:
    """values [B, P, C] of the neighbours [B, P, k] of every point -> [B, P, k, C]."""
    b, p, k = neighbours.shape
    # index_select on the flattened points: its backward (index_add) is much faster on a CPU than
    # that of advanced indexing.
    rows = (neighbours + p * torch.arange(b, device=values.device).view(-1, 1, 1)).reshape(-1)
    return values.reshape(b * p, -1).index_select(0, rows).view(b, p, k, -1)


def knn_offsets(points: Tensor, k: int) -> Tensor:
    """[B, P, k, 3] offsets x_j - x_i from every point to its k nearest other points."""
    return gather_neighbours(points, knn_indices(points, k)) - points.unsqueeze(2)


class LocalGeometry(nn.Module):
    """Per-point feature of the local neighbourhood: max over k neighbours of MLP(offset, distance).

    Like the first EdgeConv of DGCNN (Wang et al. 2019) on coordinates only. It tells the denoiser
    where the nearby surface is, which a purely global PointNet feature cannot at low noise levels.
    """

    def __init__(self, width: int, k: int, edge_width: int = 32):
        super().__init__()
        self.k = k
        # Edges are k times more numerous than points: keep their MLP narrow, widen after pooling.
        self.edge_mlp = nn.Sequential(nn.Linear(4, edge_width), nn.SiLU(), nn.Linear(edge_width, edge_width))
        self.out = nn.Linear(edge_width, width)

    def forward(self, points: Tensor, neighbours: Tensor | None = None) -> Tensor:
        if neighbours is None:
            neighbours = knn_indices(points, self.k)
        offsets = gather_neighbours(points, neighbours) - points.unsqueeze(2)
        edges = torch.cat([offsets, offsets.norm(dim=-1, keepdim=True)], dim=-1)
        return self.out(self.edge_mlp(edges).amax(dim=2))


class EdgeFeature(nn.Module):
    """max_j SiLU(A u_i + B (u_j - u_i)) over the k neighbours j of point i (one-layer EdgeConv).

    The linear maps act on points before the gather (A u_i + B (u_j - u_i) = (A - B) u_i + B u_j),
    so the k-fold tensor only sees an add, a SiLU and a max: cheap enough for every block.
    """

    def __init__(self, width: int, edge_width: int):
        super().__init__()
        self.centre = nn.Linear(width, edge_width)
        self.neighbour = nn.Linear(width, edge_width, bias=False)
        self.out = nn.Linear(edge_width, width)

    def forward(self, u: Tensor, neighbours: Tensor) -> Tensor:
        centre, neighbour = self.centre(u), self.neighbour(u)
        edges = (centre - neighbour).unsqueeze(2) + gather_neighbours(neighbour, neighbours)
        return self.out(nn.functional.silu(edges).amax(dim=2))


class FiLMBlock(nn.Module):
    """One residual block: FiLM-modulated per-point, neighbourhood and global features, gated."""

    def __init__(self, width: int, edge_width: int = 0):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.modulation = nn.Linear(width, 3 * width)  # scale, shift, gate from the condition
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)  # scale 0, shift 0, gate 0: the block starts as identity
        self.point = nn.Linear(width, width)
        self.local = EdgeFeature(width, edge_width) if edge_width else None
        self.to_global = nn.Linear(width, width)
        self.from_global = nn.Linear(2 * width, width)
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(width, width))

    def forward(self, h: Tensor, condition: Tensor, neighbours: Tensor | None, node_mask: Tensor | None) -> Tensor:
        scale, shift, gate = self.modulation(condition).unsqueeze(1).chunk(3, dim=-1)
        u = self.norm(h) * (1.0 + scale) + shift
        g_max, g_mean = masked_pool(self.to_global(u), node_mask)
        features = self.point(u) + self.from_global(torch.cat([g_max, g_mean], dim=-1))
        if self.local is not None:
            features = features + self.local(u, neighbours)
        return h + gate * self.out(features)


class PointNetDenoiser(nn.Module):
    """eps_theta(z_t, t, class) for clouds [B, P, 3]; ``num_classes = 0`` is the unconditional model.

    knn > 0 builds the graph of every point's k nearest neighbours in z_t once per call (O(P^2)
    distances, no N x N message passing) and uses it twice: :class:`LocalGeometry` of the
    coordinates at the input, and an :class:`EdgeFeature` of the features in every block
    (``edge_width`` channels on the k-fold tensor). knn = 0 is a pure PointNet.

    The output adds ``skip(c) * z_t`` to the network's prediction, a per-cloud scalar of the time and
    class: at high noise eps is almost z_t itself, which this term gives without any capacity.
    """

    def __init__(self, width: int = 128, n_blocks: int = 4, time_dim: int = 64, num_classes: int = 0,
                 knn: int = 0, edge_width: int = 32):
        super().__init__()
        for name, value, low in (("width", width, 1), ("n_blocks", n_blocks, 1), ("time_dim", time_dim, 2),
                                 ("num_classes", num_classes, 0), ("knn", knn, 0), ("edge_width", edge_width, 1)):
            if value < low:
                raise ValueError(f"PointNetDenoiser: {name} must be >= {low}, got {value}")
        self.width, self.n_blocks, self.time_dim, self.num_classes = width, n_blocks, time_dim, num_classes
        self.knn, self.edge_width = knn, edge_width
        self.embed_points = nn.Linear(3, width)
        self.local = LocalGeometry(width, knn) if knn > 0 else None
        self.embed_condition = nn.Sequential(nn.Linear(time_dim + num_classes, width), nn.SiLU(),
                                             nn.Linear(width, width), nn.SiLU())
        self.blocks = nn.ModuleList(FiLMBlock(width, edge_width if knn > 0 else 0) for _ in range(n_blocks))
        self.head_norm = nn.LayerNorm(width, elementwise_affine=False)
        self.head_modulation = nn.Linear(width, 2 * width)
        self.skip = nn.Linear(width, 1)
        self.head = nn.Sequential(nn.SiLU(), nn.Linear(width, 3))
        # Start as "predict zero noise" so early training is stable.
        for layer in (self.head_modulation, self.skip, self.head[-1]):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, z_t: Tensor, t_frac: Tensor, node_mask: Tensor | None = None,
                context: Tensor | None = None) -> Tensor:
        if node_mask is not None and self.local is not None:
            raise ValueError("the k-NN denoiser takes whole clouds: a node mask (padding) is not supported")
        condition = sinusoidal_embedding(t_frac.reshape(-1).expand(z_t.shape[0]), self.time_dim).to(z_t.dtype)
        if self.num_classes:
            if context is None or context.shape != (z_t.shape[0], self.num_classes):
                raise ValueError(f"this denoiser is class-conditional: pass a one-hot context "
                                 f"[{z_t.shape[0]}, {self.num_classes}]")
            condition = torch.cat([condition, context.to(z_t.dtype)], dim=1)
        condition = self.embed_condition(condition)
        h = self.embed_points(z_t)
        neighbours = None
        if self.local is not None:
            neighbours = knn_indices(z_t.detach(), self.knn)
            h = h + self.local(z_t, neighbours)
        for block in self.blocks:
            h = block(h, condition, neighbours, node_mask)
        scale, shift = self.head_modulation(condition).unsqueeze(1).chunk(2, dim=-1)
        eps = self.head(self.head_norm(h) * (1.0 + scale) + shift) + self.skip(condition).unsqueeze(1) * z_t
        return eps if node_mask is None else eps * node_mask

    def spec(self) -> dict[str, int]:
        return {"width": self.width, "n_blocks": self.n_blocks, "time_dim": self.time_dim,
                "num_classes": self.num_classes, "knn": self.knn, "edge_width": self.edge_width}


class PointNetClassifier(nn.Module):
    """PointNet (Qi et al. 2017, without the input transforms): per-point MLP, max-pool, MLP -> logits."""

    def __init__(self, num_classes: int, width: int = 64, class_names: tuple[str, ...] = ()):
        super().__init__()
        if class_names and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        self.num_classes, self.width = num_classes, width
        self.class_names = tuple(class_names)
        self.point_mlp = nn.Sequential(
            nn.Linear(3, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 2 * width),
        )
        self.head = nn.Sequential(nn.SiLU(), nn.Linear(2 * width, width), nn.SiLU(), nn.Linear(width, num_classes))

    def forward(self, points: Tensor) -> Tensor:
        """[B, P, 3] clouds -> [B, classes] logits.

        Each cloud is first centred and scaled to unit coordinate std (the ``shape_unit`` frame of
        the training data), so the prediction ignores position and size: generated clouds that
        come out slightly too large or small are judged by their shape alone.
        """
        if points.dim() != 3 or points.shape[-1] != 3:
            raise ValueError(f"expected clouds of shape [B, P, 3], got {list(points.shape)}")
        centred = points - points.mean(dim=1, keepdim=True)
        scale = centred.flatten(1).std(dim=1, correction=0).clamp(min=1e-6).view(-1, 1, 1)
        return self.head(self.point_mlp(centred / scale).amax(dim=1))

    def class_index(self, name: str | int) -> int:
        """Index of a class given by name (or already an index), with a clear error."""
        if isinstance(name, int) or (isinstance(name, str) and name.isdigit()):
            index = int(name)
            if not 0 <= index < self.num_classes:
                raise ValueError(f"class index {index} is outside 0..{self.num_classes - 1}")
            return index
        if name not in self.class_names:
            raise ValueError(f"unknown class {name!r}; the classifier knows {', '.join(self.class_names)}")
        return self.class_names.index(name)

    def spec(self) -> dict:
        return {"num_classes": self.num_classes, "width": self.width, "class_names": list(self.class_names)}
