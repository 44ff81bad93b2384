"""Reward-driven fine-tuning of a pre-trained model of any domain, as one function (and, for
molecules, with the before/after report)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from rgdm import distributed
from rgdm.config import ConfigError, FinetuneConfig, save_config
from rgdm.runs import load_model
from rgdm.training.loop import Trainer
from rgdm.training.pretrain import prepare_run_dir
from rgdm.training.rgdm import RGDMObjective
from rgdm.training.tasks import Task

log = logging.getLogger("rgdm.training")


def join_process_group(batch_size: int, device: torch.device | None = None) -> None:
    """Join ``torchrun``'s process group (gloo on the CPU, nccl on CUDA); every rank needs a roll-out."""
    distributed.init_from_env(device or torch.device("cpu"))
    if batch_size < distributed.world_size():
        raise ConfigError(f"batch_size: {batch_size} roll-outs per iteration cannot be split over "
                          f"{distributed.world_size()} processes")


def build_objective(config: Any, model, task: Task):
    """The objective of ``config.method`` on the shared training loop."""
    if config.method in ("ddpo", "ppo"):
        from rgdm.training.ddpo import DDPOObjective

        name = "ppo-clip" if config.method == "ppo" else None
        return DDPOObjective(model, task, config.method_config, seed=config.train.seed, name=name)
    if config.method == "rwr":
        from rgdm.training.rwr import RWRObjective

        return RWRObjective(model, task, config.rwr, seed=config.train.seed)
    return RGDMObjective(model, task, config.rgdm, seed=config.train.seed)


def finetune(config: Any, run_dir: str | Path, resume: bool = False, progress: bool = True,
             tensorboard: bool = True, reward=None, device: str = "cpu") -> Trainer:
    """Fine-tune ``config.base`` toward ``config.reward`` with ``config.method`` (RGDM, or the DDPO
    and RWR baselines) in ``run_dir``, resumable bit-for-bit.

    ``config`` is the fine-tuning config of a domain (``rgdm.domains``): a ``FinetuneConfig``
    (molecules), a ``ShapeFinetuneConfig`` (shapes), an ``AnalyticFinetuneConfig``; the domain
    loads the base model and builds the reward, the task and the evaluation during training.
    ``reward`` overrides ``config.reward`` with a reward object (e.g. ``reward_from_function(f)``).
    Launched by ``torchrun``, every process rolls out and scores its share of each global batch
    and the run follows the single-process trajectory; rank 0 writes the run.

    ``device``: ``auto``, ``cpu`` or ``cuda``. The model, the roll-outs' tensors and their random
    generators live there (``distributed.generator_on``); on CUDA the network runs under bfloat16
    autocast while log-probabilities, weights and losses stay float32. Rewards are always computed on
    the CPU (their scores are moved to the device). CPU runs draw exactly the numbers they always did.
    """
    from rgdm.domains import domain_of_config

    domain = domain_of_config(config)
    config.validate()
    run_dir = Path(run_dir)
    torch_device = distributed.resolve_device(device)
    join_process_group(config.method_config.batch_size, torch_device)
    if config.train.num_threads:
        torch.set_num_threads(config.train.num_threads)
    loaded = domain.load_model(config.base, device=torch_device)  # a missing base fails before the run dir exists
    prepare_run_dir(run_dir, resume)
    distributed.seed_rank(config.train.seed)
    model = loaded.model.train()
    model.bf16_network = torch_device.type == "cuda"  # before the objective copies it as its reference
    reward = reward if reward is not None else domain.make_reward(config.reward)
    task = domain.build_task(config, loaded, model, reward)
    objective = build_objective(config, model, task)
    trainer = Trainer(model, objective, config.train, run_dir, domain.finetune_run_info(config, loaded),
                      domain.finetune_validation(config, task, torch_device), tensorboard, progress)
    if resume and not trainer.resume():
        log.info("no checkpoint in %s yet: starting from the pre-trained model", run_dir)
    if distributed.is_main():
        save_config(config, run_dir / "config.yaml")
    try:
        trainer.fit()
    finally:
        if hasattr(reward, "close"):
            reward.close()
    return trainer


# Reverse steps (DDIM) of the before/after samples of report.md: one sampler for every method, so that
# the "before" row of a method's report is the same numbers whichever method was trained.
REPORT_SAMPLING_STEPS = 50


def finetune_and_report(config: FinetuneConfig, run_dir: str | Path, resume: bool = False, compare: int = 200,
                        command: str = "", progress: bool = True, sampling_steps: int = REPORT_SAMPLING_STEPS,
                        device: str = "cpu") -> dict[str, dict[str, float]] | None:
    """Fine-tune, then sample ``compare`` molecules before and after (``sampling_steps`` DDIM steps,
    whatever the method trained with) and write ``report.md`` and ``report.html``. "After" is the model
    the run's checkpoint samples: the EMA copy when ``train.ema_decay`` > 0, as ``rgdm sample`` loads it."""
    from rgdm.domains import domain_of_config
    from rgdm.report import finetune_report
    from rgdm.rewards import make_reward

    trainer = finetune(config, run_dir, resume=resume, progress=progress, device=device)
    if not compare or not distributed.is_main():
        return None
    base = load_model(config.base, device=distributed.module_device(trainer.model))
    base.model.bf16_network = trainer.model.bf16_network
    with make_reward(config.reward) as reward:
        task = domain_of_config(config).build_task(config, base, base.model, reward)
        return finetune_report(run_dir, base.model, trainer.sampling_model, task, compare, sampling_steps,
                               config.reward["name"], config.target, command, seed=config.train.seed + 1,
                               progress=progress, reward_config=config.reward)
