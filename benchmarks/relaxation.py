"""Does relaxing a geometry make the GFN2-xTB gap track the molecule rather than geometry noise?

Three measurements, each with no relaxation, a few MMFF94 steps, and a short GFN2-xTB optimisation
(``rgdm.eval.relax``), the gap always a GFN2-xTB single point at the resulting geometry:

1. **QM9 test molecules** (with hydrogens) against their DFT gap label (B3LYP/6-31G(2df,p)). QM9
   geometries are DFT minima already, so relaxation can only help a little here: this row checks
   that it does not hurt.
2. **The same molecules, perturbed** by Gaussian noise on every coordinate (``--noise`` Angstrom), the
   kind of distortion a generated sample carries. Correlation with the DFT label again.
3. **Generated molecules**: samples of the shipped heavy-atom model ``qm9-noh-small`` with RDKit-placed
   hydrogens. They have no DFT label; the reference is the xTB gap after a long xTB optimisation
   (``--reference-steps``), i.e. the gap of the molecule at its own xTB minimum. The correlation says
   how much of the reward is the molecule and how much the generated geometry.

Pearson and Spearman correlations over the molecules every setting could score; relaxation RMSDs
(heavy atoms, Angstrom) as median; xTB runs in spawned worker processes with OMP_NUM_THREADS=1.

    python benchmarks/relaxation.py --qm9 300 --generated 200 --xtb-steps 5,10,20
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import time
from pathlib import Path

import numpy as np


def settings_from(xtb_steps: list[int]) -> list[tuple[str, str, int]]:
    """(label, relax method, steps) of every setting compared."""
    return [("none", "none", 0), ("mmff", "mmff", 200)] + [(f"xtb{n}", "xtb", n) for n in xtb_steps]


def score_one(job: tuple[list[str], np.ndarray, bool, int, list]) -> dict[str, float]:
    """Gap (meV), relaxation RMSD (Angstrom) and seconds of one molecule per setting (in a worker)."""
    from rgdm.eval.bonds import build_rdkit_mol
    from rgdm.rewards.molecule import Molecule
    from rgdm.rewards.scoring import InvalidSample
    from rgdm.rewards.xtb import hydrogenated, xtb_relaxed_property

    symbols, positions, add_hydrogens, reference_steps, settings, clean = job
    out: dict[str, float] = {}
    try:
        molecule = Molecule(tuple(symbols), positions)
        template = None
        if add_hydrogens:
            molecule, template = hydrogenated(molecule)
    except InvalidSample:
        return out
    # A perturbed QM9 molecule keeps its own bond graph for MMFF (read from the clean geometry), as a
    # generated one keeps the graph that placed its hydrogens.
    bonds_from = template if clean is None else build_rdkit_mol(symbols, clean, method="rdkit")
    settings = list(settings) + ([("reference", "xtb", reference_steps)] if reference_steps else [])
    for name, relax, steps in settings:
        started = time.perf_counter()
        try:
            gap, rmsd = xtb_relaxed_property(molecule, "gap", relax=relax, relax_steps=steps,
                                             add_hydrogens=False, bonds_from=bonds_from)
        except InvalidSample:
            gap, rmsd = math.nan, math.nan
        out[f"gap_{name}"], out[f"rmsd_{name}"] = gap, rmsd
        out[f"seconds_{name}"] = time.perf_counter() - started
    return out


def _warm_up(_: int) -> None:
    import tblite.interface  # noqa: F401 - pay the import once per worker


def run_pool(jobs: list, workers: int) -> list[dict[str, float]]:
    from rgdm.rewards.execution import single_threaded_environment

    with single_threaded_environment():  # spawned workers start with OMP_NUM_THREADS=1
        context = multiprocessing.get_context("spawn")
        with context.Pool(workers) as pool:
            pool.map(_warm_up, range(workers))
            return pool.map(score_one, jobs, chunksize=1)


def correlations(values: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    from scipy.stats import pearsonr, spearmanr

    if len(values) < 3:
        return {"pearson": math.nan, "spearman": math.nan, "mae_meV": math.nan}
    return {"pearson": float(pearsonr(values, reference)[0]), "spearman": float(spearmanr(values, reference)[0]),
            "mae_meV": float(np.abs(values - reference).mean())}


def summarise(rows: list[dict[str, float]], reference: np.ndarray, names: list[str]) -> dict[str, object]:
    """Correlations of each setting with ``reference`` over the molecules all settings scored."""
    gaps = {name: np.array([r.get(f"gap_{name}", math.nan) for r in rows]) for name in names}
    ok = np.isfinite(reference) & np.all([np.isfinite(g) for g in gaps.values()], axis=0)
    summary: dict[str, object] = {"n_molecules": len(rows), "n_scored": int(ok.sum())}
    for name in names:
        rmsd = np.array([r.get(f"rmsd_{name}", math.nan) for r in rows])[ok]
        seconds = np.array([r.get(f"seconds_{name}", math.nan) for r in rows])[ok]
        summary[name] = {**correlations(gaps[name][ok], reference[ok]),
                         "median_rmsd_A": float(np.median(rmsd)) if len(rmsd) else math.nan,
                         "seconds_per_molecule": float(seconds.mean()) if ok.any() else math.nan,
                         "gap_mean_meV": float(gaps[name][ok].mean()) if ok.any() else math.nan,
                         "near_zero_fraction": float((gaps[name][ok] < 500.0).mean()) if ok.any() else math.nan}
    return summary


def qm9_jobs(n: int, noise: float, seed: int, settings: list) -> tuple[list, np.ndarray]:
    from rgdm.data.qm9 import load_qm9

    test = load_qm9(split="test", remove_h=False)
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(test), size=min(n, len(test)), replace=False)
    jobs, labels = [], []
    for i in picks.tolist():
        symbols, positions = test.molecule(i)
        clean = positions.numpy().astype(np.float64)
        positions = clean + rng.normal(0.0, noise, clean.shape) if noise > 0 else clean
        jobs.append((list(symbols), positions, False, 0, settings, clean if noise > 0 else None))
        labels.append(float(test.properties["gap"][i]))
    return jobs, np.array(labels)


def generated_jobs(n: int, steps: int, seed: int, reference_steps: int, settings: list, device: str = "cpu") -> list:
    import torch

    from rgdm.distributed import generator_on, resolve_device
    from rgdm.runs import load_model

    torch_device = resolve_device(device)
    model = load_model("qm9-noh-small", device=torch_device).model.eval()
    torch.manual_seed(seed)
    with torch.no_grad():
        batch = model.sample_molecules(n, num_steps=steps, generator=generator_on(torch_device, seed))
    return [(list(s), p.numpy().astype(np.float64), True, reference_steps, settings, None)
            for s, p in batch.molecules()]


def table(results: dict[str, dict], names: list[str]) -> str:
    lines = ["| molecules | reference | n | relax | Pearson r | Spearman ρ | MAE (meV) | median RMSD (Å) | "
             "gaps < 0.5 eV | s / molecule |", "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for label, (summary, reference) in results.items():
        for name in names:
            s = summary[name]
            lines.append(f"| {label} | {reference} | {summary['n_scored']} | {name} | {s['pearson']:.3f} | "
                         f"{s['spearman']:.3f} | {s['mae_meV']:.0f} | {s['median_rmsd_A']:.3f} | "
                         f"{100 * s['near_zero_fraction']:.1f} % | {s['seconds_per_molecule']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--qm9", type=int, default=300, help="QM9 test molecules (clean and perturbed)")
    parser.add_argument("--noise", type=float, default=0.1, help="perturbation std per coordinate (Angstrom)")
    parser.add_argument("--generated", type=int, default=150, help="samples of qm9-noh-small (0 = skip)")
    parser.add_argument("--sampling-steps", type=int, default=100)
    parser.add_argument("--reference-steps", type=int, default=200, help="xTB steps of the generated reference")
    parser.add_argument("--xtb-steps", default="20", help="comma-separated xTB relaxation budgets to compare")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda: where qm9-noh-small samples")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-relaxation.json"))
    args = parser.parse_args()
    from rgdm.config import ConfigError
    from rgdm.distributed import resolve_device

    try:
        resolve_device(args.device)  # a clear error before the minutes of xTB
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None

    started = time.perf_counter()
    settings = settings_from([int(n) for n in args.xtb_steps.split(",")])
    names = [name for name, _, _ in settings]
    results: dict[str, tuple[dict, str]] = {}
    if args.qm9:
        for label, noise in (("QM9 test", 0.0), (f"QM9 test + {args.noise:g} Å noise", args.noise)):
            jobs, labels = qm9_jobs(args.qm9, noise, args.seed, settings)
            rows = run_pool(jobs, args.workers)
            results[label] = (summarise(rows, labels, names), "DFT gap")
            save(args, results, started)
            print(f"{label}: done after {time.perf_counter() - started:.0f} s", flush=True)
    if args.generated:
        jobs = generated_jobs(args.generated, args.sampling_steps, args.seed, args.reference_steps, settings,
                              args.device)
        rows = run_pool(jobs, args.workers)
        reference = np.array([r.get("gap_reference", math.nan) for r in rows])
        summary = summarise(rows, reference, names)
        summary["valid_fraction"] = float(np.mean([bool(r) for r in rows]))
        reference_rmsd = np.array([r.get("rmsd_reference", math.nan) for r in rows])
        summary["reference_median_rmsd_A"] = float(np.nanmedian(reference_rmsd))
        results[f"qm9-noh-small samples ({args.sampling_steps} steps)"] = (
            summary, f"xTB gap after {args.reference_steps} xTB steps")
        save(args, results, started)
    print(table(results, names))
    save(args, results, started)
    print(f"written to {args.out} ({time.perf_counter() - started:.0f} s)")


def save(args: argparse.Namespace, results: dict[str, tuple[dict, str]], started: float) -> None:
    """Write what is measured so far (each part takes minutes)."""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "seconds": round(time.perf_counter() - started, 1),
               "results": {label: {"reference": ref, **summary} for label, (summary, ref) in results.items()}}
    args.out.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
