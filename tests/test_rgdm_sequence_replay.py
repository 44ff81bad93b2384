"""Sequence-level RGDM replays its weighted roll-outs: the weights compare the pay-off with the policy that
sampled them, so one batch of reward calls feeds ``sequence_replay`` optimizer steps; a checkpoint taken
mid-way through a replayed batch resumes bit-for-bit."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor

from conftest import pool_after_each_step, sgd_train
from rgdm.config import ConfigError, RGDMConfig
from rgdm.diffusion.analytic import standard_gaussian_diffusion
from rgdm.training.rgdm import RGDMObjective
from rgdm.training.tasks import GaussianTask

pytestmark = pytest.mark.usefixtures("single_thread")


def sequence_objective(replay: int = 1, pool: int = 1, **config) -> RGDMObjective:
    model = standard_gaussian_diffusion(dim=2, timesteps=100)
    config = RGDMConfig(variant="sequence", sampling_steps=10, batch_size=8, normalize_rewards=False,
                        sequence_loss="denoising", sequence_replay=replay, sequence_pool=pool, **config)
    return RGDMObjective(model, GaussianTask(2, lambda x: x.sum(-1)), config)


def train(objective: RGDMObjective, steps: int) -> tuple[list[int], list[float]]:
    _, records = sgd_train(objective, steps, 0.1, lambda model, loss: (objective.reward_calls, loss.item()))
    calls, losses = zip(*records)
    return list(calls), list(losses)


def test_replay_reuses_the_weighted_batch_without_new_reward_calls():
    objective = sequence_objective(replay=3)
    calls, losses = train(objective, 6)
    assert calls == [8, 8, 8, 16, 16, 16], calls
    assert [objective.replaying(step) for step in range(3, 7)] == [True, True, True, False]
    assert len(set(losses[:3])) == 3  # fresh noise levels and a moved policy on the same samples
    # Negative control: without replay every step samples and scores afresh.
    fresh_calls, _ = train(sequence_objective(replay=1), 3)
    assert fresh_calls == [8, 16, 24]


def test_pool_weights_every_kept_batch_jointly():
    """sequence_pool = 3: each step samples a new batch and weights the last three together: on the
    reference itself (ratio 1) the weights are softmax(r / tau) over all 24 pooled samples."""
    objective = sequence_objective(pool=3, truncate_weights=False, tau=0.7)
    calls, _ = train(objective, 4)
    assert calls == [8, 16, 24, 32]
    assert [b.step for b in objective._pool] == [1, 2, 3]
    fresh = copy.deepcopy(objective.reference)  # a policy equal to the reference: every log-ratio is 0
    objective._pool = []
    for step in range(3):
        objective.loss(fresh, 10 + step)
    weights, metrics = objective._pool_weights(objective._pool)
    values = torch.cat([b.values for b in objective._pool])
    torch.testing.assert_close(torch.cat(weights), torch.softmax(values / 0.7, 0))
    assert metrics["ess_fraction"] == pytest.approx(metrics["ess"] / 24)
    # Negative control: a pool of one weights each batch on its own.
    single = sequence_objective(pool=1, truncate_weights=False, tau=0.7)
    for step in range(3):
        single.loss(fresh, step)
    assert len(single._pool) == 1 and torch.cat(single._pool_weights(single._pool)[0]).sum() == pytest.approx(1.0)


@pytest.mark.parametrize("reuse", [{"sequence_replay": 2}, {"sequence_pool": 2}])
def test_reusing_the_policys_batches_with_the_path_loss_is_refused(reuse):
    with pytest.raises(ConfigError, match="sequence_replay / sequence_pool"):
        RGDMConfig(variant="sequence", sequence_loss="path", **reuse).validate()
    RGDMConfig(variant="sequence", sequence_loss="path", sequence_proposal="reference", **reuse).validate()


@pytest.mark.parametrize("minibatch,draw,refresh", [(0, "batches", 0), (1, "batches", 0), (1, "weights", 0),
                                                    (0, "batches", 3)])
def test_resume_mid_sequence_replay_is_bit_for_bit(tmp_path, tiny_pretrained, minibatch, draw, refresh):
    """Stopped after step 4 of a batch replayed for steps 3-5 and resumed; with ``refresh`` 3 the reference
    was refreshed at step 3, so the pool then holds that one batch (else two)."""
    from rgdm.config import FinetuneConfig, TrainConfig
    from rgdm.training.checkpoint import checkpoint_paths, load_checkpoint
    from rgdm.training.finetune import finetune

    def config(steps: int) -> FinetuneConfig:
        return FinetuneConfig(
            name="ft", base=str(tiny_pretrained), reward={"name": "qed", "method": "edm", "backend": "inline"},
            rgdm=RGDMConfig(variant="sequence", batch_size=4, sampling_steps=6, sequence_replay=3, sequence_pool=2,
                            sequence_minibatch=minibatch, sequence_draw=draw, denoising_repeats=1,
                            reference_refresh=refresh),
            train=TrainConfig(steps=steps, lr=1e-3, ema_decay=0.0, log_every=1, val_every=100, checkpoint_every=100),
            eval_samples=0).validate()

    def final(run_dir):
        return load_checkpoint(checkpoint_paths(run_dir / "checkpoints")[-1])

    finetune(config(5), tmp_path / "a", progress=False, tensorboard=False)
    finetune(config(4), tmp_path / "b", progress=False, tensorboard=False)  # steps 3..5 replay, two batches pooled
    assert len(final(tmp_path / "b")["objective"]["sequence_pool"]) == (1 if refresh else 2)
    finetune(config(5), tmp_path / "b", resume=True, progress=False, tensorboard=False)
    a, b = final(tmp_path / "a"), final(tmp_path / "b")
    assert a["objective"]["reward_calls"] == b["objective"]["reward_calls"] == 8
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name


def fit_from_reference_rollouts(tmp_path, steps: tuple[int, ...], break_reference: bool = False,
                                loss: str = "denoising", pool_scale: int = 1, draw: str = "batches",
                                **settings):
    """Sequence RGDM on the closed form with roll-outs of the frozen reference (the ratio is exactly 1),
    pooled over 4 batches (2 for the path loss) and replayed twice; yields (steps, exact mean, exact
    covariance, target mean, target covariance). ``break_reference`` lets the "reference" follow the
    policy (plain RWR with a pool). ``pool_scale`` > 1 pools that many times more batches and fits each
    step on the usual number of them, drawn from the pool (``sequence_minibatch``): whole batches, or with
    ``draw="weights"`` as many samples drawn in proportion to their weights. ``settings`` override the
    RGDM config (the target stays the pay-off at tau = 1)."""
    from rgdm.config import TrainConfig
    from rgdm.diffusion.analytic import exact_moments, gaussian_payoff
    from rgdm.training.loop import Trainer

    a, tau = torch.tensor([1.0, -0.6]), 1.0
    torch.manual_seed(0)
    model = standard_gaussian_diffusion(dim=2, timesteps=200)
    reference_moments = exact_moments(standard_gaussian_diffusion(dim=2, timesteps=200), 50)
    target_mean, target_cov = (v.float() for v in gaussian_payoff(*reference_moments, "linear", tau, a=a))
    # the path loss trains all 50 steps of every pooled trajectory: a smaller batch and pool keep it fast
    batch, pool = (128, 4) if loss == "denoising" else (64, 2)
    config = RGDMConfig(**{"variant": "sequence", "sampling_steps": 50, "batch_size": batch, "tau": tau,
                           "normalize_rewards": False, "sequence_loss": loss, "sequence_proposal": "reference",
                           "sequence_pool": pool * pool_scale, "sequence_minibatch": pool if pool_scale > 1 else 0,
                           "sequence_replay": 2, "denoising_repeats": 1, "sequence_draw": draw, **settings})
    objective = RGDMObjective(model, GaussianTask(2, lambda x: x @ a), config)
    if break_reference:
        objective.reference = model
    train_config = TrainConfig(steps=1, lr=0.05, ema_decay=0.0, grad_clip=0.0, log_every=10, val_every=10_000,
                               checkpoint_every=10_000)
    trainer = Trainer(model, objective, train_config, tmp_path, {"config": {}}, tensorboard=False, progress=False)
    for total in steps:
        trainer.config.steps = total
        trainer.fit()
        mean, cov = (v.float() for v in exact_moments(model, 50))
        yield total, mean, cov, target_mean, target_cov
    assert objective.reward_calls == steps[-1] // 2 * batch  # one batch per two optimizer steps


@pytest.mark.parametrize("loss", ["denoising", "path"])
def test_reference_proposal_with_pool_and_replay_lands_on_the_payoff(tmp_path, loss):
    """The fit is the pay-off N(C0 a / tau, C0) of the closed form, and it stays there: reusing each batch
    (pooled, replayed twice) does not re-tilt anything, because the samples are the reference's."""
    for steps, mean, cov, target_mean, target_cov in fit_from_reference_rollouts(tmp_path, (60, 120), loss=loss):
        assert (mean - target_mean).norm() < 0.1 * target_mean.norm(), f"{steps} steps: mean {mean} vs {target_mean}"
        assert (cov - target_cov).abs().max() < 0.1, f"{steps} steps: covariance {cov} vs {target_cov}"


