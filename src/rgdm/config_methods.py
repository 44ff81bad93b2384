"""The sections of the fine-tuning methods: RGDM, DDPO (and PPO-clip), and reward-weighted regression.

``FinetuneConfig`` (in :mod:`rgdm.config`) holds one of each and uses the section its ``method``
names; the trainers in :mod:`rgdm.training` read them. The checks are those of
:mod:`rgdm.config_common`.
"""

from __future__ import annotations

from dataclasses import dataclass

from rgdm.config_common import ConfigError, _check_choice, _check_range


@dataclass
class RGDMConfig:
    """Reward-guided exploration (docs/rgdm.md). Defaults are the ones the README's results use."""

    variant: str = "step"  # "step" (per-step pay-off) or "sequence" (weights over whole samples)
    batch_size: int = 16  # roll-outs per iteration
    sampling_steps: int = 100  # reverse steps of a roll-out (the MDP's horizon); 0 = all T steps
    eta: float = 1.0  # stochasticity of the reverse policy (1 = ancestral; must be > 0)
    num_candidates: int = 8  # K candidates per explored state (step variant)
    explore_steps: int = 2  # explored states per roll-out per iteration (step variant)
    explore_t_max: float = 0.3  # explore only steps t -> s with t <= explore_t_max * T (1 = the whole horizon)
    replay: int = 4  # step variant: optimizer steps per explored batch (targets are relative to pi_ref, so reusable)
    explored_pool: int = 1  # step variant: the loss regresses on the last this many explored batches at once
    shift: str = "random"  # feasible shifts: "none", "random", "best_probe", "finite_difference"
    radius: float = 0.5  # exploration radius rho
    radius_units: str = "std"  # unit of rho: "std" (step std), "noise_norm" (std * sqrt(dof)) or "absolute"
    num_probes: int = 8  # probe directions for best_probe / finite_difference shifts
    fd_jitter: float = 0.5  # finite_difference: random jitter added to the estimated ascent direction
    lookahead: str = "continuation"  # V(z_s): "tweedie" (x0 estimate), "rollout" (DDIM to 0), "continuation" (M)
    lookahead_steps: int = 0  # steps of the "rollout" / "continuation" look-ahead; 0 = the roll-outs' own grid
    lookahead_samples: int = 2  # M continuations per candidate ("continuation" only)
    value_estimate: str = "soft"  # V of M continuations: "soft" (tau log mean exp(r/tau): exact) or "mean"
    antithetic: bool = True  # candidates in pairs mu + delta ± std * eps (K even): no first-order 1/K bias
    value_shrinkage: bool = False  # step variant: shrink candidates' values toward their mean by their signal share
    weight_normalisation: str = "self"  # step variant: "self" (softmax over K) or "jackknife" (1/K bias removed)
    tau: float = 1.0  # temperature of the pay-off distribution exp(r / tau)
    adapt_tau: bool = False  # choose tau per state so that ESS = target_ess * K (or * batch)
    target_ess: float = 0.5
    normalize_rewards: bool = True  # per-target running mean/std; tau is then in reward std units
    normalizer_buffer: int = 512
    normalizer_min_count: int = 16
    loss_weighting: str = "epsilon"  # per-step scale: "epsilon" (noise-prediction units) or "likelihood"
    control_variate: bool = True  # subtract the candidates' mean Gaussian perturbation from the target
    lambda_mle: float = 0.0  # weight of the denoising loss on data (keeps samples chemically sane)
    mle_batch_size: int = 32
    kl_weight: float = 0.0  # optional KL(pi_theta || pi_ref) per explored step
    first_step_kl: float = 0.0  # weight of the exact KL(pi_theta || pi_ref) of the first reverse step (t = T)
    early_sequence_weight: float = 0.0  # step variant: sequence-weighted path loss on the steps before the window
    reference_refresh: int = 0  # optimizer steps between copies of the policy into pi_ref (0: pi_ref stays frozen)
    reference_base_mix: float = 0.0  # refreshed pi_ref: the pre-trained model's share alpha in each copy
    atom_type_kl: float = 0.0  # step variant: KL to the pre-trained model of the node features (atom types)
    truncate_weights: bool = True  # sequence variant: cap weights at sqrt(N) x their mean (Ionides 2008)
    sequence_loss: str = "denoising"  # sequence variant: "denoising" (weighted x0 fit) or "path" (exact, see docs)
    path_steps: int = 0  # "path": random steps of each trajectory in the loss per iteration (0 = all)
    final_step_in_ratio: bool = False  # sequence variant: count the last step (std ~ data precision) in pi_ref/pi
    denoising_repeats: int = 4  # sequence variant, "denoising": noise levels per sample in the weighted loss
    denoising_t_max: float = 1.0  # sequence variant, "denoising": noise levels drawn from t <= denoising_t_max * T
    sequence_replay: int = 1  # sequence variant: optimizer steps per weighted batch of roll-outs (docs/rgdm.md)
    sequence_pool: int = 1  # sequence variant: the loss weights the last this many batches jointly
    sequence_minibatch: int = 0  # sequence variant: pooled batches drawn per optimizer step (0 = the whole pool)
    sequence_proposal: str = "policy"  # sequence variant: roll-outs of the "policy" or of the frozen "reference"
    sequence_draw: str = "batches"  # with sequence_minibatch: draw whole "batches" uniformly, or samples by "weights"

    def validate(self) -> None:
        _check_choice("rgdm.variant", self.variant, ("step", "sequence"))
        _check_choice("rgdm.shift", self.shift, ("none", "random", "best_probe", "finite_difference"))
        _check_choice("rgdm.radius_units", self.radius_units, ("std", "noise_norm", "absolute"))
        _check_choice("rgdm.lookahead", self.lookahead, ("tweedie", "rollout", "continuation"))
        _check_choice("rgdm.loss_weighting", self.loss_weighting, ("epsilon", "likelihood"))
        _check_choice("rgdm.sequence_loss", self.sequence_loss, ("path", "denoising"))
        _check_choice("rgdm.sequence_proposal", self.sequence_proposal, ("policy", "reference"))
        _check_choice("rgdm.sequence_draw", self.sequence_draw, ("batches", "weights"))
        _check_choice("rgdm.weight_normalisation", self.weight_normalisation, ("self", "jackknife"))
        _check_choice("rgdm.value_estimate", self.value_estimate, ("soft", "mean"))
        _check_range("rgdm.path_steps", self.path_steps, low=0)
        _check_range("rgdm.lookahead_steps", self.lookahead_steps, low=0)
        _check_range("rgdm.reference_refresh", self.reference_refresh, low=0)
        _check_range("rgdm.sequence_minibatch", self.sequence_minibatch, low=0)
        for key in ("batch_size", "num_candidates", "explore_steps", "num_probes",
                    "lookahead_samples", "normalizer_buffer", "normalizer_min_count", "mle_batch_size",
                    "denoising_repeats", "replay", "explored_pool", "sequence_replay",
                    "sequence_pool"):
            _check_range(f"rgdm.{key}", getattr(self, key), low=1)
        _check_range("rgdm.sampling_steps", self.sampling_steps, low=0)
        _check_range("rgdm.eta", self.eta, low=1e-6, high=1.0)
        _check_range("rgdm.radius", self.radius, low=0.0)
        _check_range("rgdm.tau", self.tau, low=1e-6)
        _check_range("rgdm.target_ess", self.target_ess, low=1e-3, high=1.0)
        if not 0.0 < self.denoising_t_max <= 1.0:
            raise ConfigError(f"rgdm.denoising_t_max: a fraction of the horizon in (0, 1], got {self.denoising_t_max}")
        if not 0.0 < self.explore_t_max <= 1.0:
            raise ConfigError(f"rgdm.explore_t_max: a fraction of the horizon in (0, 1], got {self.explore_t_max}")
        for key in ("lambda_mle", "kl_weight", "first_step_kl", "early_sequence_weight", "fd_jitter", "atom_type_kl"):
            _check_range(f"rgdm.{key}", getattr(self, key), low=0.0)
        if self.variant == "step" and self.antithetic and self.num_candidates % 2:
            raise ConfigError(f"rgdm.num_candidates: antithetic candidates come in pairs, {self.num_candidates} is odd "
                              "(use an even number or antithetic: false)")
        reuse = self.sequence_replay > 1 or self.sequence_pool > 1
        if reuse and self.sequence_loss == "path" and self.sequence_proposal == "policy":
            raise ConfigError("rgdm.sequence_replay / sequence_pool: the path loss reuses a batch only with "
                              "sequence_proposal: reference (its likelihood ratio to a moved policy is not "
                              "corrected); use sequence_loss: denoising or the reference proposal")
        if self.sequence_draw == "weights" and not (self.variant == "sequence" and self.sequence_loss == "denoising"
                                                    and self.sequence_minibatch):
            raise ConfigError("rgdm.sequence_draw: weights draws sequence_minibatch x batch_size samples of the pool "
                              "for the denoising loss, so it needs variant: sequence, sequence_loss: denoising and "
                              "sequence_minibatch > 0")
        if self.sequence_draw == "batches" and self.sequence_minibatch and (
                self.variant != "sequence" or self.sequence_minibatch >= self.sequence_pool):
            raise ConfigError(f"rgdm.sequence_minibatch: draws batches out of the sequence level's pool, so it needs "
                              f"variant: sequence and fewer than sequence_pool ({self.sequence_pool}) batches, "
                              f"got {self.sequence_minibatch}")
        if self.value_shrinkage and (self.variant != "step" or self.lookahead != "continuation"
                                     or self.lookahead_samples < 2):
            raise ConfigError("rgdm.value_shrinkage: measures the look-ahead's noise from its continuations, so it "
                              "needs variant: step, lookahead: continuation and lookahead_samples >= 2")
        if self.value_estimate == "mean" and (self.variant != "step" or self.lookahead != "continuation"):
            raise ConfigError("rgdm.value_estimate: chooses how M continuations make one value, so it needs "
                              "variant: step and lookahead: continuation")
        if self.value_shrinkage and self.adapt_tau:
            raise ConfigError("rgdm.value_shrinkage and rgdm.adapt_tau: adapt_tau would rescale the shrunk values "
                              "back to its target ESS; use one of them")
        replay_key = "sequence_replay" if self.variant == "sequence" else "replay"
        replay = getattr(self, replay_key)
        if self.reference_refresh and self.reference_refresh % replay:
            raise ConfigError(f"rgdm.reference_refresh: a refresh empties the {self.variant} level's pool of "
                              f"weighted batches; a multiple of {replay_key} ({replay}) lets each batch finish its "
                              f"replays first, got {self.reference_refresh}")
        if not 0.0 <= self.reference_base_mix < 1.0:
            raise ConfigError(f"rgdm.reference_base_mix: a share of the pre-trained model in [0, 1), "
                              f"got {self.reference_base_mix}")
        if self.reference_base_mix > 0 and not self.reference_refresh:
            raise ConfigError("rgdm.reference_base_mix: mixes the pre-trained model into each refreshed copy of the "
                              "policy, so it needs reference_refresh > 0")
        if self.atom_type_kl > 0 and self.variant != "step":
            raise ConfigError("rgdm.atom_type_kl: a penalty on the step level's explored steps, so it needs "
                              "variant: step")
        if self.early_sequence_weight > 0 and self.variant != "step":
            raise ConfigError("rgdm.early_sequence_weight: weights the steps before the step level's explored "
                              "window, so it needs variant: step")
        if self.shift == "best_probe" and self.num_probes < self.num_candidates - 1:
            raise ConfigError("rgdm.num_probes: best_probe needs at least num_candidates - 1 probes")


