"""EDM's conditional protocol (rgdm.eval.conditional, `rgdm benchmark conditional`): tiny models, known answers."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rgdm.cli import main
from rgdm.config import ConfigError, RunConfig
from rgdm.eval.conditional import (
    AffineProperty,
    NodeCountPredictor,
    Targets,
    atoms_mae,
    generate,
    guided_sample,
    linear_fit,
    mae_summary,
    naive_mae,
    predict,
    property_gradient,
    shuffled,
)
from rgdm.eval.conditional_budget import BUDGETS, ConditionalBudget, get_budget
from rgdm.eval.conditional_tables import markdown_table
from rgdm.models.regressor import PropertyRegressor, RegressorSpec
from rgdm.rewards.reward import Reward, RewardResult, TargetMatch
from rgdm.runs import ModelSpec, build_model

ELEMENTS = ("C", "N", "O", "F")


def tiny_model(context: tuple[str, ...] = ("gap",)):
    config = RunConfig()
    config.model.hidden_nf, config.model.n_layers = 16, 1
    config.diffusion.timesteps = 20
    torch.manual_seed(0)
    model = build_model(config, ModelSpec(ELEMENTS, 6, context))
    model.node_count_probs[3:7] = 0.25
    model.context_scale.fill_(1000.0)
    model.context_mean.fill_(6000.0)
    return model.eval()


def tiny_regressor() -> PropertyRegressor:
    torch.manual_seed(1)
    spec = RegressorSpec("gap", ELEMENTS, mean=6000.0, mad=1000.0, hidden_nf=16, n_layers=1)
    return PropertyRegressor(spec).eval()


# ------------------------------------------------------------------------------------------ errors
def test_mae_summary_skips_non_finite_predictions():
    out = mae_summary(torch.tensor([1.0, 3.0, math.nan]), torch.tensor([2.0, 1.0, 5.0]))
    assert out["n"] == 2 and out["mae"] == pytest.approx(1.5)
    assert out["se"] == pytest.approx(torch.tensor([1.0, 2.0]).std().item() / math.sqrt(2))


def test_naive_row_is_a_perfect_evaluator_against_shuffled_labels():
    labels = torch.arange(10, dtype=torch.float64)
    perfect = labels.clone()
    assert mae_summary(perfect, labels)["mae"] == 0.0  # the lower bound of a perfect evaluator
    expected = (labels - shuffled(labels, seed=3)).abs().mean().item()
    assert naive_mae(perfect, labels, seed=3)["mae"] == pytest.approx(expected)
    assert expected > 0


def test_atoms_row_uses_the_median_per_node_count():
    counts = torch.tensor([3, 3, 3, 5, 5, 5])
    values = torch.tensor([1.0, 2.0, 10.0, 4.0, 5.0, 6.0])
    predictor = NodeCountPredictor.fit(counts, values)
    assert predictor.medians == {3: 2.0, 5: 5.0}
    assert predictor.overall == pytest.approx(4.0)  # torch's median: the lower middle value
    targets = Targets(torch.tensor([3, 5, 7]), torch.tensor([2.0, 8.0, 0.0], dtype=torch.float64))
    # |2 - 2|, |5 - 8|, |overall 4 - 0| (7 atoms never seen)
    assert atoms_mae(predictor, targets)["mae"] == pytest.approx((0 + 3 + 4) / 3)


def test_linear_fit_recovers_a_line():
    x = torch.linspace(0, 10, 20, dtype=torch.float64)
    a, b, r = linear_fit(torch.cat([x, torch.tensor([math.nan])]), torch.cat([2 * x + 1, torch.tensor([5.0])]))
    assert (a, b, r) == pytest.approx((2.0, 1.0, 1.0))


class ConstantReward(Reward):
    name, penalty = "constant", -1.0

    def __call__(self, samples, targets=None):
        prop = torch.tensor([3.0, 5.0])
        return RewardResult(prop, torch.tensor([True, False]), {"property": prop})

    def stats(self):
        return {}

    def close(self):
        pass


def test_affine_property_maps_units_before_target_matching():
    reward = TargetMatch(AffineProperty(ConstantReward(), slope=2.0, intercept=1.0), scale=2.0, penalty=-7.0)
    result = reward(None, torch.tensor([10.0, 10.0]))
    assert result.values.tolist() == [pytest.approx(-(10 - 7) / 2), -7.0]  # 2·3 + 1 = 7; the invalid one: penalty


def test_markdown_table_puts_edm_rows_beside_ours():
    text = markdown_table({"gap": {"naive": {"mae": 1500.0, "se": 1, "n": 5}}}, "tiny")
    assert "| Naive (upper bound) | 1470 |" in text and "| Naive (upper bound) | 1500 |" in text
    assert "conditional EDM" not in text  # rows nobody measured are left out


# ------------------------------------------------------------------------------------------ guidance
def test_property_gradient_matches_finite_differences():
    model, regressor = tiny_model(), tiny_regressor()
    node_mask = model.mask_from_counts(torch.tensor([4, 5]))
    generator = torch.Generator().manual_seed(0)
    x0 = model.project(torch.randn(2, 5, 3 + model.n_features, generator=generator) * node_mask, node_mask)
    target = torch.tensor([5000.0, 8000.0])
    grad = property_gradient(model, regressor, x0, node_mask, target, max_norm=1e9)

    def loss(z):
        batch = model.decode(z, node_mask)
        pred = regressor(batch.positions, batch.atom_types, batch.node_mask)
        return 0.5 * (pred - (target - 6000.0) / 1000.0).pow(2).sum()

    direction = torch.zeros_like(x0)
    direction[..., :3] = torch.randn(2, 5, 3, generator=generator)
    direction = model.project(direction, node_mask)
    h = 1e-3
    numeric = (loss(x0 + h * direction) - loss(x0 - h * direction)) / (2 * h)
    assert (grad * direction).sum().item() == pytest.approx(numeric.item(), rel=1e-2, abs=1e-4)
    assert grad[..., 3:].abs().max() == 0  # only positions are guided


class SpreadRegressor(PropertyRegressor):
    """A 'property' that is the molecules' mean squared radius (Å²): strongly position-dependent."""

    def forward(self, positions, atom_types, node_mask):
        n_atoms = node_mask.sum(dim=(1, 2))
        radius2 = (positions.pow(2) * node_mask).sum(dim=(1, 2)) / n_atoms
        return (radius2 - self.mean) / self.mad


