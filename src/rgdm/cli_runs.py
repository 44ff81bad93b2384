"""Run directories as the command line hands them out: a valid name, a fresh one by default, one writer.

``claimed_run(name, explicit, resume)`` is what every training command wraps its work in:

- a name given with ``--name`` is checked (one directory under ``runs/``: no separators, not ``..``)
  and must not hold a run already unless ``--resume`` is given;
- a default name (the config's, or ``<base>-<method>-<reward>``) that is taken becomes ``<name>-2``,
  ``<name>-3``, ... so that repeating a command starts a new run instead of failing; with
  ``--resume`` it means the newest of those;
- ``runs/<name>/.lock`` is held until the command ends, so a second process refuses to write the
  same run;
- the command that resumes the run is remembered, for the message after Ctrl-C.

Under ``torchrun`` every process runs the command: they all use the name as given (no counter, so
they agree) and only rank 0 takes the lock.
"""

from __future__ import annotations

import contextlib
import os
import shlex
from collections.abc import Iterator
from pathlib import Path

from rgdm.config import ConfigError, check_run_name

RUNS_DIR = Path("runs")

# The command that continues the run being trained (set by ``claimed_run``), for the Ctrl-C message.
resume_command: str | None = None
# The arguments of the current ``rgdm`` invocation (set by ``rgdm.cli.main``).
invocation: list[str] = []


class RunInUseError(ConfigError):
    """``--name`` names a run that already exists (and ``--resume`` was not given)."""


def _launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def run_name(name: str, explicit: bool, resume: bool) -> str:
    """The run name a command uses: ``name`` itself, or a fresh/newest ``name-N`` for a default name."""
    from rgdm.runs import fresh_run_name, newest_run_name

    check_run_name(name, "--name" if explicit else "name")
    if explicit or _launched_by_torchrun():
        return name
    return newest_run_name(RUNS_DIR, name) if resume else fresh_run_name(RUNS_DIR, name)


@contextlib.contextmanager
def claimed_run(name: str, explicit: bool, resume: bool) -> Iterator[Path]:
    """``runs/<name>`` (see the module docstring), locked while the block runs.

    Call it with the final name (``run_name``), after the config has been validated. A directory
    this call creates is removed again if the block fails before writing anything into it, so bad
    input leaves no empty run behind.
    """
    global resume_command
    from rgdm.runs import run_lock

    run_dir = RUNS_DIR / name
    name_is_fixed = explicit or _launched_by_torchrun()  # see run_name: no counter, so the run may exist
    if name_is_fixed and not resume and any((run_dir / "checkpoints").glob("step_*.pt")):
        raise RunInUseError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --name")
    created = not run_dir.exists()
    resume_command = _resume_command(name)
    succeeded = False
    try:
        with run_lock(run_dir) if _is_rank0() else contextlib.nullcontext():
            yield run_dir
        succeeded = True
    finally:
        if created and not succeeded and _is_rank0() and not holds_run_files(run_dir):
            (run_dir / ".lock").unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                run_dir.rmdir()


def holds_run_files(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds anything besides its lock file."""
    return any(path.name != ".lock" for path in run_dir.iterdir()) if run_dir.is_dir() else False


def _resume_command(name: str) -> str:
    """The current invocation with ``--name <name> --resume`` (replacing any --name / --resume)."""
    args: list[str] = []
    skip = False
    for arg in invocation:
        if skip:
            skip = False
            continue
        if arg == "--name":
            skip = True
            continue
        if arg.startswith("--name=") or arg in ("--resume", "--no-resume"):
            continue
        args.append(arg)
    return shlex.join(["rgdm", *args, "--name", name, "--resume"])
