"""PointNet-style networks for point clouds: a diffusion denoiser and a shape classifier.

Both networks see a cloud as a *set*: every layer either acts on each point alone (shared
per-point MLPs) or pools over all points with a symmetric function (max and mean). The denoiser is
therefore permutation-equivariant (permuting the input points permutes the output noise the same
way) and the classifier permutation-invariant. The cost is linear in the number of points
(no N x N message passing), so 2048-point clouds run on a CPU.

Denoiser block (PointNet with a global feature fed back, as in PointFlow's / PVD's point branch)::

    h  <-  h + MLP( [ h | max_p(W h) | mean_p(W h) ] + embed(t, class) )

with a sinusoidal embedding of the diffusion time and an optional class one-hot as context.
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


class GlobalContextBlock(nn.Module):
    """One residual PointNet block: per-point features plus pooled global features and the condition."""

    def __init__(self, width: int):
        super().__init__()
        self.to_global = nn.Linear(width, width)
        self.mix = nn.Linear(3 * width, width)
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(width, width))
        self.norm = nn.LayerNorm(width)

    def forward(self, h: Tensor, condition: Tensor, node_mask: Tensor | None) -> Tensor:
        g_max, g_mean = masked_pool(self.to_global(self.norm(h)), node_mask)
        features = torch.cat([h, g_max.expand_as(h), g_mean.expand_as(h)], dim=-1)
        return h + self.out(self.mix(features) + condition.unsqueeze(1))


def knn_offsets(points: Tensor, k: int) -> Tensor:
    """[B, P, k, 3] offsets x_j - x_i from every point to its k nearest other points."""
    distances = torch.cdist(points, points)  # [B, P, P]; linear memory per cloud pair row, no messages
    k = min(k, points.shape[1] - 1)
    neighbours = distances.topk(k + 1, dim=-1, largest=False).indices[..., 1:]  # drop the point itself
    batch = torch.arange(points.shape[0], device=points.device).view(-1, 1, 1)
    return points[batch, neighbours] - points.unsqueeze(2)


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

    def forward(self, points: Tensor) -> Tensor:
        offsets = knn_offsets(points, self.k)
        edges = torch.cat([offsets, offsets.norm(dim=-1, keepdim=True)], dim=-1)
        return self.out(self.edge_mlp(edges).amax(dim=2))


class PointNetDenoiser(nn.Module):
    """eps_theta(z_t, t, class) for clouds [B, P, 3]; ``num_classes = 0`` is the unconditional model.

    knn > 0 adds :class:`LocalGeometry` over the k nearest neighbours to the input embedding
    (O(P^2) distances once per call, but no N x N message passing); knn = 0 is a pure PointNet.
    """

    def __init__(self, width: int = 128, n_blocks: int = 4, time_dim: int = 32, num_classes: int = 0,
                 knn: int = 0):
        super().__init__()
        self.width, self.n_blocks, self.time_dim, self.num_classes = width, n_blocks, time_dim, num_classes
        self.knn = knn
        self.embed_points = nn.Linear(3, width)
        self.local = LocalGeometry(width, knn) if knn > 0 else None
        self.embed_condition = nn.Sequential(nn.Linear(time_dim + num_classes, width), nn.SiLU(),
                                             nn.Linear(width, width))
        self.blocks = nn.ModuleList(GlobalContextBlock(width) for _ in range(n_blocks))
        self.head = nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, 3))
        # Start as "predict zero noise" so early training is stable.
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, z_t: Tensor, t_frac: Tensor, node_mask: Tensor | None = None,
                context: Tensor | None = None) -> Tensor:
        condition = sinusoidal_embedding(t_frac.reshape(-1).expand(z_t.shape[0]), self.time_dim).to(z_t.dtype)
        if self.num_classes:
            if context is None or context.shape != (z_t.shape[0], self.num_classes):
                raise ValueError(f"this denoiser is class-conditional: pass a one-hot context "
                                 f"[{z_t.shape[0]}, {self.num_classes}]")
            condition = torch.cat([condition, context.to(z_t.dtype)], dim=1)
        condition = self.embed_condition(condition)
        h = self.embed_points(z_t)
        if self.local is not None:
            h = h + self.local(z_t)
        for block in self.blocks:
            h = block(h, condition, node_mask)
        eps = self.head(h)
        return eps if node_mask is None else eps * node_mask

    def spec(self) -> dict[str, int]:
        return {"width": self.width, "n_blocks": self.n_blocks, "time_dim": self.time_dim,
                "num_classes": self.num_classes, "knn": self.knn}


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