DDPO_VARIANTS = ("sf", "is")


@dataclass
class DDPOConfig:
    """DDPO_SF / DDPO_IS (defaults follow Black et al. 2023 where they apply)."""

    variant: str = "is"  # "sf" (score function, on-policy) or "is" (importance sampling, PPO clipping)
    batch_size: int = 16  # trajectories per collected batch
    sampling_steps: int = 50  # reverse steps of a trajectory; 0 = all T steps
    eta: float = 1.0  # stochasticity of the sampler (must be > 0: log-probabilities need a std)
    inner_epochs: int = 1  # passes over each collected batch ("is" only)
    minibatches: int = 1  # optimizer updates per pass, each on a shuffled slice of the batch ("is" only)
    clip_range: float = 1e-4  # PPO clip of the per-dimension probability ratio
    adv_clip: float = 5.0  # advantages are clipped to [-adv_clip, adv_clip]
    timestep_fraction: float = 1.0  # fraction of each trajectory's steps in the loss (random subset)
    normalize_advantages: bool = True  # divide by the tracker's std (False: only subtract its mean)
    advantage_baseline: str = "tracker"  # "tracker" (DDPO's per-target buffer) or "batch" (PPO: this batch's stats)
    tracker_buffer: int = 16  # rewards remembered per target
    tracker_min_count: int = 16  # below this many, a target is normalised with the batch's statistics
    kl_coef: float = 0.0  # DPOK's per-step KL penalty to the frozen reference (0 disables it)
    lambda_mle: float = 0.0  # weight of the denoising loss on data, as in RGDM
    mle_batch_size: int = 64  # molecules per data batch of that loss
    first_step_kl: float = 0.0  # weight of the exact KL(pi_theta || pi_ref) of the first reverse step, as in RGDM

    @property
    def updates_per_batch(self) -> int:
        return self.inner_epochs * self.minibatches

    def validate(self) -> None:
        _check_choice("ddpo.variant", self.variant, DDPO_VARIANTS)
        _check_choice("ddpo.advantage_baseline", self.advantage_baseline, ("tracker", "batch"))
        for key in ("batch_size", "inner_epochs", "minibatches", "tracker_buffer", "tracker_min_count",
                    "mle_batch_size"):
            _check_range(f"ddpo.{key}", getattr(self, key), low=1)
        _check_range("ddpo.sampling_steps", self.sampling_steps, low=0)
        _check_range("ddpo.eta", self.eta, low=1e-6, high=1.0)
        _check_range("ddpo.clip_range", self.clip_range, low=0.0)
        _check_range("ddpo.adv_clip", self.adv_clip, low=1e-6)
        _check_range("ddpo.timestep_fraction", self.timestep_fraction, low=1e-6, high=1.0)
        _check_range("ddpo.kl_coef", self.kl_coef, low=0.0)
        _check_range("ddpo.lambda_mle", self.lambda_mle, low=0.0)
        _check_range("ddpo.first_step_kl", self.first_step_kl, low=0.0)
        if self.variant == "sf" and self.updates_per_batch != 1:
            raise ConfigError("ddpo.inner_epochs: the score-function variant is on-policy; use inner_epochs = 1 "
                              "and minibatches = 1 (or variant 'is')")
        if self.batch_size % self.minibatches:
            raise ConfigError(f"ddpo.minibatches: {self.minibatches} does not divide batch_size {self.batch_size}")


