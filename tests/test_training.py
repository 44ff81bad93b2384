"""The training loop: exact resume, atomic checkpoints, clear errors on bad runs."""

import pytest
import torch

from conftest import tiny_run_config
from rgdm.config import ConfigError, RunConfig, from_dict
from rgdm.runs import load_model
from rgdm.training.checkpoint import CheckpointError, checkpoint_paths, load_checkpoint
from rgdm.training.pretrain import RunExistsError, pretrain


def tiny_config(steps: int, **train) -> RunConfig:
    return tiny_run_config(steps, **train)


def final_state(run_dir):
    return load_checkpoint(checkpoint_paths(run_dir / "checkpoints")[-1])


def assert_same_state(a, b):
    assert a["step"] == b["step"]
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"
    opt_a, opt_b = a["optimizer"]["state"], b["optimizer"]["state"]
    for idx in opt_a:
        for k in opt_a[idx]:
            assert torch.equal(opt_a[idx][k], opt_b[idx][k])
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])


@pytest.mark.parametrize("anchor", [0.0, 100.0])
def test_resume_is_bit_for_bit(tmp_path, qm9_all, anchor):
    n = 5
    pretrain(tiny_config(2 * n, anchor=anchor), tmp_path / "straight", progress=False, tensorboard=False)
    pretrain(tiny_config(n, anchor=anchor), tmp_path / "resumed", progress=False, tensorboard=False)
    pretrain(tiny_config(2 * n, anchor=anchor), tmp_path / "resumed", resume=True, progress=False,
             tensorboard=False)
    straight, resumed = final_state(tmp_path / "straight"), final_state(tmp_path / "resumed")
    assert_same_state(straight, resumed)
    if anchor:
        for name, start in straight["anchor"].items():
            assert torch.equal(start, resumed["anchor"][name]), f"anchor.{name} differs"
    # The metrics log matches before the interruption and at the end (wall time aside); the row
    # logged when the first segment stopped averages a shorter window, by design.
    straight_rows = metrics_without_time(tmp_path / "straight")
    resumed_rows = metrics_without_time(tmp_path / "resumed")
    assert [r for r in straight_rows if int(r["step"]) < n] == [r for r in resumed_rows if int(r["step"]) < n]
    assert straight_rows[-1] == resumed_rows[-1]


def metrics_without_time(run_dir):
    import csv

    with (run_dir / "metrics.csv").open() as handle:
        return [{k: v for k, v in row.items() if k != "wall_seconds"} for row in csv.DictReader(handle)]


def test_training_reduces_loss_and_model_reloads(tmp_path, qm9_all):
    trainer = pretrain(tiny_config(30, lr=2e-3, log_every=10), tmp_path / "run", progress=False, tensorboard=False)
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    losses = [float(r.split(",")[header.index("loss")]) for r in rows[1:]]
    assert losses[-1] < losses[0]
    loaded = load_model(tmp_path / "run")
    assert loaded.step == 30
    for name, p in trainer.ema.module.state_dict().items():
        assert torch.equal(p, loaded.model.state_dict()[name])
    batch = loaded.model.sample_molecules(3, num_steps=5, generator=torch.Generator().manual_seed(0))
    assert batch.positions.shape[0] == 3 and set(batch.elements) == {"C", "N", "O", "F"}


def test_anchor_pulls_the_weights_toward_their_start(tmp_path, qm9_all):
    """``lr * anchor = 1`` puts the weights back at their start after every step; a weaker pull keeps
    them closer to it than no pull, on the same data and seed."""
    def distance_from_start(anchor: float, name: str) -> float:
        trainer = pretrain(tiny_config(6, lr=1e-3, anchor=anchor), tmp_path / name, progress=False,
                           tensorboard=False)
        start = final_state(tmp_path / name)["anchor"] if anchor else None
        if start is None:  # the same seed builds the same initial weights
            untrained = pretrain(tiny_config(6, lr=0.0), tmp_path / f"{name}-init", progress=False,
                                 tensorboard=False).model
            start = {n: p.detach() for n, p in untrained.named_parameters()}
        return sum(float((p.detach() - start[n]).norm() ** 2) for n, p in trainer.model.named_parameters()) ** 0.5

    assert distance_from_start(1e3, "full") == 0.0
    free, pulled = distance_from_start(0.0, "free"), distance_from_start(100.0, "pulled")
    assert 0.0 < pulled < free


def test_anchor_must_not_overshoot_the_start():
    with pytest.raises(ConfigError, match="train.anchor: lr \\* anchor"):
        from_dict(RunConfig, {"train": {"lr": 1e-3, "anchor": 2e3}}).validate()