def test_pooled_rollouts_of_the_moving_policy_without_ratio_run_past_the_payoff(tmp_path):
    """Negative control: the same pool and replay on the policy's own samples without the importance
    ratio (plain RWR) keeps tilting and ends well past the pay-off mean."""
    *_, (_, mean, _, target_mean, _) = fit_from_reference_rollouts(tmp_path, (120,), break_reference=True)
    a = torch.tensor([1.0, -0.6])
    assert float(mean @ a) > 1.5 * float(target_mean @ a), (mean, target_mean)


def test_pool_drawn_in_minibatches_lands_on_the_payoff(tmp_path):
    """A pool four times larger (8 batches), each step fitted on 2 of them drawn at random: the same cost
    per step as the pool of 2 above, and the same fixed point. The moments are averaged over the
    checkpoints from 80 to 200 steps, so that one step's SGD noise does not decide the check."""
    fits = list(fit_from_reference_rollouts(tmp_path, tuple(range(80, 201, 20)), loss="path", pool_scale=4))
    mean, cov = (torch.stack([fit[i] for fit in fits]).mean(0) for i in (1, 2))
    target_mean, target_cov = fits[0][3], fits[0][4]
    assert (mean - target_mean).norm() < 0.1 * target_mean.norm(), (mean, target_mean)
    assert (cov - target_cov).abs().max() < 0.1, (cov, target_cov)


