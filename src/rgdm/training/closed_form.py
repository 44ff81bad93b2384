"""DESIGN §2's closed-form check as a reusable harness: fine-tune the exact N(0, I_d) model with RGDM
and measure how far the result is from the pay-off pi_ref · exp(r / tau), with no sampling noise.

The reference is ``rgdm.diffusion.analytic``'s exact denoiser, whose fine-tunable family holds every
isotropic Gaussian and whose samples' distribution is computed exactly (``exact_moments``). Two rewards:

* ``linear`` r = a^T x: the pay-off is the reference shifted by C0 a / tau (N(a / tau, I) for N(0, I));
* ``quadratic`` r = -b |x - c|^2: the pay-off is shifted *and shrunk* (variance 1 / (1 + 2 b / tau)),
  so a method that only moves the mean cannot pass.

``tests/test_rgdm_closed_form.py`` asserts on the worst of three seeds; ``benchmarks/closed_form.py``
prints the table in the README.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rgdm.config import RGDMConfig, TrainConfig
from rgdm.diffusion.analytic import exact_moments, gaussian_payoff, relative_errors, standard_gaussian_diffusion
from rgdm.training.loop import Trainer
from rgdm.training.rgdm import RGDMObjective
from rgdm.training.tasks import GaussianTask

TAU = 1.0
SAMPLING_STEPS = 50
TIMESTEPS = 200


def closed_form_reward(reward: str, dim: int) -> tuple[Any, dict[str, Any]]:
    """The reward function and its parameters; directions are fixed per dimension, not per seed."""
    direction = torch.randn(dim, generator=torch.Generator().manual_seed(1000 + dim))
    direction = direction / direction.norm()
    if reward == "linear":
        a = 1.2 * direction
        return (lambda x: x @ a), {"a": a}
    if reward == "quadratic":
        b, c = 0.5, 1.5 * direction
        return (lambda x: -b * ((x - c) ** 2).sum(-1)), {"b": b, "c": c}
    raise ValueError(f"unknown closed-form reward {reward!r}: expected 'linear' or 'quadratic'")


def closed_form_settings(variant: str, reward: str) -> tuple[dict[str, Any], float]:
    """RGDM settings and the optimiser's learning rate of one closed-form case.

    The step variant regresses onto weighted candidate means, a low-noise target (lr 0.05). A quadratic
    reward's soft value is not the reward of the Tweedie estimate, so there it is estimated by M = 2
    stochastic continuations on the roll-outs' own grid, whose noisy values call for the jackknife's
    bias correction and a larger batch. The sequence variant uses its exact loss, the path likelihood,
    which is noisier (lr 0.03).
    """
    if variant == "sequence":  # the path likelihood: the exact form (the default denoising loss is 3-8 % off)
        return {"batch_size": 64, "sequence_loss": "path"}, 0.03
    whole_horizon = {"explore_t_max": 1.0, "replay": 1}  # the exact pay-off: every step explored afresh
    if reward == "linear":
        return {"batch_size": 64, "num_candidates": 16, "explore_steps": 8, "shift": "random", "lookahead": "tweedie",
                **whole_horizon}, 0.05
    return {"batch_size": 128, "num_candidates": 8, "explore_steps": 4, "shift": "random", "lookahead": "continuation",
            "lookahead_steps": 0, "lookahead_samples": 2, "weight_normalisation": "jackknife", **whole_horizon}, 0.05


@dataclass
class ClosedFormResult:
    mean_error: float  # |mean - mu| / |mu| of the fine-tuned model's exact sample distribution
    cov_error: float  # largest |cov - Sigma| entry relative to Sigma's largest variance
    reward_calls: int


def closed_form_run(run_dir: Path, variant: str, reward: str, dim: int, seed: int, steps: int = 100,
                    **overrides: Any) -> ClosedFormResult:
    """Fine-tune the exact N(0, I_dim) model for ``steps`` iterations and compare with the pay-off.

    The target is the pay-off of the reference *sampler's* exact distribution on the same time grid (a
    finite-step sampler of N(0, I) has a variance slightly below one). The EMA copy (decay 0.95) is
    evaluated: it averages out the optimiser's last steps. ``overrides`` replace RGDM settings (the
    target stays the pay-off at ``TAU``).
    """
    torch.manual_seed(seed)
    model = standard_gaussian_diffusion(dim=dim, timesteps=TIMESTEPS)
    reward_fn, params = closed_form_reward(reward, dim)
    target_mean, target_cov = gaussian_payoff(*exact_moments(model, SAMPLING_STEPS), reward, TAU, **params)
    case, lr = closed_form_settings(variant, reward)
    config = RGDMConfig(**{"variant": variant, "sampling_steps": SAMPLING_STEPS, "tau": TAU,
                           "normalize_rewards": False, **case, **overrides})
    objective = RGDMObjective(model, GaussianTask(dim, reward_fn), config, seed=seed)
    train = TrainConfig(steps=steps, lr=lr, ema_decay=0.95, grad_clip=0.0, log_every=50, val_every=10_000,
                        checkpoint_every=10_000)
    trainer = Trainer(model, objective, train, run_dir, {"config": {}}, tensorboard=False, progress=False)
    trainer.fit()
    mean, cov = exact_moments(trainer.sampling_model, SAMPLING_STEPS)
    mean_error, cov_error = relative_errors(mean, cov, target_mean, target_cov)
    return ClosedFormResult(mean_error, cov_error, objective.reward_calls)
