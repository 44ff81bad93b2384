"""The ``rgdm`` command line: thin wrappers around library functions.

Every command reports user errors (bad config, missing file, incompatible checkpoint) as one line
on stderr with exit code 2, never as a traceback.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
import yaml

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="rgdm: equivariant diffusion models of molecules, steered by black-box rewards.")

RUNS_DIR = Path("runs")


def _add_shapes_commands() -> None:
    from rgdm.cli_shapes import app as shapes_app

    app.add_typer(shapes_app, name="shapes")


_add_shapes_commands()
from rgdm.cli_benchmark import app as benchmark_app  # noqa: E402 - `rgdm benchmark ...` (light imports only)

app.add_typer(benchmark_app, name="benchmark")

SetOption = Annotated[list[str] | None, typer.Option(
    "--set", help="Override a config value, e.g. --set train.steps=100 (repeatable).")]


def _user_errors() -> tuple[type[BaseException], ...]:
    from rgdm.config import ConfigError
    from rgdm.data.dataset import DataError
    from rgdm.rewards import RewardConfigError
    from rgdm.training.checkpoint import CheckpointError
    from rgdm.training.pretrain import RunExistsError

    return ConfigError, DataError, CheckpointError, RunExistsError, RewardConfigError, FileNotFoundError


def _overrides(pairs: list[str] | None) -> dict[str, object]:
    from rgdm.config import ConfigError

    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(f"--set {pair}: expected key=value")
        key, value = pair.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


@app.command()
def pretrain(
    config: Annotated[Path, typer.Option(help="YAML config (see configs/).")],
    name: Annotated[str | None, typer.Option(help="Run name (default: the config's name).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run's newest checkpoint bit-for-bit.")] = False,
    set_: SetOption = None,
    sample: Annotated[int, typer.Option(help="Molecules to sample and evaluate at the end (0 = none).")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda (bfloat16 autocast on CUDA).")] = "auto",
    compile_: Annotated[bool, typer.Option("--compile", help="Compile the network with torch.compile.")] = False,
) -> None:
    """Train a molecule diffusion model by maximum likelihood (EDM's loss).

    Data-parallel: torchrun --nproc_per_node N -m rgdm pretrain --config ... (docs/scaling.md).
    """
    from rgdm.cli_shapes import is_shapes_config
    from rgdm.cli_shapes import run_pretrain as run_shapes_pretrain

    if is_shapes_config(config):  # a point-cloud model (configs/shapes_*.yaml)
        run_shapes_pretrain(config, name, resume, set_)
        return
    from rgdm import distributed
    from rgdm.config import load_config
    from rgdm.eval.sampling import sample_and_evaluate
    from rgdm.training.pretrain import pretrain as run_pretrain

    overrides = _overrides(set_)
    if name:
        overrides["name"] = name
    cfg = load_config(config, overrides=overrides)
    run_dir = RUNS_DIR / cfg.name
    try:
        trainer = run_pretrain(cfg, run_dir, resume=resume, device=device, compile_model=compile_)
        main = distributed.is_main()
    finally:
        distributed.shutdown()
    if not main:
        return
    typer.echo(f"checkpoints in {run_dir / 'checkpoints'}")
    if sample:
        metrics = sample_and_evaluate(trainer.sampling_model, sample, run_dir / "samples", seed=cfg.train.seed)
        typer.echo(json.dumps(metrics, indent=2))


@app.command("sample")
def sample_cmd(
    model: Annotated[str, typer.Argument(help="Run directory, checkpoint file, or shipped model name.")],
    n: Annotated[int, typer.Option(help="Number of molecules.")] = 100,
    out: Annotated[Path | None, typer.Option(help="Output .xyz (default: <run>/samples/samples.xyz).")] = None,
    steps: Annotated[int | None, typer.Option(help="Sampling steps (fewer than T: DDIM).")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    batch_size: Annotated[int, typer.Option()] = 100,
) -> None:
    """Sample molecules and write them as .xyz and .sdf (EDM-perceived bonds)."""
    from rgdm.data.readers import write_xyz
    from rgdm.eval.sampling import molecule_list, sample_in_chunks
    from rgdm.runs import load_model

    loaded = load_model(model)
    out = out or _default_dir(model, loaded) / "samples.xyz"
    out.parent.mkdir(parents=True, exist_ok=True)
    molecules = molecule_list(sample_in_chunks(loaded.model, n, batch_size, steps, seed))
    write_xyz(out, molecules)
    _write_sdf(out.with_suffix(".sdf"), molecules)
    typer.echo(f"wrote {len(molecules)} molecules to {out} and {out.with_suffix('.sdf')}")


@app.command()
def evaluate(
    model: Annotated[list[str], typer.Argument(
        help="Run directory, checkpoint, shipped model name, or an .xyz/.sdf file; several shape models "
             "are compared in one report.")],
    n: Annotated[int | None, typer.Option(help="Samples per model (default: 1000 molecules, 40 shapes).")] = None,
    steps: Annotated[int | None, typer.Option(help="Sampling steps (fewer than T: DDIM); molecule models.")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    novelty: Annotated[bool, typer.Option(help="Compare against QM9 training SMILES (molecules).")] = True,
    classifier: Annotated[str | None, typer.Option(
        help="Shape models: classifier run (default: the fine-tuning reward's, else runs/shape-classifier).")] = None,
    target: Annotated[str | None, typer.Option(
        help="Shape models: target class (default: the class the model was fine-tuned toward).")] = None,
    out: Annotated[Path | None, typer.Option(
        help="Metrics JSON path (shape models: report directory, default <run>/eval).")] = None,
) -> None:
    """EDM's metrics (atom/molecule stability, validity, uniqueness, novelty) of samples or files.

    Shape models: share classified as TARGET, MMD/COV/1-NNA (report.md, metrics.json, samples.png).
    """
    from rgdm.cli_shapes import is_shape_model
    from rgdm.cli_shapes import run_evaluate as run_shapes_evaluate
    from rgdm.config import ConfigError
    from rgdm.runs import resolve_checkpoint

    shapes = [is_shape_model(m) for m in model]
    if any(shapes):
        if not all(shapes):
            other = model[shapes.index(False)]
            if not Path(other).is_file():
                resolve_checkpoint(other)  # a model that does not exist is the real problem: report that first
            raise ConfigError(f"{other}: not a shape model; evaluate shape and molecule models separately")
        if steps is not None:
            raise ConfigError("--steps: shape models sample with their config's diffusion.sampling_steps")
        run_shapes_evaluate(model, classifier, target, n, out, seed)
        return
    if len(model) > 1:
        raise ConfigError("evaluate: give one molecule model or file (several models are compared only for shapes)")
    for option, value in (("--classifier", classifier), ("--target", target)):
        if value is not None:
            raise ConfigError(f"{option}: only for shape models; {model[0]} is not one")
    _evaluate_molecules(model[0], 1000 if n is None else n, steps, seed, novelty, out)


def _evaluate_molecules(model: str, n: int, steps: int | None, seed: int, novelty: bool, out: Path | None) -> None:
    from rgdm.eval.molecules import evaluate_molecules
    from rgdm.eval.sampling import qm9_training_smiles, sample_and_evaluate

    training = qm9_training_smiles() if novelty else None
    path = Path(model)
    if path.is_file() and path.suffix.lower() in (".xyz", ".sdf"):
        from rgdm.data.readers import read_sdf, read_xyz

        molecules = read_xyz(path) if path.suffix.lower() == ".xyz" else read_sdf(path)
        metrics = evaluate_molecules(molecules, training)
        out = out or path.with_name(path.stem + "_metrics.json")
    else:
        from rgdm.runs import load_model

        loaded = load_model(model)
        out_dir = _default_dir(model, loaded) / "samples"
        metrics = sample_and_evaluate(loaded.model, n, out_dir, tag=f"eval_n{n}", num_steps=steps, seed=seed,
                                      training_smiles=training)
        out = out or out_dir / f"eval_n{n}_metrics.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=2))
    typer.echo(json.dumps(metrics, indent=2))
    typer.echo(f"metrics written to {out}")


@app.command()
def finetune(
    base: Annotated[str, typer.Option("--from", help="Pre-trained run directory, checkpoint or shipped model.")],
    method: Annotated[str, typer.Option(
        help="rgdm, or the baselines ddpo, ppo (PPO-clip as in RLPF) and rwr (shape models: rgdm or ddpo).")] = "rgdm",
    reward: Annotated[str | None, typer.Option(
        help="Reward name (see `rgdm rewards`; shape models: shape_class (default), symmetry, aspect_ratio).")] = None,
    target: Annotated[str | None, typer.Option(
        help="Molecules: a number, reward = -|property - target| / scale. Shape models: a class name.")] = None,
    scale: Annotated[float | None, typer.Option(
        help="Scale of the target-matching reward (molecules; default 1).")] = None,
    classifier: Annotated[str | None, typer.Option(
        help="Shape models: classifier run of the shape_class reward (default: runs/shape-classifier).")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML fine-tuning config (overrides the defaults).")] = None,
    name: Annotated[str | None, typer.Option(help="Run name (default: <base>-<method>-<reward>).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run's newest checkpoint bit-for-bit.")] = False,
    compare: Annotated[int | None, typer.Option(
        help="Samples before/after for report.md (default: 200 molecules, 40 shapes; 0 = none).")] = None,
    set_: SetOption = None,
) -> None:
    """Steer a pre-trained model toward a reward during training (RGDM, or the DDPO / RWR baselines).

    Under ``torchrun --nproc_per_node N -m rgdm finetune ...`` the roll-outs are split over N processes.
    """
    from rgdm.cli_shapes import is_shape_model
    from rgdm.cli_shapes import run_finetune as run_shapes_finetune
    from rgdm.config import ConfigError, FinetuneConfig, from_dict, load_config, set_dotted, to_dict

    if is_shape_model(base):  # a point-cloud model: --target is a class name
        if scale is not None:
            raise ConfigError("--scale: only for molecule property targets; a shape model's --target is a class")
        run_shapes_finetune(base, method, reward, classifier, target, config, name, resume, compare, set_)
        return
    if classifier is not None:
        raise ConfigError(f"--classifier: only for shape models; {base} is not one")
    number = _property_target(base, target)
    values = to_dict(load_config(config, FinetuneConfig, {"base": base})) if config else to_dict(FinetuneConfig())
    values["base"], values["method"] = base, method
    if reward:
        values["reward"] = {"name": reward, "backend": _reward_backend(reward), **_heavy_atom_options(base, reward)}
    if number is not None:
        values["reward"].update({"target": number, "scale": 1.0 if scale is None else scale})
        values["target"] = number
    for key, value in _overrides(set_).items():
        set_dotted(values, key, value)
    values["name"] = name or f"{Path(base).name}-{method}-{values['reward']['name']}"
    cfg = from_dict(FinetuneConfig, values).validate()
    _run_finetune(cfg, resume, 200 if compare is None else compare, " ".join(["rgdm", *sys.argv[1:]]))


def _property_target(base: str, target: str | None) -> float | None:
    """A molecule model's --target as a number; a one-line error for anything else (e.g. a class name)."""
    from rgdm.config import ConfigError
    from rgdm.runs import resolve_checkpoint

    if target is None:
        return None
    try:
        return float(target)
    except ValueError:
        resolve_checkpoint(base)  # a base that does not exist is the real problem: report that first
        raise ConfigError(f"--target {target!r}: a molecule model needs a number (a property value, e.g. "
                          f"--target 4.5); class names are targets of shape models") from None


def _reward_backend(reward: str) -> str:
    """Worker processes for the rewards that must not run beside torch (xTB), the training process otherwise."""
    from rgdm.rewards.registry import reward_spec

    try:
        return "process" if reward_spec(reward).worker_only else "inline"
    except KeyError:  # an unknown name: make_reward reports it, with a suggestion
        return "inline"


# Rewards that perceive bonds with RDKit's DetermineBonds (which needs explicit hydrogens) or run xTB.
_RDKIT_BOND_REWARDS = ("qed", "sa_score", "logp", "ring_constraint")


def _heavy_atom_options(base: str, reward: str) -> dict[str, object]:
    """Reward options a model without hydrogens needs; announced, and overridable with --set."""
    from rgdm.runs import resolve_checkpoint
    from rgdm.training.checkpoint import load_checkpoint

    elements = load_checkpoint(resolve_checkpoint(base)).get("model_spec", {}).get("elements", [])
    if "H" in elements:
        return {}
    options: dict[str, object] = {}
    if reward in _RDKIT_BOND_REWARDS:
        options = {"method": "edm"}  # EDM's bond rules; sanitising adds the implicit hydrogens
    elif reward.startswith("xtb_"):
        options = {"add_hydrogens": True}  # xTB on a bare skeleton would describe a radical
    if options:
        typer.echo(f"the model has no hydrogens: reward options {options} (override with --set reward.KEY=...)")
    return options


def _run_finetune(cfg, resume: bool, compare: int, command: str) -> None:
    from rgdm import distributed
    from rgdm.eval.compare import markdown_table
    from rgdm.training.finetune import finetune_and_report

    run_dir = RUNS_DIR / cfg.name
    try:
        summaries = finetune_and_report(cfg, run_dir, resume=resume, compare=compare, command=command)
        main = distributed.is_main()
    finally:
        distributed.shutdown()
    if not main:  # under torchrun, rank 0 reports
        return
    typer.echo(f"fine-tuned model in {run_dir / 'checkpoints'}")
    if summaries:
        typer.echo(markdown_table(summaries))
        typer.echo(f"report: {run_dir / 'report.md'}")


@app.command("train-regressor")
def train_regressor_cmd(
    property_: Annotated[str | None, typer.Option("--property", help="alpha, gap, homo, lumo, mu or Cv.")] = None,
    split: Annotated[str | None, typer.Option(help="Training molecules: Da (evaluators), Db (rewards), train.")] = None,
    remove_h: Annotated[bool | None, typer.Option("--remove-h/--keep-h",
                                                  help="Heavy atoms only (default: keep hydrogens).")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML config, e.g. configs/regressor_cpu.yaml.")] = None,
    name: Annotated[str | None, typer.Option(help="Run name (default: regressor-<property>-<split>[-noH]).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run's newest checkpoint.")] = False,
    set_: SetOption = None,
) -> None:
    """Train an EGNN property regressor on QM9 (EDM's evaluator; a learned reward); report its test MAE."""
    from rgdm.config import from_dict, load_config, set_dotted, to_dict
    from rgdm.training.regression import RegressorConfig, default_run_name, train_regressor

    values = to_dict(load_config(config, RegressorConfig) if config else RegressorConfig())
    for key, value in (("property", property_), ("split", split), ("remove_h", remove_h)):
        if value is not None:
            values["data"][key] = value
    data = values["data"]
    values["name"] = name or default_run_name(data["property"], data["split"], data["remove_h"])
    for key, value in _overrides(set_).items():
        set_dotted(values, key, value)
    cfg = from_dict(RegressorConfig, values).validate()
    run_dir = RUNS_DIR / cfg.name
    result = train_regressor(cfg, run_dir, resume=resume)
    typer.echo(json.dumps(result.test_metrics, indent=2))
    typer.echo(f"checkpoints in {run_dir / 'checkpoints'}; test metrics in {run_dir / 'test_metrics.json'}")


@app.command()
def demo(
    name: Annotated[str, typer.Option(help="Run name under runs/.")] = "demo",
    resume: Annotated[bool, typer.Option(help="Continue an interrupted demo.")] = False,
    set_: SetOption = None,
) -> None:
    """Fine-tune the shipped QM9 model toward an xTB HOMO-LUMO gap target with RGDM; write a report."""
    from rgdm.config import FinetuneConfig, from_dict, set_dotted, to_dict
    from rgdm.demo import demo_config

    values = to_dict(demo_config(name))
    for key, value in _overrides(set_).items():
        set_dotted(values, key, value)
    cfg = from_dict(FinetuneConfig, values).validate()
    _run_finetune(cfg, resume, 200, "rgdm demo")


@app.command()
def rewards() -> None:
    """List the rewards available by name."""
    from rgdm.rewards import available_rewards

    for name in available_rewards():
        typer.echo(name)


def _default_dir(model: str, loaded) -> Path:
    path = Path(model)
    if path.is_dir():
        return path
    if path.is_file():
        return path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return RUNS_DIR / f"pretrained-{model}"


def _write_sdf(path: Path, molecules) -> None:
    from rdkit import Chem

    from rgdm.eval.bonds import build_rdkit_mol

    writer = Chem.SDWriter(str(path))
    writer.SetKekulize(False)
    for symbols, positions in molecules:
        mol = build_rdkit_mol(symbols, positions, method="edm")
        if mol is not None:
            writer.write(mol)
    writer.close()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        app(args=argv, standalone_mode=False)
    except _user_errors() as err:
        typer.echo(f"error: {err}", err=True)
        return 2
    except typer.Exit as exit_:
        return exit_.exit_code
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("aborted", err=True)
        return 130
    except Exception as err:  # click usage errors carry their own exit code
        import click

        if isinstance(err, click.ClickException):
            err.show()
            return err.exit_code
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
