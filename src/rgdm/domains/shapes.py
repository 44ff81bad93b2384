"""Shapes: point clouds of the embedded mesh shape set, a PointNet denoiser over zero-mean clouds,
steered toward a class (``shape_class``) or a geometric reward.

The pieces: configs ``rgdm.training.shape_configs``, data ``rgdm.data.shapes``, model, objective
and task ``rgdm.training.shapes``, classifier ``rgdm.training.classifier``, rewards
``rgdm.rewards.shapes``, metrics and renders ``rgdm.eval.shapes``; the commands are
``rgdm.cli_shapes``. docs/shapes.md describes the domain.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rgdm import distributed
from rgdm.diffusion.pointclouds import PointCloudDiffusion
from rgdm.domains import Samples, TrainingData
from rgdm.training.shape_configs import METHODS, ShapeFinetuneConfig, ShapeRunConfig
from rgdm.training.shapes import (
    ShapeDenoisingObjective,
    ShapeTask,
    build_shape_model,
    load_shape_model,
    load_shape_split,
    shape_validation_loss,
)


class ShapeDomain:
    name = "shapes"
    noun = "shape"
    run_config = ShapeRunConfig
    finetune_config = ShapeFinetuneConfig
    methods = METHODS

    # --- data, model and state space ----------------------------------------------------------- #
    def load_data(self, config: ShapeRunConfig) -> TrainingData:
        return TrainingData(load_shape_split(config.data, "train", config.train.seed),
                            load_shape_split(config.data, "val", config.train.seed))

    def describe_data(self, data: TrainingData) -> str:
        return f"{len(data.train)} clouds of {len(data.train.class_names)} classes"

    def build_model(self, config: ShapeRunConfig, data: TrainingData) -> PointCloudDiffusion:
        return build_shape_model(config, data.train.class_names)

    def pretrain_objective(self, config: ShapeRunConfig, data: TrainingData, device: Any) -> ShapeDenoisingObjective:
        return ShapeDenoisingObjective(data.train, config.train.batch_size, config.train.seed, device)

    def validation(self, config: ShapeRunConfig, data: TrainingData) -> Callable[[nn.Module, int], dict[str, float]]:
        def evaluate(ema_model: nn.Module, step: int) -> dict[str, float]:
            return {"val_loss": shape_validation_loss(ema_model, data.val, config.train.batch_size,
                                                      config.train.val_batches)}

        return evaluate

    def run_info(self, config: ShapeRunConfig, data: TrainingData) -> dict[str, Any]:
        return {"kind": "shape_diffusion", "config": config.to_dict(), "class_names": list(data.train.class_names)}

    def load_model(self, source: str | Path, use_ema: bool = True, device: Any = "cpu"):
        return load_shape_model(source, use_ema=use_ema, device=device)

    # --- fine-tuning --------------------------------------------------------------------------- #
    def make_reward(self, config: dict[str, Any]):
        """``make_reward`` with the shape rewards registered (shape_class, aspect_ratio, symmetry)."""
        import rgdm.rewards.shapes  # noqa: F401 - registers the shape rewards
        from rgdm.rewards import make_reward

        return make_reward(config)

    def build_task(self, config: ShapeFinetuneConfig, loaded: Any, model: PointCloudDiffusion,
                   reward: Any) -> ShapeTask:
        """Clouds of the model's size; the base model's training clouds only for the lambda_mle term."""
        lambda_mle = config.method_config.lambda_mle
        dataset = load_shape_split(loaded.config.data, "train", config.train.seed) if lambda_mle > 0 else None
        return ShapeTask(model, reward, dataset, config.target_class or None,
                         config.mle_batch_size if lambda_mle > 0 else 0, config.train.seed)

    def finetune_validation(self, config: ShapeFinetuneConfig, task: ShapeTask, device: Any) -> None:
        return None  # the classifier-based report after training is the shape evaluation (rgdm.eval.shapes)

    def finetune_run_info(self, config: ShapeFinetuneConfig, loaded: Any) -> dict[str, Any]:
        return {"kind": "shape_diffusion", "config": config.to_dict(), "base_config": loaded.config.to_dict(),
                "class_names": list(loaded.model.class_names), "base_checkpoint": str(loaded.checkpoint)}

    # --- samples, metrics and renders ---------------------------------------------------------- #
    @torch.no_grad()
    def sample(self, model: PointCloudDiffusion, n: int, num_steps: int | None = None, seed: int = 0) -> Samples:
        """Clouds of an unconditional model, or of the first class of a conditional one."""
        classes = [model.class_names[0]] * n if model.conditional else None
        generator = distributed.generator_on(distributed.module_device(model), seed)
        return Samples(model.generate(n, classes, num_steps=num_steps, generator=generator).cpu())

    def metrics(self, model: PointCloudDiffusion, samples: Samples) -> dict[str, float]:
        """Size and spread of the clouds (the classifier metrics need a classifier: rgdm.eval.shapes)."""
        centred = samples.x - samples.x.mean(dim=1, keepdim=True)
        return {"n_clouds": float(len(samples.x)), "points": float(samples.x.shape[1]),
                "coordinate_std": float(centred.std()),
                "centroid_norm_max": float(samples.x.mean(dim=1).norm(dim=-1).max())}

    def render(self, model: PointCloudDiffusion, samples: Samples, out: Path) -> Path:
        from rgdm.eval.shapes import render_point_clouds

        render_point_clouds({"samples": samples.x[:6]}, out)
        return Path(out)

    # --- commands (rgdm.cli) ------------------------------------------------------------------- #
    def pretrain_command(self, request: Any) -> None:
        from rgdm.cli_shapes import run_pretrain

        run_pretrain(request.config, request.name, request.resume, request.set_, device=request.device)

    def finetune_command(self, request: Any) -> None:
        from rgdm.cli_shapes import run_finetune
        from rgdm.config import ConfigError

        if request.scale is not None:
            raise ConfigError("--scale: only for molecule property targets; a shape model's --target is a class")
        run_finetune(request.base, request.method, request.reward, request.classifier, request.target,
                     request.config, request.name, request.resume, request.compare, request.set_,
                     device=request.device)

    def evaluate_command(self, request: Any) -> None:
        from rgdm.cli_shapes import run_evaluate
        from rgdm.config import ConfigError

        if request.steps is not None:
            raise ConfigError("--steps: shape models sample with their config's diffusion.sampling_steps")
        run_evaluate(request.models, request.classifier, request.target, request.n, request.out, request.seed,
                     overwrite=request.overwrite, device=request.device)


DOMAIN = ShapeDomain()
