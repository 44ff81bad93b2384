"""Chemistry rewards with RDKit: validity, QED, SA score, logP, ring and atom-count constraints.

Molecules are built from generated coordinates by :func:`rgdm.eval.bonds.build_rdkit_mol`, the
same code the evaluation metrics use. ``validity`` defaults to ``method="edm"`` (EDM's distance-based
bonds), so the reward and the validity metric agree. The property rewards default to
``method="rdkit"`` (RDKit's DetermineBonds, which also assigns formal charges and aromaticity):
on force-field geometries of drug-like molecules EDM's bond-length rules misread aromatic rings, while
DetermineBonds reproduces the properties of the SMILES-derived molecule exactly (tested). Properties are
computed on the largest fragment with hydrogens made implicit, as for a SMILES-derived molecule.
A molecule that does not sanitise is an *invalid sample* (penalised), except for ``validity``,
which scores it 0.
"""

from __future__ import annotations

import functools
from typing import Any

from rgdm.rewards.molecule import Molecule
from rgdm.rewards.registry import register_reward
from rgdm.rewards.scoring import InvalidSample, PerMolecule, RewardSetupError

_METHODS = ("edm", "rdkit")


def import_rdkit() -> None:
    """Worker warm-up: pay RDKit's import time before the first timed call."""
    import rgdm.eval.bonds  # noqa: F401 - imported for its side effect of loading RDKit


def sanitized_fragment(molecule: Molecule, method: str = "edm") -> Any:
    """Largest fragment of the molecule built from 3D, sanitised, hydrogens implicit.

    Raises InvalidSample if no molecule can be built or it does not sanitise.
    """
    from rdkit import Chem

    from rgdm.eval.bonds import build_rdkit_mol

    if not molecule.symbols:
        raise InvalidSample("a point cloud has no atom types")
    mol = build_rdkit_mol(molecule.symbols, molecule.positions, method=method)
    if mol is None:
        raise InvalidSample("RDKit found no valid bonding for these coordinates")
    try:
        fragments = Chem.GetMolFrags(mol, asMols=True, sanitizeFrags=False)
        largest = Chem.Mol(max(fragments, key=lambda f: f.GetNumAtoms()))
        Chem.SanitizeMol(largest)
        return Chem.RemoveHs(largest)
    except Exception as error:  # noqa: BLE001 - RDKit raises several unrelated types
        raise InvalidSample(f"molecule does not sanitise: {error}") from None


def number_of_fragments(molecule: Molecule, method: str = "edm") -> int:
    from rdkit import Chem

    from rgdm.eval.bonds import build_rdkit_mol

    mol = build_rdkit_mol(molecule.symbols, molecule.positions, method=method)
    return 0 if mol is None else len(Chem.GetMolFrags(mol))


def _checked_method(method: str) -> str:
    if method not in _METHODS:
        raise ValueError(f"method must be one of {', '.join(_METHODS)}, got {method!r}")
    return method


# ----------------------------------------------------------------------------- scoring functions


def validity_score(molecule: Molecule, method: str = "edm", allow_fragments: bool = True) -> float:
    """1.0 if the largest fragment sanitises (EDM validity), else 0.0."""
    try:
        sanitized_fragment(molecule, method)
    except InvalidSample:
        return 0.0
    if not allow_fragments and number_of_fragments(molecule, method) > 1:
        return 0.0
    return 1.0


def qed_score(molecule: Molecule, method: str = "rdkit") -> float:
    from rdkit.Chem import QED

    return QED.qed(sanitized_fragment(molecule, method))


def sa_score(molecule: Molecule, method: str = "rdkit") -> float:
    return _sascorer().calculateScore(sanitized_fragment(molecule, method))


def logp_score(molecule: Molecule, method: str = "rdkit") -> float:
    from rdkit.Chem import Crippen

    return Crippen.MolLogP(sanitized_fragment(molecule, method))


