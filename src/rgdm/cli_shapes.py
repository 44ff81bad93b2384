"""``rgdm shapes ...``: point-cloud diffusion on the embedded shape set, steered toward a class.

    rgdm shapes pretrain --config configs/shapes_small.yaml          # unconditional (cond: shapes_cond.yaml)
    rgdm shapes train-classifier --config configs/shapes_classifier.yaml
    rgdm shapes finetune --from runs/shapes_small --method rgdm --reward shape_class \
        --classifier runs/shape-classifier --target ring_knot
    rgdm shapes evaluate runs/shapes_small-rgdm-shape_class --classifier runs/shape-classifier --target ring_knot

``rgdm pretrain --config configs/shapes_small.yaml`` works too (the config says ``domain: shapes``).
Shape models have their own commands because their fine-tuning target is a class *name*, while
``rgdm finetune --target`` is a number for molecule properties.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Point-cloud diffusion on shapes: pretrain, train-classifier, finetune, evaluate.")

RUNS_DIR = Path("runs")

SetOption = Annotated[list[str] | None, typer.Option(
    "--set", help="Override a config value, e.g. --set train.steps=100 (repeatable).")]


def is_shapes_config(path: str | Path) -> bool:
    """True when the YAML file at ``path`` declares ``domain: shapes`` (unreadable files: False)."""
    import yaml

    try:
        values = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(values, dict) and values.get("domain") == "shapes"


def _overrides(pairs: list[str] | None) -> dict[str, object]:
    from rgdm.cli import _overrides as parse

    return parse(pairs)


def run_pretrain(config: Path, name: str | None, resume: bool, set_: list[str] | None) -> Path:
    """Pre-train a shape model from a ``domain: shapes`` YAML file; returns the run directory."""
    from rgdm.config import load_config
    from rgdm.training.shapes import ShapeRunConfig, pretrain_shapes

    overrides = _overrides(set_)
    if name:
        overrides["name"] = name
    cfg = load_config(config, ShapeRunConfig, overrides)
    run_dir = RUNS_DIR / cfg.name
    trainer = pretrain_shapes(cfg, run_dir, resume=resume)
    typer.echo(f"checkpoints in {run_dir / 'checkpoints'} ({trainer.step} steps)")
    return run_dir


@app.command()
def pretrain(
    config: Annotated[Path, typer.Option(help="YAML config with domain: shapes (see configs/shapes_*.yaml).")],
    name: Annotated[str | None, typer.Option(help="Run name (default: the config's name).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run's newest checkpoint.")] = False,
    set_: SetOption = None,
) -> None:
    """Train a point-cloud diffusion model (unconditional or class-conditional) by maximum likelihood."""
    run_pretrain(config, name, resume, set_)


@app.command("train-classifier")
def train_classifier_cmd(
    config: Annotated[Path | None, typer.Option(help="YAML config (e.g. configs/shapes_classifier.yaml).")] = None,
    name: Annotated[str | None, typer.Option(help="Run name (default: shape-classifier).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run's newest checkpoint.")] = False,
    set_: SetOption = None,
) -> None:
    """Train the PointNet shape classifier (the shape_class reward's model); report its test accuracy."""
    from rgdm.config import from_dict, load_config, set_dotted, to_dict
    from rgdm.training.shapes import ClassifierConfig, train_classifier

    values = to_dict(load_config(config, ClassifierConfig) if config else ClassifierConfig())
    if name:
        values["name"] = name
    for key, value in _overrides(set_).items():
        set_dotted(values, key, value)
    cfg = from_dict(ClassifierConfig, values).validate()
    run_dir = RUNS_DIR / cfg.name
    metrics = train_classifier(cfg, run_dir, resume=resume)
    typer.echo(json.dumps(metrics, indent=2))
    typer.echo(f"checkpoints in {run_dir / 'checkpoints'}; test accuracy in {run_dir / 'test_metrics.json'}")


@app.command()
def finetune(
    base: Annotated[str, typer.Option("--from", help="Pre-trained shape run directory or checkpoint.")],
    method: Annotated[str, typer.Option(help="rgdm or ddpo.")] = "rgdm",
    reward: Annotated[str, typer.Option(help="shape_class, symmetry or aspect_ratio.")] = "shape_class",
    classifier: Annotated[str | None, typer.Option(help="Classifier run (for the shape_class reward).")] = None,
    target: Annotated[str | None, typer.Option(help="Target class (shape_class reward; conditional models).")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML fine-tuning config (overrides the defaults).")] = None,
    name: Annotated[str | None, typer.Option(help="Run name (default: <base>-<method>-<reward>).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run's newest checkpoint.")] = False,
    compare: Annotated[int, typer.Option(help="Clouds to sample before/after for report.md (0 = none).")] = 40,
    set_: SetOption = None,
) -> None:
    """Steer a pre-trained shape model toward a reward during training (RGDM or DDPO)."""
    from rgdm.config import ConfigError, from_dict, load_config, set_dotted, to_dict
    from rgdm.training.shapes import ShapeFinetuneConfig, finetune_shapes

    values = to_dict(load_config(config, ShapeFinetuneConfig, {"base": base}) if config else ShapeFinetuneConfig())
    values["base"], values["method"] = base, method
    values["reward"] = {"name": reward, "backend": "inline"}
    if reward == "shape_class":
        if not classifier or not target:
            raise ConfigError("--reward shape_class needs --classifier (a classifier run) and --target (a class)")
        values["reward"].update({"model": classifier, "target_class": target})
    if target:
        values["target_class"] = target
    for key, value in _overrides(set_).items():
        set_dotted(values, key, value)
    values["name"] = name or f"{Path(base).name}-{method}-{reward}"
    cfg = from_dict(ShapeFinetuneConfig, values).validate()
    run_dir = RUNS_DIR / cfg.name
    try:
        finetune_shapes(cfg, run_dir, resume=resume)
    except ValueError as err:  # e.g. an unknown class name: one line, not a traceback
        raise ConfigError(str(err)) from None
    typer.echo(f"fine-tuned model in {run_dir / 'checkpoints'}")
    if compare and classifier and target:
        _report(run_dir, {"before": base, "after": str(run_dir)}, classifier, target, compare)


@app.command()
def evaluate(
    model: Annotated[list[str], typer.Argument(help="Shape model run directories or checkpoints.")],
    classifier: Annotated[str, typer.Option(help="Classifier run directory or checkpoint.")],
    target: Annotated[str, typer.Option(help="Target class: accuracy and reference clouds.")],
    n: Annotated[int, typer.Option(help="Clouds to sample per model.")] = 40,
    out: Annotated[Path | None, typer.Option(help="Report directory (default: <first model>/eval).")] = None,
) -> None:
    """Sample each model; fraction classified as TARGET and MMD/COV/1-NNA against its test clouds."""
    out = out or Path(model[0]) / "eval"
    _report(out, {Path(m).name: m for m in model}, classifier, target, n)


def _report(out: Path, models: dict[str, str], classifier: str, target: str, n: int) -> None:
    from rgdm.config import ConfigError
    from rgdm.eval.shapes import shape_report

    try:
        rows = shape_report(models, classifier, target, n, out)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    typer.echo(json.dumps(rows, indent=2))
    typer.echo(f"report: {out / 'report.md'} (renders: {out / 'samples.png'})")
