"""The plain sample a reward sees: element symbols and 3D positions, nothing else.

This module imports only numpy, so worker processes that score molecules never load torch
(torch and tblite ship different OpenMP runtimes that slow each other down in one process).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# Symbols H..Rn in atomic-number order (GFN2-xTB is parametrised up to Rn).
PERIODIC_TABLE: tuple[str, ...] = (
    "H", "He", "Li", "Be", "B", "C", "N", "O", "F", "Ne", "Na", "Mg", "Al", "Si", "P", "S", "Cl",
    "Ar", "K", "Ca", "Sc", "Ti", "V", "Cr", "Mn", "Fe", "Co", "Ni", "Cu", "Zn", "Ga", "Ge", "As",
    "Se", "Br", "Kr", "Rb", "Sr", "Y", "Zr", "Nb", "Mo", "Tc", "Ru", "Rh", "Pd", "Ag", "Cd", "In",
    "Sn", "Sb", "Te", "I", "Xe", "Cs", "Ba", "La", "Ce", "Pr", "Nd", "Pm", "Sm", "Eu", "Gd", "Tb",
    "Dy", "Ho", "Er", "Tm", "Yb", "Lu", "Hf", "Ta", "W", "Re", "Os", "Ir", "Pt", "Au", "Hg", "Tl",
    "Pb", "Bi", "Po", "At", "Rn",
)
_ATOMIC_NUMBER = {symbol: z for z, symbol in enumerate(PERIODIC_TABLE, start=1)}


def unpaired_electrons(atomic_numbers: np.ndarray, charge: int) -> int:
    """The spin of the lowest state (xTB's ``uhf``): 0 for an even number of electrons, 1 for an odd number."""
    return int(atomic_numbers.sum() - charge) % 2


def atomic_number(symbol: str) -> int:
    """Atomic number of an element symbol such as ``"C"``; clear error for unknown symbols."""
    try:
        return _ATOMIC_NUMBER[symbol]
    except KeyError:
        raise ValueError(f"unknown element symbol {symbol!r}") from None


@dataclass(frozen=True, eq=False)
class Molecule:
    """One generated sample: ``symbols`` (one per atom) and ``positions`` [n, 3] in Angstrom.

    A point cloud (no atom types) is a Molecule with ``symbols == ()``.
    """

    symbols: tuple[str, ...]
    positions: np.ndarray

    def __post_init__(self) -> None:
        positions = np.asarray(self.positions, dtype=np.float64)
        if positions.ndim != 2 or positions.shape[1] != 3:
            raise ValueError(f"positions must have shape [n, 3], got {list(positions.shape)}")
        if self.symbols and len(self.symbols) != len(positions):
            raise ValueError(f"{len(self.symbols)} symbols for {len(positions)} positions")
        positions.setflags(write=False)  # frozen means frozen: the cache key depends on it
        object.__setattr__(self, "symbols", tuple(self.symbols))
        object.__setattr__(self, "positions", positions)

    @property
    def num_atoms(self) -> int:
        return len(self.positions)

    @property
    def atomic_numbers(self) -> np.ndarray:
        return np.array([atomic_number(s) for s in self.symbols], dtype=np.int64)

    def key(self, decimals: int = 4, target: float | None = None) -> str:
        """Hash of elements, coordinates rounded to ``decimals`` Angstrom, and an optional target.

        Two samples with the same key get the same cached reward.
        """
        rounded = np.round(self.positions, decimals) + 0.0  # + 0.0 turns -0.0 into 0.0
        digest = hashlib.blake2b(digest_size=16)
        digest.update(" ".join(self.symbols).encode())
        digest.update(rounded.tobytes())
        digest.update(repr(None if target is None else float(target)).encode())
        return digest.hexdigest()

    def __repr__(self) -> str:
        formula = "".join(self.symbols) if len(self.symbols) <= 12 else f"{len(self.symbols)} atoms"
        return f"Molecule({formula or f'{self.num_atoms} points'})"


def as_molecules(samples: Any) -> list[Molecule]:
    """Turn what a sampler produces into a list of Molecules.

    Accepts a ``MoleculeBatch`` (anything with a ``.molecules()`` method returning
    ``(symbols, positions)`` pairs), a list of Molecules, or a list of ``(symbols, positions)``.
    """
    if hasattr(samples, "molecules"):
        samples = samples.molecules()
    if not isinstance(samples, Iterable) or isinstance(samples, (str, bytes)):
        raise TypeError(f"cannot score {type(samples).__name__}: expected a MoleculeBatch or a list "
                        "of Molecule / (symbols, positions)")
    return [_as_molecule(sample, index) for index, sample in enumerate(samples)]


def _as_molecule(sample: Any, index: int) -> Molecule:
    if isinstance(sample, Molecule):
        return sample
    if isinstance(sample, Sequence) and len(sample) == 2:
        symbols, positions = sample
        if hasattr(positions, "detach"):  # a torch tensor, possibly on a GPU
            positions = positions.detach().cpu().numpy()
        return Molecule(tuple(symbols), np.asarray(positions, dtype=np.float64))
    raise TypeError(f"sample {index} is a {type(sample).__name__}; expected a Molecule "
                    "or a (symbols, positions) pair")
