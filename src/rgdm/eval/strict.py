"""Strict molecule metrics, reported beside EDM's (``rgdm.eval.molecules``, unchanged).

EDM's validity (Hoogeboom et al. 2022) sanitises the whole sample but names it by its largest
fragment, so nine fluorine atoms hundreds of Angstrom apart are "valid" (nine HF molecules). Its
stability needs explicit hydrogens: on heavy-atom samples every carbon with implicit hydrogens counts
as unstable. The strict row fixes both:

* **connected validity**: the EDM-built molecule sanitises *and* one fragment holds every atom;
* **PB-valid**: connected-valid and passing every check of PoseBusters' ``mol`` configuration
  (Buttenschoen et al., "PoseBusters: AI-based docking methods fail to generate physically valid
  poses or generalise to novel sequences", Chem. Sci. 2024): RDKit sanitisation, InChI conversion, all
  atoms connected, no radicals, bond lengths and angles within distance-geometry bounds, no internal
  steric clash, flat aromatic rings and double bonds, non-flat saturated rings, and a UFF energy at
  most 100 times that of an ensemble of 50 ETKDG conformers. Each check's pass rate is reported over
  the connected-valid molecules;
* **atom / molecule stability** only for molecules with hydrogens; for heavy-atom molecules they are
  "n/a" with the reason (``STABILITY_NA_REASON``).

Every metric is a fraction of all molecules with its binomial standard error.
PoseBusters runs in-process, single-threaded, on the RDKit package only: nothing is downloaded.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rgdm.eval.bonds import bond_matrix, mol_from_bond_matrix
from rgdm.eval.molecules import HasMolecules, Molecule, _as_molecule_list, _to_numpy, stability_from_bonds

STABILITY_NA_REASON = ("n/a: EDM's stability counts explicit hydrogens; without them every C, N and O with "
                       "implicit hydrogens is unstable (QM9's own test molecules score 34.7 % / 0.01 %)")
# PoseBusters' ``mol`` checks, by the column names of its report.
PB_CHECKS: tuple[str, ...] = (
    "sanitization", "inchi_convertible", "all_atoms_connected", "no_radicals", "bond_lengths", "bond_angles",
    "internal_steric_clash", "aromatic_ring_flatness", "non-aromatic_ring_non-flatness", "double_bond_flatness",
    "internal_energy",
)
DISAGREEMENT_POINTS = 20.0  # EDM vs strict validity gap (percentage points) that earns a warning


@dataclass
class StrictMetrics:
    """Counts behind the strict row; ``as_dict`` gives fractions and standard errors."""

    n_molecules: int = 0
    n_connected_valid: int = 0
    n_pb_valid: int = 0
    with_hydrogens: bool = True
    n_atoms: int = 0
    n_stable_atoms: int = 0
    n_stable_molecules: int = 0
    check_passes: dict[str, int] = field(default_factory=dict)
    n_pb_checked: int = 0
    posebusters: bool = True

    def as_dict(self) -> dict[str, Any]:
        n = self.n_molecules
        out: dict[str, Any] = {"n_molecules": n, "with_hydrogens": self.with_hydrogens}
        out["connected_validity"], out["connected_validity_se"] = proportion(self.n_connected_valid, n)
        if self.posebusters and self.n_pb_checked < self.n_connected_valid:
            # A subset was checked: PB-valid = connected validity x pass rate of the checked ones, with
            # the delta-method s.e. of that product.
            c, q = self.n_connected_valid / n, self.n_pb_valid / self.n_pb_checked if self.n_pb_checked else 0.0
            out["pb_valid"] = c * q
            out["pb_valid_se"] = math.sqrt(q * q * c * (1 - c) / n + c * c * q * (1 - q) / max(self.n_pb_checked, 1))
            out["pb_checked"] = self.n_pb_checked
        elif self.posebusters:
            out["pb_valid"], out["pb_valid_se"] = proportion(self.n_pb_valid, n)
        if self.posebusters:
            # None where no molecule was checked: the metrics JSON stays valid JSON (no NaN)
            out["pb_checks"] = {name: self.check_passes.get(name, 0) / self.n_pb_checked if self.n_pb_checked
                                else None for name in PB_CHECKS}
        if self.with_hydrogens:
            out["atom_stability"] = self.n_stable_atoms / self.n_atoms if self.n_atoms else math.nan
            # atoms of one molecule are not independent: the s.e. counts molecules (conservative)
            out["atom_stability_se"] = proportion(round(out["atom_stability"] * n), n)[1]
            out["molecule_stability"], out["molecule_stability_se"] = proportion(self.n_stable_molecules, n)
        else:
            out["atom_stability"] = out["molecule_stability"] = None
            out["stability_note"] = STABILITY_NA_REASON
        return out


def proportion(k: int, n: int) -> tuple[float, float]:
    """Fraction ``k / n`` and its binomial standard error sqrt(p (1 - p) / n); NaN for n = 0."""
    if n == 0:
        return math.nan, math.nan
    p = k / n
    return p, math.sqrt(p * (1.0 - p) / n)


def connected_molecule(symbols: Sequence[str], positions: np.ndarray, bonds: np.ndarray | None = None) -> Any:
    """The sanitised EDM-built RDKit molecule if it sanitises and is one fragment, else None."""
    from rdkit import Chem

    bonds = bond_matrix(symbols, positions) if bonds is None else bonds
    mol = mol_from_bond_matrix(symbols, positions, bonds)
    try:
        Chem.SanitizeMol(mol)
    except (ValueError, RuntimeError):
        return None
    return mol if len(Chem.GetMolFrags(mol)) == 1 else None


class PoseBustersChecks:
    """PoseBusters' ``mol`` checks on one RDKit molecule at a time, single-threaded and quiet."""

    def __init__(self) -> None:
        for name in ("posebusters", "posebusters.posebusters", "posebusters.modules"):
            logging.getLogger(name).setLevel(logging.ERROR)  # it logs its configuration choice at INFO
        from posebusters import PoseBusters

        config = PoseBusters(config="mol").config
        for module in config["modules"]:
            if module.get("function") == "energy_ratio":
                # PoseBusters' default uses every core for the conformer ensemble; the CPU is shared.
                module.setdefault("parameters", {})["num_threads"] = 1
        self._busters = PoseBusters(config=config, max_workers=0)
        _limit_conformer_embedding_time()
        from rdkit import RDLogger

        RDLogger.DisableLog("rdApp.*")

    def __call__(self, mol: Any) -> dict[str, bool]:
        """Check name -> passed, for every name in ``PB_CHECKS`` (a check that errored did not pass)."""
        from rdkit import RDLogger

        try:
            row = self._busters.bust([mol], None, None, full_report=False).iloc[0]
        except Exception:  # noqa: BLE001 - a molecule PoseBusters cannot read fails every check
            return dict.fromkeys(PB_CHECKS, False)
        finally:
            # PoseBusters routes RDKit's log to Python logging and turns it back on; invalid samples are
            # expected here, so keep RDKit quiet as rgdm.eval.bonds does.
            RDLogger.DisableLog("rdApp.*")
        return {name: _passed(row.get(name)) for name in PB_CHECKS}


