"""Physics rewards: GFN2-xTB properties with tblite, at the generated or a relaxed geometry.

Properties and units (EDM's units for QM9's columns): ``xtb_homo``, ``xtb_lumo``, ``xtb_gap`` in
meV, ``xtb_dipole`` in Debye, ``xtb_energy`` (total energy) in eV.

Geometry: ``relax`` chooses where the property is measured: ``"none"`` (the geometry the model
generated), ``"mmff"`` (a few MMFF94 steps in RDKit) or ``"xtb"`` (a short GFN2-xTB optimisation,
``relax_steps`` L-BFGS iterations). HOMO, LUMO, gap and dipole relax with xTB by default
(``DEFAULT_RELAX``; docs/metrics.md has the measurement that chose it); the total energy is a
single point unless asked. See :mod:`rgdm.eval.relax`.

tblite and torch ship different OpenMP runtimes that slow each other 10-100x in one process, so
these rewards run only in worker processes started with ``OMP_NUM_THREADS=1``
(:mod:`rgdm.rewards.execution`); tblite is imported there and never in the training process.
An SCF that fails or does not converge makes the sample invalid; it is never a crash.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from rgdm.rewards.molecule import Molecule, unpaired_electrons
from rgdm.rewards.registry import register_reward
from rgdm.rewards.scoring import InvalidSample, PerMolecule, RewardSetupError

BOHR_PER_ANGSTROM = 1.0 / 0.52917721067
HARTREE_TO_MEV = 27211.4  # the factor of rgdm.data.qm9, so rewards and data agree
HARTREE_TO_EV = 27.211386
AU_TO_DEBYE = 2.541746
QUANTITIES = {"homo": "meV", "lumo": "meV", "gap": "meV", "dipole": "D", "energy": "eV"}
METHODS = ("GFN2-xTB", "GFN1-xTB", "IPEA1-xTB")
# Where the xTB property rewards (HOMO, LUMO, gap, dipole) measure by default: after 20 L-BFGS steps of
# GFN2-xTB. Measured in docs/metrics.md (benchmarks/relaxation.py): on QM9 test molecules perturbed by
# 0.1 A the gap's correlation with the DFT label rises from 0.75 (single point) to 0.89, on generated
# molecules the correlation with their own relaxed gap from 0.51 to 0.95, and on unperturbed QM9 it
# stays 0.89; MMFF tracks the DFT label less well on both QM9 rows. The cost is about 10-20 single
# points per molecule. The total energy (xtb_energy) stays a single point: it judges the geometry.
DEFAULT_RELAX = "xtb"


def import_tblite() -> None:
    """Worker warm-up; refuses to load tblite where OpenMP is not pinned to one thread."""
    if os.environ.get("OMP_NUM_THREADS") != "1":
        raise RewardSetupError(
            "xTB rewards must run in a worker process started with OMP_NUM_THREADS=1 "
            "(use backend 'process' or 'ray'; torch and tblite OpenMP runtimes conflict)")
    import tblite.interface  # noqa: F401 - imported for its one-off start-up cost


def frontier_orbitals(energies: np.ndarray, occupations: np.ndarray) -> tuple[float, float]:
    """(HOMO, LUMO) energies in Hartree from tblite's orbital energies and occupations.

    The electron count (the sum of occupations) fixes the HOMO by aufbau, which is robust to the
    fractional occupations of Fermi smearing. Spin-resolved arrays ([2, n]) are handled per channel.
    """
    energies, occupations = np.atleast_2d(energies), np.atleast_2d(occupations)
    per_orbital = 2 if energies.shape[0] == 1 else 1
    homos, lumos = [], []
    for channel_energies, channel_occupations in zip(energies, occupations, strict=True):
        ordered = np.sort(channel_energies)
        n_occupied = math.ceil(round(float(channel_occupations.sum()), 6) / per_orbital)
        if n_occupied < 1 or n_occupied >= len(ordered):
            raise InvalidSample(f"no HOMO/LUMO pair ({n_occupied} occupied of {len(ordered)} orbitals)")
        homos.append(ordered[n_occupied - 1])
        lumos.append(ordered[n_occupied])
    return float(max(homos)), float(min(lumos))


def xtb_singlepoint(molecule: Molecule, method: str = "GFN2-xTB", charge: int = 0, uhf: int | None = None,
                    accuracy: float = 1.0, max_iter: int = 250, electronic_temperature: float = 300.0) -> Any:
    """tblite Result of a single point; InvalidSample if the input or the SCF fails."""
    from tblite.interface import Calculator

    if not molecule.symbols:
        raise InvalidSample("a point cloud has no atom types")
    if not np.isfinite(molecule.positions).all():
        raise InvalidSample("non-finite coordinates")
    numbers = molecule.atomic_numbers
    spin = unpaired_electrons(numbers, charge) if uhf is None else uhf
    try:
        positions_bohr = molecule.positions * BOHR_PER_ANGSTROM
        calculator = Calculator(method, numbers, positions_bohr, charge=charge, uhf=spin)
        calculator.set("verbosity", 0)
        calculator.set("accuracy", accuracy)
        calculator.set("max-iter", max_iter)
        calculator.set("temperature", electronic_temperature * 3.166808578545117e-06)  # K -> Hartree
        return calculator.singlepoint()
    except (RuntimeError, ValueError) as error:  # tblite's TBLiteRuntimeError / TBLiteValueError
        raise InvalidSample(f"xTB failed: {str(error).strip()}") from None


def with_hydrogens(molecule: Molecule) -> Molecule:
    """The largest fragment with hydrogens placed by RDKit from EDM-perceived bonds.

    Models of heavy atoms only (QM9 without hydrogens) need this before any quantum-chemistry
    call: xTB on a bare carbon skeleton describes a radical, not the molecule. A skeleton that does
    not sanitise is an invalid sample.
    """
    return hydrogenated(molecule)[0]


def hydrogenated(molecule: Molecule) -> tuple[Molecule, Any]:
    """``with_hydrogens`` and the RDKit molecule it came from (its bonds serve a force-field relaxation)."""
    from rdkit import Chem

    from rgdm.rewards.chemistry import sanitized_fragment

    mol = Chem.AddHs(sanitized_fragment(molecule, "edm"), addCoords=True)
    return Molecule(tuple(atom.GetSymbol() for atom in mol.GetAtoms()), mol.GetConformer().GetPositions()), mol


def xtb_property(molecule: Molecule, quantity: str, add_hydrogens: bool = False, relax: str = "none",
                 relax_steps: int | None = None, **settings: Any) -> float:
    """One property of a GFN-xTB single point in the units of ``QUANTITIES``, after ``relax``."""
    return xtb_relaxed_property(molecule, quantity, add_hydrogens, relax, relax_steps, **settings)[0]


def xtb_relaxed_property(molecule: Molecule, quantity: str, add_hydrogens: bool = False, relax: str = "none",
                         relax_steps: int | None = None, bonds_from: Any = None,
                         **settings: Any) -> tuple[float, float]:
    """``(property, relaxation RMSD in Angstrom)``: the property at the ``relax``-ed geometry.

    ``bonds_from``: an RDKit molecule whose bonds MMFF uses (default: perceived from the coordinates).
    """
    from rgdm.eval.relax import relax as relax_geometry

    if add_hydrogens:
        molecule, bonds_from = hydrogenated(molecule)
    relaxation = relax_geometry(molecule, relax, relax_steps, bonds_from=bonds_from, **settings)
    result = xtb_singlepoint(relaxation.molecule, **settings)
    if quantity == "dipole":
        value = float(np.linalg.norm(result.get("dipole"))) * AU_TO_DEBYE
    elif quantity == "energy":
        value = float(result.get("energy")) * HARTREE_TO_EV
    else:
        homo, lumo = frontier_orbitals(result.get("orbital-energies"), result.get("orbital-occupations"))
        value = {"homo": homo, "lumo": lumo, "gap": lumo - homo}[quantity] * HARTREE_TO_MEV
    return value, relaxation.rmsd


def relaxation_rmsd(molecule: Molecule, add_hydrogens: bool = False, relax: str = "xtb",
                    relax_steps: int | None = None, **settings: Any) -> float:
    """Heavy-atom RMSD (Angstrom) by which ``relax`` moves the sample (see rgdm.eval.relax)."""
    from rgdm.eval.relax import relax as relax_geometry

    bonds_from = None
    if add_hydrogens:
        molecule, bonds_from = hydrogenated(molecule)
    return relax_geometry(molecule, relax, relax_steps, bonds_from=bonds_from, **settings).rmsd


def default_relax(name: str) -> str:
    """The ``relax`` a registered xTB reward uses when its config does not say."""
    import inspect

    from rgdm.rewards.registry import reward_spec

    parameter = inspect.signature(reward_spec(name).factory).parameters.get("relax")
    return "none" if parameter is None else str(parameter.default)


def _xtb_scorer(quantity: str, method: str, charge: int, uhf: int | None, accuracy: float, max_iter: int,
                electronic_temperature: float, add_hydrogens: bool, relax: str = "none",
                relax_steps: int | None = None) -> PerMolecule:
    from rgdm.eval.relax import check_relax_method

    check_relax_method(relax)
    if method not in METHODS:
        raise ValueError(f"xTB method must be one of {', '.join(METHODS)}, got {method!r}")
    if uhf is not None and uhf < 0:
        raise ValueError(f"uhf (number of unpaired electrons) must be >= 0, got {uhf}")
    settings = {"method": method, "charge": int(charge), "uhf": uhf, "accuracy": float(accuracy),
                "max_iter": int(max_iter), "electronic_temperature": float(electronic_temperature)}
    return PerMolecule(xtb_property, {"quantity": quantity, "add_hydrogens": bool(add_hydrogens), "relax": relax,
                                      "relax_steps": relax_steps, **settings}, setup=import_tblite)


# Parameters shared by every xTB reward: charge (total, e), uhf (unpaired electrons; None = 0 or 1 by
# electron-count parity), accuracy and max_iter of the SCF, electronic temperature in K, and
# add_hydrogens (complete heavy-atom samples with RDKit-placed hydrogens first, see with_hydrogens),
# relax ("none", "mmff" or "xtb": where the property is measured) and relax_steps (optimiser iterations;
# None = rgdm.eval.relax.DEFAULT_STEPS).


@register_reward("xtb_homo", units="meV", worker_only=True)
def xtb_homo(method: str = "GFN2-xTB", charge: int = 0, uhf: int | None = None, accuracy: float = 1.0,
             max_iter: int = 250, electronic_temperature: float = 300.0,
             add_hydrogens: bool = False, relax: str = DEFAULT_RELAX,
             relax_steps: int | None = None) -> PerMolecule:
    """HOMO energy (meV) of GFN2-xTB after ``relax`` (default: 20 xTB optimisation steps)."""
    return _xtb_scorer("homo", method, charge, uhf, accuracy, max_iter, electronic_temperature, add_hydrogens,
                       relax, relax_steps)


@register_reward("xtb_lumo", units="meV", worker_only=True)
def xtb_lumo(method: str = "GFN2-xTB", charge: int = 0, uhf: int | None = None, accuracy: float = 1.0,
             max_iter: int = 250, electronic_temperature: float = 300.0,
             add_hydrogens: bool = False, relax: str = DEFAULT_RELAX,
             relax_steps: int | None = None) -> PerMolecule:
    """LUMO energy (meV) of GFN2-xTB after ``relax`` (default: 20 xTB optimisation steps)."""
    return _xtb_scorer("lumo", method, charge, uhf, accuracy, max_iter, electronic_temperature, add_hydrogens,
                       relax, relax_steps)


@register_reward("xtb_gap", units="meV", worker_only=True)
def xtb_gap(method: str = "GFN2-xTB", charge: int = 0, uhf: int | None = None, accuracy: float = 1.0,
            max_iter: int = 250, electronic_temperature: float = 300.0,
             add_hydrogens: bool = False, relax: str = DEFAULT_RELAX,
             relax_steps: int | None = None) -> PerMolecule:
    """HOMO-LUMO gap (meV) of GFN2-xTB after ``relax`` (default: 20 xTB optimisation steps)."""
    return _xtb_scorer("gap", method, charge, uhf, accuracy, max_iter, electronic_temperature, add_hydrogens,
                       relax, relax_steps)


@register_reward("xtb_dipole", units="D", worker_only=True)
def xtb_dipole(method: str = "GFN2-xTB", charge: int = 0, uhf: int | None = None, accuracy: float = 1.0,
               max_iter: int = 250, electronic_temperature: float = 300.0,
             add_hydrogens: bool = False, relax: str = DEFAULT_RELAX,
             relax_steps: int | None = None) -> PerMolecule:
    """Dipole moment magnitude (Debye) of GFN2-xTB after ``relax`` (default: 20 xTB optimisation steps)."""
    return _xtb_scorer("dipole", method, charge, uhf, accuracy, max_iter, electronic_temperature, add_hydrogens,
                       relax, relax_steps)


@register_reward("xtb_energy", units="eV", worker_only=True)
def xtb_energy(method: str = "GFN2-xTB", charge: int = 0, uhf: int | None = None, accuracy: float = 1.0,
               max_iter: int = 250, electronic_temperature: float = 300.0,
             add_hydrogens: bool = False, relax: str = "none",
             relax_steps: int | None = None) -> PerMolecule:
    """Total energy (eV) of a GFN2-xTB single point (``relax`` on request: it judges the geometry)."""
    return _xtb_scorer("energy", method, charge, uhf, accuracy, max_iter, electronic_temperature, add_hydrogens,
                       relax, relax_steps)


@register_reward("xtb_relax_rmsd", units="A", worker_only=True)
def xtb_relax_rmsd(method: str = "GFN2-xTB", charge: int = 0, uhf: int | None = None, accuracy: float = 1.0,
                   max_iter: int = 250, electronic_temperature: float = 300.0, add_hydrogens: bool = False,
                   relax: str = "xtb", relax_steps: int | None = None) -> PerMolecule:
    """How far (heavy-atom RMSD, Angstrom) the relaxation of the property rewards moves a sample."""
    from rgdm.eval.relax import check_relax_method

    check_relax_method(relax)
    settings = {"method": method, "charge": int(charge), "uhf": uhf, "accuracy": float(accuracy),
                "max_iter": int(max_iter), "electronic_temperature": float(electronic_temperature)}
    return PerMolecule(relaxation_rmsd, {"add_hydrogens": bool(add_hydrogens), "relax": relax,
                                         "relax_steps": relax_steps, **settings}, setup=import_tblite)
