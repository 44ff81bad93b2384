"""Evaluating generated shapes for a target class: classifier verdicts, MMD/COV/1-NNA, renders.

``evaluate_shape_samples`` scores a set of generated clouds against the reference test clouds of
the target class:

* ``target_accuracy`` -- fraction of generated clouds the classifier assigns to the target class;
* ``target_log_prob`` -- mean log-probability of the target class (the ``shape_class`` reward);
* ``MMD-CD``, ``COV-CD``, ``1-NNA-CD`` (and ``-EMD`` on ``emd_points`` points per cloud) from
  :func:`rgdm.eval.pointclouds.evaluate_point_clouds` (both sets bounding-box normalised).

``base_model_quality`` measures a pre-trained model against the test clouds of every class
(1-NNA over all classes; per-class accuracy of a class-conditional model).

``render_point_clouds`` draws rows of clouds (one row per model) as matplotlib 3D scatter plots.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from rgdm import distributed
from rgdm.data.shapes import PointCloudDataset, subsample_points
from rgdm.eval.pointclouds import evaluate_point_clouds
from rgdm.models.pointnet import PointNetClassifier


@torch.no_grad()
def class_log_probs(classifier: PointNetClassifier, clouds: Tensor, batch_size: int = 128) -> Tensor:
    """[N, classes] log-probabilities of every class for clouds [N, P, 3]."""
    classifier.eval()
    return torch.cat([torch.log_softmax(classifier(chunk.float()), dim=1) for chunk in clouds.split(batch_size)])


def evaluate_shape_samples(clouds: Tensor, reference: Tensor, classifier: PointNetClassifier, target: str,
                           emd_points: int = 0, seed: int = 0) -> dict[str, float]:
    """Target-class accuracy and set metrics of generated ``clouds`` against ``reference`` clouds."""
    index = classifier.class_index(target)
    log_probs = class_log_probs(classifier, clouds)
    metrics = {
        "target_accuracy": (log_probs.argmax(1) == index).float().mean().item(),
        "target_log_prob": log_probs[:, index].mean().item(),
    }
    metrics.update(evaluate_point_clouds(clouds, reference, metrics=("cd",)))
    if emd_points:
        generator = torch.Generator().manual_seed(seed)
        small_clouds = subsample_points(clouds, min(emd_points, clouds.shape[1]), generator)
        small_reference = subsample_points(reference, min(emd_points, reference.shape[1]), generator)
        metrics.update(evaluate_point_clouds(small_clouds, small_reference, metrics=("emd",)))
    return metrics


@torch.no_grad()
def base_model_quality(model, test: PointCloudDataset, classifier: PointNetClassifier, cd_points: int = 256,
                       seed: int = 0, num_steps: int | None = None) -> tuple[dict[str, float], Tensor]:
    """How much a pre-trained shape model's samples look like the test clouds of *all* classes.

    An unconditional model draws as many clouds as ``test`` holds; a class-conditional one draws,
    for every class, as many clouds as ``test`` holds of that class (the same class strata). Returns
    the metrics and the samples [len(test), P, 3]:

    * ``MMD-CD``, ``COV-CD``, ``1-NNA-CD`` against all test clouds (``cd_points`` points per cloud,
      bounding-box normalised), ``n_generated`` and ``n_reference`` (the set sizes);
    * ``class_fraction/<name>``: share of the samples the classifier assigns to each class;
    * conditional models only: ``accuracy/<name>``, the share of the clouds asked for a class that
      the classifier assigns to it, and ``accuracy``, their mean over classes.
    """
    device = distributed.module_device(model)
    generator = distributed.generator_on(device, seed)
    counts = test.class_counts()
    if model.conditional:
        missing = [name for name in test.class_names if name not in model.class_names]
        if missing:
            raise ValueError(f"the model was not trained on the test classes {missing}")
        per_class = {name: model.generate(counts[name], [name], num_steps=num_steps, generator=generator).cpu()
                     for name in test.class_names if counts[name]}
        clouds = torch.cat(list(per_class.values()))
    else:
        clouds = model.generate(len(test), None, num_steps=num_steps, generator=generator).cpu()
    predicted = class_log_probs(classifier, clouds).argmax(dim=1)
    metrics: dict[str, float] = {"n_generated": float(len(clouds)), "n_reference": float(len(test))}
    for name in test.class_names:
        metrics[f"class_fraction/{name}"] = (predicted == classifier.class_index(name)).float().mean().item()
    if model.conditional:
        start = 0
        for name, chunk in per_class.items():
            hits = predicted[start:start + len(chunk)] == classifier.class_index(name)
            metrics[f"accuracy/{name}"] = hits.float().mean().item()
            start += len(chunk)
        metrics["accuracy"] = sum(metrics[f"accuracy/{name}"] for name in per_class) / len(per_class)
    sampler = torch.Generator().manual_seed(seed)
    points = min(cd_points, clouds.shape[1], test.points.shape[1])
    metrics.update(evaluate_point_clouds(subsample_points(clouds, points, sampler),
                                         subsample_points(test.points, points, sampler), metrics=("cd",)))
    return metrics, clouds


def render_point_clouds(rows: Mapping[str, Tensor], out: str | Path, columns: int = 6, point_size: float = 1.0,
                        title: str | None = None) -> Path:
    """A PNG grid: one row per entry of ``rows`` (label -> clouds [N, P, 3]), ``columns`` clouds each.

    Each cloud is centred and framed to hold 98 % of its points (outliers fall outside the box).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure = plt.figure(figsize=(2.0 * columns, 2.1 * len(rows) + (0.4 if title else 0.0)))
    for r, (label, clouds) in enumerate(rows.items()):
        for c in range(columns):
            axes = figure.add_subplot(len(rows), columns, r * columns + c + 1, projection="3d")
            axes.set_axis_off()
            if c < len(clouds):
                cloud = clouds[c].detach().cpu().float()
                cloud = cloud - cloud.mean(0)
                # Stored shapes are aligned with y up; matplotlib draws z up, so plot (x, z, y).
                axes.scatter(cloud[:, 0], cloud[:, 2], cloud[:, 1], s=point_size, c=cloud[:, 1], cmap="viridis",
                             linewidths=0)
                # A few stray points should not shrink the shape to a dot: frame 98 % of the points.
                limit = float(torch.quantile(cloud.abs().amax(dim=1), 0.98)) * 1.05
                for setter in (axes.set_xlim, axes.set_ylim, axes.set_zlim):
                    setter(-limit, limit)
                axes.view_init(elev=15, azim=-60)
            if c == 0:
                axes.text2D(-0.05, 0.5, label, transform=axes.transAxes, rotation=90, va="center", ha="right",
                            fontsize=9)
    if title:
        figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    figure.savefig(out, dpi=90)
    plt.close(figure)
    return out


