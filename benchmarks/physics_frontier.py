"""Target (a) as one picture: validity against novelty for every physics-benchmark row measured.

    python benchmarks/physics_frontier.py --out docs/physics_frontier.png

Reads the results tables of ``docs/physics.md`` (the record of every run of ``benchmarks/physics.py``,
each with the command that produced it), takes each row's mean validity and novelty, and plots them with
the region target (a) asks for: validity >= 0.85 with novelty at most 5 points below the base model's.
The pay-off distributions (the importance-weighted base samples of ``benchmarks/payoff_ceiling.py``) are
drawn apart: they are what the objective points at, not trained models. Prints the trained rows inside
the region, which of them also raise the single-fragment fraction (the target's third condition, not
drawn), and the best novelty among the rows that pass the validity bar.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "physics.md"
VALIDITY_BAR, NOVELTY_MARGIN = 0.85, 0.05
# first match wins: rows of DDPO_IS that ran under a "PPO-clip" label say so ("in fact DDPO_IS")
FAMILIES = (("DDPO", "DDPO_IS"), ("PPO", "PPO-clip"), ("RWR", "RWR"), ("data term alone", "data term only"))
NUMBER = re.compile(r"^\**\s*(−?-?\d+\.\d+)")


@dataclass
class Row:
    label: str  # the row's first cell, with the label it continues ("same, ...") resolved
    family: str  # RGDM, a baseline's name, "pay-off" or "base"
    validity: float
    novelty: float
    single_fragment: float | None  # None where the table has no such column
    raw: bool  # the raw weights of a run evaluated with an EMA


def cell_number(cell: str) -> float | None:
    """The mean of a cell such as ``**0.743 ± 0.002**`` or ``0.676``; None for per-seed lists and blanks."""
    cell = cell.strip()
    if "/" in cell:
        return None
    match = NUMBER.match(cell)
    return float(match.group(1).replace("−", "-")) if match else None


def family_of(label: str, heading: str) -> str:
    if heading.startswith("distribution"):
        return "base" if label.startswith("base") else "pay-off"
    if label.startswith("base"):
        return "base"
    for key, name in FAMILIES:
        if key in label:
            return name
    return "RGDM"


def table_rows(text: str) -> list[Row]:
    """Every row with a validity and a novelty, from every table of ``text`` that has both columns; a row
    repeated from an earlier table (labelled "(table above)" or "(section above)", or a base row) counts
    once."""
    rows: list[Row] = []
    seen: set[tuple] = set()
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if not line.startswith("|") or i + 1 >= len(lines) or not lines[i + 1].startswith("|---"):
            continue
        header = [c.strip() for c in line.strip("|").split("|")]
        if "validity" not in header or "novelty" not in header:
            continue
        columns = header.index("validity"), header.index("novelty")
        single = header.index("single fragment") if "single fragment" in header else None
        previous = ""
        for body in lines[i + 2:]:
            if not body.startswith("|"):
                break
            cells = [c.strip() for c in body.strip("|").split("|")]
            label = cells[0].replace("**", "").strip()
            if label.startswith("same"):
                label = f"{previous} ({label})"
                if "raw weights" not in label:  # a variant of the row above: the parent of its own "same" rows
                    previous = label
            elif not label.startswith("*"):
                previous = label
            validity, novelty = (cell_number(cells[c]) for c in columns)
            if validity is None or novelty is None:
                continue
            fragments = cell_number(cells[single]) if single is not None else None
            family, raw = family_of(previous or label, header[0]), "raw weights" in label
            key = (family, validity, novelty, raw)
            if key in seen and ("above)" in label or family == "base"):
                continue
            seen.add(key)
            rows.append(Row(label, family, validity, novelty, fragments, raw))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--doc", type=Path, default=DOC)
    parser.add_argument("--out", type=Path, default=Path("docs/physics_frontier.png"))
    args = parser.parse_args()
    rows = table_rows(args.doc.read_text())
    base = next(r for r in rows if r.family == "base")
    trained = [r for r in rows if r.family not in ("base", "pay-off")]
    floor = base.novelty - NOVELTY_MARGIN
    inside = [r for r in trained if r.validity >= VALIDITY_BAR and r.novelty >= floor]
    passing = [r for r in trained if r.validity >= VALIDITY_BAR]
    print(f"{len(trained)} trained rows; base validity {base.validity:.3f}, novelty {base.novelty:.3f}, "
          f"single fragment {base.single_fragment:.3f}")
    print(f"validity >= {VALIDITY_BAR} with novelty >= {floor:.3f}: {len(inside)} rows")
    for r in inside:
        fragments = "single fragment " + (f"{r.single_fragment:.3f}" if r.single_fragment is not None else "n/a")
        print(f"  {r.label}: validity {r.validity:.3f}, novelty {r.novelty:.3f}, {fragments}")
    whole = [r for r in inside if r.single_fragment is not None and r.single_fragment > base.single_fragment]
    print(f"... and more single fragments than the base (the target's third condition): {len(whole)} rows")
    if passing:
        best = max(passing, key=lambda r: r.novelty)
        print(f"best novelty among the {len(passing)} rows with validity >= {VALIDITY_BAR}: {best.novelty:.3f} "
              f"({best.label}, validity {best.validity:.3f})")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    ax.axvspan(VALIDITY_BAR, 1.005, ymin=0, ymax=1, color="0.93", zorder=0, label="validity ≥ 0.85 only")
    ax.fill_between([VALIDITY_BAR, 1.005], floor, 1.0, color="#c9e8c9", zorder=0, label="target (a)")
    colours = {"RGDM": "#1f77b4", "PPO-clip": "#d62728", "DDPO_IS": "#9467bd", "RWR": "#ff7f0e",
               "data term only": "#7f7f7f"}
    for name, colour in colours.items():
        for raw in (False, True):
            group = [r for r in trained if r.family == name and r.raw == raw]
            if group:
                ax.scatter([r.validity for r in group], [r.novelty for r in group], s=28, zorder=3,
                           facecolors="none" if raw else colour, edgecolors=colour,
                           label=f"{name}{' (raw weights)' if raw else ''} ({len(group)})")
    payoff = [r for r in rows if r.family == "pay-off"]
    ax.scatter([r.validity for r in payoff], [r.novelty for r in payoff], marker="*", s=120, color="#2ca02c",
               zorder=4, label="pay-off π_base·exp(r/τ), τ = 4 … 0.1")
    ax.scatter([base.validity], [base.novelty], marker="D", s=60, color="black", zorder=5, label="base qm9-noh-small")
    ax.set_xlabel("validity (500 molecules, 30 steps)")
    ax.set_ylabel("novelty (distinct valid SMILES not in QM9's training split)")
    ax.set_title("Physics reward: every measured row of docs/physics.md (means over seeds)")
    ax.set_xlim(0.45, 1.005)
    ax.set_ylim(0.45, 0.95)
    ax.legend(fontsize=7, loc="lower left", ncol=2)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
