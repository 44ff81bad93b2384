"""Shape models on the command line: pre-training, the classifier, fine-tuning toward a class, evaluation.

    rgdm pretrain --config configs/shapes_small.yaml          # unconditional (cond: shapes_cond.yaml)
    rgdm shapes train-classifier --config configs/shapes_classifier.yaml
    rgdm finetune --from runs/shapes_small --method rgdm --reward shape_class --target ring_knot
    rgdm evaluate runs/shapes_small-rgdm-shape_class

The top-level commands recognise shape models: ``rgdm pretrain`` by the config's ``domain: shapes``,
``rgdm finetune`` and ``rgdm evaluate`` by the model they are given (``rgdm.domains``), and
hand over to :func:`run_pretrain`, :func:`run_finetune` and :func:`run_evaluate` here. For a shape
model, ``--target`` is a class *name* (for a molecule model it is a property value).
``rgdm shapes pretrain | finetune | evaluate`` are the same commands under the ``shapes`` group.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Annotated, Any

import typer

from rgdm.cli_common import DeviceOption, SetOption, parse_overrides, resolve_device_option, run_dir_of

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Point-cloud diffusion on shapes: pretrain, train-classifier, finetune, evaluate.")

RUNS_DIR = Path("runs")
DEFAULT_CLASSIFIER = RUNS_DIR / "shape-classifier"  # where `rgdm shapes train-classifier` puts it by default
DEFAULT_COMPARE = 40  # clouds sampled per model for a report (sampling clouds is slower than molecules)



# ------------------------------------------------------------------------------------------------- #
# Recognising shape configs and models.


def is_shapes_config(path: str | Path) -> bool:
    """True when the YAML file at ``path`` declares ``domain: shapes`` (unreadable files: False)."""
    from rgdm.domains import domain_of_config_file

    return domain_of_config_file(path).name == "shapes"


def is_shape_model(source: str | Path) -> bool:
    """True when ``source`` (a run directory or checkpoint file) holds a shape model
    (``rgdm.domains.domain_of_model``: the ``domain:`` of its stored config)."""
    from rgdm.domains import domain_of_model

    return domain_of_model(source).name == "shapes"


def _checkpoint_state(source: str | Path) -> dict[str, Any]:
    from rgdm.runs import resolve_checkpoint
    from rgdm.training.checkpoint import load_checkpoint

    return load_checkpoint(resolve_checkpoint(source))


def check_target_class(target: str, classes: tuple[str, ...] | list[str], what: str = "--target") -> str:
    """``target`` if it names one of ``classes``; otherwise a one-line ConfigError with a suggestion."""
    from rgdm.config import ConfigError

    if target in classes:
        return target
    close = difflib.get_close_matches(target, list(classes), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ConfigError(f"{what} {target!r}: not a class of this shape model ({hint}classes: {', '.join(classes)})")


def _model_classes(source: str | Path) -> tuple[str, ...]:
    """The classes a shape diffusion model was trained on (stored in its checkpoints)."""
    from rgdm.config import ConfigError

    state = _checkpoint_state(source)
    if state.get("kind") != "shape_diffusion" or "class_names" not in state:
        raise ConfigError(f"{source}: not a shape diffusion model (a {state.get('kind', 'unknown')!r} run); "
                          "give a run of `rgdm pretrain --config configs/shapes_*.yaml` or of its fine-tuning")
    return tuple(state["class_names"])


def _existing_classifier(classifier: str | Path) -> str:
    from rgdm.config import ConfigError

    if not Path(classifier).exists():
        raise ConfigError(f"--classifier {classifier}: no such classifier run or checkpoint "
                          "(train one with `rgdm shapes train-classifier`)")
    return str(classifier)


def _label(source: str | Path) -> str:
    path = Path(source)
    return path.name if path.is_dir() else f"{run_dir_of(path).name}/{path.name}"


# ------------------------------------------------------------------------------------------------- #
# The work behind the commands (shared by `rgdm <command>` and `rgdm shapes <command>`).


def run_pretrain(config: Path, name: str | None, resume: bool, set_: list[str] | None,
                 device: str = "auto") -> Path:
    """Pre-train a shape model from a ``domain: shapes`` YAML file on ``device``; returns the run directory."""
    resolve_device_option(device)  # an unknown name, or cuda without a GPU: one line, before any work
    from rgdm.cli_runs import claimed_run, run_name
    from rgdm.config import check_run_name, load_config
    from rgdm.training.pretrain import pretrain
    from rgdm.training.shape_configs import ShapeRunConfig

    overrides = parse_overrides(set_)
    if name is not None:
        overrides["name"] = check_run_name(name, "--name")
    cfg = load_config(config, ShapeRunConfig, overrides)
    cfg.name = run_name(cfg.name, explicit=name is not None, resume=resume)
    with claimed_run(cfg.name, explicit=name is not None, resume=resume) as run_dir:
        trainer = pretrain(cfg, run_dir, resume=resume, device=device)  # the shared code path
    typer.echo(f"checkpoints in {run_dir / 'checkpoints'} ({trainer.step} steps)")
    return run_dir


def run_finetune(base: str, method: str = "rgdm", reward: str | None = None, classifier: str | None = None,
                 target: str | None = None, config: Path | None = None, name: str | None = None,
                 resume: bool = False, compare: int | None = None, set_: list[str] | None = None,
                 device: str = "auto") -> Path:
    """Fine-tune the shape model ``base`` toward a reward; returns the run directory.

    reward: a shape reward name; default: the ``--config`` file's reward, else ``shape_class``.
    For ``shape_class`` the classifier defaults to ``runs/shape-classifier`` and ``target`` (a class
    of the base model) is required; a class-conditional base is also asked for ``target``.
    compare: clouds sampled before and after for ``report.md`` (needs a classifier and a target).
    The model, its roll-outs and their generators run on ``device``; rewards on the CPU.
    """
    resolve_device_option(device)
    from rgdm import distributed
    from rgdm.cli_runs import claimed_run, run_name
    from rgdm.config import ConfigError, check_run_name, from_dict, load_config, set_dotted, to_dict
    from rgdm.training.finetune import finetune
    from rgdm.training.shape_configs import ShapeFinetuneConfig

    classes = _model_classes(base)
    if target is not None:
        check_target_class(target, classes)
    values = to_dict(load_config(config, ShapeFinetuneConfig, {"base": base}) if config else ShapeFinetuneConfig())
    values["base"], values["method"] = base, method
    if reward or not config:  # without --reward, a config file keeps its own reward
        values["reward"] = {"name": reward or "shape_class", "backend": "inline"}
    spec = values["reward"]
    if spec.get("name") == "shape_class":
        if classifier or "model" not in spec:
            spec["model"] = _existing_classifier(classifier or DEFAULT_CLASSIFIER)
        if target:
            spec["target_class"] = target
        if not spec.get("target_class"):
            raise ConfigError(f"--reward shape_class needs --target, one of: {', '.join(classes)}")
    if target:
        values["target_class"] = target
    for key, value in parse_overrides(set_).items():
        set_dotted(values, key, value)
    default_name = f"{Path(base).name}-{method}-{spec.get('name')}"
    values["name"] = check_run_name(name, "--name") if name is not None else default_name
    cfg = from_dict(ShapeFinetuneConfig, values).validate()
    if cfg.target_class:  # e.g. from the config file or --set: the same check as --target
        check_target_class(cfg.target_class, classes, "target_class")
    cfg.name = run_name(cfg.name, explicit=name is not None, resume=resume)
    with claimed_run(cfg.name, explicit=name is not None, resume=resume) as run_dir:
        with distributed.leaving_process_group():
            try:
                finetune(cfg, run_dir, resume=resume, device=device)  # the shared code path
            except ValueError as err:  # e.g. a class the classifier does not know: one line, not a traceback
                raise ConfigError(str(err)) from None
            main = distributed.is_main()
        if not main:  # under torchrun, rank 0 reports
            return run_dir
        typer.echo(f"fine-tuned model in {run_dir / 'checkpoints'}")
        compare = DEFAULT_COMPARE if compare is None else compare
        report_target = cfg.target_class or cfg.reward.get("target_class")
        report_classifier = classifier or cfg.reward.get("model") or DEFAULT_CLASSIFIER
        if compare and report_target and Path(report_classifier).exists():
            _report(run_dir, {"before": base, "after": str(run_dir)}, str(report_classifier), str(report_target),
                    compare, device=device)
        elif compare:
            typer.echo("no before/after report: it needs --target and a classifier (--classifier)")
    return run_dir


def run_evaluate(models: list[str], classifier: str | None = None, target: str | None = None,
                 n: int | None = None, out: Path | None = None, seed: int = 0, overwrite: bool = True,
                 device: str = "auto") -> Path:
    """Sample each shape model and compare them on ``target``; returns the report directory.

    Defaults come from the first model's run: the class it was fine-tuned toward and the classifier
    of its ``shape_class`` reward (else ``runs/shape-classifier``). The report goes to
    ``<first run>/eval`` unless ``out`` says otherwise.
    """
    from rgdm.config import ConfigError

    resolve_device_option(device)
    classes = _model_classes(models[0])
    trained = _checkpoint_state(models[0]).get("config") or {}
    reward = trained.get("reward") if isinstance(trained.get("reward"), dict) else {}
    target = target or trained.get("target_class") or reward.get("target_class")
    if not target:
        raise ConfigError(f"--target: name the class to evaluate against, one of: {', '.join(classes)}")
    check_target_class(str(target), classes)
    classifier = _existing_classifier(classifier or reward.get("model") or DEFAULT_CLASSIFIER)
    out = out or run_dir_of(models[0]) / "eval"
    if not overwrite and (out / "metrics.json").exists():
        raise ConfigError(f"{out / 'metrics.json'} exists; pass --overwrite to replace the report, "
                          "or choose another --out")
    _report(out, {_label(m): m for m in models}, classifier, str(target), DEFAULT_COMPARE if n is None else n, seed,
            device)
    return out


def _report(out: Path, models: dict[str, str], classifier: str, target: str, n: int, seed: int = 0,
            device: str = "auto") -> None:
    from rgdm.config import ConfigError
    from rgdm.eval.shapes import shape_report

    try:
        rows = shape_report(models, classifier, target, n, out, seed=seed, device=resolve_device_option(device))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    typer.echo(json.dumps(rows, indent=2))
    typer.echo(f"report: {out / 'report.md'} (metrics: {out / 'metrics.json'}, renders: {out / 'samples.png'})")


# ------------------------------------------------------------------------------------------------- #
# `rgdm shapes ...`


@app.command()
def pretrain(
    config: Annotated[Path, typer.Option(help="YAML config with domain: shapes (see configs/shapes_*.yaml).")],
    name: Annotated[str | None, typer.Option(help="Run name (default: the config's name).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run's newest checkpoint.")] = False,
    set_: SetOption = None,
    device: DeviceOption = "auto",
) -> None:
    """Train a point-cloud diffusion model (unconditional or class-conditional); same as `rgdm pretrain`."""
    run_pretrain(config, name, resume, set_, device)


@app.command("train-classifier")
def train_classifier_cmd(
    config: Annotated[Path | None, typer.Option(help="YAML config (e.g. configs/shapes_classifier.yaml).")] = None,
    name: Annotated[str | None, typer.Option(help="Run name (default: shape-classifier).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run's newest checkpoint.")] = False,
    set_: SetOption = None,
    device: DeviceOption = "auto",
) -> None:
    """Train the PointNet shape classifier (the shape_class reward's model); report its test accuracy."""
    resolve_device_option(device)
    from rgdm.cli_runs import claimed_run, run_name
    from rgdm.config import check_run_name, from_dict, load_config, set_dotted, to_dict
    from rgdm.training.classifier import ClassifierConfig, train_classifier

    values = to_dict(load_config(config, ClassifierConfig) if config else ClassifierConfig())
    if name is not None:
        values["name"] = check_run_name(name, "--name")
    for key, value in parse_overrides(set_).items():
        set_dotted(values, key, value)
    cfg = from_dict(ClassifierConfig, values).validate()
    cfg.name = run_name(cfg.name, explicit=name is not None, resume=resume)
    with claimed_run(cfg.name, explicit=name is not None, resume=resume) as run_dir:
        metrics = train_classifier(cfg, run_dir, resume=resume, device=device)
    typer.echo(json.dumps(metrics, indent=2))
    typer.echo(f"checkpoints in {run_dir / 'checkpoints'}; test accuracy in {run_dir / 'test_metrics.json'}")


@app.command()
def finetune(
    base: Annotated[str, typer.Option("--from", help="Pre-trained shape run directory or checkpoint.")],
    method: Annotated[str, typer.Option(help="rgdm or ddpo.")] = "rgdm",
    reward: Annotated[str | None, typer.Option(
        help="shape_class, symmetry or aspect_ratio (default: the config's reward, else shape_class).")] = None,
    classifier: Annotated[str | None, typer.Option(
        help="Classifier run of the shape_class reward (default: runs/shape-classifier).")] = None,
    target: Annotated[str | None, typer.Option(help="Target class (shape_class reward; conditional models).")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML fine-tuning config (overrides the defaults).")] = None,
    name: Annotated[str | None, typer.Option(help="Run name (default: <base>-<method>-<reward>).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run's newest checkpoint.")] = False,
    compare: Annotated[int, typer.Option(min=0, help="Clouds to sample before/after for report.md (0 = none).")]
        = DEFAULT_COMPARE,
    set_: SetOption = None,
    device: DeviceOption = "auto",
) -> None:
    """Steer a pre-trained shape model toward a reward (RGDM or DDPO); same as `rgdm finetune`."""
    run_finetune(base, method, reward, classifier, target, config, name, resume, compare, set_, device)


@app.command()
def evaluate(
    model: Annotated[list[str], typer.Argument(help="Shape model run directories or checkpoints.")],
    classifier: Annotated[str | None, typer.Option(
        help="Classifier run (default: the fine-tuning reward's, else runs/shape-classifier).")] = None,
    target: Annotated[str | None, typer.Option(help="Target class (default: the fine-tuning target).")] = None,
    n: Annotated[int, typer.Option(min=1, help="Clouds to sample per model.")] = DEFAULT_COMPARE,
    seed: Annotated[int, typer.Option()] = 0,
    out: Annotated[Path | None, typer.Option(help="Report directory (default: <first run>/eval).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing report.")] = False,
    device: DeviceOption = "auto",
) -> None:
    """Sample each model; fraction classified as TARGET and MMD/COV/1-NNA; same as `rgdm evaluate`."""
    run_evaluate(model, classifier, target, n, out, seed, overwrite=overwrite, device=device)
