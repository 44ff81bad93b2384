"""Reward-weighted regression (RWR) on the model's samples, plain or relative to the reference.

Each iteration draws a batch of final samples x_0 and minimises the denoising loss weighted by
self-normalised weights w = softmax(log_w) over the batch:

    plain               log_w = beta · r(x_0),  x_0 ~ pi_theta                (Black et al. 2023's RWR)
    reference_samples   log_w = beta · r(x_0),  x_0 ~ pi_ref
    importance_ratio    log_w = beta · r(x_0) + log pi_ref(traj) - log pi_theta(traj),  x_0 ~ pi_theta

Plain RWR re-tilts its own samples every iteration, so it keeps climbing the reward (no fixed
point under a linear reward). The two variants relative to the frozen reference pi_ref weight
samples towards the fixed pay-off distribution pi_ref · exp(beta · r): the weighted denoising loss is
a maximum-likelihood fit to it, whose optimum is the pay-off itself (beta = 1 / tau). The
importance-ratio variant is what RGDM's sequence-level variant computes; the reference-samples one
needs no trajectory log-probabilities but never sees where the current model puts its mass. The
importance-ratio weights are truncated relative to the batch (``truncate_weights``, Ionides 2008),
never by an absolute clip of the log-ratio, which would erase the reference once the policy drifts.

Rewards enter raw by default (beta in inverse reward units, so beta = 1 / tau gives the pay-off of
temperature tau); with ``normalize_rewards`` they are first normalised per target by a running
mean/std fitted on every weighted reward (invalid samples' penalties included), and beta is then in
inverse reward standard deviations.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor

from rgdm import distributed
from rgdm.config import RWRConfig
from rgdm.diffusion.gaussian import GaussianDiffusion
from rgdm.training.ddpo import checked_rewards
from rgdm.training.normalizer import RewardNormalizer
from rgdm.training.payoff_weights import effective_sample_size, truncate_weights
from rgdm.training.rollouts import collect_trajectories, first_step_kl, reward_metrics, weighted_denoising_loss
from rgdm.training.tasks import BatchShard, Task, task_stats


class RWRObjective:
    """Reward-weighted denoising loss on fresh samples, as a loss on the shared training loop."""

    def __init__(self, model: GaussianDiffusion, task: Task, config: RWRConfig, seed: int = 0):
        config.validate()
        self.config = config
        self.task = task
        self.seed = seed
        self.name = "rwr" if config.variant == "plain" else f"rwr-{config.variant.replace('_', '-')}"
        needs_reference = config.variant != "plain" or config.first_step_kl > 0
        self.reference = copy.deepcopy(model).eval().requires_grad_(False) if needs_reference else None
        self.normalizer = RewardNormalizer(config.normalizer_buffer, config.normalizer_min_count)
        self.reward_calls = 0

    def loss(self, model: GaussianDiffusion, step: int) -> tuple[Tensor, dict[str, float]]:
        """This rank's share of the weighted denoising loss (weights over the global batch)."""
        cfg = self.config
        generator = distributed.generator_on(distributed.module_device(model), self.seed * 1_000_003 + step)
        shard = BatchShard.of(self.task.conditions(cfg.batch_size, generator))
        x0, log_base = self._samples(model, shard, generator)
        scores = self.task.score(x0, shard.conditions).gathered(shard)
        self.reward_calls += shard.global_size
        targets = shard.global_conditions.targets
        log_weights = cfg.beta * self._scaled(checked_rewards(scores), targets) + log_base
        all_weights = torch.softmax(log_weights, dim=0)
        if cfg.variant == "importance_ratio" and cfg.truncate_weights:
            all_weights = truncate_weights(all_weights)
        x0 = model.snap_to_data(x0, shard.conditions.node_mask)
        loss = weighted_denoising_loss(model, x0, shard, shard.local(all_weights), cfg.denoising_repeats, generator)
        metrics = reward_metrics(scores)
        if cfg.first_step_kl > 0:  # drawn after the samples and the loss's noise: those stay the same
            grid = model.time_grid(cfg.sampling_steps or None)
            first_kl = first_step_kl(model, self.reference, shard, generator, grid, cfg.eta)
            loss = loss + cfg.first_step_kl * first_kl
            metrics["first_step_kl"] = first_kl.item()  # this rank's share
        ess = effective_sample_size(log_weights).item()
        metrics.update({"ess": ess, "ess_fraction": ess / shard.global_size, "weight_max": all_weights.max().item()})
        data_loss = self.task.data_loss(model, step) if cfg.lambda_mle > 0 else None
        if data_loss is not None:
            loss = loss + cfg.lambda_mle * data_loss
            metrics["mle_loss"] = data_loss.item()  # this rank's share
        metrics["reward_calls"] = float(self.reward_calls)
        metrics.update(task_stats(self.task))
        return loss, metrics

    @torch.no_grad()
    def _samples(self, model: GaussianDiffusion, shard: BatchShard,
                 generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """This rank's final samples of the iteration and the log-weight each gets before the reward
        ([B_global]: gathered over ranks)."""
        cfg = self.config
        grid = model.time_grid(cfg.sampling_steps or None)
        if cfg.variant == "importance_ratio":
            traj = collect_trajectories(model, shard, grid, cfg.eta, generator, self.reference)
            log_ratio = shard.gather(traj.log_ratio(skip_final_step=not cfg.final_step_in_ratio))
            return traj.x0, log_ratio
        sampler = self.reference if cfg.variant == "reference_samples" else model
        traj = collect_trajectories(sampler, shard, grid, cfg.eta, generator, stochastic=False)
        return traj.x0, torch.zeros(shard.global_size, device=traj.x0.device)

    def _scaled(self, rewards: Tensor, targets: Tensor | None) -> Tensor:
        """Rewards in the units beta applies to: raw, or normalised per target (statistics of every
        weighted reward, so that an invalid sample's penalty keeps its size relative to the others)."""
        if not self.config.normalize_rewards:
            return rewards
        self.normalizer.update(rewards, targets)
        return self.normalizer.normalize(rewards, targets)

    def state_dict(self) -> dict[str, Any]:
        return {"normalizer": self.normalizer.state_dict(), "reward_calls": self.reward_calls,
                "task": self.task.state_dict(),
                "reference": None if self.reference is None else self.reference.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.normalizer.load_state_dict(state["normalizer"])
        self.reward_calls = int(state["reward_calls"])
        self.task.load_state_dict(state["task"])
        if self.reference is not None and state.get("reference") is not None:
            self.reference.load_state_dict(state["reference"])