class GaussianDataDenoiser(torch.nn.Module):
    """The exact noise prediction for data ~ N(0, I): E[eps | z_t] = sigma_t z_t (samples stay near the origin)."""

    def __init__(self, schedule):
        super().__init__()
        self.schedule = schedule

    def forward(self, x, h, t_frac, node_mask, context):
        sigma = self.schedule.sigma((t_frac * self.schedule.timesteps).round().long()).view(-1, 1, 1)
        return sigma * x * node_mask, sigma * h * node_mask


def test_guidance_moves_predictions_toward_the_target():
    model = tiny_model()
    model.denoiser = GaussianDataDenoiser(model.schedule)
    regressor = SpreadRegressor(RegressorSpec("gap", ELEMENTS, mean=1.0, mad=1.0, hidden_nf=4, n_layers=1)).eval()
    counts = torch.tensor([4, 5, 6, 5] * 4)
    node_mask = model.mask_from_counts(counts)
    with torch.no_grad():
        plain = model.sample((len(counts), 6, 3 + model.n_features), node_mask,
                             model.normalize_context({"gap": torch.full((16,), 6000.0)}), num_steps=10,
                             generator=torch.Generator().manual_seed(5))
        base = regressor.predict(model.decode(plain, node_mask))
    target = base + 3.0  # far from where unguided samples land
    context = model.normalize_context({"gap": target})
    errors = {}
    for scale in (0.0, 1.0):
        z = guided_sample(model, node_mask, context, regressor, target, scale, num_steps=10,
                          generator=torch.Generator().manual_seed(5))
        errors[scale] = (regressor.predict(model.decode(z, node_mask)) - target).abs().mean().item()
    assert errors[1.0] < 0.9 * errors[0.0]


def test_generate_gives_one_molecule_per_target_with_its_node_count():
    model, regressor = tiny_model(), tiny_regressor()
    targets = Targets(torch.tensor([3, 4, 6, 5, 4]), torch.tensor([5e3, 6e3, 7e3, 6e3, 5e3], dtype=torch.float64))
    batches = generate(model, "gap", targets, num_steps=3, seed=0, batch_size=2)
    assert [len(b) for b in batches] == [2, 2, 1]
    assert torch.cat([b.num_atoms for b in batches]).tolist() == [3, 4, 6, 5, 4]
    assert predict(regressor, batches).shape == (5,)
    again = generate(model, "gap", targets, num_steps=3, seed=0, batch_size=2)
    assert torch.equal(batches[0].positions, again[0].positions)  # same seed, same molecules


# ------------------------------------------------------------------------------------------ budgets and CLI
def test_budgets_validate_and_bad_values_are_named():
    for name in BUDGETS:
        assert get_budget(name).name == name
    with pytest.raises(ConfigError, match="budget.samples"):
        ConditionalBudget(name="x", samples=0).validate()
    with pytest.raises(ConfigError, match="did you mean 'small'"):
        get_budget("smal")


def test_cli_rejects_an_unknown_property(tmp_path, capsys):
    code = main(["benchmark", "conditional", "--property", "gapp", "--budget", "tiny", "--out", str(tmp_path)])
    assert code == 2
    assert "did you mean 'gap'" in capsys.readouterr().err


def test_cli_end_to_end_on_the_tiny_preset(tmp_path, capsys):
    args = ["benchmark", "conditional", "--property", "gap", "--budget", "tiny", "--no-xtb",
            "--out", str(tmp_path / "out"), "--runs", str(tmp_path / "runs")]
    assert main(args) == 0
    table = (tmp_path / "out" / "tiny" / "table.md").read_text()
    for row in ("Naive (upper bound)", "#Atoms", "conditional EDM", "guidance (D_b regressor on x̂0)",
                "RGDM, reward: D_b regressor", "evaluator on D_b (lower bound)"):
        assert f"| {row} |" in table
    results = json.loads((tmp_path / "out" / "tiny" / "results.json").read_text())
    rows = results["results"]["gap"]
    assert {"naive", "atoms", "lower_bound", "conditional_edm", "guidance", "rgdm_regressor"} <= set(rows)
    assert rows["conditional_edm"]["n"] == BUDGETS["tiny"].samples
    assert rows["guidance"]["scale"] in BUDGETS["tiny"].guidance_scales
    assert results["edm_table3"]["EDM"]["gap"] == 655
    # A second run reuses every stage: no training, same numbers.
    mtime = (tmp_path / "runs" / "cond-gap-Db-tiny" / "last_metrics.json").stat().st_mtime
    assert main(args) == 0
    assert (tmp_path / "runs" / "cond-gap-Db-tiny" / "last_metrics.json").stat().st_mtime == mtime
    assert json.loads((tmp_path / "out" / "tiny" / "results.json").read_text())["results"] == results["results"]