def test_minibatch_of_the_pool_is_an_unbiased_estimate_of_the_pooled_loss():
    """sequence_minibatch = 1 of a pool of 4 (the path loss on every step of the reference's roll-outs, so
    that each batch's loss is deterministic): the step's loss is 4x the loss on one pooled batch, every
    batch gets drawn, and the four possible values average to the loss on the whole pool."""
    def objective(minibatch: int) -> RGDMObjective:
        model = standard_gaussian_diffusion(dim=2, timesteps=100)
        config = RGDMConfig(variant="sequence", sampling_steps=10, batch_size=8, normalize_rewards=False,
                            sequence_loss="path", sequence_proposal="reference", sequence_pool=4,
                            sequence_replay=1, sequence_minibatch=minibatch)
        return RGDMObjective(model, GaussianTask(2, lambda x: x.sum(-1)), config)

    whole, drawn = objective(0), objective(1)
    policy = copy.deepcopy(whole.reference).requires_grad_(True)
    for step in range(4):  # four fresh batches fill the pool
        whole.loss(policy, step)
    drawn._pool = list(whole._pool)
    whole.replaying = drawn.replaying = lambda step: True  # from here on every step refits the same pool
    full = whole.loss(policy, 4)[0].item()
    values = {round(drawn.loss(policy, step)[0].item(), 6) for step in range(4, 64)}
    assert len(values) == 4, values
    assert sum(values) / 4 == pytest.approx(full, rel=1e-5)
    # Negative control: without the factor len(pool) / minibatch the draws average to a quarter of it.
    assert sum(values) / 16 != pytest.approx(full, rel=0.1)


def test_samples_drawn_by_weight_land_on_the_payoff(tmp_path, monkeypatch):
    """``sequence_draw: weights`` fits each step on 2 batches' worth of samples drawn from a pool of 16
    batches in proportion to their weights: the same fixed point, the pay-off (moments averaged over the
    checkpoints from 80 to 200 steps, as above)."""
    def averaged_fit():
        fits = list(fit_from_reference_rollouts(tmp_path, tuple(range(80, 201, 20)), pool_scale=4, draw="weights"))
        mean, cov = (torch.stack([fit[i] for fit in fits]).mean(0) for i in (1, 2))
        return mean, cov, fits[0][3], fits[0][4]

    mean, cov, target_mean, target_cov = averaged_fit()
    assert (mean - target_mean).norm() < 0.1 * target_mean.norm(), (mean, target_mean)
    assert (cov - target_cov).abs().max() < 0.1, (cov, target_cov)
    # Negative control: draws that ignore the weights (uniform) refit the reference, mean 0.
    from rgdm.training import rgdm_sequence

    weighted = rgdm_sequence.global_pool_weights
    monkeypatch.setattr(rgdm_sequence, "global_pool_weights",
                        lambda *a: (torch.full_like(weighted(*a)[0], 1.0), weighted(*a)[1]))
    mean, *_ = averaged_fit()
    assert mean.norm() < 0.3 * target_mean.norm(), (mean, target_mean)


