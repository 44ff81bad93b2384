"""Gaussian diffusion over point clouds [B, P, 3], unconditional or conditioned on a shape class.

State space: **zero-mean clouds**. Every state, noise draw and sample has its centroid at the
origin (P - 1 free points times 3 coordinates = 3(P - 1) degrees of freedom), exactly as molecules
live in the zero-centre-of-mass subspace. Why: the training clouds are centred (``shape_unit``
normalisation), so the centroid carries no information; removing it keeps the state space the same
as for molecules (the RGDM exploration shifts and log-probabilities are then taken in the subspace
that the data occupy) and a translation of the whole cloud never costs model capacity.

Class conditioning: a conditional model's context is the one-hot vector of the class;
:meth:`PointCloudDiffusion.context_for` builds it from class names or label indices.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from rgdm.diffusion.gaussian import GaussianDiffusion
from rgdm.diffusion.schedule import NoiseSchedule
from rgdm.models.pointnet import PointNetDenoiser


def remove_cloud_mean(z: Tensor) -> Tensor:
    """Each cloud of z [B, P, 3] shifted so that its points average to the origin."""
    return z - z.mean(dim=1, keepdim=True)


class PointCloudDiffusion(GaussianDiffusion):
    """Diffusion of fixed-size, zero-mean clouds of ``num_points`` points (no padding, no node mask)."""

    def __init__(self, denoiser: PointNetDenoiser, schedule: NoiseSchedule, num_points: int,
                 class_names: Sequence[str] = (), conditional: bool = False):
        super().__init__(denoiser, schedule)
        if conditional and denoiser.num_classes != len(class_names):
            raise ValueError(f"a conditional model needs one class name per context entry "
                             f"({denoiser.num_classes}), got {len(class_names)}")
        if not conditional and denoiser.num_classes:
            raise ValueError("an unconditional model needs a denoiser without class inputs (num_classes = 0)")
        self.num_points = int(num_points)
        self.class_names = tuple(class_names)
        self.conditional = conditional

    # State space: zero-mean clouds. ---------------------------------------------------------- #

    def noise(self, like: Tensor, node_mask: Tensor | None = None, generator=None) -> Tensor:
        """Standard Gaussian in the zero-mean subspace (an isotropic draw, projected)."""
        draw = torch.randn(like.shape, dtype=like.dtype, device=like.device, generator=generator)
        return remove_cloud_mean(draw)

    def project(self, z: Tensor, node_mask: Tensor | None = None) -> Tensor:
        return remove_cloud_mean(z)

    def dof(self, z: Tensor, node_mask: Tensor | None = None) -> Tensor:
        return torch.full((z.shape[0],), 3.0 * (z.shape[1] - 1), dtype=z.dtype, device=z.device)

    def count(self, z: Tensor, node_mask: Tensor | None = None) -> Tensor:
        return torch.full((z.shape[0],), 3.0 * z.shape[1], dtype=z.dtype, device=z.device)

    def predict_eps(self, z_t: Tensor, t: Tensor, node_mask: Tensor | None = None,
                    context: Tensor | None = None) -> Tensor:
        # The network's output is projected too: only its zero-mean part can be noise.
        return remove_cloud_mean(super().predict_eps(z_t, t, node_mask, context))

    # Conditioning. ------------------------------------------------------------------------ #

    def context_for(self, classes: Sequence[str | int] | Tensor) -> Tensor | None:
        """One-hot context [B, C] for class names or label indices, on the model's device; None for an
        unconditional model."""
        if not self.conditional:
            return None
        if isinstance(classes, Tensor):
            indices = classes.long()
        else:
            indices = torch.tensor([self.class_index(c) for c in classes], dtype=torch.long)
        return torch.nn.functional.one_hot(indices, len(self.class_names)).float().to(self.schedule.alphas.device)

    def class_index(self, name: str | int) -> int:
        if isinstance(name, int):
            if not 0 <= name < len(self.class_names):
                raise ValueError(f"class index {name} is outside 0..{len(self.class_names) - 1}")
            return name
        if name not in self.class_names:
            raise ValueError(f"unknown class {name!r}; the model knows {', '.join(self.class_names)}")
        return self.class_names.index(name)

    def generate(self, n: int, classes: Sequence[str | int] | None = None, num_steps: int | None = None,
                 generator: torch.Generator | None = None, batch_size: int = 64) -> Tensor:
        """n clouds [n, P, 3] (for a conditional model, of ``classes``: one entry or one per cloud)."""
        if self.conditional and classes is None:
            raise ValueError(f"this model is class-conditional: name a class ({', '.join(self.class_names)})")
        if classes is not None and len(classes) == 1:
            classes = list(classes) * n
        if classes is not None and len(classes) != n:
            raise ValueError(f"got {len(classes)} classes for {n} clouds")
        chunks = []
        for start in range(0, n, batch_size):
            size = min(batch_size, n - start)
            context = None if classes is None else self.context_for(list(classes[start:start + size]))
            chunks.append(self.sample((size, self.num_points, 3), None, context, num_steps, generator=generator))
        return torch.cat(chunks)
