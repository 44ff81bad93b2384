"""3D coordinates -> bonds -> RDKit molecule: the one implementation shared by evaluation and rewards.

Bond orders follow the distance rules of EDM (Hoogeboom et al., "Equivariant Diffusion for Molecule
Generation in 3D", ICML 2022; ``qm9/bond_analyze.py`` of github.com/ehoogeboom/e3_diffusion_for_molecules):
two atoms are bonded when their distance is below a typical bond length plus a margin, and the bond is
double / triple when the distance is also below the typical double / triple bond length plus a
(smaller) margin. The typical lengths (picometres) are the tables EDM took from wiredchemist.com and
chemistry-reference.com; the margins (10, 5, 3 pm) were tuned by EDM so that real QM9 molecules come
out stable. Element pairs without a typical length never bond (EDM's ``check_exists`` behaviour).

Two ways to build a molecule:

* ``method="edm"``: atoms + bonds of the orders above, no charges (EDM's ``build_molecule``), plus a
  conformer holding the 3D positions. This defines EDM's validity metric.
* ``method="rdkit"``: RDKit's ``rdDetermineBonds.DetermineBonds`` (connectivity from distances, bond
  orders and formal charges from a Hueckel calculation). Slower, but chemically more faithful: it also
  assigns charges, so zwitterions and nitro groups come out right. Useful for rewards (QED, logP, ...).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
from numpy.typing import ArrayLike
from rdkit import Chem, RDLogger
from rdkit.Chem import rdDetermineBonds
from rdkit.Geometry import Point3D

# Typical single-bond lengths in pm (EDM's ``bonds1``), upper triangle of a symmetric table.
SINGLE_BOND_PM: dict[str, dict[str, int]] = {
    "H": {"H": 74, "C": 109, "N": 101, "O": 96, "F": 92, "B": 119, "Si": 148, "P": 144, "As": 152,
          "S": 134, "Cl": 127, "Br": 141, "I": 161},
    "C": {"C": 154, "N": 147, "O": 143, "F": 135, "Si": 185, "P": 184, "S": 182, "Cl": 177, "Br": 194,
          "I": 214},
    "N": {"N": 145, "O": 140, "F": 136, "Cl": 175, "Br": 214, "S": 168, "I": 222, "P": 177},
    "O": {"O": 148, "F": 142, "Br": 172, "S": 151, "P": 163, "Si": 163, "Cl": 164, "I": 194},
    "F": {"F": 142, "S": 158, "Si": 160, "Cl": 166, "Br": 178, "P": 156, "I": 187},
    "B": {"Cl": 175},
    "Si": {"Si": 233, "S": 200, "Cl": 202, "Br": 215, "I": 243},
    "Cl": {"Cl": 199, "P": 203, "S": 207, "Br": 214},
    "S": {"S": 204, "Br": 225, "P": 210, "I": 234},
    "Br": {"Br": 228, "P": 222},
    "P": {"P": 221},
    "I": {"I": 266},
}
# Typical double-bond lengths in pm (EDM's ``bonds2``).
DOUBLE_BOND_PM: dict[str, dict[str, int]] = {
    "C": {"C": 134, "N": 129, "O": 120, "S": 160},
    "N": {"N": 125, "O": 121},
    "O": {"O": 121, "P": 150},
    "P": {"S": 186},
}
# Typical triple-bond lengths in pm (EDM's ``bonds3``).
TRIPLE_BOND_PM: dict[str, dict[str, int]] = {
    "C": {"C": 120, "N": 116, "O": 113},
    "N": {"N": 110},
}
# Tolerances added to the typical lengths (pm), tuned by EDM on QM9.
MARGIN_SINGLE_PM, MARGIN_DOUBLE_PM, MARGIN_TRIPLE_PM = 10, 5, 3

# Allowed total bond order per element (EDM's ``allowed_bonds``); a tuple means "any of these".
ALLOWED_VALENCES: dict[str, tuple[int, ...]] = {
    "H": (1,), "C": (4,), "N": (3,), "O": (2,), "F": (1,), "B": (3,), "Al": (3,), "Si": (4,),
    "P": (3, 5), "S": (4,), "Cl": (1,), "As": (3,), "Br": (1,), "I": (1,), "Hg": (1, 2), "Bi": (3, 5),
}

KNOWN_ELEMENTS: tuple[str, ...] = tuple(ALLOWED_VALENCES)
_ELEMENT_INDEX = {symbol: i for i, symbol in enumerate(KNOWN_ELEMENTS)}

_RDKIT_BOND_TYPES = {1: Chem.BondType.SINGLE, 2: Chem.BondType.DOUBLE, 3: Chem.BondType.TRIPLE}


def _threshold_table(lengths_pm: dict[str, dict[str, int]], margin_pm: float) -> np.ndarray:
    """Symmetric [E, E] table of bond thresholds in Angstrom; -inf where the pair never bonds."""
    table = np.full((len(KNOWN_ELEMENTS), len(KNOWN_ELEMENTS)), -np.inf)
    for el1, row in lengths_pm.items():
        for el2, length in row.items():
            i, j = _ELEMENT_INDEX[el1], _ELEMENT_INDEX[el2]
            table[i, j] = table[j, i] = (length + margin_pm) / 100.0
    return table


SINGLE_THRESHOLD = _threshold_table(SINGLE_BOND_PM, MARGIN_SINGLE_PM)
DOUBLE_THRESHOLD = _threshold_table(DOUBLE_BOND_PM, MARGIN_DOUBLE_PM)
TRIPLE_THRESHOLD = _threshold_table(TRIPLE_BOND_PM, MARGIN_TRIPLE_PM)


def element_indices(symbols: Sequence[str]) -> np.ndarray:
    """Indices into ``KNOWN_ELEMENTS``; a clear error for an element the bond tables do not cover."""
    try:
        return np.fromiter((_ELEMENT_INDEX[s] for s in symbols), dtype=np.int64, count=len(symbols))
    except KeyError as err:
        raise ValueError(
            f"element {err.args[0]!r} has no bond rules; known elements: {', '.join(KNOWN_ELEMENTS)}"
        ) from None


def _orders_from_thresholds(idx1: np.ndarray, idx2: np.ndarray, distance: np.ndarray) -> np.ndarray:
    # EDM nests the tests: a double bond must first pass the single-bond test, a triple the double.
    single = distance < SINGLE_THRESHOLD[idx1, idx2]
    double = single & (distance < DOUBLE_THRESHOLD[idx1, idx2])
    triple = double & (distance < TRIPLE_THRESHOLD[idx1, idx2])
    return single.astype(np.int64) + double + triple


def bond_order(el1: str, el2: str, distance_angstrom: float) -> int:
    """EDM bond order (0 = no bond, 1, 2 or 3) of two elements at a distance in Angstrom."""
    idx = element_indices([el1, el2])
    order = _orders_from_thresholds(idx[:1], idx[1:], np.asarray([distance_angstrom], dtype=np.float64))
    return int(order[0])


def _as_positions(positions: ArrayLike, n_atoms: int) -> np.ndarray:
    pos = np.asarray(positions, dtype=np.float64)
    if pos.shape != (n_atoms, 3):
        raise ValueError(f"positions must have shape ({n_atoms}, 3) for {n_atoms} atoms, got {pos.shape}")
    return pos


def bond_matrix(symbols: Sequence[str], positions: ArrayLike) -> np.ndarray:
    """Symmetric [n, n] int matrix of EDM bond orders from element symbols and positions in Angstrom."""
    idx = element_indices(symbols)
    pos = _as_positions(positions, len(idx))
    distance = np.linalg.norm(pos[:, None, :] - pos[None, :, :], axis=-1)
    orders = _orders_from_thresholds(idx[:, None], idx[None, :], distance)
    np.fill_diagonal(orders, 0)
    return orders


def _conformer(positions: np.ndarray) -> Chem.Conformer:
    conf = Chem.Conformer(len(positions))
    for i, (x, y, z) in enumerate(positions.tolist()):
        conf.SetAtomPosition(i, Point3D(x, y, z))
    return conf


def mol_from_bond_matrix(symbols: Sequence[str], positions: ArrayLike, bonds: np.ndarray) -> Chem.Mol:
    """Unsanitised RDKit molecule with the given atoms, bond orders and a conformer of the positions."""
    pos = _as_positions(positions, len(symbols))
    mol = Chem.RWMol()
    for symbol in symbols:
        mol.AddAtom(Chem.Atom(symbol))
    rows, cols = np.nonzero(np.triu(bonds, k=1))
    for i, j in zip(rows.tolist(), cols.tolist(), strict=True):
        mol.AddBond(i, j, _RDKIT_BOND_TYPES[int(bonds[i, j])])
    mol.AddConformer(_conformer(pos), assignId=True)
    return mol.GetMol()


def _xyz_block(symbols: Sequence[str], positions: np.ndarray) -> str:
    lines = [str(len(symbols)), ""]
    for symbol, (x, y, z) in zip(symbols, positions.tolist(), strict=True):
        lines.append(f"{symbol} {x:.6f} {y:.6f} {z:.6f}")
    return "\n".join(lines) + "\n"


@contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Discard what C/C++ code writes to file descriptor 2 inside the block.

    RDKit's Hueckel backend (YAeHMOP) prints "!!! Warning !!! Distance ... is suspicious" for every
    ordinary O-H bond; RDLogger cannot mute it, and thousands of molecules would flood the log.
    """
    sys.stderr.flush()
    saved_fd = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved_fd, 2)
        os.close(saved_fd)


