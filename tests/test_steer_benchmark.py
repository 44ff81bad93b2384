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


def test_table_pairs_gains_by_seed():
    text = steer.table([run(0, 0.0, 0.2, 0.5, 0.4), run(1, 0.0, 0.2, 0.6, 0.3)])
    smc_line = next(line for line in text.splitlines() if line.startswith("| RGDM fine-tuned | smc"))
    assert smc_line.rstrip().endswith("| 0.010 ± 0.000 |")
    assert "420 (vs best_of_2), 420 (vs best_of_2)" in text
