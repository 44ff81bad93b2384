"""Build data and models from a ``RunConfig``; load trained models from run directories.

A run directory ``runs/<name>/`` holds ``config.yaml``, ``checkpoints/step_*.pt``, ``metrics.csv``,
``tensorboard/``, samples and reports. ``load_model`` accepts a run directory, a checkpoint file,
or the name of a pretrained model shipped with the package.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rgdm.config import ConfigError, RunConfig, from_dict
from rgdm.data.dataset import MoleculeDataset
from rgdm.diffusion.molecules import MoleculeDiffusion
from rgdm.diffusion.schedule import NoiseSchedule
from rgdm.models.egnn import EGNNDynamics
from rgdm.training.checkpoint import CheckpointError, latest_good_checkpoint, load_checkpoint

PRETRAINED_DIR = Path(__file__).parent / "pretrained"


def load_training_data(config: RunConfig) -> MoleculeDataset:
    """The training molecules a config asks for (QM9 split or user files)."""
    data = config.data
    if data.dataset == "qm9":
        from rgdm.data.qm9 import load_qm9

        dataset = load_qm9(data.train_split, remove_h=data.remove_h)
    else:
        from rgdm.data.readers import load_molecule_files

        dataset = load_molecule_files(data.files, remove_h=data.remove_h)
        missing = [k for k in data.conditioning if k not in dataset.properties]
        if missing:
            raise ConfigError(f"data.conditioning: the files carry no property {missing[0]!r}")
    if len(dataset) == 0:
        raise ConfigError("data: the training set is empty")
    if 0 < data.max_train_molecules < len(dataset):
        generator = torch.Generator().manual_seed(config.train.seed)
        dataset = dataset.subset(torch.randperm(len(dataset), generator=generator)[: data.max_train_molecules])
    return dataset


def load_validation_data(config: RunConfig) -> MoleculeDataset | None:
    if config.data.dataset != "qm9":
        return None
    from rgdm.data.qm9 import load_qm9

    return load_qm9("valid", remove_h=config.data.remove_h)


@dataclass
class ModelSpec:
    """What a checkpoint needs besides the config to rebuild its model (data-derived facts)."""

    elements: tuple[str, ...]
    max_nodes: int
    context_names: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"elements": list(self.elements), "max_nodes": self.max_nodes, "context_names": list(self.context_names)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        return cls(tuple(d["elements"]), int(d["max_nodes"]), tuple(d.get("context_names", ())))


def build_model(config: RunConfig, spec: ModelSpec, dataset: MoleculeDataset | None = None) -> MoleculeDiffusion:
    """A fresh model; data statistics (node counts, context normalisation) come from ``dataset``."""
    m, d = config.model, config.diffusion
    n_features = len(spec.elements) + int(d.include_charges)
    dynamics = EGNNDynamics(
        in_node_nf=n_features, context_nf=len(spec.context_names), hidden_nf=m.hidden_nf, n_layers=m.n_layers,
        attention=m.attention, tanh=m.tanh, coords_range=m.coords_range, norm_constant=m.norm_constant,
        normalization_factor=m.normalization_factor, inv_sublayers=m.inv_sublayers,
    )
    node_probs = torch.zeros(spec.max_nodes + 1)
    context_mean = context_scale = None
    if dataset is not None:
        counts = torch.bincount(dataset.num_atoms, minlength=spec.max_nodes + 1).float()
        node_probs = counts / counts.sum()
        if spec.context_names:
            stats = [dataset.property_stats(name) for name in spec.context_names]
            context_mean = torch.tensor([mean for mean, _ in stats])
            context_scale = torch.tensor([mad for _, mad in stats])
    return MoleculeDiffusion(
        dynamics, NoiseSchedule(d.timesteps, d.schedule, d.precision), spec.elements, node_probs,
        include_charges=d.include_charges, norm_values=d.norm_values, context_names=spec.context_names,
        context_mean=context_mean, context_scale=context_scale,
    )


def spec_for(config: RunConfig, dataset: MoleculeDataset) -> ModelSpec:
    return ModelSpec(tuple(dataset.elements), int(dataset.num_atoms.max()), tuple(config.data.conditioning))


@dataclass
class LoadedModel:
    model: MoleculeDiffusion
    config: RunConfig
    spec: ModelSpec
    checkpoint: Path
    step: int


def resolve_checkpoint(source: str | Path) -> Path:
    """A checkpoint file from a run directory, a file path, or a shipped pretrained name."""
    path = Path(source)
    if path.is_file():
        return path
    if path.is_dir():
        found = latest_good_checkpoint(path / "checkpoints") or latest_good_checkpoint(path)
        if found is None:
            raise CheckpointError(f"{path}: no usable checkpoint in this run directory")
        return found[0]
    shipped = PRETRAINED_DIR / f"{source}.pt"
    if shipped.is_file():
        return shipped
    names = sorted(p.stem for p in PRETRAINED_DIR.glob("*.pt"))
    raise CheckpointError(f"{source}: no such run directory, checkpoint or pretrained model "
                          f"(shipped: {', '.join(names) or 'none'})")


def load_model(source: str | Path, use_ema: bool = True, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild a trained model from its checkpoint (EMA weights by default) on ``device``.

    Checkpoints are read onto the CPU first (``map_location``), so one written on a GPU loads on a
    machine without one. On CUDA the network runs under bfloat16 autocast (``bf16_network``).
    """
    path = resolve_checkpoint(source)
    state = load_checkpoint(path)
    try:
        # Fine-tuned checkpoints carry the pre-training config of their model as "base_config".
        config = from_dict(RunConfig, state.get("base_config") or state["config"]).validate()
        spec = ModelSpec.from_dict(state["model_spec"])
    except (KeyError, ConfigError) as err:
        raise CheckpointError(f"{path}: checkpoint does not describe a molecule model ({err})") from None
    model = build_model(config, spec)
    weights = state["ema"] if use_ema and state.get("ema") is not None else state["model"]
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise CheckpointError(f"{path}: weights do not fit the model its config describes ({first})") from None
    model.to(device).eval()
    model.bf16_network = torch.device(device).type == "cuda"
    return LoadedModel(model, config, spec, path, int(state["step"]))


