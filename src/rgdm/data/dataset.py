"""In-memory molecule datasets: padded tensors, batching, node-count and property statistics.

A :class:`MoleculeDataset` stores every molecule padded to the dataset's largest atom count, which
keeps slicing and batching vectorised. Batches are re-padded to the largest molecule *in the
batch*: an EGNN's cost grows with N², so trimming the padding matters for speed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from rgdm.data.batch import ATOMIC_NUMBERS, MoleculeBatch


class DataError(ValueError):
    """A user-facing problem with input data; the message names the file/line/key at fault."""


Molecule = tuple[Sequence[str], "np.ndarray | Tensor"]
"""One molecule as ``(element symbols, positions [n, 3] in Angstrom)``."""

_SAVE_FORMAT = "rgdm.MoleculeDataset/1"


@dataclass
class MoleculeDataset:
    """M molecules padded to Nmax atoms.

    positions:  [M, Nmax, 3] float32, Angstrom, zero centre of mass per molecule, padding = 0.
    atom_types: [M, Nmax] long, index into ``elements``; padding = 0 (use ``num_atoms``).
    num_atoms:  [M] long.
    elements:   element symbol of each type index.
    properties: per-molecule scalars [M] float32 (QM9: EDM units, see rgdm.data.qm9.UNITS).
    smiles:     one SMILES per molecule, or empty strings when unknown (user files).
    """

    positions: Tensor
    atom_types: Tensor
    num_atoms: Tensor
    elements: tuple[str, ...]
    properties: dict[str, Tensor] = field(default_factory=dict)
    smiles: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.elements = tuple(self.elements)
        num_molecules = self.positions.shape[0]
        if self.positions.dim() != 3 or self.positions.shape[-1] != 3:
            raise DataError(f"positions must have shape [M, N, 3], got {list(self.positions.shape)}")
        if self.atom_types.shape != self.positions.shape[:2]:
            raise DataError(f"atom_types shape {list(self.atom_types.shape)} does not match positions")
        if self.num_atoms.shape != (num_molecules,):
            raise DataError(f"num_atoms must have shape [{num_molecules}], got {list(self.num_atoms.shape)}")
        for name, values in self.properties.items():
            if values.shape != (num_molecules,):
                raise DataError(f"property '{name}' must have shape [{num_molecules}], "
                                f"got {list(values.shape)}")
        if not self.smiles:
            self.smiles = [""] * num_molecules
        if len(self.smiles) != num_molecules:
            raise DataError(f"got {len(self.smiles)} SMILES for {num_molecules} molecules")

    # ----------------------------------------------------------------- basic access
    def __len__(self) -> int:
        return self.positions.shape[0]

    @property
    def max_atoms(self) -> int:
        return self.positions.shape[1]

    def node_mask(self) -> Tensor:
        """[M, Nmax] bool, True for real atoms."""
        return torch.arange(self.max_atoms) < self.num_atoms.unsqueeze(1)

    def molecule(self, index: int) -> tuple[list[str], Tensor]:
        """Unpadded ``(symbols, positions [n, 3])`` of one molecule."""
        n = int(self.num_atoms[index])
        symbols = [self.elements[int(t)] for t in self.atom_types[index, :n]]
        return symbols, self.positions[index, :n].clone()

    def subset(self, indices: Sequence[int] | Tensor) -> MoleculeDataset:
        """A new dataset of the given molecules, trimmed to their own largest atom count."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        n_max = int(self.num_atoms[idx].max()) if len(idx) else 0
        return MoleculeDataset(
            positions=self.positions[idx, :n_max].clone(),
            atom_types=self.atom_types[idx, :n_max].clone(),
            num_atoms=self.num_atoms[idx].clone(),
            elements=self.elements,
            properties={k: v[idx].clone() for k, v in self.properties.items()},
            smiles=[self.smiles[i] for i in idx.tolist()],
        )

    # ----------------------------------------------------------------- batching
    def batch(self, indices: Sequence[int] | Tensor) -> MoleculeBatch:
        """A MoleculeBatch padded to the largest molecule among ``indices`` (not the global Nmax)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        num_atoms = self.num_atoms[idx]
        n_max = int(num_atoms.max())
        node_mask = (torch.arange(n_max) < num_atoms.unsqueeze(1)).unsqueeze(-1).float()
        return MoleculeBatch(
            positions=self.positions[idx, :n_max].clone(),
            atom_types=self.atom_types[idx, :n_max].clone(),
            node_mask=node_mask,
            elements=self.elements,
            properties={k: v[idx].clone() for k, v in self.properties.items()},
        )

    def batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
    ) -> Iterator[MoleculeBatch]:
        """Iterate over the dataset in batches (one epoch)."""
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        order = torch.randperm(len(self), generator=generator) if shuffle else torch.arange(len(self))
        for start in range(0, len(self), batch_size):
            chunk = order[start:start + batch_size]
            if drop_last and len(chunk) < batch_size:
                return
            yield self.batch(chunk)

    # ----------------------------------------------------------------- statistics
    def node_count_distribution(self) -> NodeCountDistribution:
        return NodeCountDistribution.from_num_atoms(self.num_atoms)

    def property_stats(self, name: str) -> tuple[float, float]:
        """(mean, mean absolute deviation) of a property: EDM normalises context as (c - mean) / mad."""
        values = self._property(name).double()
        mean = values.mean()
        mad = (values - mean).abs().mean()
        return float(mean), float(mad)

    def _property(self, name: str) -> Tensor:
        if name not in self.properties:
            known = ", ".join(sorted(self.properties)) or "none"
            raise DataError(f"unknown property '{name}' (dataset has: {known})")
        return self.properties[name]

    # ----------------------------------------------------------------- transforms
    def without_element(self, symbol: str) -> MoleculeDataset:
        """Drop every atom of one element (e.g. "H"), re-centre, and remove it from ``elements``."""
        if symbol not in self.elements:
            return self.subset(torch.arange(len(self)))
        dropped_type = self.elements.index(symbol)
        keep = self.node_mask() & (self.atom_types != dropped_type)
        # Stable sort puts kept atoms first, in their original order.
        order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices
        num_atoms = keep.sum(dim=1)
        if bool((num_atoms == 0).any()):
            first = int(torch.nonzero(num_atoms == 0)[0, 0])
            raise DataError(f"molecule {first} has no atoms left after removing {symbol}")
        n_max = int(num_atoms.max())
        order = order[:, :n_max]
        mask = torch.arange(n_max) < num_atoms.unsqueeze(1)
        positions = torch.gather(self.positions.double(), 1, order.unsqueeze(-1).expand(-1, -1, 3))
        positions = centre_positions(positions, mask).float()
        types = torch.gather(self.atom_types, 1, order)
        types = torch.where(types > dropped_type, types - 1, types) * mask
        return MoleculeDataset(
            positions=positions,
            atom_types=types,
            num_atoms=num_atoms,
            elements=tuple(e for e in self.elements if e != symbol),
            properties={k: v.clone() for k, v in self.properties.items()},
            smiles=list(self.smiles),
        )

    # ----------------------------------------------------------------- persistence
    def to_dict(self) -> dict[str, Any]:
        """Plain tensors, lists and strings only, so ``torch.load(weights_only=True)`` can read it."""
        return {
            "format": _SAVE_FORMAT,
            "positions": self.positions,
            "atom_types": self.atom_types,
            "num_atoms": self.num_atoms,
            "elements": list(self.elements),
            "properties": dict(self.properties),
            "smiles": list(self.smiles),
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> MoleculeDataset:
        if state.get("format") != _SAVE_FORMAT:
            raise DataError(f"not a saved MoleculeDataset (format={state.get('format')!r})")
        return cls(
            positions=state["positions"],
            atom_types=state["atom_types"],
            num_atoms=state["num_atoms"],
            elements=tuple(state["elements"]),
            properties=dict(state["properties"]),
            smiles=list(state["smiles"]),
        )

    def save(self, path: str | Path) -> None:
        torch.save(self.to_dict(), Path(path))

    @classmethod
    def load(cls, path: str | Path) -> MoleculeDataset:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # corrupt or foreign file: one clear line, not a pickle traceback
            raise DataError(f"{path}: cannot read a MoleculeDataset ({type(exc).__name__})") from exc
        if not isinstance(state, dict):
            raise DataError(f"{path}: not a saved MoleculeDataset")
        try:
            return cls.from_dict(state)
        except DataError as exc:
            raise DataError(f"{path}: {exc}") from None


@dataclass
class NodeCountDistribution:
    """Empirical distribution of atom counts; ``counts[n]`` molecules have n atoms."""

    counts: list[int]

    def __post_init__(self) -> None:
        if not self.counts or sum(self.counts) <= 0 or min(self.counts) < 0:
            raise DataError("a node-count histogram needs non-negative counts with a positive total")

    @classmethod
    def from_num_atoms(cls, num_atoms: Tensor | Sequence[int]) -> NodeCountDistribution:
        num_atoms = torch.as_tensor(num_atoms, dtype=torch.long)
        return cls(counts=torch.bincount(num_atoms).tolist())

    @property
    def probs(self) -> Tensor:
        """[max_nodes + 1] float64 probabilities indexed by atom count."""
        counts = torch.tensor(self.counts, dtype=torch.float64)
        return counts / counts.sum()

    @property
    def max_nodes(self) -> int:
        return len(self.counts) - 1

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """[n] long atom counts drawn from the histogram."""
        return torch.multinomial(self.probs, n, replacement=True, generator=generator)

    def log_prob(self, counts: Tensor | Sequence[int]) -> Tensor:
        """Log-probability of each count (float64; -inf for counts never seen)."""
        counts = torch.as_tensor(counts, dtype=torch.long)
        in_range = (counts >= 0) & (counts <= self.max_nodes)
        probs = self.probs[counts.clamp(0, self.max_nodes)]
        return torch.where(in_range, probs.log(), torch.full_like(probs, -torch.inf))

    def to_dict(self) -> dict[str, list[int]]:
        return {"counts": list(self.counts)}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> NodeCountDistribution:
        if "counts" not in state:
            raise DataError("node-count distribution state has no 'counts' key")
        return cls(counts=[int(c) for c in state["counts"]])


def sample_with_property(
    dataset: MoleculeDataset, property_name: str, n: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Jointly draw (atom counts [n] long, property values [n] float) from random dataset molecules.

    EDM's conditional protocol samples target and size together so the pair is realistic (a large
    polarisability with 5 atoms would be an impossible request).
    """
    values = dataset._property(property_name)
    # drawn on the generator's device (the model's), then used as indices of the CPU-held data set
    device = generator.device if generator is not None else None
    picks = torch.randint(len(dataset), (n,), generator=generator, device=device).cpu()
    return dataset.num_atoms[picks].clone(), values[picks].clone()


