"""The fine-tuning report: units, one reward formula, paired renders, significance, a self-contained HTML."""

from __future__ import annotations

import re

import numpy as np
import pytest

from rgdm.report import describe_reward, significance_sentence
from rgdm.viz.plots import plot_curves, smooth


def test_reward_formula_has_units_and_the_target_once():
    config = {"name": "xtb_gap", "target": 4000.0, "scale": 1000.0, "add_hydrogens": True, "relax": "xtb",
              "relax_steps": 20, "penalty": -5.0}
    label, unit, reward_unit, text = describe_reward(config, 4000.0)
    assert (label, unit, reward_unit) == ("GFN2-xTB HOMO–LUMO gap", "meV", "")
    assert "r(x) = −|P(x) − 4000 meV| / 1000 meV" in text
    assert text.count("4000") == 1
    assert "GFN2-xTB optimisation (at most 20 L-BFGS steps)" in text and "r = -5" in text


def test_significance_sentence_says_yes_and_no():
    rng = np.random.default_rng(0)
    before = rng.normal(0.0, 1.0, 200)
    assert "a significant change at the 5 % level" in significance_sentence(before, before + 1.0)
    assert "not significant" in significance_sentence(before, rng.normal(0.0, 1.0, 200))
    assert "Too few samples" in significance_sentence(before[:1], before[:1])


def test_curves_are_smoothed_with_the_raw_values_kept(tmp_path):
    values = np.array([0.0, 10.0, 0.0, 10.0, 0.0, 10.0])
    assert np.allclose(smooth(values, 3)[1:-1], [10 / 3, 20 / 3, 10 / 3, 20 / 3])
    csv = tmp_path / "metrics.csv"
    csv.write_text("step,reward_mean,loss\n" + "\n".join(f"{i},{np.sin(i)},{1 / (i + 1)}" for i in range(40)))
    assert plot_curves(csv, ["reward_mean", "loss", "absent"], tmp_path / "curves.png").exists()


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory, tiny_pretrained):
    from rgdm.config import FinetuneConfig, RGDMConfig, TrainConfig
    from rgdm.training.finetune import finetune_and_report

    config = FinetuneConfig(
        name="ft", base=str(tiny_pretrained), reward={"name": "qed", "method": "edm", "backend": "inline"},
        rgdm=RGDMConfig(batch_size=4, sampling_steps=6, num_candidates=4, explore_steps=2),
        train=TrainConfig(steps=3, lr=1e-3, ema_decay=0.0, log_every=1, val_every=3, checkpoint_every=3),
        eval_samples=0,
    ).validate()
    run_dir = tmp_path_factory.mktemp("report") / "ft"
    finetune_and_report(config, run_dir, compare=6, progress=False, sampling_steps=10)
    return run_dir


def test_report_md_states_the_reward_once_with_se_and_significance(report_dir):
    text = (report_dir / "report.md").read_text()
    assert text.count("Reward: `r(x)") == 1
    assert "QED drug-likeness" in text
    assert "Welch's t-test" in text
    assert re.search(r"\| validity \(EDM: largest fragment sanitises\) \| [\d.]+ ± [\d.]+ % \|", text)
    assert "| connected validity (strict: one fragment) |" in text and "| PB-valid" in text
    assert "n/a (no hydrogens)" in text and "Stability: EDM's stability counts explicit hydrogens" in text
    assert "molecules_paired.png" in text and (report_dir / "molecules_paired.png").exists()


def test_report_html_is_self_contained(report_dir):
    page = (report_dir / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    sources = re.findall(r'src="([^"]*)"', page)
    assert sources and all(src.startswith("data:image/png;base64,") for src in sources)
    assert "<table>" in page and "Welch" in page
