"""Step-level RGDM on molecules: the explored window, replayed explorations, the radius in noise norms
(sqrt of the masked molecule's degrees of freedom) and continuation look-aheads that count their calls.

The window and replay checks run on the exact N(0, I) model (milliseconds); the radius and continuation
checks on the tiny pre-trained QM9 model with RDKit's QED.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from conftest import pool_after_each_step, sgd_train
from rgdm.config import ConfigError, RGDMConfig
from rgdm.diffusion.analytic import standard_gaussian_diffusion
from rgdm.training.payoff_weights import value_signal_fraction
from rgdm.training.rgdm import RGDMObjective, explore_sample
from rgdm.training.tasks import BatchShard, GaussianTask

pytestmark = pytest.mark.usefixtures("single_thread")


def gaussian_objective(**config) -> RGDMObjective:
    model = standard_gaussian_diffusion(dim=2, timesteps=100)
    settings = {"sampling_steps": 20, "num_candidates": 4, "batch_size": 4, "normalize_rewards": False, **config}
    return RGDMObjective(model, GaussianTask(2, lambda x: x.sum(-1)), RGDMConfig(**settings))


def explored_times(objective: RGDMObjective, monkeypatch, iterations: int = 6) -> list[int]:
    seen: list[int] = []
    explore = objective.explore

    def recording(z_t, t_int, s_int, shard, generator=None):
        seen.append(t_int)
        return explore(z_t, t_int, s_int, shard, generator)

    monkeypatch.setattr(objective, "explore", recording)
    model = objective.reference
    for step in range(iterations):
        objective.loss(model, step)
    return seen


def test_window_explores_only_low_times(monkeypatch):
    objective = gaussian_objective(explore_t_max=0.3, explore_steps=3)
    seen = explored_times(objective, monkeypatch)
    assert seen and max(seen) <= 30, seen
    # Negative control: the full horizon explores high times too.
    everywhere = explored_times(gaussian_objective(explore_t_max=1.0, explore_steps=3), monkeypatch)
    assert max(everywhere) > 30, everywhere


def test_window_keeps_at_least_the_last_step():
    objective = gaussian_objective(explore_t_max=0.001)
    grid = objective._grid(objective.reference)
    assert objective.explored_pairs(grid, 100) == [len(grid) - 2]
    whole = gaussian_objective(explore_t_max=1.0).explored_pairs(grid, 100)
    assert len(whole) == len(grid) - 1 and objective.explored_pairs(grid, 100) != whole


@pytest.mark.parametrize("value", [0.0, 1.5, -0.2])
def test_window_outside_unit_interval_is_refused(value):
    with pytest.raises(ConfigError, match="explore_t_max"):
        RGDMConfig(explore_t_max=value).validate()


def test_replay_reuses_an_explored_batch_without_new_reward_calls():
    """replay = 3: reward calls at steps 0 and 3 only; in between the loss is recomputed on the cached
    targets with the moved policy (the targets are relative to pi_ref, so they stay valid)."""
    objective = gaussian_objective(replay=3, explore_steps=2)
    model, records = sgd_train(objective, 6, 0.5, lambda model, loss: (objective.reward_calls, loss.item()))
    calls, losses = (list(column) for column in zip(*records))
    per_batch = calls[0]
    assert per_batch > 0
    assert calls == [per_batch] * 3 + [2 * per_batch] * 3, calls
    assert losses[1] != losses[0] and losses[2] != losses[1]  # the policy moved; the targets did not
    # Negative control: without replay every step explores afresh.
    fresh = gaussian_objective(replay=1, explore_steps=2)
    for step in range(3):
        fresh.loss(copy.deepcopy(model), step)
    assert fresh.reward_calls == 3 * per_batch


def test_explored_pool_regresses_on_the_last_explored_batches():
    """explored_pool = 3: each step explores afresh (replay 1) and regresses on the last three explored
    batches at once; the pooled loss is the mean of the batches' own losses (equal numbers of states)."""
    objective = gaussian_objective(replay=1, explored_pool=3, explore_steps=2)
    model = copy.deepcopy(objective.reference).requires_grad_(True)
    calls = []
    for step in range(4):
        loss, _ = objective.loss(model, step)
        calls.append(objective.reward_calls)
    assert [cached[0] for cached in objective._explored] == [1, 2, 3]
    assert calls == [calls[0] * (i + 1) for i in range(4)]  # no batch is reused without new calls
    pool = list(objective._explored)
    pooled, _ = objective._step_loss(model, None, None, step=3)
    single = []
    for cached in pool:
        objective._explored, objective._replay_cache = [cached], cached
        single.append(objective._step_loss(model, None, None, step=cached[0])[0])
    torch.testing.assert_close(pooled, torch.stack(single).mean())
    # Negative control: without a pool only the newest batch is regressed on.
    assert not gaussian_objective(replay=1, explore_steps=2)._explored