def from_molecules(
    molecules: Sequence[Molecule],
    elements: Sequence[str] | None = None,
    properties: dict[str, Sequence[float] | Tensor] | None = None,
    smiles: Sequence[str] | None = None,
    labels: Sequence[str] | None = None,
) -> MoleculeDataset:
    """Build a dataset from ``(symbols, positions)`` pairs, centring each molecule.

    elements: type vocabulary; by default the elements present, ordered by atomic number.
    labels:   how errors name each molecule (e.g. "mols.xyz frame 3"); default "molecule i".
    """
    if not molecules:
        raise DataError("no molecules given")
    labels = list(labels) if labels is not None else [f"molecule {i}" for i in range(len(molecules))]
    coords = [_validated_positions(pos, len(symbols), label)
              for (symbols, pos), label in zip(molecules, labels, strict=True)]
    elements = tuple(elements) if elements is not None else _elements_present(molecules, labels)
    type_of = {symbol: i for i, symbol in enumerate(elements)}

    num_atoms = torch.tensor([len(symbols) for symbols, _ in molecules], dtype=torch.long)
    n_max = int(num_atoms.max())
    positions = torch.zeros(len(molecules), n_max, 3, dtype=torch.float64)
    atom_types = torch.zeros(len(molecules), n_max, dtype=torch.long)
    for i, ((symbols, _), xyz, label) in enumerate(zip(molecules, coords, labels, strict=True)):
        atom_types[i, : len(symbols)] = torch.tensor(_type_indices(symbols, type_of, label))
        positions[i, : len(symbols)] = xyz - xyz.mean(dim=0)
    return MoleculeDataset(
        positions=positions.float(),
        atom_types=atom_types,
        num_atoms=num_atoms,
        elements=elements,
        properties=_property_tensors(properties or {}, len(molecules)),
        smiles=list(smiles) if smiles is not None else [],
    )


