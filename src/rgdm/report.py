"""The per-run fine-tuning report: ``report.md`` with PNGs beside it, and a self-contained ``report.html``.

Both are rendered from one list of blocks (headings, paragraphs, tables, images), so they say the
same thing; the HTML embeds its images (base64) and opens in any browser without the run directory.
"""

from __future__ import annotations

import base64
import html
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rgdm.eval.compare import format_with_se, sample_scored, table_rows, write_comparison
from rgdm.viz.plots import plot_curves

TRAINING_CURVES = ["reward_mean", "property_mean", "eval_reward_mean", "eval_validity", "eval_connected_validity",
                   "ess_fraction", "loss"]

# What each built-in reward measures, for the formula in the report.
PROPERTY_NAMES = {
    "xtb_gap": "GFN2-xTB HOMO–LUMO gap", "xtb_homo": "GFN2-xTB HOMO energy", "xtb_lumo": "GFN2-xTB LUMO energy",
    "xtb_dipole": "GFN2-xTB dipole moment", "xtb_energy": "GFN2-xTB total energy", "qed": "QED drug-likeness",
    "sa_score": "synthetic accessibility score", "logp": "Crippen logP", "validity": "RDKit validity",
    "atom_count": "atom count", "ring_constraint": "ring-size constraint",
}
SIGNIFICANCE_LEVEL = 0.05
# PoseBusters checks per model in a report: the energy-ratio ensemble costs 0.2-2 s per molecule, so
# beyond this many connected-valid molecules PB-valid is estimated from the ones checked.
REPORT_POSEBUSTERS_MAX = 100


# --------------------------------------------------------------------------- document model
@dataclass
class Document:
    """A report as blocks: ("h", level, text), ("p", text), ("table", rows), ("img", file, caption)."""

    title: str
    blocks: list[tuple] = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(("h", level, text))

    def paragraph(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, rows: list[list[str]]) -> None:
        self.blocks.append(("table", rows))

    def image(self, file: str, caption: str) -> None:
        self.blocks.append(("img", file, caption))

    def markdown(self) -> str:
        lines = [f"# {self.title}", ""]
        for block in self.blocks:
            if block[0] == "h":
                lines += ["#" * block[1] + " " + block[2], ""]
            elif block[0] == "p":
                lines += [block[1], ""]
            elif block[0] == "table":
                rows = block[1]
                lines.append("| " + " | ".join(rows[0]) + " |")
                lines.append("|---|" + "---:|" * (len(rows[0]) - 1))
                lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
                lines.append("")
            else:
                lines += [f"![{block[2]}]({block[1]})", "", f"*{block[2]}*", ""]
        return "\n".join(lines)

    def html(self, base_dir: Path) -> str:
        """One HTML file; images are embedded, so it can be mailed or opened from anywhere."""
        parts = [f"<h1>{html.escape(self.title)}</h1>"]
        for block in self.blocks:
            if block[0] == "h":
                parts.append(f"<h{block[1]}>{html.escape(block[2])}</h{block[1]}>")
            elif block[0] == "p":
                parts.append(f"<p>{_inline_html(block[1])}</p>")
            elif block[0] == "table":
                rows = block[1]
                head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
                body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                               for row in rows[1:])
                parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            else:
                path = base_dir / block[1]
                if not path.exists():
                    continue
                data = base64.b64encode(path.read_bytes()).decode("ascii")
                parts.append(f'<figure><img alt="{html.escape(block[2])}" src="data:image/png;base64,{data}">'
                             f"<figcaption>{html.escape(block[2])}</figcaption></figure>")
        style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;"
                 "line-height:1.45;color:#222}table{border-collapse:collapse;margin:1em 0}"
                 "th,td{border:1px solid #ccc;padding:4px 10px}td{text-align:right}td:first-child{text-align:left}"
                 "th{background:#f3f3f3}img{max-width:100%}figcaption{font-size:.9em;color:#555}"
                 "code{background:#f3f3f3;padding:1px 4px}")
        return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>"
                f"{html.escape(self.title)}</title><style>{style}</style></head><body>\n"
                + "\n".join(parts) + "\n</body></html>\n")


def _inline_html(text: str) -> str:
    """Escape, then turn Markdown `code` spans into <code>."""
    pieces = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(pieces))


# --------------------------------------------------------------------------- wording
def reward_units(name: str) -> str:
    from rgdm.rewards.registry import reward_spec

    try:
        return reward_spec(name).units
    except KeyError:
        return ""


