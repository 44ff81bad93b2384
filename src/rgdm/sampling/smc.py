"""Twisted sequential Monte Carlo at sampling time, derivative-free (TDS-style).

Wu et al. 2023, "Practical and Asymptotically Exact Conditional Sampling in Diffusion Models". The
target is the reward-tilted distribution p*(x_0) ∝ p_ref(x_0) exp(r(x_0) / tau). K particles per
output sample follow the pretrained reverse process (the proposal), and the intermediate targets
are twisted by potentials G_t = exp(V(z_t) / tau), with V the posterior-mean look-ahead
V(z_t) = r(x_hat_0(z_t)). Because the proposal is the pretrained step itself, the incremental weight
of t -> s is the ratio of potentials,

    w  ∝  exp((V(z_s) - V(z_t)) / tau),   starting from w_T = exp(V(z_T) / tau),

and the grid ends at s = 0 where V(z_0) = r(x_0): the last increment is exactly the correction
exp(r(x_0)/tau - V(z_last)/tau), so the product telescopes to exp(r(x_0) / tau) and the weighted
particles target p* whatever the look-ahead's error (it only affects the variance). Particles of a
group are resampled (systematic or multinomial) when the group's effective sample size drops below
``ess_threshold * K``; each output is one particle drawn from its group's final weights.
Reward calls: K per output sample per grid point, i.e. n * K * (steps + 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rgdm.diffusion.gaussian import GaussianDiffusion
from rgdm.sampling.svdd import SteeredSamples, gather_scores, lookahead, step_candidates
from rgdm.training.tasks import Conditions, Scores, Task

RESAMPLING = ("systematic", "multinomial")


@dataclass
class SMCSamples(SteeredSamples):
    """Steered samples plus the particle system that produced them."""

    particles: Tensor  # [n, K, ...] every group's final particles x_0
    log_weights: Tensor  # [n, K] their final normalised log-weights
    ess: Tensor  # [steps] mean effective sample size (out of K) after each step's reweighting
    resampled_fraction: float  # fraction of (group, step) pairs that resampled


def effective_sample_size(log_weights: Tensor) -> Tensor:
    """(Σw)^2 / Σw^2 per row of unnormalised log-weights."""
    return torch.exp(2 * torch.logsumexp(log_weights, -1) - torch.logsumexp(2 * log_weights, -1))


def resample_indices(log_weights: Tensor, scheme: str, generator=None) -> Tensor:
    """[G, K] particle indices within each group drawn in proportion to the weights."""
    g, k = log_weights.shape
    probs = torch.softmax(log_weights, dim=1)
    if scheme == "multinomial":
        return torch.multinomial(probs, k, replacement=True, generator=generator)
    # Systematic: one uniform offset per group, K evenly spaced points through the weight CDF.
    offsets = torch.rand(g, 1, generator=generator, dtype=probs.dtype, device=probs.device)
    points = (offsets + torch.arange(k, dtype=probs.dtype, device=probs.device)) / k
    cdf = probs.cumsum(dim=1)
    cdf[:, -1] = 1.0  # guard against round-off leaving the last point beyond the CDF
    return torch.searchsorted(cdf, points).clamp(max=k - 1)


def check_arguments(n: int, k: int, tau: float, ess_threshold: float, resampling: str, batch_size: int) -> None:
    if n < 1 or k < 1 or batch_size < 1:
        raise ValueError(f"smc_sample: n, K and batch_size must be >= 1 (got {n}, {k}, {batch_size})")
    if not tau > 0:
        raise ValueError(f"smc_sample: tau must be > 0, got {tau}")
    if not 0 <= ess_threshold <= 1:
        raise ValueError(f"smc_sample: ess_threshold must be in [0, 1], got {ess_threshold}")
    if resampling not in RESAMPLING:
        raise ValueError(f"smc_sample: resampling must be one of {RESAMPLING}, got {resampling!r}")


@torch.no_grad()
def smc_sample(model: GaussianDiffusion, task: Task, n: int, K: int, tau: float,
               generator: torch.Generator | None = None, sampling_steps: int | None = None,
               ess_threshold: float = 0.5, resampling: str = "systematic", eta: float = 1.0,
               batch_size: int = 64) -> SMCSamples:
    """``n`` samples of p_ref(x) exp(r(x)/tau), each from its own group of K particles."""
    check_arguments(n, K, tau, ess_threshold, resampling, batch_size)
    cond = task.conditions(n, generator)
    grid = model.time_grid(sampling_steps)
    groups_per_batch = max(1, batch_size // K)
    parts = [_run_groups(model, task, cond.select(torch.arange(start, min(start + groups_per_batch, n))), K, tau,
                         grid, ess_threshold, resampling, eta, generator)
             for start in range(0, n, groups_per_batch)]
    props = [p["scores"].property for p in parts]
    scores = Scores(torch.cat([p["scores"].values for p in parts]), torch.cat([p["scores"].valid for p in parts]),
                    None if any(p is None for p in props) else torch.cat(props))
    sizes = torch.tensor([p["log_weights"].shape[0] for p in parts], dtype=torch.float32,
                         device=parts[0]["log_weights"].device)
    ess = (torch.stack([p["ess"] for p in parts]) * sizes.unsqueeze(1)).sum(0) / sizes.sum()
    resampled = sum(p["resampled"] for p in parts) / (n * (len(grid) - 1))
    return SMCSamples(samples=torch.cat([p["samples"] for p in parts]), scores=scores, conditions=cond,
                      reward_calls=sum(p["calls"] for p in parts), particles=torch.cat([p["particles"] for p in parts]),
                      log_weights=torch.cat([p["log_weights"] for p in parts]), ess=ess, resampled_fraction=resampled)


def _run_groups(model, task, cond: Conditions, k: int, tau: float, grid: list[int], ess_threshold: float,
                resampling: str, eta: float, generator) -> dict:
    """G groups of K particles through the reverse process; rows g*K ... g*K + K - 1 form group g."""
    g = cond.batch_size
    cond_k = cond.repeat(k)
    z = model.sample_prior(cond_k.shape, cond_k.node_mask, generator)
    values = lookahead(model, task, z, grid[0], cond_k)
    calls = g * k
    log_w = values.values.view(g, k) / tau  # w_T = G_T(z_T)
    ess_trace, resampled = [], 0
    offsets = (torch.arange(g, device=z.device) * k).unsqueeze(1)
    for t_int, s_int in zip(grid[:-1], grid[1:]):
        # Adaptive resampling: only groups whose weights have degenerated.
        low = effective_sample_size(log_w) < ess_threshold * k
        if low.any():
            index = torch.arange(g * k, device=z.device).view(g, k)
            index[low] = (offsets + resample_indices(log_w, resampling, generator))[low]
            index = index.reshape(-1)
            z, values = z[index], gather_scores(values, index)
            log_w = torch.where(low.unsqueeze(1), torch.zeros_like(log_w), log_w)
            resampled += int(low.sum())
        z_s = model.project(step_candidates(model, z, t_int, s_int, cond_k, 1, eta, generator), cond_k.node_mask)
        values_s = lookahead(model, task, z_s, s_int, cond_k)
        calls += g * k
        # Proposal = pretrained step, so the weight increment is the ratio of potentials.
        log_w = log_w + (values_s.values - values.values).view(g, k) / tau
        z, values = z_s, values_s
        ess_trace.append(effective_sample_size(log_w).mean())
    # The grid ends at 0: V(z_0) = r(x_0), so log_w already includes the final correction.
    x0 = model.project(model.predict_x0(z, torch.zeros(g * k, dtype=torch.long, device=z.device), cond_k.node_mask,
                                        cond_k.context), cond_k.node_mask)
    pick = offsets.squeeze(1) + torch.multinomial(torch.softmax(log_w, dim=1), 1, generator=generator).squeeze(1)
    return {"samples": x0[pick], "scores": gather_scores(values, pick), "calls": calls,
            "particles": x0.view(g, k, *x0.shape[1:]),
            "log_weights": torch.log_softmax(log_w, dim=1), "ess": torch.stack(ess_trace), "resampled": resampled}
