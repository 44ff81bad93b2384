"""Zero-centre-of-mass helpers for masked point sets.

Positions live in the linear subspace where the mean over *real* nodes is zero; padded nodes are
held at exactly zero. Translation invariance of the model's density follows from working in this
subspace (Hoogeboom et al. 2022, EDM). Shapes: positions ``[B, N, D]``, node_mask ``[B, N, 1]``
with 1.0 for real nodes and 0.0 for padding.
"""

from __future__ import annotations

import torch
from torch import Tensor


def remove_mean_with_mask(x: Tensor, node_mask: Tensor) -> Tensor:
    """Project ``x`` onto the zero-CoM subspace over real nodes; padding stays zero."""
    n_real = node_mask.sum(dim=1, keepdim=True).clamp(min=1.0)
    mean = (x * node_mask).sum(dim=1, keepdim=True) / n_real
    return (x - mean) * node_mask


def assert_mean_zero_with_mask(x: Tensor, node_mask: Tensor, tol: float = 1e-4) -> None:
    """Raise if ``x`` leaks into padding or its CoM over real nodes is not zero."""
    leak = (x * (1.0 - node_mask)).abs().max().item() if x.numel() else 0.0
    if leak > tol:
        raise ValueError(f"positions are non-zero on padded nodes (max |x| = {leak:.3g})")
    scale = x.abs().max().item() if x.numel() else 0.0
    mean = ((x * node_mask).sum(dim=1) / node_mask.sum(dim=1).clamp(min=1.0)).abs().max().item()
    if mean > tol * max(1.0, scale):
        raise ValueError(f"centre of mass is not zero (max |mean| = {mean:.3g})")


def sample_zero_com_gaussian(size: tuple[int, ...], node_mask: Tensor, generator=None) -> Tensor:
    """Standard Gaussian projected to the zero-CoM subspace (the isotropic Gaussian there)."""
    x = torch.randn(size, device=node_mask.device, dtype=node_mask.dtype, generator=generator)
    return remove_mean_with_mask(x, node_mask)


def sample_masked_gaussian(size: tuple[int, ...], node_mask: Tensor, generator=None) -> Tensor:
    """Standard Gaussian on real nodes, zero on padding (used for node features)."""
    x = torch.randn(size, device=node_mask.device, dtype=node_mask.dtype, generator=generator)
    return x * node_mask


def zero_com_degrees_of_freedom(node_mask: Tensor, n_dims: int = 3) -> Tensor:
    """Dimension of the zero-CoM subspace per sample: (N_real - 1) * n_dims."""
    return (node_mask.sum(dim=(1, 2)) - 1.0) * n_dims
