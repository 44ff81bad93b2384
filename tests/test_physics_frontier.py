"""benchmarks/physics_frontier.py reads the physics results out of docs/physics.md: each row's mean
validity, novelty and single-fragment fraction, under the right method family, each row once."""

from __future__ import annotations

import sys
from pathlib import Path

BENCHMARKS = str(Path(__file__).resolve().parents[1] / "benchmarks")
sys.path.insert(0, BENCHMARKS)
try:
    import physics_frontier as frontier
finally:
    sys.path.remove(BENCHMARKS)

TABLES = """
Some text | with a pipe.

| method | seeds | validity | connected validity | single fragment | uniqueness | novelty | reward |
|---|---|---|---|---|---|---|---|
| base `qm9-noh-small` | – | 0.644 | 0.518 | 0.842 | 1.000 | 0.839 | −1.524 |
| **PPO-clip, EMA** | 3 | **0.904 ± 0.008** | 0.729 ± 0.023 | 0.811 ± 0.027 | 0.987 | 0.813 ± 0.061 | −0.989 |
| same, raw weights | 3 | 0.887 ± 0.049 | 0.719 | 0.824 | 0.978 | 0.827 ± 0.061 | −1.015 |
| "PPO-clip" (in fact DDPO_IS) | 3 | 0.659 ± 0.024 | 0.530 | 0.823 | 0.996 | 0.839 | −1.509 |

| model (per seed) | validity | novelty |
|---|---|---|
| RGDM step level | 0.798 / 0.868 / 0.902 | 0.800 / 0.775 / 0.703 |

| distribution | validity | connected validity | novelty |
|---|---|---|---|
| base `qm9-noh-small` (these samples) | 0.616 | 0.529 | 0.838 |
| pay-off, τ = 0.25 | 0.996 | 0.989 | 0.861 |

| method | validity | novelty |
|---|---|---|
| PPO-clip, EMA (table above) | 0.904 ± 0.008 | 0.813 ± 0.061 |
| RGDM step level, EMA | 0.693 ± 0.013 | 0.801 ± 0.012 |
| RGDM sequence level, EMA | 0.693 ± 0.020 | 0.801 ± 0.009 |
"""


def test_rows_carry_means_families_and_raw_weights():
    rows = frontier.table_rows(TABLES)
    summary = [(r.family, r.validity, r.novelty, r.single_fragment, r.raw) for r in rows]
    assert summary == [
        ("base", 0.644, 0.839, 0.842, False),
        ("PPO-clip", 0.904, 0.813, 0.811, False),
        ("PPO-clip", 0.887, 0.827, 0.824, True),  # "same" continues the PPO-clip row
        ("DDPO_IS", 0.659, 0.839, 0.823, False),  # mislabelled rows say what they were
        # the per-seed table has no means and is skipped
        ("base", 0.616, 0.838, None, False),
        ("pay-off", 0.996, 0.861, None, False),
        # the PPO-clip row repeated from the table above counts once; two runs with equal means count twice
        ("RGDM", 0.693, 0.801, None, False),
        ("RGDM", 0.693, 0.801, None, False),
    ], summary
    assert rows[2].label == "PPO-clip, EMA (same, raw weights)"


def test_the_shipped_record_parses():
    rows = frontier.table_rows(Path(frontier.DOC).read_text())
    assert sum(r.family == "pay-off" for r in rows) >= 5
    assert sum(r.family == "RGDM" for r in rows) >= 50
    assert all(0.0 <= r.validity <= 1.0 and 0.0 <= r.novelty <= 1.0 for r in rows)