# --------------------------------------------------------------------------------------------- #
# Run directories: one process at a time, and fresh names by default.


class RunLockedError(RuntimeError):
    """Another process is writing the same run directory."""


LOCK_NAME = ".lock"
_held_locks: dict[Path, list[Any]] = {}  # run directory -> [open lock file, depth] held by this process


@contextlib.contextmanager
def run_lock(run_dir: str | Path) -> Iterator[None]:
    """Hold ``<run_dir>/.lock`` while a run writes its directory; refuse if another process holds it.

    The lock is an OS file lock (``flock``), so it disappears with its process: a run killed by
    ``kill -9`` or a power cut never leaves a stale lock behind. The same process may take it again
    (``rgdm finetune`` locks the run, and the training loop inside it locks it once more).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    key = run_dir.resolve()
    if key in _held_locks:
        _held_locks[key][1] += 1
        try:
            yield
        finally:
            _held_locks[key][1] -= 1
        return
    handle = (run_dir / LOCK_NAME).open("a+")
    if not _try_lock(handle):
        handle.seek(0)
        owner = handle.read().strip() or "unknown"
        handle.close()
        raise RunLockedError(f"{run_dir} is in use by another process (pid {owner}); wait for it to finish, "
                             "or give this run another name")
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    _held_locks[key] = [handle, 1]
    try:
        yield
    finally:
        del _held_locks[key]
        handle.close()  # closing the file releases the lock; the empty-ish file stays (harmless)


def _try_lock(handle: Any) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks in the standard library; do not block the run
        return True
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def holds_run(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` already holds a run (a checkpoint, or a lock of a run that never got one)."""
    run_dir = Path(run_dir)
    return any((run_dir / "checkpoints").glob("step_*.pt")) or (run_dir / LOCK_NAME).exists()


def fresh_run_name(runs_dir: str | Path, name: str) -> str:
    """``name`` if ``runs_dir/name`` holds no run yet, else the first free ``name-2``, ``name-3``, ..."""
    runs_dir = Path(runs_dir)
    candidate, counter = name, 1
    while holds_run(runs_dir / candidate):
        counter += 1
        candidate = f"{name}-{counter}"
    return candidate


def newest_run_name(runs_dir: str | Path, name: str) -> str:
    """The newest of ``name``, ``name-2``, ``name-3``, ... that holds a run (``name`` if none does)."""
    runs_dir = Path(runs_dir)
    newest, counter = name, 2
    while holds_run(runs_dir / f"{name}-{counter}"):
        newest, counter = f"{name}-{counter}", counter + 1
    return newest
