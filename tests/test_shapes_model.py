"""Point-cloud diffusion on shapes: denoiser symmetry, zero-mean state space, classifier, rewards, RGDM."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rgdm.config import ConfigError, RGDMConfig, TrainConfig, load_config
from rgdm.data.shapes import load_shapes
from rgdm.diffusion.pointclouds import PointCloudDiffusion
from rgdm.diffusion.schedule import NoiseSchedule
from rgdm.models.pointnet import PointNetDenoiser
from rgdm.rewards import make_reward, reward_from_function
from rgdm.training.classifier import ClassifierConfig, load_classifier, train_classifier
from rgdm.training.ddpo import DDPOConfig, DDPOObjective
from rgdm.training.rgdm import RGDMObjective
from rgdm.training.shape_configs import ShapeDataConfig, ShapeRunConfig
from rgdm.training.shapes import ShapeTask

TWO_CLASSES = ["ring_knot", "blob"]


def tiny_model(conditional: bool = False, num_points: int = 32, knn: int = 0) -> PointCloudDiffusion:
    torch.manual_seed(0)
    classes = ("a", "b", "c")
    denoiser = PointNetDenoiser(width=16, n_blocks=2, time_dim=8, num_classes=len(classes) if conditional else 0,
                                knn=knn, edge_width=8)
    # The head, the skip and the blocks' FiLM gates start at zero (every block the identity); give
    # every zero weight a value so the symmetry tests see all paths of the network.
    with torch.no_grad():
        for parameter in denoiser.parameters():
            if not parameter.any():
                parameter.normal_(std=0.3)
    return PointCloudDiffusion(denoiser, NoiseSchedule(20, "cosine"), num_points, classes, conditional=conditional)


def test_fresh_denoiser_predicts_zero_noise_and_validates_its_sizes():
    denoiser = PointNetDenoiser(width=16, n_blocks=2, time_dim=8, knn=4, edge_width=8)
    assert denoiser(torch.randn(2, 32, 3), torch.tensor([0.2, 0.7])).abs().max() == 0.0
    with pytest.raises(ValueError, match="knn must be >= 0"):
        PointNetDenoiser(knn=-1)


@pytest.mark.parametrize(("conditional", "knn"), [(False, 0), (True, 0), (False, 4), (True, 4)])
def test_denoiser_is_permutation_equivariant(conditional, knn):
    model = tiny_model(conditional, knn=knn)
    z = torch.randn(3, 32, 3)
    t = torch.tensor([0.1, 0.5, 0.9])
    context = model.context_for(["a", "c", "b"])
    permutation = torch.randperm(32)
    eps = model.denoiser(z, t, None, context)
    eps_of_permuted = model.denoiser(z[:, permutation], t, None, context)
    assert eps.abs().max() > 1e-3  # a real output, not the zero-initialised head
    torch.testing.assert_close(eps_of_permuted, eps[:, permutation], atol=1e-5, rtol=1e-5)


def test_class_context_and_time_change_the_prediction_and_context_is_required():
    model = tiny_model(conditional=True, knn=4)
    z, t = torch.randn(2, 32, 3), torch.tensor([0.3, 0.3])
    a = model.denoiser(z, t, None, model.context_for(["a", "a"]))
    b = model.denoiser(z, t, None, model.context_for(["b", "b"]))
    assert (a - b).abs().max() > 1e-4
    later = model.denoiser(z, torch.tensor([0.8, 0.8]), None, model.context_for(["a", "a"]))
    assert (a - later).abs().max() > 1e-4
    with pytest.raises(ValueError, match="class-conditional"):
        model.denoiser(z, t, None, None)
    with pytest.raises(ValueError, match="unknown class 'zebra'"):
        model.context_for(["zebra"])


def test_states_samples_and_noise_stay_zero_mean():
    model = tiny_model()
    noise = model.noise(torch.empty(4, 32, 3), generator=torch.Generator().manual_seed(1))
    assert noise.mean(dim=1).abs().max() < 1e-6
    assert noise.pow(2).sum(dim=(1, 2)).mean() == pytest.approx(3 * 31, rel=0.2)  # dof = 3 (P - 1)
    shifted = torch.randn(4, 32, 3) + 5.0
    assert model.project(shifted).mean(dim=1).abs().max() < 1e-5
    samples, trajectory = model.sample((4, 32, 3), num_steps=5, return_trajectory=True,
                                       generator=torch.Generator().manual_seed(2))
    for state in [*trajectory, samples]:  # zero up to float32 rounding of the coordinates
        assert state.mean(dim=1).abs().max() < 1e-6 * state.abs().max() + 1e-6
    assert torch.isfinite(model.loss(shifted - shifted.mean(1, keepdim=True))).all()
    assert model.dof(samples).tolist() == [93.0] * 4


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory):
    """A classifier of two shipped classes, trained for a few seconds (256-point clouds)."""
    run_dir = tmp_path_factory.mktemp("classifier") / "clf"
    config = ClassifierConfig(name="clf", data=ShapeDataConfig(classes=TWO_CLASSES, n_points=256), width=32,
                              train=TrainConfig(steps=60, batch_size=32, lr=3e-3, ema_decay=0.0, log_every=20,
                                                val_every=60, checkpoint_every=60))
    metrics = train_classifier(config, run_dir, progress=False)
    return run_dir, metrics


def test_classifier_beats_chance_on_the_test_split(tiny_classifier):
    run_dir, metrics = tiny_classifier
    assert metrics["accuracy"] > 0.8  # chance is 0.5 for two classes
    model = load_classifier(run_dir)
    assert model.class_names == tuple(TWO_CLASSES)
    clouds = torch.randn(2, 100, 3)
    # The classifier judges shape only: shifting and scaling a cloud does not change its logits.
    torch.testing.assert_close(model(clouds * 3.0 + 1.0), model(clouds), atol=1e-4, rtol=1e-4)


def test_shape_class_reward_prefers_the_target_class(tiny_classifier):
    import rgdm.rewards.shapes  # noqa: F401 - registers the shape rewards

    run_dir, _ = tiny_classifier
    test = load_shapes("test", n_points=256, classes=TWO_CLASSES)
    reward = make_reward({"name": "shape_class", "model": str(run_dir), "target_class": "ring_knot",
                          "backend": "inline"})
    values = reward([((), cloud) for cloud in test.points]).values
    is_target = test.labels == 0
    assert values.max() <= 0.0  # log-probabilities
    assert values[is_target].mean() > values[~is_target].mean() + 1.0
    logits = make_reward({"name": "shape_class", "model": str(run_dir), "target_class": 1, "output": "logit",
                          "backend": "inline"})([((), cloud) for cloud in test.points]).values
    assert logits[~is_target].mean() > logits[is_target].mean()


def test_shape_class_reward_rejects_unknown_class_and_foreign_model(tiny_classifier, tmp_path):
    import rgdm.rewards.shapes  # noqa: F401
    from rgdm.rewards import RewardConfigError

    run_dir, _ = tiny_classifier
    with pytest.raises(RewardConfigError, match="unknown class 'chair'"):
        make_reward({"name": "shape_class", "model": str(run_dir), "target_class": "chair", "backend": "inline"})
    with pytest.raises(RewardConfigError, match="model:"):
        make_reward({"name": "shape_class", "model": str(tmp_path), "target_class": "blob", "backend": "inline"})


def test_symmetry_reward_is_zero_only_for_mirror_symmetric_clouds():
    import rgdm.rewards.shapes  # noqa: F401

    rng = np.random.default_rng(0)
    half = rng.normal(size=(50, 3)) + np.array([1.0, 0.0, 0.0])
    symmetric = np.concatenate([half, half * np.array([-1.0, 1.0, 1.0])]) + np.array([0.3, -2.0, 1.0])
    lopsided = np.concatenate([half, rng.normal(size=(50, 3)) * 0.2])
    reward = make_reward({"name": "symmetry", "backend": "inline", "axis": 0})
    values = reward([((), symmetric), ((), lopsided), ((), np.full((10, 3), np.nan))])
    assert abs(values.values[0]) < 1e-9
    assert values.values[1] < -0.05
    assert not values.valid[2]  # a NaN cloud is invalid, not a crash
    # About another axis the same cloud is not symmetric.
    assert make_reward({"name": "symmetry", "axis": 1, "backend": "inline"})([((), symmetric)]).values[0] < -0.01


def test_aspect_ratio_reward_orders_rods_above_balls():
    import rgdm.rewards.shapes  # noqa: F401

    rng = np.random.default_rng(1)
    ball = rng.normal(size=(500, 3))
    rod = ball * np.array([5.0, 1.0, 1.0])
    values = make_reward({"name": "aspect_ratio", "backend": "inline"})([((), ball), ((), rod)]).values.tolist()
    assert 1.0 <= values[0] < 1.3
    assert values[1] == pytest.approx(5.0 * values[0], rel=0.15)


def _toy_task(model):
    # Toy reward: clouds that are long along x score higher (cheap and shape-dependent).
    def elongation(molecules):
        return [float(m.positions[:, 0].std() - m.positions[:, 1].std()) for m in molecules]

    return ShapeTask(model, reward_from_function(elongation, backend="inline"))


def test_rgdm_and_ddpo_losses_train_a_point_cloud_model():
    for make_objective in (
        lambda m, task: RGDMObjective(m, task, RGDMConfig(batch_size=2, sampling_steps=4, num_candidates=4,
                                                          explore_steps=2)),
        lambda m, task: DDPOObjective(m, task, DDPOConfig(batch_size=4, sampling_steps=4)),
    ):
        model = tiny_model()
        objective = make_objective(model, _toy_task(model))
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        before = [p.detach().clone() for p in model.parameters()]
        for step in range(2):
            loss, metrics = objective.loss(model, step)
            assert torch.isfinite(loss)
            assert np.isfinite(metrics["reward_mean"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        assert any((p - b).abs().max() > 0 for p, b in zip(model.parameters(), before))
        assert objective.task.calls > 0


def test_conditional_task_needs_a_known_class():
    model = tiny_model(conditional=True)
    reward = reward_from_function(lambda ms: [0.0] * len(ms), backend="inline")
    with pytest.raises(ConfigError, match="class-conditional"):
        ShapeTask(model, reward)
    task = ShapeTask(model, reward, target_class="b")
    cond = task.conditions(3)
    assert cond.shape == (3, 32, 3)
    assert cond.context.tolist() == [[0.0, 1.0, 0.0]] * 3


def test_shape_config_errors_name_the_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: s\ndomain: shapes\nmodel:\n  widht: 8\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:4: model.widht: unknown key \(did you mean 'width'\?\)"):
        load_config(path, ShapeRunConfig)


def test_cli_routes_shape_configs_and_reports_bad_keys_in_one_line(tmp_path, monkeypatch, capsys):
    from rgdm.cli import main

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "bad.yaml"
    path.write_text("name: s\ndomain: shapes\nmodel:\n  widht: 8\n")
    assert main(["pretrain", "--config", str(path)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "bad.yaml:4: model.widht: unknown key" in error
    assert not (tmp_path / "runs").exists()


def test_base_model_quality_stratifies_by_class_and_reports_per_class_accuracy(tiny_classifier):
    from rgdm.eval.shapes import base_model_quality

    run_dir, _ = tiny_classifier
    classifier = load_classifier(run_dir)
    test = load_shapes("test", n_points=64, classes=TWO_CLASSES)
    torch.manual_seed(0)
    denoiser = PointNetDenoiser(width=8, n_blocks=1, time_dim=4, num_classes=2, knn=4, edge_width=4)
    model = PointCloudDiffusion(denoiser, NoiseSchedule(10, "cosine"), 64, tuple(TWO_CLASSES), conditional=True)
    metrics, clouds = base_model_quality(model, test, classifier, cd_points=32, num_steps=2)
    assert clouds.shape == (len(test), 64, 3)
    assert metrics["n_generated"] == metrics["n_reference"] == len(test)
    assert set(metrics) >= {"accuracy/ring_knot", "accuracy/blob", "accuracy", "1-NNA-CD", "COV-CD"}
    assert metrics["accuracy"] == pytest.approx((metrics["accuracy/ring_knot"] + metrics["accuracy/blob"]) / 2)
    assert sum(metrics[f"class_fraction/{name}"] for name in TWO_CLASSES) == pytest.approx(1.0)
    assert 0.5 <= metrics["1-NNA-CD"] <= 1.0  # an untrained model's samples are far from the data