@pytest.mark.parametrize("proposal", ["reference", "policy"])
def test_refreshed_reference_empties_the_pool(proposal):
    """reference_refresh = 4 with a pool of 3 batches replayed twice: a refresh (steps 4, 8) drops the
    batches drawn before it, whose weights were measured against the old copy, so the pool only ever
    holds roll-outs weighted toward the current reference (and holds at most R / replay = 2 batches).
    Negative control: without the refresh the pool keeps its last three batches."""
    def pooled_steps(refresh: int) -> list[list[int]]:
        objective = sequence_objective(replay=2, pool=3, sequence_proposal=proposal, reference_refresh=refresh)
        return pool_after_each_step(objective, lambda o: [batch.step for batch in o._pool])

    assert pooled_steps(4) == [[0], [0], [0, 2], [0, 2], [4], [4], [4, 6], [4, 6], [8], [8]]
    assert pooled_steps(0)[-1] == [4, 6, 8]
    with pytest.raises(ConfigError, match=r"multiple of sequence_replay \(2\)"):
        RGDMConfig(variant="sequence", sequence_replay=2, sequence_pool=3, reference_refresh=3).validate()


def refreshed_pooled_fit(tmp_path, **settings) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The closed form fitted in 7 segments of 20 steps at tau = 2, each segment exact for the pay-off of
    its copy (reference roll-outs, a pool emptied at each refresh, the exact path loss): the moments
    averaged over the last segment's checkpoints, and the target's (the pay-off at tau = 1)."""
    fits = list(fit_from_reference_rollouts(tmp_path, (120, 130, 140), loss="path", reference_refresh=20, tau=2.0,
                                            **settings))
    mean, cov = (torch.stack([fit[i] for fit in fits]).mean(0) for i in (1, 2))
    return mean, cov, fits[0][3], fits[0][4]


def test_refreshed_pooled_fit_mixed_with_the_base_settles_on_the_payoff(tmp_path):
    """With reference_base_mix alpha = 0.5 the exact segments converge to the pay-off of the pre-trained
    model at alpha · tau = 1, the closed form (the control is the next test)."""
    mean, cov, target_mean, target_cov = refreshed_pooled_fit(tmp_path, reference_base_mix=0.5)
    assert (mean - target_mean).norm() < 0.1 * target_mean.norm(), (mean, target_mean)
    assert (cov - target_cov).abs().max() < 0.1, (cov, target_cov)


def test_refreshed_pooled_fit_without_the_mix_climbs_past_the_payoff(tmp_path):
    """Negative control: the same exact segments without the mix compound their tilts (each segment's
    pay-off is the last copy's), ending well past the pay-off mean."""
    mean, _, target_mean, _ = refreshed_pooled_fit(tmp_path)
    a = torch.tensor([1.0, -0.6])
    assert float(mean @ a) > 1.5 * float(target_mean @ a), (mean, target_mean)


def test_samples_drawn_by_weight_are_an_unbiased_estimate_of_the_pooled_loss():
    """The mean loss of samples drawn in proportion to their weights averages, over draws, to the
    weighted loss on the whole pool (both averaged over their random noise levels)."""
    def objective(draw: str) -> RGDMObjective:
        model = standard_gaussian_diffusion(dim=2, timesteps=100)
        config = RGDMConfig(variant="sequence", sampling_steps=10, batch_size=8, normalize_rewards=False, tau=0.3,
                            sequence_loss="denoising", sequence_proposal="reference", sequence_pool=3,
                            sequence_replay=1, sequence_minibatch=1, sequence_draw=draw, denoising_repeats=1)
        return RGDMObjective(model, GaussianTask(2, lambda x: 3 * x.sum(-1)), config)

    whole, drawn = objective("batches"), objective("weights")
    whole.config.sequence_minibatch = 0
    policy = copy.deepcopy(whole.reference)
    policy.predict_eps = lambda z, t, *a: 3 * z  # a policy whose loss differs a lot from sample to sample
    for step in range(3):
        whole.loss(policy, step)
    drawn._pool = list(whole._pool)
    whole.replaying = drawn.replaying = lambda step: True
    weights, _ = whole._pool_weights(whole._pool)
    assert torch.cat(weights).max() > 5 / 24  # far from uniform: the check below can tell them apart
    full = torch.tensor([whole.loss(policy, step)[0].item() for step in range(4000)]).mean().item()
    resampled = torch.tensor([drawn.loss(policy, step)[0].item() for step in range(4000)])
    standard_error = resampled.std().item() / 4000**0.5
    assert abs(resampled.mean().item() - full) < 3 * standard_error + 0.01 * full, (resampled.mean(), full)
    # Negative control: the plain mean over the pool, every sample weighted alike, is another number.
    plain = torch.cat([b.x0 for b in whole._pool])
    uniform = torch.stack([policy.loss(plain).mean() for _ in range(4000)]).mean().item()
    assert abs(uniform - full) > 0.1 * full, (uniform, full)


def test_padded_rows_leave_the_molecule_loss_unchanged(tiny_pretrained):
    """Samples of pooled batches with fewer atoms are padded to the drawn set's largest node count: the
    padding must not change any sample's denoising loss."""
    from rgdm.runs import load_model
    from rgdm.training.rgdm_sequence import padded_rows

    model = load_model(str(tiny_pretrained)).model
    counts = torch.tensor([3, 5])
    mask = model.mask_from_counts(counts)
    generator = torch.Generator().manual_seed(0)
    x0 = model.noise(torch.empty(2, 5, 3 + model.n_features), mask, generator)
    t = torch.tensor([40, 40])
    noise = model.noise(torch.empty_like(x0), mask, generator)
    alone = model.loss(x0[:1, :3], mask[:1, :3], t=t[:1], noise=noise[:1, :3])
    padded = model.loss(padded_rows([x0[0, :3], x0[1]], 5), mask, t=t, noise=noise)
    torch.testing.assert_close(padded[0], alone[0], rtol=1e-5, atol=1e-6)


def test_draw_by_weights_needs_the_denoising_loss_and_a_minibatch():
    for bad in (dict(sequence_minibatch=0), dict(sequence_loss="path", sequence_proposal="reference")):
        with pytest.raises(ConfigError, match="sequence_draw"):
            RGDMConfig(variant="sequence", sequence_draw="weights", **{"sequence_minibatch": 2, **bad}).validate()
    with pytest.raises(ConfigError, match="sequence_draw"):
        RGDMConfig(variant="sequence", sequence_draw="uniform").validate()
    # More draws than the pool holds batches is fine: samples are drawn with replacement.
    RGDMConfig(variant="sequence", sequence_draw="weights", sequence_pool=2, sequence_minibatch=4).validate()


def test_minibatch_needs_a_larger_pool():
    with pytest.raises(ConfigError, match="sequence_minibatch"):
        RGDMConfig(variant="sequence", sequence_pool=4, sequence_minibatch=4).validate()
    with pytest.raises(ConfigError, match="sequence_minibatch"):
        RGDMConfig(variant="step", sequence_minibatch=1).validate()
    RGDMConfig(variant="sequence", sequence_pool=4, sequence_minibatch=2).validate()


@pytest.mark.parametrize("draw", ["batches", "weights"])
def test_denoising_t_max_bounds_the_noise_levels_of_the_fit(draw, monkeypatch):
    """``denoising_t_max: 0.3`` fits the weighted samples at noise levels t <= 0.3 T only, with either draw."""
    def noise_levels_used(t_max: float) -> Tensor:
        model = standard_gaussian_diffusion(dim=2, timesteps=100)
        config = RGDMConfig(variant="sequence", sampling_steps=10, batch_size=8, normalize_rewards=False,
                            sequence_loss="denoising", sequence_proposal="reference", sequence_pool=4,
                            sequence_minibatch=2, sequence_draw=draw, denoising_t_max=t_max)
        objective = RGDMObjective(model, GaussianTask(2, lambda x: x.sum(-1)), config)
        policy = copy.deepcopy(objective.reference).requires_grad_(True)
        seen, loss = [], policy.loss
        monkeypatch.setattr(policy, "loss", lambda *a, t, **k: seen.append(t) or loss(*a, t=t, **k))
        for step in range(8):
            objective.loss(policy, step)
        return torch.cat(seen)

    assert noise_levels_used(0.3).max() <= 30 and noise_levels_used(0.3).min() >= 0
    # Negative control: the whole horizon draws levels above 0.3 T too.
    assert noise_levels_used(1.0).max() > 30


def test_denoising_t_max_is_a_fraction_of_the_horizon():
    for bad in (0.0, 1.5):
        with pytest.raises(ConfigError, match="denoising_t_max"):
            RGDMConfig(variant="sequence", denoising_t_max=bad).validate()
