"""Physical-feedback rewards: valence, connectivity, GFN2-xTB forces and energies, and their sum.

Generated molecules fail in a few physical ways: an atom carries more bonds than its valence allows
(the molecule does not sanitise, so EDM's validity metric rejects it), the atoms fall apart into
several fragments, or the geometry is strained (three-membered rings, squeezed bonds), which shows
as large forces. RLPF (arXiv 2508.16521) and Elign (arXiv 2601.21985) fine-tune EDM with rewards of
this kind; the ones here are:

=====================  ======================================================================  =========
name                   value                                                                   units
=====================  ======================================================================  =========
``valence``            ``-sum_i max(0, v_i - vmax(Z_i))``: minus the excess bond order          bond order
``connectivity``       ``-(fragments - 1)``                                                    fragments
``xtb_force_rms``      ``sqrt(mean_i |F_i|^2)`` of the GFN2-xTB forces (lower is better)       eV/A
``xtb_energy_per_atom`` ``(E - sum_i E_atom(Z_i)) / n``: GFN2-xTB atomisation energy per atom  eV/atom
``physics``            ``valence + w_f * connectivity - w * min(F_rms, force_cap) / cap``      score
=====================  ======================================================================  =========

In ``physics``, ``w`` is ``force_weight`` and ``w_f`` is ``fragment_weight`` (1 each by default: one extra
fragment then costs as much as one excess bond order).

Bonds are EDM's distance rules (:mod:`rgdm.eval.bonds`), the same the validity metric uses, and
``vmax`` is RDKit's largest allowed valence of the element (C 4, N 3, O 2, F 1): with EDM's bonds,
a molecule sanitises exactly when no atom exceeds it, so ``valence == 0`` is EDM validity and
``connectivity == 0`` is a single fragment (connected validity, when both hold). Without explicit
hydrogens (QM9 heavy-atom models) missing bonds are implicit hydrogens, so only the excess counts.

The xTB terms run on the molecule's largest fragment; a heavy-atom molecule is completed with
RDKit-placed hydrogens first (``add_hydrogens``), and the force RMS is taken over its heavy atoms
only, which the model generated (``heavy_atoms_only``). A molecule that does not sanitise or whose
SCF fails is an invalid sample for the two xTB rewards; in ``physics`` it gets the force term's
worst value instead, so that every sample carries a graded, finite score.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

from rgdm.rewards.molecule import Molecule
from rgdm.rewards.registry import register_reward
from rgdm.rewards.scoring import InvalidSample, PerMolecule
from rgdm.rewards.xtb import (
    BOHR_PER_ANGSTROM,
    HARTREE_TO_EV,
    METHODS,
    import_tblite,
    with_hydrogens,
    xtb_singlepoint,
)

EV_PER_ANGSTROM_PER_AU = HARTREE_TO_EV * BOHR_PER_ANGSTROM  # Hartree/Bohr -> eV/Angstrom
# Unpaired electrons of free atoms in their ground state (Hund's rule), for the atomisation energy.
GROUND_STATE_UNPAIRED = {"H": 1, "B": 1, "C": 2, "N": 3, "O": 2, "F": 1, "Si": 2, "P": 3, "S": 2, "Cl": 1,
                         "Br": 1, "I": 1}


def import_rdkit() -> None:
    """Worker warm-up of the graph rewards: RDKit (bond perception)."""
    import rgdm.eval.bonds  # noqa: F401 - loads RDKit


def import_rdkit_and_tblite() -> None:
    """Worker warm-up of the xTB rewards: RDKit (bonds, hydrogens) and tblite."""
    import_rdkit()
    import_tblite()


# ------------------------------------------------------------------------------- graph terms


def edm_bond_orders(molecule: Molecule) -> np.ndarray:
    """[n, n] bond orders of EDM's distance rules (the ones the validity metric uses)."""
    from rgdm.eval.bonds import bond_matrix

    if not molecule.symbols:
        raise InvalidSample("a point cloud has no atom types")
    return bond_matrix(molecule.symbols, molecule.positions)


