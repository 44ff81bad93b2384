"""RGDM's step-level exploration: K candidates of one reverse step and their look-ahead values.

Candidate k of the step t -> s is drawn from N(mu_ref + delta_k, std^2) around the frozen reference's
mean, with *feasible shifts* |delta_k| <= rho·std (delta_0 = 0: the reference step itself); the value
V(z^k) of each candidate is a look-ahead under the reference (Tweedie, a short deterministic roll-out
or M stochastic continuations). The objective weights the candidates (``RGDMObjective._weights``) and
regresses its policy mean onto them; ``explore_sample`` keeps one of them per step instead.

The functions take the objective, whose configuration, frozen reference, task and reward-call count
they use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from rgdm.diffusion.gaussian import GaussianDiffusion
from rgdm.training.payoff_weights import soft_values
from rgdm.training.tasks import BatchShard, Conditions, Scores

if TYPE_CHECKING:
    from rgdm.training.rgdm import RGDMObjective

# ------------------------------------------------------------------------------------------------- #
# Feasible shifts.


def unit_directions(model: GaussianDiffusion, shard: BatchShard, repeats: int, generator=None) -> Tensor:
    """``repeats`` random unit vectors of the state space per row of ``shard`` (zero CoM and masked
    for molecules), [B * repeats, ...] with each row's vectors consecutive."""
    v = shard.noise(model, generator, repeats)
    node_mask = shard.conditions.repeat(repeats).node_mask
    return v / model.sq_norm(v, node_mask).sqrt().clamp(min=1e-12).view(-1, *([1] * (v.dim() - 1)))


@dataclass
class Exploration:
    """Candidates around one batch of states and what is needed to weight them."""

    candidates: Tensor  # [B, K, ...]
    perturbations: Tensor  # [B, K, ...]: the Gaussian part std * eps_k of each candidate
    log_proposal_ratio: Tensor  # [B, K]: log pi_ref(z^k) - log q_prop(z^k)
    values: Tensor  # [B, K] look-ahead rewards (raw), or [B, K, M] with M continuations per candidate
    valid: Tensor  # same shape as values
    reward_calls: int
    reference_mean: Tensor | None = None  # [B, ...] mu_ref of the explored step (None: the weighted mean alone)


# -- look-ahead ---------------------------------------------------------------------------- #


@torch.no_grad()
def lookahead(objective: RGDMObjective, z_s: Tensor, s_int: int, cond: Conditions, shard: BatchShard | None = None,
              repeats: int = 1, generator=None) -> tuple[Tensor, Tensor]:
    """V(z_s) of ``z_s`` (this rank's rows of ``shard``, each repeated ``repeats`` times): raw
    rewards and validity, [n] for "tweedie"/"rollout", [n, M] for M "continuation" samples.

    * ``tweedie``: the reward of the reference model's one-shot estimate of x_0 from z_s;
    * ``rollout``: the reward after a short deterministic (DDIM, eta = 0) roll-out of the reference;
    * ``continuation``: the rewards of M stochastic roll-outs of the reference from z_s to 0, whose
      mean exp(r / tau) estimates exp(V / tau) of the exact soft value without bias.
    """
    cfg, ref, n = objective.config, objective.reference, z_s.shape[0]
    if cfg.lookahead == "continuation" and s_int > 0:
        m = cfg.lookahead_samples
        cond_m = cond.repeat(m)
        z = z_s.repeat_interleave(m, dim=0)
        for a, b in zip(*continuation_pairs(objective, s_int)):
            t, s = objective._times(a, b, n * m)
            noise = (shard.noise(ref, generator, repeats * m) if shard is not None
                     else ref.noise(z, cond_m.node_mask, generator))
            z = ref.step(z, t, s, cond_m.node_mask, cond_m.context, eta=cfg.eta, noise=noise, score=False).sample
        scores = reference_score(objective, z, cond_m)
        return scores.values.view(n, m), scores.valid.view(n, m)
    if cfg.lookahead == "rollout" and s_int > 0:
        z = z_s
        for a, b in zip(*continuation_pairs(objective, s_int)):
            t, s = objective._times(a, b, n)
            z = ref.step(z, t, s, cond.node_mask, cond.context, eta=0.0, score=False).sample
        scores = reference_score(objective, z, cond)
    else:
        scores = reference_score(objective, z_s, cond, t_int=s_int)
    return scores.values, scores.valid


