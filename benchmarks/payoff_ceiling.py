"""Where the pay-off distribution itself lies: the metrics of pi_ref · exp(r / tau) on the physics reward.

    OMP_NUM_THREADS=1 python benchmarks/payoff_ceiling.py --samples 1000 --taus 4,1,0.5,0.25,0.1

Every exact RGDM variant has the pay-off pi_ref(x) · exp(r(x) / tau) / Z as its fixed point, so its
metrics are what a fine-tuning run could reach at that temperature if it converged. They are
measured by self-normalised importance weights on samples of the base model itself: weights
softmax(z / tau) with z the reward z-scored over the samples (the units RGDM's temperature uses with
``normalize_rewards``), and every metric a weighted mean (novelty and the hydrocarbon share: among
the valid molecules). The effective sample size (Σw)² / Σw² says how many of the base's samples carry
the estimate (small: the pay-off lies where the base rarely goes, and the estimate is rough). Writes
``runs/payoff_ceiling/result.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def per_molecule_flags(molecules, training: frozenset[str]) -> tuple[np.ndarray, ...]:
    """Validity (EDM), connected validity, the single-fragment flag, novelty (valid, SMILES absent
    from QM9's training split) and the hydrocarbon flag (valid, carbon atoms only) of every molecule."""
    from rdkit import Chem

    from rgdm.eval.bonds import bond_matrix, largest_fragment_smiles, mol_from_bond_matrix
    from rgdm.eval.strict import connected_molecule

    valid, connected, single, novel, hydrocarbon = [], [], [], [], []
    for symbols, positions in molecules:
        symbols = list(symbols)
        pos = np.asarray(positions.detach().cpu() if hasattr(positions, "detach") else positions, dtype=float)
        bonds = bond_matrix(symbols, pos)
        mol = mol_from_bond_matrix(symbols, pos, bonds)
        smiles = largest_fragment_smiles(mol)
        valid.append(smiles is not None)
        novel.append(smiles is not None and smiles not in training)
        hydrocarbon.append(smiles is not None
                           and all(atom.GetSymbol() == "C" for atom in Chem.MolFromSmiles(smiles).GetAtoms()))
        single.append(len(Chem.GetMolFrags(mol)) == 1)
        connected.append(connected_molecule(symbols, pos, bonds) is not None)
    return tuple(np.array(flags, float) for flags in (valid, connected, single, novel, hydrocarbon))


def tilted(values: np.ndarray, rewards: np.ndarray, tau: float) -> tuple[float, float]:
    """The pay-off's mean of ``values`` at temperature ``tau`` (z-scored rewards) and the weights' ESS."""
    z = (rewards - rewards.mean()) / rewards.std()
    log_w = z / tau
    w = np.exp(log_w - log_w.max())
    w /= w.sum()
    return float((w * values).sum()), float(1.0 / (w**2).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="qm9-noh-small")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seed", type=int, default=777)
    parser.add_argument("--taus", default="4,1,0.5,0.25,0.1")
    parser.add_argument("--workers", type=int, default=1, help="xTB worker processes")
    parser.add_argument("--out", type=Path, default=Path("runs/payoff_ceiling"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    from rgdm.eval.sampling import molecule_list, qm9_training_smiles, sample_in_chunks
    from rgdm.rewards import make_reward
    from rgdm.runs import load_model

    model = load_model(args.base).model.eval()
    with torch.no_grad():
        molecules = molecule_list(sample_in_chunks(model, args.samples, 100, args.steps, args.seed, progress=True))
    valid, connected, single, novel, hydrocarbon = per_molecule_flags(molecules, frozenset(qm9_training_smiles()))
    with make_reward({"name": "physics", "workers": args.workers, "timeout": 60}) as reward:
        rewards = reward(molecules).values.numpy().astype(float)
    rows = []
    for tau in [float(t) for t in args.taus.split(",")]:
        row = {"tau": tau}
        for name, values in (("validity", valid), ("connected_validity", connected), ("single_fragment", single),
                             ("reward", rewards)):
            row[name], row["ess"] = tilted(values, rewards, tau)
        row["novelty"] = tilted(novel, rewards, tau)[0] / row["validity"]  # novel among the valid
        row["hydrocarbon_share"] = tilted(hydrocarbon, rewards, tau)[0] / row["validity"]
        rows.append(row)
    base = {"validity": valid.mean(), "connected_validity": connected.mean(), "single_fragment": single.mean(),
            "reward": rewards.mean(), "novelty": novel.sum() / valid.sum(),
            "hydrocarbon_share": hydrocarbon.sum() / valid.sum()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "result.json").write_text(json.dumps({"base": base, "payoff": rows, "samples": args.samples,
                                                     "seed": args.seed}, indent=2))
    print("| distribution | validity | connected validity | single fragment | novelty | hydrocarbon share | "
          "reward | ESS |")
    print("|---|---|---|---|---|---|---|---|")
    for name, row, ess in [(f"base ({args.samples} samples)", base, args.samples)] + [
            (f"pay-off, τ = {row['tau']:g}", row, row["ess"]) for row in rows]:
        print(f"| {name} | {row['validity']:.3f} | {row['connected_validity']:.3f} | {row['single_fragment']:.3f} | "
              f"{row['novelty']:.3f} | {row['hydrocarbon_share']:.3f} | {row['reward']:.3f} | {ess:.0f} |")


if __name__ == "__main__":
    main()