@functools.cache
def max_valence(symbol: str) -> int:
    """RDKit's largest allowed valence of an uncharged atom of this element (C 4, N 3, O 2, S 6)."""
    from rdkit import Chem

    valences = [v for v in Chem.GetPeriodicTable().GetValenceList(symbol) if v >= 0]
    if not valences:
        raise InvalidSample(f"RDKit allows any valence for {symbol}; no valence reward is defined")
    return max(valences)


def excess_valence(symbols: tuple[str, ...], bonds: np.ndarray) -> int:
    """Sum over atoms of the bond order above the element's largest allowed valence."""
    limits = np.array([max_valence(s) for s in symbols])
    return int(np.clip(bonds.sum(axis=1) - limits, 0, None).sum())


def fragment_count(bonds: np.ndarray) -> int:
    """Connected components of the bond graph (isolated atoms count as fragments)."""
    unseen, count = set(range(len(bonds))), 0
    while unseen:  # one breadth-first search per fragment
        count += 1
        frontier = [unseen.pop()]
        while frontier:
            neighbours = set(np.flatnonzero(bonds[frontier].any(axis=0)).tolist()) & unseen
            unseen -= neighbours
            frontier = list(neighbours)
    return count


def valence_score(molecule: Molecule) -> float:
    return -float(excess_valence(molecule.symbols, edm_bond_orders(molecule)))


def connectivity_score(molecule: Molecule) -> float:
    return -float(fragment_count(edm_bond_orders(molecule)) - 1)


# ------------------------------------------------------------------------------- xTB terms


def xtb_input(molecule: Molecule, add_hydrogens: bool) -> tuple[Molecule, np.ndarray]:
    """The molecule xTB sees (largest fragment, hydrogens added if asked) and a mask of the atoms
    the model generated (all atoms, or the heavy atoms when hydrogens were added)."""
    if add_hydrogens:
        completed = with_hydrogens(molecule)  # InvalidSample if the skeleton does not sanitise
        return completed, np.array([s != "H" for s in completed.symbols])
    return molecule, np.ones(molecule.num_atoms, dtype=bool)


def force_rms(molecule: Molecule, add_hydrogens: bool = False, heavy_atoms_only: bool = True,
              **settings: Any) -> float:
    """RMS over atoms of the GFN2-xTB force norm, sqrt(mean_i |F_i|^2), in eV/Angstrom."""
    target, generated = xtb_input(molecule, add_hydrogens)
    gradient = np.asarray(xtb_singlepoint(target, **settings).get("gradient"))  # Hartree/Bohr, [n, 3]
    if heavy_atoms_only:
        gradient = gradient[generated]
    return float(np.sqrt((gradient ** 2).sum(axis=1).mean())) * EV_PER_ANGSTROM_PER_AU


@functools.cache
def free_atom_energy(symbol: str, method: str = "GFN2-xTB") -> float:
    """Energy (eV) of the free atom in its ground spin state, at the same level of theory."""
    spin = GROUND_STATE_UNPAIRED.get(symbol)
    if spin is None:
        raise InvalidSample(f"no ground-state spin known for a free {symbol} atom")
    atom = Molecule((symbol,), np.zeros((1, 3)))
    return float(xtb_singlepoint(atom, method=method, uhf=spin).get("energy")) * HARTREE_TO_EV


def energy_per_atom(molecule: Molecule, add_hydrogens: bool = False, **settings: Any) -> float:
    """GFN2-xTB atomisation energy per atom, (E - sum_i E_atom(Z_i)) / n, in eV/atom (negative: bound)."""
    target, _ = xtb_input(molecule, add_hydrogens)
    energy = float(xtb_singlepoint(target, **settings).get("energy")) * HARTREE_TO_EV
    atoms = sum(free_atom_energy(s, settings.get("method", "GFN2-xTB")) for s in target.symbols)
    return (energy - atoms) / target.num_atoms


