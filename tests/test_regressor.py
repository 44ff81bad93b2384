"""EGNN property regressors: invariances, learning, checkpoints, and the ``regressor`` reward."""

from __future__ import annotations

import json

import pytest
import torch

from rgdm.config import from_dict
from rgdm.data.batch import MoleculeBatch
from rgdm.models.regressor import PropertyRegressor, RegressorSpec
from rgdm.training.regression import RegressorConfig, load_regressor, mean_absolute_error, train_regressor

ELEMENTS = ("C", "N", "O", "F")


def tiny_regressor_config(steps: int, **train) -> RegressorConfig:
    """300 QM9 molecules without H, a 2-layer 32-feature regressor, 200 test molecules."""
    values = {
        "name": "tiny-regressor",
        "data": {"property": "alpha", "split": "Da", "remove_h": True, "max_train_molecules": 300,
                 "test_molecules": 200},
        "model": {"hidden_nf": 32, "n_layers": 2},
        "train": {"steps": steps, "batch_size": 32, "lr": 3e-3, "ema_decay": 0.0, "log_every": 10,
                  "val_every": 20, "val_batches": 1, "checkpoint_every": 20, **train},
    }
    return from_dict(RegressorConfig, values).validate()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, qm9_all):
    """A tiny alpha regressor trained for 60 steps, and its run directory."""
    run_dir = tmp_path_factory.mktemp("regressor") / "run"
    result = train_regressor(tiny_regressor_config(60), run_dir, progress=False, tensorboard=False)
    return run_dir, result


def random_batch(generator: torch.Generator, sizes=(5, 3, 7), n_max: int = 9) -> MoleculeBatch:
    """Random molecules padded to n_max nodes; the padding holds garbage types and positions."""
    batch_size = len(sizes)
    node_mask = (torch.arange(n_max) < torch.tensor(sizes)[:, None]).unsqueeze(-1).double()
    positions = torch.randn(batch_size, n_max, 3, generator=generator, dtype=torch.float64) * 1.5
    atom_types = torch.randint(0, len(ELEMENTS), (batch_size, n_max), generator=generator)
    return MoleculeBatch(positions, atom_types, node_mask, ELEMENTS)


def float64_regressor(seed: int = 0) -> PropertyRegressor:
    torch.manual_seed(seed)
    spec = RegressorSpec("gap", ELEMENTS, mean=6000.0, mad=1000.0, hidden_nf=16, n_layers=3)
    return PropertyRegressor(spec).double().eval()


def random_orthogonal(generator: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=generator, dtype=torch.float64))
    return q * -1.0  # a reflection as well as a rotation


def test_prediction_is_invariant_to_rotation_reflection_translation_and_permutation():
    generator = torch.Generator().manual_seed(1)
    model = float64_regressor()
    batch = random_batch(generator)
    before = model.predict(batch)

    q = random_orthogonal(generator)
    shift = torch.randn(len(batch), 1, 3, generator=generator, dtype=torch.float64) * 5
    moved = MoleculeBatch(batch.positions @ q.T + shift, batch.atom_types, batch.node_mask, ELEMENTS)
    torch.testing.assert_close(model.predict(moved), before, rtol=0, atol=1e-9)

    order = torch.randperm(batch.positions.shape[1], generator=generator)
    permuted = MoleculeBatch(batch.positions[:, order], batch.atom_types[:, order], batch.node_mask[:, order],
                             ELEMENTS)
    torch.testing.assert_close(model.predict(permuted), before, rtol=0, atol=1e-9)
    assert before.std() > 1.0  # distinct molecules get distinct predictions: the check is not vacuous


def test_padding_has_no_influence():
    generator = torch.Generator().manual_seed(2)
    model = float64_regressor()
    batch = random_batch(generator)
    wider = random_batch(torch.Generator().manual_seed(3), n_max=14)  # garbage in 5 more padded nodes
    n = batch.positions.shape[1]
    wider.positions[:, :n], wider.atom_types[:, :n] = batch.positions, batch.atom_types
    wider.node_mask[:] = 0
    wider.node_mask[:, :n] = batch.node_mask
    torch.testing.assert_close(model.predict(wider), model.predict(batch), rtol=0, atol=1e-9)
    alone = [model.predict(MoleculeBatch(batch.positions[i:i + 1, :k], batch.atom_types[i:i + 1, :k],
                                         batch.node_mask[i:i + 1, :k], ELEMENTS))
             for i, k in enumerate((5, 3, 7))]
    torch.testing.assert_close(torch.cat(alone), model.predict(batch), rtol=0, atol=1e-9)


def test_a_short_training_beats_predicting_the_training_mean(trained):
    run_dir, result = trained
    metrics = json.loads((run_dir / "test_metrics.json").read_text())
    assert metrics == pytest.approx(result.test_metrics)
    assert metrics["steps"] == 60 and metrics["test_molecules"] == 200 and metrics["units"] == "Bohr^3"
    # Held-out molecules: the regressor must clearly beat the constant predictor.
    assert metrics["test_mae"] < 0.7 * metrics["mean_baseline_mae"]
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,") and "val_mae" in rows[0] and len(rows) == 1 + 6