def ring_violation(molecule: Molecule, method: str = "rdkit", min_rings: int = 0,
                   max_rings: int | None = None, min_ring_size: int | None = None,
                   max_ring_size: int | None = None) -> float:
    """Minus the amount by which the ring constraints are broken (0.0 when all hold)."""
    mol = sanitized_fragment(molecule, method)  # keep a reference: RingInfo does not own the molecule
    ring_sizes = [len(ring) for ring in mol.GetRingInfo().AtomRings()]
    violation = max(0, min_rings - len(ring_sizes))
    if max_rings is not None:
        violation += max(0, len(ring_sizes) - max_rings)
    if min_ring_size is not None:
        violation += sum(size < min_ring_size for size in ring_sizes)
    if max_ring_size is not None:
        violation += sum(size > max_ring_size for size in ring_sizes)
    return -float(violation)


def atom_count_violation(molecule: Molecule, min_atoms: int | None = None, max_atoms: int | None = None,
                         element: str | None = None, heavy_only: bool = False) -> float:
    """Minus the distance of the atom count from [min_atoms, max_atoms] (0.0 inside the range)."""
    symbols = molecule.symbols
    if element is not None:
        symbols = tuple(s for s in symbols if s == element)
    elif heavy_only:
        symbols = tuple(s for s in symbols if s != "H")
    count = len(symbols) if molecule.symbols else molecule.num_atoms
    below = 0 if min_atoms is None else max(0, min_atoms - count)
    above = 0 if max_atoms is None else max(0, count - max_atoms)
    return -float(below + above)


def sascorer_path() -> str:
    """Where the RDKit wheel ships the SA score (Ertl & Schuffenhauer 2009): Contrib/SA_Score."""
    import os

    from rdkit.Chem import RDConfig

    path = os.path.join(RDConfig.RDContribDir, "SA_Score", "sascorer.py")
    if not os.path.exists(path):
        raise RewardSetupError(f"RDKit's SA_Score contribution is missing ({path}); sa_score needs it")
    return path


@functools.lru_cache(maxsize=1)
def _sascorer() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("sascorer", sascorer_path())
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


# ------------------------------------------------------------------------------------- registry


@register_reward("validity", units="1 valid / 0 invalid")
def validity(method: str = "edm", allow_fragments: bool = True) -> PerMolecule:
    """1 if the largest fragment of the molecule built from 3D sanitises (EDM validity), else 0.

    allow_fragments=False also scores disconnected molecules 0.
    """
    params = {"method": _checked_method(method), "allow_fragments": allow_fragments}
    return PerMolecule(validity_score, params, setup=import_rdkit)


@register_reward("qed", units="QED in [0, 1]")
def qed(method: str = "rdkit") -> PerMolecule:
    """Quantitative estimate of drug-likeness (Bickerton et al. 2012), higher is more drug-like."""
    return PerMolecule(qed_score, {"method": _checked_method(method)}, setup=import_rdkit)


@register_reward("sa_score", units="SA score in [1, 10], lower is easier to make")
def sa(method: str = "rdkit") -> PerMolecule:
    """Synthetic accessibility score (1 easy .. 10 hard); use a negative weight to reward easy ones."""
    sascorer_path()  # fail at configuration time, not on every sample
    return PerMolecule(sa_score, {"method": _checked_method(method)}, setup=import_rdkit)


@register_reward("logp", units="Crippen logP")
def logp(method: str = "rdkit") -> PerMolecule:
    """Crippen octanol-water partition coefficient."""
    return PerMolecule(logp_score, {"method": _checked_method(method)}, setup=import_rdkit)


@register_reward("ring_constraint", units="-(number of broken ring constraints)")
def ring_constraint(method: str = "rdkit", min_rings: int = 0, max_rings: int | None = None,
                    min_ring_size: int | None = None, max_ring_size: int | None = None) -> PerMolecule:
    """0 when the ring count and every ring size are within bounds, minus the violations otherwise."""
    params = {"method": _checked_method(method), "min_rings": min_rings, "max_rings": max_rings,
              "min_ring_size": min_ring_size, "max_ring_size": max_ring_size}
    return PerMolecule(ring_violation, params, setup=import_rdkit)


@register_reward("atom_count", units="-(atoms outside the allowed range)")
def atom_count(min_atoms: int | None = None, max_atoms: int | None = None, element: str | None = None,
               heavy_only: bool = False) -> PerMolecule:
    """0 when the number of atoms (of ``element``, or heavy atoms) is within bounds, else minus the excess."""
    params = {"min_atoms": min_atoms, "max_atoms": max_atoms, "element": element, "heavy_only": heavy_only}
    return PerMolecule(atom_count_violation, params)