EMBEDDING_TIMEOUT_S = 2  # per ETKDG attempt of the energy-ratio ensemble


def _limit_conformer_embedding_time() -> None:
    """Give PoseBusters' conformer ensemble a time limit per embedding attempt.

    PoseBusters sets none, and ETKDG can spend minutes on strained cages (73 s measured on the QM9
    test molecule CC12C(=O)N3CC1C32C, whose ensemble then fails anyway). With the limit such an
    embedding fails within seconds and the energy check fails, as it would have; embeddings that
    succeed take milliseconds and are unaffected (ETKDG is seeded by PoseBusters).
    """
    from posebusters.modules import energy_ratio
    from rdkit.Chem import rdDistGeom

    if getattr(energy_ratio.ETKDGv3, "_rgdm_time_limited", False):
        return

    def etkdg_with_timeout() -> Any:
        params = rdDistGeom.ETKDGv3()
        params.timeout = EMBEDDING_TIMEOUT_S
        return params

    etkdg_with_timeout._rgdm_time_limited = True  # type: ignore[attr-defined]
    energy_ratio.ETKDGv3 = etkdg_with_timeout


def _passed(value: Any) -> bool:
    # PoseBusters reports NaN where a check could not run (e.g. UFF lacks parameters): not a pass.
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    return bool(value)


def strict_metrics(molecules: Iterable[Molecule] | HasMolecules, posebusters: bool = True,
                   with_hydrogens: bool | None = None, progress: bool = False,
                   posebusters_max: int | None = None) -> dict[str, Any]:
    """The strict row of a set of ``(symbols, positions [n, 3] Angstrom)`` molecules.

    ``with_hydrogens`` defaults to "does any molecule contain H" (a model either generates hydrogens
    or it does not). ``posebusters=False`` skips the PoseBusters checks (about 0.1-0.5 s per valid
    molecule, mostly the energy-ratio conformer ensemble) and leaves PB-valid out. ``progress`` shows
    a progress bar. ``posebusters_max`` checks only the first that many connected-valid molecules and
    estimates PB-valid as connected validity times their pass rate (``pb_checked`` says how many).
    """
    molecule_list = _as_molecule_list(molecules)
    if not molecule_list:
        raise ValueError("strict_metrics: got no molecules to evaluate")
    if with_hydrogens is None:
        with_hydrogens = any("H" in list(symbols) for symbols, _ in molecule_list)
    counts = StrictMetrics(with_hydrogens=with_hydrogens, posebusters=posebusters)
    checks = PoseBustersChecks() if posebusters else None
    iterator: Iterable[Molecule] = molecule_list
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(molecule_list, desc="strict metrics (PoseBusters)", unit="mol")
    for symbols, positions in iterator:
        symbols, pos = list(symbols), _to_numpy(positions)
        bonds = bond_matrix(symbols, pos)
        stable, n_stable, n_atoms = stability_from_bonds(symbols, bonds)
        counts.n_molecules += 1
        counts.n_atoms += n_atoms
        counts.n_stable_atoms += n_stable
        counts.n_stable_molecules += int(stable)
        mol = connected_molecule(symbols, pos, bonds)
        if mol is None:
            continue
        counts.n_connected_valid += 1
        if checks is None or (posebusters_max is not None and counts.n_pb_checked >= posebusters_max):
            continue
        passed = checks(mol)
        counts.n_pb_checked += 1
        for name, ok in passed.items():
            counts.check_passes[name] = counts.check_passes.get(name, 0) + int(ok)
        counts.n_pb_valid += int(all(passed.values()))
    return counts.as_dict()


