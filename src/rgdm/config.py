"""Validated dataclass configs with YAML load/save.

Every run is described by one ``RunConfig``; its YAML form is copied into the run directory and
stored in checkpoints as a plain dict (never a pickled object). Unknown keys, wrong types and
out-of-range values raise ``ConfigError`` with one line naming the key, so a typo in a YAML file
is reported as ``model.hiden_nf: unknown key (did you mean 'hidden_nf'?)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A user-facing configuration problem; the message names the offending key."""


@dataclass
class DataConfig:
    dataset: str = "qm9"  # "qm9" or "files"
    remove_h: bool = True  # train on heavy atoms only (the fast CPU default)
    files: list[str] = field(default_factory=list)  # xyz/sdf files or directories when dataset == "files"
    conditioning: list[str] = field(default_factory=list)  # QM9 properties fed to the network as context
    train_split: str = "train"  # "train", "Da", "Db" (EDM's conditional protocol trains generators on Db)
    max_train_molecules: int = 0  # 0 = all; a positive value takes a fixed random subset (for quick runs)

    def validate(self) -> None:
        _check_choice("data.dataset", self.dataset, ("qm9", "files"))
        _check_choice("data.train_split", self.train_split, ("train", "Da", "Db", "all"))
        if self.dataset == "files" and not self.files:
            raise ConfigError("data.files: list at least one .xyz/.sdf file or directory when dataset is 'files'")
        from rgdm.data.properties import PROPERTIES

        for name in self.conditioning:
            _check_choice("data.conditioning", name, PROPERTIES)
        _check_range("data.max_train_molecules", self.max_train_molecules, low=0)


@dataclass
class ModelConfig:
    hidden_nf: int = 64  # width of the EGNN's hidden node features
    n_layers: int = 4  # equivariant blocks
    attention: bool = True  # sigmoid gate on edge messages
    tanh: bool = True  # bound coordinate updates by tanh * coords_range / n_layers
    coords_range: float = 15.0
    norm_constant: float = 1.0  # c in (x_i - x_j) / (|x_i - x_j| + c)
    normalization_factor: float = 1.0  # messages are summed and divided by this
    inv_sublayers: int = 1  # invariant graph convolutions per block

    def validate(self) -> None:
        _check_range("model.hidden_nf", self.hidden_nf, low=1)
        _check_range("model.n_layers", self.n_layers, low=1)
        _check_range("model.inv_sublayers", self.inv_sublayers, low=1)
        _check_range("model.normalization_factor", self.normalization_factor, low=1e-12)


@dataclass
class DiffusionConfig:
    timesteps: int = 500  # T of the diffusion
    schedule: str = "polynomial_2"  # "polynomial_2" (EDM) or "cosine"
    precision: float = 1e-5  # EDM's noise_precision: alpha_0^2 = 1 - 2 * precision
    norm_values: tuple[float, float, float] = (1.0, 4.0, 10.0)  # EDM's scaling of x, one-hot, charge
    include_charges: bool = True  # atomic number as an extra node feature (EDM's "integer" feature)

    def validate(self) -> None:
        _check_range("diffusion.timesteps", self.timesteps, low=2)
        _check_choice("diffusion.schedule", self.schedule, ("polynomial_2", "cosine"))
        _check_range("diffusion.precision", self.precision, low=0.0, high=0.1)
        if len(self.norm_values) != 3 or min(self.norm_values) <= 0:
            raise ConfigError("diffusion.norm_values: expected three positive numbers (x, one-hot, charge)")


@dataclass
class TrainConfig:
    steps: int = 2000  # optimizer steps (fine-tuning: iterations)
    batch_size: int = 64
    lr: float = 2e-4  # AdamW learning rate (amsgrad, as EDM)
    weight_decay: float = 1e-12
    grad_clip: float = 2.0  # max gradient norm; 0 disables clipping
    ema_decay: float = 0.999  # 0 disables the EMA copy
    seed: int = 0
    log_every: int = 50  # steps per row of metrics.csv / TensorBoard
    val_every: int = 500  # steps between evaluations (validation loss, or samples when fine-tuning)
    val_batches: int = 8  # validation batches per evaluation
    checkpoint_every: int = 500
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    max_minutes: float = 0.0  # stop (and checkpoint) after this wall time; 0 = no limit
    num_threads: int = 0  # torch threads; 0 = torch's default

    def validate(self) -> None:
        _check_range("train.steps", self.steps, low=1)
        _check_range("train.batch_size", self.batch_size, low=1)
        _check_range("train.lr", self.lr, low=0.0)
        _check_range("train.grad_clip", self.grad_clip, low=0.0)
        _check_range("train.ema_decay", self.ema_decay, low=0.0, high=1.0)
        for key in ("log_every", "val_every", "checkpoint_every", "keep_checkpoints"):
            _check_range(f"train.{key}", getattr(self, key), low=1)
        _check_range("train.val_batches", self.val_batches, low=0)
        _check_range("train.max_minutes", self.max_minutes, low=0.0)


