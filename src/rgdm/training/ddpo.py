"""DDPO: policy-gradient fine-tuning of a diffusion sampler (Black et al. 2023), with DPOK's KL option.

Sampling is an MDP: the state is (z_t, t, c), the action z_s ~ pi_theta(. | z_t) = N(mu_theta, std^2 I)
(a stochastic sampler, eta > 0, so that every action has a log-probability), and the reward r(x_0, c)
arrives at the end. DDPO estimates the gradient of E[r] from trajectories of the sampler:

    DDPO_SF   loss = -mean_t A · log pi_theta(z_s | z_t)                                (on-policy)
    DDPO_IS   loss = mean_t max(-A·rho_t, -A·clip(rho_t, 1 - eps, 1 + eps)),  rho_t = pi_theta / pi_old

with A the advantage of the trajectory: its reward normalised per target by a stat tracker (DDPO's
PerPromptStatTracker: the target's buffer of recent rewards once it holds ``tracker_min_count``
values, else the current batch), clipped to [-adv_clip, adv_clip]. As in DDPO, log-probabilities are
per dimension (divided by the state's dof; DDPO averages over pixels), which is the scale the clip
range 1e-4 refers to, and the loss averages over a random subset of the steps of each trajectory.

PPO-clip (``method: ppo``; the baseline RLPF, arXiv 2508.16521, fine-tunes EDM with) is DDPO_IS with
several inner epochs over each batch and advantages normalised within the batch
(``advantage_baseline = "batch"``) instead of by the running tracker; KL is optional as below.

KL option (DPOK, Fan et al. 2023): maximise E[r] - kl_coef · E[Σ_t KL_t] with
KL_t = KL(pi_theta(. | z_t) || pi_ref(. | z_t)) = ||mu_theta - mu_ref||^2 / (2 std^2) (both policies
share the step std). Its gradient has two parts and we use both: the score-function part sees the
penalised reward r - kl_coef · Σ_t KL_t, and the pathwise part kl_coef · ∇KL_t at the visited states
(DPOK's term; it is the only part that acts when KL_t does not depend on the state). With raw
advantages (``normalize_advantages = False``) and kl_coef = tau the optimum is the pay-off
distribution pi_ref · exp(r / tau); with normalised advantages tau is in units of the reward's std.

One trainer step is one optimizer update. A batch of trajectories is collected every
``inner_epochs · minibatches`` steps and replayed from memory by the following steps (PPO-style inner
epochs over shuffled minibatches). The stored batch is part of ``state_dict``: a run resumed in the
middle of a replay cycle continues with exactly the trajectories it had collected.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from rgdm import distributed
from rgdm.config import DDPOConfig
from rgdm.diffusion.gaussian import GaussianDiffusion
from rgdm.training.normalizer import RewardNormalizer
from rgdm.training.rollouts import Trajectories, collect_trajectories, first_step_kl, gaussian_kl, reward_metrics
from rgdm.training.tasks import BatchShard, Conditions, Scores, Task, task_stats

# ------------------------------------------------------------------------------------------------- #
# Trajectories of the sampler.


def checked_rewards(scores: Scores) -> Tensor:
    """The reward values, refusing NaN/inf (a reward must give invalid samples a finite penalty)."""
    if not torch.isfinite(scores.values).all():
        raise ValueError("the reward returned non-finite values; give invalid samples a finite penalty instead")
    return scores.values


# ------------------------------------------------------------------------------------------------- #
# Advantages.


def tracked_advantages(tracker: RewardNormalizer, rewards: Tensor, targets: Tensor | None,
                       normalize: bool = True) -> Tensor:
    """DDPO's per-prompt advantages: (r - mean) / std from the target's buffer once it holds
    ``min_count`` rewards, else from the whole current batch. The buffers are updated first."""
    tracker.update(rewards, targets)
    keys = ["none"] * len(rewards) if targets is None else [tracker.bucket(t) for t in targets.tolist()]
    batch_mean, batch_std = rewards.mean(), rewards.std() if len(rewards) > 1 else torch.tensor(1.0)
    advantages = torch.empty_like(rewards)
    for i, key in enumerate(keys):
        buffer = tracker.buffers.get(key, [])
        if len(buffer) >= tracker.min_count:
            values = torch.tensor(buffer, dtype=rewards.dtype)
            mean, std = values.mean(), values.std()
        else:
            mean, std = batch_mean, batch_std
        advantages[i] = (rewards[i] - mean) / (std + 1e-6) if normalize else rewards[i] - mean
    return advantages


def batch_advantages(rewards: Tensor, targets: Tensor | None, normalize: bool = True) -> Tensor:
    """PPO's advantages: (r - mean) / std over this batch's samples of the same target (RLPF)."""
    keys = torch.zeros(len(rewards), device=rewards.device) if targets is None else targets
    advantages = torch.zeros_like(rewards)
    for key in keys.unique():
        group = keys == key
        values = rewards[group]
        centred = values - values.mean()
        if normalize and len(values) > 1:
            centred = centred / (values.std() + 1e-6)
        advantages[group] = centred
    return advantages


# ------------------------------------------------------------------------------------------------- #
# The objective.


@dataclass
class ReplayBatch:
    """A collected batch as the replay steps need it (all tensors: it is saved in checkpoints).

    In a data-parallel run each rank holds the trajectories of its rows ``[start, start + n)`` of
    the global batch of ``global_size`` (and their advantages, computed from all ranks' rewards).
    """

    trajectories: Trajectories
    advantages: Tensor  # [n], clipped
    collected_at: int  # trainer step of the collection
    metrics: dict[str, float]
    start: int = 0
    global_size: int = 0  # 0: this rank holds the whole batch

    def __post_init__(self) -> None:
        self.global_size = self.global_size or self.advantages.shape[0]

    def state_dict(self) -> dict[str, Any]:
        traj = self.trajectories
        return {
            "conditions": {f.name: getattr(traj.conditions, f.name) for f in fields(Conditions)},
            **{f.name: getattr(traj, f.name) for f in fields(Trajectories) if f.name != "conditions"},
            "advantages": self.advantages, "collected_at": self.collected_at, "metrics": dict(self.metrics),
            "start": self.start, "global_size": self.global_size,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], device: torch.device | str = "cpu") -> ReplayBatch:
        """Rebuild a saved batch on ``device`` (checkpoints are read onto the CPU)."""
        on = lambda v: v.to(device) if isinstance(v, Tensor) else v  # noqa: E731
        state = {key: on(value) for key, value in state.items()}
        cond = {key: on(value) for key, value in state["conditions"].items()}
        cond["shape"] = tuple(cond["shape"])
        traj = Trajectories(Conditions(**cond), **{f.name: state[f.name] for f in fields(Trajectories)
                                                     if f.name != "conditions"})
        return cls(traj, state["advantages"], int(state["collected_at"]), dict(state["metrics"]),
                   int(state.get("start", 0)), int(state.get("global_size", 0)))


class DDPOObjective:
    """DDPO_SF or DDPO_IS (optionally with DPOK's KL penalty) as a loss on the shared training loop.

    Data-parallel: every rank rolls out its shard of the global batch; rewards (and KLs) are gathered
    so that the stat tracker and the advantages are those of the whole batch on every rank; each
    rank's loss is the sum over its (trajectory, step) terms divided by the global count.
    """

    def __init__(self, model: GaussianDiffusion, task: Task, config: DDPOConfig, seed: int = 0,
                 name: str | None = None):
        config.validate()
        self.config = config
        self.task = task
        self.seed = seed
        self.name = name or f"ddpo-{config.variant}" + ("-kl" if config.kl_coef > 0 else "")
        needs_reference = config.kl_coef > 0 or config.first_step_kl > 0
        self.reference = copy.deepcopy(model).eval().requires_grad_(False) if needs_reference else None
        self.tracker = RewardNormalizer(config.tracker_buffer, config.tracker_min_count)
        self.reward_calls = 0
        self.batch: ReplayBatch | None = None
        self.device = distributed.module_device(model)  # where a resumed replay batch goes

    def loss(self, model: GaussianDiffusion, step: int) -> tuple[Tensor, dict[str, float]]:
        cfg = self.config
        generator = distributed.generator_on(distributed.module_device(model), self.seed * 1_000_003 + step)
        update = step % cfg.updates_per_batch
        if update == 0 or self.batch is None:
            self.batch = self._collect(model, step, generator)
            update = 0
        rows = self._minibatch(update)
        loss, metrics = self._policy_loss(model, rows, generator)
        if cfg.first_step_kl > 0:  # drawn after the policy loss's steps: those stay the same
            grid = model.time_grid(cfg.sampling_steps or None)
            prior = BatchShard.of(self.task.conditions(cfg.batch_size, generator))  # fresh node counts too
            first_kl = first_step_kl(model, self.reference, prior, generator, grid, cfg.eta)
            loss = loss + cfg.first_step_kl * first_kl
            metrics["first_step_kl"] = first_kl.item()
        data_loss = self.task.data_loss(model, step) if cfg.lambda_mle > 0 else None
        if data_loss is not None:
            loss = loss + cfg.lambda_mle * data_loss
            metrics["mle_loss"] = data_loss.item()
        metrics.update(self.batch.metrics)
        metrics["reward_calls"] = float(self.reward_calls)
        metrics.update(task_stats(self.task))
        return loss, metrics

    # -- collection ------------------------------------------------------------------------- #

    def _collect(self, model: GaussianDiffusion, step: int, generator: torch.Generator) -> ReplayBatch:
        cfg = self.config
        shard = BatchShard.of(self.task.conditions(cfg.batch_size, generator))
        grid = model.time_grid(cfg.sampling_steps or None)
        kl_reference = self.reference if cfg.kl_coef > 0 else None
        traj = collect_trajectories(model, shard, grid, cfg.eta, generator, kl_reference)
        scores = self.task.score(traj.x0, shard.conditions).gathered(shard)
        self.reward_calls += shard.global_size
        rewards = checked_rewards(scores)
        metrics = reward_metrics(scores)
        if traj.kl is not None:
            kl = shard.gather(traj.kl.sum(0))
            rewards = rewards - cfg.kl_coef * kl
            metrics["kl_to_reference"] = kl.mean().item()
        if cfg.advantage_baseline == "batch":
            advantages = batch_advantages(rewards, shard.global_conditions.targets, cfg.normalize_advantages)
        else:
            advantages = tracked_advantages(self.tracker, rewards, shard.global_conditions.targets,
                                            cfg.normalize_advantages)
        advantages = advantages.clamp(-cfg.adv_clip, cfg.adv_clip)
        metrics["advantage_abs_mean"] = advantages.abs().mean().item()
        return ReplayBatch(traj, shard.local(advantages), step, metrics, shard.start, shard.global_size)

    def _minibatch(self, update: int) -> Tensor:
        """Global trajectory indices of this update: a slice of a per-epoch shuffle of the batch."""
        cfg, batch = self.config, self.batch
        epoch, part = divmod(update, cfg.minibatches)
        if cfg.minibatches == 1:
            return torch.arange(batch.global_size)
        shuffle = torch.Generator().manual_seed((self.seed * 1_000_003 + batch.collected_at) * 997 + epoch)
        order = torch.randperm(batch.global_size, generator=shuffle)
        return order.view(cfg.minibatches, -1)[part]

    # -- the loss --------------------------------------------------------------------------- #

    def _policy_loss(self, model: GaussianDiffusion, rows: Tensor,
                     generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        """This rank's share of the mean policy loss over the minibatch's (trajectory, step) terms."""
        cfg, batch, traj = self.config, self.batch, self.batch.trajectories
        n_steps = traj.log_probs.shape[0]
        k = max(1, round(cfg.timestep_fraction * n_steps))
        # DDPO trains on a random subset of steps, drawn independently for every trajectory.
        rows = rows.to(traj.x0.device)
        steps = torch.rand(len(rows), n_steps, generator=generator, device=rows.device).argsort(dim=1)[:, :k]
        n_terms = len(rows) * k
        mine = (rows >= batch.start) & (rows < batch.start + traj.x0.shape[0])  # rows this rank rolled out
        steps = steps[mine].reshape(-1)
        rows = (rows[mine] - batch.start).repeat_interleave(k)
        grid = torch.tensor(traj.grid, device=rows.device)
        cond = traj.conditions.select(rows)
        z_t, z_s = traj.states[steps, rows], traj.states[steps + 1, rows]
        t, s = grid[steps], grid[steps + 1]
        mean, std = model.step_distribution(z_t, t, s, cond.node_mask, cond.context, cfg.eta)
        dof = model.dof(z_t, cond.node_mask)
        log_prob = model.log_prob(z_s, mean, std, cond.node_mask) / dof  # per dimension, as DDPO's
        advantages = batch.advantages[rows]
        metrics: dict[str, float] = {}
        if cfg.variant == "sf":
            loss = -(advantages * log_prob).sum() / n_terms
        else:
            log_ratio = log_prob - traj.log_probs[steps, rows] / dof
            ratio = log_ratio.exp()
            unclipped = -advantages * ratio
            clipped = -advantages * ratio.clamp(1.0 - cfg.clip_range, 1.0 + cfg.clip_range)
            loss = torch.maximum(unclipped, clipped).sum() / n_terms
            # Diagnostics of this rank's terms (rank 0's are logged).
            metrics["approx_kl"] = 0.5 * log_ratio.detach().pow(2).mean().item()
            metrics["clip_fraction"] = ((ratio.detach() - 1.0).abs() > cfg.clip_range).float().mean().item()
        if cfg.kl_coef > 0:
            reference_mean, _ = self.reference.step_distribution(z_t, t, s, cond.node_mask, cond.context, cfg.eta)
            kl = gaussian_kl(model, mean, reference_mean, std, cond.node_mask) / dof
            loss = loss + cfg.kl_coef * kl.sum() / n_terms
        return loss, metrics

    # -- state ------------------------------------------------------------------------------ #

    def state_dict(self) -> dict[str, Any]:
        return {"tracker": self.tracker.state_dict(), "reward_calls": self.reward_calls,
                "task": self.task.state_dict(),
                "reference": None if self.reference is None else self.reference.state_dict(),
                "batch": None if self.batch is None else self.batch.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tracker.load_state_dict(state["tracker"])
        self.reward_calls = int(state["reward_calls"])
        self.task.load_state_dict(state["task"])
        if self.reference is not None and state.get("reference") is not None:
            self.reference.load_state_dict(state["reference"])
        self.batch = (None if state.get("batch") is None
                      else ReplayBatch.from_state_dict(state["batch"], self.device))
