"""A variance-preserving Gaussian diffusion over any state space, with a policy view of sampling.

Forward:  q(z_t | x) = N(alpha_t x, sigma_t^2 I).
Reverse:  each step t -> s (s < t) is a Gaussian *policy*
          pi(z_s | z_t, c) = N(mean, std^2 I), computed from the denoiser's noise estimate.

``step()`` returns a ``StepOutput(mean, std, log_prob, sample)`` (the diffusers-style step
result), which is what reward-driven fine-tuning needs: RGDM regresses the mean onto explored
candidates, DDPO needs log-probabilities of sampled actions.

The base class works on plain vectors ``[B, D]``; ``rgdm.diffusion.molecules`` overrides the state
space (zero-centre-of-mass positions + masked node features). A state space is four methods:
``noise`` (standard Gaussian in the space), ``project`` (onto the space), ``dof`` (its dimension
per sample) and ``count`` (number of real entries per sample).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from rgdm.diffusion.schedule import NoiseSchedule


@dataclass
class StepOutput:
    """One reverse step: the policy's Gaussian (mean, std) and the action taken from it."""

    mean: Tensor  # same shape as the state
    std: Tensor  # [B]; 0 for deterministic (DDIM eta=0) steps
    log_prob: Tensor | None  # [B] log pi(sample | z_t) over the state space; None when std == 0
    sample: Tensor  # z_s


class MixedDenoiser(nn.Module):
    """The noise estimate ``(1 - weight) · current + weight · base`` of two denoisers of one architecture.

    A reverse step's mean is affine in the noise estimate and its std does not depend on it, so a
    diffusion with this denoiser takes, at every step, the normalised geometric mixture
    pi_current^(1 - weight) · pi_base^weight of the two models' Gaussian steps. Outputs may be tensors
    or tuples of tensors (the molecule denoiser returns positions' and features' estimates).
    """

    def __init__(self, current: nn.Module, base: nn.Module, weight: float):
        super().__init__()
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"MixedDenoiser: weight must lie in [0, 1], got {weight}")
        self.current, self.base, self.weight = current, base, weight

    def forward(self, *args, **kwargs):
        current, base = self.current(*args, **kwargs), self.base(*args, **kwargs)
        if isinstance(current, tuple):
            return tuple((1.0 - self.weight) * c + self.weight * b for c, b in zip(current, base))
        return (1.0 - self.weight) * current + self.weight * base


