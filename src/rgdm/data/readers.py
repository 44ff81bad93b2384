"""Read and write molecules from user files: multi-frame xyz, QM9's own xyz format, and SDF.

Every reader returns ``(symbols, positions [n, 3] float64 ndarray)`` per molecule; malformed input
raises :class:`DataError` whose message starts with ``file:line`` (xyz) or ``file: record k`` (SDF).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from torch import Tensor

from rgdm.data.batch import ATOMIC_NUMBERS
from rgdm.data.dataset import DataError, MoleculeDataset, from_molecules

XYZ_SUFFIXES = (".xyz",)
SDF_SUFFIXES = (".sdf", ".mol")

_SYMBOL_OF_NUMBER = {number: symbol for symbol, number in ATOMIC_NUMBERS.items()}
_QM9_TRAILING_LINES = 3  # harmonic frequencies, SMILES (GDB9 and relaxed), InChI (GDB9 and relaxed)


# --------------------------------------------------------------------------- xyz
def read_xyz(path: str | Path) -> list[tuple[list[str], np.ndarray]]:
    """All frames of an xyz file.

    Plain xyz: an atom-count line, a comment line, then ``El x y z`` lines (extra columns ignored).
    QM9's xyz (detected by a comment line starting with ``gdb``): atom lines carry a Mulliken
    charge as 5th column and may use Mathematica exponents (``1.2*^-5``); each frame ends with
    frequency, SMILES and InChI lines, which are skipped.
    """
    path = Path(path)
    lines = _read_lines(path)
    molecules = []
    line_no = 0  # 0-based index of the next unread line
    while line_no < len(lines):
        if not lines[line_no].strip():
            line_no += 1
            continue
        molecule, line_no = _read_xyz_frame(lines, line_no, path)
        molecules.append(molecule)
    if not molecules:
        raise DataError(f"{path}:1: no molecules in file")
    return molecules


def write_xyz(
    path: str | Path,
    molecules: Sequence[tuple[Sequence[str], np.ndarray | Tensor]],
    comments: Sequence[str] | None = None,
) -> None:
    """Write molecules as a multi-frame xyz file (positions in Angstrom)."""
    if comments is not None and len(comments) != len(molecules):
        raise DataError(f"got {len(comments)} comments for {len(molecules)} molecules")
    blocks = []
    for i, (symbols, positions) in enumerate(molecules):
        xyz = _as_array(positions)
        if xyz.shape != (len(symbols), 3):
            raise DataError(f"molecule {i}: positions have shape {list(xyz.shape)}, "
                            f"expected [{len(symbols)}, 3]")
        comment = comments[i] if comments is not None else ""
        if "\n" in comment:
            raise DataError(f"molecule {i}: an xyz comment must be a single line")
        atom_lines = [f"{s:<2s} {x:15.8f} {y:15.8f} {z:15.8f}"
                      for s, (x, y, z) in zip(symbols, xyz, strict=True)]
        blocks.append("\n".join([str(len(symbols)), comment, *atom_lines]))
    Path(path).write_text("\n".join(blocks) + "\n")


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        # utf-8-sig: files saved by Windows editors start with a byte-order mark, which is not data.
        return path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not a text file ({exc.reason} at byte {exc.start})") from None


def _read_xyz_frame(lines: list[str], start: int, path: Path) -> tuple[tuple[list[str], np.ndarray], int]:
    """Parse the frame whose count line is ``lines[start]``; return it and the next line index."""
    count = _atom_count(lines[start], path, start + 1)
    if start + 1 >= len(lines):
        raise DataError(f"{path}:{start + 1}: file ends after the atom count (no comment line)")
    is_qm9 = _is_qm9_comment(lines[start + 1])
    first_atom = start + 2
    if first_atom + count > len(lines):
        found = len(lines) - first_atom
        raise DataError(f"{path}:{len(lines)}: expected {count} atom lines after line {start + 1}, "
                        f"file ends after {found}")
    symbols, coordinates = [], []
    for line_no in range(first_atom, first_atom + count):
        symbol, xyz = _parse_atom_line(lines[line_no], path, line_no + 1)
        symbols.append(symbol)
        coordinates.append(xyz)
    next_line = first_atom + count
    if is_qm9:
        if next_line + _QM9_TRAILING_LINES > len(lines):
            raise DataError(f"{path}:{len(lines)}: QM9 frame ends early (expected frequency, "
                            "SMILES and InChI lines after the atoms)")
        next_line += _QM9_TRAILING_LINES
    return (symbols, np.array(coordinates, dtype=np.float64)), next_line


def _atom_count(line: str, path: Path, line_no: int) -> int:
    token = line.strip()
    if not token.isdigit() or int(token) == 0:
        raise DataError(f"{path}:{line_no}: expected a positive atom count, got '{token[:40]}'")
    return int(token)


def _is_qm9_comment(line: str) -> bool:
    # QM9 property line: "gdb <index> A B C mu alpha homo lumo gap r2 zpve U0 U H G Cv" (17 fields).
    fields = line.split()
    return len(fields) >= 17 and fields[0] == "gdb" and fields[1].isdigit()


def _parse_atom_line(line: str, path: Path, line_no: int) -> tuple[str, list[float]]:
    fields = line.split()
    if len(fields) < 4:
        raise DataError(f"{path}:{line_no}: expected 'element x y z', got '{line.strip()[:60]}'")
    symbol = _normalise_symbol(fields[0], path, line_no)
    try:
        xyz = [float(f.replace("*^", "e")) for f in fields[1:4]]
    except ValueError:
        raise DataError(f"{path}:{line_no}: coordinates are not numbers: '{' '.join(fields[1:4])}'") from None
    if not all(np.isfinite(xyz)):
        raise DataError(f"{path}:{line_no}: coordinates must be finite, got {' '.join(fields[1:4])}")
    return symbol, xyz


def _normalise_symbol(token: str, path: Path, line_no: int) -> str:
    """'c', 'C' or '6' -> 'C'. Unknown symbols pass through; the dataset reports them by molecule."""
    if token.isdigit():
        number = int(token)
        if number not in _SYMBOL_OF_NUMBER:
            raise DataError(f"{path}:{line_no}: unsupported atomic number {number}")
        return _SYMBOL_OF_NUMBER[number]
    if not token.isalpha():
        raise DataError(f"{path}:{line_no}: '{token}' is not an element symbol")
    return token.capitalize()


def _as_array(positions: np.ndarray | Tensor) -> np.ndarray:
    if isinstance(positions, Tensor):
        positions = positions.detach().cpu().numpy()
    return np.asarray(positions, dtype=np.float64)


# --------------------------------------------------------------------------- SDF
def read_sdf(path: str | Path) -> list[tuple[list[str], np.ndarray]]:
    """All records of an SDF/MOL file, with explicit hydrogens kept as written.

    Records are not sanitised (only element and 3D coordinates are needed, and generated
    molecules may have unusual valences); records RDKit cannot parse, or without 3D coordinates,
    raise DataError naming the record (1-based).
    """
    from rdkit import Chem  # heavy import, only when SDF is used

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    molecules = []
    with _quiet_rdkit():
        supplier = Chem.SDMolSupplier(str(path), removeHs=False, sanitize=False)
        for record, mol in enumerate(supplier, start=1):
            molecules.append(_sdf_molecule(mol, path, record))
    if not molecules:
        raise DataError(f"{path}: no molecules in file")
    return molecules


def _sdf_molecule(mol, path: Path, record: int) -> tuple[list[str], np.ndarray]:
    if mol is None:
        raise DataError(f"{path}: record {record}: RDKit cannot parse this molecule")
    if mol.GetNumAtoms() == 0:
        raise DataError(f"{path}: record {record}: molecule has no atoms")
    if mol.GetNumConformers() == 0 or not mol.GetConformer().Is3D():
        raise DataError(f"{path}: record {record}: no 3D coordinates (2D or missing conformer)")
    symbols = [atom.GetSymbol() for atom in mol.GetAtoms()]
    positions = np.array(mol.GetConformer().GetPositions(), dtype=np.float64)
    return symbols, positions


@contextlib.contextmanager
def _quiet_rdkit() -> Iterator[None]:
    """Silence RDKit's own stderr messages; we raise a clearer DataError instead."""
    from rdkit import RDLogger

    RDLogger.DisableLog("rdApp.*")
    try:
        yield
    finally:
        RDLogger.EnableLog("rdApp.*")


