"""Atomic, self-describing checkpoints.

A checkpoint is one ``torch.save`` file holding only plain data: the run config as a dict, the
package version, the model/EMA/optimizer state dicts, the RNG states, the step and the objective's
own state. Writes go to a temporary file in the same directory followed by ``os.replace``, so a
crash (or a full disk) mid-write never damages the previous checkpoint.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

import rgdm

FORMAT_VERSION = 1
log = logging.getLogger("rgdm.training")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, corrupt, or from an incompatible version."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` atomically to ``path`` (temp file in the same directory + rename)."""
    path = Path(path)
    payload = {"format_version": FORMAT_VERSION, "rgdm_version": rgdm.__version__, **state}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot write a checkpoint here ({err.strerror})") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as err:
        # A full disk (ENOSPC) or a failing device: the temp file goes, earlier checkpoints stay.
        Path(tmp).unlink(missing_ok=True)
        reason = "no space left on device" if err.errno == errno.ENOSPC else (err.strerror or str(err))
        raise CheckpointError(f"{path}: checkpoint not written ({reason}); "
                              "the previous checkpoints are intact") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read and check a checkpoint; raises ``CheckpointError`` with a one-line reason."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated/corrupt files
        raise CheckpointError(f"{path}: unreadable or corrupt checkpoint ({type(err).__name__})") from None
    if not isinstance(state, dict) or "format_version" not in state:
        raise CheckpointError(f"{path}: not an rgdm checkpoint")
    if state["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {state['format_version']} (rgdm {state.get('rgdm_version')}) "
            f"is not supported by rgdm {rgdm.__version__} (format {FORMAT_VERSION})"
        )
    return state


def checkpoint_paths(directory: str | Path) -> list[Path]:
    """Checkpoints of a run, oldest first (names encode the step)."""
    return sorted(Path(directory).glob("step_*.pt"))


def latest_good_checkpoint(directory: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that loads; corrupt newer ones are reported and skipped."""
    for path in reversed(checkpoint_paths(directory)):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as err:
            log.warning("skipping %s; falling back to the previous checkpoint", err)
    return None


def remove_stale_temp_files(directory: str | Path) -> None:
    """Delete temp files of writes that never finished (a process killed mid-save)."""
    for tmp in Path(directory).glob(".step_*.tmp"):
        log.info("removing %s: left by an interrupted checkpoint write", tmp)
        tmp.unlink(missing_ok=True)


def prune_checkpoints(directory: str | Path, keep: int) -> None:
    for old in checkpoint_paths(directory)[:-keep]:
        old.unlink(missing_ok=True)


def rng_state() -> dict[str, Any]:
    """The global random states; with CUDA in use, the CUDA generators' states too (CPU byte tensors)."""
    state = {
        "torch": torch.get_rng_state(),
        "numpy": _numpy_state_plain(np.random.get_state()),
        "python": _python_state_plain(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore ``rng_state()``. CUDA states are restored where this process uses as many CUDA devices;
    a checkpoint written on a GPU and resumed on a CPU continues the CPU streams only."""
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _numpy_state_plain(state: tuple) -> list:
    name, keys, pos, has_gauss, cached = state
    return [name, torch.as_tensor(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]


def _python_state_plain(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]