def test_exploration_at_sampling_time_pays_only_inside_the_window():
    model = standard_gaussian_diffusion(dim=2, timesteps=100)
    config = RGDMConfig(sampling_steps=20, num_candidates=4, explore_t_max=0.3, normalize_rewards=False,
                        lookahead="tweedie")
    samples, _, calls = explore_sample(model, GaussianTask(2, lambda x: x.sum(-1)), config, 8,
                                       torch.Generator().manual_seed(0))
    grid = model.time_grid(20)
    inside = sum(1 for t in grid[:-1] if t <= 30)
    assert calls == 8 * 4 * inside < 8 * 4 * 20
    assert torch.isfinite(samples).all()


# ------------------------------------------------------------------------------------------------- #
# Molecules: the tiny pre-trained QM9 model, RDKit's QED.


@pytest.fixture
def molecule_objective(tiny_pretrained):
    from rgdm.rewards import make_reward
    from rgdm.runs import load_model
    from rgdm.training.tasks import MoleculeTask

    model = load_model(str(tiny_pretrained)).model
    reward = make_reward({"name": "qed", "method": "edm", "backend": "inline"})

    def build(**config) -> RGDMObjective:
        settings = {"sampling_steps": 6, "num_candidates": 4, "batch_size": 3, "explore_steps": 1, **config}
        return RGDMObjective(model, MoleculeTask(model, reward), RGDMConfig(**settings))

    yield build
    reward.close()


def explored_shifts(objective: RGDMObjective, seed: int = 0):
    """Shifts of the candidates of one explored state of the tiny model, their molecules' dof and std."""
    model, task = objective.reference, objective.task
    generator = torch.Generator().manual_seed(seed)
    shard = BatchShard.of(task.conditions(objective.config.batch_size, generator))
    cond = shard.conditions
    grid = objective._grid(model)
    t_int, s_int = grid[1], grid[2]
    z_t = shard.noise(model, generator)
    exp = objective.explore(z_t, t_int, s_int, shard, generator)
    shifts = exp.candidates - exp.perturbations - exp.reference_mean.unsqueeze(1)  # [B, K, N, F]
    b, k = shifts.shape[:2]
    mask_k = cond.repeat(k).node_mask
    norms = model.sq_norm(shifts.reshape(b * k, *shifts.shape[2:]), mask_k).sqrt().view(b, k)
    t, s = objective._times(t_int, s_int, b)
    _, std = model.step_distribution(z_t, t, s, cond.node_mask, cond.context, objective.config.eta)
    n_atoms = cond.node_mask.sum(dim=(1, 2))
    features = shifts.shape[-1] - 3
    dof = 3 * (n_atoms - 1) + n_atoms * features
    return exp, shifts, norms, std, dof, cond


def test_noise_norm_radius_scales_with_the_square_root_of_the_molecules_dof(molecule_objective):
    objective = molecule_objective(radius=0.3, radius_units="noise_norm", shift="random", antithetic=False,
                                   lookahead="tweedie")
    exp, shifts, norms, std, dof, cond = explored_shifts(objective)
    expected = 0.3 * std * dof.sqrt()
    assert torch.allclose(norms[:, 0], torch.zeros_like(norms[:, 0]), atol=1e-6)  # shift 0: the reference step
    assert torch.allclose(norms[:, 1:], expected[:, None].expand_as(norms[:, 1:]), rtol=1e-4), (norms, expected)
    # Shifts keep the centre of mass at zero and the padding at zero.
    mask = cond.node_mask.unsqueeze(1)  # [B, 1, N, 1]
    assert torch.allclose((shifts[..., :3] * mask).sum(2), torch.zeros(1), atol=1e-5)
    assert (shifts * (1 - mask)).abs().max() == 0
    # Negative control: the step-std unit is shorter by exactly sqrt(dof).
    std_objective = molecule_objective(radius=0.3, radius_units="std", shift="random", antithetic=False,
                                       lookahead="tweedie")
    _, _, std_norms, std2, _, _ = explored_shifts(std_objective)
    assert torch.allclose(std_norms[:, 1:], 0.3 * std2[:, None].expand_as(std_norms[:, 1:]), rtol=1e-4)


