"""The configs of shape runs (``domain: shapes``): pre-training and reward-driven fine-tuning.

They use the shared sections of ``rgdm.config`` (``TrainConfig``, ``RGDMConfig``, ``DDPOConfig``)
with shape defaults, and the same strict YAML loading (``rgdm.config.load_config``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rgdm.config import (
    ConfigError,
    DDPOConfig,
    RGDMConfig,
    TrainConfig,
    _check_choice,
    _check_range,
    check_run_name,
    to_dict,
)
from rgdm.data.shapes import NORMALIZATIONS

DOMAIN = "shapes"
METHODS = ("rgdm", "ddpo")


@dataclass
class ShapeDataConfig:
    dataset: str = "shapes"  # the embedded mesh shape set (rgdm.data.shapes.load_shapes)
    classes: list[str] = field(default_factory=list)  # categories to use, in label order; [] = all
    n_points: int = 768  # points per cloud (the stored clouds have 2048)
    normalize: str = "shape_unit"  # per-cloud centring and scaling (see rgdm.data.shapes)
    conditional: bool = False  # feed the one-hot class to the denoiser

    def validate(self) -> None:
        _check_choice("data.dataset", self.dataset, ("shapes",))
        _check_range("data.n_points", self.n_points, low=2, high=2048)
        _check_choice("data.normalize", self.normalize, [n for n in NORMALIZATIONS if n])


@dataclass
class PointNetConfig:
    width: int = 128  # per-point feature width
    n_blocks: int = 4  # residual FiLM blocks with a pooled global (and a k-NN) feature
    time_dim: int = 64  # sinusoidal time embedding
    knn: int = 12  # neighbours of the local features at the input and in every block (0 = pure PointNet)
    edge_width: int = 32  # channels of the per-block neighbourhood feature (only with knn > 0)

    def validate(self) -> None:
        for key in ("width", "n_blocks", "time_dim", "edge_width"):
            _check_range(f"model.{key}", getattr(self, key), low=1)
        _check_range("model.knn", self.knn, low=0)
        if self.time_dim % 2:
            raise ConfigError(f"model.time_dim: {self.time_dim} must be even (sin and cos halves)")


@dataclass
class ShapeDiffusionConfig:
    timesteps: int = 500
    schedule: str = "cosine"  # "polynomial_2" or "cosine"
    precision: float = 1e-5  # polynomial_2 only
    sampling_steps: int = 50  # reverse steps used when the run samples (evaluation, reports)

    def validate(self) -> None:
        _check_range("diffusion.timesteps", self.timesteps, low=2)
        _check_choice("diffusion.schedule", self.schedule, ("polynomial_2", "cosine"))
        _check_range("diffusion.sampling_steps", self.sampling_steps, low=1)


@dataclass
class ShapeRunConfig:
    """Pre-training of a point-cloud diffusion model (``domain: shapes``)."""

    name: str = "shapes"
    domain: str = DOMAIN
    data: ShapeDataConfig = field(default_factory=ShapeDataConfig)
    model: PointNetConfig = field(default_factory=PointNetConfig)
    diffusion: ShapeDiffusionConfig = field(default_factory=ShapeDiffusionConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=2000, batch_size=32, lr=1e-3, ema_decay=0.995, log_every=25, val_every=250, val_batches=4,
        checkpoint_every=250))

    def validate(self) -> ShapeRunConfig:
        check_run_name(self.name)
        _check_choice("domain", self.domain, (DOMAIN,))
        for section in (self.data, self.model, self.diffusion, self.train):
            section.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


@dataclass
class ShapeFinetuneConfig:
    """Reward-driven fine-tuning of a pre-trained shape model (RGDM or DDPO)."""

    name: str = "shapes-finetune"
    domain: str = DOMAIN
    base: str = ""  # run directory or checkpoint of the pre-trained shape model
    method: str = "rgdm"  # "rgdm" or "ddpo"
    reward: dict[str, Any] = field(default_factory=lambda: {"name": "symmetry", "backend": "inline"})
    target_class: str = ""  # class a conditional base model is asked for ("" = none)
    # adapt_tau: per-step tilts are tiny next to the spread of rewards across clouds, so a fixed tau
    # leaves the weights nearly uniform (ESS ~ 0.98 K); choosing tau for ESS = K / 2 steers within
    # a short budget (a lower effective temperature than the exact pay-off of tau = 1).
    rgdm: RGDMConfig = field(default_factory=lambda: RGDMConfig(
        batch_size=8, sampling_steps=50, num_candidates=8, explore_steps=2, adapt_tau=True, target_ess=0.5,
        lambda_mle=0.0, mle_batch_size=16, lookahead="tweedie", explore_t_max=1.0, replay=1))
    ddpo: DDPOConfig = field(default_factory=lambda: DDPOConfig(batch_size=16, sampling_steps=50,
                                                                timestep_fraction=0.25))
    mle_batch_size: int = 16  # data batch of the lambda_mle regulariser (RGDM and DDPO)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=100, lr=2e-4, ema_decay=0.0, log_every=1, val_every=10_000, checkpoint_every=10, grad_clip=1.0))

    def validate(self) -> ShapeFinetuneConfig:
        check_run_name(self.name)
        _check_choice("domain", self.domain, (DOMAIN,))
        if not self.base:
            raise ConfigError("base: give the pre-trained shape model (run directory or checkpoint)")
        _check_choice("method", self.method, METHODS)
        if not isinstance(self.reward, dict) or "name" not in self.reward:
            raise ConfigError("reward: expected a mapping with a 'name' key, e.g. {name: shape_class, model: ...}")
        self.rgdm.validate()
        self.ddpo.validate()
        _check_range("mle_batch_size", self.mle_batch_size, low=1)
        self.train.validate()
        return self

    @property
    def method_config(self) -> RGDMConfig | DDPOConfig:
        """The section of the chosen method (the other section is ignored)."""
        return getattr(self, self.method)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)