def test_an_option_newer_than_the_checkpoint_is_no_change_while_it_does_what_came_before():
    from rgdm.training.loop import _changed_keys

    old = {"train": {"lr": 1e-4}}
    assert _changed_keys(old, {"train": {"lr": 1e-4, "anchor": 0.0}}) == []
    assert _changed_keys(old, {"train": {"lr": 1e-4, "anchor": 5.0}}) == ["train.anchor"]
    # An option whose earlier behaviour is a value of its own: unchanged at that value only.
    old = {"rgdm": {"tau": 0.25}}
    assert _changed_keys(old, {"rgdm": {"tau": 0.25, "sequence_draw": "batches", "denoising_t_max": 1.0}}) == []
    assert _changed_keys(old, {"rgdm": {"tau": 0.25, "sequence_draw": "weights", "denoising_t_max": 0.2}}) == [
        "rgdm.denoising_t_max", "rgdm.sequence_draw"]


def test_existing_run_is_not_overwritten(tmp_path, qm9_all):
    pretrain(tiny_config(1), tmp_path / "run", progress=False, tensorboard=False)
    with pytest.raises(RunExistsError, match=r"resume=True") as refused:
        pretrain(tiny_config(1), tmp_path / "run", progress=False, tensorboard=False)
    assert "--" not in str(refused.value)  # the Python API speaks of arguments, not command-line flags


def test_resume_with_different_config_is_refused(tmp_path, qm9_all):
    pretrain(tiny_config(1), tmp_path / "run", progress=False, tensorboard=False)
    other = tiny_config(2, lr=1e-3)
    with pytest.raises(CheckpointError, match="train.lr"):
        pretrain(other, tmp_path / "run", resume=True, progress=False, tensorboard=False)


def test_corrupt_latest_checkpoint_falls_back(tmp_path, qm9_all):
    pretrain(tiny_config(4, checkpoint_every=2), tmp_path / "run", progress=False, tensorboard=False)
    paths = checkpoint_paths(tmp_path / "run" / "checkpoints")
    assert [p.name for p in paths] == ["step_00000002.pt", "step_00000004.pt"]
    paths[-1].write_bytes(paths[-1].read_bytes()[:1000])  # truncated write
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(paths[-1])
    assert load_model(tmp_path / "run").step == 2


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"model.hiden_nf: unknown key \(did you mean 'hidden_nf'\?\)"):
        from_dict(RunConfig, {"model": {"hiden_nf": 3}})
    with pytest.raises(ConfigError, match="train.steps: expected an integer"):
        from_dict(RunConfig, {"train": {"steps": "many"}})
    with pytest.raises(ConfigError, match="train.lr: -1.0 is outside"):
        from_dict(RunConfig, {"train": {"lr": -1}}).validate()
    with pytest.raises(ConfigError, match="diffusion.schedule"):
        from_dict(RunConfig, {"diffusion": {"schedule": "cosin"}}).validate()


def test_exponent_without_dot_is_a_number():
    # YAML 1.1 (PyYAML) reads 5e-5 as a string; a float field accepts it anyway.
    assert from_dict(RunConfig, {"train": {"lr": "5e-5"}}).train.lr == 5e-5
    with pytest.raises(ConfigError, match="train.lr: expected a number"):
        from_dict(RunConfig, {"train": {"lr": "fast"}})


def test_a_section_given_in_part_keeps_its_fields_own_defaults(tmp_path):
    """``train: {steps: 100}`` in a fine-tuning file keeps fine-tuning's learning rate and EMA (not
    TrainConfig's pre-training defaults), and ``ppo: {batch_size: 16}`` keeps PPO-clip's settings."""
    from rgdm.config import FinetuneConfig, load_config, ppo_clip_defaults

    path = tmp_path / "finetune.yaml"
    path.write_text("base: qm9-noh-small\nmethod: ppo\ntrain:\n  steps: 100\nppo:\n  batch_size: 16\n")
    config = load_config(path, FinetuneConfig)
    defaults = FinetuneConfig()
    assert config.train.steps == 100
    assert (config.train.lr, config.train.ema_decay, config.train.grad_clip) == (
        defaults.train.lr, defaults.train.ema_decay, defaults.train.grad_clip)
    assert config.ppo.batch_size == 16
    assert config.ppo.advantage_baseline == ppo_clip_defaults().advantage_baseline == "batch"
    assert config.ppo.inner_epochs == ppo_clip_defaults().inner_epochs
    # a complete section is taken as given, and a class-default section is unchanged
    assert from_dict(RunConfig, {"train": {"steps": 7}}).train.lr == RunConfig().train.lr
