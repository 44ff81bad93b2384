"""The analytic test bed of DESIGN §2: data x ~ N(0, I_d) and its exact denoiser.

For a variance-preserving schedule, z_t = alpha_t x + sigma_t eps ~ N(0, I), so the optimal noise
prediction is E[eps | z_t] = sigma_t z_t and Tweedie's estimate is x_hat = alpha_t z_t. A learnable
per-time offset c[t] (initialised to zero) lets a fine-tuned policy shift every reverse-step mean,
which is exactly the family the pay-off distribution of a linear reward lives in: with r(x) = a^T x
the tilted target is N(a / tau, I). The offset is piecewise linear in t over a few knots, so that
every reverse step learns from exploration at nearby steps.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rgdm.diffusion.gaussian import GaussianDiffusion
from rgdm.diffusion.schedule import ConstantSchedule, NoiseSchedule, cosine_alphas2


class StandardGaussianDenoiser(nn.Module):
    """eps_hat(z, t) = sigma_t z + offset(t); exact for N(0, I) data when the offset is zero."""

    def __init__(self, dim: int, schedule: NoiseSchedule, knots: int = 21):
        super().__init__()
        self.schedule = schedule
        self.knots = nn.Parameter(torch.zeros(knots, dim))

    def offset(self, t_frac: Tensor) -> Tensor:
        position = t_frac.clamp(0, 1) * (len(self.knots) - 1)
        left = position.floor().long().clamp(max=len(self.knots) - 2)
        frac = (position - left).unsqueeze(-1)
        return (1 - frac) * self.knots[left] + frac * self.knots[left + 1]

    def forward(self, z: Tensor, t_frac: Tensor, node_mask=None, context=None) -> Tensor:
        t = (t_frac * self.schedule.timesteps).round().long()
        return self.schedule.sigma(t).to(z.dtype).unsqueeze(-1) * z + self.offset(t_frac).to(z.dtype)


def standard_gaussian_diffusion(dim: int, timesteps: int = 200) -> GaussianDiffusion:
    """Exact diffusion model of N(0, I_dim) on a cosine schedule with ``timesteps`` steps."""
    schedule = ConstantSchedule(torch.as_tensor(cosine_alphas2(timesteps)).sqrt())
    return GaussianDiffusion(StandardGaussianDenoiser(dim, schedule), schedule)
