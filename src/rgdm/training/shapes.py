"""Shape point clouds on the shared training loop: pre-training, the classifier, fine-tuning.

Three runs, each a directory under ``runs/`` with ``config.yaml``, ``checkpoints/`` and
``metrics.csv`` (the one :class:`~rgdm.training.loop.Trainer`):

* :func:`pretrain_shapes` trains a :class:`PointCloudDiffusion` (PointNet denoiser) by maximum
  likelihood on the embedded shape set, unconditional or conditioned on the class
  (``data.conditional``). Config: :class:`ShapeRunConfig` (``configs/shapes_small.yaml``).
* :func:`train_classifier` trains a :class:`PointNetClassifier` on the same classes and writes its
  test accuracy to ``test_metrics.json``; the ``shape_class`` reward loads it.
* :func:`finetune_shapes` steers a pre-trained model toward a reward with RGDM or DDPO, through
  :class:`ShapeTask` (the :class:`~rgdm.training.tasks.Task` of point clouds).

A YAML file is a shape config when it says ``domain: shapes``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rgdm import distributed
from rgdm.config import (
    ConfigError,
    RGDMConfig,
    TrainConfig,
    _check_choice,
    _check_range,
    check_run_name,
    from_dict,
    save_config,
    to_dict,
)
from rgdm.data.shapes import NORMALIZATIONS, PointCloudDataset, load_shapes
from rgdm.diffusion.pointclouds import PointCloudDiffusion
from rgdm.diffusion.schedule import NoiseSchedule
from rgdm.models.pointnet import PointNetClassifier, PointNetDenoiser
from rgdm.training.checkpoint import CheckpointError, load_checkpoint
from rgdm.training.ddpo import DDPOConfig, DDPOObjective
from rgdm.training.loop import Trainer
from rgdm.training.mle import DataStream
from rgdm.training.rgdm import RGDMObjective
from rgdm.training.tasks import (
    Conditions,
    RewardCounters,
    Scores,
    data_generator,
    scores_from_result,
    sharded_denoising_loss,
)

DOMAIN = "shapes"
METHODS = ("rgdm", "ddpo")


# ------------------------------------------------------------------------------------------------- #
# Configs.


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
    width: int = 64  # per-point feature width
    n_blocks: int = 3  # residual PointNet blocks with a pooled global feature
    time_dim: int = 32  # sinusoidal time embedding
    knn: int = 0  # neighbours of the local-geometry input feature (0 = pure PointNet)

    def validate(self) -> None:
        for key in ("width", "n_blocks", "time_dim"):
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
        _check_name(self.name)
        _check_choice("domain", self.domain, (DOMAIN,))
        for section in (self.data, self.model, self.diffusion, self.train):
            section.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


@dataclass
class ClassifierConfig:
    """A PointNet shape classifier (the ``shape_class`` reward's model)."""

    name: str = "shape-classifier"
    domain: str = DOMAIN
    data: ShapeDataConfig = field(default_factory=ShapeDataConfig)
    width: int = 64
    jitter: float = 0.02  # augmentation: Gaussian noise per point (shape_unit units)
    scale_range: float = 0.15  # augmentation: per-axis scale in [1 - r, 1 + r]
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=600, batch_size=32, lr=2e-3, ema_decay=0.0, log_every=25, val_every=100, checkpoint_every=200))

    def validate(self) -> ClassifierConfig:
        _check_name(self.name)
        _check_choice("domain", self.domain, (DOMAIN,))
        self.data.validate()
        _check_range("width", self.width, low=1)
        _check_range("jitter", self.jitter, low=0.0)
        _check_range("scale_range", self.scale_range, low=0.0, high=0.9)
        self.train.validate()
        return self


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
        lambda_mle=0.0, mle_batch_size=16))
    ddpo: DDPOConfig = field(default_factory=lambda: DDPOConfig(batch_size=16, sampling_steps=50,
                                                                timestep_fraction=0.25))
    mle_batch_size: int = 16  # data batch of the lambda_mle regulariser (RGDM and DDPO)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=100, lr=2e-4, ema_decay=0.0, log_every=1, val_every=10_000, checkpoint_every=10, grad_clip=1.0))

    def validate(self) -> ShapeFinetuneConfig:
        _check_name(self.name)
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

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def _check_name(name: str) -> None:
    check_run_name(name)


# ------------------------------------------------------------------------------------------------- #
# Data and models.


def load_shape_split(data: ShapeDataConfig, split: str, seed: int = 0) -> PointCloudDataset:
    """The embedded shapes of ``split`` as ``data`` asks (classes, points per cloud, normalisation)."""
    return load_shapes(split, n_points=data.n_points, normalize=data.normalize,
                       classes=data.classes or None, seed=seed)


