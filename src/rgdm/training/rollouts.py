"""Roll-outs of a diffusion sampler: the trajectories every reward-driven objective learns from.

One function, ``collect_trajectories``, samples a batch along a time grid and records the states,
the log-probability of every step and, given a frozen reference model, the same steps under the
reference. RGDM, DDPO and RWR all roll out through it. It takes a ``BatchShard``: in a
data-parallel run each rank rolls out its rows of the global batch with noise drawn for the global
batch, so the union of the ranks' trajectories is exactly the single-process batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rgdm.diffusion.gaussian import GaussianDiffusion
from rgdm.training.tasks import BatchShard, Conditions, Scores


@dataclass
class Trajectories:
    """Roll-outs of a sampler along a time grid, with what reward-driven objectives need."""

    conditions: Conditions
    grid: list[int]  # descending times T, ..., 0 of the states
    states: Tensor  # [S + 1, B, ...]: states[k] is z at grid[k]; states[k + 1] is the action taken there
    log_probs: Tensor  # [S, B] log pi(states[k + 1] | states[k]) of the sampling policy (nats; 0 if deterministic)
    x0: Tensor  # [B, ...] denoised final samples (what the reward scores)
    reference_log_probs: Tensor | None = None  # [S, B] the same actions under the reference policy
    kl: Tensor | None = None  # [S, B] KL(pi || pi_ref) at each visited state (nats)

    @property
    def log_ratio_to_reference(self) -> Tensor:
        """log pi_ref(trajectory) - log pi(trajectory), [B]."""
        return self.log_ratio()

    def log_ratio(self, skip_final_step: bool = False) -> Tensor:
        """log pi_ref - log pi of the trajectories' steps, [B]; ``skip_final_step`` leaves out the last
        step into t = 0, whose std is the data's precision (see ``RGDMConfig.final_step_in_ratio``)."""
        if self.reference_log_probs is None:
            raise ValueError("these trajectories were collected without a reference policy")
        per_step = self.reference_log_probs - self.log_probs
        if skip_final_step and self.grid[-1] == 0 and len(per_step) > 1:
            per_step = per_step[:-1]
        return per_step.sum(0)