RWR_VARIANTS = ("plain", "reference_samples", "importance_ratio")


@dataclass
class RWRConfig:
    """Reward-weighted regression (weights softmax(beta · r) over the batch)."""

    variant: str = "plain"  # "plain", "reference_samples" or "importance_ratio" (see the module docstring)
    batch_size: int = 16  # samples per iteration
    sampling_steps: int = 50  # reverse steps of a sample; 0 = all T steps
    eta: float = 1.0  # sampler stochasticity ("importance_ratio" needs eta > 0 for trajectory log-probs)
    beta: float = 0.2  # inverse temperature of the weights
    normalize_rewards: bool = False  # per-target running mean/std before weighting
    normalizer_buffer: int = 512
    normalizer_min_count: int = 16
    truncate_weights: bool = True  # "importance_ratio": cap weights at sqrt(N) x their mean (Ionides 2008)
    final_step_in_ratio: bool = False  # "importance_ratio": count the last step (std ~ data precision), as RGDM
    denoising_repeats: int = 4  # noise levels per sample in the weighted denoising loss
    lambda_mle: float = 0.0  # weight of the denoising loss on data, as in RGDM
    mle_batch_size: int = 64  # molecules per data batch of that loss
    first_step_kl: float = 0.0  # weight of the exact KL(pi_theta || pi_ref) of the first reverse step, as in RGDM

    def validate(self) -> None:
        _check_choice("rwr.variant", self.variant, RWR_VARIANTS)
        for key in ("batch_size", "normalizer_buffer", "normalizer_min_count", "denoising_repeats", "mle_batch_size"):
            _check_range(f"rwr.{key}", getattr(self, key), low=1)
        _check_range("rwr.sampling_steps", self.sampling_steps, low=0)
        _check_range("rwr.eta", self.eta, low=1e-6 if self.variant == "importance_ratio" else 0.0, high=1.0)
        for key in ("beta", "lambda_mle", "first_step_kl"):
            _check_range(f"rwr.{key}", getattr(self, key), low=0.0)
        if self.first_step_kl > 0 and self.eta <= 0:
            raise ConfigError("rwr.first_step_kl: the KL of a step needs its std, so eta must be > 0")


def ppo_clip_defaults() -> DDPOConfig:
    """PPO-clip as RLPF (arXiv 2508.16521) fine-tunes EDM: DDPO_IS with several epochs per batch and
    advantages normalised within each batch."""
    return DDPOConfig(variant="is", batch_size=32, inner_epochs=4, minibatches=2, advantage_baseline="batch")