def test_continuation_lookahead_on_molecules_counts_every_reward_call(molecule_objective, monkeypatch):
    """B roll-outs scored once, plus K candidates x M continuations per explored state (one call per
    candidate when the explored step ends at t = 0): the objective's count equals the reward's own."""
    b, k, m = 3, 4, 2
    objective = molecule_objective(lookahead="continuation", lookahead_samples=m, lookahead_steps=0,
                                   explore_t_max=0.6, explore_steps=2, batch_size=b, num_candidates=k)
    ends: list[int] = []
    explore = objective.explore

    def recording(z_t, t_int, s_int, shard, generator=None):
        assert t_int <= 0.6 * objective.reference.timesteps
        result = explore(z_t, t_int, s_int, shard, generator)
        ends.append(s_int)
        assert result.values.shape == ((b, k, m) if s_int > 0 else (b, k))
        return result

    monkeypatch.setattr(objective, "explore", recording)
    samples_before = objective.task.reward.stats()["samples"]
    loss, metrics = objective.loss(objective.reference, 0)
    expected = b + sum(b * k * (m if s > 0 else 1) for s in ends)
    assert len(ends) == 2
    assert metrics["reward_calls"] == objective.reward_calls == expected
    assert objective.task.reward.stats()["samples"] - samples_before == expected
    assert torch.isfinite(loss) and 0 < metrics["ess"] <= k


@pytest.mark.parametrize("explored_pool, first_step_kl, early_sequence_weight", [(1, 0.0, 0.0), (2, 1.0, 0.0),
                                                                                 (1, 0.0, 1.0)])
def test_resume_mid_replay_is_bit_for_bit(tmp_path, tiny_pretrained, explored_pool, first_step_kl,
                                          early_sequence_weight):
    """A checkpoint taken between explorations carries the replayed batch: the resumed run goes on
    with it and ends where the uninterrupted run does."""
    from rgdm.config import FinetuneConfig, TrainConfig
    from rgdm.training.checkpoint import checkpoint_paths, load_checkpoint
    from rgdm.training.finetune import finetune

    def config(steps: int) -> FinetuneConfig:
        return FinetuneConfig(
            name="ft", base=str(tiny_pretrained), reward={"name": "qed", "method": "edm", "backend": "inline"},
            rgdm=RGDMConfig(batch_size=3, sampling_steps=6, num_candidates=4, explore_steps=1, replay=2,
                            explore_t_max=0.5, lookahead="continuation", lookahead_samples=2, lookahead_steps=0,
                            explored_pool=explored_pool, first_step_kl=first_step_kl,
                            early_sequence_weight=early_sequence_weight),
            train=TrainConfig(steps=steps, lr=1e-3, ema_decay=0.0, log_every=1, val_every=100, checkpoint_every=100),
            eval_samples=0).validate()

    def final(run_dir):
        return load_checkpoint(checkpoint_paths(run_dir / "checkpoints")[-1])

    finetune(config(4), tmp_path / "a", progress=False, tensorboard=False)
    finetune(config(3), tmp_path / "b", progress=False, tensorboard=False)  # checkpoint mid-way through a replay
    assert "replay_cache" in final(tmp_path / "b")["objective"]
    assert len(final(tmp_path / "b")["objective"].get("explored_pool", [])) == (2 if explored_pool > 1 else 0)
    assert (final(tmp_path / "b")["objective"]["replay_cache"]["early"] is None) == (early_sequence_weight == 0)
    finetune(config(4), tmp_path / "b", resume=True, progress=False, tensorboard=False)
    a, b = final(tmp_path / "a"), final(tmp_path / "b")
    assert a["objective"]["reward_calls"] == b["objective"]["reward_calls"]
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name


