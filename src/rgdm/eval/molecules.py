"""EDM's molecule metrics: atom / molecule stability, validity, uniqueness, novelty.

Definitions follow Hoogeboom et al. 2022 (``qm9/analyze.py`` and ``qm9/rdkit_functions.py`` of
github.com/ehoogeboom/e3_diffusion_for_molecules):

* an atom is *stable* when the sum of its EDM bond orders (``rgdm.eval.bonds``) is an allowed valence;
  a molecule is stable when all its atoms are; atom stability is pooled over all atoms;
* a molecule is *valid* when the EDM-built RDKit molecule sanitises; it is named by the canonical
  SMILES of its largest fragment;
* *uniqueness* = distinct valid SMILES / valid molecules; *valid_and_unique* = distinct valid SMILES /
  all molecules; *novelty* = distinct valid SMILES absent from the training set / distinct valid SMILES.

SMILES are canonical with implicit hydrogens and no stereo (``rgdm.eval.bonds.canonical_smiles``); pass
training SMILES in that form (``rgdm.eval.bonds.smiles_to_canonical`` converts any SMILES).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from numpy.typing import ArrayLike

from rgdm.eval.bonds import (
    ALLOWED_VALENCES,
    bond_matrix,
    element_indices,
    largest_fragment_smiles,
    mol_from_bond_matrix,
)

Molecule = tuple[Sequence[str], ArrayLike]


class HasMolecules(Protocol):
    """Anything with ``.molecules()`` returning ``(symbols, positions)`` pairs, e.g. a MoleculeBatch."""

    def molecules(self) -> list[tuple[list[str], ArrayLike]]: ...


def _atoms_with_allowed_valence(symbols: Sequence[str], valences: np.ndarray) -> np.ndarray:
    """Boolean [n]: does each atom's total bond order match one of its element's allowed valences?"""
    element_indices(symbols)  # a clear error for unknown elements
    matches = (int(v) in ALLOWED_VALENCES[s] for s, v in zip(symbols, valences, strict=True))
    return np.fromiter(matches, dtype=bool, count=len(symbols))


def stability_from_bonds(symbols: Sequence[str], bonds: np.ndarray) -> tuple[bool, int, int]:
    """``(molecule_stable, n_stable_atoms, n_atoms)`` from a precomputed bond-order matrix."""
    stable = _atoms_with_allowed_valence(symbols, bonds.sum(axis=1))
    n_stable = int(stable.sum())
    return n_stable == len(symbols), n_stable, len(symbols)


def check_stability(symbols: Sequence[str], positions: ArrayLike) -> tuple[bool, int, int]:
    """EDM stability of one molecule: ``(molecule_stable, n_stable_atoms, n_atoms)``."""
    return stability_from_bonds(symbols, bond_matrix(symbols, _to_numpy(positions)))


@dataclass
class _Tally:
    """Running counts over a set of molecules."""

    n_molecules: int = 0
    n_atoms: int = 0
    n_stable_atoms: int = 0
    n_stable_molecules: int = 0


def _to_numpy(positions: ArrayLike) -> np.ndarray:
    # torch tensors (possibly on a GPU or requiring grad) as well as lists and arrays
    if hasattr(positions, "detach"):
        positions = positions.detach().cpu().numpy()
    return np.asarray(positions, dtype=np.float64)


def _as_molecule_list(molecules: Iterable[Molecule] | HasMolecules) -> list[Molecule]:
    if hasattr(molecules, "molecules"):
        return list(molecules.molecules())
    return list(molecules)


def evaluate_molecules(
    molecules: Iterable[Molecule] | HasMolecules,
    training_smiles: set[str] | None = None,
) -> dict[str, float]:
    """EDM metrics of a set of molecules given as ``(symbols, positions [n, 3] Angstrom)`` pairs.

    Returns fractions in [0, 1] under ``atom_stability``, ``molecule_stability``, ``validity``,
    ``uniqueness``, ``valid_and_unique`` and (only when ``training_smiles`` is given) ``novelty``,
    plus ``n_molecules``. A MoleculeBatch is accepted directly.
    """
    molecule_list = _as_molecule_list(molecules)
    if not molecule_list:
        raise ValueError("evaluate_molecules: got no molecules to evaluate")

    tally = _Tally()
    valid_smiles: list[str] = []
    for k, (symbols, positions) in enumerate(molecule_list):
        symbols = list(symbols)
        pos = _to_numpy(positions)
        if pos.shape != (len(symbols), 3):
            raise ValueError(f"molecule {k}: positions shape {pos.shape} does not match {len(symbols)} atoms")
        # One bond matrix serves both stability and the RDKit molecule.
        bonds = bond_matrix(symbols, pos)
        mol_stable, n_stable, n_atoms = stability_from_bonds(symbols, bonds)
        tally.n_molecules += 1
        tally.n_atoms += n_atoms
        tally.n_stable_atoms += n_stable
        tally.n_stable_molecules += int(mol_stable)
        smiles = largest_fragment_smiles(mol_from_bond_matrix(symbols, pos, bonds))
        if smiles is not None:
            valid_smiles.append(smiles)

    return _summarise(tally, valid_smiles, training_smiles)


def _fraction(numerator: int, denominator: int) -> float:
    # EDM reports 0 for uniqueness/novelty when nothing is valid, rather than dividing by zero.
    return numerator / denominator if denominator else 0.0


def _summarise(tally: _Tally, valid_smiles: list[str], training_smiles: set[str] | None) -> dict[str, float]:
    unique = set(valid_smiles)
    metrics: dict[str, float] = {
        "atom_stability": _fraction(tally.n_stable_atoms, tally.n_atoms),
        "molecule_stability": _fraction(tally.n_stable_molecules, tally.n_molecules),
        "validity": _fraction(len(valid_smiles), tally.n_molecules),
        "uniqueness": _fraction(len(unique), len(valid_smiles)),
        "valid_and_unique": _fraction(len(unique), tally.n_molecules),
        "n_molecules": tally.n_molecules,
    }
    if training_smiles is not None:
        metrics["novelty"] = _fraction(len(unique - set(training_smiles)), len(unique))
    return metrics