@dataclass
class RunConfig:
    name: str = "run"  # run directory name under runs/
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> RunConfig:
        check_run_name(self.name)
        for section in (self.data, self.model, self.diffusion, self.train):
            section.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


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
    shift: str = "random"  # feasible shifts: "none", "random", "best_probe", "finite_difference"
    radius: float = 0.5  # exploration radius rho
    radius_units: str = "std"  # unit of rho: "std" (step std), "noise_norm" (std * sqrt(dof)) or "absolute"
    num_probes: int = 8  # probe directions for best_probe / finite_difference shifts
    fd_jitter: float = 0.5  # finite_difference: random jitter added to the estimated ascent direction
    lookahead: str = "continuation"  # V(z_s): "tweedie" (x0 estimate), "rollout" (DDIM to 0), "continuation" (M)
    lookahead_steps: int = 0  # steps of the "rollout" / "continuation" look-ahead; 0 = the roll-outs' own grid
    lookahead_samples: int = 2  # M continuations per candidate ("continuation" only)
    antithetic: bool = True  # candidates in pairs mu + delta ± std * eps (K even): no first-order 1/K bias
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
    truncate_weights: bool = True  # sequence variant: cap weights at sqrt(N) x their mean (Ionides 2008)
    sequence_loss: str = "denoising"  # sequence variant: "denoising" (weighted x0 fit) or "path" (exact, see docs)
    path_steps: int = 0  # "path": random steps of each trajectory in the loss per iteration (0 = all)
    final_step_in_ratio: bool = False  # sequence variant: count the last step (std ~ data precision) in pi_ref/pi
    denoising_repeats: int = 4  # sequence variant, "denoising": noise levels per sample in the weighted loss
    sequence_replay: int = 1  # sequence variant: optimizer steps per weighted batch of roll-outs (docs/rgdm.md)
    sequence_pool: int = 1  # sequence variant: the loss weights the last this many batches jointly
    sequence_proposal: str = "policy"  # sequence variant: roll-outs of the "policy" or of the frozen "reference"

    def validate(self) -> None:
        _check_choice("rgdm.variant", self.variant, ("step", "sequence"))
        _check_choice("rgdm.shift", self.shift, ("none", "random", "best_probe", "finite_difference"))
        _check_choice("rgdm.radius_units", self.radius_units, ("std", "noise_norm", "absolute"))
        _check_choice("rgdm.lookahead", self.lookahead, ("tweedie", "rollout", "continuation"))
        _check_choice("rgdm.loss_weighting", self.loss_weighting, ("epsilon", "likelihood"))
        _check_choice("rgdm.sequence_loss", self.sequence_loss, ("path", "denoising"))
        _check_choice("rgdm.sequence_proposal", self.sequence_proposal, ("policy", "reference"))
        _check_choice("rgdm.weight_normalisation", self.weight_normalisation, ("self", "jackknife"))
        _check_range("rgdm.path_steps", self.path_steps, low=0)
        _check_range("rgdm.lookahead_steps", self.lookahead_steps, low=0)
        for key in ("batch_size", "num_candidates", "explore_steps", "num_probes",
                    "lookahead_samples", "normalizer_buffer", "normalizer_min_count", "mle_batch_size",
                    "denoising_repeats", "replay", "sequence_replay",
                    "sequence_pool"):
            _check_range(f"rgdm.{key}", getattr(self, key), low=1)
        _check_range("rgdm.sampling_steps", self.sampling_steps, low=0)
        _check_range("rgdm.eta", self.eta, low=1e-6, high=1.0)
        _check_range("rgdm.radius", self.radius, low=0.0)
        _check_range("rgdm.tau", self.tau, low=1e-6)
        _check_range("rgdm.target_ess", self.target_ess, low=1e-3, high=1.0)
        if not 0.0 < self.explore_t_max <= 1.0:
            raise ConfigError(f"rgdm.explore_t_max: a fraction of the horizon in (0, 1], got {self.explore_t_max}")
        for key in ("lambda_mle", "kl_weight", "fd_jitter"):
            _check_range(f"rgdm.{key}", getattr(self, key), low=0.0)
        if self.variant == "step" and self.antithetic and self.num_candidates % 2:
            raise ConfigError(f"rgdm.num_candidates: antithetic candidates come in pairs, {self.num_candidates} is odd "
                              "(use an even number or antithetic: false)")
        reuse = self.sequence_replay > 1 or self.sequence_pool > 1
        if reuse and self.sequence_loss == "path" and self.sequence_proposal == "policy":
            raise ConfigError("rgdm.sequence_replay / sequence_pool: the path loss reuses a batch only with "
                              "sequence_proposal: reference (its likelihood ratio to a moved policy is not "
                              "corrected); use sequence_loss: denoising or the reference proposal")
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

    def validate(self) -> None:
        _check_choice("rwr.variant", self.variant, RWR_VARIANTS)
        for key in ("batch_size", "normalizer_buffer", "normalizer_min_count", "denoising_repeats", "mle_batch_size"):
            _check_range(f"rwr.{key}", getattr(self, key), low=1)
        _check_range("rwr.sampling_steps", self.sampling_steps, low=0)
        _check_range("rwr.eta", self.eta, low=1e-6 if self.variant == "importance_ratio" else 0.0, high=1.0)
        for key in ("beta", "lambda_mle"):
            _check_range(f"rwr.{key}", getattr(self, key), low=0.0)