def describe_reward(reward_config: dict[str, Any] | None, target: float | None) -> tuple[str, str, str, str]:
    """(property label, property unit, reward unit, one paragraph with the reward formula)."""
    config = dict(reward_config or {})
    name = str(config.get("name", "reward"))
    unit = reward_units(name)
    label = PROPERTY_NAMES.get(name, name)
    scale_note = ""
    if " " in unit or len(unit) > 8:  # the registry describes a dimensionless score rather than a unit
        scale_note, unit = f" ({unit}, dimensionless)", ""
    symbol = "P(x)"
    unit_text = f" {unit}" if unit else ""
    target = config.get("target", target)
    scale = float(config.get("scale", 1.0))
    if target is not None:
        formula = f"r(x) = −|{symbol} − {float(target):g}{unit_text}| / {scale:g}{unit_text}"
        reward_unit = ""  # a ratio of two quantities in the same unit
    else:
        formula = f"r(x) = {symbol}"
        reward_unit = unit
    details = [f"{symbol} is the {label}" + (f" in {unit}" if unit else scale_note) + f" (reward `{name}`)"]
    if name.startswith("xtb_"):
        from rgdm.eval.relax import DEFAULT_STEPS
        from rgdm.rewards.xtb import default_relax

        relax = config.get("relax", default_relax(name))
        steps = config.get("relax_steps") or DEFAULT_STEPS.get(str(relax))
        where = {"none": "at the generated geometry (no relaxation)",
                 "mmff": "after MMFF94 relaxation" + (f" ({steps} steps at most)" if steps else ""),
                 "xtb": "after a short GFN2-xTB optimisation" + (f" (at most {steps} L-BFGS steps)" if steps else "")}
        if config.get("add_hydrogens"):
            details.append("computed on the heavy-atom sample completed with RDKit-placed hydrogens")
        details.append(where.get(str(relax), f"relax={relax}"))
    penalty = config.get("penalty", -1.0)
    text = (f"Reward: `{formula}`, where " + ", ".join(details) + ". "
            f"Samples the reward cannot score (no valid molecule, failed calculation) get r = {float(penalty):g}.")
    return label, unit, reward_unit, text