# --------------------------------------------------------------------------- files -> dataset
def load_molecule_files(
    paths: str | Path | Iterable[str | Path],
    remove_h: bool = False,
    elements: Sequence[str] | None = None,
) -> MoleculeDataset:
    """Read xyz/SDF files (or directories of them, searched recursively) into one dataset.

    elements: the type vocabulary (e.g. QM9's, to match a pretrained model); by default the
    elements present, ordered by atomic number.
    """
    molecules: list[tuple[list[str], np.ndarray]] = []
    labels: list[str] = []
    for file in _molecule_files(paths):
        unit = "frame" if file.suffix.lower() in XYZ_SUFFIXES else "record"
        read = read_xyz if unit == "frame" else read_sdf
        for k, molecule in enumerate(read(file), start=1):
            molecules.append(molecule)
            labels.append(f"{file}: {unit} {k}")
    if remove_h:
        molecules = [_without_hydrogens(m, label) for m, label in zip(molecules, labels, strict=True)]
    return from_molecules(molecules, elements=elements, labels=labels)


def _molecule_files(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    if isinstance(paths, (str, Path)):
        paths = [paths]
    suffixes = XYZ_SUFFIXES + SDF_SUFFIXES
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
            if not found:
                raise DataError(f"{path}: directory contains no {'/'.join(suffixes)} files")
            files.extend(found)
        elif not path.exists():
            raise DataError(f"{path}: no such file or directory")
        elif path.suffix.lower() not in suffixes:
            raise DataError(f"{path}: unsupported file type '{path.suffix}' (use {', '.join(suffixes)})")
        else:
            files.append(path)
    if not files:
        raise DataError("no molecule files given")
    return files


def _without_hydrogens(molecule: tuple[list[str], np.ndarray], label: str) -> tuple[list[str], np.ndarray]:
    symbols, positions = molecule
    heavy = [i for i, s in enumerate(symbols) if s != "H"]
    if not heavy:
        raise DataError(f"{label}: no heavy atoms left after removing hydrogens")
    return [symbols[i] for i in heavy], positions[heavy]
