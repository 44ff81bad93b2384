"""PPO-clip (RLPF's baseline): the clip bounds how far replays of one batch move the policy, the
advantages are normalised within the batch, and ``method: ppo`` selects it by name."""

import math

import pytest
import torch

from conftest import sgd_train
from rgdm.config import FinetuneConfig
from rgdm.diffusion.analytic import standard_gaussian_diffusion
from rgdm.training.ddpo import DDPOConfig, DDPOObjective, batch_advantages
from rgdm.training.finetune import build_objective
from rgdm.training.tasks import GaussianTask

A = torch.tensor([1.0, -0.6])
CLIP = 1e-4  # DDPO's default; the test bed's policy is well conditioned, so the step size below is large


pytestmark = pytest.mark.usefixtures("single_thread")


def drift_over_replays(clip_range: float, epochs: int = 40) -> list[float]:
    """Replay one collected batch ``epochs`` times with plain SGD (no momentum: a zero gradient means no
    motion); the distance of the parameters from where the batch was collected after each update."""
    torch.manual_seed(0)
    model = standard_gaussian_diffusion(dim=2, timesteps=200)
    start = parameters(model)
    config = DDPOConfig(variant="is", batch_size=64, sampling_steps=20, inner_epochs=epochs, minibatches=1,
                        clip_range=clip_range, advantage_baseline="batch")
    objective = DDPOObjective(model, GaussianTask(2, lambda x: x @ A), config, seed=0)
    _, drift = sgd_train(objective, epochs, 1.0, lambda model, loss: (parameters(model) - start).norm().item(),
                         model=model)
    assert objective.reward_calls == 64  # every update replayed the one batch
    return drift


def parameters(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()]).clone()


def test_clip_bounds_the_update_and_the_unclipped_control_does_not():
    clipped = drift_over_replays(CLIP)
    unclipped = drift_over_replays(1e6)  # negative control: the same replays without the clip
    assert clipped[0] == pytest.approx(unclipped[0])  # the first update is inside the clip range
    # Clipped: terms whose ratio left 1 ± clip on their advantage's side stop contributing, so the
    # replays cannot walk away from the collecting policy.
    assert max(clipped) < 3 * clipped[0], clipped
    # Without the clip the same bound fails: every replay pushes further.
    assert unclipped[-1] > 10 * unclipped[0], unclipped
    assert unclipped[-1] > unclipped[len(unclipped) // 2] > unclipped[1]


def test_batch_advantages_are_normalised_per_batch_and_target():
    rewards = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0])
    targets = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0])
    advantages = batch_advantages(rewards, targets)
    assert torch.allclose(advantages[:3], torch.tensor([-1.0, 0.0, 1.0]), atol=1e-4)
    assert torch.allclose(advantages[3:], torch.tensor([-1.0, 1.0]) / math.sqrt(2), atol=1e-4)
    plain = batch_advantages(rewards, None)
    assert plain.mean().abs() < 1e-6 and plain.std().item() == pytest.approx(1.0, abs=1e-4)


def test_ppo_is_a_method_by_name():
    config = FinetuneConfig(base="qm9-noh-small", method="ppo").validate()
    section = config.method_config
    assert (section.variant, section.advantage_baseline) == ("is", "batch")
    assert section.updates_per_batch > 1  # several optimizer updates per collected batch
    model = standard_gaussian_diffusion(dim=2, timesteps=50)
    objective = build_objective(config, model, GaussianTask(2, lambda x: x @ A))
    assert isinstance(objective, DDPOObjective) and objective.name == "ppo-clip"
    assert objective.config is section
