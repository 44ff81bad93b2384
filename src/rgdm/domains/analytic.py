"""The analytic test bed as a domain: data N(0, I_d), the exact denoiser family of
``rgdm.diffusion.analytic``, and the closed-form rewards of ``rgdm.training.closed_form``.

It is the smallest complete domain (configs, data, model, objective, task, metrics, render and
commands in one module) and the template for a new one (docs/domains.md). Every reverse step of
its model is affine, so the distribution of its samples is known exactly (``exact_moments``):

    rgdm pretrain --config configs/analytic.yaml                 # domain: analytic
    rgdm finetune --from runs/analytic --reward linear            # pay-off N(a / tau, I)
    rgdm evaluate runs/analytic-rgdm-linear                       # exact mean and covariance

Rewards: ``linear`` (a^T x) and ``quadratic`` (-b |x - c|^2), with the fixed directions of
``closed_form_reward``; the fine-tuned model's exact moments can be compared with
``gaussian_payoff``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rgdm.config import (
    ConfigError,
    DDPOConfig,
    RGDMConfig,
    RWRConfig,
    TrainConfig,
    _check_choice,
    _check_range,
    check_run_name,
    to_dict,
)
from rgdm.diffusion.gaussian import GaussianDiffusion
from rgdm.domains import Samples, TrainingData

NAME = "analytic"
METHODS = ("rgdm", "ddpo", "rwr")
REWARDS = ("linear", "quadratic")


# ------------------------------------------------------------------------------------------------- #
# Configs.


@dataclass
class AnalyticRunConfig:
    """The exact N(0, I_dim) model, trained further by maximum likelihood on fresh N(0, I) draws."""

    name: str = "analytic"
    domain: str = NAME
    dim: int = 2
    timesteps: int = 200
    learn_scale: bool = True  # False: the model can only shift its samples
    sampling_steps: int = 50  # reverse steps of evaluation and of the exact moments
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=50, batch_size=256, lr=1e-3, ema_decay=0.0, log_every=10, val_every=50, checkpoint_every=50))

    def validate(self) -> AnalyticRunConfig:
        check_run_name(self.name)
        _check_choice("domain", self.domain, (NAME,))
        _check_range("dim", self.dim, low=1, high=64)
        _check_range("timesteps", self.timesteps, low=2)
        _check_range("sampling_steps", self.sampling_steps, low=1)
        self.train.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


@dataclass
class AnalyticFinetuneConfig:
    """Reward-driven fine-tuning of an analytic model toward a closed-form pay-off."""

    name: str = "analytic-finetune"
    domain: str = NAME
    base: str = ""  # run directory or checkpoint of an analytic model
    method: str = "rgdm"
    reward: dict[str, Any] = field(default_factory=lambda: {"name": "linear"})
    rgdm: RGDMConfig = field(default_factory=lambda: RGDMConfig(
        batch_size=64, sampling_steps=50, tau=1.0, normalize_rewards=False, num_candidates=16, explore_steps=8,
        shift="random", lambda_mle=0.0, lookahead="tweedie", explore_t_max=1.0, replay=1))
    ddpo: DDPOConfig = field(default_factory=lambda: DDPOConfig(batch_size=64, sampling_steps=50))
    rwr: RWRConfig = field(default_factory=RWRConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=100, lr=0.05, ema_decay=0.95, grad_clip=0.0, log_every=10, val_every=50, checkpoint_every=50))

    def validate(self) -> AnalyticFinetuneConfig:
        check_run_name(self.name)
        _check_choice("domain", self.domain, (NAME,))
        if not self.base:
            raise ConfigError("base: give the analytic model to fine-tune (run directory or checkpoint)")
        _check_choice("method", self.method, METHODS)
        if not isinstance(self.reward, dict) or "name" not in self.reward:
            raise ConfigError("reward: expected a mapping with a 'name' key, e.g. {name: linear}")
        _check_choice("reward.name", self.reward["name"], REWARDS)
        self.method_config.validate()
        self.train.validate()
        return self

    @property
    def method_config(self) -> RGDMConfig | DDPOConfig | RWRConfig:
        return getattr(self, self.method)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


# ------------------------------------------------------------------------------------------------- #
# Objective and reward.


class AnalyticDenoisingObjective:
    """The denoising loss on a fresh N(0, I) batch per step, drawn from a (seed, step) generator:
    unlimited data and nothing to resume but the step."""

    name = "mle"

    def __init__(self, dim: int, batch_size: int, seed: int):
        self.dim, self.batch_size, self.seed = dim, batch_size, seed

    def loss(self, model: GaussianDiffusion, step: int) -> tuple[Tensor, dict[str, float]]:
        from rgdm.training.tasks import sharded_denoising_loss

        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        data = torch.randn(self.batch_size, self.dim, generator=generator)
        return sharded_denoising_loss(model, data, generator), {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class ClosedFormReward:
    """A closed-form reward by name, on vectors [B, d] (its parameters are fixed per dimension)."""

    def __init__(self, name: str):
        _check_choice("reward.name", name, REWARDS)
        self.name = name

    def __call__(self, x: Tensor) -> Tensor:
        from rgdm.training.closed_form import closed_form_reward

        return closed_form_reward(self.name, x.shape[-1])[0](x)


def exact_summary(model: GaussianDiffusion, num_steps: int) -> dict[str, float]:
    """The exact mean and covariance of the model's samples, summarised: |mean|, mean variance and
    the largest off-diagonal covariance."""
    from rgdm.diffusion.analytic import exact_moments

    mean, cov = exact_moments(model, num_steps)
    off_diagonal = cov - torch.diag(cov.diagonal())
    return {"exact_mean_norm": float(mean.norm()), "exact_variance": float(cov.diagonal().mean()),
            "exact_max_covariance": float(off_diagonal.abs().max())}


# ------------------------------------------------------------------------------------------------- #
# The domain.


class AnalyticDomain:
    name = NAME
    noun = "analytic"
    run_config = AnalyticRunConfig
    finetune_config = AnalyticFinetuneConfig
    methods = METHODS

    def load_data(self, config: AnalyticRunConfig) -> TrainingData:
        return TrainingData(train=None)  # the objective draws N(0, I) itself

    def describe_data(self, data: TrainingData) -> str:
        return "N(0, I) draws"

    def build_model(self, config: AnalyticRunConfig, data: TrainingData) -> GaussianDiffusion:
        from rgdm.diffusion.analytic import standard_gaussian_diffusion

        return standard_gaussian_diffusion(config.dim, config.timesteps, config.learn_scale)

    def pretrain_objective(self, config: AnalyticRunConfig, data: TrainingData,
                           device: Any) -> AnalyticDenoisingObjective:
        if torch.device(device).type != "cpu":
            raise ConfigError("--device: the analytic domain runs on the CPU (use --device cpu)")
        return AnalyticDenoisingObjective(config.dim, config.train.batch_size, config.train.seed)

    def validation(self, config: AnalyticRunConfig,
                   data: TrainingData) -> Callable[[nn.Module, int], dict[str, float]]:
        return lambda model, step: exact_summary(model, config.sampling_steps)

    def run_info(self, config: AnalyticRunConfig, data: TrainingData) -> dict[str, Any]:
        return {"kind": "analytic", "config": config.to_dict()}

    def load_model(self, source: str | Path, use_ema: bool = True, device: Any = "cpu") -> LoadedAnalyticModel:
        from rgdm.config import from_dict
        from rgdm.runs import resolve_checkpoint
        from rgdm.training.checkpoint import CheckpointError, load_checkpoint

        path = resolve_checkpoint(source)
        state = load_checkpoint(path)
        if state.get("kind") != "analytic":
            raise CheckpointError(f"{path}: not an analytic model (train one with a 'domain: analytic' config)")
        config = from_dict(AnalyticRunConfig, state.get("base_config") or state["config"]).validate()
        model = self.build_model(config, TrainingData(None))
        model.load_state_dict(state["ema"] if use_ema and state.get("ema") is not None else state["model"])
        return LoadedAnalyticModel(model.to(device).eval(), config, path, int(state["step"]))

    def make_reward(self, config: dict[str, Any]) -> ClosedFormReward:
        return ClosedFormReward(config["name"])

    def build_task(self, config: AnalyticFinetuneConfig, loaded: Any, model: GaussianDiffusion, reward: Any):
        from rgdm.training.tasks import GaussianTask

        method = config.method_config
        data_batch = method.mle_batch_size if getattr(method, "lambda_mle", 0.0) > 0 else 0
        return GaussianTask(loaded.config.dim, reward, data_batch=data_batch, seed=config.train.seed)

    def finetune_validation(self, config: AnalyticFinetuneConfig, task: Any,
                            device: Any) -> Callable[[nn.Module, int], dict[str, float]]:
        steps = config.method_config.sampling_steps or 50
        return lambda model, step: {f"eval_{k}": v for k, v in exact_summary(model, steps).items()}

    def finetune_run_info(self, config: AnalyticFinetuneConfig, loaded: Any) -> dict[str, Any]:
        return {"kind": "analytic", "config": config.to_dict(), "base_config": loaded.config.to_dict(),
                "base_checkpoint": str(loaded.checkpoint)}

    @torch.no_grad()
    def sample(self, model: GaussianDiffusion, n: int, num_steps: int | None = None, seed: int = 0) -> Samples:
        dim = model.denoiser.knots.shape[1]
        return Samples(model.sample((n, dim), num_steps=num_steps, generator=torch.Generator().manual_seed(seed)))

    def metrics(self, model: GaussianDiffusion, samples: Samples) -> dict[str, float]:
        x = samples.x.double()
        return {"n": float(len(x)), "sample_mean_norm": float(x.mean(0).norm()),
                "sample_variance": float(x.var(0).mean()) if len(x) > 1 else float("nan")}

    def render(self, model: GaussianDiffusion, samples: Samples, out: Path) -> Path:
        from rgdm.viz.plots import scatter_2d

        return scatter_2d(samples.x.numpy(), out)

    # --- commands ------------------------------------------------------------------------------ #
    def pretrain_command(self, request: Any) -> None:
        from rgdm.cli_common import claim_and_echo, parse_overrides
        from rgdm.config import load_config
        from rgdm.training.pretrain import pretrain

        _refuse(("--sample", request.sample or None), ("--compile", request.compile_ or None))
        _cpu_only(request.device)
        overrides = parse_overrides(request.set_)
        if request.name is not None:
            overrides["name"] = request.name
        config = load_config(request.config, AnalyticRunConfig, overrides)
        with claim_and_echo(config, request.name, request.resume) as run_dir:
            pretrain(config, run_dir, resume=request.resume, device="cpu")

    def finetune_command(self, request: Any) -> None:
        from rgdm.cli_common import claim_and_echo, parse_overrides
        from rgdm.config import from_dict, load_config, set_dotted
        from rgdm.training.finetune import finetune

        _refuse(("--target", request.target), ("--scale", request.scale), ("--classifier", request.classifier),
                ("--compare", request.compare))
        _cpu_only(request.device)
        defaults = load_config(request.config, AnalyticFinetuneConfig, {"base": request.base}) if request.config \
            else AnalyticFinetuneConfig()
        values = to_dict(defaults)
        values["base"], values["method"] = request.base, request.method
        if request.reward:
            values["reward"] = {"name": request.reward}
        for key, value in parse_overrides(request.set_).items():
            set_dotted(values, key, value)
        values["name"] = request.name or f"{Path(request.base).name}-{request.method}-{values['reward']['name']}"
        config = from_dict(AnalyticFinetuneConfig, values).validate()
        with claim_and_echo(config, request.name, request.resume) as run_dir:
            finetune(config, run_dir, resume=request.resume, device="cpu")

    def evaluate_command(self, request: Any) -> None:
        import typer

        _refuse(("--steps", request.steps), ("--classifier", request.classifier), ("--target", request.target),
                ("--out", request.out))
        _cpu_only(request.device)
        rows = {}
        for source in request.models:
            loaded = self.load_model(source)
            samples = self.sample(loaded.model, request.n or 1000, loaded.config.sampling_steps, request.seed)
            rows[source] = {**self.metrics(loaded.model, samples),
                            **exact_summary(loaded.model, loaded.config.sampling_steps)}
        typer.echo(json.dumps(rows, indent=2))


@dataclass
class LoadedAnalyticModel:
    model: GaussianDiffusion
    config: AnalyticRunConfig
    checkpoint: Path
    step: int


def _refuse(*options: tuple[str, Any]) -> None:
    """A one-line error for the first given option that the analytic domain has no use for."""
    for option, value in options:
        if value is not None:
            raise ConfigError(f"{option}: not an option of analytic models")


def _cpu_only(device: str) -> None:
    """The analytic model is a few dozen numbers: it runs on the CPU, and an explicit cuda is refused."""
    if device == "cuda":
        raise ConfigError("--device cuda: analytic models run on the CPU (use --device cpu or auto)")


DOMAIN = AnalyticDomain()