def build_shape_model(config: ShapeRunConfig, class_names: tuple[str, ...]) -> PointCloudDiffusion:
    m, d = config.model, config.diffusion
    num_classes = len(class_names) if config.data.conditional else 0
    denoiser = PointNetDenoiser(m.width, m.n_blocks, m.time_dim, num_classes, m.knn)
    return PointCloudDiffusion(denoiser, NoiseSchedule(d.timesteps, d.schedule, d.precision),
                               config.data.n_points, class_names, conditional=config.data.conditional)


@dataclass
class LoadedShapeModel:
    model: PointCloudDiffusion
    config: ShapeRunConfig
    checkpoint: Path
    step: int


def load_shape_model(source: str | Path, use_ema: bool = True) -> LoadedShapeModel:
    """A trained (or fine-tuned) shape diffusion model from a run directory or checkpoint file."""
    from rgdm.runs import resolve_checkpoint

    path = resolve_checkpoint(source)
    state = load_checkpoint(path)
    if state.get("kind") != "shape_diffusion":
        raise CheckpointError(f"{path}: not a shape diffusion checkpoint (train one with a 'domain: shapes' config)")
    config = from_dict(ShapeRunConfig, state["base_config"] if "base_config" in state else state["config"])
    model = build_shape_model(config.validate(), tuple(state["class_names"]))
    weights = state["ema"] if use_ema and state.get("ema") is not None else state["model"]
    model.load_state_dict(weights)
    return LoadedShapeModel(model.eval(), config, path, int(state["step"]))


def load_classifier(source: str | Path) -> PointNetClassifier:
    """A trained PointNet classifier from its run directory or checkpoint file."""
    from rgdm.runs import resolve_checkpoint

    path = resolve_checkpoint(source)
    state = load_checkpoint(path)
    if state.get("kind") != "shape_classifier":
        raise CheckpointError(f"{path}: not a shape classifier checkpoint "
                              "(train one with `rgdm shapes train-classifier`)")
    spec = state["classifier_spec"]
    model = PointNetClassifier(int(spec["num_classes"]), int(spec["width"]), tuple(spec["class_names"]))
    model.load_state_dict(state["model"])
    return model.eval()


# ------------------------------------------------------------------------------------------------- #
# Pre-training.


