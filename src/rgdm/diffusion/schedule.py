"""Variance-preserving noise schedules, stored as buffers.

A schedule gives, for integer time t in {0..T}, the signal scale alpha_t and noise scale sigma_t
of q(z_t | x) = N(alpha_t x, sigma_t^2 I) with alpha_t^2 + sigma_t^2 = 1. EDM parameterises both
through gamma_t = log(sigma_t^2 / alpha_t^2); we keep alpha and sigma in float64 buffers so that
``state_dict`` carries the schedule and devices follow the module.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn


def polynomial_alphas2(timesteps: int, power: float = 2.0, precision: float = 1e-5) -> np.ndarray:
    """EDM's ``polynomial_2`` schedule: alpha_t^2 = (1 - (t/T)^power)^2, clipped and rescaled."""
    t = np.linspace(0, timesteps, timesteps + 1) / timesteps
    alphas2 = (1.0 - t**power) ** 2
    alphas2 = _clip_step_ratios(alphas2)
    # alpha_0^2 = 1 - 2 * precision keeps the data term of the likelihood finite.
    return (1.0 - 2.0 * precision) * alphas2 + precision


def cosine_alphas2(timesteps: int, s: float = 0.008) -> np.ndarray:
    """Nichol & Dhariwal's cosine schedule, as EDM implements it (betas clipped at 0.999)."""
    steps = timesteps + 2
    x = np.linspace(0, steps, steps)
    alphas_cumprod = np.cos(((x / steps) + s) / (1 + s) * math.pi * 0.5) ** 2
    alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
    betas = np.clip(1.0 - alphas_cumprod[1:] / alphas_cumprod[:-1], 0.0, 0.999)
    return np.cumprod(1.0 - betas)[: timesteps + 1]


def _clip_step_ratios(alphas2: np.ndarray, clip_value: float = 0.001) -> np.ndarray:
    """Keep every step ratio alpha_t^2 / alpha_{t-1}^2 >= clip_value for a stable sampler."""
    alphas2 = np.concatenate([np.ones(1), alphas2], axis=0)
    step = np.clip(alphas2[1:] / alphas2[:-1], a_min=clip_value, a_max=1.0)
    return np.cumprod(step, axis=0)


class NoiseSchedule(nn.Module):
    """alpha_t, sigma_t for t = 0..T, indexed by integer time tensors."""

    def __init__(self, timesteps: int, kind: str = "polynomial_2", precision: float = 1e-5):
        super().__init__()
        if kind == "polynomial_2":
            alphas2 = polynomial_alphas2(timesteps, 2.0, precision)
        elif kind == "cosine":
            alphas2 = cosine_alphas2(timesteps)
        else:
            raise ValueError(f"unknown noise schedule {kind!r} (use 'polynomial_2' or 'cosine')")
        alphas2 = torch.as_tensor(alphas2, dtype=torch.float64)
        self.timesteps = timesteps
        self.kind = kind
        self.register_buffer("alphas", alphas2.sqrt(), persistent=False)
        self.register_buffer("sigmas", (1.0 - alphas2).sqrt(), persistent=False)

    def alpha(self, t: Tensor) -> Tensor:
        return self.alphas[t.long()]

    def sigma(self, t: Tensor) -> Tensor:
        return self.sigmas[t.long()]

    def config(self) -> dict:
        return {"timesteps": self.timesteps, "kind": self.kind}


class ConstantSchedule(NoiseSchedule):
    """A variance-preserving schedule given directly by its alphas (used by analytic tests)."""

    def __init__(self, alphas: Tensor):
        nn.Module.__init__(self)
        alphas = torch.as_tensor(alphas, dtype=torch.float64)
        self.timesteps = len(alphas) - 1
        self.kind = "given"
        self.register_buffer("alphas", alphas, persistent=False)
        self.register_buffer("sigmas", (1.0 - alphas**2).sqrt(), persistent=False)


def linear_beta_alphas(timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """sqrt(alpha-bar) of DDPM's linear beta schedule, with alpha_0 = 1 (t=0 is the data)."""
    betas = torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)
    return torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1.0 - betas, 0).sqrt()])