def test_first_step_kl_prices_a_drift_by_what_it_does_to_the_chain(molecule_objective, monkeypatch):
    """The same noise-prediction drift d costs |d|^2 / 2 per dimension in the regression's units at
    every step, but moves the first step's mean (sens_T / std_T)^2 times further in units of its own
    noise: the exact KL of that step is that much larger (the negative control: zero without a drift)."""
    objective = molecule_objective(first_step_kl=1.0)
    policy = copy.deepcopy(objective.reference)
    shard = BatchShard.of(objective.task.conditions(3, torch.Generator().manual_seed(0)))
    assert objective._first_step_kl(policy, shard, torch.Generator().manual_seed(1)).item() < 1e-9
    drift = 0.05 * shard.noise(policy, torch.Generator().manual_seed(2))
    predict_eps = policy.predict_eps
    monkeypatch.setattr(policy, "predict_eps", lambda z, t, mask=None, context=None: predict_eps(z, t, mask, context)
                        + drift)
    kl = objective._first_step_kl(policy, shard, torch.Generator().manual_seed(1))
    grid = policy.time_grid(6)
    t, s = objective._times(grid[0], grid[1], 3)
    _, std = policy.step_distribution(shard.noise(policy, torch.Generator().manual_seed(1)), t, s,
                                      shard.conditions.node_mask)
    sensitivity = policy.mean_sensitivity(t, s)
    cond = shard.conditions
    epsilon_units = (0.5 * policy.sq_norm(drift, cond.node_mask) / policy.dof(drift, cond.node_mask)).sum() / 3
    expected = epsilon_units * (sensitivity[0] / std[0]) ** 2
    torch.testing.assert_close(kl, expected.to(kl.dtype), rtol=1e-3, atol=0.0)
    assert (sensitivity[0] / std[0]) ** 2 > 10  # the first step amplifies, unlike the ones after it
    t1, s1 = objective._times(grid[1], grid[2], 3)
    assert policy.mean_sensitivity(t1, s1)[0] < sensitivity[0] / 5


def test_first_step_kl_is_logged_and_adds_no_reward_calls(molecule_objective):
    with_kl, without = molecule_objective(first_step_kl=1.0), molecule_objective()
    policy = copy.deepcopy(with_kl.reference).requires_grad_(True)
    _, metrics = with_kl.loss(policy, 0)
    _, plain = without.loss(copy.deepcopy(policy), 0)
    assert metrics["first_step_kl"] < 1e-9 and "first_step_kl" not in plain  # train mode vs eval: float noise
    assert with_kl.reward_calls == without.reward_calls


def test_rwr_prices_the_first_step_too(tiny_pretrained):
    """RWR gets the same term (its collapses on the physics reward start at the same step): plain RWR
    keeps a frozen reference for it, logs it and spends no extra reward call; eta 0 has no KL."""
    from rgdm.config import RWRConfig
    from rgdm.rewards import make_reward
    from rgdm.runs import load_model
    from rgdm.training.rwr import RWRObjective
    from rgdm.training.tasks import MoleculeTask

    model = load_model(str(tiny_pretrained)).model
    with make_reward({"name": "qed", "method": "edm", "backend": "inline"}) as reward:
        settings = {"batch_size": 3, "sampling_steps": 6, "denoising_repeats": 1}
        with_kl = RWRObjective(model, MoleculeTask(model, reward), RWRConfig(first_step_kl=1.0, **settings))
        without = RWRObjective(model, MoleculeTask(model, reward), RWRConfig(**settings))
        assert with_kl.reference is not None and without.reference is None
        _, metrics = with_kl.loss(model, 0)
        _, plain = without.loss(model, 0)
    assert 0.0 <= metrics["first_step_kl"] < 1e-9 and "first_step_kl" not in plain
    assert with_kl.reward_calls == without.reward_calls == 3
    with pytest.raises(ConfigError, match="first_step_kl"):
        RWRConfig(first_step_kl=1.0, eta=0.0).validate()


