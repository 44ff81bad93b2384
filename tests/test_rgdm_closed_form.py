"""DESIGN §2's closed-form check: data N(0, I), reward a^T x; the pay-off distribution is N(a/tau, I).

Fine-tuning the exact reference model with RGDM (either variant) must move the sample mean to
a/tau and keep the covariance near the identity.
"""

import pytest
import torch

from rgdm.config import RGDMConfig, TrainConfig
from rgdm.diffusion.analytic import standard_gaussian_diffusion
from rgdm.training.loop import Trainer
from rgdm.training.rgdm import RGDMObjective, effective_sample_size, explore_sample, temperature_for_ess
from rgdm.training.tasks import GaussianTask

A = torch.tensor([1.0, -0.6])
TAU = 1.0


def linear_reward(x):
    return x @ A


def finetune(tmp_path, variant: str, steps: int, **overrides):
    torch.manual_seed(0)
    model = standard_gaussian_diffusion(dim=2, timesteps=200)
    config = RGDMConfig(variant=variant, batch_size=64, sampling_steps=0, num_candidates=16, explore_steps=8,
                        tau=TAU, normalize_rewards=False, **overrides)
    config.validate()
    objective = RGDMObjective(model, GaussianTask(2, linear_reward), config, seed=0)
    train = TrainConfig(steps=steps, lr=0.05, ema_decay=0.0, grad_clip=0.0, log_every=10, val_every=1000,
                        checkpoint_every=10_000)
    trainer = Trainer(model, objective, train, tmp_path, {"config": {}}, tensorboard=False, progress=False)
    trainer.fit()
    samples = model.sample((8000, 2), generator=torch.Generator().manual_seed(1))
    return samples.mean(0), torch.cov(samples.T), objective


def test_reference_model_samples_standard_gaussian():
    model = standard_gaussian_diffusion(dim=2, timesteps=200)
    samples = model.sample((8000, 2), generator=torch.Generator().manual_seed(0))
    assert samples.mean(0).abs().max() < 0.05
    assert (torch.cov(samples.T) - torch.eye(2)).abs().max() < 0.08


@pytest.mark.parametrize("shift", ["random", "finite_difference"])
def test_step_level_rgdm_reaches_payoff_mean(tmp_path, shift):
    mean, cov, objective = finetune(tmp_path, "step", steps=120, shift=shift)
    target = A / TAU
    assert (mean - target).norm() < 0.1 * target.norm(), f"mean {mean} vs {target}"
    assert (cov - torch.eye(2)).abs().max() < 0.15, f"covariance {cov}"
    assert objective.reward_calls > 0


def test_sequence_level_rgdm_reaches_payoff_mean(tmp_path):
    mean, cov, _ = finetune(tmp_path, "sequence", steps=200)
    target = A / TAU
    assert (mean - target).norm() < 0.1 * target.norm(), f"mean {mean} vs {target}"
    assert (cov - torch.eye(2)).abs().max() < 0.15, f"covariance {cov}"


def test_temperature_search_hits_target_ess():
    values = torch.randn(5, 16, generator=torch.Generator().manual_seed(0)) * 3
    tau = temperature_for_ess(values, torch.zeros(5, 16), target_ess=8.0)
    ess = effective_sample_size(values / tau.unsqueeze(-1))
    assert torch.allclose(ess, torch.full((5,), 8.0), atol=0.05)


def test_exploration_at_sampling_time_tilts_the_reference_model():
    """No training: K explored candidates per step, one kept by the pay-off weights, move the
    pre-trained N(0, I) model's samples to the pay-off mean a/tau (the per-step pay-off with the
    exact Tweedie look-ahead of this model; K = 16 candidates leave a small bias)."""
    model = standard_gaussian_diffusion(dim=2, timesteps=200)
    config = RGDMConfig(sampling_steps=50, num_candidates=16, tau=TAU, normalize_rewards=False)
    samples, _, calls = explore_sample(model, GaussianTask(2, linear_reward), config, 2000,
                                       torch.Generator().manual_seed(0))
    target = A / TAU
    assert (samples.mean(0) - target).norm() < 0.15 * target.norm(), samples.mean(0)
    assert (torch.cov(samples.T) - torch.eye(2)).abs().max() < 0.15
    assert calls == 2000 * 16 * 50