def validity_disagreements(edm: dict[str, Any], strict: dict[str, Any],
                           threshold_points: float = DISAGREEMENT_POINTS) -> list[str]:
    """Warnings where EDM's validity exceeds a strict one by more than ``threshold_points``."""
    warnings = []
    validity = edm.get("validity")
    for key, label in (("connected_validity", "connected validity"), ("pb_valid", "PB-valid")):
        value = strict.get(key)
        if validity is None or value is None or not math.isfinite(value):
            continue
        gap = 100.0 * (validity - value)
        if abs(gap) > threshold_points:
            warnings.append(f"warning: EDM validity {100 * validity:.1f} % and {label} {100 * value:.1f} % differ "
                            f"by {abs(gap):.1f} points; EDM's validity keeps only the largest fragment and checks "
                            f"no geometry, so trust the strict row")
    return warnings


def format_percent(value: float | None, se: float | None = None, missing: str = "–") -> str:
    """A fraction as ``12.3 ± 4.5 %`` (one decimal throughout, so columns line up); ``missing`` if absent."""
    if value is None or not math.isfinite(value):
        return missing
    text = f"{100 * value:.1f}"
    if se is not None and math.isfinite(se):
        text += f" ± {100 * se:.1f}"
    return text + " %"


def format_evaluation(edm: dict[str, Any], strict: dict[str, Any]) -> str:
    """EDM's row and the strict row as plain text for a terminal, disagreements warned about last."""
    n = int(edm.get("n_molecules", strict.get("n_molecules", 0)))

    # Uniqueness is a fraction of the valid molecules, novelty of the distinct valid ones.
    denominators = {"uniqueness": round(edm.get("validity", 0.0) * n),
                    "novelty": round(edm.get("valid_and_unique", 0.0) * n)}

    def edm_se(key: str) -> float | None:
        value, m = edm.get(key), denominators.get(key, n)
        return None if value is None else proportion(round(value * m), m)[1]

    def percent(value: float | None, se: float | None) -> str:
        return format_percent(value, se, missing="n/a")

    lines = [f"{n} molecules; percentages are mean ± standard error (binomial)", "",
             "EDM (Hoogeboom et al. 2022; validity = largest fragment sanitises):"]
    edm_keys = [("validity", "validity"), ("uniqueness", "uniqueness"), ("valid_and_unique", "valid & unique"),
                ("novelty", "novelty"), ("atom_stability", "atom stability"),
                ("molecule_stability", "molecule stability")]
    for key, label in edm_keys:
        if key in edm:
            lines.append(f"  {label:<22} {percent(edm[key], edm_se(key))}")
    lines += ["", "strict (one fragment; PoseBusters checks, Buttenschoen et al. 2024):"]
    connected = percent(strict["connected_validity"], strict["connected_validity_se"])
    lines.append(f"  {'connected validity':<22} {connected}")
    if "pb_valid" in strict:
        subset = f" (estimated from {strict['pb_checked']} checked)" if "pb_checked" in strict else ""
        lines.append(f"  {'PB-valid':<22} {percent(strict['pb_valid'], strict['pb_valid_se'])}{subset}")
    else:
        lines.append(f"  {'PB-valid':<22} not computed (--no-posebusters)")
    if strict.get("with_hydrogens"):
        lines.append(f"  {'atom stability':<22} {percent(strict['atom_stability'], strict['atom_stability_se'])}")
        lines.append(f"  {'molecule stability':<22} "
                     f"{percent(strict['molecule_stability'], strict['molecule_stability_se'])}")
    else:
        lines.append(f"  {'atom/mol. stability':<22} {strict['stability_note']}")
    if strict.get("pb_checks"):
        failing = sorted((rate, name) for name, rate in strict["pb_checks"].items() if rate is not None)[:3]
        if failing:
            shown = ", ".join(f"{name.replace('_', ' ')} {100 * rate:.0f} %" for rate, name in failing)
            lines.append(f"  {'hardest PB checks':<22} {shown} (pass rate of connected-valid molecules)")
    warnings = validity_disagreements(edm, strict)
    if warnings:
        lines += [""] + warnings
    return "\n".join(lines)


def add_strict_metrics(metrics: dict[str, Any], molecules: Iterable[Molecule] | HasMolecules,
                       posebusters: bool = True, progress: bool = True) -> str:
    """Put the strict row of ``molecules`` under ``metrics["strict"]`` (EDM's ``metrics`` otherwise
    untouched); return both rows as text for the terminal."""
    metrics["strict"] = strict_metrics(molecules, posebusters=posebusters, progress=progress)
    return format_evaluation(metrics, metrics["strict"])