@pytest.mark.parametrize("method", ["ddpo", "ppo"])
def test_ddpo_and_ppo_price_the_first_step_too(tiny_pretrained, method):
    """DDPO_IS and PPO-clip get the same term: it adds exactly w · KL to the policy loss (whose random
    numbers it leaves alone), it is positive once the policy drifts from the reference, and it spends
    no reward call."""
    from rgdm.config import DDPOConfig, ppo_clip_defaults
    from rgdm.rewards import make_reward
    from rgdm.runs import load_model
    from rgdm.training.ddpo import DDPOObjective
    from rgdm.training.tasks import MoleculeTask

    model = load_model(str(tiny_pretrained)).model
    settings = {"batch_size": 4, "sampling_steps": 6}
    base = ppo_clip_defaults() if method == "ppo" else DDPOConfig()
    config = lambda **kw: dataclasses.replace(base, **settings, **kw)  # noqa: E731
    with make_reward({"name": "qed", "method": "edm", "backend": "inline"}) as reward:
        with_kl = DDPOObjective(model, MoleculeTask(model, reward), config(first_step_kl=2.0))
        with torch.no_grad():  # drift after the reference was frozen
            for p in model.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
        without = DDPOObjective(model, MoleculeTask(model, reward), config())
        assert with_kl.reference is not None and without.reference is None
        loss, metrics = with_kl.loss(model, 0)
        plain_loss, plain = without.loss(model, 0)
    assert metrics["first_step_kl"] > 1e-6 and "first_step_kl" not in plain
    assert loss.item() == pytest.approx(plain_loss.item() + 2.0 * metrics["first_step_kl"], rel=1e-5, abs=1e-7)
    assert with_kl.reward_calls == without.reward_calls == 4


# -- the hybrid: whole-trajectory weights for the steps before the window --------------------------- #


def early_offsets_after_training(steps: int = 12, **config) -> Tensor:
    """The offset knots e(t) of the analytic model for t >= 50 (steps no window below reaches) after
    ``steps`` SGD steps of the step level on the linear reward x_1 + x_2, window t <= 0.3 T."""
    objective = gaussian_objective(explore_t_max=0.3, explore_steps=2, batch_size=16, replay=1, **config)
    model, _ = sgd_train(objective, steps, 0.05)
    return model.denoiser.knots.detach()[10:]


def test_hybrid_moves_the_early_steps_toward_the_reward_and_only_by_it():
    """early_sequence_weight: the steps before the window learn from the roll-outs' own rewards. On
    the linear reward the early offsets rise on every knot; with flat weights (tau = 1e6) the control
    variate leaves them exactly where they were (no drift from fitting the model's own steps), and
    without the term (the negative control) nothing reaches them."""
    hybrid = early_offsets_after_training(early_sequence_weight=1.0, tau=1.0)
    assert (hybrid.sum(-1) > 0).all() and hybrid.mean() > 1e-3, hybrid
    flat = early_offsets_after_training(early_sequence_weight=1.0, tau=1e6)
    assert flat.abs().max() < 1e-4 * hybrid.abs().max(), flat  # tau = 1e6: weights uniform to ~1e-6
    assert early_offsets_after_training(tau=1.0).abs().max() == 0.0


def test_hybrid_spends_no_extra_reward_call_and_needs_the_step_level():
    with_early = gaussian_objective(explore_t_max=0.3, early_sequence_weight=1.0)
    plain = gaussian_objective(explore_t_max=0.3)
    model = copy.deepcopy(plain.reference).requires_grad_(True)
    _, metrics = with_early.loss(model, 0)
    _, plain_metrics = plain.loss(model, 0)
    assert with_early.reward_calls == plain.reward_calls
    assert 1.0 <= metrics["early_ess"] <= 4 and "early_ess" not in plain_metrics
    with pytest.raises(ConfigError, match="early_sequence_weight"):
        RGDMConfig(variant="sequence", early_sequence_weight=1.0).validate()


# -- value shrinkage: weights from the part of the values that is not look-ahead noise -------------- #


def test_signal_fraction_separates_values_from_their_noise():
    """fraction = 1 - W / (M B): ~0 for pure continuation noise, ~1 for exact values, and
    var(true) / (var(true) + noise / M) in between (here 1 / (1 + 1/2))."""
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(256, 8, 2, generator=g)
    true = torch.randn(256, 8, 1, generator=g)
    assert value_signal_fraction(noise).item() < 0.05
    assert value_signal_fraction(true + 0.01 * noise).item() > 0.99
    assert abs(value_signal_fraction(true + noise).item() - 2 / 3) < 0.05