def _mol_by_determine_bonds(symbols: Sequence[str], positions: np.ndarray) -> Chem.Mol | None:
    mol = Chem.MolFromXYZBlock(_xyz_block(symbols, positions))
    if mol is None:
        return None
    try:
        with _native_stderr_silenced():
            rdDetermineBonds.DetermineBonds(mol, charge=0, useHueckel=True)
    except (ValueError, RuntimeError):
        # RDKit raises when no consistent bond-order / charge assignment exists for the geometry.
        return None
    return mol


def build_rdkit_mol(symbols: Sequence[str], positions: ArrayLike, method: str = "edm") -> Chem.Mol | None:
    """RDKit molecule (with a 3D conformer) from element symbols and positions in Angstrom.

    ``method="edm"`` returns the unsanitised EDM molecule (never None); ``method="rdkit"`` returns a
    sanitised molecule from ``DetermineBonds`` or None when RDKit finds no valid bonding.
    """
    pos = _as_positions(positions, len(symbols))
    if method == "edm":
        return mol_from_bond_matrix(symbols, pos, bond_matrix(symbols, pos))
    if method == "rdkit":
        return _mol_by_determine_bonds(symbols, pos)
    raise ValueError(f"unknown method {method!r}; expected 'edm' or 'rdkit'")


