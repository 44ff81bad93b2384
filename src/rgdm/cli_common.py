"""What every ``rgdm`` command module shares: the ``--set`` and ``--overwrite`` options and small checks.

It imports nothing of the other command modules, so ``rgdm.cli``, ``rgdm.cli_shapes`` and the
domain modules can all use it without importing each other.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from rgdm.cli_runs import RUNS_DIR

SetOption = Annotated[list[str] | None, typer.Option(
    "--set", help="Override a config value, e.g. --set train.steps=100 (repeatable).")]

OverwriteOption = Annotated[bool, typer.Option(help="Replace output files that already exist.")]


def parse_overrides(pairs: list[str] | None) -> dict[str, object]:
    """``--set key=value`` pairs as ``{key: value}``, each value read as YAML (``5`` is an int)."""
    from rgdm.config import ConfigError

    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(f"--set {pair}: expected key=value")
        key, value = pair.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def checked_name(name: str) -> str:
    """A ``--name`` that is usable as one directory under runs/; else a one-line ConfigError."""
    from rgdm.config import check_run_name

    return check_run_name(name, "--name")


def refuse_to_overwrite(paths: list[Path], overwrite: bool) -> None:
    """A one-line error naming the first of ``paths`` that exists, unless ``--overwrite`` was given."""
    from rgdm.config import ConfigError

    existing = [path for path in paths if path.exists()]
    if existing and not overwrite:
        raise ConfigError(f"{existing[0]} exists; pass --overwrite to replace it, or choose another --out")


@contextlib.contextmanager
def claim_and_echo(config: Any, name: str | None, resume: bool) -> Iterator[Path]:
    """Claim ``runs/<config.name>`` for a training command (a fresh name unless ``--name`` or
    ``--resume`` says otherwise), yield it, then say where the checkpoints are."""
    from rgdm.cli_runs import claimed_run, run_name

    if name is not None:
        checked_name(name)
    config.name = run_name(config.name, explicit=name is not None, resume=resume)
    with claimed_run(config.name, explicit=name is not None, resume=resume) as run_dir:
        yield run_dir
    typer.echo(f"checkpoints in {run_dir / 'checkpoints'}")


def run_dir_of(source: str | Path) -> Path:
    """The run directory a model source belongs to (a checkpoint sits in ``<run>/checkpoints/``)."""
    path = Path(source)
    if path.is_dir():
        return path
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def default_dir(model: str) -> Path:
    """Where a command writes for ``model``: its run directory, or runs/pretrained-<name> for a shipped model."""
    path = Path(model)
    if path.is_dir() or path.is_file():
        return run_dir_of(path)
    return RUNS_DIR / f"pretrained-{model}"


def write_text_atomically(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file next to ``path``, then rename: a full disk never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


DeviceOption = Annotated[str, typer.Option(
    help="auto, cpu or cuda (auto: cuda when a GPU is available). On CUDA the network runs in bfloat16.")]


def resolve_device_option(name: str):
    """``--device`` as a torch device (``rgdm.distributed.resolve_device``): an unknown name, or cuda
    on a machine without a GPU, is a one-line ConfigError (exit code 2)."""
    from rgdm import distributed

    return distributed.resolve_device(name)


# ------------------------------------------------------------------------------------------------- #
# The options of the commands that dispatch on the domain (``rgdm pretrain | finetune | evaluate``):
# ``rgdm.cli`` parses them once and hands them to the domain's command (``Domain.*_command``), which
# refuses, in one line, the options it has no use for.


@dataclass
class PretrainRequest:
    config: Path
    name: str | None = None
    resume: bool = False
    set_: list[str] | None = None
    sample: int = 0
    device: str = "auto"
    compile_: bool = False


@dataclass
class FinetuneRequest:
    base: str
    method: str = "rgdm"
    reward: str | None = None
    target: str | None = None
    scale: float | None = None
    classifier: str | None = None
    config: Path | None = None
    name: str | None = None
    resume: bool = False
    compare: int | None = None
    device: str = "auto"
    set_: list[str] | None = None


@dataclass
class EvaluateRequest:
    models: list[str]
    n: int | None = None
    steps: int | None = None
    seed: int = 0
    novelty: bool = True
    classifier: str | None = None
    target: str | None = None
    out: Path | None = None
    overwrite: bool = False
    posebusters: bool = True
    device: str = "auto"
