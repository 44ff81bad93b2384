"""The strict row beside EDM's: connected validity, PoseBusters checks, stability only with hydrogens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rgdm.eval.molecules import evaluate_molecules
from rgdm.eval.strict import (
    PB_CHECKS,
    PoseBustersChecks,
    connected_molecule,
    format_evaluation,
    strict_metrics,
    validity_disagreements,
)


def scattered_fluorines() -> tuple[list[str], np.ndarray]:
    """Nine F atoms hundreds of Angstrom apart: nine HF 'molecules' to EDM's largest-fragment rule."""
    return ["F"] * 9, np.arange(27, dtype=float).reshape(9, 3) * 100.0


@pytest.fixture(scope="module")
def qm9_test_with_h():
    from rgdm.data.qm9 import load_qm9

    return load_qm9(split="test", remove_h=False)


def qm9_molecules(dataset, indices) -> list[tuple[list[str], np.ndarray]]:
    out = []
    for i in indices:
        symbols, positions = dataset.molecule(int(i))
        out.append((list(symbols), positions.numpy().astype(np.float64)))
    return out


def test_scattered_atoms_are_edm_valid_but_not_strictly_valid():
    molecules = [scattered_fluorines()]
    assert evaluate_molecules(molecules)["validity"] == 1.0  # EDM's rule, kept as it is
    strict = strict_metrics(molecules)
    assert strict["connected_validity"] == 0.0
    assert strict["pb_valid"] == 0.0
    warnings = validity_disagreements(evaluate_molecules(molecules), strict)
    assert len(warnings) == 2 and "100.0 points" in warnings[0]


def test_a_garbage_model_does_not_score_full_strict_validity(tiny_pretrained):
    """The tiny model pre-trained for 20 steps, sampled with 10 steps: junk by construction."""
    from rgdm.runs import load_model

    model = load_model(str(tiny_pretrained)).model.eval()
    with torch.no_grad():
        batch = model.sample_molecules(12, num_steps=10, generator=torch.Generator().manual_seed(0))
    molecules = [(s, p.numpy()) for s, p in batch.molecules()]
    edm, strict = evaluate_molecules(molecules), strict_metrics(molecules)
    assert strict["connected_validity"] < 1.0
    assert strict["pb_valid"] < 1.0
    assert strict["connected_validity"] <= edm["validity"]
    assert strict["pb_valid"] <= strict["connected_validity"]


def test_posebusters_passes_a_qm9_ground_state_and_fails_a_distorted_copy(qm9_test_with_h):
    symbols, positions = qm9_molecules(qm9_test_with_h, [100])[0]
    mol = connected_molecule(symbols, positions)
    assert mol is not None
    checks = PoseBustersChecks()
    assert checks(mol) == dict.fromkeys(PB_CHECKS, True)

    # Pull one heavy atom 0.6 Angstrom out along its bond: the bond graph stays (same RDKit molecule),
    # the geometry is impossible.
    bond = next(b for b in mol.GetBonds() if b.GetBeginAtom().GetSymbol() != "H" and b.GetEndAtom().GetSymbol() != "H")
    i, j = bond.GetBeginAtomIdx(), bond.GetEndAtomIdx()
    conformer = mol.GetConformer()
    stretched = positions.copy()
    direction = (positions[j] - positions[i]) / np.linalg.norm(positions[j] - positions[i])
    stretched[j] = positions[j] + 0.6 * direction
    for k, (x, y, z) in enumerate(stretched.tolist()):
        conformer.SetAtomPosition(k, (x, y, z))
    verdict = checks(mol)
    assert not verdict["bond_lengths"]
    assert not all(verdict.values())


def test_qm9_ground_states_are_mostly_pb_valid(qm9_test_with_h):
    """A sanity number on real molecules (a QM9 cage can fail the energy-ratio ensemble)."""
    picks = np.random.default_rng(1).choice(len(qm9_test_with_h), size=4, replace=False)
    molecules = qm9_molecules(qm9_test_with_h, picks)
    strict = strict_metrics(molecules)
    assert strict["connected_validity"] == evaluate_molecules(molecules)["validity"]  # QM9 is one fragment
    assert strict["pb_valid"] >= 0.75
    assert strict["with_hydrogens"] and strict["atom_stability"] > 0.95


def test_stability_is_not_applicable_without_hydrogens(qm9_test_with_h):
    heavy = [([s for s in symbols if s != "H"], pos[[k for k, s in enumerate(symbols) if s != "H"]])
             for symbols, pos in qm9_molecules(qm9_test_with_h, [0, 1, 2])]
    strict = strict_metrics(heavy, posebusters=False)
    assert strict["atom_stability"] is None and strict["molecule_stability"] is None
    assert strict["stability_note"].startswith("n/a: EDM's stability counts explicit hydrogens")
    assert "pb_valid" not in strict
    text = format_evaluation(evaluate_molecules(heavy), strict)
    assert "n/a: EDM's stability" in text and "not computed" in text


def test_evaluate_prints_both_rows_and_warns(tmp_path, capsys):
    from rgdm import cli
    from rgdm.data.readers import write_xyz

    path = tmp_path / "junk.xyz"
    write_xyz(path, [scattered_fluorines()] * 3)
    assert cli.main(["evaluate", str(path), "--no-novelty"]) == 0
    out = capsys.readouterr().out
    assert "EDM (Hoogeboom et al. 2022" in out and "validity               100.0 ± 0.0 %" in out
    assert "strict (one fragment" in out and "connected validity     0.0 ± 0.0 %" in out
    assert "warning: EDM validity 100.0 % and connected validity 0.0 % differ by 100.0 points" in out
    import json

    saved = json.loads((tmp_path / "junk_metrics.json").read_text())
    assert saved["validity"] == 1.0 and saved["strict"]["connected_validity"] == 0.0


def test_posebusters_on_a_subset_estimates_pb_valid(qm9_test_with_h):
    molecules = qm9_molecules(qm9_test_with_h, [100, 101, 102]) + [scattered_fluorines()]
    full = strict_metrics(molecules)
    capped = strict_metrics(molecules, posebusters_max=1)
    assert "pb_checked" not in full and capped["pb_checked"] == 1
    assert capped["connected_validity"] == full["connected_validity"] == 0.75
    # the first molecule passes every check (see above): the estimate is connected validity x 1/1
    assert capped["pb_valid"] == pytest.approx(0.75)
    assert capped["pb_valid_se"] > 0
    assert "(estimated from 1 checked)" in format_evaluation(evaluate_molecules(molecules), capped)
