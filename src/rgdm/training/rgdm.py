"""RGDM: reward-guided exploration during training (Zhang & Xu, arXiv 2304.07132).

Our reading of the method (docs/rgdm.md has the derivation). The soft-optimal reverse step
relative to the frozen pre-trained model pi_ref is the *pay-off* distribution

    q_pd(z_s | z_t)  ∝  pi_ref(z_s | z_t) · exp(V(z_s) / tau),

with V a look-ahead value: the reward of the reference model's denoised estimate of z_s (Tweedie)
or of a short deterministic roll-out from z_s. RGDM minimises KL(q_pd || pi_theta), i.e. maximises
the log-likelihood of samples from q_pd. Samples come from exploration: K candidates around the
reference mean, candidate k drawn from N(mu_ref + delta_k, std^2) with *feasible shifts* |delta_k|
<= rho·std (delta_0 = 0), and self-normalised importance weights

    w_k ∝ exp(V_k / tau) · pi_ref(z^k | z_t) / q_prop(z^k | z_t),  q_prop = (1/K) Σ_j N(mu_ref + delta_j, std^2)

keep the target exact whatever the shifts. The loss per explored state is
-Σ_k w_k log pi_theta(z^k | z_t) / dof (+ lambda_mle · denoising loss on data, + an optional KL to
pi_ref): a weighted regression of the policy mean onto the candidates, with no reward gradient.

The sequence-level variant weights whole samples x_0 of the current model by
exp(r(x_0)/tau) · pi_ref(trajectory) / pi_theta(trajectory) (self-normalised over the batch,
log-ratio clipped) and minimises the weighted denoising loss on them.
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
from rgdm.training.rollouts import collect_trajectories, weighted_denoising_loss
from rgdm.training.tasks import BatchShard, Conditions, Scores, Task, task_stats

# ------------------------------------------------------------------------------------------------- #
# Reward normalisation and temperature.


class RewardNormalizer:
    """Running mean/std of rewards per target bucket (DDPO's per-prompt stat tracker).

    With normalisation on, tau is measured in standard deviations of the reward: the pay-off
    becomes pi_ref · exp((r - mean) / (std · tau)), i.e. an effective temperature std · tau.
    """

    def __init__(self, buffer_size: int = 512, min_count: int = 16):
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.buffers: dict[str, list[float]] = {}

    @staticmethod
    def bucket(target: float | None) -> str:
        return "none" if target is None or math.isnan(target) else f"{target:.6g}"

    def update(self, values: Tensor, targets: Tensor | None) -> None:
        keys = self._keys(values, targets)
        for key, value in zip(keys, values.tolist()):
            buf = self.buffers.setdefault(key, [])
            buf.append(value)
            del buf[: max(0, len(buf) - self.buffer_size)]

    def normalize(self, values: Tensor, targets: Tensor | None) -> Tensor:
        keys = self._keys(values, targets)
        everything = [v for buf in self.buffers.values() for v in buf]
        out = torch.empty_like(values)
        for i, key in enumerate(keys):
            buf = self.buffers.get(key, [])
            ref = buf if len(buf) >= self.min_count else everything
            ref_t = torch.tensor(ref or [0.0], dtype=values.dtype)
            std = ref_t.std() if len(ref) > 1 else torch.tensor(1.0)
            out[i] = (values[i] - ref_t.mean()) / (std + 1e-6)
        return out

    def _keys(self, values: Tensor, targets: Tensor | None) -> list[str]:
        if targets is None:
            return ["none"] * len(values)
        return [self.bucket(t) for t in targets.tolist()]

    def state_dict(self) -> dict[str, Any]:
        return {"buffers": {k: list(v) for k, v in self.buffers.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffers = {k: list(v) for k, v in state["buffers"].items()}


def effective_sample_size(log_weights: Tensor) -> Tensor:
    """ESS = (Σw)^2 / Σw^2 of unnormalised log-weights along the last dimension."""
    w = torch.softmax(log_weights, dim=-1)
    return 1.0 / (w**2).sum(-1)


def temperature_for_ess(values: Tensor, log_base: Tensor, target_ess: float, low: float = 1e-3,
                        high: float = 1e3, iterations: int = 30) -> Tensor:
    """Per-row tau such that ESS of softmax(values/tau + log_base) ≈ target_ess (bisection in log tau).

    Higher tau flattens the weights (ESS grows), so ESS is monotone in tau for fixed log_base.
    """
    lo = torch.full(values.shape[:-1], math.log(low), dtype=values.dtype)
    hi = torch.full(values.shape[:-1], math.log(high), dtype=values.dtype)
    for _ in range(iterations):
        mid = (lo + hi) / 2
        ess = effective_sample_size(values / mid.exp().unsqueeze(-1) + log_base)
        too_peaked = ess < target_ess
        lo = torch.where(too_peaked, mid, lo)
        hi = torch.where(too_peaked, hi, mid)
    return ((lo + hi) / 2).exp()


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
    values: Tensor  # [B, K] look-ahead rewards (raw)
    valid: Tensor  # [B, K]
    reward_calls: int


class RGDMObjective:
    """Step-level or sequence-level RGDM on a trainable policy, relative to a frozen copy of it.

    Data-parallel: every rank rolls out and explores its shard of the global batch (noise drawn for
    the global batch, see ``BatchShard``) and calls the reward on its own samples; rewards are
    gathered so that the normaliser, the temperature and the weights are those of the whole batch
    on every rank, and each rank's loss is the sum over its rows divided by the global batch size.
    """

    def __init__(self, model: GaussianDiffusion, task: Task, config: RGDMConfig, seed: int = 0):
        self.config = config
        self.task = task
        self.name = f"rgdm-{config.variant}"
        self.reference = copy.deepcopy(model).eval().requires_grad_(False)
        self.normalizer = RewardNormalizer(config.normalizer_buffer, config.normalizer_min_count)
        self.reward_calls = 0  # over all ranks
        self._local_calls = 0  # this rank's calls during the current step
        self.seed = seed

    def _grid(self, model: GaussianDiffusion) -> list[int]:
        return model.time_grid(self.config.sampling_steps or None)

    @staticmethod
    def _times(t_int: int, s_int: int, n: int) -> tuple[Tensor, Tensor]:
        return torch.full((n,), t_int, dtype=torch.long), torch.full((n,), s_int, dtype=torch.long)

    # -- look-ahead ------------------------------------------------------------------------ #

    @torch.no_grad()
    def lookahead(self, z_s: Tensor, s_int: int, cond: Conditions) -> Scores:
        """V(z_s): the reward of the reference model's estimate of x_0 from z_s."""
        ref = self.reference
        n = z_s.shape[0]
        if self.config.lookahead == "tweedie" or s_int == 0:
            x0 = ref.predict_x0(z_s, torch.full((n,), s_int, dtype=torch.long), cond.node_mask, cond.context)
        else:
            # Short deterministic (DDIM, eta = 0) roll-out of the reference model from s to 0.
            steps = sorted({round(v) for v in torch.linspace(0, s_int, self.config.lookahead_steps + 1).tolist()},
                           reverse=True)
            z = z_s
            for a, b in zip(steps[:-1], steps[1:]):
                t, s = self._times(a, b, n)
                z = ref.step(z, t, s, cond.node_mask, cond.context, eta=0.0).sample
            x0 = ref.predict_x0(z, torch.zeros(n, dtype=torch.long), cond.node_mask, cond.context)
        x0 = ref.project(x0, cond.node_mask)
        scores = self.task.score(x0, cond)
        self._local_calls += n
        return scores

    # -- exploration ----------------------------------------------------------------------- #

    @torch.no_grad()
    def explore(self, z_t: Tensor, t_int: int, s_int: int, shard: BatchShard, generator=None) -> Exploration:
        """K candidates of the step t -> s from the reference policy with feasible shifts (this rank's rows)."""
        cfg, ref, cond = self.config, self.reference, shard.conditions
        b, k = z_t.shape[0], cfg.num_candidates
        t, s = self._times(t_int, s_int, b)
        mean, std = ref.step_distribution(z_t, t, s, cond.node_mask, cond.context, cfg.eta)
        radius = cfg.radius * (std if cfg.radius_units == "std" else torch.ones_like(std))  # [B]
        shifts = self._shifts(mean, std, radius, s_int, shard, generator)  # [B, K, ...], shift 0 is zero
        cond_k = cond.repeat(k)
        flat = lambda v: v.reshape(b * k, *v.shape[2:])  # noqa: E731
        mean_k = mean.unsqueeze(1).expand(b, k, *mean.shape[1:])
        std_k = std.repeat_interleave(k)
        noise = shard.noise(ref, generator, repeats=k)
        candidates = flat(mean_k + shifts) + std_k.view(-1, *([1] * (noise.dim() - 1))) * noise
        candidates = ref.project(candidates, cond_k.node_mask)
        log_ratio = self._log_proposal_ratio(candidates.view(b, k, *mean.shape[1:]), mean, shifts, std,
                                             cond.node_mask)
        scores = self.lookahead(candidates, s_int, cond_k)
        perturbations = (std_k.view(-1, *([1] * (noise.dim() - 1))) * noise).view(b, k, *mean.shape[1:])
        return Exploration(candidates.view(b, k, *mean.shape[1:]), perturbations, log_ratio,
                           scores.values.view(b, k), scores.valid.view(b, k), b * k)

    def _shifts(self, mean: Tensor, std: Tensor, radius: Tensor, s_int: int, shard: BatchShard,
                generator=None) -> Tensor:
        cfg, ref, cond = self.config, self.reference, shard.conditions
        b, k = mean.shape[0], cfg.num_candidates
        shape = (b, k, *mean.shape[1:])
        if cfg.shift == "none" or k == 1:
            return torch.zeros(shape, dtype=mean.dtype)
        rad = radius.view(b, 1, *([1] * (mean.dim() - 1)))
        n_dirs = k - 1 if cfg.shift == "random" else cfg.num_probes
        cond_d = cond.repeat(n_dirs)
        directions = unit_directions(ref, shard, n_dirs, generator).view(b, n_dirs, *mean.shape[1:])
        if cfg.shift == "random":
            chosen = directions
        else:
            probes = ref.project((mean.unsqueeze(1) + rad * directions).reshape(b * n_dirs, *mean.shape[1:]),
                                 cond_d.node_mask)
            probe_values = self.lookahead(probes, s_int, cond_d).values.view(b, n_dirs)
            if cfg.shift == "best_probe":
                top = probe_values.topk(k - 1, dim=1).indices
                chosen = torch.stack([directions[i, top[i]] for i in range(b)])
            else:  # finite_difference: the tilt std^2 * grad V / tau, estimated along the probes
                base = self.lookahead(mean, s_int, cond).values
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
                zero = torch.zeros((b, 1, *mean.shape[1:]), dtype=mean.dtype)
                return torch.cat([zero, shifts], dim=1)
        zero = torch.zeros((b, 1, *mean.shape[1:]), dtype=mean.dtype)
        return torch.cat([zero, rad * chosen], dim=1)

    def _scaled(self, values: Tensor, targets: Tensor | None) -> Tensor:
        """Rewards in the units the temperature applies to (normalised when configured)."""
        if not self.config.normalize_rewards:
            return values
        flat_targets = None if targets is None else targets.unsqueeze(-1).expand_as(values).reshape(-1)
        return self.normalizer.normalize(values.reshape(-1), flat_targets).view_as(values)

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
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        shard = BatchShard.of(self.task.conditions(self.config.batch_size, generator))
        self._local_calls = 0
        if self.config.variant == "sequence":
            loss, metrics = self._sequence_loss(model, shard, generator)
        else:
            loss, metrics = self._step_loss(model, shard, generator)
        data_loss = self.task.data_loss(model, step) if self.config.lambda_mle > 0 else None
        if data_loss is not None:
            loss = loss + self.config.lambda_mle * data_loss
            metrics["mle_loss"] = data_loss.item()  # this rank's share
        calls = torch.tensor([self._local_calls], dtype=torch.long)
        self.reward_calls += int(distributed.all_reduce_sum(calls).item())
        metrics["reward_calls"] = float(self.reward_calls)
        metrics.update(task_stats(self.task))
        return loss, metrics

    def _weights(self, values: Tensor, valid: Tensor, log_base: Tensor,
                 targets: Tensor | None) -> tuple[Tensor, Tensor]:
        """Self-normalised weights along the last dim and the temperature used, per row.

        Called with the *global* batch's values on every rank, so that the normaliser's state and
        the weights are identical across ranks (and to a single-process run).
        """
        cfg = self.config
        if cfg.normalize_rewards:
            flat_targets = None if targets is None else targets.unsqueeze(-1).expand_as(values).reshape(-1)
            self.normalizer.update(values[valid], None if flat_targets is None else flat_targets[valid.reshape(-1)])
        scaled = self._scaled(values, targets)
        if cfg.adapt_tau:
            tau = temperature_for_ess(scaled, log_base, cfg.target_ess * values.shape[-1])
        else:
            tau = torch.full(values.shape[:-1], cfg.tau, dtype=values.dtype)
        log_w = scaled / tau.unsqueeze(-1) + log_base
        return torch.softmax(log_w, dim=-1), tau

    def _step_loss(self, model: GaussianDiffusion, shard: BatchShard, generator) -> tuple[Tensor, dict[str, float]]:
        cfg, cond = self.config, shard.conditions
        grid = self._grid(model)
        traj = collect_trajectories(model, shard, grid, cfg.eta, generator, stochastic=False)
        final = self.task.score(traj.x0, cond).gathered(shard)
        self._local_calls += cond.batch_size
        n_pairs = len(grid) - 1
        picks = torch.randperm(n_pairs, generator=generator)[: min(cfg.explore_steps, n_pairs)].sort().values
        total, ess_all, entropy_all, tau_all = 0.0, [], [], []
        for idx in picks.tolist():
            t_int, s_int = grid[idx], grid[idx + 1]
            z_t = traj.states[idx]
            exp = self.explore(z_t, t_int, s_int, shard, generator)
            all_weights, tau = self._weights(shard.gather(exp.values), shard.gather(exp.valid),
                                             shard.gather(exp.log_proposal_ratio), shard.global_conditions.targets)
            weights = shard.local(all_weights)
            t, s = self._times(t_int, s_int, cond.batch_size)
            mean, std = model.step_distribution(z_t, t, s, cond.node_mask, cond.context, cfg.eta)
            step_loss = self._regression_loss(model, mean, std, exp, weights, t, s, cond).sum()
            if cfg.kl_weight > 0:
                ref_mean, _ = self.reference.step_distribution(z_t, t, s, cond.node_mask, cond.context, cfg.eta)
                kl = 0.5 * model.sq_norm(mean - ref_mean, cond.node_mask) / std**2 / model.dof(z_t, cond.node_mask)
                step_loss = step_loss + cfg.kl_weight * kl.sum()
            total = total + step_loss / shard.global_size / len(picks)  # this rank's share of the mean
            ess_all.append(effective_sample_size(torch.log(all_weights.clamp(min=1e-30))).mean().item())
            entropy_all.append(-(all_weights * torch.log(all_weights.clamp(min=1e-30))).sum(-1).mean().item())
            tau_all.append(tau.mean().item())
        metrics = reward_metrics(final)
        metrics.update({"ess": _mean(ess_all), "ess_fraction": _mean(ess_all) / cfg.num_candidates,
                        "weight_entropy": _mean(entropy_all), "tau": _mean(tau_all)})
        return total, metrics

    def _regression_loss(self, model: GaussianDiffusion, mean: Tensor, std: Tensor, exp: Exploration,
                         weights: Tensor, t: Tensor, s: Tensor, cond: Conditions) -> Tensor:
        """Per-state loss -Σ_k w_k log pi_theta(z^k | z_t) / dof, up to a constant and a per-step scale.

        With a fixed std, Σ_k w_k ||z^k - mean||^2 = ||target - mean||^2 + const, target = Σ_k w_k z^k:
        a regression of the policy mean onto the weighted candidates. Two choices keep its variance low
        without moving its optimum: ``control_variate`` subtracts the candidates' average Gaussian
        perturbation (zero in expectation), and ``loss_weighting: epsilon`` measures the error in
        noise-prediction units (the simple denoising loss's weighting) instead of the likelihood's
        1/std^2, which would let the nearly noiseless last steps dominate every gradient.
        """
        cfg = self.config
        bcast = (-1, *([1] * (mean.dim() - 1)))
        target = (weights.view(*weights.shape, *([1] * (mean.dim() - 1))) * exp.candidates).sum(1)
        if cfg.control_variate:
            target = target - exp.perturbations.mean(1)
        scale = std if cfg.loss_weighting == "likelihood" else model.mean_sensitivity(t, s, cfg.eta).to(std.dtype)
        error = model.sq_norm(mean - target.detach(), cond.node_mask)
        return 0.5 * error / scale.view(bcast).flatten() ** 2 / model.dof(mean, cond.node_mask)

    def _sequence_loss(self, model: GaussianDiffusion, shard: BatchShard,
                       generator) -> tuple[Tensor, dict[str, float]]:
        cfg, cond = self.config, shard.conditions
        traj = collect_trajectories(model, shard, self._grid(model), cfg.eta, generator, self.reference)
        final = self.task.score(traj.x0, cond).gathered(shard)
        self._local_calls += cond.batch_size
        log_ratio = shard.gather(traj.log_ratio_to_reference).clamp(-cfg.max_log_ratio, cfg.max_log_ratio)
        targets = shard.global_conditions.targets
        all_weights, tau = self._weights(final.values.unsqueeze(0), final.valid.unsqueeze(0), log_ratio.unsqueeze(0),
                                         None if targets is None else targets[:1])
        all_weights = all_weights.squeeze(0)
        weights = shard.local(all_weights)
        x0 = model.snap_to_data(traj.x0, cond.node_mask)
        loss = weighted_denoising_loss(model, x0, shard, weights, cfg.denoising_repeats, generator)
        metrics = reward_metrics(final)
        ess = effective_sample_size(torch.log(all_weights.clamp(min=1e-30))).item()
        metrics.update({"ess": ess, "ess_fraction": ess / shard.global_size, "tau": tau.mean().item(),
                        "weight_entropy": -(all_weights * torch.log(all_weights.clamp(min=1e-30))).sum().item()})
        return loss, metrics

    def state_dict(self) -> dict[str, Any]:
        return {"normalizer": self.normalizer.state_dict(), "reward_calls": self.reward_calls,
                "task": self.task.state_dict(), "reference": self.reference.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.normalizer.load_state_dict(state["normalizer"])
        self.reward_calls = int(state["reward_calls"])
        self.task.load_state_dict(state["task"])
        self.reference.load_state_dict(state["reference"])


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
    for t_int, s_int in zip(grid[:-1], grid[1:]):
        exp = sampler.explore(z, t_int, s_int, shard, generator)
        weights, _ = sampler._weights(exp.values, exp.valid, exp.log_proposal_ratio, cond.targets)
        pick = torch.multinomial(weights, 1, generator=generator).squeeze(1)
        z = exp.candidates[torch.arange(n), pick]
    x0 = model.project(model.predict_x0(z, torch.zeros(n, dtype=torch.long), cond.node_mask, cond.context),
                       cond.node_mask)
    return x0, cond, sampler._local_calls


def reward_metrics(final: Scores) -> dict[str, float]:
    """Reward statistics of a batch of final samples, logged by every reward-driven objective."""
    values = final.values
    out = {"reward_mean": values.mean().item(), "reward_median": values.median().item(),
           "reward_max": values.max().item(), "invalid_fraction": 1.0 - final.valid.float().mean().item()}
    if final.property is not None and torch.isfinite(final.property).any():
        out["property_mean"] = final.property[torch.isfinite(final.property)].mean().item()
    return out


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
