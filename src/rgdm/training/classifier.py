"""The PointNet shape classifier: its config, training run and loading (the ``shape_class`` reward's model).

``rgdm shapes train-classifier`` runs :func:`train_classifier` on the shared training loop; it writes
the test accuracy to ``test_metrics.json``. :func:`load_classifier` is what the ``shape_class``
reward and the shape reports load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rgdm import distributed
from rgdm.config import TrainConfig, _check_choice, _check_range, check_run_name, save_config, to_dict
from rgdm.data.shapes import PointCloudDataset
from rgdm.models.pointnet import PointNetClassifier
from rgdm.training.checkpoint import CheckpointError, load_checkpoint
from rgdm.training.loop import Trainer
from rgdm.training.mle import DataStream
from rgdm.training.shape_configs import DOMAIN, ShapeDataConfig
from rgdm.training.shapes import load_shape_split


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
        check_run_name(self.name)
        _check_choice("domain", self.domain, (DOMAIN,))
        self.data.validate()
        _check_range("width", self.width, low=1)
        _check_range("jitter", self.jitter, low=0.0)
        _check_range("scale_range", self.scale_range, low=0.0, high=0.9)
        self.train.validate()
        return self



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
        # The augmentation is drawn on the CPU, where the data are; the batch then moves to the model.
        generator = torch.Generator().manual_seed(self.config.train.seed * 1_000_003 + step)
        indices = self.stream.next_indices()
        points = augment_clouds(self.dataset.points[indices], self.config.jitter, self.config.scale_range, generator)
        device = distributed.module_device(model)
        logits = model(points.to(device))
        labels = self.dataset.labels[indices].to(device)
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
    device = distributed.module_device(model)
    predictions = torch.cat([model(batch.points.to(device)).argmax(1).cpu()
                             for batch in dataset.batches(batch_size, shuffle=False)])
    correct = predictions == dataset.labels
    metrics = {"accuracy": correct.float().mean().item(), "n": float(len(dataset))}
    for index, name in enumerate(dataset.class_names):
        members = dataset.labels == index
        if members.any():
            metrics[f"accuracy_{name}"] = correct[members].float().mean().item()
    return metrics


def train_classifier(config: ClassifierConfig, run_dir: str | Path, resume: bool = False,
                     progress: bool = True, device: str = "cpu") -> dict[str, float]:
    """Train the PointNet classifier on ``device`` (auto, cpu or cuda; float32); returns (and writes to
    test_metrics.json) its test accuracy."""
    config.validate()
    torch_device = distributed.resolve_device(device)
    if config.train.num_threads:
        torch.set_num_threads(config.train.num_threads)
    train_set = load_shape_split(config.data, "train", config.train.seed)
    val_set = load_shape_split(config.data, "val", config.train.seed)
    test_set = load_shape_split(config.data, "test", config.train.seed)
    torch.manual_seed(config.train.seed)
    model = PointNetClassifier(len(train_set.class_names), config.width, train_set.class_names).to(torch_device)
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
