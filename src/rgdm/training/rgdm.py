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

This module holds the objective and sampling-time exploration (``explore_sample``); its parts live
beside it: the weights and the temperature in ``payoff_weights``, the candidates and their look-ahead
values in ``rgdm_exploration``, the sequence level in ``rgdm_sequence`` and the checkpointed batches
in ``rgdm_state``. Their public names are importable from here too.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import Tensor

from rgdm import distributed
from rgdm.config import ConfigError, RGDMConfig
from rgdm.diffusion.gaussian import GaussianDiffusion, MixedDenoiser
from rgdm.training.normalizer import RewardNormalizer
from rgdm.training.payoff_weights import (
    effective_sample_size,
    jackknife_weights,
    payoff_log_weights,
    shrink_toward_mean,
    soft_values,
    temperature_for_ess,
    truncate_weights,
    value_signal_fraction,
)
from rgdm.training.rgdm_exploration import Exploration, explore, lookahead, unit_directions
from rgdm.training.rgdm_sequence import (
    EarlyPath,
    ScoredRollouts,
    early_path,
    early_path_loss,
    pool_weights,
    sequence_loss,
)
from rgdm.training.rgdm_state import pool_from_state, pool_to_state, replay_from_state, replay_to_state
from rgdm.training.rollouts import collect_trajectories, draw_sorted, first_step_kl, reward_metrics, step_times
from rgdm.training.tasks import BatchShard, Conditions, Task, task_stats

__all__ = ["Exploration", "RGDMObjective", "ScoredRollouts", "effective_sample_size", "explore_sample",
           "jackknife_weights", "payoff_log_weights", "reward_metrics", "temperature_for_ess", "truncate_weights",
           "unit_directions"]


