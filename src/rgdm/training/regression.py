"""Training EGNN property regressors on QM9 (EDM's evaluators, and learned rewards).

EDM's conditional protocol splits QM9's training set in two halves: regressors that *evaluate*
generated molecules train on D_a, generators train on D_b. A regressor used as a *reward* during
fine-tuning trains on D_b, so that the reward and the evaluator never see the same molecules.

``train_regressor(config, run_dir)`` runs on the shared :class:`~rgdm.training.loop.Trainer`
(checkpoints, metrics.csv, exact resume) with a :class:`RegressionObjective`: the L1 loss on the
property normalised by the training split's mean and mean absolute deviation. At the end it writes
the test-split MAE in EDM's units to ``test_metrics.json``. ``load_regressor`` rebuilds a trained
regressor from a run directory or checkpoint file.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rgdm import distributed
from rgdm.config import (
    ConfigError,
    TrainConfig,
    _check_choice,
    _check_range,
    check_run_name,
    save_config,
    to_dict,
)
from rgdm.data.dataset import MoleculeDataset
from rgdm.data.properties import PROPERTIES, UNITS
from rgdm.models.regressor import PropertyRegressor, RegressorSpec
from rgdm.training.checkpoint import CheckpointError, load_checkpoint
from rgdm.training.loop import Trainer
from rgdm.training.mle import DataStream
from rgdm.training.pretrain import prepare_run_dir

log = logging.getLogger("rgdm.training")

SPLITS = ("Da", "Db", "train")

EDM_EVALUATOR_MAE: dict[str, float] = {
    "alpha": 0.10, "gap": 64.0, "homo": 39.0, "lumo": 36.0, "mu": 0.043, "Cv": 0.040,
}
"""Test MAE of EDM's property classifiers (trained on D_a, with hydrogens), EDM's units."""


# ----------------------------------------------------------------------------------- config
@dataclass
class RegressorDataConfig:
    property: str = "gap"  # alpha, gap, homo, lumo, mu or Cv (EDM's units)
    split: str = "Da"  # training molecules: "Da" (evaluators), "Db" (rewards) or "train" (both halves)
    remove_h: bool = False  # heavy atoms only (what scores samples of a generator trained without H)
    max_train_molecules: int = 0  # 0 = the whole split; a positive value takes a fixed random subset
    test_molecules: int = 0  # test-split molecules for the final MAE; 0 = all 13,083

    def validate(self) -> None:
        _check_choice("data.property", self.property, PROPERTIES)
        _check_choice("data.split", self.split, SPLITS)
        _check_range("data.max_train_molecules", self.max_train_molecules, low=0)
        _check_range("data.test_molecules", self.test_molecules, low=0)


@dataclass
class RegressorModelConfig:
    hidden_nf: int = 128  # EDM's property classifier: 128 features
    n_layers: int = 7  # ... and 7 layers
    include_charges: bool = True  # atomic number as an extra node feature
    attention: bool = True  # sigmoid gate on edge messages
    normalization_factor: float = 1.0  # messages are summed and divided by this

    def validate(self) -> None:
        _check_range("model.hidden_nf", self.hidden_nf, low=1)
        _check_range("model.n_layers", self.n_layers, low=1)
        _check_range("model.normalization_factor", self.normalization_factor, low=1e-12)


def _regressor_train_defaults() -> TrainConfig:
    # EDM trains its classifiers with lr 1e-3 and no EMA; our Trainer adds gradient clipping.
    return TrainConfig(steps=100_000, batch_size=96, lr=1e-3, ema_decay=0.0, grad_clip=10.0, log_every=50,
                       val_every=500, val_batches=10, checkpoint_every=500)


@dataclass
class RegressorConfig:
    """One property regressor run (``rgdm train-regressor``)."""

    name: str = "regressor"  # run directory name under runs/
    data: RegressorDataConfig = field(default_factory=RegressorDataConfig)
    model: RegressorModelConfig = field(default_factory=RegressorModelConfig)
    train: TrainConfig = field(default_factory=_regressor_train_defaults)

    def validate(self) -> RegressorConfig:
        check_run_name(self.name)
        self.data.validate()
        self.model.validate()
        self.train.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def default_run_name(property_name: str, split: str, remove_h: bool) -> str:
    """``regressor-gap-Da`` or ``regressor-gap-Db-noH``."""
    return f"regressor-{property_name}-{split}" + ("-noH" if remove_h else "")


# ----------------------------------------------------------------------------------- objective
class RegressionObjective:
    """L1 loss between predicted and true normalised property on shuffled training batches."""

    name = "regression"

    def __init__(self, dataset: MoleculeDataset, property_name: str, batch_size: int, seed: int,
                 device: torch.device | str = "cpu"):
        if property_name not in dataset.properties:
            raise ConfigError(f"data.property: the training molecules carry no property {property_name!r}")
        self.stream = DataStream(dataset, batch_size, seed)
        self.property_name = property_name
        self.device = device

    def loss(self, model: PropertyRegressor, step: int) -> tuple[Tensor, dict[str, float]]:
        batch = self.stream.next().to(self.device)
        target = model.normalize(batch.properties[self.property_name])
        error = (model.normalized(batch) - target).abs().mean()
        return error, {"train_mae": float(error.detach()) * model.spec.mad, "epoch": float(self.stream.epoch)}

    def state_dict(self) -> dict[str, Any]:
        return {"stream": self.stream.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state["stream"])


@torch.no_grad()
def mean_absolute_error(model: PropertyRegressor, dataset: MoleculeDataset, batch_size: int = 256) -> float:
    """MAE of the model's predictions on ``dataset`` in the property's units (EDM's units)."""
    model.eval()
    device = model.mean.device
    total, count = 0.0, 0
    for batch in dataset.batches(batch_size):
        truth = batch.properties[model.spec.property_name].to(device, model.mean.dtype)
        total += float((model.predict(batch.to(device)) - truth).abs().sum())
        count += len(batch)
    return total / max(count, 1)


def mean_baseline_mae(train: MoleculeDataset, test: MoleculeDataset, property_name: str) -> float:
    """MAE of always predicting the training mean: the score a regressor must beat."""
    mean, _ = train.property_stats(property_name)
    return float((test.properties[property_name].double() - mean).abs().mean())


# ----------------------------------------------------------------------------------- training
@dataclass
class RegressionResult:
    trainer: Trainer
    test_metrics: dict[str, Any]


def train_regressor(config: RegressorConfig, run_dir: str | Path, resume: bool = False, progress: bool = True,
                    tensorboard: bool = True, device: str = "cpu") -> RegressionResult:
    """Train ``config`` in ``run_dir`` (or continue it with ``resume``); evaluate on the test split.

    ``device``: ``auto``, ``cpu`` or ``cuda``; the regressor trains in float32 on either.
    """
    torch_device = distributed.resolve_device(device)
    if distributed.launched_by_torchrun():
        raise ConfigError("train-regressor: run one process (data-parallel training is for diffusion models)")
    run_dir = Path(run_dir)
    if config.train.num_threads:
        torch.set_num_threads(config.train.num_threads)
    train_data, val_data, test_data = _load_splits(config)  # bad data fails before the run dir exists
    prepare_run_dir(run_dir, resume)
    spec = spec_for(config, train_data)
    torch.manual_seed(config.train.seed)
    model = PropertyRegressor(spec).to(torch_device)
    objective = RegressionObjective(train_data, spec.property_name, config.train.batch_size, config.train.seed,
                                    torch_device)

    def evaluate(eval_model: PropertyRegressor, step: int) -> dict[str, float]:
        if config.train.val_batches == 0:
            return {}
        return {"val_mae": mean_absolute_error(eval_model, val_data)}

    run_info = {"kind": "regressor", "config": config.to_dict(), "regressor_spec": spec.to_dict()}
    trainer = Trainer(model, objective, config.train, run_dir, run_info, evaluate, tensorboard, progress)
    if resume and not trainer.resume():
        log.info("no checkpoint in %s yet: starting from scratch", run_dir)
    save_config(config, run_dir / "config.yaml")
    log.info("training a %s regressor on %s (%d molecules, %s H): %d parameters", spec.property_name,
             config.data.split, len(train_data), "without" if config.data.remove_h else "with",
             sum(p.numel() for p in model.parameters()))
    trainer.fit()
    metrics = test_metrics(trainer, train_data, test_data)
    (run_dir / "test_metrics.json").write_text(json.dumps(metrics, indent=2))
    return RegressionResult(trainer, metrics)


def test_metrics(trainer: Trainer, train_data: MoleculeDataset, test_data: MoleculeDataset) -> dict[str, Any]:
    """Test MAE of the trained regressor beside the training-mean baseline and EDM's evaluator."""
    model: PropertyRegressor = trainer.sampling_model
    name = model.spec.property_name
    return {
        "property": name,
        "units": UNITS[name],
        "test_mae": mean_absolute_error(model, test_data),
        "mean_baseline_mae": mean_baseline_mae(train_data, test_data, name),
        "edm_evaluator_mae": EDM_EVALUATOR_MAE[name],
        "test_molecules": len(test_data),
        "train_split": model.spec.extra.get("split"),
        "train_molecules": len(train_data),
        "remove_h": model.spec.extra.get("remove_h"),
        "steps": trainer.step,
        "train_seconds": round(trainer.elapsed, 1),
    }


test_metrics.__test__ = False  # not a pytest test, despite its name


def spec_for(config: RegressorConfig, train_data: MoleculeDataset) -> RegressorSpec:
    name = config.data.property
    mean, mad = train_data.property_stats(name)
    m = config.model
    return RegressorSpec(
        property_name=name, elements=tuple(train_data.elements), mean=mean, mad=mad, units=UNITS[name],
        hidden_nf=m.hidden_nf, n_layers=m.n_layers, include_charges=m.include_charges, attention=m.attention,
        normalization_factor=m.normalization_factor,
        extra={"split": config.data.split, "remove_h": config.data.remove_h},
    )


def _load_splits(config: RegressorConfig) -> tuple[MoleculeDataset, MoleculeDataset, MoleculeDataset]:
    """(training subset, validation subset, test subset) of QM9 as the config asks."""
    from rgdm.data.qm9 import load_qm9

    d, t = config.data, config.train
    train = _first_of_permutation(load_qm9(d.split, remove_h=d.remove_h), d.max_train_molecules, t.seed)
    val = _first_of_permutation(load_qm9("valid", remove_h=d.remove_h), t.val_batches * t.batch_size, 1234)
    test = _first_of_permutation(load_qm9("test", remove_h=d.remove_h), d.test_molecules, 4321)
    return train, val, test


def _first_of_permutation(dataset: MoleculeDataset, count: int, seed: int) -> MoleculeDataset:
    """A fixed random subset of ``count`` molecules (all when count is 0 or too large)."""
    if count <= 0 or count >= len(dataset):
        return dataset
    generator = torch.Generator().manual_seed(seed)
    return dataset.subset(torch.randperm(len(dataset), generator=generator)[:count])


# ----------------------------------------------------------------------------------- loading
@dataclass
class LoadedRegressor:
    model: PropertyRegressor
    spec: RegressorSpec
    checkpoint: Path
    step: int


def load_regressor(source: str | Path, use_ema: bool = True, device: str | torch.device = "cpu") -> LoadedRegressor:
    """Rebuild a trained regressor from a run directory or a checkpoint file (EMA weights if any)."""
    from rgdm.runs import resolve_checkpoint

    path = resolve_checkpoint(source)
    state = load_checkpoint(path)
    if state.get("kind") != "regressor" or "regressor_spec" not in state:
        raise CheckpointError(f"{path}: not a property regressor checkpoint (kind: {state.get('kind')!r})")
    try:
        spec = RegressorSpec.from_dict(state["regressor_spec"])
        model = PropertyRegressor(spec)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: damaged regressor description ({err})") from None
    weights = state["ema"] if use_ema and state.get("ema") is not None else state["model"]
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise CheckpointError(f"{path}: weights do not fit the regressor it describes ({first})") from None
    model.to(device).eval()
    return LoadedRegressor(model, spec, path, int(state["step"]))