class GaussianDiffusion(nn.Module):
    """Epsilon-prediction diffusion; ``denoiser(z_t, t/T, node_mask, context) -> eps``."""

    def __init__(self, denoiser: nn.Module, schedule: NoiseSchedule):
        super().__init__()
        self.denoiser = denoiser
        self.schedule = schedule
        # bfloat16 autocast of the denoiser's forward on CUDA. Only the network runs in bfloat16: its
        # output is cast back, so means, log-probabilities, weights and losses stay float32. No effect
        # on the CPU. Set by commands run with --device cuda.
        self.bf16_network = False

    def network_precision(self, like: Tensor) -> contextlib.AbstractContextManager:
        """The autocast context of a denoiser forward on ``like``'s device (see ``bf16_network``)."""
        if self.bf16_network and like.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @property
    def timesteps(self) -> int:
        return self.schedule.timesteps

    # ----------------------------------------------------------------------------------------- #
    # State space (plain Euclidean vectors here; molecules override these four methods).

    def noise(self, like: Tensor, node_mask: Tensor | None = None, generator=None) -> Tensor:
        return torch.randn(like.shape, dtype=like.dtype, device=like.device, generator=generator)

    def project(self, z: Tensor, node_mask: Tensor | None = None) -> Tensor:
        return z

    def dof(self, z: Tensor, node_mask: Tensor | None = None) -> Tensor:
        """Dimension of the state space per sample, [B]."""
        return torch.full((z.shape[0],), float(z[0].numel()), dtype=z.dtype, device=z.device)

    def count(self, z: Tensor, node_mask: Tensor | None = None) -> Tensor:
        """Number of real (unpadded) entries per sample, [B]; the loss averages over these."""
        return self.dof(z, node_mask)

    has_node_features = False  # whether states carry per-node features (molecules: atom types)

    def node_features_only(self, v: Tensor) -> Tensor:
        """``v`` with every entry but the node features zeroed (states with ``has_node_features``)."""
        raise ValueError(f"{type(self).__name__}: its states have no node features")

    def snap_to_data(self, x: Tensor, node_mask: Tensor | None = None) -> Tensor:
        """A generated sample as the training data would encode it (identity for continuous data).

        Objectives that train on the model's own samples (sequence-level RGDM, RWR) call this first:
        training on continuous, not-quite-one-hot features would teach the model to blur them.
        """
        return x

    # ----------------------------------------------------------------------------------------- #
    # Forward process and training loss.

    def _scale(self, values: Tensor, like: Tensor) -> Tensor:
        """Broadcast per-sample scalars [B] against a state tensor."""
        return values.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))

    def q_sample(self, x: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        return self._scale(self.schedule.alpha(t), x) * x + self._scale(self.schedule.sigma(t), x) * noise

    def predict_eps(self, z_t: Tensor, t: Tensor, node_mask: Tensor | None = None,
                    context: Tensor | None = None) -> Tensor:
        t_frac = t.to(z_t.dtype) / self.timesteps
        with self.network_precision(z_t):
            eps = self.denoiser(z_t, t_frac, node_mask, context)
        return eps.to(z_t.dtype)

    def predict_x0(self, z_t: Tensor, t: Tensor, node_mask: Tensor | None = None,
                   context: Tensor | None = None, eps: Tensor | None = None) -> Tensor:
        """Tweedie's denoised estimate E[x | z_t] = (z_t - sigma_t eps_hat) / alpha_t."""
        if eps is None:
            eps = self.predict_eps(z_t, t, node_mask, context)
        alpha, sigma = self._scale(self.schedule.alpha(t), z_t), self._scale(self.schedule.sigma(t), z_t)
        return (z_t - sigma * eps) / alpha

    def loss(self, x: Tensor, node_mask: Tensor | None = None, context: Tensor | None = None,
             t: Tensor | None = None, generator=None, noise: Tensor | None = None) -> Tensor:
        """Per-sample epsilon-prediction L2 loss, averaged over real entries, [B].

        ``t`` and ``noise`` are drawn (in that order, from ``generator``) unless given.
        """
        if t is None:
            t = torch.randint(0, self.timesteps + 1, (x.shape[0],), device=x.device, generator=generator)
        if noise is None:
            noise = self.noise(x, node_mask, generator)
        z_t = self.q_sample(x, t, noise)
        eps = self.predict_eps(z_t, t, node_mask, context)
        return self.sq_norm(eps - noise, node_mask) / self.count(x, node_mask)

    def sq_norm(self, v: Tensor, node_mask: Tensor | None = None) -> Tensor:
        """Squared norm per sample over real entries, [B] (padding is zero by construction)."""
        if node_mask is not None:
            v = v * node_mask
        return v.pow(2).flatten(1).sum(1)

    # ----------------------------------------------------------------------------------------- #
    # Reverse process: the Gaussian policy of one step.

    def step_distribution(self, z_t: Tensor, t: Tensor, s: Tensor, node_mask: Tensor | None = None,
                          context: Tensor | None = None, eta: float = 1.0,
                          eps: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Mean and std of the reverse step z_t -> z_s (DDIM's family; eta=1 is ancestral DDPM)."""
        if eps is None:
            eps = self.predict_eps(z_t, t, node_mask, context)
        a_t, s_t = self.schedule.alpha(t), self.schedule.sigma(t)
        a_s, s_s = self.schedule.alpha(s), self.schedule.sigma(s)
        x0 = (z_t - self._scale(s_t, z_t) * eps) / self._scale(a_t, z_t)
        # eta = 1 with s = t - 1 gives the DDPM posterior variance sigma_s^2 sigma_{t|s}^2 / sigma_t^2.
        std = eta * (s_s / s_t) * (1.0 - (a_t / a_s) ** 2).clamp(min=0.0).sqrt()
        direction = (s_s**2 - std**2).clamp(min=0.0).sqrt()
        mean = self._scale(a_s, z_t) * x0 + self._scale(direction, z_t) * eps
        return self.project(mean, node_mask), std.to(z_t.dtype)

    def mean_sensitivity(self, t: Tensor, s: Tensor, eta: float = 1.0) -> Tensor:
        """d mean / d eps_hat of the step t -> s, [B]: how a noise-prediction error moves the mean.

        Dividing a mean-space regression error by this factor measures it in noise-prediction units,
        the weighting of the usual "simple" denoising loss.
        """
        a_t, s_t = self.schedule.alpha(t), self.schedule.sigma(t)
        a_s, s_s = self.schedule.alpha(s), self.schedule.sigma(s)
        std = eta * (s_s / s_t) * (1.0 - (a_t / a_s) ** 2).clamp(min=0.0).sqrt()
        direction = (s_s**2 - std**2).clamp(min=0.0).sqrt()
        return (direction - a_s * s_t / a_t).abs()

    def log_prob(self, z_s: Tensor, mean: Tensor, std: Tensor, node_mask: Tensor | None = None) -> Tensor:
        """log N(z_s; mean, std^2 I) on the state space (its ``dof`` dimensions), [B]."""
        dof = self.dof(z_s, node_mask)
        var = std.to(z_s.dtype) ** 2
        return -0.5 * self.sq_norm(z_s - mean, node_mask) / var - 0.5 * dof * (torch.log(var) + math.log(2 * math.pi))

    def step(self, z_t: Tensor, t: Tensor, s: Tensor, node_mask: Tensor | None = None,
             context: Tensor | None = None, eta: float = 1.0, generator=None,
             z_s: Tensor | None = None, noise: Tensor | None = None, score: bool = True) -> StepOutput:
        """Take (or, given ``z_s``, score) one reverse step; ``noise`` replaces the draw from ``generator``.
        ``score=False`` skips the log-probability (``None``) where only the sample is used."""
        mean, std = self.step_distribution(z_t, t, s, node_mask, context, eta)
        if z_s is None:
            if noise is None:
                noise = self.noise(mean, node_mask, generator)
            z_s = mean + self._scale(std, mean) * noise
        log_prob = None
        if score and not bool((std == 0).all()):
            log_prob = self.log_prob(z_s, mean, std, node_mask)
        return StepOutput(mean=mean, std=std, log_prob=log_prob, sample=z_s)

    def time_grid(self, num_steps: int | None = None) -> list[int]:
        """Descending integer times T, ..., 0; ``num_steps < T`` gives DDIM's evenly spaced subset."""
        if num_steps is None or num_steps >= self.timesteps:
            return list(range(self.timesteps, -1, -1))
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        return sorted({int(round(v)) for v in np.linspace(0, self.timesteps, num_steps + 1)}, reverse=True)

    def sample_prior(self, shape: tuple[int, ...], node_mask: Tensor | None = None, generator=None,
                     dtype: torch.dtype = torch.float32) -> Tensor:
        device = node_mask.device if node_mask is not None else self.schedule.alphas.device
        return self.noise(torch.empty(shape, dtype=dtype, device=device), node_mask, generator)

    @torch.no_grad()
    def sample(self, shape: tuple[int, ...], node_mask: Tensor | None = None, context: Tensor | None = None,
               num_steps: int | None = None, eta: float = 1.0, generator=None,
               return_trajectory: bool = False, progress: bool = False):
        """Ancestral (eta=1, all steps) or DDIM (fewer steps, any eta) sampling of x_0."""
        z = self.sample_prior(shape, node_mask, generator)
        trajectory = [z]
        grid = self.time_grid(num_steps)
        pairs = list(zip(grid[:-1], grid[1:]))
        if progress:
            from tqdm.auto import tqdm

            pairs = tqdm(pairs, desc="sampling", leave=False)
        batch = shape[0]
        for t_int, s_int in pairs:
            t = torch.full((batch,), t_int, device=z.device, dtype=torch.long)
            s = torch.full((batch,), s_int, device=z.device, dtype=torch.long)
            z = self.step(z, t, s, node_mask, context, eta, generator, score=False).sample
            if return_trajectory:
                trajectory.append(z)
        x = self.predict_x0(z, torch.zeros(batch, dtype=torch.long, device=z.device), node_mask, context)
        x = self.project(x, node_mask)
        return (x, trajectory) if return_trajectory else x