def canonical_smiles(mol: Chem.Mol) -> str:
    """The SMILES convention of this library: canonical, hydrogens implicit, no stereo."""
    mol = Chem.Mol(mol)
    # Without stereo first: RemoveHs keeps hydrogens that carry double-bond stereo (e.g. on N=C).
    Chem.RemoveStereochemistry(mol)
    return Chem.MolToSmiles(Chem.RemoveHs(mol, sanitize=False), isomericSmiles=False)


def smiles_to_canonical(smiles: str) -> str | None:
    """Canonical form (see ``canonical_smiles``) of a SMILES string, e.g. a training-set entry."""
    mol = Chem.MolFromSmiles(smiles)
    return None if mol is None else canonical_smiles(mol)


def largest_fragment_smiles(mol: Chem.Mol | None) -> str | None:
    """EDM validity: canonical SMILES of the largest fragment if the molecule sanitises, else None.

    As in EDM the whole molecule must sanitise (a broken small fragment makes it invalid); the
    largest fragment (by atom count) then names it. The input molecule is not modified.
    """
    if mol is None:
        return None
    mol = Chem.Mol(mol)
    try:
        Chem.SanitizeMol(mol)
    except (ValueError, RuntimeError):  # RDKit's sanitisation errors derive from ValueError
        return None
    fragments = Chem.GetMolFrags(mol, asMols=True, sanitizeFrags=False)
    largest = max(fragments, key=lambda frag: frag.GetNumAtoms(), default=mol)
    return canonical_smiles(largest)


# RDKit prints every sanitisation failure; invalid samples are expected during evaluation.
RDLogger.DisableLog("rdApp.*")
