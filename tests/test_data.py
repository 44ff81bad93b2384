"""Data layer: QM9 loading and splits, MoleculeDataset batching/statistics, xyz/SDF readers."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from rgdm.data import qm9
from rgdm.data.dataset import (
    DataError,
    MoleculeDataset,
    NodeCountDistribution,
    from_molecules,
    sample_with_property,
)
from rgdm.data.readers import load_molecule_files, read_sdf, read_xyz, write_xyz

# QM9 molecule 1 (methane) in the original dsgdb9nsd_000001.xyz format. One coordinate is written
# in the Mathematica notation some QM9 files use (1.9761204*^-3 == 0.0019761204).
QM9_METHANE = """5
gdb 1\t157.7118\t157.70997\t157.70699\t0.\t13.21\t-0.3877\t0.1171\t0.5048\t35.3641\t0.044749\t\
-40.47893\t-40.476062\t-40.475117\t-40.498597\t6.469\t
C\t-0.0126981359\t 1.0858041578\t 0.0080009958\t-0.535689
H\t 0.002150416\t-0.0060313176\t 1.9761204*^-3\t 0.133921
H\t 1.0117308433\t 1.4637511618\t 0.0002765748\t 0.133922
H\t-0.540815069\t 1.4475266138\t-0.8766437152\t 0.133923
H\t-0.5238136345\t 1.4379326443\t 0.9063972942\t 0.133923
1341.307\t1341.3284\t1341.365\t1562.6731\t1562.7453\t3038.3205\t3151.6034\t3151.6788\t3151.7078
C\tC\t
InChI=1S/CH4/h1H4\tInChI=1S/CH4/h1H4
"""

WATER = (["O", "H", "H"], np.array([[0.0, 0.0, 0.1173], [0.0, 0.7572, -0.4692], [0.0, -0.7572, -0.4692]]))
AMMONIA = (["N", "H", "H", "H"],
           np.array([[0.0, 0.0, 0.0], [0.94, 0.0, 0.38], [-0.47, 0.81, 0.38], [-0.47, -0.81, 0.38]]))


def small_dataset() -> MoleculeDataset:
    molecules = [WATER, AMMONIA, (["C"], np.zeros((1, 3))), WATER]
    return from_molecules(molecules, elements=("H", "C", "N", "O"),
                          properties={"score": [1.0, 2.0, 3.0, 4.0]}, smiles=["O", "N", "C", "O"])


def centre_of_mass_error(dataset: MoleculeDataset) -> float:
    mask = dataset.node_mask().unsqueeze(-1).float()
    com = (dataset.positions * mask).sum(1) / mask.sum(1)
    padding_leak = (dataset.positions * (1 - mask)).abs().max()
    return max(float(com.abs().max()), float(padding_leak))


# --------------------------------------------------------------------------- QM9
def test_qm9_has_all_characterised_molecules_sorted_by_index(qm9_all):
    assert len(qm9_all) == qm9.NUM_MOLECULES == 130_831
    assert qm9_all.elements == ("H", "C", "N", "O", "F")
    assert qm9_all.max_atoms == 29
    index = qm9.qm9_indices("all")
    assert bool((index[1:] > index[:-1]).all())
    assert int(index[0]) == 1 and int(index[-1]) == 133_885
    assert qm9_all.smiles[:3] == ["C", "N", "O"]


def test_split_sizes_are_edm_and_splits_are_disjoint():
    splits = qm9.split_indices(130_831)
    sizes = {name: len(rows) for name, rows in splits.items()}
    assert sizes == {"train": 100_000, "valid": 17_748, "test": 13_083, "Da": 50_000, "Db": 50_000,
                     "all": 130_831}
    train, valid, test = (set(splits[s].tolist()) for s in ("train", "valid", "test"))
    assert not train & valid and not train & test and not valid & test
    assert train | valid | test == set(range(130_831))


def test_split_is_deterministic_and_halves_partition_train():
    first, second = qm9.split_indices(130_831), qm9.split_indices(130_831)
    for name in first:
        assert torch.equal(first[name], second[name])
    da, db = set(first["Da"].tolist()), set(first["Db"].tolist())
    assert not da & db
    assert da | db == set(first["train"].tolist())


def test_load_qm9_split_matches_split_indices(qm9_all):
    test = qm9.load_qm9("test")
    rows = qm9.split_indices(len(qm9_all))["test"]
    assert len(test) == 13_083
    assert torch.equal(test.num_atoms, qm9_all.num_atoms[rows])
    assert torch.equal(test.properties["gap"], qm9_all.properties["gap"][rows])
    assert test.smiles[:50] == [qm9_all.smiles[i] for i in rows[:50].tolist()]
    assert qm9.qm9_smiles("test") == test.smiles


def test_qm9_positions_have_zero_centre_of_mass(qm9_all):
    assert centre_of_mass_error(qm9_all) < 1e-4
    assert int(qm9_all.num_atoms.min()) == 3 and int(qm9_all.num_atoms.max()) == 29


def test_qm9_without_hydrogens(qm9_all):
    heavy = qm9.load_qm9("valid", remove_h=True)
    with_h = qm9.load_qm9("valid")
    assert heavy.elements == ("C", "N", "O", "F")
    assert int(heavy.num_atoms.max()) <= 9 and heavy.max_atoms <= 9
    hydrogen = qm9_all.elements.index("H")
    heavy_counts = (with_h.node_mask() & (with_h.atom_types != hydrogen)).sum(1)
    assert torch.equal(heavy.num_atoms, heavy_counts)
    assert centre_of_mass_error(heavy) < 1e-4
    # Same heavy-atom element sequence as the full molecule, in the same order.
    symbols_h, _ = with_h.molecule(7)
    symbols, _ = heavy.molecule(7)
    assert symbols == [s for s in symbols_h if s != "H"]


def test_qm9_properties_are_in_edm_units(qm9_all):
    assert set(qm9_all.properties) == set(qm9.PROPERTIES)
    gap_mean, _ = qm9_all.property_stats("gap")
    alpha_mean, alpha_mad = qm9_all.property_stats("alpha")
    assert gap_mean == pytest.approx(6858, abs=100)  # 6.86 eV in meV
    assert alpha_mean == pytest.approx(75.2, abs=1.0)  # Bohr^3
    assert 0 < alpha_mad < 20
    assert -7000 < qm9_all.property_stats("homo")[0] < -6000  # meV, negative
    assert 2.0 < qm9_all.property_stats("mu")[0] < 3.5  # Debye
    assert 25 < qm9_all.property_stats("Cv")[0] < 40  # cal/(mol K)
    # gap = lumo - homo row by row, up to QM9's independent rounding of each to 1e-4 Hartree.
    gap = qm9_all.properties["lumo"] - qm9_all.properties["homo"]
    assert torch.allclose(gap, qm9_all.properties["gap"], atol=1.01e-4 * qm9.HARTREE_TO_MEV)


def test_qm9_coordinates_match_original_xyz(tmp_path, qm9_all):
    path = tmp_path / "dsgdb9nsd_000001.xyz"
    path.write_text(QM9_METHANE)
    [(symbols, positions)] = read_xyz(path)
    assert symbols == ["C", "H", "H", "H", "H"]
    assert positions[1, 2] == pytest.approx(0.0019761204)
    qm9_symbols, qm9_positions = qm9_all.molecule(0)
    assert symbols == qm9_symbols
    centred = positions - positions.mean(axis=0)
    np.testing.assert_allclose(centred, qm9_positions.numpy(), atol=1e-5)


def test_missing_qm9pack_gives_install_hint(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="pip install qm9pack"):
        qm9.qm9_csv_paths()


def test_unknown_split_is_a_clear_error():
    with pytest.raises(DataError, match="unknown QM9 split 'training'"):
        qm9.load_qm9("training")


def test_csv_numbers_in_odd_formats_are_parsed():
    assert qm9._parse_numbers("[[0.5995394918,0.,1.],[1.2E-5,-3*^-2,4]]") == [
        0.5995394918, 0.0, 1.0, 1.2e-5, -0.03, 4.0]


def test_malformed_csv_row_names_file_and_line(tmp_path):
    header = ("Index,SMILES,N_atoms,Elements,XYZ_Ang,Dipole_debye,Polarizability_bohr3,HOMO_au,LUMO_au,"
              "HOMO_LUMO_gap_au,Heatcapacity_Cv_cal_mol_K\n")
    good = "1,C,2,\"['C','H']\",\"[[0.,0.,0.],[0.,0.,1.09]]\",0.,13.2,-0.39,0.12,0.5,6.5\n"
    short = "2,N,2,\"['N','H']\",\"[[0.,0.,0.],[0.,0.]]\",1.6,9.5,-0.26,0.08,0.34,6.3\n"
    path = tmp_path / "part.csv"
    path.write_text(header + good + short)
    columns = qm9._Columns()
    with pytest.raises(DataError, match=r"part\.csv:3: XYZ_Ang has 5 numbers, expected 3 \* 2"):
        qm9._parse_csv(path, columns)


def test_corrupt_cache_is_ignored(tmp_path):
    path = tmp_path / "qm9_cache.pt"
    path.write_bytes(b"not a torch file")
    assert qm9._read_cache(path) is None


# --------------------------------------------------------------------------- MoleculeDataset
def test_node_count_distribution(qm9_all):
    distribution = qm9_all.node_count_distribution()
    assert distribution.probs.sum().item() == pytest.approx(1.0)
    assert distribution.max_nodes == 29
    samples = distribution.sample(10_000, generator=torch.Generator().manual_seed(0))
    assert samples.dtype == torch.long
    assert int(samples.min()) >= 3 and int(samples.max()) <= 29
    # The sample mean tracks the data mean (~18 atoms).
    assert samples.float().mean().item() == pytest.approx(qm9_all.num_atoms.float().mean().item(), abs=0.2)
    log_p = distribution.log_prob(torch.tensor([1, 18, 40]))
    assert log_p[0] == -torch.inf and log_p[2] == -torch.inf and torch.isfinite(log_p[1])
    restored = NodeCountDistribution.from_dict(distribution.to_dict())
    assert torch.equal(restored.probs, distribution.probs)


def test_sample_with_property_draws_real_pairs():
    dataset = small_dataset()
    counts, values = sample_with_property(dataset, "score", 200, generator=torch.Generator().manual_seed(1))
    pairs = set(zip(dataset.num_atoms.tolist(), dataset.properties["score"].tolist(), strict=True))
    assert set(zip(counts.tolist(), values.tolist(), strict=True)) <= pairs
    assert len(set(values.tolist())) == 4  # every molecule drawn at least once in 200 draws
    with pytest.raises(DataError, match="unknown property 'gap'"):
        sample_with_property(dataset, "gap", 1)


def test_batches_are_padded_to_the_batch_maximum(qm9_all):
    smallest = torch.argsort(qm9_all.num_atoms)[:8]
    batch = qm9_all.batch(smallest)
    assert batch.positions.shape == (8, int(qm9_all.num_atoms[smallest].max()), 3)
    assert batch.positions.shape[1] < qm9_all.max_atoms
    assert torch.equal(batch.num_atoms, qm9_all.num_atoms[smallest])
    assert set(batch.properties) == set(qm9.PROPERTIES)

    dataset = small_dataset()
    batches = list(dataset.batches(3, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert [len(b) for b in batches] == [3, 1]
    assert sorted(torch.cat([b.properties["score"] for b in batches]).tolist()) == [1.0, 2.0, 3.0, 4.0]
    for b in batches:
        assert b.positions.shape[1] == int(b.num_atoms.max())
        assert bool(((b.positions * (1 - b.node_mask)) == 0).all())
    assert [len(b) for b in dataset.batches(3, drop_last=True)] == [3]


def test_property_stats_are_mean_and_mean_absolute_deviation():
    mean, mad = small_dataset().property_stats("score")
    assert mean == pytest.approx(2.5)
    assert mad == pytest.approx(1.0)


def test_subset_trims_padding_and_keeps_everything_aligned():
    dataset = small_dataset()
    sub = dataset.subset([2, 0])
    assert sub.max_atoms == 3
    assert sub.smiles == ["C", "O"]
    assert sub.properties["score"].tolist() == [3.0, 1.0]
    assert sub.molecule(1)[0] == ["O", "H", "H"]


def test_from_molecules_centres_and_infers_elements():
    dataset = from_molecules([WATER, AMMONIA])
    assert dataset.elements == ("H", "N", "O")
    assert centre_of_mass_error(dataset) < 1e-6
    assert dataset.smiles == ["", ""]
    assert dataset.molecule(1)[0] == ["N", "H", "H", "H"]


def test_unknown_element_names_element_and_molecule():
    with pytest.raises(DataError, match=r"molecule 1: unknown element 'S'"):
        from_molecules([WATER, (["S", "H", "H"], WATER[1])], elements=("H", "C", "N", "O", "F"))
    with pytest.raises(DataError, match=r"molecule 0: unknown element 'Xx'"):
        from_molecules([(["Xx"], np.zeros((1, 3)))])
    with pytest.raises(DataError, match=r"molecule 0: positions have shape \[3, 2\]"):
        from_molecules([(["O", "H", "H"], np.zeros((3, 2)))])


def test_without_element_remaps_types():
    dataset = small_dataset().without_element("H")
    assert dataset.elements == ("C", "N", "O")
    assert dataset.num_atoms.tolist() == [1, 1, 1, 1]
    assert [dataset.molecule(i)[0] for i in range(4)] == [["O"], ["N"], ["C"], ["O"]]
    assert float(dataset.positions.abs().max()) == 0.0  # a single atom sits at its own centre


def test_dataset_save_load_round_trip(tmp_path):
    dataset = small_dataset()
    dataset.save(tmp_path / "set.pt")
    loaded = MoleculeDataset.load(tmp_path / "set.pt")
    assert torch.equal(loaded.positions, dataset.positions)
    assert torch.equal(loaded.atom_types, dataset.atom_types)
    assert loaded.elements == dataset.elements and loaded.smiles == dataset.smiles
    assert torch.equal(loaded.properties["score"], dataset.properties["score"])
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(DataError, match="junk.pt: cannot read a MoleculeDataset"):
        MoleculeDataset.load(tmp_path / "junk.pt")


# --------------------------------------------------------------------------- readers
def test_xyz_round_trip(tmp_path, qm9_all):
    molecules = [qm9_all.molecule(i) for i in (0, 500, 130_000)]
    path = tmp_path / "mols.xyz"
    write_xyz(path, molecules, comments=["methane", "", "last"])
    read_back = read_xyz(path)
    assert len(read_back) == 3
    for (symbols, positions), (expected_symbols, expected) in zip(read_back, molecules, strict=True):
        assert symbols == expected_symbols
        np.testing.assert_allclose(positions, expected.numpy(), atol=1e-7)
    assert path.read_text().splitlines()[1] == "methane"


def test_plain_xyz_extra_columns_lowercase_and_atomic_numbers(tmp_path):
    path = tmp_path / "plain.xyz"
    path.write_text("3\nwater with forces\no 0 0 0.1173 0.1 0.2 0.3\n1 0 0.7572 -0.4692\n"
                    "H 0 -0.7572 -0.4692\n\n1\n\nC 0 0 0\n")
    molecules = read_xyz(path)
    assert [m[0] for m in molecules] == [["O", "H", "H"], ["C"]]
    assert molecules[0][1].shape == (3, 3)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("two\ncomment\nH 0 0 0\n", r"bad\.xyz:1: expected a positive atom count, got 'two'"),
        ("2\ncomment\nH 0 0 0\nH 0 0 x\n", r"bad\.xyz:4: coordinates are not numbers"),
        ("2\ncomment\nH 0 0\nH 0 0 0\n", r"bad\.xyz:3: expected 'element x y z'"),
        ("1\nok\nH 0 0 0\n3\ncomment\nH 0 0 0\n", r"bad\.xyz:6: expected 3 atom lines after line 4"),
        ("1\nok\nH 0 0 0\n1\n", r"bad\.xyz:4: file ends after the atom count"),
        ("1\nc\nH 0 nan 0\n", r"bad\.xyz:3: coordinates must be finite"),
    ],
)
def test_malformed_xyz_reports_the_line(tmp_path, text, message):
    path = tmp_path / "bad.xyz"
    path.write_text(text)
    with pytest.raises(DataError, match=message):
        read_xyz(path)


def test_truncated_qm9_xyz_frame_is_an_error(tmp_path):
    path = tmp_path / "cut.xyz"
    path.write_text("\n".join(QM9_METHANE.splitlines()[:-2]) + "\n")
    with pytest.raises(DataError, match=r"cut\.xyz:\d+: QM9 frame ends early"):
        read_xyz(path)


def _ethanol_3d():
    from rdkit import Chem
    from rdkit.Chem import AllChem

    mol = Chem.AddHs(Chem.MolFromSmiles("CCO"))
    assert AllChem.EmbedMolecule(mol, randomSeed=7) == 0
    return mol


def test_read_sdf_written_by_rdkit(tmp_path):
    from rdkit import Chem

    ethanol = _ethanol_3d()
    path = tmp_path / "mols.sdf"
    with Chem.SDWriter(str(path)) as writer:
        writer.write(ethanol)
        writer.write(ethanol)
    molecules = read_sdf(path)
    assert len(molecules) == 2
    symbols, positions = molecules[0]
    assert symbols == [a.GetSymbol() for a in ethanol.GetAtoms()] and symbols.count("H") == 6
    np.testing.assert_allclose(positions, ethanol.GetConformer().GetPositions(), atol=1e-4)


def test_sdf_without_3d_coordinates_or_unparsable_is_an_error(tmp_path):
    from rdkit import Chem
    from rdkit.Chem import AllChem

    flat = Chem.MolFromSmiles("CCO")
    AllChem.Compute2DCoords(flat)
    path = tmp_path / "flat.sdf"
    path.write_text(Chem.MolToMolBlock(_ethanol_3d()) + "$$$$\n" + Chem.MolToMolBlock(flat) + "$$$$\n")
    with pytest.raises(DataError, match=r"flat\.sdf: record 2: no 3D coordinates"):
        read_sdf(path)
    broken = tmp_path / "broken.sdf"
    broken.write_text("junk\n\n\n  x  y  V2000\n$$$$\n")
    with pytest.raises(DataError, match=r"broken\.sdf: record 1: RDKit cannot parse"):
        read_sdf(broken)


def test_load_molecule_files_from_a_directory(tmp_path):
    from rdkit import Chem

    write_xyz(tmp_path / "a.xyz", [WATER, AMMONIA])
    (tmp_path / "sub").mkdir()
    with Chem.SDWriter(str(tmp_path / "sub" / "b.sdf")) as writer:
        writer.write(_ethanol_3d())
    (tmp_path / "notes.txt").write_text("ignored")

    dataset = load_molecule_files(tmp_path)
    assert len(dataset) == 3
    assert dataset.elements == ("H", "C", "N", "O")
    assert dataset.num_atoms.tolist() == [3, 4, 9]
    assert centre_of_mass_error(dataset) < 1e-6

    heavy = load_molecule_files([tmp_path / "a.xyz", tmp_path / "sub" / "b.sdf"], remove_h=True,
                                elements=qm9.ELEMENTS_NO_H)
    assert heavy.elements == ("C", "N", "O", "F")
    assert heavy.num_atoms.tolist() == [1, 1, 3]


def test_load_molecule_files_errors_name_the_file(tmp_path):
    write_xyz(tmp_path / "odd.xyz", [WATER, (["Si", "H"], np.zeros((2, 3)))])
    with pytest.raises(DataError, match=r"odd\.xyz: frame 2: unknown element 'Si'"):
        load_molecule_files(tmp_path / "odd.xyz", elements=qm9.ELEMENTS)
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        (tmp_path / "x.txt").write_text("")
        load_molecule_files(tmp_path / "x.txt")
    with pytest.raises(DataError, match="contains no"):
        (tmp_path / "empty").mkdir()
        load_molecule_files(tmp_path / "empty")
