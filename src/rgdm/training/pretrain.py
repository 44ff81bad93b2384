"""Pre-training a diffusion model of any domain by maximum likelihood, as one function.

The domain of the config (``rgdm.domains``) supplies the data, the model, the objective and the
validation metrics; what every domain shares (devices, processes, the run directory, resuming,
checkpoints) is here and in the training loop."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from rgdm import distributed
from rgdm.config import ConfigError, save_config
from rgdm.training.loop import Trainer

log = logging.getLogger("rgdm.training")


class RunExistsError(RuntimeError):
    """Refuse to overwrite a run that already has checkpoints unless asked to resume."""


def prepare_run_dir(run_dir: Path, resume: bool) -> None:
    has_checkpoints = any((run_dir / "checkpoints").glob("step_*.pt"))
    if has_checkpoints and not resume:
        raise RunExistsError(f"{run_dir} already holds a run; resume it (resume=True) or train in another directory")
    run_dir.mkdir(parents=True, exist_ok=True)


def pretrain(config: Any, run_dir: str | Path, resume: bool = False, progress: bool = True,
             tensorboard: bool = True, device: str = "cpu", compile_model: bool = False) -> Trainer:
    """Train ``config`` in ``run_dir``; with ``resume`` continue its newest checkpoint bit-for-bit.

    ``config`` is the pre-training config of a domain: a ``RunConfig`` (molecules), a
    ``ShapeRunConfig`` (shapes), an ``AnalyticRunConfig`` (the analytic test bed).
    ``device``: ``auto``, ``cpu`` or ``cuda`` (bfloat16 autocast on CUDA). Launched by ``torchrun``,
    every process trains its slice of each global batch and rank 0 writes the run directory.
    ``compile_model`` wraps the network in ``torch.compile``.
    """
    from rgdm.domains import domain_of_config

    domain = domain_of_config(config)
    config.validate()
    run_dir = Path(run_dir)
    torch_device = distributed.resolve_device(device)
    distributed.init_from_env(torch_device)
    if config.train.batch_size < distributed.world_size():
        raise ConfigError(f"train.batch_size: {config.train.batch_size} is smaller than the number of "
                          f"processes ({distributed.world_size()})")
    if config.train.num_threads:
        torch.set_num_threads(config.train.num_threads)
    data = domain.load_data(config)  # bad data fails here, before the run directory exists
    prepare_run_dir(run_dir, resume)
    torch.manual_seed(config.train.seed)  # the same initial weights on every rank
    model = domain.build_model(config, data).to(torch_device)
    distributed.seed_rank(config.train.seed)
    objective = domain.pretrain_objective(config, data, torch_device)
    trainer = Trainer(model, objective, config.train, run_dir, domain.run_info(config, data),
                      domain.validation(config, data), tensorboard, progress,
                      bf16_autocast=torch_device.type == "cuda")
    if resume and not trainer.resume():
        log.info("no checkpoint in %s yet: starting from scratch", run_dir)
    if compile_model:
        model.denoiser.compile()  # in place: parameter names (and checkpoints) stay unchanged
    if distributed.is_main():
        save_config(config, run_dir / "config.yaml")
        log.info("training %s on %s x %d process(es): %s, %d parameters", config.name, torch_device,
                 distributed.world_size(), domain.describe_data(data), sum(p.numel() for p in model.parameters()))
    trainer.fit()
    return trainer
