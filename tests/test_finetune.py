"""Fine-tuning a QM9 model with RGDM: exact resume, the report, and rewards that fail."""

import math

import pytest
import torch

from rgdm.config import DDPOConfig, FinetuneConfig, RGDMConfig, RWRConfig, TrainConfig
from rgdm.rewards import reward_from_function
from rgdm.runs import load_model
from rgdm.training.checkpoint import checkpoint_paths, load_checkpoint
from rgdm.training.finetune import finetune


def tiny_finetune_config(base, steps: int, method: str = "rgdm", **rgdm) -> FinetuneConfig:
    return FinetuneConfig(
        name="ft", base=str(base), method=method, reward={"name": "qed", "method": "edm", "backend": "inline"},
        rgdm=RGDMConfig(batch_size=4, sampling_steps=8, num_candidates=4, explore_steps=2, **rgdm),
        ddpo=DDPOConfig(batch_size=4, sampling_steps=6, minibatches=2, clip_range=0.2),
        rwr=RWRConfig(batch_size=4, sampling_steps=6, lambda_mle=0.5, mle_batch_size=8),
        train=TrainConfig(steps=steps, lr=1e-3, ema_decay=0.0, log_every=1, val_every=3, checkpoint_every=100),
        eval_samples=4,
    ).validate()


def final_state(run_dir):
    return load_checkpoint(checkpoint_paths(run_dir / "checkpoints")[-1])


REFRESHED = {"variant": "sequence", "sequence_loss": "path", "reference_refresh": 2, "first_step_kl": 1.0}
# the base mix and the atom-type KL each keep a frozen copy of the pre-trained model in the objective
MIXED = {"variant": "step", "replay": 2, "reference_refresh": 2, "reference_base_mix": 0.3, "first_step_kl": 1.0,
         "atom_type_kl": 1.0}


@pytest.mark.parametrize("method, settings", [("rgdm", {"variant": "step"}), ("rgdm", {"variant": "sequence"}),
                                              ("rgdm", REFRESHED), ("rgdm", MIXED), ("ddpo", {}), ("rwr", {})])
def test_finetune_resume_is_bit_for_bit(tmp_path, tiny_pretrained, method, settings):
    """Every method of `rgdm finetune`; DDPO resumes mid-way through a collected batch (2 minibatches);
    the refreshed reference of RGDM (copied at steps 2 and 4, resumed at 3), mixed with the pre-trained
    model or not, comes back with the run."""
    n = 3
    config = lambda steps: tiny_finetune_config(tiny_pretrained, steps, method, **settings)  # noqa: E731
    finetune(config(2 * n), tmp_path / "a", progress=False, tensorboard=False)
    finetune(config(n), tmp_path / "b", progress=False, tensorboard=False)
    finetune(config(2 * n), tmp_path / "b", resume=True, progress=False, tensorboard=False)
    a, b = final_state(tmp_path / "a"), final_state(tmp_path / "b")
    assert a["step"] == b["step"] == 2 * n
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    assert a["objective"]["reward_calls"] == b["objective"]["reward_calls"] > 0
    # The fine-tuned weights moved away from the pre-trained ones (the objective did something).
    ref = load_model(str(tiny_pretrained)).model.state_dict()
    assert any(not torch.equal(a["model"][k], ref[k]) for k in ref)


def flaky(molecules):
    """Raises on every third call, returns NaN for odd-sized molecules otherwise."""
    flaky.calls = getattr(flaky, "calls", 0) + 1
    if flaky.calls % 3 == 0:
        raise RuntimeError("the black box fell over")
    return [math.nan if len(m.symbols) % 2 else float(len(m.symbols)) for m in molecules]


def test_failing_reward_is_isolated_and_training_goes_on(tmp_path, tiny_pretrained):
    reward = reward_from_function(flaky, backend="inline", per_molecule=False, penalty=-3.0)
    trainer = finetune(tiny_finetune_config(tiny_pretrained, 4), tmp_path / "run", progress=False,
                       tensorboard=False, reward=reward)
    assert trainer.step == 4
    stats = reward.stats()
    assert stats["errors"] + stats["nonfinite"] > 0
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 5 and "invalid_fraction" in rows[0]
