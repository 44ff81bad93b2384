"""Rewards on point clouds: a learned class score and two geometric black boxes.

A cloud reaches a reward as a :class:`~rgdm.rewards.molecule.Molecule` without symbols
(``positions`` [P, 3]); ``ShapeTask`` and ``as_molecules`` accept ``((), cloud)`` pairs.

* ``shape_class`` -- log-probability (or logit) of ``target_class`` under a trained PointNet
  classifier (``rgdm shapes train-classifier``)::

      {name: shape_class, model: runs/shape-classifier, target_class: humanoid, backend: inline}

* ``aspect_ratio`` -- ratio of the largest to the smallest principal extent (the square root of the
  ratio of the extreme eigenvalues of the cloud's covariance): 1 for a round blob, large for a rod.
* ``symmetry`` -- minus the Chamfer distance between the cloud and its mirror image through the
  plane orthogonal to ``axis`` that passes through its centroid (after scaling the cloud to unit
  coordinate std, so the value does not depend on size): 0 for a mirror-symmetric cloud, negative
  otherwise.

All three score a cloud by its shape alone: position and (for the two last) size do not matter.
This module imports only numpy; torch is imported when a classifier is loaded. The classifier is a
torch model, so run ``shape_class`` with ``backend: inline``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from rgdm.rewards.molecule import Molecule
from rgdm.rewards.registry import register_reward
from rgdm.rewards.scoring import INVALID, BatchFunction, Outcome, failure, outcome_from_value

if TYPE_CHECKING:
    from rgdm.models.pointnet import PointNetClassifier

OUTPUTS = ("log_prob", "logit")


def _unscorable(cloud: np.ndarray) -> str | None:
    if len(cloud) < 2:
        return "a cloud needs at least two points"
    if not np.isfinite(cloud).all():
        return "coordinates contain NaN or infinity"
    return None


def _unit_cloud(cloud: np.ndarray) -> np.ndarray:
    """The cloud centred at its centroid and scaled to unit coordinate std (shape_unit)."""
    centred = cloud - cloud.mean(axis=0)
    scale = centred.std()
    return centred / scale if scale > 0 else centred


# ------------------------------------------------------------------------------------------------- #
# Geometric rewards.


def chamfer(x: np.ndarray, y: np.ndarray) -> float:
    """Chamfer distance with squared distances, each direction averaged (as rgdm.eval.pointclouds)."""
    squared = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
    return float(squared.min(axis=1).mean() + squared.min(axis=0).mean())


def mirror_symmetry(molecules: Sequence[Molecule], axis: int = 0) -> list[float]:
    """-CD(cloud, mirror image of the cloud through its centroid plane orthogonal to ``axis``)."""
    values = []
    for molecule in molecules:
        cloud = _unit_cloud(molecule.positions)
        mirrored = cloud.copy()
        mirrored[:, axis] = -mirrored[:, axis]
        values.append(-chamfer(cloud, mirrored))
    return values


def principal_aspect_ratio(molecules: Sequence[Molecule]) -> list[float]:
    """sqrt(lambda_max / lambda_min) of each cloud's covariance (ratio of principal extents)."""
    values = []
    for molecule in molecules:
        eigenvalues = np.linalg.eigvalsh(np.cov(molecule.positions.T))
        values.append(float(np.sqrt(eigenvalues[-1] / max(eigenvalues[0], 1e-12))))
    return values


@dataclass(frozen=True)
class CloudFunction(BatchFunction):
    """A BatchFunction on clouds: unscorable clouds (NaN, fewer than two points) become invalid."""

    def evaluate(self, molecules: Sequence[Molecule], targets: Sequence[float | None]) -> list[Outcome]:
        outcomes: list[Outcome] = [failure(INVALID, "not scored")] * len(molecules)
        scorable = []
        for index, molecule in enumerate(molecules):
            reason = _unscorable(molecule.positions)
            if reason is None:
                scorable.append(index)
            else:
                outcomes[index] = failure(INVALID, reason)
        values = self.fn([molecules[i] for i in scorable]) if scorable else []
        for index, value in zip(scorable, values, strict=True):
            outcomes[index] = outcome_from_value(value)
        return outcomes


@register_reward("symmetry", units="-Chamfer distance to the mirror image (shape_unit)")
def symmetry(axis: int = 0) -> CloudFunction:
    """Mirror symmetry of a point cloud: -Chamfer(cloud, mirror image); 0 when perfectly symmetric.

    axis: 0, 1 or 2 -- the mirror plane is orthogonal to this axis and passes through the centroid.
    """
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2, got {axis!r}")
    return CloudFunction(functools.partial(mirror_symmetry, axis=axis))


@register_reward("aspect_ratio", units="ratio of principal extents")
def aspect_ratio() -> CloudFunction:
    """Ratio of the largest to the smallest principal extent of a point cloud (>= 1)."""
    return CloudFunction(principal_aspect_ratio)


# ------------------------------------------------------------------------------------------------- #
# The learned class reward.


@functools.lru_cache(maxsize=8)
def cached_classifier(checkpoint: str) -> PointNetClassifier:
    """The classifier of a checkpoint file, loaded once per process."""
    from rgdm.training.classifier import load_classifier

    return load_classifier(checkpoint)


@dataclass(frozen=True)
class ClassScore:
    """``fn(clouds) -> scores``: a picklable handle on a classifier checkpoint and a target class."""

    checkpoint: str
    target: int
    output: str = "log_prob"
    batch_size: int = 256

    def __call__(self, molecules: Sequence[Molecule]) -> list[float]:
        import torch

        if not molecules:
            return []
        model = cached_classifier(self.checkpoint)
        clouds = torch.from_numpy(np.stack([m.positions for m in molecules])).float()
        scores = []
        with torch.no_grad():
            for chunk in clouds.split(self.batch_size):
                logits = model(chunk)
                if self.output == "log_prob":
                    logits = torch.log_softmax(logits, dim=1)
                scores.append(logits[:, self.target].double())
        return torch.cat(scores).tolist()


@register_reward("shape_class", units="log-probability of the target class")
def shape_class(model: str, target_class: str | int, output: str = "log_prob", batch_size: int = 256) -> CloudFunction:
    """Log-probability (``output: log_prob``) or logit of ``target_class`` under a PointNet classifier.

    model: run directory or checkpoint of ``rgdm shapes train-classifier``. target_class: a class
    name of that classifier (or its index). Clouds of one call must have equal point counts.
    """
    from rgdm.runs import resolve_checkpoint
    from rgdm.training.checkpoint import CheckpointError

    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {', '.join(OUTPUTS)}, got {output!r}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    try:
        checkpoint = str(resolve_checkpoint(Path(str(model))).resolve())
        classifier = cached_classifier(checkpoint)
    except CheckpointError as err:
        raise ValueError(f"model: {err}") from None
    return CloudFunction(ClassScore(checkpoint, classifier.class_index(target_class), output, batch_size))
