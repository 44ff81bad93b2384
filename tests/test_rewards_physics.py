"""Physical-feedback rewards on real QM9 molecules: valence and connectivity agree with the validity
metric, xTB forces and energies tell a relaxed geometry from a strained one, and the combination
ranks samples the way its formula says."""

import numpy as np
import pytest

from rgdm.eval.molecules import evaluate_molecules
from rgdm.rewards import Molecule, make_reward
from rgdm.rewards.physics import (
    connectivity_score,
    excess_valence,
    fragment_count,
    physics_score,
    valence_score,
)


@pytest.fixture(scope="module")
def heavy_atom_molecules(qm9_all):
    """20 QM9 molecules without hydrogens, as the no-H model generates them."""
    dataset = qm9_all.without_element("H")
    return [Molecule(tuple(s), p.numpy()) for s, p in (dataset.molecule(i) for i in range(0, 2000, 100))]


def test_real_molecules_are_valid_and_connected(heavy_atom_molecules):
    # EDM's bond rules misread a few real molecules (QM9 with hydrogens: 97.7 % valid); the reward
    # must agree with the metric on every one of them.
    valence = [valence_score(m) for m in heavy_atom_molecules]
    metric = [evaluate_molecules([(m.symbols, m.positions)])["validity"] for m in heavy_atom_molecules]
    assert sum(v == 0.0 for v in valence) >= 18
    assert [v == 0.0 for v in valence] == [m == 1.0 for m in metric]
    assert [connectivity_score(m) for m in heavy_atom_molecules] == [0.0] * 20


def test_valence_is_zero_exactly_when_the_validity_metric_accepts(heavy_atom_molecules):
    rng = np.random.default_rng(0)
    agree, invalid = 0, 0
    for molecule in heavy_atom_molecules:
        for _ in range(5):  # distorted copies: some gain bonds (over-valent), some lose them
            noisy = Molecule(molecule.symbols, molecule.positions + rng.normal(0, 0.25, molecule.positions.shape))
            metric_valid = evaluate_molecules([(noisy.symbols, noisy.positions)])["validity"] == 1.0
            agree += (valence_score(noisy) == 0.0) == metric_valid
            invalid += not metric_valid
    assert invalid >= 10  # the test saw invalid molecules, not only valid ones
    assert agree == 100


def test_excess_valence_counts_bond_orders_above_the_limit():
    # Carbon with five single bonds (C-C 1.5 A) in a plane-and-axis star: one excess.
    directions = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1]], dtype=float)
    star = Molecule(("C",) * 6, np.vstack([np.zeros(3), 1.5 * directions]))
    assert excess_valence(star.symbols, _bonds(star)) == 1
    assert valence_score(star) == -1.0


def test_connectivity_counts_extra_fragments(heavy_atom_molecules):
    molecule = max(heavy_atom_molecules, key=lambda m: (_bonds(m).astype(bool).sum(axis=1) == 1).sum())
    terminal = np.flatnonzero(_bonds(molecule).astype(bool).sum(axis=1) == 1)  # atoms with one neighbour
    positions = molecule.positions.copy()
    positions[terminal[0]] += 20.0  # one terminal atom far away
    assert connectivity_score(Molecule(molecule.symbols, positions.copy())) == -1.0
    positions[terminal[1]] -= 20.0  # and another one on the other side
    assert connectivity_score(Molecule(molecule.symbols, positions)) == -2.0
    assert fragment_count(np.zeros((3, 3))) == 3


def test_graph_rewards_by_name(heavy_atom_molecules):
    with make_reward({"name": "valence", "backend": "inline"}) as valence, \
            make_reward({"name": "connectivity", "backend": "inline"}) as connectivity:
        values = valence(heavy_atom_molecules).values
        assert values.tolist() == [valence_score(m) for m in heavy_atom_molecules]
        assert (values <= 0).all() and (values == 0).sum() >= 18
        assert connectivity(heavy_atom_molecules).values.tolist() == [0.0] * 20


def test_xtb_forces_and_energy_tell_relaxed_from_strained(qm9_all):
    # DFT geometries with hydrogens (relaxed) against the same molecules with one bond squeezed.
    relaxed = [Molecule(tuple(s), p.numpy()) for s, p in (qm9_all.molecule(i) for i in (10, 500))]
    strained = []
    for molecule in relaxed:
        positions = molecule.positions.copy()
        positions[1] = positions[0] + 0.75 * (positions[1] - positions[0])  # heavy atoms 0-1 bonded in QM9
        strained.append(Molecule(molecule.symbols, positions))
    with make_reward({"name": "xtb_force_rms", "workers": 1, "heavy_atoms_only": False}) as forces, \
            make_reward({"name": "xtb_energy_per_atom", "workers": 1}) as energy:
        f = forces(relaxed + strained).values
        e = energy(relaxed + strained).values
    assert (f[:2] < 1.0).all(), f"relaxed forces {f[:2]} eV/A"  # GFN2-xTB on B3LYP minima
    assert (f[2:] > 2 * f[:2] + 1.0).all(), f"strained forces {f[2:]} vs relaxed {f[:2]}"
    assert (e[:2] < -2.0).all() and (e[:2] > -8.0).all(), f"atomisation energies {e[:2]} eV/atom"
    assert (e[2:] > e[:2]).all()  # squeezing a bond costs energy


def test_physics_combines_its_terms(heavy_atom_molecules):
    molecule = heavy_atom_molecules[5]
    terminal = np.flatnonzero(_bonds(molecule).astype(bool).sum(axis=1) == 1)
    broken = molecule.positions.copy()
    broken[terminal[0]] += 20.0
    with make_reward({"name": "physics", "workers": 1}) as physics:
        result = physics([molecule, Molecule(molecule.symbols, broken)])
    good, bad = result.values.tolist()
    assert -1.0 < good <= 0.0  # valid and connected: only the capped force term, in (-1, 0]
    assert bad < good - 1.0  # one extra fragment costs 1 on top of its own force term
    assert physics_score(Molecule(molecule.symbols, broken), force_weight=0.0) == -1.0
    assert physics_score(Molecule(molecule.symbols, broken), force_weight=0.0, fragment_weight=3.0) == -3.0
    assert physics_score(molecule, force_weight=0.0, fragment_weight=3.0) == 0.0  # one fragment: no cost


def _bonds(molecule):
    from rgdm.eval.bonds import bond_matrix

    return bond_matrix(molecule.symbols, molecule.positions)
