"""Pre-training a molecule diffusion model by maximum likelihood, as one function."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from rgdm import distributed
from rgdm.config import ConfigError, RunConfig, save_config
from rgdm.runs import build_model, load_training_data, load_validation_data, spec_for
from rgdm.training.loop import Trainer
from rgdm.training.mle import DenoisingObjective, validation_loss

log = logging.getLogger("rgdm.training")


class RunExistsError(RuntimeError):
    """Refuse to overwrite a run that already has checkpoints unless asked to resume."""


def prepare_run_dir(run_dir: Path, resume: bool) -> None:
    has_checkpoints = any((run_dir / "checkpoints").glob("step_*.pt"))
    if has_checkpoints and not resume:
        raise RunExistsError(f"{run_dir} already holds a run; resume it (resume=True) or train in another directory")
    run_dir.mkdir(parents=True, exist_ok=True)


def pretrain(config: RunConfig, run_dir: str | Path, resume: bool = False, progress: bool = True,
             tensorboard: bool = True, device: str = "cpu", compile_model: bool = False) -> Trainer:
    """Train ``config`` in ``run_dir``; with ``resume`` continue its newest checkpoint bit-for-bit.

    ``device``: ``auto``, ``cpu`` or ``cuda`` (bfloat16 autocast on CUDA). Launched by ``torchrun``,
    every process trains its slice of each global batch and rank 0 writes the run directory.
    ``compile_model`` wraps the network in ``torch.compile``.
    """
    run_dir = Path(run_dir)
    torch_device = distributed.resolve_device(device)
    distributed.init_from_env(torch_device)
    if config.train.batch_size < distributed.world_size():
        raise ConfigError(f"train.batch_size: {config.train.batch_size} is smaller than the number of "
                          f"processes ({distributed.world_size()})")
    if config.train.num_threads:
        torch.set_num_threads(config.train.num_threads)
    train_data = load_training_data(config)  # bad data fails here, before the run directory exists
    val_data = load_validation_data(config)
    prepare_run_dir(run_dir, resume)
    spec = spec_for(config, train_data)
    torch.manual_seed(config.train.seed)  # the same initial weights on every rank
    model = build_model(config, spec, train_data).to(torch_device)
    distributed.seed_rank(config.train.seed)
    objective = DenoisingObjective(train_data, config.train.batch_size, config.train.seed, torch_device)

    def evaluate(ema_model, step: int) -> dict[str, float]:
        if val_data is None or config.train.val_batches == 0:
            return {}
        return {"val_loss": validation_loss(ema_model, val_data, config.train.batch_size, config.train.val_batches)}

    run_info = {"kind": "pretrain", "config": config.to_dict(), "model_spec": spec.to_dict()}
    trainer = Trainer(model, objective, config.train, run_dir, run_info, evaluate, tensorboard, progress,
                      bf16_autocast=torch_device.type == "cuda")
    if resume and not trainer.resume():
        log.info("no checkpoint in %s yet: starting from scratch", run_dir)
    if compile_model:
        model.denoiser.compile()  # in place: parameter names (and checkpoints) stay unchanged
    if distributed.is_main():
        save_config(config, run_dir / "config.yaml")
        log.info("training %s on %s x %d process(es): %d molecules, %d parameters", config.name, torch_device,
                 distributed.world_size(), len(train_data), sum(p.numel() for p in model.parameters()))
    trainer.fit()
    return trainer
