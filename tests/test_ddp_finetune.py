"""Data-parallel fine-tuning: two gloo processes follow the single-process trajectory.

Each rank rolls out and scores its rows of the global batch (an odd batch, so the split is
uneven); rewards are gathered for the weights, normaliser and advantages; gradients are summed.
After a few optimizer steps the parameters must match a single process on the same global batch.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from conftest import free_port
from rgdm import distributed
from rgdm.config import RGDMConfig, TrainConfig
from rgdm.training.checkpoint import checkpoint_paths, load_checkpoint

STEPS = 3
TRAIN = dict(steps=STEPS, lr=1e-3, ema_decay=0.9, log_every=1, checkpoint_every=100, num_threads=1)

# name -> (objective kind, config kwargs, lambda_mle data batch)
CASES = {
    "rgdm_step": ("rgdm", dict(batch_size=5, sampling_steps=6, num_candidates=4, explore_steps=2, shift="best_probe",
                               num_probes=4, normalize_rewards=True, normalizer_min_count=2, adapt_tau=True,
                               kl_weight=0.1), 0),
    "rgdm_sequence": ("rgdm", dict(variant="sequence", batch_size=5, sampling_steps=6, lambda_mle=0.5,
                                   mle_batch_size=7), 7),
    "rgdm_sequence_drawn": ("rgdm", dict(variant="sequence", batch_size=5, sampling_steps=6,
                                         sequence_proposal="reference", sequence_pool=3, sequence_minibatch=2,
                                         sequence_draw="weights", denoising_repeats=2), 0),
    "ddpo_is": ("ddpo", dict(variant="is", batch_size=6, sampling_steps=5, minibatches=2, inner_epochs=2,
                             timestep_fraction=0.6, kl_coef=0.1, clip_range=0.2), 0),
    "rwr_importance": ("rwr", dict(variant="importance_ratio", batch_size=5, sampling_steps=5,
                                   normalize_rewards=True, normalizer_min_count=2), 0),
}


def run_case(name: str, base: str, run_dir: str) -> None:
    """Fine-tune the tiny base model with one objective for STEPS steps in ``run_dir``."""
    from rgdm.rewards import make_reward
    from rgdm.runs import load_model, load_training_data
    from rgdm.training.ddpo import DDPOConfig, DDPOObjective
    from rgdm.training.loop import Trainer
    from rgdm.training.rgdm import RGDMObjective
    from rgdm.training.rwr import RWRConfig, RWRObjective
    from rgdm.training.tasks import MoleculeTask

    kind, kwargs, data_batch = CASES[name]
    loaded = load_model(base)
    model = loaded.model.train()
    distributed.seed_rank(0)
    dataset = load_training_data(loaded.config) if data_batch else None
    reward = make_reward({"name": "qed", "method": "edm", "backend": "inline"})
    task = MoleculeTask(model, reward, dataset, mle_batch_size=data_batch, seed=0)
    if kind == "rgdm":
        config = RGDMConfig(**kwargs)
        config.validate()
        objective = RGDMObjective(model, task, config, seed=0)
    elif kind == "ddpo":
        objective = DDPOObjective(model, task, DDPOConfig(**kwargs), seed=0)
    else:
        objective = RWRObjective(model, task, RWRConfig(**kwargs), seed=0)
    trainer = Trainer(model, objective, TrainConfig(**TRAIN), run_dir, {"kind": "test"}, tensorboard=False,
                      progress=False)
    trainer.fit()


def _worker(rank: int, world: int, port: int, base: str, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    assert distributed.init_from_env()
    try:
        for name in CASES:
            run_case(name, base, os.path.join(out_dir, name))
    finally:
        distributed.shutdown()


def final(run_dir) -> dict:
    return load_checkpoint(checkpoint_paths(run_dir / "checkpoints")[-1])


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory, tiny_pretrained):
    out = tmp_path_factory.mktemp("ddp_finetune")
    mp.start_processes(_worker, args=(2, free_port(), str(tiny_pretrained), str(out)), nprocs=2,
                       start_method="spawn")
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_match_single_process(name, two_process_runs, tiny_pretrained, tmp_path):
    run_case(name, str(tiny_pretrained), str(tmp_path / name))
    ddp, single = final(two_process_runs / name), final(tmp_path / name)
    assert ddp["step"] == single["step"] == STEPS
    assert ddp["objective"]["reward_calls"] == single["objective"]["reward_calls"] > 0
    for key in ("model", "ema"):
        for param, value in single[key].items():
            torch.testing.assert_close(ddp[key][param], value, rtol=0, atol=1e-5, msg=f"{key}.{param}")
    # The comparison is not between two untouched copies of the base model.
    base = load_checkpoint(checkpoint_paths(tiny_pretrained / "checkpoints")[-1])["model"]
    assert any((single["model"][k] - base[k]).abs().max() > 1e-4 for k in base if base[k].numel())
    # The objective's own state (reward normaliser / stat tracker) is the global batch's on rank 0.
    for part in ("normalizer", "tracker"):
        if part in single["objective"]:
            assert ddp["objective"][part] == single["objective"][part]
