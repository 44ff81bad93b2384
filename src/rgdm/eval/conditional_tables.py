"""The tables of EDM's conditional protocol: EDM's published Table 3 beside our rows, the per-row
details, and the physics variant (``rgdm benchmark conditional`` writes them to ``table.md``)."""

from __future__ import annotations

import math
from typing import Any

from rgdm.data.properties import PROPERTIES, UNITS

# EDM's published numbers (Table 3; QM9 with hydrogens, 10k samples, GPU-trained models).
EDM_TABLE3: dict[str, dict[str, float]] = {
    "Naive (upper bound)": {"alpha": 9.01, "gap": 1470, "homo": 645, "lumo": 1457, "mu": 1.616, "Cv": 6.857},
    "#Atoms": {"alpha": 3.86, "gap": 866, "homo": 426, "lumo": 813, "mu": 1.053, "Cv": 1.971},
    "EDM": {"alpha": 2.76, "gap": 655, "homo": 356, "lumo": 584, "mu": 1.111, "Cv": 1.101},
    "QM9 (lower bound)": {"alpha": 0.10, "gap": 64, "homo": 39, "lumo": 36, "mu": 0.043, "Cv": 0.040},
}
"""EDM's Table 3, in EDM's units (alpha Bohr^3, energies meV, mu D, Cv cal/(mol K))."""

TABLE_HEADERS: dict[str, str] = {"alpha": "α", "gap": "Δε (gap)", "homo": "ε_HOMO", "lumo": "ε_LUMO",
                                 "mu": "μ", "Cv": "C_v"}


def _cell(entry: dict[str, float] | None, prop: str) -> str:
    if not entry or entry.get("mae") is None or not math.isfinite(entry["mae"]):
        return "–"
    digits = 0 if prop in ("gap", "homo", "lumo") else (3 if prop in ("mu", "Cv") else 2)
    return f"{entry['mae']:.{digits}f}"


def _edm_cell(value: float, prop: str) -> str:
    digits = 0 if prop in ("gap", "homo", "lumo") else (3 if prop in ("mu", "Cv") else 2)
    return f"{value:.{digits}f}"


OUR_ROWS: tuple[tuple[str, str], ...] = (
    ("naive", "Naive (upper bound)"),
    ("atoms", "#Atoms"),
    ("conditional_edm", "conditional EDM"),
    ("guidance", "guidance (D_b regressor on x̂0)"),
    ("rgdm_regressor", "RGDM, reward: D_b regressor"),
    ("rgdm_xtb", "RGDM, reward: GFN2-xTB"),
    ("lower_bound", "evaluator on D_b (lower bound)"),
)


def markdown_table(results: dict[str, dict[str, Any]], budget: str) -> str:
    """EDM's Table 3 layout (rows × properties, MAE), EDM's published rows above ours.

    ``results[prop][row]`` is a ``mae_summary`` (plus extras); missing entries print as "–".
    """
    props = [p for p in PROPERTIES if p in results] or list(PROPERTIES)
    header = "| method | " + " | ".join(f"{TABLE_HEADERS[p]} ({UNITS[p]})" for p in props) + " |"
    lines = [header, "|---|" + "---:|" * len(props)]
    lines.append("| *EDM paper (with H, 10k samples)* |" + " |" * len(props))
    for name, values in EDM_TABLE3.items():
        lines.append(f"| {name} | " + " | ".join(_edm_cell(values[p], p) for p in props) + " |")
    lines.append(f"| *rgdm, budget {budget} (no H)* |" + " |" * len(props))
    for key, label in OUR_ROWS:
        if not any(key in results[p] for p in props if p in results):
            continue
        lines.append(f"| {label} | " + " | ".join(_cell(results.get(p, {}).get(key), p) for p in props) + " |")
    return "\n".join(lines)


def details_table(results: dict[str, dict[str, Any]]) -> str:
    """Per property and generated row: MAE ± standard error, validity, molecules."""
    lines = ["| property | row | MAE ± s.e. | bias | validity | valid & connected | molecules |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for prop in PROPERTIES:
        for key, label in OUR_ROWS:
            entry = results.get(prop, {}).get(key)
            if not isinstance(entry, dict) or "mae" not in entry:
                continue
            se = entry.get("se", math.nan)
            se_text = "" if se is None or not math.isfinite(se) else f" ± {se:.3g}"
            bias = entry.get("bias")
            bias_text = "–" if bias is None or not math.isfinite(bias) else f"{bias:+.3g}"
            lines.append(f"| {prop} | {label} | {entry['mae']:.4g}{se_text} | {bias_text} | "
                         f"{_percent(entry.get('validity'))} | {_percent(entry.get('connected_validity'))} | "
                         f"{entry['n']} |")
    return "\n".join(lines)


def _percent(value: float | None) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{100 * value:.1f} %"


PHYSICS_ROWS: tuple[tuple[str, str], ...] = (
    ("naive", "Naive (shuffled xTB targets)"),
    ("atoms", "#Atoms"),
    ("conditional_edm", "conditional EDM (context: target mapped to DFT)"),
    ("guidance", "guidance"),
    ("rgdm_regressor", "RGDM, reward: D_b regressor"),
    ("rgdm_xtb", "RGDM, reward: GFN2-xTB"),
)


def physics_table(physics: dict[str, dict[str, Any]]) -> str:
    """The physics variant: MAE of GFN2-xTB on generated geometries against xTB targets."""
    props = [p for p in PROPERTIES if p in physics]
    if not props:
        return ""
    header = " | ".join(f"xTB {TABLE_HEADERS[p]} MAE ({UNITS[p]}) | xTB succeeds" for p in props)
    lines = [f"| method | {header} |", "|---|" + "---:|---:|" * len(props)]
    for key, label in PHYSICS_ROWS:
        cells = []
        for p in props:
            entry = physics[p].get(key)
            if key == "guidance":
                cells += ["n/a (xTB has no gradient)", "–"]
                continue
            ok = entry.get("xtb_success") if entry else None
            cells += [_cell(entry, p), "–" if ok is None else f"{100 * ok:.0f} %"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
