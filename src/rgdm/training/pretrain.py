"""Pre-training a molecule diffusion model by maximum likelihood, as one function."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from rgdm.config import RunConfig, save_config
from rgdm.runs import build_model, load_training_data, load_validation_data, spec_for
from rgdm.training.loop import Trainer
from rgdm.training.mle import DenoisingObjective, validation_loss

log = logging.getLogger("rgdm.training")


class RunExistsError(RuntimeError):
    """Refuse to overwrite a run that already has checkpoints unless asked to resume."""


def prepare_run_dir(run_dir: Path, resume: bool) -> None:
    has_checkpoints = any((run_dir / "checkpoints").glob("step_*.pt"))
    if has_checkpoints and not resume:
        raise RunExistsError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --name")
    run_dir.mkdir(parents=True, exist_ok=True)


def pretrain(config: RunConfig, run_dir: str | Path, resume: bool = False, progress: bool = True,
             tensorboard: bool = True) -> Trainer:
    """Train ``config`` in ``run_dir``; with ``resume`` continue its newest checkpoint bit-for-bit."""
    run_dir = Path(run_dir)
    prepare_run_dir(run_dir, resume)
    if config.train.num_threads:
        torch.set_num_threads(config.train.num_threads)
    train_data = load_training_data(config)
    val_data = load_validation_data(config)
    spec = spec_for(config, train_data)
    torch.manual_seed(config.train.seed)
    model = build_model(config, spec, train_data)
    objective = DenoisingObjective(train_data, config.train.batch_size, config.train.seed)

    def evaluate(ema_model, step: int) -> dict[str, float]:
        if val_data is None or config.train.val_batches == 0:
            return {}
        return {"val_loss": validation_loss(ema_model, val_data, config.train.batch_size, config.train.val_batches)}

    run_info = {"kind": "pretrain", "config": config.to_dict(), "model_spec": spec.to_dict()}
    trainer = Trainer(model, objective, config.train, run_dir, run_info, evaluate, tensorboard, progress)
    if resume and not trainer.resume():
        log.info("no checkpoint in %s yet: starting from scratch", run_dir)
    save_config(config, run_dir / "config.yaml")
    log.info("training %s: %d molecules, %d parameters", config.name, len(train_data),
             sum(p.numel() for p in model.parameters()))
    trainer.fit()
    return trainer
