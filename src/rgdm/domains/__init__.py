"""Domains: what a kind of sample (molecules, shape point clouds, the analytic Gaussian) brings to
the shared machinery, and the registry that finds a domain by name, config or model.

Pre-training, fine-tuning, evaluation and the ``rgdm`` commands are written once
(``rgdm.training.pretrain``, ``rgdm.training.finetune``, ``rgdm.cli``) and ask the domain for
everything that differs: the configs, the data, the network and its diffusion state space, the
task and reward defaults of fine-tuning, the metrics and the renders. A new domain is one module
with one :class:`Domain` object, listed in ``DOMAINS`` below (docs/domains.md walks through it).

A YAML config or a checkpoint says which domain it belongs to with a top-level ``domain:`` key;
a config without one is a molecule config (the molecule configs predate domains and never had it).
Domain modules are imported only when asked for, so ``import rgdm.domains`` stays light.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from rgdm.config import ConfigError

if TYPE_CHECKING:
    from torch import Tensor, nn

    from rgdm.diffusion.gaussian import GaussianDiffusion
    from rgdm.training.loop import Objective
    from rgdm.training.tasks import Task

# name -> module that defines ``DOMAIN``. Molecules first: the default of configs without a domain key.
DOMAINS: dict[str, str] = {
    "molecules": "rgdm.domains.molecules",
    "shapes": "rgdm.domains.shapes",
    "analytic": "rgdm.domains.analytic",
}
DEFAULT_DOMAIN = "molecules"


class UnknownDomainError(ConfigError):
    """A domain name that is not registered; the message lists the registered names."""


@dataclass
class TrainingData:
    """The data of a pre-training run: the training set and, where the domain has one, a validation set."""

    train: Any
    val: Any = None


@dataclass
class Samples:
    """Samples of a model in its state space: ``x`` [B, ...] and, for padded sets, ``node_mask`` [B, N]."""

    x: Tensor
    node_mask: Tensor | None = None


class Domain(Protocol):
    """What a domain provides. Every method is called by the shared code paths named in its docstring."""

    name: str  # the value of the configs' ``domain:`` key
    noun: str  # the domain in messages, e.g. "shape" in "not a shape model"
    run_config: type  # dataclass of a pre-training run (``rgdm pretrain --config``)
    finetune_config: type  # dataclass of a fine-tuning run; has ``method``, ``method_config``, ``reward``, ``train``
    methods: tuple[str, ...]  # fine-tuning methods it supports (``rgdm finetune --method``)

    # --- data, model and state space (rgdm.training.pretrain.pretrain) ------------------------- #
    def load_data(self, config: Any) -> TrainingData:
        """The training (and validation) data a pre-training config asks for; bad data fails here."""

    def describe_data(self, data: TrainingData) -> str:
        """The training data in a few words for the log, e.g. ``100000 molecules``."""

    def build_model(self, config: Any, data: Any) -> GaussianDiffusion:
        """A fresh diffusion model (network + state space) for ``config``; data statistics from ``data``."""

    def pretrain_objective(self, config: Any, data: Any, device: Any) -> Objective:
        """The maximum-likelihood objective of pre-training on ``data``."""

    def validation(self, config: Any, data: Any) -> Callable[[nn.Module, int], dict[str, float]] | None:
        """Metrics of the EMA model every ``train.val_every`` pre-training steps (None: no validation)."""

    def run_info(self, config: Any, data: Any) -> dict[str, Any]:
        """What a pre-training checkpoint stores besides the weights, so that it rebuilds its model."""

    def load_model(self, source: str | Path, use_ema: bool = True, device: Any = "cpu") -> Any:
        """A trained model from a run directory or checkpoint: an object with ``model``, ``config``
        (its pre-training config), ``checkpoint`` and ``step``."""

    # --- fine-tuning (rgdm.training.finetune.finetune) ----------------------------------------- #
    def make_reward(self, config: dict[str, Any]) -> Any:
        """The reward object of a fine-tuning config's ``reward`` section."""

    def build_task(self, config: Any, loaded: Any, model: GaussianDiffusion, reward: Any) -> Task:
        """The :class:`~rgdm.training.tasks.Task` that rolls out, decodes and scores this domain's samples."""

    def finetune_validation(self, config: Any, task: Task,
                            device: Any) -> Callable[[nn.Module, int], dict[str, float]] | None:
        """Metrics of samples during fine-tuning (None: none)."""

    def finetune_run_info(self, config: Any, loaded: Any) -> dict[str, Any]:
        """What a fine-tuning checkpoint stores besides the weights (the base model's config, ...)."""

    # --- samples, metrics and renders ---------------------------------------------------------- #
    def sample(self, model: GaussianDiffusion, n: int, num_steps: int | None = None, seed: int = 0) -> Samples:
        """``n`` samples of ``model`` (unconditional, or the model's own conditioning)."""

    def metrics(self, model: GaussianDiffusion, samples: Samples) -> dict[str, float]:
        """The domain's cheap sample metrics (validity, moments, ...), as plain numbers."""

    def render(self, model: GaussianDiffusion, samples: Samples, out: Path) -> Path:
        """A picture of some samples written to ``out`` (a .png path); returns it."""

    # --- commands (rgdm.cli dispatches to these; requests are rgdm.cli_common's dataclasses) ---- #
    def pretrain_command(self, request: Any) -> None:
        """``rgdm pretrain --config FILE`` for a config of this domain."""

    def finetune_command(self, request: Any) -> None:
        """``rgdm finetune --from MODEL`` for a model of this domain."""

    def evaluate_command(self, request: Any) -> None:
        """``rgdm evaluate MODEL ...`` for models of this domain."""


