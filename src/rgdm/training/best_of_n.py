"""Best-of-N: the sampling-time baseline. No training; N reward calls buy one kept sample.

For each kept sample the task draws one condition (node count, target); N candidates are sampled
under that same condition and the one with the highest reward is kept, valid candidates first (a
failed candidate's penalty never beats a valid sample). Its cost is N reward calls per kept sample,
the unit every method's reward-vs-budget curve is drawn in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rgdm.diffusion.gaussian import GaussianDiffusion
from rgdm.training.tasks import Conditions, Scores, Task


@dataclass
class BestOfN:
    """Kept samples, their scores and conditions, and what they cost."""

    samples: Tensor  # [n_keep, ...]
    scores: Scores  # of the kept samples
    conditions: Conditions  # of the kept samples
    candidate_values: Tensor  # [n_keep, n] rewards of every candidate
    reward_calls: int  # n_keep * n


def select_best(values: Tensor, valid: Tensor) -> Tensor:
    """Index of the best candidate per row of [n_keep, n] rewards, valid candidates first."""
    any_valid = valid.any(dim=1, keepdim=True)
    ranked = torch.where(valid | ~any_valid, values, torch.full_like(values, -torch.inf))
    return ranked.argmax(dim=1)


@torch.no_grad()
def best_of_n(model: GaussianDiffusion, task: Task, n_keep: int, n: int, generator: torch.Generator | None = None,
              sampling_steps: int | None = None, eta: float = 1.0, chunk_size: int = 256) -> BestOfN:
    """Draw ``n`` samples per kept sample from ``model`` and keep the best by the task's reward."""
    if n_keep < 1 or n < 1 or chunk_size < 1:
        raise ValueError(f"best_of_n: n_keep, n and chunk_size must be >= 1 (got {n_keep}, {n}, {chunk_size})")
    cond = task.conditions(n_keep, generator)
    candidates = cond.repeat(n)  # the n candidates of kept sample i are rows i*n ... i*n + n - 1
    samples, values, valid, props = [], [], [], []
    for start in range(0, n_keep * n, chunk_size):
        part = candidates.select(torch.arange(start, min(start + chunk_size, n_keep * n)))
        x = model.sample(part.shape, part.node_mask, part.context, num_steps=sampling_steps, eta=eta,
                         generator=generator)
        scores = task.score(x, part)
        samples.append(x)
        values.append(scores.values)
        valid.append(scores.valid)
        props.append(scores.property)
    values_t = torch.cat(values).view(n_keep, n)
    valid_t = torch.cat(valid).view(n_keep, n)
    chosen = torch.arange(n_keep, device=values_t.device) * n + select_best(values_t, valid_t)
    prop = None if any(p is None for p in props) else torch.cat(props)[chosen]
    kept = Scores(values_t.reshape(-1)[chosen], valid_t.reshape(-1)[chosen], prop)
    return BestOfN(torch.cat(samples)[chosen], kept, candidates.select(chosen), values_t, n_keep * n)