FINETUNE_METHODS = ("rgdm", "ddpo", "ppo", "rwr")


def ppo_clip_defaults() -> DDPOConfig:
    """PPO-clip as RLPF (arXiv 2508.16521) fine-tunes EDM: DDPO_IS with several epochs per batch and
    advantages normalised within each batch."""
    return DDPOConfig(variant="is", batch_size=32, inner_epochs=4, minibatches=2, advantage_baseline="batch")


@dataclass
class FinetuneConfig:
    """Reward-driven fine-tuning of a pre-trained model (``rgdm finetune``)."""

    name: str = "finetune"  # run directory name under runs/
    base: str = ""  # run directory, checkpoint or shipped model name of the pre-trained model
    method: str = "rgdm"  # fine-tuning method: rgdm, or the baselines ddpo, ppo and rwr (their sections below)
    reward: dict[str, Any] = field(default_factory=lambda: {"name": "qed", "backend": "inline"})  # make_reward config
    target: float | None = None  # reward target (raw property units); None = maximise the reward
    target_from_data: str = ""  # QM9 property whose data values serve as per-sample targets
    rgdm: RGDMConfig = field(default_factory=RGDMConfig)  # see the rgdm section
    ddpo: DDPOConfig = field(default_factory=DDPOConfig)  # used when method is ddpo
    ppo: DDPOConfig = field(default_factory=ppo_clip_defaults)  # used when method is ppo (RLPF's PPO-clip)
    rwr: RWRConfig = field(default_factory=RWRConfig)  # used when method is rwr
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=50, lr=1e-4, ema_decay=0.0, log_every=1, val_every=10, checkpoint_every=10, grad_clip=1.0))
    eval_samples: int = 64  # molecules sampled for validity/stability every train.val_every iterations

    def validate(self) -> FinetuneConfig:
        check_run_name(self.name)
        if not self.base:
            raise ConfigError("base: give the pre-trained model (run directory, checkpoint or shipped name)")
        _check_choice("method", self.method, FINETUNE_METHODS)
        if not isinstance(self.reward, dict) or "name" not in self.reward:
            raise ConfigError("reward: expected a mapping with a 'name' key, e.g. {name: qed}")
        if self.target_from_data:
            from rgdm.data.properties import PROPERTIES

            _check_choice("target_from_data", self.target_from_data, PROPERTIES)
        self.method_config.validate()
        self.train.validate()
        _check_range("eval_samples", self.eval_samples, low=0)
        return self

    @property
    def method_config(self) -> RGDMConfig | DDPOConfig | RWRConfig:
        """The section of the chosen method (the other sections are ignored)."""
        return getattr(self, self.method)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