class ShapeDenoisingObjective:
    """The denoising loss on shuffled batches of clouds; t and noise from a (seed, step) generator."""

    name = "mle"

    def __init__(self, dataset: PointCloudDataset, batch_size: int, seed: int):
        self.stream = DataStream(dataset, batch_size, seed)
        self.dataset = dataset
        self.seed = seed

    def loss(self, model: PointCloudDiffusion, step: int) -> tuple[Tensor, dict[str, float]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        indices = self.stream.next_indices()
        points = self.dataset.points[indices]
        context = model.context_for(self.dataset.labels[indices])
        loss = model.loss(points, None, context, generator=generator).mean()
        return loss, {"epoch": float(self.stream.epoch)}

    def state_dict(self) -> dict[str, Any]:
        return {"stream": self.stream.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state["stream"])


@torch.no_grad()
def shape_validation_loss(model: PointCloudDiffusion, dataset: PointCloudDataset, batch_size: int,
                          n_batches: int, seed: int = 1234) -> float:
    """Mean denoising loss on fixed validation batches (private generator: training is unaffected)."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for i, batch in enumerate(dataset.batches(batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))):
        if i >= n_batches:
            break
        context = model.context_for(batch.labels)
        losses.append(model.loss(batch.points, None, context, generator=generator).mean().item())
    return sum(losses) / max(len(losses), 1)


def _set_threads(train: TrainConfig) -> None:
    if train.num_threads > 0:
        torch.set_num_threads(train.num_threads)


def pretrain_shapes(config: ShapeRunConfig, run_dir: str | Path, resume: bool = False,
                    progress: bool = True) -> Trainer:
    """Maximum-likelihood training of a shape diffusion model; returns the finished trainer."""
    from rgdm.training.pretrain import RunExistsError

    config.validate()
    _set_threads(config.train)
    train_set = load_shape_split(config.data, "train", config.train.seed)
    val_set = load_shape_split(config.data, "val", config.train.seed)
    run_dir = Path(run_dir)
    if (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir()) and not resume:
        raise RunExistsError(f"{run_dir}: run exists; pass --resume to continue it or choose another name")
    torch.manual_seed(config.train.seed)
    model = build_shape_model(config, train_set.class_names)
    objective = ShapeDenoisingObjective(train_set, config.train.batch_size, config.train.seed)
    run_info = {"kind": "shape_diffusion", "config": config.to_dict(), "class_names": list(train_set.class_names)}

    def evaluate(ema_model: PointCloudDiffusion, step: int) -> dict[str, float]:
        loss = shape_validation_loss(ema_model, val_set, config.train.batch_size, config.train.val_batches)
        return {"val_loss": loss}

    trainer = Trainer(model, objective, config.train, run_dir, run_info, evaluate, progress=progress)
    run_dir.mkdir(parents=True, exist_ok=True)
    if distributed.is_main():
        save_config(config, run_dir / "config.yaml")
    if resume:
        trainer.resume()
    trainer.fit()
    return trainer


# ------------------------------------------------------------------------------------------------- #
# The classifier.


def augment_clouds(points: Tensor, jitter: float, scale_range: float, generator: torch.Generator) -> Tensor:
    """Random per-axis scaling and per-point jitter (the shapes stay aligned, as the data are)."""
    scales = 1.0 + scale_range * (2 * torch.rand(points.shape[0], 1, 3, generator=generator) - 1)
    return points * scales + jitter * torch.randn(points.shape, generator=generator)


class ClassificationObjective:
    """Cross-entropy of a classifier on augmented training batches."""

    name = "classifier"

    def __init__(self, dataset: PointCloudDataset, config: ClassifierConfig):
        self.stream = DataStream(dataset, config.train.batch_size, config.train.seed)
        self.dataset = dataset
        self.config = config

    def loss(self, model: PointNetClassifier, step: int) -> tuple[Tensor, dict[str, float]]:
        generator = torch.Generator().manual_seed(self.config.train.seed * 1_000_003 + step)
        indices = self.stream.next_indices()
        points = augment_clouds(self.dataset.points[indices], self.config.jitter, self.config.scale_range, generator)
        logits = model(points)
        labels = self.dataset.labels[indices]
        accuracy = (logits.argmax(1) == labels).float().mean().item()
        return torch.nn.functional.cross_entropy(logits, labels), {"train_accuracy": accuracy}

    def state_dict(self) -> dict[str, Any]:
        return {"stream": self.stream.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state["stream"])


@torch.no_grad()
def classifier_accuracy(model: PointNetClassifier, dataset: PointCloudDataset, batch_size: int = 128
                        ) -> dict[str, float]:
    """Overall and per-class accuracy of ``model`` on ``dataset``."""
    model.eval()
    predictions = torch.cat([model(batch.points).argmax(1) for batch in dataset.batches(batch_size, shuffle=False)])
    correct = predictions == dataset.labels
    metrics = {"accuracy": correct.float().mean().item(), "n": float(len(dataset))}
    for index, name in enumerate(dataset.class_names):
        members = dataset.labels == index
        if members.any():
            metrics[f"accuracy_{name}"] = correct[members].float().mean().item()
    return metrics


def train_classifier(config: ClassifierConfig, run_dir: str | Path, resume: bool = False,
                     progress: bool = True) -> dict[str, float]:
    """Train the PointNet classifier; returns (and writes to test_metrics.json) its test accuracy."""
    config.validate()
    _set_threads(config.train)
    train_set = load_shape_split(config.data, "train", config.train.seed)
    val_set = load_shape_split(config.data, "val", config.train.seed)
    test_set = load_shape_split(config.data, "test", config.train.seed)
    torch.manual_seed(config.train.seed)
    model = PointNetClassifier(len(train_set.class_names), config.width, train_set.class_names)
    run_info = {"kind": "shape_classifier", "config": to_dict(config), "classifier_spec": model.spec()}

    def evaluate(current: PointNetClassifier, step: int) -> dict[str, float]:
        accuracy = classifier_accuracy(current, val_set)["accuracy"]
        current.train()
        return {"val_accuracy": accuracy}

    run_dir = Path(run_dir)
    trainer = Trainer(model, ClassificationObjective(train_set, config), config.train, run_dir, run_info,
                      evaluate, tensorboard=False, progress=progress)
    run_dir.mkdir(parents=True, exist_ok=True)
    if distributed.is_main():
        save_config(config, run_dir / "config.yaml")
    if resume:
        trainer.resume()
    trainer.fit()
    metrics = classifier_accuracy(trainer.sampling_model, test_set)
    (run_dir / "test_metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


# ------------------------------------------------------------------------------------------------- #
# Fine-tuning: the Task of point clouds.


class ShapeTask:
    """Point clouds for reward-driven objectives: fixed-size clouds, rewards from the reward layer.

    target_class: for a class-conditional model, the class every roll-out asks for (its one-hot is
    the context). mle_batch_size > 0 with a dataset gives the lambda_mle denoising regulariser
    (on clouds of all classes, with their own labels as context for a conditional model).
    """

    def __init__(self, model: PointCloudDiffusion, reward, dataset: PointCloudDataset | None = None,
                 target_class: str | None = None, mle_batch_size: int = 0, seed: int = 0):
        if model.conditional and not target_class:
            raise ConfigError(f"target_class: the base model is class-conditional; name one of "
                              f"{', '.join(model.class_names)}")
        if target_class and model.conditional:
            model.class_index(target_class)  # a clear error for unknown names
        self.num_points = model.num_points
        self.context_row = model.context_for([target_class]) if model.conditional else None
        self.reward = reward
        self.counters = RewardCounters(reward)
        self.dataset = dataset
        self.stream = DataStream(dataset, mle_batch_size, seed) if mle_batch_size and dataset is not None else None
        self.seed = seed
        self.calls = 0

    def conditions(self, n: int, generator: torch.Generator | None = None) -> Conditions:
        context = None if self.context_row is None else self.context_row.expand(n, -1).clone()
        return Conditions(shape=(n, self.num_points, 3), context=context)

    def score(self, x0: Tensor, conditions: Conditions) -> Scores:
        self.calls += x0.shape[0]
        clouds = [((), cloud) for cloud in x0.detach().cpu()]
        return scores_from_result(self.reward(clouds)).to(x0.device)

    def data_loss(self, model: PointCloudDiffusion, step: int) -> Tensor | None:
        if self.stream is None:
            return None
        indices = self.stream.next_indices()
        return sharded_denoising_loss(model, self.dataset.points[indices], data_generator(self.seed, step),
                                      model.context_for(self.dataset.labels[indices]))

    def stats(self) -> dict[str, float]:
        out = self.counters.live()
        out["reward_calls"] = float(self.calls)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"calls": self.calls, "stream": self.stream.state_dict() if self.stream is not None else None,
                "reward_counters": self.counters.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls = int(state["calls"])
        self.counters.load_state_dict(state.get("reward_counters") or {})  # absent in checkpoints before 0.2
        if self.stream is not None and state.get("stream") is not None:
            self.stream.load_state_dict(state["stream"])


def make_shape_reward(config: dict[str, Any]):
    """``make_reward`` with the shape rewards registered (shape_class, aspect_ratio, symmetry)."""
    import rgdm.rewards.shapes  # noqa: F401 - registers the shape rewards
    from rgdm.rewards import make_reward

    return make_reward(config)


def finetune_shapes(config: ShapeFinetuneConfig, run_dir: str | Path, resume: bool = False,
                    progress: bool = True) -> Trainer:
    """Fine-tune a pre-trained shape model toward ``config.reward`` with RGDM or DDPO.

    Under ``torchrun`` the roll-outs of each iteration are split across CPU processes, as for molecules.
    """
    from rgdm.training.finetune import join_process_group
    from rgdm.training.pretrain import RunExistsError

    config.validate()
    join_process_group(config.rgdm.batch_size if config.method == "rgdm" else config.ddpo.batch_size)
    _set_threads(config.train)
    run_dir = Path(run_dir)
    if (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir()) and not resume:
        raise RunExistsError(f"{run_dir}: run exists; pass --resume to continue it or choose another name")
    base = load_shape_model(config.base)
    distributed.seed_rank(config.train.seed)
    model = base.model.train()
    reward = make_shape_reward(config.reward)
    lambda_mle = config.rgdm.lambda_mle if config.method == "rgdm" else config.ddpo.lambda_mle
    dataset = load_shape_split(base.config.data, "train", config.train.seed) if lambda_mle > 0 else None
    task = ShapeTask(model, reward, dataset, config.target_class or None,
                     config.mle_batch_size if lambda_mle > 0 else 0, config.train.seed)
    if config.method == "rgdm":
        objective = RGDMObjective(model, task, config.rgdm, seed=config.train.seed)
    else:
        objective = DDPOObjective(model, task, config.ddpo, seed=config.train.seed)
    run_info = {"kind": "shape_diffusion", "config": config.to_dict(), "base_config": base.config.to_dict(),
                "class_names": list(model.class_names), "base_checkpoint": str(base.checkpoint)}
    trainer = Trainer(model, objective, config.train, run_dir, run_info, None, progress=progress)
    run_dir.mkdir(parents=True, exist_ok=True)
    if distributed.is_main():
        save_config(config, run_dir / "config.yaml")
    if resume:
        trainer.resume()
    try:
        trainer.fit()
    finally:
        if hasattr(reward, "close"):
            reward.close()
    return trainer
