"""Before/after evaluation of fine-tuning: the same reward, the same conditions, side by side."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rgdm import distributed
from rgdm.eval.molecules import evaluate_molecules
from rgdm.eval.strict import format_percent


@torch.no_grad()
def sample_scored(model, task, n: int, num_steps: int | None, seed: int, batch_size: int = 100,
                  progress: bool = True, pipelined: bool = True) -> dict[str, Any]:
    """``n`` molecules from ``model`` under the task's conditions, with rewards and EDM metrics.

    Noise is drawn on the model's device from ``seed``. ``pipelined``: each batch is scored in a
    background thread (the reward's worker processes do the work) while the next one is sampled;
    the results are identical to scoring each batch before sampling the next (``ScoringPipeline``).
    """
    from rgdm.rewards.pipeline import ScoringPipeline

    generator = distributed.generator_on(distributed.module_device(model), seed)
    model.eval()
    chunks = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc="sampling + scoring", unit="batch")

    def score(item):
        x0, cond = item
        return x0, cond, task.score(x0, cond)

    scored = []
    with ScoringPipeline(score) as pipeline:
        for start in chunks:
            cond = task.conditions(min(batch_size, n - start), generator)
            x0 = model.sample(cond.shape, cond.node_mask, cond.context, num_steps=num_steps, generator=generator)
            pipeline.submit((x0, cond))  # scored while the next batch is sampled
            if not pipelined:  # wait for this batch's rewards before sampling the next
                scored += pipeline.results()
        scored += pipeline.results()
    molecules, values, valid, props, targets = [], [], [], [], []
    for x0, cond, scores in scored:
        scores = scores.to("cpu")
        molecules += task.decode(x0, cond).molecules()
        values.append(scores.values)
        valid.append(scores.valid)
        props.append(scores.property if scores.property is not None else torch.full_like(scores.values, math.nan))
        targets.append(cond.targets.cpu() if cond.targets is not None else torch.full_like(scores.values, math.nan))
    values_t, valid_t = torch.cat(values).numpy(), torch.cat(valid).numpy()
    prop_t, target_t = torch.cat(props).numpy(), torch.cat(targets).numpy()
    metrics = evaluate_molecules(molecules)
    return {"molecules": molecules, "reward": values_t, "reward_valid": valid_t, "property": prop_t,
            "target": target_t, "metrics": metrics}


def _proportion_se(p: float, n: float) -> float:
    return math.sqrt(p * (1.0 - p) / n) if n > 0 else math.nan


def summarize(result: dict[str, Any]) -> dict[str, float]:
    """Reward and property mean ± s.e. (property over valid rewards), MAE to target, EDM metrics with
    binomial s.e., and the strict row (``result["strict"]``, from ``rgdm.eval.strict``) when present."""
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
            errors = np.abs(prop[with_target] - target[with_target])
            out["property_mae"] = float(errors.mean())
            if with_target.sum() > 1:
                out["property_mae_se"] = float(errors.std(ddof=1) / math.sqrt(with_target.sum()))
    out.update({k: float(v) for k, v in result["metrics"].items() if k != "n_molecules"})
    n = out["n"]
    # Atom stability pools atoms, which are not independent: its s.e. counts molecules (conservative).
    for key in ("reward_valid_fraction", "validity", "valid_and_unique", "atom_stability", "molecule_stability"):
        if key in out:
            out[f"{key}_se"] = _proportion_se(out[key], n)
    if "uniqueness" in out and "validity" in out:  # a fraction of the valid molecules
        out["uniqueness_se"] = _proportion_se(out["uniqueness"], round(out["validity"] * n))
    strict = result.get("strict")
    if strict:
        out["with_hydrogens"] = float(bool(strict["with_hydrogens"]))
        for key in ("connected_validity", "pb_valid"):
            if key in strict:
                out[key], out[f"{key}_se"] = float(strict[key]), float(strict[f"{key}_se"])
    return out


# (summary key, row label, kind): "reward" / "property" values carry the reward's or property's units,
# "fraction" values are shown in percent.
ROWS = [("reward_mean", "reward r", "reward"), ("property_mean", "{property}", "property"),
        ("property_mae", "mean absolute error to the target", "property"),
        ("reward_valid_fraction", "scored by the reward", "fraction"),
        ("validity", "validity (EDM: largest fragment sanitises)", "fraction"),
        ("connected_validity", "connected validity (strict: one fragment)", "fraction"),
        ("pb_valid", "PB-valid (strict: connected + all PoseBusters checks)", "fraction"),
        ("uniqueness", "uniqueness (EDM, of valid)", "fraction"),
        ("valid_and_unique", "valid & unique (EDM)", "fraction"),
        ("atom_stability", "atom stability (EDM)", "fraction"),
        ("molecule_stability", "molecule stability (EDM)", "fraction")]
STABILITY_KEYS = ("atom_stability", "molecule_stability")


def format_with_se(value: float, se: float | None = None, unit: str = "") -> str:
    """``value ± se unit`` with decimals set by the standard error (two significant digits of it)."""
    if value is None or not math.isfinite(value):
        return "–"
    if se is not None and math.isfinite(se) and se > 0:
        decimals = max(0, 1 - math.floor(math.log10(se)))
        text = f"{value:.{decimals}f} ± {se:.{decimals}f}"
    else:
        text = f"{value:.4g}"
    return f"{text} {unit}".rstrip()


def table_rows(summaries: dict[str, dict[str, float]], property_label: str = "property",
               property_unit: str = "", reward_unit: str = "") -> list[list[str]]:
    """Header row then one row per metric; cells formatted with units and ± s.e."""
    rows = [["metric", *summaries]]
    for key, label, kind in ROWS:
        if not any(key in s for s in summaries.values()):
            continue
        cells = []
        for s in summaries.values():
            value = s.get(key, math.nan)
            if key in STABILITY_KEYS and s.get("with_hydrogens") == 0.0:
                cells.append("n/a (no hydrogens)")
            elif kind == "fraction":
                cells.append(format_percent(value, s.get(f"{key}_se")))
            else:
                se = s.get(key.replace("_mean", "_se") if key.endswith("_mean") else f"{key}_se")
                cells.append(format_with_se(value, se, property_unit if kind == "property" else reward_unit))
        rows.append([label.format(property=property_label), *cells])
    return rows


def markdown_table(summaries: dict[str, dict[str, float]], property_label: str = "property",
                   property_unit: str = "", reward_unit: str = "") -> str:
    rows = table_rows(summaries, property_label, property_unit, reward_unit)
    lines = ["| " + " | ".join(rows[0]) + " |", "|---|" + "---:|" * (len(rows[0]) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    return "\n".join(lines)


def write_comparison(results: dict[str, dict[str, Any]], out_dir: str | Path, property_label: str,
                     target: float | None, renders: int = 8) -> dict[str, dict[str, float]]:
    """JSON of summaries, the property histogram PNG, and paired before/after renders.

    ``results`` maps names to ``sample_scored`` outputs; when it holds "before" and "after" (drawn
    from the same seed), ``molecules_paired.png`` shows their first ``renders`` samples side by side.
    """
    from rgdm.viz.plots import plot_histograms, render_molecules, render_pairs

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summaries = {name: summarize(r) for name, r in results.items()}
    (out_dir / "comparison.json").write_text(json.dumps(summaries, indent=2))
    hist = {name: r["property"][r["reward_valid"].astype(bool)] for name, r in results.items()}
    if any(np.isfinite(v).any() for v in hist.values()):
        plot_histograms(hist, out_dir / "property_histogram.png", property_label, target)
    else:
        plot_histograms({k: r["reward"] for k, r in results.items()}, out_dir / "property_histogram.png", "reward")
    titles = {name: [f"r = {v:.2f}" if ok else "not scored" for v, ok in
                     zip(r["reward"][:renders], r["reward_valid"][:renders])] for name, r in results.items()}
    if "before" in results and "after" in results:
        render_pairs(results["before"]["molecules"][:renders], results["after"]["molecules"][:renders],
                     out_dir / "molecules_paired.png", titles["before"], titles["after"])
    else:
        for name, r in results.items():
            render_molecules(r["molecules"][:renders], out_dir / f"molecules_{name}.png", titles=titles[name])
    return summaries
