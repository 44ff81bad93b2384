"""Sampling-time steering (SVDD-PM, twisted SMC) on DESIGN §2's closed-form case and on molecules.

Closed form: data N(0, I), reward r(x) = a^T x, tau = 1; the tilted target p(x) exp(r(x)/tau) is
N(a/tau, I). For this case the posterior-mean look-ahead V(z_t) = a^T x_hat_0 = alpha_t a^T z_t is
the exact soft value up to a constant, so twisted SMC must recover the mean a/tau.
"""

import pytest
import torch

from rgdm.diffusion.analytic import standard_gaussian_diffusion
from rgdm.sampling import smc_sample, svdd_sample
from rgdm.sampling.smc import resample_indices
from rgdm.training.tasks import GaussianTask

A = torch.tensor([1.0, -0.6])
TAU = 1.0


def linear_task() -> GaussianTask:
    return GaussianTask(2, lambda x: x @ A)


pytestmark = pytest.mark.usefixtures("single_thread")


def test_smc_with_exact_lookahead_recovers_tilted_mean():
    model = standard_gaussian_diffusion(dim=2, timesteps=200)
    task = linear_task()
    n, k = 1000, 64
    out = smc_sample(model, task, n, k, TAU, torch.Generator().manual_seed(1), sampling_steps=None,
                     ess_threshold=0.5, batch_size=8192)
    target = A / TAU
    # The weighted particles estimate the tilted mean (self-normalisation leaves an O(1/K) bias, ~5 % here) ...
    weighted = (out.log_weights.exp().unsqueeze(-1) * out.particles).sum(1).mean(0)
    assert (weighted - target).norm() < 0.1 * target.norm(), f"weighted particle mean {weighted}"
    # ... and each output is one particle drawn by weight, so the outputs' mean matches theirs up to
    # sampling noise (unit variance per coordinate: 4 standard errors).
    assert (out.samples.mean(0) - weighted).abs().max() < 4 / n**0.5, f"output mean {out.samples.mean(0)}"
    # Reward calls: K particles per output at each of the 201 grid points (T, ..., 0), nothing else.
    assert out.reward_calls == n * k * 201 == task.calls
    assert out.scores.values.shape == (n,)
    assert torch.allclose(out.scores.values, out.samples @ A, atol=1e-5)
    assert 0 < out.resampled_fraction < 1  # adaptive: resampling happens, but not at every step
    assert torch.allclose(out.log_weights.exp().sum(1), torch.ones(n))


def test_smc_without_reward_is_the_pretrained_sampler():
    """tau -> infinity makes every weight equal: SMC reduces to plain ancestral sampling."""
    model = standard_gaussian_diffusion(dim=2, timesteps=200)
    out = smc_sample(model, linear_task(), 2000, 4, 1e9, torch.Generator().manual_seed(0), sampling_steps=None,
                     batch_size=8192)
    assert out.samples.mean(0).abs().max() < 0.08
    assert out.resampled_fraction == 0.0


@pytest.mark.parametrize("scheme", ["systematic", "multinomial"])
def test_resampling_follows_the_weights(scheme):
    log_w = torch.log(torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.5, 0.0, 0.0, 0.5]]) + 1e-30)
    index = resample_indices(log_w.repeat(500, 1), scheme, torch.Generator().manual_seed(0))
    assert (index[0::2] == 1).all()
    counts = torch.stack([(index[1::2] == j).float().mean() for j in range(4)])
    assert torch.allclose(counts, torch.tensor([0.5, 0.0, 0.0, 0.5]), atol=0.05)
    if scheme == "systematic":  # systematic resampling keeps exactly K * w_j copies when that is whole
        assert ((index[1::2] == 0).sum(1) == 2).all()


def test_svdd_greedy_reward_rises_monotonically_with_m():
    model = standard_gaussian_diffusion(dim=2, timesteps=200)
    n, steps = 500, 20
    means = []
    for m in (1, 2, 4, 8):
        task = linear_task()
        out = svdd_sample(model, task, n, m, torch.Generator().manual_seed(0), sampling_steps=steps)
        means.append(out.scores.values.mean().item())
        # Reward calls: M candidates per sample at each of the 20 steps; the last look-ahead (s = 0)
        # is the final sample's reward, so there is no extra call.
        assert out.reward_calls == n * m * steps == task.calls
        assert torch.allclose(out.scores.values, out.samples @ A, atol=1e-5)
    assert abs(means[0]) < 0.15  # M = 1 is the pretrained sampler
    assert all(b > a + 0.3 for a, b in zip(means, means[1:])), f"mean rewards {means}"


def test_svdd_soft_selection_sits_between_sampling_and_greedy():
    model = standard_gaussian_diffusion(dim=2, timesteps=200)
    rewards = {}
    for selection, alpha in (("sample", 1e6), ("sample", 1.0), ("greedy", 1.0)):
        out = svdd_sample(model, linear_task(), 500, 8, torch.Generator().manual_seed(0), sampling_steps=20,
                          selection=selection, alpha=alpha)
        rewards[(selection, alpha)] = out.scores.values.mean().item()
    assert abs(rewards[("sample", 1e6)]) < 0.15  # a flat softmax keeps a random candidate
    assert 0.5 < rewards[("sample", 1.0)] < rewards[("greedy", 1.0)] - 1.0, rewards


@pytest.mark.parametrize("call, message", [
    (lambda m, t: svdd_sample(m, t, 4, 0), "M and batch_size must be >= 1"),
    (lambda m, t: svdd_sample(m, t, 4, 2, selection="best"), "selection must be one of"),
    (lambda m, t: svdd_sample(m, t, 4, 2, selection="sample", alpha=0.0), "alpha must be > 0"),
    (lambda m, t: smc_sample(m, t, 4, 2, tau=0.0), "tau must be > 0"),
    (lambda m, t: smc_sample(m, t, 4, 2, tau=1.0, ess_threshold=2.0), "ess_threshold must be in"),
    (lambda m, t: smc_sample(m, t, 4, 2, tau=1.0, resampling="stratified"), "resampling must be one of"),
])
def test_bad_arguments_are_refused_with_one_clear_message(call, message):
    with pytest.raises(ValueError, match=message):
        call(standard_gaussian_diffusion(dim=2, timesteps=20), linear_task())


def test_both_samplers_steer_molecules_with_a_chemistry_reward(tiny_pretrained):
    from rgdm.rewards import make_reward
    from rgdm.runs import load_model
    from rgdm.training.tasks import MoleculeTask

    model = load_model(tiny_pretrained).model
    with make_reward({"name": "qed"}) as reward:
        task = MoleculeTask(model, reward)
        svdd = svdd_sample(model, task, 3, 2, torch.Generator().manual_seed(0), sampling_steps=5)
        smc = smc_sample(model, task, 3, 2, 0.1, torch.Generator().manual_seed(0), sampling_steps=5)
    for out in (svdd, smc):
        positions = out.samples[..., :3] * out.conditions.node_mask
        assert positions.sum(1).abs().max() < 1e-5 * (1 + positions.abs().max())  # zero centre of mass
        assert out.scores.values.shape == (3,)
        assert torch.isfinite(out.scores.values).all()
    assert svdd.reward_calls == 3 * 2 * 5
    assert smc.reward_calls == 3 * 2 * 6