def welch_test(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """(difference of means b − a, its standard error, two-sided p of Welch's t-test)."""
    from scipy.stats import ttest_ind

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2 or len(b) < 2:
        return float(b.mean() - a.mean()), math.nan, math.nan
    se = math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
    p = float(ttest_ind(b, a, equal_var=False).pvalue) if se > 0 else (1.0 if b.mean() == a.mean() else 0.0)
    return float(b.mean() - a.mean()), se, p


def significance_sentence(before: np.ndarray, after: np.ndarray, unit: str = "",
                          level: float = SIGNIFICANCE_LEVEL) -> str:
    """One sentence: did the mean reward change beyond noise (Welch's t-test at ``level``)?"""
    diff, se, p = welch_test(before, after)
    if not math.isfinite(se):
        return "Too few samples to test whether the mean reward changed."
    change = f"{format_with_se(diff, se, unit)} (after − before, ± s.e.; Welch's t-test p = {p:.2g})"
    if p < level:
        direction = "rose" if diff > 0 else "fell"
        return f"The mean reward {direction} by {change}: a significant change at the {100 * level:g} % level."
    return f"The mean reward changed by {change}: not significant at the {100 * level:g} % level."


XTB_OPTIONS = ("method", "charge", "uhf", "accuracy", "max_iter", "electronic_temperature", "add_hydrogens", "relax",
               "relax_steps", "backend", "workers", "timeout", "address")


def relaxation_sentence(reward_config: dict[str, Any] | None, results: dict[str, dict[str, Any]],
                        k: int = 32) -> str | None:
    """For xTB rewards that relax: how far the relaxation moved the first ``k`` samples of each model."""
    from rgdm.rewards import make_reward
    from rgdm.rewards.xtb import default_relax

    config = dict(reward_config or {})
    name = str(config.get("name", ""))
    if not name.startswith("xtb_") or name == "xtb_relax_rmsd":
        return None
    relax = config.get("relax", default_relax(name))
    if relax == "none":
        return None
    options = {key: value for key, value in config.items() if key in XTB_OPTIONS}
    medians = []
    with make_reward({"name": "xtb_relax_rmsd", **options, "relax": relax, "cache": False}) as reward:
        for name, result in results.items():
            scored = reward(result["molecules"][:k])
            values = scored.info["property"][scored.valid].numpy()
            if len(values):
                medians.append(f"{np.median(values):.2f} Å {name} ({len(values)} molecules)")
    if not medians:
        return None
    return ("Relaxation moved the scored molecules by a median heavy-atom RMSD of " + " and ".join(medians)
            + ": the property is measured at the relaxed geometry.")


CURVE_LABELS = {
    "reward_mean": "training reward r (mean of roll-outs)",
    "eval_reward_mean": "evaluation reward r (mean)",
    "eval_validity": "evaluation validity (EDM, fraction)",
    "eval_connected_validity": "evaluation connected validity (fraction)",
    "ess_fraction": "effective sample size / batch",
    "loss": "training loss",
}


# --------------------------------------------------------------------------- the report
def finetune_report(run_dir: str | Path, base_model, tuned_model, task, n: int, num_steps: int | None,
                    property_label: str, target: float | None, command: str, seed: int = 0,
                    progress: bool = True, reward_config: dict[str, Any] | None = None,
                    posebusters: bool = True) -> dict[str, dict[str, float]]:
    """Sample ``n`` molecules before and after fine-tuning from the same seeds; write ``report.md`` and
    ``report.html`` (plus ``comparison.json`` and the PNGs) into ``run_dir``; return the summaries.

    ``reward_config`` (the run's reward block) lets the report write the reward formula; without it
    ``property_label`` names the property.
    """
    from rgdm.eval.strict import STABILITY_NA_REASON, strict_metrics

    run_dir = Path(run_dir)
    started = time.perf_counter()
    results = {"before": sample_scored(base_model, task, n, num_steps, seed, progress=progress),
               "after": sample_scored(tuned_model, task, n, num_steps, seed, progress=progress)}
    for result in results.values():
        result["strict"] = strict_metrics(result["molecules"], posebusters=posebusters, progress=progress,
                                          posebusters_max=REPORT_POSEBUSTERS_MAX)
    if reward_config is not None:
        label, unit, reward_unit, reward_text = describe_reward(reward_config, target)
    else:
        label, unit, reward_unit = property_label, "", ""
        reward_text = f"Reward: {property_label}" + (f", target {target:g}." if target is not None else " (maximised).")
    axis_label = f"{label} ({unit})" if unit else label
    summaries = write_comparison(results, run_dir, axis_label, target)
    curves = plot_curves(run_dir / "metrics.csv", TRAINING_CURVES, run_dir / "training_curves.png",
                         title="fine-tuning", labels={**CURVE_LABELS, "property_mean": f"training {axis_label}"})
    last_path = run_dir / "last_metrics.json"
    last = json.loads(last_path.read_text()) if last_path.exists() else {}

    doc = Document(f"Fine-tuning report: {run_dir.name}")
    if command:
        doc.paragraph(f"Command: `{command}`")
    doc.paragraph(reward_text)
    doc.paragraph(f"Training: {last.get('step', '?')} iterations, {last.get('reward_calls', math.nan):.0f} reward "
                  f"calls, {last.get('wall_seconds', math.nan):.0f} s wall time.")
    doc.paragraph(f"Evaluation: {n} molecules per model, drawn from the same seeds and node counts before and "
                  f"after, {num_steps or 'all'} sampling steps ({time.perf_counter() - started:.0f} s).")
    relaxation = relaxation_sentence(reward_config, results)
    if relaxation:
        doc.paragraph(relaxation)
    doc.heading("Result")
    doc.paragraph(significance_sentence(results["before"]["reward"], results["after"]["reward"], reward_unit))
    doc.table(table_rows(summaries, label, unit, reward_unit))
    notes = ["Values are mean ± standard error over the molecules (binomial for percentages); the property row "
             "averages the molecules the reward could score. EDM's metrics follow Hoogeboom et al. 2022; the "
             "strict rows require one connected fragment and, for PB-valid, every PoseBusters check "
             "(Buttenschoen et al. 2024: bond lengths, angles, planarity, internal clashes, energy ratio)."]
    checked = {name: r["strict"].get("pb_checked") for name, r in results.items()}
    if any(v is not None for v in checked.values()):
        notes.append("PB-valid is estimated as connected validity × the PoseBusters pass rate of the first "
                     f"{REPORT_POSEBUSTERS_MAX} connected-valid molecules of each model (s.e. by the delta method).")
    if any(s.get("with_hydrogens") == 0.0 for s in summaries.values()):
        notes.append("Stability: " + STABILITY_NA_REASON.removeprefix("n/a: ") + ".")
    for note in notes:
        doc.paragraph(note)
    doc.heading("Property")
    doc.image("property_histogram.png", f"{axis_label} of the scored molecules before and after fine-tuning")
    if curves is not None:
        doc.heading("Training curves")
        doc.image("training_curves.png", "one panel per metric: raw values (faint) and their moving average")
    doc.heading("Samples")
    doc.image("molecules_paired.png", "the same seeds before (top) and after (bottom) fine-tuning; hydrogens "
                                      "placed by RDKit for display where the model generates none")
    (run_dir / "report.md").write_text(doc.markdown())
    (run_dir / "report.html").write_text(doc.html(run_dir))
    return summaries


def summary_table(summaries: dict[str, dict[str, float]], reward_config: dict[str, Any] | None,
                  target: float | None) -> str:
    """The report's table as Markdown, with units, for the terminal."""
    from rgdm.eval.compare import markdown_table

    label, unit, reward_unit, _ = describe_reward(reward_config, target)
    return markdown_table(summaries, label, unit, reward_unit)