def shape_report(models: Mapping[str, str | Path], classifier: str | Path, target: str, n: int, out: str | Path,
                 cd_points: int = 256, emd_points: int = 0, seed: int = 0,
                 device: str | torch.device = "cpu") -> list[dict[str, float | str]]:
    """Sample ``n`` clouds from each model (label -> run or checkpoint) and compare them on ``target``.

    The models sample on ``device`` (noise drawn there from ``seed``); the classifier and the set
    metrics run on the CPU.

    Writes ``report.md``, ``metrics.json`` and ``samples.png`` (one row of renders per model) to
    ``out``; the reference set is the test split of the target class, in the first model's data frame.
    """
    from rgdm.training.classifier import load_classifier
    from rgdm.training.shapes import load_shape_model, load_shape_split

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    judge = load_classifier(classifier)
    loaded = {label: load_shape_model(source, device=device) for label, source in models.items()}
    first = next(iter(loaded.values()))
    reference = load_shape_split(first.config.data, "test").of_class(target).points
    rows, samples = [], {}
    for label, entry in loaded.items():
        classes = [target] if entry.model.conditional else None
        clouds = entry.model.generate(n, classes, num_steps=entry.config.diffusion.sampling_steps,
                                      generator=distributed.generator_on(distributed.module_device(entry.model),
                                                                         seed)).cpu()
        samples[label] = clouds
        generator = torch.Generator().manual_seed(seed)
        metrics = evaluate_shape_samples(subsample_points(clouds, min(cd_points, clouds.shape[1]), generator),
                                         subsample_points(reference, min(cd_points, reference.shape[1]), generator),
                                         judge, target, emd_points, seed)
        rows.append({"model": label, **metrics})
    render_point_clouds({label: clouds[:6] for label, clouds in samples.items()}, out / "samples.png",
                        title=f"target class: {target}")
    columns = [key for key in rows[0] if key != "model"]
    lines = [f"# Samples toward '{target}' ({n} per model; reference: {len(reference)} test clouds)", "",
             "| model | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    lines += ["| " + " | ".join([str(row["model"]), *(f"{row[c]:.4f}" for c in columns)]) + " |" for row in rows]
    lines += ["", "![samples](samples.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    (out / "metrics.json").write_text(json.dumps(rows, indent=2))
    return rows