def _validated_positions(positions: np.ndarray | Tensor, n_symbols: int, label: str) -> Tensor:
    xyz = torch.as_tensor(np.asarray(positions, dtype=np.float64))
    if n_symbols == 0:
        raise DataError(f"{label}: molecule has no atoms")
    if xyz.shape != (n_symbols, 3):
        raise DataError(f"{label}: positions have shape {list(xyz.shape)}, expected [{n_symbols}, 3]")
    if not bool(torch.isfinite(xyz).all()):
        raise DataError(f"{label}: positions contain NaN or infinity")
    return xyz


def _elements_present(molecules: Sequence[Molecule], labels: Sequence[str]) -> tuple[str, ...]:
    present: set[str] = set()
    for (symbols, _), label in zip(molecules, labels, strict=True):
        for symbol in symbols:
            if symbol not in ATOMIC_NUMBERS:
                raise DataError(f"{label}: unknown element '{symbol}'")
            present.add(symbol)
    return tuple(sorted(present, key=ATOMIC_NUMBERS.__getitem__))


def _type_indices(symbols: Sequence[str], type_of: dict[str, int], label: str) -> list[int]:
    try:
        return [type_of[s] for s in symbols]
    except KeyError as missing:
        allowed = ", ".join(type_of)
        raise DataError(f"{label}: unknown element '{missing.args[0]}' (allowed: {allowed})") from None


def _property_tensors(properties: dict[str, Sequence[float] | Tensor], count: int) -> dict[str, Tensor]:
    out = {}
    for name, values in properties.items():
        tensor = torch.as_tensor(values, dtype=torch.float32).reshape(-1)
        if tensor.shape != (count,):
            raise DataError(f"property '{name}' has {tensor.numel()} values for {count} molecules")
        out[name] = tensor
    return out


def centre_positions(positions: Tensor, mask: Tensor) -> Tensor:
    """Zero the CoM over real atoms of padded [M, N, 3] positions; padding stays exactly zero."""
    weights = mask.unsqueeze(-1).to(positions.dtype)
    mean = (positions * weights).sum(dim=1, keepdim=True) / weights.sum(dim=1, keepdim=True).clamp(min=1)
    return (positions - mean) * weights
