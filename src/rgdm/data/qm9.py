"""QM9 (130,831 molecules, B3LYP/6-31G(2df,p) geometries) read from the ``qm9pack`` wheel's CSVs.

``import qm9pack`` fails on recent setuptools, so we only locate its package directory and read
``data/qm9_part{1,2,3}.csv`` with the ``csv`` module. The parsed set is cached as one torch file;
later loads take well under a second.

Splits reproduce Cormorant/EDM: molecules ordered by QM9 index, ``np.random.seed(0)`` permutation,
100,000 train / rest valid / ``int(0.1 N)`` test, each split kept in index order. D_a and D_b (EDM's
conditional protocol: property regressors train on D_a, generators on D_b) are EDM's
``qm9_first_half`` / ``qm9_second_half``: a ``np.random.seed(42)`` permutation of the train split
cut in two.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from rgdm.data.dataset import DataError, MoleculeDataset, centre_positions
from rgdm.data.properties import HARTREE_TO_MEV, PROPERTIES, UNITS  # noqa: F401 (re-exported)

ELEMENTS = ("H", "C", "N", "O", "F")
ELEMENTS_NO_H = ("C", "N", "O", "F")

NUM_MOLECULES = 130_831
"""QM9's 133,885 molecules minus the 3,054 that failed the consistency check (excluded by EDM)."""

SPLITS = ("train", "valid", "test", "Da", "Db", "all")
NUM_TRAIN = 100_000

# Our property name -> (CSV column, factor to EDM's unit).
_PROPERTY_COLUMNS = {
    "alpha": ("Polarizability_bohr3", 1.0),
    "gap": ("HOMO_LUMO_gap_au", HARTREE_TO_MEV),
    "homo": ("HOMO_au", HARTREE_TO_MEV),
    "lumo": ("LUMO_au", HARTREE_TO_MEV),
    "mu": ("Dipole_debye", 1.0),
    "Cv": ("Heatcapacity_Cv_cal_mol_K", 1.0),
}
_CSV_NAMES = ("qm9_part1.csv", "qm9_part2.csv", "qm9_part3.csv")
_CACHE_VERSION = "qm9-cache-v1"

# Parsed QM9 (all molecules, with H) per cache file, so repeated loads in one process are free.
_IN_MEMORY: dict[Path, tuple[MoleculeDataset, Tensor]] = {}


# --------------------------------------------------------------------------- public API
def load_qm9(split: str = "train", remove_h: bool = False, cache_dir: str | Path | None = None
             ) -> MoleculeDataset:
    """One QM9 split as a MoleculeDataset (properties in EDM's units, see ``UNITS``).

    split: "train" (100,000), "valid" (17,748), "test" (13,083), "Da"/"Db" (the two 50,000 halves
    of train) or "all". remove_h drops hydrogens and re-centres positions over heavy atoms.
    """
    everything, _ = _load_all(cache_dir)
    indices = split_indices(len(everything))[_checked_split(split)]
    dataset = everything.subset(indices)
    return dataset.without_element("H") if remove_h else dataset


def qm9_smiles(split: str = "train", cache_dir: str | Path | None = None) -> list[str]:
    """SMILES of one split (training SMILES are the reference set for novelty)."""
    everything, _ = _load_all(cache_dir)
    indices = split_indices(len(everything))[_checked_split(split)]
    return [everything.smiles[i] for i in indices.tolist()]


def qm9_indices(split: str = "train", cache_dir: str | Path | None = None) -> Tensor:
    """Original QM9 indices (1..133,885, the ``dsgdb9nsd_XXXXXX`` numbers) of one split."""
    everything, qm9_index = _load_all(cache_dir)
    return qm9_index[split_indices(len(everything))[_checked_split(split)]].clone()