def test_value_shrinkage_removes_the_pull_toward_noisy_candidates():
    """Every candidate's continuations average to 0 but spread by ±a_k: the soft value
    tau log mean exp(v / tau) favours the noisiest candidate (a pull toward noise, the negative
    control), while the shrunk values carry no signal and leave the proposal ratio alone."""
    spread = torch.arange(8.0).view(1, 8, 1)
    values = torch.cat([spread, -spread], dim=-1).expand(4, 8, 2)
    log_base = torch.randn(4, 8, generator=torch.Generator().manual_seed(1)) * 0.1
    shrunk, _ = gaussian_objective(num_candidates=8, value_shrinkage=True)._weights(values, log_base, None)
    assert torch.allclose(shrunk, torch.softmax(log_base, dim=-1), atol=1e-6)
    raw, _ = gaussian_objective(num_candidates=8)._weights(values, log_base, None)
    assert (raw[:, -1] > 0.5).all(), raw  # the noisiest candidate takes most of the weight


def test_value_shrinkage_keeps_informative_values():
    g = torch.Generator().manual_seed(2)
    values = torch.arange(8.0).view(1, 8, 1) * 0.3 + 0.01 * torch.randn(16, 8, 2, generator=g)
    log_base = torch.zeros(16, 8)
    shrunk, _ = gaussian_objective(num_candidates=8, value_shrinkage=True)._weights(values, log_base, None)
    raw, _ = gaussian_objective(num_candidates=8)._weights(values, log_base, None)
    assert torch.allclose(shrunk, raw, atol=1e-3)
    assert (raw[:, -1] > 3 * raw[:, 0]).all()  # and the values do move the weights


def test_explored_batches_report_their_value_signal():
    objective = gaussian_objective(explore_t_max=1.0, explore_steps=3, value_shrinkage=True)
    _, metrics = objective.loss(objective.reference, 0)
    assert 0.0 <= metrics["value_signal"] <= 1.0


@pytest.mark.parametrize("settings", [{"lookahead": "tweedie"}, {"lookahead_samples": 1}, {"adapt_tau": True},
                                      {"variant": "sequence"}])
def test_value_shrinkage_needs_noisy_lookahead_samples(settings):
    with pytest.raises(ConfigError, match="value_shrinkage"):
        RGDMConfig(value_shrinkage=True, **settings).validate()


def test_mean_value_estimate_is_risk_neutral():
    """The soft value of two continuations ±a_k favours the candidate with the widest outcomes (the
    pay-off's own risk-seeking at low tau); their mean reward does not."""
    spread = torch.arange(8.0).view(1, 8, 1)
    values = torch.cat([spread, -spread], dim=-1).expand(4, 8, 2) * 0.5
    log_base = torch.zeros(4, 8)
    neutral, _ = gaussian_objective(num_candidates=8, value_estimate="mean")._weights(values, log_base, None)
    assert torch.allclose(neutral, torch.full((4, 8), 1 / 8))
    seeking, _ = gaussian_objective(num_candidates=8)._weights(values, log_base, None)
    assert (seeking.diff(dim=-1) > 0).all()


@pytest.mark.parametrize("settings", [{"lookahead": "tweedie"}, {"variant": "sequence"}])
def test_mean_value_estimate_needs_continuations(settings):
    with pytest.raises(ConfigError, match="value_estimate"):
        RGDMConfig(value_estimate="mean", **settings).validate()


# -- a refreshed reference: trust-region iterations instead of one fixed pay-off -------------------- #