def available_domains() -> list[str]:
    """The registered domain names."""
    return list(DOMAINS)


def get_domain(name: str) -> Domain:
    """The domain registered as ``name``; an unknown name is refused with the registered names."""
    if name not in DOMAINS:
        close = difflib.get_close_matches(str(name), DOMAINS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UnknownDomainError(f"domain {name!r} is unknown{hint}; registered domains: {', '.join(DOMAINS)}")
    return importlib.import_module(DOMAINS[name]).DOMAIN


def domain_of_values(values: Any) -> Domain:
    """The domain of a config mapping (a YAML file's contents or a checkpoint's stored config)."""
    name = values.get("domain", DEFAULT_DOMAIN) if isinstance(values, dict) else DEFAULT_DOMAIN
    return get_domain(name)


def domain_of_config(config: Any) -> Domain:
    """The domain whose pre-training or fine-tuning config class ``config`` is an instance of."""
    for name in DOMAINS:
        domain = get_domain(name)
        if isinstance(config, (domain.run_config, domain.finetune_config)):
            return domain
    raise UnknownDomainError(f"{type(config).__name__} is the config of no registered domain "
                             f"({', '.join(DOMAINS)})")


def domain_of_config_file(path: str | Path) -> Domain:
    """The domain a YAML config file declares (``domain:``; none or an unreadable file: molecules,
    whose loader then reports what is wrong with the file)."""
    import yaml

    try:
        values = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return get_domain(DEFAULT_DOMAIN)
    return domain_of_values(values)


def domain_of_model(source: str | Path) -> Domain:
    """The domain of a trained model: a run directory says so in its ``config.yaml``, a checkpoint
    file in the config it stores. A shipped model name, or a missing or unreadable path, counts as a
    molecule model (the shipped models are all molecule models, and the molecule code reports what
    is wrong with the path)."""
    path = Path(source)
    if path.is_dir() and (path / "config.yaml").is_file():
        return domain_of_config_file(path / "config.yaml")
    if not path.exists():
        return get_domain(DEFAULT_DOMAIN)
    from rgdm.runs import resolve_checkpoint
    from rgdm.training.checkpoint import CheckpointError, load_checkpoint

    try:
        config = load_checkpoint(resolve_checkpoint(path)).get("config")
    except CheckpointError:
        return get_domain(DEFAULT_DOMAIN)
    return domain_of_values(config)
