"""Geometry relaxation before a property is measured: none, a few MMFF steps, or a GFN2-xTB optimisation.

A generated geometry is a noisy draw around a minimum. Properties such as the HOMO-LUMO gap are
sensitive to bond lengths (a stretched C=C bond closes the gap), so a single point on the raw sample
partly measures geometry noise instead of the molecule. A short relaxation removes most of that noise
while keeping the molecule (the bond graph) the model generated:

* ``"mmff"``: MMFF94 (Halgren 1996) through RDKit, bonds from EDM's distance rules, a few hundred
  steps at most (milliseconds per molecule);
* ``"xtb"``: GFN2-xTB (Bannwarth et al. 2019) energies and gradients from tblite, minimised with
  L-BFGS for ``steps`` iterations (tens of milliseconds per step for QM9-sized molecules). tblite must
  run in a worker process with ``OMP_NUM_THREADS=1`` (see ``rgdm.rewards.xtb``).

Every relaxation reports its RMSD: heavy atoms, after optimal superposition (Kabsch), in Angstrom —
how far the relaxed geometry moved from the one generated. Hydrogens are left out of the RMSD because
for heavy-atom models they are placed by RDKit, not generated.

This module imports only numpy at load time, so reward workers can use it without torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from rgdm.rewards.molecule import Molecule, unpaired_electrons
from rgdm.rewards.scoring import InvalidSample

RELAX_METHODS: tuple[str, ...] = ("none", "mmff", "xtb")
# Default iteration budgets: "a short relaxation" (see docs/metrics.md for the measurement behind them).
DEFAULT_STEPS: dict[str, int] = {"none": 0, "mmff": 200, "xtb": 20}
BOHR_PER_ANGSTROM = 1.0 / 0.52917721067
HARTREE_TO_EV = 27.211386


@dataclass(frozen=True)
class Relaxation:
    """A relaxed geometry with its bookkeeping.

    ``rmsd`` is the heavy-atom RMSD (Angstrom) to the input after superposition; ``energy_before`` and
    ``energy_after`` are in the relaxing method's units (kcal/mol for MMFF, eV for xTB; NaN for none).
    """

    molecule: Molecule
    method: str
    rmsd: float
    steps: int
    energy_before: float = float("nan")
    energy_after: float = float("nan")


def check_relax_method(method: str) -> str:
    """The method name, or a clear error listing the choices."""
    if method not in RELAX_METHODS:
        raise ValueError(f"relax must be one of {', '.join(RELAX_METHODS)}, got {method!r}")
    return method


def kabsch_rmsd(a: np.ndarray, b: np.ndarray) -> float:
    """RMSD between two [n, 3] coordinate sets after the optimal rotation and translation."""
    a = np.asarray(a, dtype=np.float64) - np.mean(a, axis=0)
    b = np.asarray(b, dtype=np.float64) - np.mean(b, axis=0)
    if len(a) == 0:
        return 0.0
    u, _, vt = np.linalg.svd(a.T @ b)
    sign = np.sign(np.linalg.det(u @ vt)) or 1.0  # no reflections
    rotation = u @ np.diag([1.0, 1.0, sign]) @ vt
    return float(np.sqrt(np.mean(np.sum((a @ rotation - b) ** 2, axis=1))))


def heavy_atom_rmsd(before: Molecule, after: Molecule) -> float:
    heavy = np.array([s != "H" for s in before.symbols], dtype=bool)
    if not heavy.any():
        heavy[:] = True
    return kabsch_rmsd(before.positions[heavy], after.positions[heavy])


def relax(molecule: Molecule, relaxation: str = "none", steps: int | None = None, bonds_from: Any = None,
          **xtb_settings: Any) -> Relaxation:
    """Relax ``molecule`` (atoms and their order unchanged) by ``relaxation`` ("none", "mmff" or "xtb").

    ``steps`` caps the optimiser's iterations (default ``DEFAULT_STEPS[relaxation]``); ``bonds_from`` is an
    RDKit molecule with the same atoms whose bonds MMFF should use (e.g. the one that placed the
    hydrogens), instead of bonds perceived from the coordinates; ``xtb_settings``
    (method, charge, uhf, accuracy, max_iter, electronic_temperature) go to the xTB calculator and are
    ignored otherwise. InvalidSample if the molecule cannot be relaxed.
    """
    check_relax_method(relaxation)
    steps = DEFAULT_STEPS[relaxation] if steps is None else int(steps)
    if relaxation == "none" or steps <= 0:
        return Relaxation(molecule, "none", 0.0, 0)
    if relaxation == "mmff":
        return relax_mmff(molecule, steps, bonds_from)
    return relax_xtb(molecule, steps, **xtb_settings)


def _rdkit_molecule_with_bonds(molecule: Molecule) -> Any:
    """Sanitised RDKit molecule with the atoms as given (all fragments) and bonds perceived from 3D.

    EDM's distance rules first (the bonds the metrics see); if they give no valid molecule, e.g. an
    aromatic ring whose noisy bond lengths read as neither single nor double, RDKit's DetermineBonds.
    """
    from rdkit import Chem

    from rgdm.eval.bonds import build_rdkit_mol

    mol = build_rdkit_mol(molecule.symbols, molecule.positions, method="edm")
    try:
        Chem.SanitizeMol(mol)
        return mol
    except (ValueError, RuntimeError) as error:
        fallback = build_rdkit_mol(molecule.symbols, molecule.positions, method="rdkit")
        if fallback is None:
            raise InvalidSample(f"molecule does not sanitise: {error}") from None
        return fallback


def _with_positions(mol: Any, positions: np.ndarray) -> Any:
    from rdkit import Chem
    from rdkit.Geometry import Point3D

    mol = Chem.Mol(mol)
    conformer = mol.GetConformer()
    for i, (x, y, z) in enumerate(np.asarray(positions, dtype=float).tolist()):
        conformer.SetAtomPosition(i, Point3D(x, y, z))
    return mol


def relax_mmff(molecule: Molecule, steps: int = DEFAULT_STEPS["mmff"], bonds_from: Any = None) -> Relaxation:
    """At most ``steps`` MMFF94 minimisation steps in RDKit, bonds perceived by EDM's rules.

    The molecule should carry its hydrogens (``rgdm.rewards.xtb.with_hydrogens`` adds them to heavy-atom
    samples); implicit hydrogens would make MMFF relax a different molecule.
    """
    from rdkit.Chem import rdForceFieldHelpers

    if bonds_from is not None and bonds_from.GetNumAtoms() == molecule.num_atoms:
        mol = _with_positions(bonds_from, molecule.positions)
    else:
        mol = _rdkit_molecule_with_bonds(molecule)
    properties = rdForceFieldHelpers.MMFFGetMoleculeProperties(mol)
    if properties is None:
        raise InvalidSample("MMFF94 has no parameters for this molecule")
    field = rdForceFieldHelpers.MMFFGetMoleculeForceField(mol, properties)
    energy_before = field.CalcEnergy()
    field.Minimize(maxIts=int(steps))
    positions = np.array(field.Positions(), dtype=np.float64).reshape(-1, 3)
    relaxed = Molecule(molecule.symbols, positions)
    return Relaxation(relaxed, "mmff", heavy_atom_rmsd(molecule, relaxed), int(steps), energy_before,
                      field.CalcEnergy())


def relax_xtb(molecule: Molecule, steps: int = DEFAULT_STEPS["xtb"], method: str = "GFN2-xTB", charge: int = 0,
              uhf: int | None = None, accuracy: float = 1.0, max_iter: int = 250,
              electronic_temperature: float = 300.0) -> Relaxation:
    """GFN2-xTB geometry optimisation (L-BFGS, at most ``steps`` iterations) with tblite.

    Call it only in a process with ``OMP_NUM_THREADS=1`` (a reward worker). Energies in eV.
    """
    from scipy.optimize import minimize
    from tblite.interface import Calculator

    if not np.isfinite(molecule.positions).all():
        raise InvalidSample("non-finite coordinates")
    numbers = molecule.atomic_numbers
    spin = unpaired_electrons(numbers, charge) if uhf is None else uhf
    start = molecule.positions.reshape(-1) * BOHR_PER_ANGSTROM
    try:
        calculator = Calculator(method, numbers, start.reshape(-1, 3), charge=charge, uhf=spin)
        calculator.set("verbosity", 0)
        calculator.set("accuracy", accuracy)
        calculator.set("max-iter", max_iter)
        calculator.set("temperature", electronic_temperature * 3.166808578545117e-06)  # K -> Hartree
        restart: list[Any] = [None]

        def energy_and_gradient(flat_bohr: np.ndarray) -> tuple[float, np.ndarray]:
            calculator.update(positions=flat_bohr.reshape(-1, 3))
            # The previous wavefunction starts the next SCF: a few cycles instead of a full SCF.
            restart[0] = calculator.singlepoint(restart[0])
            return float(restart[0].get("energy")), np.asarray(restart[0].get("gradient")).reshape(-1)

        energy_before = energy_and_gradient(start)[0]
        result = minimize(energy_and_gradient, start, jac=True, method="L-BFGS-B",
                          options={"maxiter": int(steps), "gtol": 1e-4})
        energy_after = float(result.fun)
    except (RuntimeError, ValueError) as error:  # tblite's TBLiteRuntimeError / TBLiteValueError
        raise InvalidSample(f"xTB relaxation failed: {str(error).strip()}") from None
    relaxed = Molecule(molecule.symbols, result.x.reshape(-1, 3) / BOHR_PER_ANGSTROM)
    return Relaxation(relaxed, "xtb", heavy_atom_rmsd(molecule, relaxed), int(result.nit),
                      energy_before * HARTREE_TO_EV, energy_after * HARTREE_TO_EV)