def test_reference_refresh_copies_the_policy_every_r_steps():
    """reference_refresh = 2: the reference is the pre-trained model for steps 0-1, the policy of the
    start of step 2 for steps 2-3, and so on; with 0 (the negative control) it never moves."""
    def run(refresh: int) -> tuple[list[Tensor], list[Tensor]]:
        objective = gaussian_objective(replay=1, reference_refresh=refresh)
        model = copy.deepcopy(objective.reference).requires_grad_(True)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        seen, policies = [], []
        for step in range(5):
            policies.append(model.denoiser.knots.detach().clone())
            loss, _ = objective.loss(model, step)
            seen.append(objective.reference.denoiser.knots.detach().clone())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return seen, policies

    seen, policies = run(2)
    assert not torch.equal(policies[2], policies[0]) and not torch.equal(policies[4], policies[2])
    for step, expected in enumerate([0, 0, 2, 2, 4]):
        assert torch.equal(seen[step], policies[expected]), step
    frozen, policies = run(0)
    assert all(torch.equal(knots, policies[0]) for knots in frozen)
    with pytest.raises(ConfigError, match="reference_refresh"):  # a refresh must start a fresh batch
        RGDMConfig(variant="sequence", reference_refresh=3, sequence_replay=2).validate()


def test_refreshed_reference_empties_the_explored_pool():
    """reference_refresh = 4 with the last 3 explored batches pooled and each replayed twice: a refresh
    (steps 4, 8) drops the explorations weighted toward the old copy's pay-off, so the step level, like
    the sequence level, fits each segment's own pay-off. Negative control: without the refresh the pool
    keeps its last three batches."""
    def pooled_steps(refresh: int) -> list[list[int]]:
        objective = gaussian_objective(replay=2, explored_pool=3, reference_refresh=refresh)
        return pool_after_each_step(objective, lambda o: [cached[0] for cached in o._explored], lr=0.05)

    assert pooled_steps(4) == [[0], [0], [0, 2], [0, 2], [4], [4], [4, 6], [4, 6], [8], [8]]
    assert pooled_steps(0)[-1] == [4, 6, 8]
    with pytest.raises(ConfigError, match=r"multiple of replay \(2\)"):  # a refresh must start a fresh batch
        RGDMConfig(variant="step", replay=2, reference_refresh=3).validate()


def test_base_mix_reference_steps_are_the_geometric_mixture(molecule_objective):
    """After a refresh with reference_base_mix alpha, each reverse step of pi_ref on molecules (positions
    and features) has the mean (1 - alpha) · policy's + alpha · pre-trained model's and their std."""
    alpha = 0.3
    objective = molecule_objective(replay=1, reference_refresh=1, reference_base_mix=alpha)
    pretrained = objective.task.model  # the model the objective was built from
    policy = copy.deepcopy(pretrained)
    with torch.no_grad():
        for parameter in policy.denoiser.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    objective._refresh_reference(policy)
    generator = torch.Generator().manual_seed(0)
    cond = objective.task.conditions(3, generator)
    z_t = policy.noise(torch.zeros(3, cond.node_mask.shape[1], 3 + policy.n_features), cond.node_mask, generator)
    t, s = torch.full((3,), 30), torch.full((3,), 25)
    mixed_mean, mixed_std = objective.reference.step_distribution(z_t, t, s, cond.node_mask)
    policy_mean, policy_std = policy.step_distribution(z_t, t, s, cond.node_mask)
    base_mean, _ = pretrained.step_distribution(z_t, t, s, cond.node_mask)
    assert not torch.allclose(policy_mean, base_mean, atol=1e-4)  # the policy did move
    torch.testing.assert_close(mixed_mean, (1 - alpha) * policy_mean + alpha * base_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed_std, policy_std)


def test_atom_type_kl_prices_feature_drifts_and_not_position_drifts(molecule_objective, monkeypatch):
    """A drift d of the noise prediction moves a step's mean by its sensitivity times d, so in the
    regression's units the atom-type KL is |d_h|^2 / 2 / dof for a drift of the features and exactly 0 for
    one of the positions (and 0 for the pre-trained model itself)."""
    objective = molecule_objective(atom_type_kl=1.0)
    pretrained = objective.base
    policy = copy.deepcopy(pretrained)
    generator = torch.Generator().manual_seed(0)
    cond = objective.task.conditions(3, generator)
    z_t = policy.noise(torch.zeros(3, cond.node_mask.shape[1], 3 + policy.n_features), cond.node_mask, generator)
    t, s = torch.full((3,), 30), torch.full((3,), 25)
    scale = policy.mean_sensitivity(t, s).float()  # as _step_scale gives it

    def kl_with_drift(drift: Tensor) -> Tensor:
        predict_eps = pretrained.predict_eps
        monkeypatch.setattr(policy, "predict_eps", lambda z, t_, mask=None, context=None:
                            predict_eps(z, t_, mask, context) + drift)
        mean, _ = policy.step_distribution(z_t, t, s, cond.node_mask)
        return objective._atom_type_kl(policy, z_t, t, s, mean, scale, cond)

    drift = 0.1 * policy.noise(z_t, cond.node_mask, torch.Generator().manual_seed(1))
    positions_only = drift - policy.node_features_only(drift)
    assert kl_with_drift(torch.zeros_like(drift)).abs().max() < 1e-10
    assert kl_with_drift(positions_only).abs().max() < 1e-10
    expected = 0.5 * policy.sq_norm(policy.node_features_only(drift), cond.node_mask) / policy.dof(z_t, cond.node_mask)
    assert (expected > 1e-4).all()
    torch.testing.assert_close(kl_with_drift(drift), expected, rtol=1e-4, atol=1e-9)