def split_indices(num_molecules: int) -> dict[str, Tensor]:
    """Row positions (into the index-sorted set) of every split, built exactly as Cormorant/EDM do."""
    num_test = int(0.1 * num_molecules)
    num_valid = num_molecules - NUM_TRAIN - num_test
    if num_valid <= 0:
        raise DataError(f"QM9 has {num_molecules} molecules, too few for a {NUM_TRAIN}-molecule train split")
    permutation = np.random.RandomState(0).permutation(num_molecules)
    train = np.sort(permutation[:NUM_TRAIN])
    valid = np.sort(permutation[NUM_TRAIN:NUM_TRAIN + num_valid])
    test = np.sort(permutation[NUM_TRAIN + num_valid:])
    halves = np.random.RandomState(42).permutation(NUM_TRAIN)
    splits = {
        "train": train,
        "valid": valid,
        "test": test,
        "Da": np.sort(train[halves[: NUM_TRAIN // 2]]),
        "Db": np.sort(train[halves[NUM_TRAIN // 2:]]),
        "all": np.arange(num_molecules),
    }
    return {name: torch.from_numpy(rows).long() for name, rows in splits.items()}


def default_cache_dir() -> Path:
    """``$RGDM_CACHE`` if set, else ``~/.cache/rgdm``."""
    return Path(os.environ.get("RGDM_CACHE") or Path.home() / ".cache" / "rgdm")


def qm9_csv_paths() -> list[Path]:
    """The qm9pack CSV files, located without importing qm9pack."""
    spec = importlib.util.find_spec("qm9pack")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("QM9 needs the 'qm9pack' package: pip install qm9pack")
    data_dir = Path(next(iter(spec.submodule_search_locations))) / "data"
    paths = [data_dir / name for name in _CSV_NAMES]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"qm9pack is installed but its data file is missing: {missing[0]}")
    return paths


# --------------------------------------------------------------------------- cache
def _checked_split(split: str) -> str:
    if split not in SPLITS:
        raise DataError(f"unknown QM9 split '{split}' (choose from {', '.join(SPLITS)})")
    return split


def _cache_path(cache_dir: str | Path | None, csv_paths: list[Path]) -> Path:
    key = _CACHE_VERSION + "|" + "|".join(f"{p.name}:{p.stat().st_size}" for p in csv_paths)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return Path(cache_dir or default_cache_dir()) / f"qm9_{digest}.pt"


def _load_all(cache_dir: str | Path | None) -> tuple[MoleculeDataset, Tensor]:
    """All QM9 molecules with H and their QM9 indices: from memory, the cache file, or the CSVs."""
    csv_paths = qm9_csv_paths()
    path = _cache_path(cache_dir, csv_paths)
    if path not in _IN_MEMORY:
        state = _read_cache(path)
        if state is None:
            state = _build_state(csv_paths)
            _write_atomically(state, path)
        _IN_MEMORY[path] = (MoleculeDataset.from_dict(state["dataset"]), state["qm9_index"])
    return _IN_MEMORY[path]


def _read_cache(path: Path) -> dict | None:
    """The cached state, or None if absent or unreadable (a stale/corrupt cache is rebuilt)."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None
    return state if isinstance(state, dict) and state.get("version") == _CACHE_VERSION else None


def _write_atomically(state: dict, path: Path) -> None:
    """Write via a temporary file + rename, so a concurrent reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        torch.save(state, tmp_name)
        os.chmod(tmp_name, 0o644)  # mkstemp creates 0600; a shared cache should stay readable
        os.replace(tmp_name, path)
    finally:
        if os.path.exists(tmp_name):
            os.remove(tmp_name)


# --------------------------------------------------------------------------- CSV parsing
class _Columns:
    """Column-wise accumulator of parsed rows (flat atom arrays keep memory and time low)."""

    def __init__(self) -> None:
        self.qm9_index: list[int] = []
        self.smiles: list[str] = []
        self.num_atoms: list[int] = []
        self.atom_types: list[int] = []
        self.coordinates: list[float] = []
        self.properties: dict[str, list[float]] = {name: [] for name in PROPERTIES}


def _build_state(csv_paths: list[Path]) -> dict:
    columns = _Columns()
    for path in csv_paths:
        _parse_csv(path, columns)
    dataset, qm9_index = _assemble(columns)
    if len(set(qm9_index.tolist())) != len(qm9_index):
        raise DataError("qm9pack CSVs contain a duplicated molecule Index")
    return {"version": _CACHE_VERSION, "dataset": dataset.to_dict(), "qm9_index": qm9_index}


def _parse_csv(path: Path, columns: _Columns) -> None:
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path}: empty file")
        column = _column_positions(header, path)
        for row in reader:
            try:
                _parse_row(row, column, columns)
            except (ValueError, IndexError) as exc:
                raise DataError(f"{path}:{reader.line_num}: {exc}") from None


def _column_positions(header: list[str], path: Path) -> dict[str, int]:
    needed = ["Index", "SMILES", "N_atoms", "Elements", "XYZ_Ang"]
    needed += [csv_name for csv_name, _ in _PROPERTY_COLUMNS.values()]
    missing = [name for name in needed if name not in header]
    if missing:
        raise DataError(f"{path}:1: missing column '{missing[0]}'")
    return {name: header.index(name) for name in needed}


_TYPE_OF = {symbol: i for i, symbol in enumerate(ELEMENTS)}
_STRIP_BRACKETS = str.maketrans({"[": " ", "]": " ", ",": " ", "'": " ", '"': " "})


def _parse_row(row: list[str], column: dict[str, int], columns: _Columns) -> None:
    num_atoms = int(row[column["N_atoms"]])
    symbols = row[column["Elements"]].translate(_STRIP_BRACKETS).split()
    if len(symbols) != num_atoms:
        raise ValueError(f"Elements lists {len(symbols)} atoms but N_atoms is {num_atoms}")
    unknown = [s for s in symbols if s not in _TYPE_OF]
    if unknown:
        raise ValueError(f"unexpected element '{unknown[0]}'")
    coordinates = _parse_numbers(row[column["XYZ_Ang"]])
    if len(coordinates) != 3 * num_atoms:
        raise ValueError(f"XYZ_Ang has {len(coordinates)} numbers, expected 3 * {num_atoms}")

    columns.qm9_index.append(int(row[column["Index"]]))
    columns.smiles.append(row[column["SMILES"]])
    columns.num_atoms.append(num_atoms)
    columns.atom_types.extend(_TYPE_OF[s] for s in symbols)
    columns.coordinates.extend(coordinates)
    for name, (csv_name, factor) in _PROPERTY_COLUMNS.items():
        columns.properties[name].append(float(row[column[csv_name]]) * factor)


def _parse_numbers(text: str) -> list[float]:
    """Numbers of a nested list like ``[[0.59,0.,1.],[1.2E-5,...]]``.

    Not every row is valid JSON: some write ``0.`` (no digit after the point) and QM9's own
    files use Mathematica-style exponents ``1.2*^-5``; both are handled by splitting by hand.
    """
    tokens = text.replace("*^", "e").translate(_STRIP_BRACKETS).split()
    try:
        return [float(token) for token in tokens]
    except ValueError:
        bad = next(t for t in tokens if not _is_float(t))
        raise ValueError(f"XYZ_Ang has a non-numeric entry '{bad}'") from None


def _is_float(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def _assemble(columns: _Columns) -> tuple[MoleculeDataset, Tensor]:
    """Pad the flat per-atom arrays into [M, Nmax, ...] tensors, centre, and sort by QM9 index."""
    num_atoms = torch.tensor(columns.num_atoms, dtype=torch.long)
    molecule_of_atom = torch.repeat_interleave(torch.arange(len(num_atoms)), num_atoms)
    first_atom = torch.cumsum(num_atoms, 0) - num_atoms
    slot_of_atom = torch.arange(len(molecule_of_atom)) - first_atom[molecule_of_atom]

    n_max = int(num_atoms.max())
    positions = torch.zeros(len(num_atoms), n_max, 3, dtype=torch.float64)
    coordinates = torch.tensor(columns.coordinates, dtype=torch.float64).view(-1, 3)
    positions[molecule_of_atom, slot_of_atom] = coordinates
    atom_types = torch.zeros(len(num_atoms), n_max, dtype=torch.long)
    atom_types[molecule_of_atom, slot_of_atom] = torch.tensor(columns.atom_types, dtype=torch.long)
    mask = torch.arange(n_max) < num_atoms.unsqueeze(1)
    positions = centre_positions(positions, mask).float()

    qm9_index = torch.tensor(columns.qm9_index, dtype=torch.long)
    order = torch.argsort(qm9_index)
    dataset = MoleculeDataset(
        positions=positions[order],
        atom_types=atom_types[order],
        num_atoms=num_atoms[order],
        elements=ELEMENTS,
        properties={name: torch.tensor(values, dtype=torch.float64)[order].float()
                    for name, values in columns.properties.items()},
        smiles=[columns.smiles[i] for i in order.tolist()],
    )
    return dataset, qm9_index[order]
