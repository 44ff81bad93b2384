"""Molecules (QM9 or the user's .xyz/SDF files): EDM's EGNN over zero-centre-of-mass positions and
one-hot atom types, with node masks for molecules of different sizes.

The pieces live where they always did (``rgdm.runs`` builds and loads models, ``rgdm.training.mle``
is the denoising loss, ``rgdm.training.tasks.MoleculeTask`` the fine-tuning task, ``rgdm.eval``
the metrics); this module hands them to the shared code paths. The commands are in
``rgdm.cli_molecules``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rgdm import distributed
from rgdm.config import FINETUNE_METHODS, FinetuneConfig, RunConfig
from rgdm.diffusion.molecules import MoleculeDiffusion
from rgdm.domains import Samples, TrainingData
from rgdm.training.tasks import MoleculeTask


class MoleculeDomain:
    name = "molecules"
    noun = "molecule"  # in messages: "not a molecule model"
    run_config = RunConfig
    finetune_config = FinetuneConfig
    methods = FINETUNE_METHODS

    # --- data, model and state space ----------------------------------------------------------- #
    def load_data(self, config: RunConfig) -> TrainingData:
        from rgdm.runs import load_training_data, load_validation_data

        return TrainingData(load_training_data(config), load_validation_data(config))

    def describe_data(self, data: TrainingData) -> str:
        return f"{len(data.train)} molecules"

    def build_model(self, config: RunConfig, data: TrainingData) -> MoleculeDiffusion:
        from rgdm.runs import build_model, spec_for

        return build_model(config, spec_for(config, data.train), data.train)

    def pretrain_objective(self, config: RunConfig, data: TrainingData, device: Any):
        from rgdm.training.mle import DenoisingObjective

        return DenoisingObjective(data.train, config.train.batch_size, config.train.seed, device)

    def validation(self, config: RunConfig, data: TrainingData) -> Callable[[nn.Module, int], dict[str, float]]:
        from rgdm.training.mle import validation_loss

        def evaluate(ema_model: nn.Module, step: int) -> dict[str, float]:
            if data.val is None or config.train.val_batches == 0:
                return {}
            return {"val_loss": validation_loss(ema_model, data.val, config.train.batch_size,
                                                config.train.val_batches)}

        return evaluate

    def run_info(self, config: RunConfig, data: TrainingData) -> dict[str, Any]:
        from rgdm.runs import spec_for

        return {"kind": "pretrain", "config": config.to_dict(), "model_spec": spec_for(config, data.train).to_dict()}

    def load_model(self, source: str | Path, use_ema: bool = True, device: Any = "cpu"):
        from rgdm import runs

        return runs.load_model(source, use_ema=use_ema, device=device)

    # --- fine-tuning --------------------------------------------------------------------------- #
    def make_reward(self, config: dict[str, Any]):
        from rgdm.rewards import make_reward

        return make_reward(config)

    def build_task(self, config: FinetuneConfig, loaded: Any, model: MoleculeDiffusion, reward: Any) -> MoleculeTask:
        """Node counts (and per-sample targets) from the base model's training data where asked for."""
        from rgdm.runs import load_training_data

        method = config.method_config
        needs_data = method.lambda_mle > 0 or bool(config.target_from_data)
        dataset = load_training_data(loaded.config) if needs_data else None
        target: Any = "data" if config.target_from_data else config.target
        return MoleculeTask(model, reward, dataset, target=target, target_property=config.target_from_data or None,
                            mle_batch_size=method.mle_batch_size if method.lambda_mle > 0 else 0,
                            seed=config.train.seed)

    def finetune_validation(self, config: FinetuneConfig, task: MoleculeTask,
                            device: Any) -> Callable[[nn.Module, int], dict[str, float]]:
        """EDM's metrics, connected validity and the reward of ``config.eval_samples`` fresh samples."""
        from rgdm.eval.molecules import evaluate_molecules
        from rgdm.eval.strict import strict_metrics

        sampling_steps = config.method_config.sampling_steps or None

        def evaluate(current: nn.Module, step: int) -> dict[str, float]:
            if config.eval_samples == 0:
                return {}
            generator = torch.Generator(device=torch.device(device)).manual_seed(10_000 + config.train.seed)
            cond = task.conditions(config.eval_samples, generator)
            current.eval()
            x0 = current.sample(cond.shape, cond.node_mask, cond.context, num_steps=sampling_steps,
                                generator=generator)
            batch = task.decode(x0, cond)
            metrics = evaluate_molecules(batch)
            scores = task.score(x0, cond)
            out = {f"eval_{k}": float(v) for k, v in metrics.items() if k != "n_molecules"}
            # the strict row's cheap part (no PoseBusters during training): one fragment holds every atom
            out["eval_connected_validity"] = float(strict_metrics(batch, posebusters=False)["connected_validity"])
            out["eval_reward_mean"] = scores.values.mean().item()
            if scores.property is not None and torch.isfinite(scores.property).any():
                out["eval_property_mean"] = scores.property[torch.isfinite(scores.property)].mean().item()
            return out

        return evaluate

    def finetune_run_info(self, config: FinetuneConfig, loaded: Any) -> dict[str, Any]:
        return {"kind": "finetune", "config": config.to_dict(), "base_config": loaded.config.to_dict(),
                "model_spec": loaded.spec.to_dict(), "base_checkpoint": str(loaded.checkpoint)}

    # --- samples, metrics and renders ---------------------------------------------------------- #
    @torch.no_grad()
    def sample(self, model: MoleculeDiffusion, n: int, num_steps: int | None = None, seed: int = 0) -> Samples:
        """Unconditional samples: node counts from the data distribution the model stores (drawn on its device)."""
        generator = distributed.generator_on(distributed.module_device(model), seed)
        node_mask = model.mask_from_counts(model.sample_node_counts(n, generator))
        x = model.sample((n, node_mask.shape[1], 3 + model.n_features), node_mask, None, num_steps,
                         generator=generator)
        return Samples(x, node_mask)

    def metrics(self, model: MoleculeDiffusion, samples: Samples) -> dict[str, float]:
        """EDM's stability, validity and uniqueness of the decoded molecules."""
        from rgdm.eval.molecules import evaluate_molecules

        return {k: float(v) for k, v in evaluate_molecules(model.decode(samples.x, samples.node_mask)).items()}

    def render(self, model: MoleculeDiffusion, samples: Samples, out: Path) -> Path:
        from rgdm.viz.plots import render_molecules

        molecules = [(symbols, positions.numpy()) for symbols, positions in
                     model.decode(samples.x, samples.node_mask).molecules()[:8]]
        return render_molecules(molecules, out)

    # --- commands (rgdm.cli) ------------------------------------------------------------------- #
    def pretrain_command(self, request: Any) -> None:
        from rgdm.cli_molecules import pretrain_command

        pretrain_command(request)

    def finetune_command(self, request: Any) -> None:
        from rgdm.cli_molecules import finetune_command

        finetune_command(request)

    def evaluate_command(self, request: Any) -> None:
        from rgdm.cli_molecules import evaluate_command

        evaluate_command(request)


DOMAIN = MoleculeDomain()
