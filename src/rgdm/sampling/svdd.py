"""SVDD-PM: derivative-free steering at sampling time by soft value-based decoding.

Li et al. 2024, "Derivative-Free Guidance in Continuous and Discrete Diffusion Models with Soft
Value-Based Decoding". At every reverse step t -> s, M candidates are drawn from the pretrained
model's own step distribution pi_ref(z_s | z_t) and each is scored by a look-ahead value

    V(z_s) = r(x_hat_0(z_s)),   x_hat_0 = E[x_0 | z_s] (Tweedie, the "posterior mean" variant),

and one candidate is kept: the best (greedy), or one drawn from softmax(V / alpha). Nothing is
trained and no reward gradient is needed, so any reward of the reward layer works; the price is
M reward calls per sample per step. At the last step (s = 0) the look-ahead *is* the reward of the
final sample, so the kept candidate's score is the sample's score and no extra call is made.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rgdm.diffusion.gaussian import GaussianDiffusion
from rgdm.training.best_of_n import select_best
from rgdm.training.tasks import Conditions, Scores, Task

SELECTIONS = ("greedy", "sample")


@dataclass
class SteeredSamples:
    """Samples steered at sampling time, their scores and conditions, and what they cost."""

    samples: Tensor  # [n, ...] final x_0
    scores: Scores  # of the samples
    conditions: Conditions  # of the samples
    reward_calls: int  # every look-ahead and final reward evaluation


def times(t_int: int, n: int, device: torch.device | str = "cpu") -> Tensor:
    return torch.full((n,), t_int, dtype=torch.long, device=device)


@torch.no_grad()
def lookahead(model: GaussianDiffusion, task: Task, z_s: Tensor, s_int: int, cond: Conditions) -> Scores:
    """V(z_s): the task's reward of the model's denoised estimate of x_0 from z_s (one call per row)."""
    x0 = model.predict_x0(z_s, times(s_int, z_s.shape[0], z_s.device), cond.node_mask, cond.context)
    return task.score(model.project(x0, cond.node_mask), cond)


def gather_scores(scores: Scores, index: Tensor) -> Scores:
    prop = None if scores.property is None else scores.property[index]
    return Scores(scores.values[index], scores.valid[index], prop)


def step_candidates(model: GaussianDiffusion, z_t: Tensor, t_int: int, s_int: int, cond: Conditions,
                    m: int, eta: float, generator=None) -> Tensor:
    """M draws per row from the model's step distribution t -> s; rows i*M ... i*M + M - 1 belong to z_t[i]."""
    n = z_t.shape[0]
    mean, std = model.step_distribution(z_t, times(t_int, n, z_t.device), times(s_int, n, z_t.device), cond.node_mask,
                                        cond.context, eta)
    mean_m = mean.repeat_interleave(m, dim=0)
    node_mask_m = None if cond.node_mask is None else cond.node_mask.repeat_interleave(m, dim=0)
    noise = model.noise(mean_m, node_mask_m, generator)
    return mean_m + std.repeat_interleave(m).view(-1, *([1] * (mean.dim() - 1))) * noise


def choose(values: Tensor, valid: Tensor, selection: str, alpha: float, generator=None) -> Tensor:
    """Index of the kept candidate per row of [n, M] look-ahead values."""
    if selection == "greedy":
        return select_best(values, valid)
    # softmax(V / alpha); invalid candidates carry the task's penalty value, like everywhere else.
    probs = torch.softmax(values / alpha, dim=1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def check_arguments(n: int, m: int, selection: str, alpha: float, batch_size: int) -> None:
    if n < 1 or m < 1 or batch_size < 1:
        raise ValueError(f"svdd_sample: n, M and batch_size must be >= 1 (got {n}, {m}, {batch_size})")
    if selection not in SELECTIONS:
        raise ValueError(f"svdd_sample: selection must be one of {SELECTIONS}, got {selection!r}")
    if selection == "sample" and not alpha > 0:
        raise ValueError(f"svdd_sample: alpha must be > 0 for selection 'sample', got {alpha}")


@torch.no_grad()
def svdd_sample(model: GaussianDiffusion, task: Task, n: int, M: int, generator: torch.Generator | None = None,
                sampling_steps: int | None = None, selection: str = "greedy", alpha: float = 1.0,
                eta: float = 1.0, batch_size: int = 64) -> SteeredSamples:
    """``n`` samples decoded with M candidates per step; reward calls = n * M * (number of steps)."""
    check_arguments(n, M, selection, alpha, batch_size)
    cond = task.conditions(n, generator)
    grid = model.time_grid(sampling_steps)
    samples, scores, calls = [], [], 0
    for start in range(0, n, batch_size):
        part = cond.select(torch.arange(start, min(start + batch_size, n)))
        x0, part_scores, part_calls = _decode(model, task, part, M, grid, selection, alpha, eta, generator)
        samples.append(x0)
        scores.append(part_scores)
        calls += part_calls
    props = [s.property for s in scores]
    merged = Scores(torch.cat([s.values for s in scores]), torch.cat([s.valid for s in scores]),
                    None if any(p is None for p in props) else torch.cat(props))
    return SteeredSamples(torch.cat(samples), merged, cond, calls)


def _decode(model, task, cond: Conditions, m: int, grid: list[int], selection: str, alpha: float, eta: float,
            generator) -> tuple[Tensor, Scores, int]:
    """One batch through the whole reverse process, keeping one of M candidates at every step."""
    b = cond.batch_size
    cond_m = cond.repeat(m)
    z = model.sample_prior(cond.shape, cond.node_mask, generator)
    calls = 0
    kept_scores = None
    for t_int, s_int in zip(grid[:-1], grid[1:]):
        candidates = model.project(step_candidates(model, z, t_int, s_int, cond, m, eta, generator), cond_m.node_mask)
        values = lookahead(model, task, candidates, s_int, cond_m)
        calls += b * m
        picked = choose(values.values.view(b, m), values.valid.view(b, m), selection, alpha, generator)
        chosen = torch.arange(b, device=z.device) * m + picked
        z = candidates[chosen]
        kept_scores = gather_scores(values, chosen)
    # grid ends at 0, so the last look-ahead was the reward of x_hat_0(z_0): the final sample's score.
    x0 = model.project(model.predict_x0(z, times(0, b, z.device), cond.node_mask, cond.context), cond.node_mask)
    return x0, kept_scores, calls
