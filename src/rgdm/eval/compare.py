"""Before/after evaluation of fine-tuning: the same reward, the same conditions, side by side."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rgdm.eval.molecules import evaluate_molecules


@torch.no_grad()
def sample_scored(model, task, n: int, num_steps: int | None, seed: int, batch_size: int = 100,
                  progress: bool = True) -> dict[str, Any]:
    """``n`` molecules from ``model`` under the task's conditions, with rewards and EDM metrics."""
    generator = torch.Generator().manual_seed(seed)
    model.eval()
    molecules, values, valid, props, targets = [], [], [], [], []
    chunks = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc="sampling + scoring", unit="batch")
    for start in chunks:
        cond = task.conditions(min(batch_size, n - start), generator)
        x0 = model.sample(cond.shape, cond.node_mask, cond.context, num_steps=num_steps, generator=generator)
        scores = task.score(x0, cond)
        molecules += task.decode(x0, cond).molecules()
        values.append(scores.values)
        valid.append(scores.valid)
        props.append(scores.property if scores.property is not None else torch.full_like(scores.values, math.nan))
        targets.append(cond.targets if cond.targets is not None else torch.full_like(scores.values, math.nan))
    values_t, valid_t = torch.cat(values).numpy(), torch.cat(valid).numpy()
    prop_t, target_t = torch.cat(props).numpy(), torch.cat(targets).numpy()
    metrics = evaluate_molecules(molecules)
    return {"molecules": molecules, "reward": values_t, "reward_valid": valid_t, "property": prop_t,
            "target": target_t, "metrics": metrics}


def summarize(result: dict[str, Any]) -> dict[str, float]:
    """Reward mean ± s.e., property mean and MAE to target over valid rewards, EDM metrics."""
    reward, ok = result["reward"], result["reward_valid"].astype(bool)
    prop, target = result["property"], result["target"]
    out: dict[str, float] = {
        "n": float(len(reward)),
        "reward_mean": float(reward.mean()),
        "reward_se": float(reward.std(ddof=1) / math.sqrt(len(reward))) if len(reward) > 1 else math.nan,
        "reward_valid_fraction": float(ok.mean()),
    }
    good = ok & np.isfinite(prop)
    if good.any():
        out["property_mean"] = float(prop[good].mean())
        out["property_se"] = float(prop[good].std(ddof=1) / math.sqrt(good.sum())) if good.sum() > 1 else math.nan
        with_target = good & np.isfinite(target)
        if with_target.any():
            out["property_mae"] = float(np.abs(prop[with_target] - target[with_target]).mean())
    out.update({k: float(v) for k, v in result["metrics"].items() if k != "n_molecules"})
    return out


ROWS = [("reward_mean", "reward (mean ± s.e.)"), ("property_mean", "property (mean ± s.e.)"),
        ("property_mae", "MAE to target"), ("reward_valid_fraction", "reward-valid fraction"),
        ("validity", "validity"), ("uniqueness", "uniqueness"), ("valid_and_unique", "valid & unique"),
        ("atom_stability", "atom stability"), ("molecule_stability", "molecule stability")]


def markdown_table(summaries: dict[str, dict[str, float]]) -> str:
    names = list(summaries)
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for key, label in ROWS:
        if not any(key in s for s in summaries.values()):
            continue
        cells = []
        for s in summaries.values():
            value = s.get(key, math.nan)
            se_key = key.replace("_mean", "_se")
            cell = f"{value:.4g}" if math.isfinite(value) else "–"
            if key.endswith("_mean") and se_key in s and math.isfinite(s[se_key]):
                cell += f" ± {s[se_key]:.2g}"
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_comparison(results: dict[str, dict[str, Any]], out_dir: str | Path, property_label: str,
                     target: float | None) -> dict[str, dict[str, float]]:
    """JSON of summaries, property histogram PNG and molecule render grid PNG for each result."""
    from rgdm.viz.plots import plot_histograms, render_molecules

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summaries = {name: summarize(r) for name, r in results.items()}
    (out_dir / "comparison.json").write_text(json.dumps(summaries, indent=2))
    hist = {name: r["property"][r["reward_valid"].astype(bool)] for name, r in results.items()}
    if any(np.isfinite(v).any() for v in hist.values()):
        plot_histograms(hist, out_dir / "property_histogram.png", property_label, target)
    else:
        plot_histograms({k: r["reward"] for k, r in results.items()}, out_dir / "property_histogram.png", "reward")
    for name, r in results.items():
        picks = r["molecules"][:12]
        titles = [f"r={v:.3g}" for v in r["reward"][:12]]
        render_molecules(picks, out_dir / f"molecules_{name}.png", titles=titles)
    return summaries
