"""The ``rgdm`` command line: thin wrappers around library functions.

Every command reports user errors (bad config, missing file, incompatible checkpoint, bad option)
as one line on stderr with exit code 2, never as a traceback. Ctrl-C exits with 130 and says how to
resume the run; an unexpected failure is one line and exit code 1 (``RGDM_DEBUG=1`` shows the
traceback). Output files are never overwritten without ``--overwrite``.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from rgdm import cli_runs
from rgdm.cli_common import (
    DeviceOption,
    OverwriteOption,
    SetOption,
    checked_name,
    default_dir,
    parse_overrides,
    refuse_to_overwrite,
    resolve_device_option,
)
from rgdm.cli_runs import claimed_run, run_name

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="rgdm: equivariant diffusion models of molecules, steered by black-box rewards.")


def _add_shapes_commands() -> None:
    from rgdm.cli_shapes import app as shapes_app

    app.add_typer(shapes_app, name="shapes")


_add_shapes_commands()
from rgdm.cli_benchmark import app as benchmark_app  # noqa: E402 - `rgdm benchmark ...` (light imports only)

app.add_typer(benchmark_app, name="benchmark")

def _user_errors() -> tuple[type[BaseException], ...]:
    from rgdm.config import ConfigError
    from rgdm.data.dataset import DataError
    from rgdm.rewards import RewardConfigError
    from rgdm.rewards.scoring import RewardSetupError
    from rgdm.runs import RunLockedError
    from rgdm.training.checkpoint import CheckpointError
    from rgdm.training.pretrain import RunExistsError

    return (ConfigError, DataError, CheckpointError, RunExistsError, RunLockedError, RewardConfigError,
            RewardSetupError)


@app.command()
def pretrain(
    config: Annotated[Path, typer.Option(help="YAML config (see configs/).")],
    name: Annotated[str | None, typer.Option(
        help="Run name (default: the config's name, with -2, -3, ... when that run exists).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run's newest checkpoint bit-for-bit.")] = False,
    set_: SetOption = None,
    sample: Annotated[int, typer.Option(min=0, help="Molecules to sample and evaluate at the end (0 = none).")] = 0,
    device: DeviceOption = "auto",
    compile_: Annotated[bool, typer.Option("--compile", help="Compile the network with torch.compile.")] = False,
) -> None:
    """Train a molecule diffusion model by maximum likelihood (EDM's loss).

    Data-parallel: torchrun --nproc_per_node N -m rgdm pretrain --config ... (docs/scaling.md).
    """
    from rgdm.cli_common import PretrainRequest
    from rgdm.domains import domain_of_config_file

    resolve_device_option(device)
    request = PretrainRequest(config, name, resume, set_, sample, device, compile_)
    domain_of_config_file(config).pretrain_command(request)  # molecules, or `domain: shapes`, ...


@app.command("sample")
def sample_cmd(
    model: Annotated[str, typer.Argument(help="Run directory, checkpoint file, or shipped model name.")],
    n: Annotated[int, typer.Option(min=1, help="Number of molecules.")] = 100,
    out: Annotated[Path | None, typer.Option(
        help="Output .xyz; the .sdf goes next to it (default: <run>/samples/samples.xyz; shipped models: "
             "runs/pretrained-<name>/samples/samples.xyz).")] = None,
    steps: Annotated[int | None, typer.Option(min=1, help="Sampling steps (fewer than T: DDIM).")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    batch_size: Annotated[int, typer.Option(min=1)] = 100,
    overwrite: OverwriteOption = False,
    device: DeviceOption = "auto",
) -> None:
    """Sample molecules and write them as .xyz and .sdf (EDM-perceived bonds)."""
    from rgdm.cli_molecules import write_sdf
    from rgdm.config import ConfigError
    from rgdm.data.readers import write_xyz
    from rgdm.eval.sampling import molecule_list, sample_in_chunks
    from rgdm.runs import load_model

    torch_device = resolve_device_option(device)
    if out is not None and out.suffix.lower() != ".xyz":
        raise ConfigError(f"--out {out}: give a .xyz path (the .sdf is written next to it)")
    loaded = load_model(model, device=torch_device)
    out = out or default_dir(model) / "samples" / "samples.xyz"
    sdf = out.with_suffix(".sdf")
    refuse_to_overwrite([out, sdf], overwrite)
    molecules = molecule_list(sample_in_chunks(loaded.model, n, batch_size, steps, seed))
    out.parent.mkdir(parents=True, exist_ok=True)
    write_xyz(out, molecules)
    write_sdf(sdf, molecules)
    typer.echo(f"wrote {len(molecules)} molecules to {out} and {sdf}")


@app.command()
def evaluate(
    model: Annotated[list[str], typer.Argument(
        help="Run directory, checkpoint, shipped model name, or an .xyz/.sdf file; several shape models "
             "are compared in one report.")],
    n: Annotated[int | None, typer.Option(
        min=1, help="Samples per model (default: 1000 molecules, 40 shapes).")] = None,
    steps: Annotated[int | None, typer.Option(
        min=1, help="Sampling steps (fewer than T: DDIM); molecule models.")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    novelty: Annotated[bool, typer.Option(help="Compare against QM9 training SMILES (molecules).")] = True,
    classifier: Annotated[str | None, typer.Option(
        help="Shape models: classifier run (default: the fine-tuning reward's, else runs/shape-classifier).")] = None,
    target: Annotated[str | None, typer.Option(
        help="Shape models: target class (default: the class the model was fine-tuned toward).")] = None,
    out: Annotated[Path | None, typer.Option(
        help="Metrics JSON path (default: <file>_metrics.json, or <run>/samples/eval_n<N>_metrics.json; "
             "shape models: report directory, default <run>/eval).")] = None,
    overwrite: OverwriteOption = False,
    posebusters: Annotated[bool, typer.Option(
        help="Molecules: run the PoseBusters checks of the strict row (about 0.1-0.5 s per valid molecule).")] = True,
    device: DeviceOption = "auto",
) -> None:
    """EDM's metrics (atom/molecule stability, validity, uniqueness, novelty) of samples or files, and the
    strict row beside them (connected validity, PoseBusters-valid, stability only with hydrogens).

    Shape models: share classified as TARGET, MMD/COV/1-NNA (report.md, metrics.json, samples.png).
    """
    from rgdm.cli_common import EvaluateRequest

    resolve_device_option(device)
    domain = _one_domain(model)
    domain.evaluate_command(EvaluateRequest(model, n, steps, seed, novelty, classifier, target, out, overwrite,
                                            posebusters, device))


def _one_domain(models: list[str]):
    """The domain of every model; models of different domains are refused (a missing model first)."""
    from rgdm.config import ConfigError
    from rgdm.domains import DEFAULT_DOMAIN, domain_of_model
    from rgdm.runs import resolve_checkpoint

    domains = [domain_of_model(m) for m in models]
    # A path that is not a model of another domain counts as a molecule model: the other domain decides.
    domain = next((d for d in domains if d.name != DEFAULT_DOMAIN), domains[0])
    for other, other_domain in zip(models, domains):
        if other_domain is not domain:
            if not Path(other).is_file():
                resolve_checkpoint(other)  # a model that does not exist is the real problem: report that first
            raise ConfigError(f"{other}: not a {domain.noun} model; evaluate {domain.noun} and "
                              f"{other_domain.noun} models separately")
    return domain


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
    name: Annotated[str | None, typer.Option(
        help="Run name (default: <base>-<method>-<reward>, with -2, -3, ... when that run exists).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run's newest checkpoint bit-for-bit.")] = False,
    compare: Annotated[int | None, typer.Option(
        min=0, help="Samples before/after for report.md, drawn with the same sampler for every method "
                    "(default: 200 molecules, 40 shapes; 0 = none).")] = None,
    device: Annotated[str, typer.Option(
        help="auto, cpu or cuda (auto: cuda when a GPU is available). The model, roll-outs and their random "
             "generators run there, the network in bfloat16 on CUDA; rewards always run on the CPU.")] = "auto",
    set_: SetOption = None,
) -> None:
    """Steer a pre-trained model toward a reward during training (RGDM, or the DDPO / RWR baselines).

    Under ``torchrun --nproc_per_node N -m rgdm finetune ...`` the roll-outs are split over N processes.
    """
    from rgdm.cli_common import FinetuneRequest
    from rgdm.domains import domain_of_model

    resolve_device_option(device)
    if name is not None:
        checked_name(name)
    request = FinetuneRequest(base, method, reward, target, scale, classifier, config, name, resume, compare,
                              device, set_)
    domain_of_model(base).finetune_command(request)  # e.g. for a shape model --target is a class name


@app.command("train-regressor")
def train_regressor_cmd(
    property_: Annotated[str | None, typer.Option("--property", help="alpha, gap, homo, lumo, mu or Cv.")] = None,
    split: Annotated[str | None, typer.Option(help="Training molecules: Da (evaluators), Db (rewards), train.")] = None,
    remove_h: Annotated[bool | None, typer.Option("--remove-h/--keep-h",
                                                  help="Heavy atoms only (default: keep hydrogens).")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML config, e.g. configs/regressor_cpu.yaml.")] = None,
    name: Annotated[str | None, typer.Option(
        help="Run name (default: regressor-<property>-<split>[-noH], with -2, -3, ... when that run exists).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run's newest checkpoint.")] = False,
    set_: SetOption = None,
    device: DeviceOption = "auto",
) -> None:
    """Train an EGNN property regressor on QM9 (EDM's evaluator; a learned reward); report its test MAE."""
    resolve_device_option(device)
    from rgdm.config import from_dict, load_config, set_dotted, to_dict
    from rgdm.training.regression import RegressorConfig, default_run_name, train_regressor

    values = to_dict(load_config(config, RegressorConfig) if config else RegressorConfig())
    for key, value in (("property", property_), ("split", split), ("remove_h", remove_h)):
        if value is not None:
            values["data"][key] = value
    data = values["data"]
    values["name"] = checked_name(name) if name is not None else default_run_name(
        data["property"], data["split"], data["remove_h"])
    for key, value in parse_overrides(set_).items():
        set_dotted(values, key, value)
    cfg = from_dict(RegressorConfig, values).validate()
    cfg.name = run_name(cfg.name, explicit=name is not None, resume=resume)
    with claimed_run(cfg.name, explicit=name is not None, resume=resume) as run_dir:
        result = train_regressor(cfg, run_dir, resume=resume, device=device)
    typer.echo(json.dumps(result.test_metrics, indent=2))
    typer.echo(f"checkpoints in {run_dir / 'checkpoints'}; test metrics in {run_dir / 'test_metrics.json'}")


@app.command()
def demo(
    name: Annotated[str | None, typer.Option(
        help="Run name under runs/ (default: demo, with -2, -3, ... when that run exists).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted demo.")] = False,
    set_: SetOption = None,
    device: DeviceOption = "auto",
) -> None:
    """Fine-tune the shipped QM9 model toward an xTB HOMO-LUMO gap target with RGDM; write a report."""
    resolve_device_option(device)
    from rgdm.cli_molecules import run_finetune
    from rgdm.config import FinetuneConfig, from_dict, set_dotted, to_dict
    from rgdm.demo import demo_config

    values = to_dict(demo_config(checked_name(name) if name is not None else "demo"))
    for key, value in parse_overrides(set_).items():
        set_dotted(values, key, value)
    cfg = from_dict(FinetuneConfig, values).validate()
    cfg.name = run_name(cfg.name, explicit=name is not None, resume=resume)
    run_finetune(cfg, resume, 200, explicit_name=name is not None, device=device)


@app.command()
def rewards() -> None:
    """List the rewards available by name: what each scores, its units, and the options it needs."""
    for line in reward_lines():
        typer.echo(line)


def reward_lines() -> list[str]:
    """One line per registered reward: ``name  description [units] (required: ...)``."""
    import inspect

    from rgdm.rewards import available_rewards
    from rgdm.rewards.registry import reward_spec

    lines = []
    names = available_rewards()
    width = max(map(len, names), default=0)
    for name in names:
        spec = reward_spec(name)
        summary = (spec.description.splitlines() or ["(no description)"])[0].rstrip(".").replace("``", "")
        units = f" [{spec.units}]" if spec.units else ""
        required = [p.name for p in inspect.signature(spec.factory).parameters.values()
                    if p.default is inspect.Parameter.empty
                    and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
        needs = f" (required: {', '.join(required)})" if required else ""
        lines.append(f"{name:<{width}}  {summary}{units}{needs}")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 failure, 2 bad input, 130 interrupted)."""
    from typer._click.exceptions import NoArgsIsHelpError  # typer vendors click as typer._click

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = sys.argv[1:] if argv is None else list(argv)
    cli_runs.invocation, cli_runs.resume_command = args, None
    try:
        code = app(args=args, standalone_mode=False)
    except NoArgsIsHelpError as err:  # `rgdm` alone, or a group without a command: show the help
        err.show()
        return err.exit_code
    except typer.TyperException as err:  # usage errors: unknown option, bad value, missing argument
        _error(_usage_message(err))
        return 2
    except _user_errors() as err:
        _error(str(err))
        return 2
    except OSError as err:  # a full disk, a read-only directory, a missing file
        _error(_os_error_message(err))
        return 2
    except typer.Exit as exit_:
        return exit_.exit_code
    except (typer.Abort, KeyboardInterrupt):
        return _interrupted()
    except FloatingPointError as err:  # training diverged (the loop's non-finite loss check)
        _error(str(err))
        return 1
    except Exception as err:
        if os.environ.get("RGDM_DEBUG"):
            raise
        _error(f"unexpected {type(err).__name__}: {_first_line(err)} (RGDM_DEBUG=1 shows the traceback)")
        return 1
    if code == 130:  # typer turns Ctrl-C inside a command into exit code 130
        return _interrupted()
    return code if isinstance(code, int) and not isinstance(code, bool) else 0


def _error(message: str) -> None:
    typer.echo(f"error: {message}", err=True)


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else ""


def _usage_message(err: typer.TyperException) -> str:
    """Click's usage error as one line, pointing at the command's --help."""
    lines = err.format_message().strip().splitlines()
    message = lines[0] if lines else type(err).__name__
    context = getattr(err, "ctx", None)
    where = f" (see: {context.command_path} --help)" if context is not None else ""
    return f"{message}{where}"


def _os_error_message(err: OSError) -> str:
    reason = "no space left on device" if err.errno == errno.ENOSPC else (err.strerror or str(err))
    return f"{err.filename}: {reason}" if err.filename else reason


def _interrupted() -> int:
    """Ctrl-C: the last checkpoint is intact (writes are atomic); say how to continue."""
    if cli_runs.resume_command:
        typer.echo(f"interrupted; resume with: {cli_runs.resume_command}", err=True)
    else:
        typer.echo("interrupted", err=True)
    return 130


if __name__ == "__main__":
    sys.exit(main())