class RGDMObjective:
    """Step-level or sequence-level RGDM on a trainable policy, relative to a frozen copy of it.

    Data-parallel: every rank rolls out and explores its shard of the global batch (noise drawn for
    the global batch, see ``BatchShard``) and calls the reward on its own samples; rewards are
    gathered so that the normaliser, the temperature and the weights are those of the whole batch
    on every rank, and each rank's loss is the sum over its rows divided by the global batch size.

    ``reference_refresh: R`` copies the policy into the reference every R optimizer steps: each segment
    then targets the pay-off of the last copy, pi_k · exp(r / tau), a KL-bounded improvement step (mirror
    descent on the reward) instead of one fixed pay-off of the pre-trained model. The targets then keep
    climbing the reward, and the importance ratios of the sequence level stay near 1.

    ``reference_base_mix: alpha`` makes each copy the step-wise geometric mixture pi_k^(1 - alpha) ·
    pi_base^alpha of the policy and the pre-trained model (``MixedDenoiser``). The iterations then stop
    climbing where pi = pi^(1 - alpha) · pi_base^alpha · exp(r / tau), i.e. at the pay-off of the
    pre-trained model at temperature alpha · tau, instead of sharpening without end.

    ``atom_type_kl: w`` adds, at each explored step, w times the KL of the policy's step to the frozen
    pre-trained model's restricted to the node features (on molecules: the atom types), in the
    regression's units (``_kl_to_reference``). The step's positions stay free to follow the pay-off; its
    composition is held near the pre-trained model's, which the pay-off itself barely moves
    (docs/physics.md: it stops the refreshed step level's drift toward hydrocarbons, not its loss of novelty).
    """

    def __init__(self, model: GaussianDiffusion, task: Task, config: RGDMConfig, seed: int = 0):
        config.validate()
        self.config = config
        self.task = task
        self.name = f"rgdm-{config.variant}"
        self.reference = copy.deepcopy(model).eval().requires_grad_(False)
        if config.reference_base_mix > 0:  # the copy's share, then the frozen pre-trained model's
            denoiser = self.reference.denoiser
            self.reference.denoiser = MixedDenoiser(denoiser, copy.deepcopy(denoiser), config.reference_base_mix)
        self.base: GaussianDiffusion | None = None  # the frozen pre-trained model, for atom_type_kl
        if config.atom_type_kl > 0:
            if not model.has_node_features:
                raise ConfigError("rgdm.atom_type_kl: holds the node features (atom types) of a molecule model; "
                                  f"{type(model).__name__} has none")
            self.base = copy.deepcopy(model).eval().requires_grad_(False)
        self.normalizer = RewardNormalizer(config.normalizer_buffer, config.normalizer_min_count)
        self.reward_calls = 0  # over all ranks
        self._local_calls = 0  # this rank's calls during the current step
        self._replay_cache: tuple | None = None  # (step, shard, explored items, metrics) while replayed
        self._explored: list[tuple] = []  # the last ``explored_pool`` explorations (when > 1), newest last
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

    # -- look-ahead and exploration (``rgdm_exploration``) ----------------------------------- #

    def lookahead(self, z_s: Tensor, s_int: int, cond: Conditions, shard: BatchShard | None = None,
                  repeats: int = 1, generator=None) -> tuple[Tensor, Tensor]:
        """V(z_s) of ``z_s``: raw rewards and validity (see ``rgdm_exploration.lookahead``)."""
        return lookahead(self, z_s, s_int, cond, shard, repeats, generator)

    def explore(self, z_t: Tensor, t_int: int, s_int: int, shard: BatchShard, generator=None) -> Exploration:
        """K candidates of the step t -> s with feasible shifts (see ``rgdm_exploration.explore``)."""
        return explore(self, z_t, t_int, s_int, shard, generator)

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
        refresh = self.config.reference_refresh
        if refresh and step > 0 and step % refresh == 0:  # a trust-region iteration: the pay-off of the last copy
            self._refresh_reference(model)
        if self.config.variant == "sequence":
            loss, metrics = sequence_loss(self, model, shard, generator, step)
        else:
            loss, metrics = self._step_loss(model, shard, generator, step)
        if self.config.first_step_kl > 0:  # drawn after the exploration: its random numbers stay the same
            first_kl = self._first_step_kl(model, shard, generator)
            loss = loss + self.config.first_step_kl * first_kl
            metrics["first_step_kl"] = first_kl.item()  # this rank's share
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

    def _refresh_reference(self, model: GaussianDiffusion) -> None:
        """Copy the policy into pi_ref (into its mixed share, with ``reference_base_mix``), and empty the
        pools of weighted batches (the sequence level's roll-outs, the step level's explorations): their
        weights point toward the old copy's pay-off, so each segment fits its own pay-off on batches
        drawn after the refresh (a refresh falls on a fresh batch: ``reference_refresh`` is a multiple
        of the replay)."""
        if isinstance(self.reference.denoiser, MixedDenoiser):
            self.reference.denoiser.current.load_state_dict(model.denoiser.state_dict())
        else:
            self.reference.load_state_dict(model.state_dict())
        self._pool = []
        self._explored = []
        self._replay_cache = None

    def _weights(self, values: Tensor, log_base: Tensor, targets: Tensor | None,
                 fit_normalizer: bool = True, candidates: bool = True) -> tuple[Tensor, Tensor]:
        """Self-normalised pay-off weights along the candidates' dim and the temperature used, per row.

        ``values`` is [rows, K] or [rows, K, M] (M look-ahead samples), ``log_base`` [rows, K] and
        ``targets`` [rows] or [rows, K]. The normaliser is fitted on every value that is weighted,
        invalid samples' penalties included: fitted on valid ones only, a fixed penalty would become a
        huge negative z-score, and the weights a validity filter at a far lower effective temperature.
        Called with the *global* batch's values on every rank, so that the normaliser's state and the
        weights are identical across ranks (and to a single-process run). ``fit_normalizer=False``
        reweights values the normaliser has already seen (a replayed or pooled batch). The jackknife
        (over antithetic candidate groups) is the step variant's, for its candidates only
        (``candidates=False``: whole roll-outs, as the hybrid's early steps weight them). With ``value_shrinkage`` the
        candidates' soft values are first shrunk toward their mean by the share of their spread that is
        not look-ahead noise (``shrink_toward_mean``), estimated over all ``rows`` (one explored step).
        ``value_estimate: mean`` replaces the soft value of M continuations by their mean reward.
        """
        cfg = self.config
        if cfg.normalize_rewards and fit_normalizer:
            self.normalizer.update(values.reshape(-1), _per_value(targets, values))
        scaled = self._scaled(values, targets)
        samples = _has_samples(values, log_base)
        fraction = value_signal_fraction(scaled) if cfg.value_shrinkage and samples else None
        if samples and cfg.value_estimate == "mean":  # risk-neutral: E[r], not the soft value's risk-seeking mean
            scaled = scaled.mean(dim=-1)
        if cfg.adapt_tau:
            tau = temperature_for_ess(scaled, log_base, cfg.target_ess * log_base.shape[-1])
        else:
            tau = torch.full(log_base.shape[:-1], cfg.tau, dtype=values.dtype, device=values.device)
        if fraction is not None:
            per_candidate = soft_values(scaled, tau) if scaled.dim() > log_base.dim() else scaled
            scaled = shrink_toward_mean(per_candidate, fraction)
        log_weights = payoff_log_weights(scaled, tau, log_base)
        groups = log_base.shape[-1] // (2 if cfg.antithetic else 1)
        if cfg.weight_normalisation == "jackknife" and cfg.variant == "step" and candidates and groups >= 2:
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
        cfg = self.config
        cached = self._replay_cache
        if not self.replaying(step):
            cached = (step, *self._explore_batch(model, shard, generator))
            self._replay_cache = cached if cfg.replay > 1 or cfg.explored_pool > 1 else None
            self._explored = [*self._explored, cached][-cfg.explored_pool:] if cfg.explored_pool > 1 else []
        # ``explored_pool`` > 1: the last explored batches together (each target is exact whenever it was
        # explored), so an optimizer step averages more states at no extra reward call.
        explorations = self._explored or [cached]
        count = sum(len(items) for _, _, items, _, _ in explorations)
        total = 0.0
        for _, shard, items, _, early in explorations:
            if early is not None:  # the hybrid: sequence weights on the steps before the window
                early_loss = early_path_loss(self, model, early, shard)
                total = total + cfg.early_sequence_weight * early_loss / len(explorations)
            cond = shard.conditions
            for z_t, t_int, s_int, exp, weights in items:
                t, s = self._times(t_int, s_int, cond.batch_size)
                mean, std = model.step_distribution(z_t, t, s, cond.node_mask, cond.context, cfg.eta)
                scale = self._step_scale(model, std, t, s)
                step_loss = self._regression_loss(model, mean, scale, exp, weights, cond).sum()
                if cfg.kl_weight > 0:
                    ref_mean, _ = self.reference.step_distribution(z_t, t, s, cond.node_mask, cond.context,
                                                                   cfg.eta)
                    kl = self._kl_to_reference(model, mean, ref_mean, scale, cond.node_mask)
                    step_loss = step_loss + cfg.kl_weight * kl.sum()
                if self.base is not None:
                    step_loss = step_loss + cfg.atom_type_kl * self._atom_type_kl(model, z_t, t, s, mean, scale,
                                                                                  cond).sum()
                total = total + step_loss / shard.global_size / count  # this rank's share of the mean
        return total, dict(cached[3])

    @torch.no_grad()
    def _explore_batch(self, model: GaussianDiffusion, shard: BatchShard,
                       generator) -> tuple[BatchShard, list, dict, EarlyPath | None]:
        """Roll out the current model, explore ``explore_steps`` of its states inside the window and
        weight the candidates: (shard, [(z_t, t, s, exploration, local weights)], metrics, early path).
        With ``early_sequence_weight`` > 0 the roll-outs' steps before the window are kept with their
        sequence-level weights (``rgdm_sequence.early_path``; no extra reward call), else None."""
        cfg, cond = self.config, shard.conditions
        grid = self._grid(model)
        traj = collect_trajectories(model, shard, grid, cfg.eta, generator, stochastic=False)
        final = self.task.score(traj.x0, cond).gathered(shard)
        self._local_calls += cond.batch_size
        window = self.explored_pairs(grid, model.timesteps)
        picks = [window[i] for i in draw_sorted(len(window), cfg.explore_steps, generator)]  # window is increasing
        items, ess_all, entropy_all, tau_all, signal_all = [], [], [], [], []
        for idx in picks:
            t_int, s_int = grid[idx], grid[idx + 1]
            z_t = traj.states[idx]
            exp = self.explore(z_t, t_int, s_int, shard, generator)
            values, targets = shard.gather(exp.values), shard.global_conditions.targets
            all_weights, tau = self._weights(values, shard.gather(exp.log_proposal_ratio), targets)
            items.append((z_t, t_int, s_int, exp, shard.local(all_weights)))
            probabilities = all_weights / all_weights.sum(-1, keepdim=True)
            ess_all.append(effective_sample_size(torch.log(probabilities.clamp(min=1e-30))).mean().item())
            entropy_all.append(-(probabilities * torch.log(probabilities.clamp(min=1e-30))).sum(-1).mean().item())
            tau_all.append(tau.mean().item())
            if _has_samples(values, exp.log_proposal_ratio):
                signal_all.append(value_signal_fraction(self._scaled(values, targets)).item())
        metrics = reward_metrics(final)
        metrics.update({"ess": _mean(ess_all), "ess_fraction": _mean(ess_all) / cfg.num_candidates,
                        "weight_entropy": _mean(entropy_all), "tau": _mean(tau_all)})
        if signal_all:  # the share of the candidates' value spread that is not look-ahead noise
            metrics["value_signal"] = _mean(signal_all)
        early = None
        before = [i for i in range(len(grid) - 1) if i < min(window)]
        if cfg.early_sequence_weight > 0 and before:  # after the candidates: the normaliser has seen the batch
            early, early_metrics = early_path(self, model, traj, final.values, shard, before)
            metrics.update(early_metrics)
        return shard, items, metrics, early

    def _first_step_kl(self, model: GaussianDiffusion, shard: BatchShard, generator) -> Tensor:
        """The exact KL of the first reverse step to the reference (``rollouts.first_step_kl``)."""
        return first_step_kl(model, self.reference, shard, generator, self._grid(model), self.config.eta)

    @staticmethod
    def _kl_to_reference(model: GaussianDiffusion, mean: Tensor, reference_mean: Tensor, scale: Tensor,
                         node_mask: Tensor | None) -> Tensor:
        """KL(pi_theta || pi_ref) of one step, |mean - mean_ref|^2 / (2 std^2) / dof, with std replaced
        by the regression's per-step scale: kl_weight then trades the two terms off in one unit at
        every step (with ``loss_weighting: likelihood`` it is the exact KL per dimension)."""
        return 0.5 * model.sq_norm(mean - reference_mean, node_mask) / scale**2 / model.dof(mean, node_mask)

    def _atom_type_kl(self, model: GaussianDiffusion, z_t: Tensor, t: Tensor, s: Tensor, mean: Tensor,
                      scale: Tensor, cond: Conditions) -> Tensor:
        """The KL of one step to the pre-trained model's on the node features alone, per row [B]:
        |mean_h - mean_base_h|^2 / (2 scale^2) / dof, in the units of ``_kl_to_reference``."""
        base_mean, _ = self.base.step_distribution(z_t, t, s, cond.node_mask, cond.context, self.config.eta)
        return self._kl_to_reference(model, model.node_features_only(mean), model.node_features_only(base_mean),
                                     scale, cond.node_mask)

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

    def _pool_weights(self, pool: list[ScoredRollouts]) -> tuple[list[Tensor], dict[str, float]]:
        """The sequence level's weights over ``pool`` and its metrics (see ``rgdm_sequence.pool_weights``)."""
        return pool_weights(self, pool)

    def state_dict(self) -> dict[str, Any]:
        state = {"normalizer": self.normalizer.state_dict(), "reward_calls": self.reward_calls,
                 "task": self.task.state_dict(), "reference": self.reference.state_dict()}
        if self.base is not None:
            state["base"] = self.base.state_dict()
        if self._replay_cache is not None:
            state["replay_cache"] = replay_to_state(self._replay_cache)
        if self._explored:
            state["explored_pool"] = [replay_to_state(cached) for cached in self._explored]
        if self._pool:
            state["sequence_pool"] = pool_to_state(self._pool)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.normalizer.load_state_dict(state["normalizer"])
        self.reward_calls = int(state["reward_calls"])
        self.task.load_state_dict(state["task"])
        self.reference.load_state_dict(state["reference"])
        if self.base is not None:
            self.base.load_state_dict(state["base"])
        # A run resumed mid-way through a replayed batch goes on with it (bit-for-bit). Only rank 0's
        # rows are checkpointed, so a data-parallel run explores afresh on every rank instead.
        single = distributed.world_size() == 1
        cached = state.get("replay_cache")
        self._replay_cache = replay_from_state(cached) if cached is not None and single else None
        self._explored = [replay_from_state(cached) for cached in state.get("explored_pool", [])] if single else []
        pool = state.get("sequence_pool", []) if single else []
        self._pool = pool_from_state(pool)


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
                           noise=shard.noise(model, generator), score=False).sample
            continue
        exp = sampler.explore(z, t_int, s_int, shard, generator)
        weights, _ = sampler._weights(exp.values, exp.log_proposal_ratio, cond.targets)
        pick = torch.multinomial(weights, 1, generator=generator).squeeze(1)
        z = exp.candidates[torch.arange(n, device=z.device), pick]
    x0 = model.project(model.predict_x0(z, torch.zeros(n, dtype=torch.long, device=z.device), cond.node_mask,
                                        cond.context),
                       cond.node_mask)
    return x0, cond, sampler._local_calls


def _per_value(targets: Tensor | None, values: Tensor) -> Tensor | None:
    """One target per entry of ``values`` (flattened), from targets over its leading dims."""
    if targets is None:
        return None
    return targets.view(*targets.shape, *([1] * (values.dim() - targets.dim()))).expand_as(values).reshape(-1)


def _has_samples(values: Tensor, log_base: Tensor) -> bool:
    """Whether ``values`` holds M >= 2 look-ahead samples per candidate (not so at the last step)."""
    return values.dim() == log_base.dim() + 1 and values.shape[-1] >= 2


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
