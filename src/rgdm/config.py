"""Validated dataclass configs with YAML load/save.

Every run is described by one ``RunConfig``; its YAML form is copied into the run directory and
stored in checkpoints as a plain dict (never a pickled object). Unknown keys, wrong types and
out-of-range values raise ``ConfigError`` with one line naming the key, so a typo in a YAML file
is reported as ``model.hiden_nf: unknown key (did you mean 'hidden_nf'?)``.

What lives where: this module holds the pre-training sections and ``RunConfig``, ``FinetuneConfig``
and the YAML files (``load_config`` with its ``--set`` overrides, ``save_config``); the method
sections (``RGDMConfig``, ``DDPOConfig``, ``RWRConfig``) are in :mod:`rgdm.config_methods`; the
shared errors, checks and dict (de)serialisation are in :mod:`rgdm.config_common`. Their public
names, and the checks ``_check_choice`` / ``_check_range``, are importable from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rgdm.config_common import (
    REMOVED_KEYS,
    ConfigError,
    _check_choice,
    _check_range,
    check_run_name,
    from_dict,
    to_dict,
)
from rgdm.config_methods import (
    DDPO_VARIANTS,
    RWR_VARIANTS,
    DDPOConfig,
    RGDMConfig,
    RWRConfig,
    ppo_clip_defaults,
)

__all__ = [
    "DDPO_VARIANTS",
    "FINETUNE_METHODS",
    "REMOVED_KEYS",
    "RWR_VARIANTS",
    "ConfigError",
    "DDPOConfig",
    "DataConfig",
    "DiffusionConfig",
    "FinetuneConfig",
    "ModelConfig",
    "RGDMConfig",
    "RWRConfig",
    "RunConfig",
    "TrainConfig",
    "_check_choice",
    "_check_range",
    "check_run_name",
    "from_dict",
    "load_config",
    "ppo_clip_defaults",
    "save_config",
    "set_dotted",
    "to_dict",
]


@dataclass
class DataConfig:
    dataset: str = "qm9"  # "qm9" or "files"
    remove_h: bool = True  # train on heavy atoms only (the fast CPU default)
    files: list[str] = field(default_factory=list)  # xyz/sdf files or directories when dataset == "files"
    conditioning: list[str] = field(default_factory=list)  # QM9 properties fed to the network as context
    train_split: str = "train"  # "train", "Da", "Db" (EDM's conditional protocol trains generators on Db)
    max_train_molecules: int = 0  # 0 = all; a positive value takes a fixed random subset (for quick runs)

    def validate(self) -> None:
        _check_choice("data.dataset", self.dataset, ("qm9", "files"))
        _check_choice("data.train_split", self.train_split, ("train", "Da", "Db", "all"))
        if self.dataset == "files" and not self.files:
            raise ConfigError("data.files: list at least one .xyz/.sdf file or directory when dataset is 'files'")
        from rgdm.data.properties import PROPERTIES

        for name in self.conditioning:
            _check_choice("data.conditioning", name, PROPERTIES)
        _check_range("data.max_train_molecules", self.max_train_molecules, low=0)


@dataclass
class ModelConfig:
    hidden_nf: int = 64  # width of the EGNN's hidden node features
    n_layers: int = 4  # equivariant blocks
    attention: bool = True  # sigmoid gate on edge messages
    tanh: bool = True  # bound coordinate updates by tanh * coords_range / n_layers
    coords_range: float = 15.0
    norm_constant: float = 1.0  # c in (x_i - x_j) / (|x_i - x_j| + c)
    normalization_factor: float = 1.0  # messages are summed and divided by this
    inv_sublayers: int = 1  # invariant graph convolutions per block

    def validate(self) -> None:
        _check_range("model.hidden_nf", self.hidden_nf, low=1)
        _check_range("model.n_layers", self.n_layers, low=1)
        _check_range("model.inv_sublayers", self.inv_sublayers, low=1)
        _check_range("model.normalization_factor", self.normalization_factor, low=1e-12)


@dataclass
class DiffusionConfig:
    timesteps: int = 500  # T of the diffusion
    schedule: str = "polynomial_2"  # "polynomial_2" (EDM) or "cosine"
    precision: float = 1e-5  # EDM's noise_precision: alpha_0^2 = 1 - 2 * precision
    norm_values: tuple[float, float, float] = (1.0, 4.0, 10.0)  # EDM's scaling of x, one-hot, charge
    include_charges: bool = True  # atomic number as an extra node feature (EDM's "integer" feature)

    def validate(self) -> None:
        _check_range("diffusion.timesteps", self.timesteps, low=2)
        _check_choice("diffusion.schedule", self.schedule, ("polynomial_2", "cosine"))
        _check_range("diffusion.precision", self.precision, low=0.0, high=0.1)
        if len(self.norm_values) != 3 or min(self.norm_values) <= 0:
            raise ConfigError("diffusion.norm_values: expected three positive numbers (x, one-hot, charge)")


@dataclass
class TrainConfig:
    steps: int = 2000  # optimizer steps (fine-tuning: iterations)
    batch_size: int = 64
    lr: float = 2e-4  # AdamW learning rate (amsgrad, as EDM)
    weight_decay: float = 1e-12
    grad_clip: float = 2.0  # max gradient norm; 0 disables clipping
    ema_decay: float = 0.999  # 0 disables the EMA copy
    anchor: float = 0.0  # pull toward the starting weights: each step moves them lr * anchor of the way back
    seed: int = 0
    log_every: int = 50  # steps per row of metrics.csv / TensorBoard
    val_every: int = 500  # steps between evaluations (validation loss, or samples when fine-tuning)
    val_batches: int = 8  # validation batches per evaluation
    checkpoint_every: int = 500
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    max_minutes: float = 0.0  # stop (and checkpoint) after this wall time; 0 = no limit
    num_threads: int = 0  # torch threads; 0 = torch's default

    def validate(self) -> None:
        _check_range("train.steps", self.steps, low=1)
        _check_range("train.batch_size", self.batch_size, low=1)
        _check_range("train.lr", self.lr, low=0.0)
        _check_range("train.grad_clip", self.grad_clip, low=0.0)
        _check_range("train.ema_decay", self.ema_decay, low=0.0, high=1.0)
        _check_range("train.anchor", self.anchor, low=0.0)
        if self.lr * self.anchor > 1:
            raise ConfigError(f"train.anchor: lr * anchor = {self.lr * self.anchor:g} would pull the weights past "
                              "their starting point; keep it <= 1 (e.g. anchor <= 1 / lr)")
        for key in ("log_every", "val_every", "checkpoint_every", "keep_checkpoints"):
            _check_range(f"train.{key}", getattr(self, key), low=1)
        _check_range("train.val_batches", self.val_batches, low=0)
        _check_range("train.max_minutes", self.max_minutes, low=0.0)


@dataclass
class RunConfig:
    name: str = "run"  # run directory name under runs/
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> RunConfig:
        check_run_name(self.name)
        for section in (self.data, self.model, self.diffusion, self.train):
            section.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


FINETUNE_METHODS = ("rgdm", "ddpo", "ppo", "rwr")


@dataclass
class FinetuneConfig:
    """Reward-driven fine-tuning of a pre-trained model (``rgdm finetune``)."""

    name: str = "finetune"  # run directory name under runs/
    base: str = ""  # run directory, checkpoint or shipped model name of the pre-trained model
    method: str = "rgdm"  # fine-tuning method: rgdm, or the baselines ddpo, ppo and rwr (their sections below)
    reward: dict[str, Any] = field(default_factory=lambda: {"name": "qed", "backend": "inline"})  # make_reward config
    target: float | None = None  # reward target (raw property units); None = maximise the reward
    target_from_data: str = ""  # QM9 property whose data values serve as per-sample targets
    rgdm: RGDMConfig = field(default_factory=RGDMConfig)  # see the rgdm section
    ddpo: DDPOConfig = field(default_factory=DDPOConfig)  # used when method is ddpo
    ppo: DDPOConfig = field(default_factory=ppo_clip_defaults)  # used when method is ppo (RLPF's PPO-clip)
    rwr: RWRConfig = field(default_factory=RWRConfig)  # used when method is rwr
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=50, lr=1e-4, ema_decay=0.0, log_every=1, val_every=10, checkpoint_every=10, grad_clip=1.0))
    eval_samples: int = 64  # molecules sampled for validity/stability every train.val_every iterations

    def validate(self) -> FinetuneConfig:
        check_run_name(self.name)
        if not self.base:
            raise ConfigError("base: give the pre-trained model (run directory, checkpoint or shipped name)")
        _check_choice("method", self.method, FINETUNE_METHODS)
        if not isinstance(self.reward, dict) or "name" not in self.reward:
            raise ConfigError("reward: expected a mapping with a 'name' key, e.g. {name: qed}")
        if self.target_from_data:
            from rgdm.data.properties import PROPERTIES

            _check_choice("target_from_data", self.target_from_data, PROPERTIES)
        self.method_config.validate()
        self.train.validate()
        _check_range("eval_samples", self.eval_samples, low=0)
        return self

    @property
    def method_config(self) -> RGDMConfig | DDPOConfig | RWRConfig:
        """The section of the chosen method (the other sections are ignored)."""
        return getattr(self, self.method)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


# --------------------------------------------------------------------------------------------- #
# YAML files, and ``--set`` overrides of their keys.


def load_config(path: str | Path, cls: type = RunConfig, overrides: dict[str, Any] | None = None) -> Any:
    """Read, merge ``overrides`` (dotted keys, e.g. ``{"train.steps": 10}``) and validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors) is not YAML
    try:
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (name, data, model, ...), "
                          f"got {type(values).__name__}")
    try:
        for dotted, value in (overrides or {}).items():
            set_dotted(values, dotted, value)
        return from_dict(cls, values).validate()
    except ConfigError as err:
        # Say where the bad value came from: a line of the file, or a --set override.
        raise ConfigError(f"{_origin(path, text, str(err), overrides or {})}: {err}") from None


def save_config(config: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def set_dotted(values: dict[str, Any], dotted: str, value: Any) -> None:
    """``set_dotted(d, "train.steps", 5)`` sets ``d["train"]["steps"] = 5``, creating sections."""
    *parents, leaf = dotted.split(".")
    node = values
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {key} is not a section")
    node[leaf] = value


def _origin(path: Path, text: str, message: str, overrides: dict[str, Any]) -> str:
    """``--set`` when the offending key was overridden, else ``file:line`` (or ``file``)."""
    dotted = message.split(":", 1)[0].split("[", 1)[0]
    if dotted in overrides:
        return "--set"
    node = yaml.compose(text)
    for key in dotted.split("."):
        if not isinstance(node, yaml.MappingNode):
            return str(path)
        match = next(((k, v) for k, v in node.value if getattr(k, "value", None) == key), None)
        if match is None:
            return str(path)
        key_node, node = match
    return f"{path}:{key_node.start_mark.line + 1}"