# --------------------------------------------------------------------------------------------- #
# Generic (de)serialisation of nested dataclasses with strict checking.


def to_dict(config: Any) -> dict[str, Any]:
    """Plain dict (lists, not tuples) of a dataclass config, safe for YAML and checkpoints."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(config)


# Keys of earlier versions, with what replaced them (a config that still has one is refused, not ignored).
REMOVED_KEYS = {
    "max_log_ratio": "importance weights are now truncated relative to the batch (truncate_weights, "
                     "docs/rgdm.md); an absolute clip of the log-ratio turned the objective into plain RWR",
}


def from_dict(cls: type, values: dict[str, Any] | None, path: str = "") -> Any:
    """Build dataclass ``cls`` from ``values``, rejecting unknown keys and wrong types."""
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in fields and key in REMOVED_KEYS:
            raise ConfigError(f"{where}: removed; {REMOVED_KEYS[key]}")
        if key not in fields:
            raise ConfigError(f"{where}: unknown key{_did_you_mean(str(key), fields)}")
        kwargs[key] = _coerce(hints[key], value, where)
    return cls(**kwargs)


def load_config(path: str | Path, cls: type = RunConfig, overrides: dict[str, Any] | None = None) -> Any:
    """Read, merge ``overrides`` (dotted keys, e.g. ``{"train.steps": 10}``) and validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors) is not YAML
    try:
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (name, data, model, ...), "
                          f"got {type(values).__name__}")
    try:
        for dotted, value in (overrides or {}).items():
            set_dotted(values, dotted, value)
        return from_dict(cls, values).validate()
    except ConfigError as err:
        # Say where the bad value came from: a line of the file, or a --set override.
        raise ConfigError(f"{_origin(path, text, str(err), overrides or {})}: {err}") from None


def save_config(config: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def set_dotted(values: dict[str, Any], dotted: str, value: Any) -> None:
    """``set_dotted(d, "train.steps", 5)`` sets ``d["train"]["steps"] = 5``, creating sections."""
    *parents, leaf = dotted.split(".")
    node = values
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {key} is not a section")
    node[leaf] = value


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        items = [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if hint is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # PyYAML reads "5e-5" (no dot) as a string
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is None:
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(number):  # NaN passes every range check; inf is never a sensible setting
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return number
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def _origin(path: Path, text: str, message: str, overrides: dict[str, Any]) -> str:
    """``--set`` when the offending key was overridden, else ``file:line`` (or ``file``)."""
    dotted = message.split(":", 1)[0].split("[", 1)[0]
    if dotted in overrides:
        return "--set"
    node = yaml.compose(text)
    for key in dotted.split("."):
        if not isinstance(node, yaml.MappingNode):
            return str(path)
        match = next(((k, v) for k, v in node.value if getattr(k, "value", None) == key), None)
        if match is None:
            return str(path)
        key_node, node = match
    return f"{path}:{key_node.start_mark.line + 1}"


def check_run_name(name: Any, where: str = "name") -> str:
    """``name`` if it is usable as one directory under runs/; else a ConfigError saying why.

    A name is one path component: no separators (it must not escape runs/ or nest), not ``.`` or
    ``..`` (or only dots), and printable (no control characters that a shell would mangle).
    """
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{where}: give a non-empty run name")
    if "/" in name or "\\" in name:
        raise ConfigError(f"{where}: {name!r} contains a path separator; a run name is one directory under runs/")
    if set(name) == {"."}:
        raise ConfigError(f"{where}: {name!r} is not a run name (only dots)")
    if not name.isprintable() or name != name.strip():
        raise ConfigError(f"{where}: {name!r} has control characters or surrounding spaces")
    return name


def _did_you_mean(key: str, options: typing.Iterable[str]) -> str:
    options = list(options)
    close = difflib.get_close_matches(key, options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (valid keys: {', '.join(sorted(options))})"


def _check_choice(where: str, value: Any, choices: typing.Sequence[Any]) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1) if isinstance(value, str) else []
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, choices))}{hint}")


def _check_range(where: str, value: float, low: float | None = None, high: float | None = None) -> None:
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        raise ConfigError(f"{where}: {value} is outside {bounds}")
