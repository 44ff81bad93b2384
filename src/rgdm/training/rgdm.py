"""RGDM: reward-guided exploration during training (Zhang & Xu, arXiv 2304.07132).

Our reading of the method (docs/rgdm.md has the derivation). The soft-optimal reverse step
relative to the frozen pre-trained model pi_ref is the *pay-off* distribution

    q_pd(z_s | z_t)  ∝  pi_ref(z_s | z_t) · exp(V(z_s) / tau),

with V the soft value of z_s under the reference, estimated by a look-ahead: the reward of the
reference model's denoised estimate of z_s (Tweedie), of a short deterministic roll-out, or of M
stochastic continuations (unbiased in exp(V / tau)). RGDM minimises KL(q_pd || pi_theta), i.e. maximises
the log-likelihood of samples from q_pd. Samples come from exploration: K candidates around the
reference mean, candidate k drawn from N(mu_ref + delta_k, std^2) with *feasible shifts* |delta_k|
<= rho·std (delta_0 = 0), and self-normalised importance weights

    w_k ∝ exp(V_k / tau) · pi_ref(z^k | z_t) / q_prop(z^k | z_t),  q_prop = (1/K) Σ_j N(mu_ref + delta_j, std^2)

keep the target exact whatever the shifts (antithetic candidate pairs remove the first-order 1/K bias
of self-normalisation). The loss per explored state is
-Σ_k w_k log pi_theta(z^k | z_t) / dof (+ lambda_mle · denoising loss on data, + an optional KL to
pi_ref): a weighted regression of the policy mean onto the candidates, with no reward gradient.

The sequence-level variant weights whole trajectories of the current model by
exp(r(x_0)/tau) · pi_ref(trajectory) / pi_theta(trajectory), self-normalised over the batch and
truncated relative to it (Ionides 2008), and fits them: by the weighted denoising loss on their x_0
(``sequence_loss: denoising``, the default) or by their weighted path log-likelihood (``path``, for
which the pay-off is an exact fixed point; docs/rgdm.md says when each one wins).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from rgdm import distributed
from rgdm.config import RGDMConfig
from rgdm.diffusion.gaussian import GaussianDiffusion
from rgdm.training.normalizer import RewardNormalizer
from rgdm.training.rollouts import collect_trajectories, step_times, weighted_denoising_loss
from rgdm.training.tasks import BatchShard, Conditions, Scores, Task, task_stats

# ------------------------------------------------------------------------------------------------- #
# Temperature and importance weights.


def effective_sample_size(log_weights: Tensor) -> Tensor:
    """ESS = (Σw)^2 / Σw^2 of unnormalised log-weights along the last dimension."""
    w = torch.softmax(log_weights, dim=-1)
    return 1.0 / (w**2).sum(-1)


def payoff_log_weights(values: Tensor, tau: Tensor, log_base: Tensor) -> Tensor:
    """Unnormalised log-weights log exp(V/tau) + log_base of candidates, [..., K].

    ``values`` is [..., K] (one value per candidate) or [..., K, M]: M look-ahead samples per
    candidate, whose exp(r/tau) are averaged (an unbiased estimate of exp(V/tau) for the soft value
    V = tau log E[exp(r/tau)]). ``tau`` is [...] (one temperature per row).
    """
    tau = tau.view(*tau.shape, *([1] * (values.dim() - tau.dim())))
    scaled = values / tau
    if values.dim() == log_base.dim() + 1:
        scaled = torch.logsumexp(scaled, dim=-1) - math.log(values.shape[-1])
    return scaled + log_base


def temperature_for_ess(values: Tensor, log_base: Tensor, target_ess: float, low: float = 1e-3,
                        high: float = 1e3, iterations: int = 30) -> Tensor:
    """Per-row tau such that ESS of the pay-off weights ≈ target_ess (bisection in log tau).

    Higher tau flattens the weights (ESS grows), so ESS is monotone in tau for fixed log_base.
    ``values`` is [..., K] or [..., K, M] as in ``payoff_log_weights``.
    """
    rows = log_base.shape[:-1]
    lo = torch.full(rows, math.log(low), dtype=values.dtype, device=values.device)
    hi = torch.full(rows, math.log(high), dtype=values.dtype, device=values.device)
    for _ in range(iterations):
        mid = (lo + hi) / 2
        ess = effective_sample_size(payoff_log_weights(values, mid.exp(), log_base))
        too_peaked = ess < target_ess
        lo = torch.where(too_peaked, mid, lo)
        hi = torch.where(too_peaked, hi, mid)
    return ((lo + hi) / 2).exp()


def jackknife_weights(log_weights: Tensor, groups: int) -> Tensor:
    """Self-normalised weights with the jackknife's bias correction, along the last dimension.

    The self-normalised estimate R = Σ f_k y_k / Σ f_k of a pay-off mean is biased by O(1/K): each f_k
    also sits in its own normaliser, and noisy values f (Monte Carlo look-aheads) make it worse. The
    jackknife over G = ``groups`` groups of candidates (antithetic pairs stay together),

        R_J = G · R - (G - 1) / G · Σ_g R_{-g},      R_{-g}: the estimate without group g,

    cancels the 1/K term (Quenouille; bias O(1/K^2)). R_J is linear in the y_k, so it is a weighted
    mean whose weights sum to one; a few can be slightly negative.
    """
    k = log_weights.shape[-1]
    f = torch.exp(log_weights - log_weights.amax(-1, keepdim=True))
    total = f.sum(-1, keepdim=True)
    group_sums = f.view(*f.shape[:-1], groups, k // groups).sum(-1)  # [..., G]
    without = (total - group_sums).clamp(min=1e-30)  # normaliser of R_{-g}
    own = without.repeat_interleave(k // groups, dim=-1)  # [..., K]: the normaliser that drops k's own group
    sum_over_other_groups = (1.0 / without).sum(-1, keepdim=True) - 1.0 / own
    return groups * f / total - (groups - 1) / groups * f * sum_over_other_groups


def truncate_weights(weights: Tensor) -> Tensor:
    """Truncated importance sampling (Ionides 2008): cap normalised weights at sqrt(N) times their
    mean, 1 / sqrt(N), then renormalise, along the last dimension.

    The cap is relative to the batch, so it bounds the variance whatever the policy's drift, and it
    leaves uniform weights (the fixed point, where the policy equals the pay-off) untouched. An
    absolute clip of log pi_ref / pi_theta would instead erase the reference correction once the
    policy drifts, and the objective would silently become reward-weighted regression.
    """
    cap = weights.shape[-1] ** -0.5
    capped = weights.clamp(max=cap)
    return capped / capped.sum(-1, keepdim=True)


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


class RGDMObjective:
    """Step-level or sequence-level RGDM on a trainable policy, relative to a frozen copy of it.

    Data-parallel: every rank rolls out and explores its shard of the global batch (noise drawn for
    the global batch, see ``BatchShard``) and calls the reward on its own samples; rewards are
    gathered so that the normaliser, the temperature and the weights are those of the whole batch
    on every rank, and each rank's loss is the sum over its rows divided by the global batch size.
    """

    def __init__(self, model: GaussianDiffusion, task: Task, config: RGDMConfig, seed: int = 0):
        config.validate()
        self.config = config
        self.task = task
        self.name = f"rgdm-{config.variant}"
        self.reference = copy.deepcopy(model).eval().requires_grad_(False)
        self.normalizer = RewardNormalizer(config.normalizer_buffer, config.normalizer_min_count)
        self.reward_calls = 0  # over all ranks
        self._local_calls = 0  # this rank's calls during the current step
        self._replay_cache: tuple | None = None  # (step, shard, explored items, metrics) while replayed
        self._pool: list[ScoredRollouts] = []  # sequence variant: the batches the loss is fitted on
        self.seed = seed

    def _grid(self, model: GaussianDiffusion) -> list[int]:
        return model.time_grid(self.config.sampling_steps or None)

    def explored_pairs(self, grid: list[int], timesteps: int) -> list[int]:
        """Indices i of the grid's steps grid[i] -> grid[i + 1] that exploration may pick: those with
        t <= ``explore_t_max`` · T (at least the last step).

        Early in the reverse chain the look-ahead values of candidates differ by no more than their noise
        (on QM9 the Tweedie estimate is not even a molecule for t >~ 280 of 500), so their weights are
        uniform and exploring there spends reward calls on the reference's own step. Steps outside the
        window are not explored: they are trained only by the other terms (λ_mle, the KL), i.e. they
        stay near π_ref, and the fine-tuned chain targets the pay-off of the window,
        π_ref(x_0) · exp(r/τ) · E[exp(-V(z_w)/τ) | x_0] with z_w the state entering it — the pay-off
        itself wherever the soft value at the window's edge is flat.
        """
        limit = self.config.explore_t_max * timesteps
        window = [i for i in range(len(grid) - 1) if grid[i] <= limit + 1e-9]
        return window or [len(grid) - 2]

    def _times(self, t_int: int, s_int: int, n: int) -> tuple[Tensor, Tensor]:
        return step_times(t_int, s_int, n, distributed.module_device(self.reference))

    # -- look-ahead ------------------------------------------------------------------------ #

    @torch.no_grad()
    def lookahead(self, z_s: Tensor, s_int: int, cond: Conditions, shard: BatchShard | None = None,
                  repeats: int = 1, generator=None) -> tuple[Tensor, Tensor]:
        """V(z_s) of ``z_s`` (this rank's rows of ``shard``, each repeated ``repeats`` times): raw
        rewards and validity, [n] for "tweedie"/"rollout", [n, M] for M "continuation" samples.

        * ``tweedie``: the reward of the reference model's one-shot estimate of x_0 from z_s;
        * ``rollout``: the reward after a short deterministic (DDIM, eta = 0) roll-out of the reference;
        * ``continuation``: the rewards of M stochastic roll-outs of the reference from z_s to 0, whose
          mean exp(r / tau) estimates exp(V / tau) of the exact soft value without bias.
        """
        cfg, ref, n = self.config, self.reference, z_s.shape[0]
        if cfg.lookahead == "continuation" and s_int > 0:
            m = cfg.lookahead_samples
            cond_m = cond.repeat(m)
            z = z_s.repeat_interleave(m, dim=0)
            for a, b in zip(*self._continuation_pairs(s_int)):
                t, s = self._times(a, b, n * m)
                noise = (shard.noise(ref, generator, repeats * m) if shard is not None
                         else ref.noise(z, cond_m.node_mask, generator))
                z = ref.step(z, t, s, cond_m.node_mask, cond_m.context, eta=cfg.eta, noise=noise).sample
            scores = self._score(z, cond_m)
            return scores.values.view(n, m), scores.valid.view(n, m)
        if cfg.lookahead == "rollout" and s_int > 0:
            z = z_s
            for a, b in zip(*self._continuation_pairs(s_int)):
                t, s = self._times(a, b, n)
                z = ref.step(z, t, s, cond.node_mask, cond.context, eta=0.0).sample
            scores = self._score(z, cond)
        else:
            scores = self._score(z_s, cond, t_int=s_int)
        return scores.values, scores.valid

    def _continuation_pairs(self, s_int: int) -> tuple[list[int], list[int]]:
        """The (from, to) times of a look-ahead roll-out from s to 0: ``lookahead_steps`` even steps, or
        (0) the roll-outs' own time grid, whose reference chain the soft value is exactly defined on."""
        if self.config.lookahead_steps == 0:
            steps = [t for t in self._grid(self.reference) if t <= s_int]
        else:
            steps = sorted({round(v) for v in torch.linspace(0, s_int, self.config.lookahead_steps + 1).tolist()},
                           reverse=True)
        return steps[:-1], steps[1:]

    def _score(self, z: Tensor, cond: Conditions, t_int: int = 0) -> Scores:
        """The reward of the reference model's estimate of x_0 from z at time ``t_int``."""
        ref, n = self.reference, z.shape[0]
        x0 = ref.project(ref.predict_x0(z, torch.full((n,), t_int, dtype=torch.long, device=z.device),
                                        cond.node_mask, cond.context), cond.node_mask)
        self._local_calls += n
        return self.task.score(x0, cond)

    # -- exploration ----------------------------------------------------------------------- #

    @torch.no_grad()
    def explore(self, z_t: Tensor, t_int: int, s_int: int, shard: BatchShard, generator=None) -> Exploration:
        """K candidates of the step t -> s from the reference policy with feasible shifts (this rank's rows).

        With ``antithetic`` the candidates come in pairs mu_ref + delta_j ± std · eps_j: the pair's
        Gaussian parts cancel in the normaliser of the self-normalised weights, which removes the
        first-order (1/K) bias of the weighted mean of a small tilt.
        """
        cfg, ref, cond = self.config, self.reference, shard.conditions
        b, k = z_t.shape[0], cfg.num_candidates
        pairs = 2 if cfg.antithetic else 1
        t, s = self._times(t_int, s_int, b)
        mean, std = ref.step_distribution(z_t, t, s, cond.node_mask, cond.context, cfg.eta)
        radius = cfg.radius * self._radius_unit(mean, std, cond)  # [B]
        shifts = self._shifts(mean, std, radius, s_int, shard, k // pairs, generator)  # [B, K / pairs, ...]
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
        log_ratio = self._log_proposal_ratio(candidates.view(b, k, *mean.shape[1:]), mean, shifts, std,
                                             cond.node_mask)
        values, valid = self.lookahead(candidates, s_int, cond_k, shard, k, generator)
        perturbations = (std_k * noise).view(b, k, *mean.shape[1:])
        return Exploration(candidates.view(b, k, *mean.shape[1:]), perturbations, log_ratio,
                           values.view(b, k, *values.shape[1:]), valid.view(b, k, *valid.shape[1:]),
                           values.numel(), mean)

    def _radius_unit(self, mean: Tensor, std: Tensor, cond: Conditions) -> Tensor:
        """The unit of the exploration radius per row: the step std, its norm over the state space
        (std * sqrt(dof), the typical length of the step's noise), or 1."""
        if self.config.radius_units == "std":
            return std
        if self.config.radius_units == "noise_norm":
            return std * self.reference.dof(mean, cond.node_mask).sqrt()
        return torch.ones_like(std)

    def _shifts(self, mean: Tensor, std: Tensor, radius: Tensor, s_int: int, shard: BatchShard, k: int,
                generator=None) -> Tensor:
        """``k`` shifts per row, the first one zero (the reference step itself), [B, k, ...]."""
        cfg, ref, cond = self.config, self.reference, shard.conditions
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
            probe_values = self._point_values(probes, s_int, cond_d, shard, n_dirs, generator).view(b, n_dirs)
            if cfg.shift == "best_probe":
                top = probe_values.topk(k - 1, dim=1).indices
                chosen = torch.stack([directions[i, top[i]] for i in range(b)])
            else:  # finite_difference: the tilt std^2 * grad V / tau, estimated along the probes
                base = self._point_values(mean, s_int, cond, shard, 1, generator)
                probe_v, base_v = self._scaled(probe_values, cond.targets), self._scaled(base[:, None], cond.targets)
                slope = (probe_v - base_v) / radius.clamp(min=1e-12)[:, None]
                # Unit probe directions in a space of dimension dof: E[u u^T] = I / dof.
                dof = ref.dof(mean, cond.node_mask).view(b, 1)
                grad = ((slope * dof / n_dirs).view(b, n_dirs, *([1] * (mean.dim() - 1))) * directions).sum(1)
                tilt = grad * (std**2 / self._tau_for_shift()).view(b, *([1] * (mean.dim() - 1)))
                jitter = unit_directions(ref, shard, k - 1, generator).view(b, k - 1, *mean.shape[1:])
                shifts = tilt.unsqueeze(1) + cfg.fd_jitter * rad * jitter
                norms = ref.sq_norm(shifts.reshape(b * (k - 1), *mean.shape[1:]),
                                    cond.repeat(k - 1).node_mask).sqrt().view(b, k - 1, *([1] * (mean.dim() - 1)))
                shifts = shifts * torch.clamp(rad / norms.clamp(min=1e-12), max=1.0)  # stay feasible
                zero = torch.zeros((b, 1, *mean.shape[1:]), dtype=mean.dtype, device=mean.device)
                return torch.cat([zero, shifts], dim=1)
        zero = torch.zeros((b, 1, *mean.shape[1:]), dtype=mean.dtype, device=mean.device)
        return torch.cat([zero, rad * chosen], dim=1)

    def _point_values(self, z_s: Tensor, s_int: int, cond: Conditions, shard: BatchShard, repeats: int,
                      generator=None) -> Tensor:
        """One raw value per state (the soft value of M continuations in raw units), for choosing shifts."""
        values, _ = self.lookahead(z_s, s_int, cond, shard, repeats, generator)
        if values.dim() == 1:
            return values
        return self.config.tau * (torch.logsumexp(values / self.config.tau, dim=-1) - math.log(values.shape[-1]))

    def _scaled(self, values: Tensor, targets: Tensor | None) -> Tensor:
        """Rewards in the units the temperature applies to (normalised when configured).

        ``targets`` holds one target per leading row of ``values`` (its shape is a prefix of theirs).
        """
        if not self.config.normalize_rewards:
            return values
        return self.normalizer.normalize(values.reshape(-1), _per_value(targets, values)).view_as(values)

    def _tau_for_shift(self) -> float:
        return self.config.tau

    def _log_proposal_ratio(self, candidates: Tensor, mean: Tensor, shifts: Tensor, std: Tensor,
                            node_mask: Tensor | None) -> Tensor:
        """log pi_ref(z^k) - log q_prop(z^k) for the stratified mixture proposal, [B, K]."""
        b, k = candidates.shape[:2]
        ref = self.reference
        mask_kk = None if node_mask is None else node_mask.repeat_interleave(k * k, dim=0)
        diff = candidates.unsqueeze(2) - (mean.unsqueeze(1) + shifts).unsqueeze(1)  # [B, K(cand), K(comp)]
        sq = ref.sq_norm(diff.reshape(b * k * k, *candidates.shape[2:]), mask_kk).view(b, k, k)
        var = (std**2).view(b, 1, 1)
        log_components = -0.5 * sq / var
        log_q = torch.logsumexp(log_components, dim=2) - math.log(k)
        log_ref = log_components[:, :, 0]  # component 0 has no shift: the reference step itself
        return log_ref - log_q

    # -- the loss -------------------------------------------------------------------------- #

    def loss(self, model: GaussianDiffusion, step: int) -> tuple[Tensor, dict[str, float]]:
        """This rank's share of the RGDM loss at ``step`` (+ lambda_mle times the data term's share)."""
        generator = distributed.generator_on(distributed.module_device(model), self.seed * 1_000_003 + step)
        shard = BatchShard.of(self.task.conditions(self.config.batch_size, generator))
        self._local_calls = 0
        if self.config.variant == "sequence":
            loss, metrics = self._sequence_loss(model, shard, generator, step)
        else:
            loss, metrics = self._step_loss(model, shard, generator, step)
        data_loss = self.task.data_loss(model, step) if self.config.lambda_mle > 0 else None
        if data_loss is not None:
            loss = loss + self.config.lambda_mle * data_loss
            metrics["mle_loss"] = data_loss.item()  # this rank's share
        # on the model's device: nccl (GPU ranks) reduces CUDA tensors only
        calls = torch.tensor([self._local_calls], dtype=torch.long, device=distributed.module_device(model))
        self.reward_calls += int(distributed.all_reduce_sum(calls).item())
        metrics["reward_calls"] = float(self.reward_calls)
        metrics.update(task_stats(self.task))
        return loss, metrics

    def _weights(self, values: Tensor, log_base: Tensor, targets: Tensor | None) -> tuple[Tensor, Tensor]:
        """Self-normalised pay-off weights along the candidates' dim and the temperature used, per row.

        ``values`` is [rows, K] or [rows, K, M] (M look-ahead samples), ``log_base`` [rows, K] and
        ``targets`` [rows] or [rows, K]. The normaliser is fitted on every value that is weighted,
        invalid samples' penalties included: fitted on valid ones only, a fixed penalty would become a
        huge negative z-score, and the weights a validity filter at a far lower effective temperature.
        Called with the *global* batch's values on every rank, so that the normaliser's state and the
        weights are identical across ranks (and to a single-process run).
        """
        cfg = self.config
        if cfg.normalize_rewards:
            self.normalizer.update(values.reshape(-1), _per_value(targets, values))
        scaled = self._scaled(values, targets)
        if cfg.adapt_tau:
            tau = temperature_for_ess(scaled, log_base, cfg.target_ess * log_base.shape[-1])
        else:
            tau = torch.full(log_base.shape[:-1], cfg.tau, dtype=values.dtype, device=values.device)
        log_weights = payoff_log_weights(scaled, tau, log_base)
        groups = log_base.shape[-1] // (2 if cfg.antithetic else 1)
        if cfg.weight_normalisation == "jackknife" and groups >= 2:
            return jackknife_weights(log_weights, groups), tau
        return torch.softmax(log_weights, dim=-1), tau

    def _step_scale(self, model: GaussianDiffusion, std: Tensor, t: Tensor, s: Tensor) -> Tensor:
        """The per-step scale of mean-space errors [B]: the step std (the likelihood's own) or the
        step's sensitivity to the noise prediction (``epsilon``: the simple denoising loss's units)."""
        if self.config.loss_weighting == "likelihood":
            return std
        return model.mean_sensitivity(t, s, self.config.eta).to(std.dtype)

    def _step_loss(self, model: GaussianDiffusion, shard: BatchShard, generator,
                   step: int = 0) -> tuple[Tensor, dict[str, float]]:
        """Explore (or, within ``replay`` steps of the last exploration, reuse it) and regress onto it.

        The per-step targets are pay-offs relative to the frozen reference, not to the policy, so an
        explored batch stays a valid target while the policy moves: ``replay`` > 1 takes that many
        optimizer steps per batch of reward calls (only the policy's own step mean is recomputed).
        """
        cached = self._replay_cache
        if not self.replaying(step):
            cached = (step, *self._explore_batch(model, shard, generator))
            self._replay_cache = cached if self.config.replay > 1 else None
        _, shard, items, metrics = cached
        cfg, cond = self.config, shard.conditions
        total = 0.0
        for z_t, t_int, s_int, exp, weights in items:
            t, s = self._times(t_int, s_int, cond.batch_size)
            mean, std = model.step_distribution(z_t, t, s, cond.node_mask, cond.context, cfg.eta)
            scale = self._step_scale(model, std, t, s)
            step_loss = self._regression_loss(model, mean, scale, exp, weights, cond).sum()
            if cfg.kl_weight > 0:
                ref_mean, _ = self.reference.step_distribution(z_t, t, s, cond.node_mask, cond.context, cfg.eta)
                kl = self._kl_to_reference(model, mean, ref_mean, scale, cond.node_mask)
                step_loss = step_loss + cfg.kl_weight * kl.sum()
            total = total + step_loss / shard.global_size / len(items)  # this rank's share of the mean
        return total, dict(metrics)

    @torch.no_grad()
    def _explore_batch(self, model: GaussianDiffusion, shard: BatchShard, generator) -> tuple[BatchShard, list, dict]:
        """Roll out the current model, explore ``explore_steps`` of its states inside the window and
        weight the candidates: (shard, [(z_t, t, s, exploration, local weights)], metrics)."""
        cfg, cond = self.config, shard.conditions
        grid = self._grid(model)
        traj = collect_trajectories(model, shard, grid, cfg.eta, generator, stochastic=False)
        final = self.task.score(traj.x0, cond).gathered(shard)
        self._local_calls += cond.batch_size
        window = self.explored_pairs(grid, model.timesteps)
        order = torch.randperm(len(window), generator=generator, device=generator.device)[
            : min(cfg.explore_steps, len(window))]
        picks = torch.tensor(window, device=order.device)[order].sort().values
        items, ess_all, entropy_all, tau_all = [], [], [], []
        for idx in picks.tolist():
            t_int, s_int = grid[idx], grid[idx + 1]
            z_t = traj.states[idx]
            exp = self.explore(z_t, t_int, s_int, shard, generator)
            all_weights, tau = self._weights(shard.gather(exp.values), shard.gather(exp.log_proposal_ratio),
                                             shard.global_conditions.targets)
            items.append((z_t, t_int, s_int, exp, shard.local(all_weights)))
            probabilities = all_weights / all_weights.sum(-1, keepdim=True)
            ess_all.append(effective_sample_size(torch.log(probabilities.clamp(min=1e-30))).mean().item())
            entropy_all.append(-(probabilities * torch.log(probabilities.clamp(min=1e-30))).sum(-1).mean().item())
            tau_all.append(tau.mean().item())
        metrics = reward_metrics(final)
        metrics.update({"ess": _mean(ess_all), "ess_fraction": _mean(ess_all) / cfg.num_candidates,
                        "weight_entropy": _mean(entropy_all), "tau": _mean(tau_all)})
        return shard, items, metrics

    @staticmethod
    def _kl_to_reference(model: GaussianDiffusion, mean: Tensor, reference_mean: Tensor, scale: Tensor,
                         node_mask: Tensor | None) -> Tensor:
        """KL(pi_theta || pi_ref) of one step, |mean - mean_ref|^2 / (2 std^2) / dof, with std replaced
        by the regression's per-step scale: kl_weight then trades the two terms off in one unit at
        every step (with ``loss_weighting: likelihood`` it is the exact KL per dimension)."""
        return 0.5 * model.sq_norm(mean - reference_mean, node_mask) / scale**2 / model.dof(mean, node_mask)

    def _regression_loss(self, model: GaussianDiffusion, mean: Tensor, scale: Tensor, exp: Exploration,
                         weights: Tensor, cond: Conditions) -> Tensor:
        """Per-state loss -Σ_k w_k log pi_theta(z^k | z_t) / dof, up to a constant and a per-step scale.

        With a fixed std, Σ_k w_k ||z^k - mean||^2 = ||target - mean||^2 + const, target = Σ_k w_k z^k:
        a regression of the policy mean onto the weighted candidates. Two choices keep its variance low
        without moving its optimum: ``control_variate`` subtracts the candidates' average Gaussian
        perturbation (zero in expectation), and ``loss_weighting: epsilon`` measures the error in
        noise-prediction units (the simple denoising loss's weighting) instead of the likelihood's
        1/std^2, which would let the nearly noiseless last steps dominate every gradient.
        """
        w = weights.view(*weights.shape, *([1] * (mean.dim() - 1)))
        if exp.reference_mean is None:
            target = (w * exp.candidates).sum(1)
        else:  # the same for weights that sum to one; written relative to mu_ref for readability
            target = exp.reference_mean + (w * (exp.candidates - exp.reference_mean.unsqueeze(1))).sum(1)
        if self.config.control_variate:
            target = target - exp.perturbations.mean(1)
        error = model.sq_norm(mean - target.detach(), cond.node_mask)
        return 0.5 * error / scale**2 / model.dof(mean, cond.node_mask)

    def replaying(self, step: int) -> bool:
        """Whether optimizer step ``step`` reuses the last batch of reward calls (and so spends none)."""
        if self.config.variant == "sequence":
            first, replay = (self._pool[-1].step if self._pool else None), self.config.sequence_replay
        else:
            first, replay = (self._replay_cache[0] if self._replay_cache else None), self.config.replay
        return first is not None and 0 <= step - first < replay

    def _sequence_loss(self, model: GaussianDiffusion, shard: BatchShard, generator,
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
        """
        cfg = self.config
        if not self.replaying(step):
            rollouts = self._scored_rollouts(model, shard, generator, step)
            self._pool = [*self._pool, rollouts][-cfg.sequence_pool:]
        weights, metrics = self._pool_weights(self._pool)
        if cfg.sequence_loss == "path":
            pool_size = sum(len(b.values) for b in self._pool)
            loss = sum(self._path_loss(model, b, w, pool_size, generator) for b, w in zip(self._pool, weights))
        else:
            loss = sum(weighted_denoising_loss(model, b.x0, b.shard, w, cfg.denoising_repeats, generator)
                       for b, w in zip(self._pool, weights))
        return loss, metrics

    @torch.no_grad()
    def _scored_rollouts(self, model: GaussianDiffusion, shard: BatchShard, generator,
                         step: int) -> ScoredRollouts:
        """Roll out the sampler (the current model, or the frozen reference with ``sequence_proposal:
        reference``), score the samples and fit the reward normaliser on them."""
        cfg, cond = self.config, shard.conditions
        if cfg.sequence_proposal == "reference":  # P_ref / P_sampler is exactly 1: no ratio noise at all
            traj = collect_trajectories(self.reference, shard, self._grid(model), cfg.eta, generator)
            log_ratio = torch.zeros(shard.global_size, device=traj.x0.device)
        else:
            traj = collect_trajectories(model, shard, self._grid(model), cfg.eta, generator, self.reference)
            log_ratio = shard.gather(traj.log_ratio(skip_final_step=not cfg.final_step_in_ratio))
        final = self.task.score(traj.x0, cond).gathered(shard)
        self._local_calls += cond.batch_size
        if cfg.normalize_rewards:
            self.normalizer.update(final.values, shard.global_conditions.targets)
        x0 = model.snap_to_data(traj.x0, cond.node_mask)
        path = cfg.sequence_loss == "path"
        return ScoredRollouts(step, shard, x0, final.values, log_ratio, reward_metrics(final),
                              traj.states if path else None, traj.grid if path else None)

    def _pool_weights(self, pool: list[ScoredRollouts]) -> tuple[list[Tensor], dict[str, float]]:
        """Self-normalised, truncated weights over every sample of ``pool``, as each batch's local slice,
        and the metrics of the newest batch with the weights' ESS over the pool."""
        cfg = self.config
        values = torch.cat([b.values for b in pool])
        log_ratio = torch.cat([b.log_ratio for b in pool])
        targets = [b.shard.global_conditions.targets for b in pool]
        targets = None if targets[0] is None else torch.cat(targets)
        scaled = self._scaled(values, targets)
        tau = (temperature_for_ess(scaled.unsqueeze(0), log_ratio.unsqueeze(0), cfg.target_ess * len(values))
               if cfg.adapt_tau else torch.full((1,), cfg.tau, dtype=values.dtype, device=values.device))
        weights = torch.softmax(payoff_log_weights(scaled.unsqueeze(0), tau, log_ratio.unsqueeze(0)), -1).squeeze(0)
        ess = effective_sample_size(torch.log(weights.clamp(min=1e-30))).item()
        if cfg.truncate_weights:
            weights = truncate_weights(weights)
        metrics = dict(pool[-1].metrics)
        metrics.update({"ess": ess, "ess_fraction": ess / len(values), "tau": tau.mean().item(),
                        "weight_entropy": -(weights * torch.log(weights.clamp(min=1e-30))).sum().item(),
                        "log_ratio_std": log_ratio.std().item() if log_ratio.numel() > 1 else 0.0})
        slices = weights.split([len(b.values) for b in pool])
        return [b.shard.local(w) for b, w in zip(pool, slices)], metrics

    def _path_loss(self, model: GaussianDiffusion, rollouts: ScoredRollouts, weights: Tensor, pool_size: int,
                   generator) -> Tensor:
        """-Σ_i w_i Σ_steps log pi_theta(z_s^i | z_t^i) / dof: the weighted log-likelihood of the
        trajectories' own steps, on ``path_steps`` random steps (all when 0), each on the regression's scale.

        This is KL(P* || P_theta) over whole paths, with P* = P_ref · exp(r / tau) / Z the pay-off path
        measure. At P_theta = P* the weights are uniform and every step's expected gradient vanishes,
        so the pay-off is a fixed point exactly, whatever the number of sampling steps; a weighted
        denoising loss on x_0 instead (``sequence_loss: denoising``) refits the model's own samples,
        whose discretisation error then compounds over iterations.
        """
        cfg, cond = self.config, rollouts.shard.conditions
        grid, states = rollouts.grid, rollouts.states
        n_pairs = len(grid) - 1
        picks = torch.randperm(n_pairs, generator=generator, device=generator.device)[
            : cfg.path_steps or n_pairs].sort().values
        from_reference = cfg.sequence_proposal == "reference"
        total = 0.0
        for idx in picks.tolist():
            t, s = self._times(grid[idx], grid[idx + 1], cond.batch_size)
            z_t, z_s = states[idx], states[idx + 1]
            mean, std = model.step_distribution(z_t, t, s, cond.node_mask, cond.context, cfg.eta)
            scale = self._step_scale(model, std, t, s)
            if cfg.control_variate:
                # The step's own noise p_i = z_s - mean_sampler has mean zero whatever the state:
                # subtracting its uniformly weighted share leaves the gradient's expectation alone and
                # removes most of its variance. The surrogate below has the gradient
                # -Σ_i [w_i (z_s - mean_i) - p_i / N] dmean_i at the current parameters.
                sampler_mean = mean.detach()
                if from_reference:
                    with torch.no_grad():
                        sampler_mean, _ = self.reference.step_distribution(z_t, t, s, cond.node_mask,
                                                                           cond.context, cfg.eta)
                uniform = 1.0 / pool_size
                ratio = (weights / uniform).view(-1, *([1] * (mean.dim() - 1)))
                target = mean.detach() + ratio * (z_s - mean.detach()) - (z_s - sampler_mean)
                row_weights = torch.full_like(weights, uniform)
            else:
                target, row_weights = z_s, weights
            nll = 0.5 * model.sq_norm(mean - target, cond.node_mask) / scale**2 / model.dof(z_t, cond.node_mask)
            total = total + (row_weights * nll).sum()
        return total / len(picks)

    def state_dict(self) -> dict[str, Any]:
        state = {"normalizer": self.normalizer.state_dict(), "reward_calls": self.reward_calls,
                 "task": self.task.state_dict(), "reference": self.reference.state_dict()}
        if self._replay_cache is not None:
            state["replay_cache"] = _replay_to_state(self._replay_cache)
        if self._pool:
            state["sequence_pool"] = [{"step": b.step, **_shard_to_state(b.shard), "x0": b.x0, "values": b.values,
                                       "log_ratio": b.log_ratio, "metrics": dict(b.metrics), "states": b.states,
                                       "grid": b.grid} for b in self._pool]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.normalizer.load_state_dict(state["normalizer"])
        self.reward_calls = int(state["reward_calls"])
        self.task.load_state_dict(state["task"])
        self.reference.load_state_dict(state["reference"])
        # A run resumed mid-way through a replayed batch goes on with it (bit-for-bit). Only rank 0's
        # rows are checkpointed, so a data-parallel run explores afresh on every rank instead.
        single = distributed.world_size() == 1
        cached = state.get("replay_cache")
        self._replay_cache = _replay_from_state(cached) if cached is not None and single else None
        pool = state.get("sequence_pool", []) if single else []
        self._pool = [ScoredRollouts(b["step"], _shard_from_state(b), b["x0"], b["values"], b["log_ratio"],
                                     b["metrics"], b.get("states"), b.get("grid")) for b in pool]


@torch.no_grad()
def explore_sample(model: GaussianDiffusion, task: Task, config: RGDMConfig, n: int,
                   generator: torch.Generator | None = None) -> tuple[Tensor, Conditions, int]:
    """Exploration at sampling time: ``n`` samples of ``model`` where every reverse step draws K
    candidates exactly as RGDM's training does (feasible shifts, look-ahead values, exact proposal
    ratios) and keeps one with probability given by the pay-off weights. No training: the per-step
    pay-off pi(z_s | z_t) · exp(V(z_s) / tau) of ``model`` itself, approximated by K candidates.

    Returns the samples x_0, their conditions and the number of reward calls (K per sample and step,
    plus the probes of reward-guided shifts). Use it on a fine-tuned model to steer further at the
    price of reward calls, or on a pre-trained one as a training-free baseline.
    """
    sampler = RGDMObjective(model, task, config)  # its frozen copy of ``model`` is the policy explored
    cond = task.conditions(n, generator)
    shard = BatchShard(cond, 0, n)
    grid = sampler._grid(model)
    z = shard.noise(model, generator)
    window = set(sampler.explored_pairs(grid, model.timesteps))
    for i, (t_int, s_int) in enumerate(zip(grid[:-1], grid[1:])):
        if i not in window:  # outside the explored window: the model's own step, no reward call
            t, s = sampler._times(t_int, s_int, n)
            z = model.step(z, t, s, cond.node_mask, cond.context, eta=config.eta,
                           noise=shard.noise(model, generator)).sample
            continue
        exp = sampler.explore(z, t_int, s_int, shard, generator)
        weights, _ = sampler._weights(exp.values, exp.log_proposal_ratio, cond.targets)
        pick = torch.multinomial(weights, 1, generator=generator).squeeze(1)
        z = exp.candidates[torch.arange(n, device=z.device), pick]
    x0 = model.project(model.predict_x0(z, torch.zeros(n, dtype=torch.long, device=z.device), cond.node_mask,
                                        cond.context),
                       cond.node_mask)
    return x0, cond, sampler._local_calls


_EXPLORATION_FIELDS = ("candidates", "perturbations", "log_proposal_ratio", "values", "valid", "reward_calls",
                       "reference_mean")


def _shard_to_state(shard: BatchShard) -> dict[str, Any]:
    """A batch shard as plain tensors and numbers (checkpoints load with weights_only)."""
    g = shard.global_conditions
    return {"start": shard.start, "stop": shard.stop, "shape": list(g.shape), "node_mask": g.node_mask,
            "context": g.context, "targets": g.targets}


def _shard_from_state(state: dict[str, Any]) -> BatchShard:
    conditions = Conditions(tuple(state["shape"]), state["node_mask"], state["context"], state["targets"])
    return BatchShard(conditions, state["start"], state["stop"])


def _replay_to_state(cached: tuple) -> dict[str, Any]:
    """A replayed exploration as plain tensors and numbers."""
    step, shard, items, metrics = cached
    return {"step": step, **_shard_to_state(shard), "metrics": dict(metrics),
            "items": [{"z_t": z_t, "t": t_int, "s": s_int, "weights": weights,
                       **{name: getattr(exp, name) for name in _EXPLORATION_FIELDS}}
                      for z_t, t_int, s_int, exp, weights in items]}


def _replay_from_state(state: dict[str, Any]) -> tuple:
    shard = _shard_from_state(state)
    items = [(item["z_t"], item["t"], item["s"], Exploration(**{name: item[name] for name in _EXPLORATION_FIELDS}),
              item["weights"]) for item in state["items"]]
    return state["step"], shard, items, state["metrics"]


def reward_metrics(final: Scores) -> dict[str, float]:
    """Reward statistics of a batch of final samples, logged by every reward-driven objective."""
    values = final.values
    out = {"reward_mean": values.mean().item(), "reward_median": values.median().item(),
           "reward_max": values.max().item(), "invalid_fraction": 1.0 - final.valid.float().mean().item()}
    if final.property is not None and torch.isfinite(final.property).any():
        out["property_mean"] = final.property[torch.isfinite(final.property)].mean().item()
    return out


def _per_value(targets: Tensor | None, values: Tensor) -> Tensor | None:
    """One target per entry of ``values`` (flattened), from targets over its leading dims."""
    if targets is None:
        return None
    return targets.view(*targets.shape, *([1] * (values.dim() - targets.dim()))).expand_as(values).reshape(-1)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
