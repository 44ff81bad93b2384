"""Shape point clouds on the shared training loop: data, model, the denoising objective and the Task.

Pre-training and fine-tuning of shape models are the shared ``rgdm.training.pretrain.pretrain`` and
``rgdm.training.finetune.finetune``; the shape domain (``rgdm.domains.shapes``) hands them the
pieces defined here:

* :func:`load_shape_split` and :func:`build_shape_model`: the embedded shape set and a
  :class:`PointCloudDiffusion` with a PointNet denoiser, as a :class:`ShapeRunConfig` asks;
* :class:`ShapeDenoisingObjective`: maximum likelihood on clouds, unconditional or conditioned on
  the class (``data.conditional``);
* :class:`ShapeTask`: the :class:`~rgdm.training.tasks.Task` of point clouds for RGDM and DDPO.

The configs are in ``rgdm.training.shape_configs``, the classifier in ``rgdm.training.classifier``.
A YAML file is a shape config when it says ``domain: shapes``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rgdm.config import ConfigError, from_dict
from rgdm.data.shapes import PointCloudDataset, load_shapes
from rgdm.diffusion.pointclouds import PointCloudDiffusion
from rgdm.diffusion.schedule import NoiseSchedule
from rgdm.models.pointnet import PointNetDenoiser
from rgdm.training.checkpoint import CheckpointError, load_checkpoint
from rgdm.training.mle import DataStream
from rgdm.training.shape_configs import ShapeDataConfig, ShapeRunConfig
from rgdm.training.tasks import (
    Conditions,
    RewardCounters,
    Scores,
    data_generator,
    scores_from_result,
    sharded_denoising_loss,
)

# ------------------------------------------------------------------------------------------------- #
# Data and models.


def load_shape_split(data: ShapeDataConfig, split: str, seed: int = 0) -> PointCloudDataset:
    """The embedded shapes of ``split`` as ``data`` asks (classes, points per cloud, normalisation)."""
    return load_shapes(split, n_points=data.n_points, normalize=data.normalize,
                       classes=data.classes or None, seed=seed)


def build_shape_model(config: ShapeRunConfig, class_names: tuple[str, ...]) -> PointCloudDiffusion:
    m, d = config.model, config.diffusion
    num_classes = len(class_names) if config.data.conditional else 0
    denoiser = PointNetDenoiser(m.width, m.n_blocks, m.time_dim, num_classes, m.knn, m.edge_width)
    return PointCloudDiffusion(denoiser, NoiseSchedule(d.timesteps, d.schedule, d.precision),
                               config.data.n_points, class_names, conditional=config.data.conditional)


@dataclass
class LoadedShapeModel:
    model: PointCloudDiffusion
    config: ShapeRunConfig
    checkpoint: Path
    step: int


def load_shape_model(source: str | Path, use_ema: bool = True, device: str | torch.device = "cpu") -> LoadedShapeModel:
    """A trained (or fine-tuned) shape diffusion model from a run directory or checkpoint file."""
    from rgdm.runs import resolve_checkpoint

    path = resolve_checkpoint(source)
    state = load_checkpoint(path)
    if state.get("kind") != "shape_diffusion":
        raise CheckpointError(f"{path}: not a shape diffusion checkpoint (train one with a 'domain: shapes' config)")
    stored = state["base_config"] if "base_config" in state else state["config"]
    if "edge_width" not in stored.get("model", {}):
        # The config key arrived with the FiLM denoiser: without it the weights are of the additive one.
        raise CheckpointError(f"{path}: trained with the earlier PointNet denoiser (additive time embedding, "
                              "no model.edge_width), which this version no longer builds; retrain it with "
                              "'rgdm pretrain --config configs/shapes_small.yaml' (or shapes_cond.yaml)")
    config = from_dict(ShapeRunConfig, stored)
    model = build_shape_model(config.validate(), tuple(state["class_names"]))
    weights = state["ema"] if use_ema and state.get("ema") is not None else state["model"]
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: the weights do not fit the model its config builds "
                              f"({str(err).splitlines()[0]})") from None
    return LoadedShapeModel(model.to(device).eval(), config, path, int(state["step"]))


# ------------------------------------------------------------------------------------------------- #
# Pre-training: the denoising loss.


class ShapeDenoisingObjective:
    """The denoising loss on shuffled batches of clouds; t and noise from a (seed, step) generator
    on ``device`` (the model's), so that a CPU run draws the same numbers whatever else runs."""

    name = "mle"

    def __init__(self, dataset: PointCloudDataset, batch_size: int, seed: int, device: str | torch.device = "cpu"):
        self.stream = DataStream(dataset, batch_size, seed)
        self.dataset = dataset
        self.seed = seed
        self.device = torch.device(device)

    def loss(self, model: PointCloudDiffusion, step: int) -> tuple[Tensor, dict[str, float]]:
        generator = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + step)
        indices = self.stream.next_indices()
        points = self.dataset.points[indices].to(self.device)
        context = _on(model.context_for(self.dataset.labels[indices]), self.device)
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
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    losses = []
    for i, batch in enumerate(dataset.batches(batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))):
        if i >= n_batches:
            break
        context = _on(model.context_for(batch.labels), device)
        losses.append(model.loss(batch.points.to(device), None, context, generator=generator).mean().item())
    return sum(losses) / max(len(losses), 1)


def _on(context: Tensor | None, device: torch.device) -> Tensor | None:
    return None if context is None else context.to(device)


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