def step_times(t_int: int, s_int: int, n: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """The times t and s of one reverse step for ``n`` rows, as long tensors on ``device``."""
    return (torch.full((n,), t_int, dtype=torch.long, device=device),
            torch.full((n,), s_int, dtype=torch.long, device=device))


def gaussian_kl(model: GaussianDiffusion, mean: Tensor, reference_mean: Tensor, std: Tensor,
                node_mask: Tensor | None = None) -> Tensor:
    """KL(N(mean, std^2 I) || N(reference_mean, std^2 I)) over the state space, [B]."""
    return 0.5 * model.sq_norm(mean - reference_mean, node_mask) / std**2


def first_step_kl(model: GaussianDiffusion, reference: GaussianDiffusion, shard: BatchShard, generator,
                  grid: list[int], eta: float) -> Tensor:
    """This rank's share of the exact KL(pi_theta || pi_ref) per dimension of the first reverse step
    grid[0] = T -> grid[1], on fresh draws z_T of the prior (no roll-out, no reward call).

    That step turns a noise-prediction error into a mean error alpha_s / alpha_T times larger (about 21
    on qm9-noh-small's 30-step grid, at most 1.4 at every later step), far more than its own std. A loss
    in noise-prediction units barely sees a drift there, yet it throws the atoms apart and every later
    step then sees states it was never trained on. The exact KL, |mean - mean_ref|^2 / (2 std^2), prices
    the drift by what it does to the chain (docs/physics.md).
    """
    cond = shard.conditions
    z_T = shard.noise(model, generator)
    t, s = step_times(grid[0], grid[1], cond.batch_size, z_T.device)
    mean, std = model.step_distribution(z_T, t, s, cond.node_mask, cond.context, eta)
    with torch.no_grad():
        reference_mean, _ = reference.step_distribution(z_T, t, s, cond.node_mask, cond.context, eta)
    kl = gaussian_kl(model, mean, reference_mean, std, cond.node_mask) / model.dof(mean, cond.node_mask)
    return kl.sum() / shard.global_size


@torch.no_grad()
def collect_trajectories(model: GaussianDiffusion, batch: BatchShard | Conditions, grid: list[int], eta: float,
                         generator: torch.Generator | None = None, reference: GaussianDiffusion | None = None,
                         stochastic: bool = True) -> Trajectories:
    """Sample the trajectories of ``batch`` (a shard, or whole conditions); with ``reference``, also
    score them under it. ``stochastic`` refuses deterministic steps (policy gradients need a std)."""
    shard = batch if isinstance(batch, BatchShard) else BatchShard(batch, 0, batch.batch_size)
    cond = shard.conditions
    n, mask, context = cond.batch_size, cond.node_mask, cond.context
    z = shard.noise(model, generator)
    device = z.device
    states, log_probs, reference_log_probs, kls = [z], [], [], []
    for t_int, s_int in zip(grid[:-1], grid[1:]):
        t, s = step_times(t_int, s_int, n, device)
        out = model.step(z, t, s, mask, context, eta=eta, noise=shard.noise(model, generator))
        if out.log_prob is None and stochastic:
            raise ValueError(f"the step {t_int} -> {s_int} is deterministic (eta = {eta}): policy-gradient "
                             "methods need a stochastic sampler, eta > 0")
        log_probs.append(out.log_prob if out.log_prob is not None else torch.zeros(n, device=device))
        if reference is not None:
            reference_mean, reference_std = reference.step_distribution(z, t, s, mask, context, eta)
            reference_log_probs.append(reference.log_prob(out.sample, reference_mean, reference_std, mask))
            kls.append(gaussian_kl(model, out.mean, reference_mean, out.std, mask))
        z = out.sample
        states.append(z)
    x0 = model.project(model.predict_x0(z, step_times(0, 0, n, device)[0], mask, context), mask)
    stack = lambda values: torch.stack(values) if values else None  # noqa: E731
    return Trajectories(cond, list(grid), torch.stack(states), torch.stack(log_probs), x0,
                        stack(reference_log_probs), stack(kls))


def weighted_denoising_loss(model: GaussianDiffusion, x0: Tensor, shard: BatchShard, weights: Tensor,
                            repeats: int, generator: torch.Generator | None = None, t_max: float = 1.0) -> Tensor:
    """Σ_i w_i · (denoising loss of sample i, averaged over ``repeats`` noise levels) over this rank's
    rows: the weighted maximum-likelihood fit of sequence-level RGDM and RWR. ``weights`` are the
    rank's slice of weights normalised over the global batch, so the ranks' losses sum to the global
    one; noise levels (uniform on t <= ``t_max`` · T) and noise are drawn for the global batch."""
    cond = shard.conditions
    losses = []
    for _ in range(repeats):
        t = noise_levels(model, shard.global_size, t_max, generator, x0.device)
        noise = shard.noise(model, generator)
        losses.append(model.loss(x0, cond.node_mask, cond.context, t=shard.local(t), noise=noise))
    return (torch.stack(losses).mean(0) * weights).sum()


def noise_levels(model: GaussianDiffusion, n: int, t_max: float, generator, device) -> Tensor:
    """``n`` integer noise levels drawn uniformly from 0 .. round(``t_max`` · T)."""
    high = max(1, round(t_max * model.timesteps))
    return torch.randint(0, high + 1, (n,), generator=generator, device=device)


def reward_metrics(final: Scores) -> dict[str, float]:
    """Reward statistics of a batch of final samples, logged by every reward-driven objective."""
    values = final.values
    out = {"reward_mean": values.mean().item(), "reward_median": values.median().item(),
           "reward_max": values.max().item(), "invalid_fraction": 1.0 - final.valid.float().mean().item()}
    if final.property is not None and torch.isfinite(final.property).any():
        out["property_mean"] = final.property[torch.isfinite(final.property)].mean().item()
    return out


def draw_sorted(n: int, k: int, generator: torch.Generator) -> list[int]:
    """``min(k, n)`` of the indices 0..n-1 drawn uniformly without replacement, in increasing order
    (which random steps of a roll-out, or batches of a pool, a loss uses)."""
    picks = torch.randperm(n, generator=generator, device=generator.device)[: min(k, n)]
    return picks.sort().values.tolist()