def continuation_pairs(objective: RGDMObjective, s_int: int) -> tuple[list[int], list[int]]:
    """The (from, to) times of a look-ahead roll-out from s to 0: ``lookahead_steps`` even steps, or
    (0) the roll-outs' own time grid, whose reference chain the soft value is exactly defined on."""
    if objective.config.lookahead_steps == 0:
        steps = [t for t in objective._grid(objective.reference) if t <= s_int]
    else:
        steps = sorted({round(v) for v in torch.linspace(0, s_int, objective.config.lookahead_steps + 1).tolist()},
                       reverse=True)
    return steps[:-1], steps[1:]


def reference_score(objective: RGDMObjective, z: Tensor, cond: Conditions, t_int: int = 0) -> Scores:
    """The reward of the reference model's estimate of x_0 from z at time ``t_int``."""
    ref, n = objective.reference, z.shape[0]
    x0 = ref.project(ref.predict_x0(z, torch.full((n,), t_int, dtype=torch.long, device=z.device),
                                    cond.node_mask, cond.context), cond.node_mask)
    objective._local_calls += n
    return objective.task.score(x0, cond)


# -- exploration --------------------------------------------------------------------------- #


@torch.no_grad()
def explore(objective: RGDMObjective, z_t: Tensor, t_int: int, s_int: int, shard: BatchShard,
            generator=None) -> Exploration:
    """K candidates of the step t -> s from the reference policy with feasible shifts (this rank's rows).

    With ``antithetic`` the candidates come in pairs mu_ref + delta_j ± std · eps_j: the pair's
    Gaussian parts cancel in the normaliser of the self-normalised weights, which removes the
    first-order (1/K) bias of the weighted mean of a small tilt.
    """
    cfg, ref, cond = objective.config, objective.reference, shard.conditions
    b, k = z_t.shape[0], cfg.num_candidates
    pairs = 2 if cfg.antithetic else 1
    t, s = objective._times(t_int, s_int, b)
    mean, std = ref.step_distribution(z_t, t, s, cond.node_mask, cond.context, cfg.eta)
    radius = cfg.radius * radius_unit(objective, mean, std, cond)  # [B]
    shifts = feasible_shifts(objective, mean, std, radius, s_int, shard, k // pairs, generator)  # [B, K / pairs, ...]
    shifts = shifts.repeat_interleave(pairs, dim=1)  # shift 0 (the reference step) leads
    cond_k = cond.repeat(k)
    flat = lambda v: v.reshape(b * k, *v.shape[2:])  # noqa: E731
    mean_k = mean.unsqueeze(1).expand(b, k, *mean.shape[1:])
    std_k = std.repeat_interleave(k).view(-1, *([1] * (mean.dim() - 1)))
    noise = shard.noise(ref, generator, repeats=k // pairs)
    if cfg.antithetic:
        half = noise.view(b, k // 2, *noise.shape[1:])
        noise = torch.stack([half, -half], dim=2).reshape(b * k, *noise.shape[1:])
    candidates = ref.project(flat(mean_k + shifts) + std_k * noise, cond_k.node_mask)
    log_ratio = objective._log_proposal_ratio(candidates.view(b, k, *mean.shape[1:]), mean, shifts, std,
                                              cond.node_mask)
    values, valid = lookahead(objective, candidates, s_int, cond_k, shard, k, generator)
    perturbations = (std_k * noise).view(b, k, *mean.shape[1:])
    return Exploration(candidates.view(b, k, *mean.shape[1:]), perturbations, log_ratio,
                       values.view(b, k, *values.shape[1:]), valid.view(b, k, *valid.shape[1:]),
                       values.numel(), mean)


def radius_unit(objective: RGDMObjective, mean: Tensor, std: Tensor, cond: Conditions) -> Tensor:
    """The unit of the exploration radius per row: the step std, its norm over the state space
    (std * sqrt(dof), the typical length of the step's noise), or 1."""
    if objective.config.radius_units == "std":
        return std
    if objective.config.radius_units == "noise_norm":
        return std * objective.reference.dof(mean, cond.node_mask).sqrt()
    return torch.ones_like(std)


def feasible_shifts(objective: RGDMObjective, mean: Tensor, std: Tensor, radius: Tensor, s_int: int,
                    shard: BatchShard, k: int, generator=None) -> Tensor:
    """``k`` shifts per row, the first one zero (the reference step itself), [B, k, ...]."""
    cfg, ref, cond = objective.config, objective.reference, shard.conditions
    b = mean.shape[0]
    shape = (b, k, *mean.shape[1:])
    if cfg.shift == "none" or k == 1:
        return torch.zeros(shape, dtype=mean.dtype, device=mean.device)
    rad = radius.view(b, 1, *([1] * (mean.dim() - 1)))
    n_dirs = k - 1 if cfg.shift == "random" else cfg.num_probes
    cond_d = cond.repeat(n_dirs)
    directions = unit_directions(ref, shard, n_dirs, generator).view(b, n_dirs, *mean.shape[1:])
    if cfg.shift == "random":
        chosen = directions
    else:
        probes = ref.project((mean.unsqueeze(1) + rad * directions).reshape(b * n_dirs, *mean.shape[1:]),
                             cond_d.node_mask)
        probe_values = point_values(objective, probes, s_int, cond_d, shard, n_dirs, generator).view(b, n_dirs)
        if cfg.shift == "best_probe":
            top = probe_values.topk(k - 1, dim=1).indices
            chosen = torch.stack([directions[i, top[i]] for i in range(b)])
        else:  # finite_difference: the tilt std^2 * grad V / tau, estimated along the probes
            base = point_values(objective, mean, s_int, cond, shard, 1, generator)
            probe_v = objective._scaled(probe_values, cond.targets)
            base_v = objective._scaled(base[:, None], cond.targets)
            slope = (probe_v - base_v) / radius.clamp(min=1e-12)[:, None]
            # Unit probe directions in a space of dimension dof: E[u u^T] = I / dof.
            dof = ref.dof(mean, cond.node_mask).view(b, 1)
            grad = ((slope * dof / n_dirs).view(b, n_dirs, *([1] * (mean.dim() - 1))) * directions).sum(1)
            tilt = grad * (std**2 / objective._tau_for_shift()).view(b, *([1] * (mean.dim() - 1)))
            jitter = unit_directions(ref, shard, k - 1, generator).view(b, k - 1, *mean.shape[1:])
            shifts = tilt.unsqueeze(1) + cfg.fd_jitter * rad * jitter
            norms = ref.sq_norm(shifts.reshape(b * (k - 1), *mean.shape[1:]),
                                cond.repeat(k - 1).node_mask).sqrt().view(b, k - 1, *([1] * (mean.dim() - 1)))
            shifts = shifts * torch.clamp(rad / norms.clamp(min=1e-12), max=1.0)  # stay feasible
            zero = torch.zeros((b, 1, *mean.shape[1:]), dtype=mean.dtype, device=mean.device)
            return torch.cat([zero, shifts], dim=1)
    zero = torch.zeros((b, 1, *mean.shape[1:]), dtype=mean.dtype, device=mean.device)
    return torch.cat([zero, rad * chosen], dim=1)


def point_values(objective: RGDMObjective, z_s: Tensor, s_int: int, cond: Conditions, shard: BatchShard,
                 repeats: int, generator=None) -> Tensor:
    """One raw value per state (the soft value of M continuations in raw units), for choosing shifts."""
    values, _ = lookahead(objective, z_s, s_int, cond, shard, repeats, generator)
    if values.dim() == 1:
        return values
    return soft_values(values, objective.config.tau)
