"""Relaxation before a property is measured: MMFF in-process, GFN2-xTB in a worker process."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from rdkit import Chem
from rdkit.Chem import AllChem

from rgdm.eval.relax import check_relax_method, kabsch_rmsd, relax
from rgdm.rewards.molecule import Molecule


def distorted(smiles: str, noise: float = 0.08, seed: int = 0) -> Molecule:
    """An MMFF-relaxed molecule with hydrogens, then Gaussian noise (Angstrom) on every coordinate."""
    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    AllChem.EmbedMolecule(mol, randomSeed=seed)
    AllChem.MMFFOptimizeMolecule(mol)
    positions = mol.GetConformer().GetPositions()
    positions = positions + np.random.default_rng(seed).normal(0.0, noise, positions.shape)
    return Molecule(tuple(a.GetSymbol() for a in mol.GetAtoms()), positions)


def test_kabsch_rmsd_ignores_rigid_motions():
    points = np.random.default_rng(1).normal(size=(8, 3))
    angle = 0.7
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    assert kabsch_rmsd(points, points @ rotation.T + 3.0) == pytest.approx(0.0, abs=1e-9)
    assert kabsch_rmsd(points, points + np.array([0.1, 0, 0]) * np.arange(8)[:, None]) > 0.1


def test_mmff_lowers_the_energy_and_reports_how_far_it_moved():
    molecule = distorted("CC(=O)Nc1ccccc1")
    relaxed = relax(molecule, "mmff", steps=200)
    assert relaxed.energy_after < relaxed.energy_before
    assert 0.02 < relaxed.rmsd < 0.5  # it moved, but the molecule stayed itself
    assert relaxed.molecule.symbols == molecule.symbols
    unrelaxed = relax(molecule, "none")
    assert unrelaxed.rmsd == 0.0 and unrelaxed.molecule is molecule


def test_unknown_relax_method_is_a_clear_error():
    with pytest.raises(ValueError, match="relax must be one of none, mmff, xtb"):
        check_relax_method("uff")


@pytest.fixture(scope="module")
def generated_heavy_atoms():
    """A valid sample of the shipped heavy-atom model (no hydrogens)."""
    from rgdm.rewards.scoring import InvalidSample
    from rgdm.rewards.xtb import with_hydrogens
    from rgdm.runs import load_model

    model = load_model("qm9-noh-small").model.eval()
    with torch.no_grad():
        batch = model.sample_molecules(8, num_steps=50, generator=torch.Generator().manual_seed(3))
    for symbols, positions in batch.molecules():
        molecule = Molecule(tuple(symbols), positions.numpy())
        try:
            with_hydrogens(molecule)
            return molecule
        except InvalidSample:
            continue
    pytest.fail("no valid molecule among 8 samples of the shipped model")


@pytest.fixture(scope="module")
def generated_molecule(generated_heavy_atoms):
    """The sample with RDKit-placed hydrogens."""
    from rgdm.rewards.xtb import with_hydrogens

    return with_hydrogens(generated_heavy_atoms)


def test_xtb_relaxation_lowers_the_xtb_energy_of_a_generated_molecule(generated_molecule):
    """Through the reward API, so tblite runs in a worker process with OMP_NUM_THREADS=1."""
    from rgdm.rewards import make_reward

    energies = {}
    for method in ("none", "xtb"):
        with make_reward({"name": "xtb_energy", "relax": method, "relax_steps": 15, "workers": 1,
                          "timeout": 60, "cache": False}) as reward:
            result = reward([generated_molecule])
        assert bool(result.valid[0]), reward.stats()
        energies[method] = float(result.info["property"][0])
    assert energies["xtb"] < energies["none"] - 0.01  # eV: a generated geometry is off its minimum


def test_xtb_reward_rejects_an_unknown_relax_method():
    from rgdm.rewards import RewardConfigError, make_reward

    with pytest.raises((ValueError, RewardConfigError), match="relax must be one of"):
        make_reward({"name": "xtb_gap", "relax": "uff"})


def test_report_states_how_far_the_reward_relaxation_moved_the_samples(generated_heavy_atoms):
    from rgdm.report import relaxation_sentence

    config = {"name": "xtb_gap", "relax": "mmff", "add_hydrogens": True, "workers": 1, "timeout": 60,
              "target": 4000.0}
    results = {"before": {"molecules": [generated_heavy_atoms]}, "after": {"molecules": [generated_heavy_atoms]}}
    sentence = relaxation_sentence(config, results)
    assert sentence is not None and "median heavy-atom RMSD of 0." in sentence and "before (1 molecules)" in sentence
    assert relaxation_sentence({**config, "relax": "none"}, results) is None
    assert relaxation_sentence({"name": "qed"}, results) is None
