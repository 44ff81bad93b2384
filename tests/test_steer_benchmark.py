"""benchmarks/steer_finetuned.py: N* is measured against the cheapest sampling-time method that reaches the
fine-tuned model's level, and the table pairs each sampler's gain by seed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCHMARKS = str(Path(__file__).resolve().parents[1] / "benchmarks")
sys.path.insert(0, BENCHMARKS)  # the script imports its sibling benchmarks by name, as when run from there
try:
    import steer_finetuned as steer
finally:
    sys.path.remove(BENCHMARKS)


def row(reward: float, calls: float) -> dict:
    return {"reward": reward, "qed_valid": 0.5, "validity": 0.9, "uniqueness": 1.0, "calls_per_sample": calls}


def run(seed: int, level: float, best_of_2: float, smc: float, svdd: float, calls: int = 840) -> dict:
    pretrained = {"plain": row(-0.2, 0), "best_of_2": row(best_of_2, 2), "smc": row(smc, 124), "svdd": row(svdd, 120)}
    finetuned = {"plain": row(level, 0), "best_of_2": row(0.3, 2), "smc": row(smc + 0.01, 124),
                 "svdd": row(svdd + 0.03, 120)}
    return {"seed": seed, "setting": "window", "training": {"reward_calls": calls}, "pretrained": pretrained,
            "finetuned": finetuned}


def test_crossover_uses_the_cheapest_method_that_reaches_the_level():
    assert steer.crossover(run(0, level=0.0, best_of_2=0.2, smc=0.5, svdd=0.4)) == (420.0, "best_of_2")
    assert steer.crossover(run(0, level=0.3, best_of_2=0.2, smc=0.5, svdd=0.4)) == (pytest.approx(7.0), "svdd")
    assert steer.crossover(run(0, level=0.6, best_of_2=0.2, smc=0.5, svdd=0.4)) is None
    # no better than the pre-trained model's own samples (-0.2): the fine-tuning never pays for itself
    assert steer.crossover(run(0, level=-0.3, best_of_2=0.2, smc=0.5, svdd=0.4)) == (float("inf"), "plain")
    assert "never (the pre-trained" in steer.table([run(0, -0.3, 0.2, 0.5, 0.4)])


def test_table_pairs_gains_by_seed():
    text = steer.table([run(0, 0.0, 0.2, 0.5, 0.4), run(1, 0.0, 0.2, 0.6, 0.3)])
    smc_line = next(line for line in text.splitlines() if line.startswith("| RGDM fine-tuned | smc"))
    assert smc_line.rstrip().endswith("| 0.010 ± 0.000 |")
    assert "420 (vs best_of_2), 420 (vs best_of_2)" in text


def fine_tuned_checkpoint(tmp_path: Path, reward_calls: int | None) -> Path:
    """The shipped model's weights, shifted, saved as a fine-tuning run's checkpoint on the physics reward."""
    import torch

    from rgdm.runs import resolve_checkpoint
    from rgdm.training.checkpoint import load_checkpoint

    state = load_checkpoint(resolve_checkpoint("qm9-noh-small"))
    weights = {name: value + 0.01 if value.is_floating_point() else value for name, value in state["model"].items()}
    objective = {} if reward_calls is None else {"reward_calls": reward_calls}
    path = tmp_path / "step_00000960.pt"
    torch.save({**state, "kind": "finetune", "base_config": state["config"], "config": {"reward": {"name": "physics"}},
                "step": 960, "model": weights, "ema": None, "objective": objective}, path)
    return path


def test_a_checkpoint_fine_tuned_elsewhere_is_steered_with_its_own_weights_and_calls(tmp_path):
    from rgdm.runs import load_model

    spec = load_model("qm9-noh-small").spec.to_dict()
    path = fine_tuned_checkpoint(tmp_path, reward_calls=7680)
    model, training = steer.load_finetuned(str(path), spec)
    assert training == {"checkpoint": str(path), "reward": "physics", "reward_calls": 7680, "iterations": 960}
    shipped = load_model("qm9-noh-small").model.state_dict()
    name = next(n for n, v in shipped.items() if v.is_floating_point())
    assert (model.state_dict()[name] - shipped[name]).abs().max().item() == pytest.approx(0.01, abs=1e-6)
    with pytest.raises(SystemExit, match="reward calls"):
        steer.load_finetuned(str(fine_tuned_checkpoint(tmp_path, reward_calls=None)), spec)
    with pytest.raises(SystemExit, match="model spec differs"):
        steer.load_finetuned(str(path), {**spec, "max_nodes": spec.get("max_nodes", 0) + 1})


def test_no_break_even_is_claimed_for_a_model_fine_tuned_on_another_reward():
    runs = [{**run(seed, 0.0, 0.2, 0.5, 0.4), "reward": "xtb_gap",
             "training": {"reward_calls": 7680, "reward": "physics"}} for seed in (0, 1)]
    text = steer.table(runs)
    assert "7,680 training reward calls of physics" in text
    assert "N*: not defined" in text and "(vs best_of_2)" not in text
    same = [{**r, "training": {**r["training"], "reward": "xtb_gap"}} for r in runs]
    assert "3,840 (vs best_of_2)" in steer.table(same)
