"""EDM bond rules, molecule building and metrics, checked on textbook geometries and real QM9."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from rdkit import Chem
from rdkit.Chem import QED, AllChem

from rgdm.data.batch import MoleculeBatch
from rgdm.eval.bonds import (
    DOUBLE_THRESHOLD,
    SINGLE_THRESHOLD,
    TRIPLE_THRESHOLD,
    bond_matrix,
    bond_order,
    build_rdkit_mol,
    canonical_smiles,
    largest_fragment_smiles,
    smiles_to_canonical,
)
from rgdm.eval.molecules import check_stability, evaluate_molecules

# EDM's Table 1 "Data" row for QM9 with hydrogens (Hoogeboom et al. 2022), in percent.
EDM_DATA_ROW = {"atom_stability": 99.0, "molecule_stability": 95.2, "validity": 97.7}
TOLERANCE_POINTS = 1.5


# --------------------------------------------------------------------------- helpers
def embedded(smiles: str, seed: int = 7) -> tuple[list[str], np.ndarray]:
    """(symbols, positions) of an RDKit-embedded, force-field-relaxed molecule with hydrogens."""
    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    assert AllChem.EmbedMolecule(mol, randomSeed=seed) == 0
    AllChem.MMFFOptimizeMolecule(mol)
    symbols = [atom.GetSymbol() for atom in mol.GetAtoms()]
    return symbols, mol.GetConformer().GetPositions()


def pentavalent_carbon() -> tuple[list[str], np.ndarray]:
    """A carbon with five hydrogens at C-H bond length: unstable and invalid by construction."""
    directions = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1]], dtype=float)
    return ["C"] + ["H"] * 5, np.vstack([np.zeros(3), 1.09 * directions])


@pytest.fixture(scope="module")
def qm9_test_with_h():
    from rgdm.data.qm9 import load_qm9

    return load_qm9(split="test", remove_h=False)


def dataset_molecules(dataset, indices) -> list[tuple[list[str], np.ndarray]]:
    out = []
    for i in indices:
        n = int(dataset.num_atoms[i])
        symbols = [dataset.elements[t] for t in dataset.atom_types[i, :n].tolist()]
        out.append((symbols, dataset.positions[i, :n].numpy()))
    return out


def fixed_subset(dataset, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).choice(len(dataset), size=size, replace=False)


# --------------------------------------------------------------------------- bond rules
@pytest.mark.parametrize(
    ("el1", "el2", "distance", "expected"),
    [
        ("C", "C", 1.54, 1),  # ethane
        ("C", "C", 1.34, 2),  # ethylene
        ("C", "C", 1.20, 3),  # acetylene
        ("C", "C", 2.50, 0),  # 1,3-carbons in propane: not bonded
        ("C", "H", 1.09, 1),
        ("H", "C", 1.09, 1),  # order of the pair does not matter
        ("C", "O", 1.21, 2),  # carbonyl
        ("C", "N", 1.16, 3),  # nitrile
        ("O", "H", 0.96, 1),
        ("H", "H", 1.50, 0),
    ],
)
def test_bond_order_on_textbook_lengths(el1, el2, distance, expected):
    assert bond_order(el1, el2, distance) == expected


def test_bond_order_thresholds_are_edm_lengths_plus_margins():
    # C-C: single below 1.54 + 0.10, double below 1.34 + 0.05, triple below 1.20 + 0.03 Angstrom.
    assert bond_order("C", "C", 1.639) == 1 and bond_order("C", "C", 1.641) == 0
    assert bond_order("C", "C", 1.389) == 2 and bond_order("C", "C", 1.391) == 1
    assert bond_order("C", "C", 1.229) == 3 and bond_order("C", "C", 1.231) == 2
    # Pairs without a typical length never bond, however close (EDM's check_exists).
    assert bond_order("Hg", "C", 1.0) == 0


def test_threshold_tables_are_symmetric_and_nested():
    for table in (SINGLE_THRESHOLD, DOUBLE_THRESHOLD, TRIPLE_THRESHOLD):
        np.testing.assert_array_equal(table, table.T)
    has_double = np.isfinite(DOUBLE_THRESHOLD)
    has_triple = np.isfinite(TRIPLE_THRESHOLD)
    assert np.all(DOUBLE_THRESHOLD[has_double] < SINGLE_THRESHOLD[has_double])
    assert np.all(TRIPLE_THRESHOLD[has_triple] < DOUBLE_THRESHOLD[has_triple])


def test_unknown_element_is_a_clear_error():
    with pytest.raises(ValueError, match="'Xx' has no bond rules"):
        bond_order("C", "Xx", 1.5)


def test_bond_matrix_matches_pairwise_bond_order():
    symbols, positions = embedded("CC(=O)C#N")
    bonds = bond_matrix(symbols, positions)
    assert bonds.shape == (len(symbols), len(symbols))
    np.testing.assert_array_equal(bonds, bonds.T)
    assert np.all(np.diag(bonds) == 0)
    for i in range(len(symbols)):
        for j in range(len(symbols)):
            if i != j:
                distance = float(np.linalg.norm(positions[i] - positions[j]))
                assert bonds[i, j] == bond_order(symbols[i], symbols[j], distance)
    assert sorted(bonds[np.triu_indices(len(symbols), 1)].tolist()).count(3) == 1  # the nitrile


def test_bond_matrix_rejects_mismatched_positions():
    with pytest.raises(ValueError, match=r"shape \(3, 3\)"):
        bond_matrix(["C", "H", "H"], np.zeros((2, 3)))


# --------------------------------------------------------------------------- stability
def test_relaxed_molecules_are_stable():
    for smiles in ("C", "CCO", "C=CC#N", "OC(=O)C(F)N"):
        symbols, positions = embedded(smiles)
        assert check_stability(symbols, positions) == (True, len(symbols), len(symbols)), smiles


def test_stretched_molecule_is_not_stable():
    symbols, positions = embedded("C")
    stretched = positions.copy()
    hydrogen = next(i for i, s in enumerate(symbols) if s == "H")
    carbon = symbols.index("C")
    # Pull one hydrogen to 1.5 Angstrom: the C-H bond breaks (threshold 1.19), C and that H lose valence.
    direction = stretched[hydrogen] - stretched[carbon]
    stretched[hydrogen] = stretched[carbon] + 1.5 * direction / np.linalg.norm(direction)
    assert check_stability(symbols, stretched) == (False, 3, 5)


def test_overbonded_carbon_is_unstable_and_invalid():
    symbols, positions = pentavalent_carbon()
    assert check_stability(symbols, positions) == (False, 5, 6)  # the five H are fine, C is not
    assert largest_fragment_smiles(build_rdkit_mol(symbols, positions)) is None


# --------------------------------------------------------------------------- building
def test_edm_molecule_keeps_positions_and_bond_orders():
    symbols, positions = embedded("C=CC#N")
    mol = build_rdkit_mol(symbols, positions, method="edm")
    assert [a.GetSymbol() for a in mol.GetAtoms()] == symbols
    np.testing.assert_allclose(mol.GetConformer().GetPositions(), positions)
    orders = sorted(b.GetBondTypeAsDouble() for b in mol.GetBonds() if b.GetBeginAtom().GetSymbol() != "H"
                    and b.GetEndAtom().GetSymbol() != "H")
    assert orders == [1.0, 2.0, 3.0]
    assert largest_fragment_smiles(mol) == "C=CC#N"


def test_validity_names_the_largest_fragment():
    water_symbols, water_positions = embedded("O")
    propanol_symbols, propanol_positions = embedded("CCCO")
    symbols = propanol_symbols + water_symbols
    positions = np.vstack([propanol_positions, water_positions + 20.0])  # far apart: two fragments
    assert largest_fragment_smiles(build_rdkit_mol(symbols, positions)) == "CCCO"


def test_build_rejects_unknown_method():
    with pytest.raises(ValueError, match="unknown method 'xtb'"):
        build_rdkit_mol(["H", "H"], [[0, 0, 0], [0, 0, 0.74]], method="xtb")


def test_rdkit_method_returns_none_when_no_bonding_fits():
    # A lone carbon with one hydrogen and charge 0 has no closed-shell bond assignment.
    assert build_rdkit_mol(["C", "H"], [[0, 0, 0], [0, 0, 1.09]], method="rdkit") is None


def test_rdkit_method_reproduces_qm9_smiles_and_qed(qm9_test_with_h):
    indices = fixed_subset(qm9_test_with_h, 200, seed=1)
    molecules = dataset_molecules(qm9_test_with_h, indices)
    matches = 0
    for (symbols, positions), i in zip(molecules, indices, strict=True):
        built = build_rdkit_mol(symbols, positions, method="rdkit")
        reference = Chem.MolFromSmiles(qm9_test_with_h.smiles[i])
        if built is None or canonical_smiles(built) != canonical_smiles(reference):
            continue  # e.g. a zwitterion written as its neutral tautomer
        matches += 1
        # Same molecule -> same QED: the built molecule carries hydrogens, charges, aromaticity right.
        assert QED.qed(built) == pytest.approx(QED.qed(reference), abs=1e-9)
    assert matches >= 0.95 * len(indices)


# --------------------------------------------------------------------------- metrics arithmetic
def test_uniqueness_and_novelty_arithmetic():
    methane, ethylene = embedded("C"), embedded("C=C")
    molecules = [methane, methane, ethylene, pentavalent_carbon()]
    metrics = evaluate_molecules(molecules, training_smiles={"C", "CC"})
    assert metrics["n_molecules"] == 4
    assert metrics["validity"] == pytest.approx(3 / 4)
    assert metrics["uniqueness"] == pytest.approx(2 / 3)  # {C, C=C} among three valid
    assert metrics["valid_and_unique"] == pytest.approx(2 / 4)
    assert metrics["novelty"] == pytest.approx(1 / 2)  # only C=C is new
    assert metrics["molecule_stability"] == pytest.approx(3 / 4)
    assert metrics["atom_stability"] == pytest.approx((5 + 5 + 6 + 5) / (5 + 5 + 6 + 6))


def test_novelty_is_reported_only_with_a_training_set():
    metrics = evaluate_molecules([embedded("C")])
    assert "novelty" not in metrics
    assert all(0.0 <= metrics[k] <= 1.0 for k in ("atom_stability", "validity", "uniqueness"))


def test_nothing_valid_gives_zero_uniqueness():
    metrics = evaluate_molecules([pentavalent_carbon()], training_smiles=set())
    assert metrics["validity"] == metrics["uniqueness"] == metrics["novelty"] == 0.0


def test_training_smiles_are_compared_in_canonical_form():
    assert smiles_to_canonical("OCC") == "CCO"
    assert smiles_to_canonical("C[C@H](N)O") == "CC(N)O"  # stereo dropped, like 3D-built molecules
    metrics = evaluate_molecules([embedded("CCO")], training_smiles={smiles_to_canonical("OCC")})
    assert metrics["novelty"] == 0.0


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="no molecules"):
        evaluate_molecules([])
    with pytest.raises(ValueError, match="molecule 1: positions shape"):
        evaluate_molecules([embedded("C"), (["C", "H"], np.zeros((3, 3)))])


def test_molecule_batch_is_accepted():
    molecules = [embedded("CCO"), embedded("C#N")]
    elements = ("H", "C", "N", "O", "F")
    n_max = max(len(s) for s, _ in molecules)
    positions = torch.zeros(len(molecules), n_max, 3)
    atom_types = torch.zeros(len(molecules), n_max, dtype=torch.long)
    node_mask = torch.zeros(len(molecules), n_max, 1)
    for b, (symbols, pos) in enumerate(molecules):
        n = len(symbols)
        positions[b, :n] = torch.as_tensor(pos - pos.mean(axis=0), dtype=torch.float32)
        atom_types[b, :n] = torch.tensor([elements.index(s) for s in symbols])
        node_mask[b, :n] = 1.0
    batch = MoleculeBatch(positions, atom_types, node_mask, elements)
    assert evaluate_molecules(batch) == evaluate_molecules(molecules)


# --------------------------------------------------------------------------- EDM data row
def test_reproduces_edm_data_row_on_qm9_test_with_hydrogens(qm9_test_with_h):
    molecules = dataset_molecules(qm9_test_with_h, fixed_subset(qm9_test_with_h, 3000))
    metrics = evaluate_molecules(molecules)  # its speed is measured in benchmarks/throughput.py
    for key, edm_percent in EDM_DATA_ROW.items():
        assert 100 * metrics[key] == pytest.approx(edm_percent, abs=TOLERANCE_POINTS), key
    assert metrics["uniqueness"] > 0.99  # QM9 molecules are distinct up to stereo
