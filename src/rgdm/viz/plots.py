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


def scatter_2d(points: np.ndarray, out: str | Path, xlabel: str = "x_1", ylabel: str = "x_2") -> Path:
    """A scatter plot of the first two coordinates of ``points`` [N, d] (the second is 0 when d = 1)."""
    plt = _pyplot()
    points = np.asarray(points, dtype=float).reshape(len(points), -1)
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.scatter(points[:, 0], points[:, 1] if points.shape[1] > 1 else np.zeros(len(points)), s=4, alpha=0.5)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return Path(out)


def read_metrics(path: str | Path) -> dict[str, np.ndarray]:
    """metrics.csv -> column name -> float array (missing cells are NaN)."""
    with Path(path).open() as handle:
        rows = list(csv.DictReader(handle))
    columns = {key for row in rows for key in row}
    return {k: np.array([float(r[k]) if r.get(k) not in (None, "") else np.nan for r in rows]) for k in columns}


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average over the finite values (edges use the points available)."""
    if window <= 1 or len(values) < 3:
        return values.copy()
    kernel = np.ones(window)
    padded_sum = np.convolve(values, kernel, mode="same")
    counts = np.convolve(np.ones_like(values), kernel, mode="same")
    return padded_sum / counts


def plot_curves(metrics_csv: str | Path, columns: Sequence[str], out: str | Path, x: str = "step",
                title: str = "", labels: dict[str, str] | None = None, panels_per_row: int = 3) -> Path | None:
    """One panel per available column against ``x``: raw values faint behind a moving average.

    ``labels`` gives each column its axis label with units (default: the column name). Returns the
    PNG path, or None when no column has data.
    """
    data = read_metrics(metrics_csv)
    present = [c for c in columns if c in data and np.isfinite(data[c]).any()]
    if not present or x not in data:
        return None
    labels = labels or {}
    plt = _pyplot()
    ncols = min(panels_per_row, len(present))
    nrows = (len(present) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.2 * nrows), squeeze=False)
    for ax, column in zip(axes.flat, present):
        ok = np.isfinite(data[column])
        steps, values = data[x][ok], data[column][ok]
        window = max(1, len(values) // 10)  # about ten windows across the run
        # raw values faint behind their moving average; drawn solid when there are too few to smooth
        ax.plot(steps, values, color="#1f77b4", alpha=0.25 if window > 1 else 0.9, lw=1.0, label="raw")
        if window > 1:
            ax.plot(steps, smooth(values, window), color="#1f77b4", lw=2.0, label=f"moving average ({window})")
            ax.legend(fontsize=8, frameon=False)
        elif len(values) <= 30:
            ax.plot(steps, values, "o", color="#1f77b4", ms=3)
        ax.set_xlabel(x.replace("_", " "), fontsize=10)
        ax.set_title(labels.get(column, column.replace("_", " ")), fontsize=11)
        ax.tick_params(labelsize=9)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(present):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=12)
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
OTHER_COLOUR = "#ff69b4"
ELEMENT_NAMES = {"H": "hydrogen", "C": "carbon", "N": "nitrogen", "O": "oxygen", "F": "fluorine", "S": "sulfur",
                 "Cl": "chlorine", "P": "phosphorus", "Br": "bromine"}


def with_display_hydrogens(symbols: Sequence[str], positions: np.ndarray) -> tuple[list[str], np.ndarray]:
    """The molecule with RDKit-placed hydrogens where EDM's bonds leave valences open (for display only).

    A sample that does not sanitise is returned unchanged: it has no well-defined hydrogens.
    """
    from rdkit import Chem

    from rgdm.eval.bonds import build_rdkit_mol

    pos = np.asarray(positions, dtype=float)
    mol = build_rdkit_mol(list(symbols), pos, method="edm")
    try:
        Chem.SanitizeMol(mol)
        mol = Chem.AddHs(mol, addCoords=True)
    except (ValueError, RuntimeError):
        return list(symbols), pos
    return [a.GetSymbol() for a in mol.GetAtoms()], mol.GetConformer().GetPositions()


def _draw_molecule(ax, symbols: Sequence[str], pos: np.ndarray, bonds: bool = True) -> None:
    from rgdm.eval.bonds import bond_matrix

    if bonds and len(symbols) > 1:
        orders = bond_matrix(list(symbols), pos)
        for a, b in zip(*np.nonzero(np.triu(orders))):
            ax.plot(*pos[[a, b]].T, color="#888888", lw=1.0 + 0.8 * (orders[a, b] - 1))
    colours = [CPK_COLOURS.get(s, OTHER_COLOUR) for s in symbols]
    sizes = [30 if s == "H" else 80 for s in symbols]
    if len(pos):
        ax.scatter(*pos.T, c=colours, s=sizes, depthshade=True, edgecolors="k", linewidths=0.3)
    span = max(float(np.ptp(pos, axis=0).max()) if len(pos) else 1.0, 1.0) / 2 + 0.5
    centre = pos.mean(0) if len(pos) else np.zeros(3)
    for setter, c in zip((ax.set_xlim, ax.set_ylim, ax.set_zlim), centre):
        setter(c - span, c + span)
    ax.set_box_aspect((1, 1, 1), zoom=1.2)  # the hidden axes' margins would shrink the molecule
    ax.set_axis_off()


def _element_key(fig, elements: Sequence[str]) -> None:
    """A legend of the element colours that appear, below the renders."""
    from matplotlib.lines import Line2D

    present = [e for e in CPK_COLOURS if e in elements] + sorted(set(elements) - set(CPK_COLOURS))
    handles = [Line2D([], [], marker="o", ls="", markersize=9, markeredgecolor="k", markeredgewidth=0.4,
                      markerfacecolor=CPK_COLOURS.get(e, OTHER_COLOUR),
                      label=f"{e} ({ELEMENT_NAMES[e]})" if e in ELEMENT_NAMES else e) for e in present]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=9, frameon=False,
                   title="element colours; grey sticks: bonds by EDM's distance rules", title_fontsize=9)


def render_molecules(molecules: Sequence[tuple[Sequence[str], np.ndarray]], out: str | Path, columns: int = 4,
                     titles: Sequence[str] | None = None, bonds: bool = True) -> Path:
    """A grid of 3D ball-and-stick renders (EDM-perceived bonds drawn as sticks) with an element key."""
    plt = _pyplot()
    n = max(1, len(molecules))
    rows = (n + columns - 1) // columns
    fig = plt.figure(figsize=(2.6 * columns, 2.6 * rows + 0.7))
    for i, (symbols, positions) in enumerate(molecules):
        ax = fig.add_subplot(rows, columns, i + 1, projection="3d")
        _draw_molecule(ax, symbols, np.asarray(positions, dtype=float), bonds)
        if titles is not None:
            ax.set_title(titles[i], fontsize=8)
    _element_key(fig, [s for symbols, _ in molecules for s in symbols])
    fig.tight_layout(rect=(0, 0.7 / (2.6 * rows + 0.7), 1, 1))
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return Path(out)


def render_pairs(before: Sequence[tuple[Sequence[str], np.ndarray]], after: Sequence[tuple[Sequence[str], np.ndarray]],
                 out: str | Path, titles_before: Sequence[str] | None = None,
                 titles_after: Sequence[str] | None = None, add_hydrogens: bool = True) -> Path:
    """Before (top row) and after (bottom row) renders, one column per seed, with an element key.

    Column k shows the k-th sample of both models drawn from the same noise and node count.
    ``add_hydrogens`` places RDKit hydrogens on heavy-atom samples for display.
    """
    plt = _pyplot()
    k = max(1, min(len(before), len(after)))
    fig = plt.figure(figsize=(2.5 * k, 5.6))
    elements: list[str] = []
    for row, (label, molecules, titles) in enumerate((("before", before, titles_before),
                                                     ("after", after, titles_after))):
        for col in range(min(k, len(molecules))):
            symbols, positions = molecules[col]
            pos = np.asarray(positions, dtype=float)
            if add_hydrogens and "H" not in symbols:
                symbols, pos = with_display_hydrogens(symbols, pos)
            elements += list(symbols)
            ax = fig.add_subplot(2, k, row * k + col + 1, projection="3d")
            _draw_molecule(ax, symbols, pos)
            head = f"seed {col + 1}, {label}" if row == 0 else label
            ax.set_title(head + (f"\n{titles[col]}" if titles is not None else ""), fontsize=8)
    _element_key(fig, elements)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return Path(out)
