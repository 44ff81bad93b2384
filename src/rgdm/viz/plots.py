"""Plots saved as PNG: training curves, property histograms, 3D molecule renders."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: files only
    import matplotlib.pyplot as plt

    return plt


def read_metrics(path: str | Path) -> dict[str, np.ndarray]:
    """metrics.csv -> column name -> float array (missing cells are NaN)."""
    with Path(path).open() as handle:
        rows = list(csv.DictReader(handle))
    columns = {key for row in rows for key in row}
    return {k: np.array([float(r[k]) if r.get(k) not in (None, "") else np.nan for r in rows]) for k in columns}


def plot_curves(metrics_csv: str | Path, columns: Sequence[str], out: str | Path, x: str = "step",
                title: str = "") -> Path | None:
    """One panel per available column against ``x``; returns the PNG path (None if nothing to plot)."""
    data = read_metrics(metrics_csv)
    present = [c for c in columns if c in data and np.isfinite(data[c]).any()]
    if not present or x not in data:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(present), figsize=(3.6 * len(present), 3.0), squeeze=False)
    for ax, column in zip(axes[0], present):
        ok = np.isfinite(data[column])
        ax.plot(data[x][ok], data[column][ok], marker=".", lw=1.2)
        ax.set_xlabel(x.replace("_", " "))
        ax.set_title(column.replace("_", " "), fontsize=10)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)


def plot_histograms(values: dict[str, np.ndarray], out: str | Path, xlabel: str, target: float | None = None,
                    bins: int = 30) -> Path:
    """Overlaid histograms (e.g. a property before/after fine-tuning) with the target marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.0, 3.4))
    finite = [v[np.isfinite(v)] for v in values.values()]
    everything = np.concatenate([v for v in finite if len(v)]) if any(len(v) for v in finite) else np.zeros(1)
    edges = np.histogram_bin_edges(everything, bins=bins)
    for (label, _), v in zip(values.items(), finite):
        ax.hist(v, bins=edges, alpha=0.55, label=f"{label} (n={len(v)}, mean {v.mean():.3g})" if len(v) else label)
    if target is not None:
        ax.axvline(target, color="k", ls="--", lw=1.2, label=f"target {target:g}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("molecules")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)


CPK_COLOURS = {"H": "#d9d9d9", "C": "#404040", "N": "#3050f8", "O": "#ff0d0d", "F": "#90e050", "S": "#ffff30",
               "Cl": "#1ff01f", "P": "#ff8000", "Br": "#a62929"}


def render_molecules(molecules: Sequence[tuple[Sequence[str], np.ndarray]], out: str | Path, columns: int = 4,
                     titles: Sequence[str] | None = None, bonds: bool = True) -> Path:
    """A grid of 3D ball-and-stick renders (EDM-perceived bonds drawn as sticks)."""
    from rgdm.eval.bonds import bond_matrix

    plt = _pyplot()
    n = max(1, len(molecules))
    rows = (n + columns - 1) // columns
    fig = plt.figure(figsize=(2.6 * columns, 2.6 * rows))
    for i, (symbols, positions) in enumerate(molecules):
        pos = np.asarray(positions, dtype=float)
        ax = fig.add_subplot(rows, columns, i + 1, projection="3d")
        if bonds and len(symbols) > 1:
            orders = bond_matrix(list(symbols), pos)
            for a, b in zip(*np.nonzero(np.triu(orders))):
                ax.plot(*pos[[a, b]].T, color="#888888", lw=1.0 + 0.8 * (orders[a, b] - 1))
        colours = [CPK_COLOURS.get(s, "#ff69b4") for s in symbols]
        sizes = [30 if s == "H" else 80 for s in symbols]
        ax.scatter(*pos.T, c=colours, s=sizes, depthshade=True, edgecolors="k", linewidths=0.3)
        span = max(float(np.ptp(pos, axis=0).max()) if len(pos) else 1.0, 1.0) / 2 + 0.5
        centre = pos.mean(0) if len(pos) else np.zeros(3)
        for setter, c in zip((ax.set_xlim, ax.set_ylim, ax.set_zlim), centre):
            setter(c - span, c + span)
        ax.set_axis_off()
        if titles is not None:
            ax.set_title(titles[i], fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return Path(out)