def physics_score(molecule: Molecule, force_weight: float = 1.0, force_cap: float = 10.0,
                  add_hydrogens: bool = True, fragment_weight: float = 1.0, **settings: Any) -> float:
    """valence + fragment_weight * connectivity - force_weight * min(F_rms, force_cap) / force_cap.

    With ``fragment_weight`` 1 an extra fragment costs as much as one excess bond order, so breaking
    an over-valent molecule apart is free; a larger weight makes a single fragment worth keeping."""
    bonds = edm_bond_orders(molecule)
    score = -float(excess_valence(molecule.symbols, bonds)) - fragment_weight * float(fragment_count(bonds) - 1)
    if force_weight == 0:
        return score
    try:
        forces = force_rms(molecule, add_hydrogens=add_hydrogens, heavy_atoms_only=True, **settings)
    except InvalidSample:  # does not sanitise, or the SCF failed: the worst force term
        forces = math.inf
    return score - force_weight * min(forces, force_cap) / force_cap


def _xtb_settings(method: str, charge: int, accuracy: float, max_iter: int) -> dict[str, Any]:
    if method not in METHODS:
        raise ValueError(f"xTB method must be one of {', '.join(METHODS)}, got {method!r}")
    return {"method": method, "charge": int(charge), "accuracy": float(accuracy), "max_iter": int(max_iter)}


# ------------------------------------------------------------------------------------- registry


@register_reward("valence", units="-(excess bond order)")
def valence() -> PerMolecule:
    """Minus the bond order above each atom's largest allowed valence, EDM bonds (0: the molecule sanitises)."""
    return PerMolecule(valence_score, setup=import_rdkit)


@register_reward("connectivity", units="-(fragments - 1)")
def connectivity() -> PerMolecule:
    """Minus the number of extra fragments of the EDM bond graph (0: one connected molecule)."""
    return PerMolecule(connectivity_score, setup=import_rdkit)


@register_reward("xtb_force_rms", units="eV/A", worker_only=True)
def xtb_force_rms(add_hydrogens: bool = False, heavy_atoms_only: bool = True, method: str = "GFN2-xTB",
                  charge: int = 0, accuracy: float = 1.0, max_iter: int = 250) -> PerMolecule:
    """RMS GFN2-xTB force (eV/A) on the generated geometry, lower is more relaxed; use a negative weight."""
    params = {"add_hydrogens": bool(add_hydrogens), "heavy_atoms_only": bool(heavy_atoms_only),
              **_xtb_settings(method, charge, accuracy, max_iter)}
    return PerMolecule(force_rms, params, setup=import_rdkit_and_tblite)


@register_reward("xtb_energy_per_atom", units="eV/atom", worker_only=True)
def xtb_energy_per_atom(add_hydrogens: bool = False, method: str = "GFN2-xTB", charge: int = 0,
                        accuracy: float = 1.0, max_iter: int = 250) -> PerMolecule:
    """GFN2-xTB atomisation energy per atom (eV/atom), more negative is more stable; use a negative weight."""
    params = {"add_hydrogens": bool(add_hydrogens), **_xtb_settings(method, charge, accuracy, max_iter)}
    return PerMolecule(energy_per_atom, params, setup=import_rdkit_and_tblite)


@register_reward("physics", units="score <= 0", worker_only=True)
def physics(force_weight: float = 1.0, force_cap: float = 10.0, add_hydrogens: bool = True,
            method: str = "GFN2-xTB", charge: int = 0, accuracy: float = 1.0, max_iter: int = 250,
            fragment_weight: float = 1.0) -> PerMolecule:
    """valence + fragment_weight * connectivity - force_weight * min(xTB force RMS, force_cap) / force_cap;
    0 is ideal."""
    if force_weight < 0 or not force_cap > 0 or fragment_weight < 0:
        raise ValueError(f"need force_weight >= 0, force_cap > 0 and fragment_weight >= 0, got {force_weight}, "
                         f"{force_cap} and {fragment_weight}")
    params = {"force_weight": float(force_weight), "force_cap": float(force_cap),
              "fragment_weight": float(fragment_weight),
              "add_hydrogens": bool(add_hydrogens), **_xtb_settings(method, charge, accuracy, max_iter)}
    return PerMolecule(physics_score, params, setup=import_rdkit_and_tblite)
