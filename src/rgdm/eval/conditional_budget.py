"""Budget presets of EDM's conditional-generation protocol (``rgdm benchmark conditional --budget``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rgdm.config import ConfigError, _check_choice, _check_range


@dataclass
class ConditionalBudget:
    """Sizes of one run of the protocol. ``small`` fits in an hour of one CPU core per property."""

    name: str
    remove_h: bool = True  # heavy atoms only (generators, evaluator and reward model alike)
    samples: int = 500  # generated molecules per row (EDM: 10,000)
    sampling_steps: int = 100  # DDIM steps for every generated row; 0 = all T steps (ancestral)
    sample_batch: int = 250
    lower_bound_molecules: int = 5000  # D_b molecules for the Naive and lower-bound rows; 0 = all 50k
    pretrain_config: str = "configs/conditional_small.yaml"  # conditional EDM (data.conditioning is set per property)
    pretrain_overrides: dict[str, Any] = field(default_factory=dict)
    regressor_config: str = "configs/regressor_cpu.yaml"  # evaluator (D_a) and reward model (D_b); "" = EDM's
    regressor_overrides: dict[str, Any] = field(default_factory=dict)
    guidance_scales: tuple[float, ...] = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
    guidance_select_samples: int = 64  # molecules per trial scale (judged by the D_b regressor)
    rgdm_variant: str = "sequence"
    rgdm_steps: int = 400  # fine-tuning iterations (the wall-time cap usually stops it first)
    rgdm_minutes: float = 8.0  # wall-time cap per fine-tune; 0 = none
    rgdm_batch: int = 32  # roll-outs per iteration
    rgdm_sampling_steps: int = 50
    rgdm_lr: float = 5e-5
    rgdm_tau: float = 0.25
    rgdm_lambda_mle: float = 1.0
    reward_penalty: float = -3.0  # reward of a molecule the reward cannot score (in units of the property's MAD)
    physics_molecules: int = 400  # D_b molecules whose xTB values are the physics targets
    physics_samples: int = 300  # generated molecules per physics row
    xtb_workers: int = 1
    threads: int = 1  # torch threads; 0 = torch's default
    seed: int = 0
    progress: bool = True

    def validate(self) -> ConditionalBudget:
        for key in ("samples", "sample_batch", "guidance_select_samples", "rgdm_steps", "rgdm_batch",
                    "physics_molecules", "physics_samples", "xtb_workers"):
            _check_range(f"budget.{key}", getattr(self, key), low=1)
        for key in ("sampling_steps", "lower_bound_molecules", "rgdm_sampling_steps", "threads"):
            _check_range(f"budget.{key}", getattr(self, key), low=0)
        _check_range("budget.rgdm_minutes", self.rgdm_minutes, low=0.0)
        _check_range("budget.rgdm_lr", self.rgdm_lr, low=0.0)
        _check_range("budget.rgdm_tau", self.rgdm_tau, low=1e-6)
        _check_range("budget.rgdm_lambda_mle", self.rgdm_lambda_mle, low=0.0)
        _check_choice("budget.rgdm_variant", self.rgdm_variant, ("step", "sequence"))
        if any(s < 0 for s in self.guidance_scales):
            raise ConfigError("budget.guidance_scales: scales must be >= 0")
        return self


BUDGETS: dict[str, ConditionalBudget] = {
    # ~40-50 CPU minutes per property at one thread: 12 min conditional EDM, 2 × 8 min RGDM, sampling.
    "small": ConditionalBudget(name="small"),
    # EDM's sizes (with hydrogens, 10k samples, all 1000 steps): for a GPU, days on a CPU.
    "paper": ConditionalBudget(
        name="paper", remove_h=False, samples=10_000, sampling_steps=0, sample_batch=500, lower_bound_molecules=0,
        pretrain_config="configs/conditional_paper.yaml", regressor_config="", guidance_select_samples=256,
        rgdm_minutes=0.0, rgdm_steps=2000, rgdm_batch=64, rgdm_sampling_steps=100, physics_molecules=2000,
        physics_samples=2000, xtb_workers=8, threads=0),
    # Seconds, for tests: a few steps of tiny models on a few molecules.
    "tiny": ConditionalBudget(
        name="tiny", samples=6, sampling_steps=4, sample_batch=4, lower_bound_molecules=32,
        pretrain_overrides={"model.hidden_nf": 8, "model.n_layers": 1, "diffusion.timesteps": 20, "train.steps": 2,
                            "train.max_minutes": 0.0, "train.val_batches": 0, "train.checkpoint_every": 2,
                            "train.batch_size": 8, "data.max_train_molecules": 64},
        regressor_overrides={"model.hidden_nf": 8, "model.n_layers": 1, "train.steps": 2, "train.batch_size": 8,
                             "train.val_batches": 0, "train.checkpoint_every": 2, "train.max_minutes": 0.0,
                             "data.max_train_molecules": 64, "data.test_molecules": 16},
        guidance_scales=(0.0, 0.3), guidance_select_samples=4, rgdm_steps=1, rgdm_minutes=0.0, rgdm_batch=4,
        rgdm_sampling_steps=3, physics_molecules=6, physics_samples=4, progress=False),
}


def get_budget(name: str) -> ConditionalBudget:
    _check_choice("--budget", name, tuple(BUDGETS))
    return BUDGETS[name].validate()
