"""RGDM's sequence level: whole samples weighted towards the pay-off, and the loss that fits them.

The sequence-level variant weights whole trajectories of the current model by
exp(r(x_0)/tau) · pi_ref(trajectory) / pi_theta(trajectory), self-normalised over the batch and
truncated relative to it (Ionides 2008), and fits them: by the weighted denoising loss on their x_0
(``sequence_loss: denoising``, the default) or by their weighted path log-likelihood (``path``, for
which the pay-off is an exact fixed point; docs/rgdm.md says when each one wins).

The functions take the objective, whose configuration, frozen reference, reward normaliser and pool
of scored roll-outs they use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from rgdm.diffusion.gaussian import GaussianDiffusion
from rgdm.training.payoff_weights import (
    effective_sample_size,
    truncate_weights,
)
from rgdm.training.rollouts import (
    collect_trajectories,
    draw_sorted,
    noise_levels,
    reward_metrics,
    weighted_denoising_loss,
)
from rgdm.training.tasks import BatchShard, Conditions

if TYPE_CHECKING:
    from rgdm.training.rgdm import RGDMObjective


@dataclass
class ScoredRollouts:
    """One batch of the sequence variant's roll-outs, kept while it is replayed or pooled.

    Its importance ratio compares the reference with the policy *that sampled it*, so it stays an exact
    weight of the pay-off whatever the policy does later; the raw rewards are kept so that the weights
    are recomputed with the reward normaliser of the moment.
    """

    step: int  # the optimizer step that sampled and scored it
    shard: BatchShard
    x0: Tensor  # this rank's final samples, snapped to the data's lattice
    values: Tensor  # [global batch] raw rewards
    log_ratio: Tensor  # [global batch] log P_ref(traj) - log P_sampler(traj)
    metrics: dict[str, float]
    states: Tensor | None = None  # path loss: this rank's trajectories [S + 1, B, ...] on ``grid``
    grid: list[int] | None = None


def sequence_loss(objective: RGDMObjective, model: GaussianDiffusion, shard: BatchShard, generator,
                  step: int = 0) -> tuple[Tensor, dict[str, float]]:
    """Whole samples of the current model weighted by exp(r / tau) · pi_ref(traj) / pi_sampler(traj),
    self-normalised over the global batch (over the pool, see below) and truncated relative to it
    (``truncate_weights``).

    With the denoising loss the weighted samples are a fixed estimate of the pay-off distribution:
    their weights compare the pay-off with the policy *that sampled them*, so they stay valid while
    the policy moves. ``sequence_replay`` > 1 takes that many optimizer steps per batch of reward
    calls, and ``sequence_pool`` > 1 fits the loss on the last that many batches at once, each
    sample weighted against its own sampler and the weights normalised over the whole pool (a
    mixture of proposals, each term exact): more samples per step, the same reward calls.
    ``sequence_minibatch`` > 0 fits each step on that many batches drawn from the pool, so that a
    large pool costs no more per step than a small one.
    """
    cfg = objective.config
    if not objective.replaying(step):
        rollouts = scored_rollouts(objective, model, shard, generator, step)
        objective._pool = [*objective._pool, rollouts][-cfg.sequence_pool:]
    if cfg.sequence_draw == "weights":
        weights, metrics = global_pool_weights(objective, objective._pool)
        draws = cfg.sequence_minibatch * cfg.batch_size
        return resampled_denoising_loss(model, objective._pool, weights, draws, cfg.denoising_repeats,
                                        generator, cfg.denoising_t_max), metrics
    weights, metrics = pool_weights(objective, objective._pool)
    batches, scale = drawn_batches(list(zip(objective._pool, weights)), cfg.sequence_minibatch, generator)
    if cfg.sequence_loss == "path":
        pool_size = sum(len(b.values) for b in objective._pool)
        loss = sum(path_loss(objective, model, b, w, pool_size, generator) for b, w in batches)
    else:
        loss = sum(weighted_denoising_loss(model, b.x0, b.shard, w, cfg.denoising_repeats, generator,
                                           cfg.denoising_t_max) for b, w in batches)
    return scale * loss, metrics


def drawn_batches(batches: list[tuple[ScoredRollouts, Tensor]], minibatch: int,
                  generator) -> tuple[list[tuple[ScoredRollouts, Tensor]], float]:
    """``minibatch`` of the pooled ``batches`` drawn uniformly without replacement, and the factor
    len(batches) / minibatch that makes the loss on them an unbiased estimate of the loss on all of them
    (the weights stay normalised over the whole pool). All of them, factor 1, when ``minibatch`` is 0 or
    the pool is not larger yet."""
    if not minibatch or len(batches) <= minibatch:
        return batches, 1.0
    return [batches[i] for i in draw_sorted(len(batches), minibatch, generator)], len(batches) / minibatch


def resampled_denoising_loss(model: GaussianDiffusion, pool: list[ScoredRollouts], weights: Tensor, draws: int,
                              repeats: int, generator, t_max: float = 1.0) -> Tensor:
    """The plain mean denoising loss of ``draws`` samples drawn from the whole pool with replacement,
    each with probability equal to its weight (``weights``: over every rank's samples, in pool order).

    Its expectation is the weighted loss Σ_i w_i L_i on the pool, like that of ``drawn_batches``, but
    every drawn sample counts fully: batches drawn uniformly spend most of their rows on samples whose
    weight is nearly zero (at an ESS of a third of the pool, two thirds of them), so at equal cost the
    weights add less variance (the part of it that they carry shrinks by up to the ESS fraction). The
    draws, their noise levels (t <= ``t_max`` · T) and noise are made for the global set of draws from
    the shared generator; each rank computes the draws whose rows it holds, divided by ``draws``, so the
    ranks' losses sum to the global one.
    """
    picks = torch.multinomial(weights, draws, replacement=True, generator=generator).cpu()
    sizes = torch.tensor([b.shard.global_size for b in pool])
    ends = sizes.cumsum(0)
    batch = torch.searchsorted(ends, picks, right=True)  # the pooled batch of each drawn sample
    batch_of, row_of = batch.tolist(), (picks - (ends - sizes)[batch]).tolist()  # and its row in that batch
    conditions = stacked_conditions([pool[b].shard.global_conditions.select(torch.tensor([r]))
                                     for b, r in zip(batch_of, row_of)])
    mine = [i for i, (b, r) in enumerate(zip(batch_of, row_of)) if pool[b].shard.start <= r < pool[b].shard.stop]
    if mine:  # this rank's drawn samples, the same for every noise level
        own = torch.tensor(mine)
        x0 = padded_rows([pool[batch_of[i]].x0[row_of[i] - pool[batch_of[i]].shard.start] for i in mine],
                         conditions.shape[1] if len(conditions.shape) > 2 else None)
        cond = conditions.select(own)
    losses = []
    for _ in range(repeats):
        t = noise_levels(model, draws, t_max, generator, weights.device)
        noise = model.noise(torch.empty(conditions.shape, device=weights.device), conditions.node_mask, generator)
        if mine:
            losses.append(model.loss(x0, cond.node_mask, cond.context, t=t[own], noise=noise[own]).sum())
    if not losses:  # this rank holds none of the draws: it adds nothing to the global gradient
        return torch.zeros((), device=weights.device, requires_grad=True)
    return torch.stack(losses).mean() / draws


def stacked_conditions(parts: list[Conditions]) -> Conditions:
    """One batch of the rows of ``parts``, node masks padded with zeros to the largest node count."""
    width = max(p.shape[1] for p in parts) if len(parts[0].shape) > 2 else None
    cat = lambda vs: None if vs[0] is None else torch.cat(vs)  # noqa: E731
    masks = None
    if parts[0].node_mask is not None:
        masks = torch.cat([torch.nn.functional.pad(p.node_mask, (0, 0, 0, width - p.shape[1])) for p in parts])
    shape = (len(parts), width, *parts[0].shape[2:]) if width is not None else (len(parts), *parts[0].shape[1:])
    return Conditions(shape, masks, cat([p.context for p in parts]), cat([p.targets for p in parts]))


def padded_rows(rows: list[Tensor], width: int | None) -> Tensor:
    """Samples [N_i, D] of different node counts as one batch [len, width, D], padded with zeros
    (vectors [D] without a node axis, ``width`` None, are stacked as they are)."""
    if width is None:
        return torch.stack(rows)
    return torch.stack([torch.nn.functional.pad(r, (0, 0, 0, width - r.shape[0])) for r in rows])


@torch.no_grad()
def scored_rollouts(objective: RGDMObjective, model: GaussianDiffusion, shard: BatchShard, generator,
                    step: int) -> ScoredRollouts:
    """Roll out the sampler (the current model, or the frozen reference with ``sequence_proposal:
    reference``), score the samples and fit the reward normaliser on them."""
    cfg, cond = objective.config, shard.conditions
    if cfg.sequence_proposal == "reference":  # P_ref / P_sampler is exactly 1: no ratio noise at all
        traj = collect_trajectories(objective.reference, shard, objective._grid(model), cfg.eta, generator)
        log_ratio = torch.zeros(shard.global_size, device=traj.x0.device)
    else:
        traj = collect_trajectories(model, shard, objective._grid(model), cfg.eta, generator, objective.reference)
        log_ratio = shard.gather(traj.log_ratio(skip_final_step=not cfg.final_step_in_ratio))
    final = objective.task.score(traj.x0, cond).gathered(shard)
    objective._local_calls += cond.batch_size
    if cfg.normalize_rewards:
        objective.normalizer.update(final.values, shard.global_conditions.targets)
    x0 = model.snap_to_data(traj.x0, cond.node_mask)
    path = cfg.sequence_loss == "path"
    return ScoredRollouts(step, shard, x0, final.values, log_ratio, reward_metrics(final),
                          traj.states if path else None, traj.grid if path else None)


def pool_weights(objective: RGDMObjective, pool: list[ScoredRollouts]) -> tuple[list[Tensor], dict[str, float]]:
    """Self-normalised, truncated weights over every sample of ``pool``, as each batch's local slice,
    and the metrics of the newest batch with the weights' ESS over the pool."""
    weights, metrics = global_pool_weights(objective, pool)
    slices = weights.split([len(b.values) for b in pool])
    return [b.shard.local(w) for b, w in zip(pool, slices)], metrics


def global_pool_weights(objective: RGDMObjective, pool: list[ScoredRollouts]) -> tuple[Tensor, dict[str, float]]:
    """The weights of ``pool_weights`` over every rank's samples, in pool order (one flat tensor)."""
    cfg = objective.config
    values = torch.cat([b.values for b in pool])
    log_ratio = torch.cat([b.log_ratio for b in pool])
    targets = [b.shard.global_conditions.targets for b in pool]
    targets = None if targets[0] is None else torch.cat(targets)
    weights, tau = objective._weights(values.unsqueeze(0), log_ratio.unsqueeze(0),
                                      None if targets is None else targets.unsqueeze(0), fit_normalizer=False)
    weights = weights.squeeze(0)
    ess = effective_sample_size(torch.log(weights.clamp(min=1e-30))).item()
    if cfg.truncate_weights:
        weights = truncate_weights(weights)
    metrics = dict(pool[-1].metrics)
    metrics.update({"ess": ess, "ess_fraction": ess / len(values), "tau": tau.mean().item(),
                    "weight_entropy": -(weights * torch.log(weights.clamp(min=1e-30))).sum().item(),
                    "log_ratio_std": log_ratio.std().item() if log_ratio.numel() > 1 else 0.0})
    return weights, metrics


def step_nll(objective: RGDMObjective, model: GaussianDiffusion, z_t: Tensor, z_s: Tensor, t_int: int, s_int: int,
             cond: Conditions, ratio: Tensor | None = None, sampler_mean: Tensor | None = None) -> Tensor:
    """Per row, 0.5 |mean_theta - target|^2 / scale^2 / dof for the step t -> s: its negative
    log-likelihood on the regression's scale with target z_s, or, given ``ratio`` (N · w_i per row), the
    control-variate target mean + ratio (z_s - mean) - (z_s - sampler_mean), whose gradient at the current
    parameters is -[ratio (z_s - mean) - (z_s - sampler_mean)] dmean: the step's own noise, zero in mean
    under the sampler, is subtracted. ``sampler_mean`` is the mean of the policy that took the step (the
    current policy's when None)."""
    cfg = objective.config
    t, s = objective._times(t_int, s_int, cond.batch_size)
    mean, std = model.step_distribution(z_t, t, s, cond.node_mask, cond.context, cfg.eta)
    scale = objective._step_scale(model, std, t, s)
    target = z_s
    if ratio is not None:
        ratio = ratio.view(-1, *([1] * (mean.dim() - 1)))
        sampler_mean = mean.detach() if sampler_mean is None else sampler_mean
        target = mean.detach() + ratio * (z_s - mean.detach()) - (z_s - sampler_mean)
    return 0.5 * model.sq_norm(mean - target, cond.node_mask) / scale**2 / model.dof(z_t, cond.node_mask)


def path_loss(objective: RGDMObjective, model: GaussianDiffusion, rollouts: ScoredRollouts, weights: Tensor,
              pool_size: int, generator) -> Tensor:
    """-Σ_i w_i Σ_steps log pi_theta(z_s^i | z_t^i) / dof: the weighted log-likelihood of the
    trajectories' own steps, on ``path_steps`` random steps (all when 0), each on the regression's scale.

    This is KL(P* || P_theta) over whole paths, with P* = P_ref · exp(r / tau) / Z the pay-off path
    measure. At P_theta = P* the weights are uniform and every step's expected gradient vanishes,
    so the pay-off is a fixed point exactly, whatever the number of sampling steps; a weighted
    denoising loss on x_0 instead (``sequence_loss: denoising``) refits the model's own samples,
    whose discretisation error then compounds over iterations.
    """
    cfg, cond = objective.config, rollouts.shard.conditions
    grid, states = rollouts.grid, rollouts.states
    n_pairs = len(grid) - 1
    picks = draw_sorted(n_pairs, cfg.path_steps or n_pairs, generator)
    from_reference = cfg.sequence_proposal == "reference"
    uniform = 1.0 / pool_size
    total = 0.0
    for idx in picks:
        z_t, z_s = states[idx], states[idx + 1]
        if cfg.control_variate:
            # The step's own noise p_i = z_s - mean_sampler has mean zero whatever the state:
            # subtracting its uniformly weighted share leaves the gradient's expectation alone and
            # removes most of its variance (see ``step_nll``).
            sampler_mean = None  # the policy's own step
            if from_reference:
                t, s = objective._times(grid[idx], grid[idx + 1], cond.batch_size)
                with torch.no_grad():
                    sampler_mean, _ = objective.reference.step_distribution(z_t, t, s, cond.node_mask,
                                                                            cond.context, cfg.eta)
            nll = step_nll(objective, model, z_t, z_s, grid[idx], grid[idx + 1], cond, weights / uniform,
                           sampler_mean)
            total = total + (uniform * nll).sum()
        else:
            nll = step_nll(objective, model, z_t, z_s, grid[idx], grid[idx + 1], cond)
            total = total + (weights * nll).sum()
    return total / len(picks)


# ------------------------------------------------------------------------------------------------- #
# The hybrid: sequence weights for the steps before the step level's explored window.


@dataclass
class EarlyPath:
    """The steps of one exploration's roll-outs that lie before the explored window, and their
    sequence-level weights (``RGDMConfig.early_sequence_weight``).

    The weights are exp(r(x_0) / tau) · pi_ref / pi_sampler over these steps only, self-normalised over
    the global batch and truncated relative to it; ``sampler_mean`` is the mean of the policy that
    took each step, so that the control variate stays exact when the batch is replayed after the
    policy has moved.
    """

    times: list[tuple[int, int]]  # (t, s) of each step
    z_t: Tensor  # [P, B_local, ...] states entering the steps
    z_s: Tensor  # [P, B_local, ...] states the sampler stepped to
    sampler_mean: Tensor  # [P, B_local, ...]
    weights: Tensor  # [B_local], normalised over the global batch


@torch.no_grad()
def early_path(objective: RGDMObjective, model: GaussianDiffusion, traj, values: Tensor, shard: BatchShard,
               pairs: list[int]) -> tuple[EarlyPath, dict[str, float]]:
    """The ``EarlyPath`` of roll-outs ``traj`` (rewards ``values`` of the global batch) over the grid
    steps ``pairs``, and the weights' diagnostics. No reward call: the roll-outs' own rewards."""
    cfg, cond = objective.config, shard.conditions
    times, means, log_ratio = [], [], 0.0
    for idx in pairs:
        t_int, s_int = traj.grid[idx], traj.grid[idx + 1]
        t, s = objective._times(t_int, s_int, cond.batch_size)
        z_t, z_s = traj.states[idx], traj.states[idx + 1]
        mean, std = model.step_distribution(z_t, t, s, cond.node_mask, cond.context, cfg.eta)
        ref_mean, _ = objective.reference.step_distribution(z_t, t, s, cond.node_mask, cond.context, cfg.eta)
        log_ratio = log_ratio + (model.log_prob(z_s, ref_mean, std, cond.node_mask)
                                 - model.log_prob(z_s, mean, std, cond.node_mask))
        times.append((t_int, s_int))
        means.append(mean)
    log_ratio = shard.gather(log_ratio)
    targets = shard.global_conditions.targets
    weights, _ = objective._weights(values.unsqueeze(0), log_ratio.unsqueeze(0),
                                    None if targets is None else targets.unsqueeze(0), fit_normalizer=False,
                                    candidates=False)
    weights = weights.squeeze(0)
    metrics = {"early_ess": effective_sample_size(torch.log(weights.clamp(min=1e-30))).item(),
               "early_log_ratio_std": log_ratio.std().item() if log_ratio.numel() > 1 else 0.0}
    if cfg.truncate_weights:
        weights = truncate_weights(weights)
    index = torch.tensor(pairs, device=traj.states.device)
    path = EarlyPath(times, traj.states[index], traj.states[index + 1], torch.stack(means), shard.local(weights))
    return path, metrics


def early_path_loss(objective: RGDMObjective, model: GaussianDiffusion, early: EarlyPath,
                    shard: BatchShard) -> Tensor:
    """This rank's share of -Σ_i w_i · mean_steps log pi_theta(z_s^i | z_t^i) / dof over ``early``'s
    steps, with the control variate of ``path_loss`` (gradient -Σ_i (w_i - 1/N)(z_s - mean_i) at the
    sampler): zero in expectation at uniform weights, so the steps are moved only by the rewards."""
    ratio = early.weights * shard.global_size
    total = 0.0
    for (t_int, s_int), z_t, z_s, sampler_mean in zip(early.times, early.z_t, early.z_s, early.sampler_mean):
        nll = step_nll(objective, model, z_t, z_s, t_int, s_int, shard.conditions, ratio, sampler_mean)
        total = total + nll.sum() / shard.global_size
    return total / max(1, len(early.times))