def test_checkpoint_round_trip_gives_identical_predictions(trained, qm9_all):
    run_dir, result = trained
    loaded = load_regressor(run_dir)
    assert loaded.step == 60 and loaded.spec.property_name == "alpha" and loaded.spec.elements == ELEMENTS
    from rgdm.data.qm9 import load_qm9

    batch = load_qm9("valid", remove_h=True).batch(range(64))
    torch.testing.assert_close(loaded.model.predict(batch), result.trainer.sampling_model.eval().predict(batch),
                               rtol=0, atol=0)
    assert loaded.spec.mean == pytest.approx(float(loaded.model.mean))


def test_resumed_training_equals_the_uninterrupted_run(tmp_path, qm9_all):
    config = tiny_regressor_config(6, checkpoint_every=3, log_every=3, val_every=3)
    straight = train_regressor(config, tmp_path / "straight", progress=False, tensorboard=False)
    half = from_dict(RegressorConfig, {**config.to_dict(), "train": {**config.to_dict()["train"], "steps": 3}})
    train_regressor(half, tmp_path / "resumed", progress=False, tensorboard=False)
    resumed = train_regressor(config, tmp_path / "resumed", resume=True, progress=False, tensorboard=False)
    for a, b in zip(straight.trainer.model.parameters(), resumed.trainer.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert resumed.test_metrics["test_mae"] == straight.test_metrics["test_mae"]


def test_regressor_reward_scores_a_batch_and_marks_unknown_elements_invalid(trained, qm9_all):
    import rgdm.rewards.learned  # noqa: F401 - registers the "regressor" reward
    from rgdm.data.qm9 import load_qm9
    from rgdm.rewards import make_reward

    run_dir, _ = trained
    model = load_regressor(run_dir).model
    batch = load_qm9("test", remove_h=True).batch(range(10))
    reward = make_reward({"name": "regressor", "model": str(run_dir), "backend": "inline", "penalty": -99.0})
    result = reward(batch)
    assert result.valid.all()
    torch.testing.assert_close(result.info["property"].double(), model.predict(batch).double(), rtol=1e-5, atol=1e-4)

    molecules = batch.molecules()
    with_h = (["C", "H", "H", "H", "H"], torch.tensor([[0.0, 0, 0], [0.63, 0.63, 0.63], [-0.63, -0.63, 0.63],
                                                      [-0.63, 0.63, -0.63], [0.63, -0.63, -0.63]]))
    sulfur = (["C", "S"], torch.tensor([[0.0, 0, 0], [1.8, 0, 0]]))
    mixed = reward([molecules[0], with_h, sulfur, molecules[1]])
    assert mixed.valid.tolist() == [True, False, False, True]
    assert mixed.values[1].item() == mixed.values[2].item() == -99.0
    assert "H" in mixed.info["reasons"][1] and "S" in mixed.info["reasons"][2]
    assert reward.stats()["invalid"] == 2

    dropping = make_reward({"name": "regressor", "model": str(run_dir), "backend": "inline",
                            "drop_hydrogens": True, "target": 50.0, "scale": 10.0})
    methane = dropping([with_h])
    carbon = model.predict(MoleculeBatch(torch.zeros(1, 1, 3), torch.zeros(1, 1, dtype=torch.long),
                                         torch.ones(1, 1, 1), ELEMENTS))
    assert methane.valid.all()
    assert methane.values.item() == pytest.approx(-abs(carbon.item() - 50.0) / 10.0, abs=1e-4)


def test_regressor_reward_rejects_a_missing_model_in_one_line(tmp_path):
    import rgdm.rewards.learned  # noqa: F401
    from rgdm.rewards import RewardConfigError, make_reward

    with pytest.raises(RewardConfigError, match="no usable checkpoint|no such run directory"):
        make_reward({"name": "regressor", "model": str(tmp_path), "backend": "inline"})


def test_cli_rejects_an_unknown_property_in_one_line(capsys):
    from rgdm.cli import main

    assert main(["train-regressor", "--property", "gapp", "--split", "Da"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "data.property" in err and "did you mean 'gap'" in err


def test_mean_absolute_error_is_in_property_units(qm9_all):
    from rgdm.data.qm9 import load_qm9

    data = load_qm9("valid", remove_h=True).subset(torch.arange(50))
    torch.manual_seed(0)
    spec = RegressorSpec("mu", ELEMENTS, mean=2.5, mad=1.0, hidden_nf=8, n_layers=1)
    model = PropertyRegressor(spec)
    with torch.no_grad():  # a constant predictor of 2.5 D: its MAE is the mean |mu - 2.5|
        model.graph_readout[-1].weight.zero_()
        model.graph_readout[-1].bias.zero_()
    expected = float((data.properties["mu"].double() - 2.5).abs().mean())
    assert mean_absolute_error(model, data) == pytest.approx(expected, rel=1e-5)