def loss_gradient(objective: RGDMObjective, monkeypatch) -> tuple[Callable[[Tensor], Tensor], Tensor]:
    """The gradient of the objective's loss on one explored (then replayed) batch as a function of a
    drift D added to the pre-trained model's noise prediction, and the batch's node mask."""
    pretrained = objective.reference
    policy = copy.deepcopy(pretrained)
    objective.loss(policy, 0)  # explores the batch that the next steps replay
    predict_eps = pretrained.predict_eps

    def gradient(drift: Tensor) -> Tensor:
        drift = drift.clone().requires_grad_(True)
        monkeypatch.setattr(policy, "predict_eps", lambda z, t, mask=None, context=None:
                            predict_eps(z, t, mask, context) + drift)
        loss, _ = objective.loss(policy, 1)  # a replayed step: the same batch every time
        return torch.autograd.grad(loss.double(), drift)[0].double()

    return gradient, objective._replay_cache[1].conditions.node_mask


def test_atom_type_kl_shrinks_the_features_fit_and_leaves_the_positions_alone(molecule_objective, monkeypatch):
    """Both terms are quadratic in the step's noise prediction and share its units. The loss's curvature
    in the features is diagonal, so its minimum there is D* = -g(0) / (g(1) - g(0)): the atom-type KL of
    weight w shrinks the features' fit to the explored targets by 1 / (1 + w). Its gradient in the
    positions is untouched, at every drift. Negative controls: a KL on the whole state would change the
    positions' gradient, and no KL would not shrink the features."""
    weight, settings = 4.0, {"replay": 1000, "tau": 0.1}
    free, mask = loss_gradient(molecule_objective(**settings), monkeypatch)
    held, _ = loss_gradient(molecule_objective(atom_type_kl=weight, **settings), monkeypatch)
    pretrained = molecule_objective().reference
    zero = torch.zeros(*mask.shape[:2], 3 + pretrained.n_features)
    ones = pretrained.project(torch.ones_like(zero), mask)
    real = mask.expand_as(zero).bool().clone()
    real[..., :3] = False  # the feature entries of real atoms

    def feature_minimum(gradient) -> Tensor:
        at_zero, at_ones = gradient(zero), gradient(ones)
        return -at_zero[real] / (at_ones - at_zero)[real]

    free_fit, held_fit = feature_minimum(free), feature_minimum(held)
    assert free_fit.abs().max() > 1e-3  # the explored targets do move the features
    torch.testing.assert_close(held_fit, free_fit / (1 + weight), atol=1e-7, rtol=1e-4)
    for drift in (zero, ones, 0.1 * pretrained.noise(zero, mask, torch.Generator().manual_seed(0))):
        free_positions, held_positions = free(drift)[..., :3], held(drift)[..., :3]
        assert free_positions.abs().max() > 0
        torch.testing.assert_close(held_positions, free_positions, atol=1e-9, rtol=1e-5)


def test_atom_type_kl_needs_the_step_level_and_node_features():
    with pytest.raises(ConfigError, match="atom_type_kl.*variant: step"):
        RGDMConfig(variant="sequence", atom_type_kl=1.0).validate()
    with pytest.raises(ConfigError, match="atom_type_kl.*has none"):
        gaussian_objective(atom_type_kl=1.0)
    with pytest.raises(ConfigError, match="atom_type_kl"):
        RGDMConfig(atom_type_kl=-1.0).validate()
