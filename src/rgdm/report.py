"""The short per-run report: a Markdown file with the before/after table and the PNGs beside it."""

from __future__ import annotations

import json
import time
from pathlib import Path

from rgdm.eval.compare import markdown_table, sample_scored, write_comparison
from rgdm.viz.plots import plot_curves

TRAINING_CURVES = ["reward_mean", "property_mean", "eval_reward_mean", "eval_validity", "ess_fraction", "loss"]


def finetune_report(run_dir: str | Path, base_model, tuned_model, task, n: int, num_steps: int | None,
                    property_label: str, target: float | None, command: str, seed: int = 0,
                    progress: bool = True) -> dict[str, dict[str, float]]:
    """Sample ``n`` molecules before and after fine-tuning under identical conditions; write report.md."""
    run_dir = Path(run_dir)
    started = time.perf_counter()
    results = {"before": sample_scored(base_model, task, n, num_steps, seed, progress=progress),
               "after": sample_scored(tuned_model, task, n, num_steps, seed, progress=progress)}
    summaries = write_comparison(results, run_dir, property_label, target)
    curves = plot_curves(run_dir / "metrics.csv", TRAINING_CURVES, run_dir / "training_curves.png",
                         title="fine-tuning")
    last = json.loads((run_dir / "last_metrics.json").read_text()) if (run_dir / "last_metrics.json").exists() else {}
    lines = [
        f"# Fine-tuning report: {run_dir.name}",
        "",
        f"Command: `{command}`",
        "",
        f"Reward: {property_label}" + (f", target {target:g}" if target is not None else " (maximised)"),
        f"Training: {last.get('step', '?')} iterations, {last.get('reward_calls', float('nan')):.0f} reward calls, "
        f"{last.get('wall_seconds', float('nan')):.0f} s wall time.",
        f"Evaluation: {n} molecules per model, same seed and node counts, {num_steps or 'all'} sampling steps "
        f"({time.perf_counter() - started:.0f} s).",
        "",
        markdown_table(summaries),
        "",
        "![property before/after](property_histogram.png)",
    ]
    if curves is not None:
        lines += ["", "![training curves](training_curves.png)"]
    lines += ["", "Samples before:", "", "![before](molecules_before.png)", "", "Samples after:", "",
              "![after](molecules_after.png)", ""]
    (run_dir / "report.md").write_text("\n".join(lines))
    return summaries

