"""Where novelty goes: the heavy-atom composition of fine-tuned models' molecules.

    OMP_NUM_THREADS=1 python benchmarks/composition.py qm9-noh-small runs/phys_step_fkl_r40_480/rgdm_step-s2

For the shipped model or run directory given (EMA weights when the run has them), samples ``--samples``
molecules with the evaluation of ``benchmarks/physics.py`` (30 steps, seed 12345) and reports

* the share of each element among all heavy atoms,
* the hydrocarbon share: valid molecules whose largest fragment holds carbon only,
* novelty (EDM: distinct valid SMILES absent from QM9's training split), and apart for hydrocarbons
  and for the others, so that a fall in novelty can be traced to a shift of composition,
* the most frequent valid SMILES.

QM9 enumerates small molecules exhaustively, so a model that turns to hydrocarbons (whose valences are
easy to satisfy) finds the training set's chains and rings: novelty falls without any single molecule
repeating much (docs/physics.md).
"""

from __future__ import annotations

import argparse
from collections import Counter

import numpy as np
import torch


def composition(source: str, samples: int, steps: int, seed: int, training: frozenset[str]) -> dict:
    """The composition, validity, hydrocarbon share and novelty of ``samples`` molecules of ``source``."""
    from rdkit import Chem

    from rgdm.eval.bonds import bond_matrix, largest_fragment_smiles, mol_from_bond_matrix
    from rgdm.eval.sampling import molecule_list, sample_in_chunks
    from rgdm.runs import load_model

    model = load_model(source).model
    with torch.no_grad():
        molecules = molecule_list(sample_in_chunks(model, samples, 100, steps, seed, progress=False))
    elements = Counter(symbol for symbols, _ in molecules for symbol in symbols)
    valid: list[str] = []
    for symbols, positions in molecules:
        symbols = list(symbols)
        pos = np.asarray(positions.detach().cpu() if hasattr(positions, "detach") else positions, dtype=float)
        smiles = largest_fragment_smiles(mol_from_bond_matrix(symbols, pos, bond_matrix(symbols, pos)))
        if smiles is not None:
            valid.append(smiles)
    hydrocarbon = {s for s in set(valid) if all(a.GetSymbol() == "C" for a in Chem.MolFromSmiles(s).GetAtoms())}
    distinct = set(valid)

    def novelty(group: set[str]) -> float:
        return len(group - training) / len(group) if group else float("nan")

    total = sum(elements.values())
    return {"source": source, "elements": {k: v / total for k, v in sorted(elements.items())},
            "validity": len(valid) / len(molecules),
            "hydrocarbon_share": sum(s in hydrocarbon for s in valid) / max(len(valid), 1),
            "novelty": novelty(distinct), "novelty_hydrocarbons": novelty(distinct & hydrocarbon),
            "novelty_others": novelty(distinct - hydrocarbon), "top": Counter(valid).most_common(5)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sources", nargs="+", help="shipped model names or run directories")
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seed", type=int, default=12345)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from rgdm.eval.sampling import qm9_training_smiles
    from rgdm.runs import resolve_checkpoint
    from rgdm.training.checkpoint import CheckpointError

    for source in args.sources:  # every name checked before the first one is sampled
        try:
            resolve_checkpoint(source)
        except CheckpointError as err:
            parser.error(str(err))
    training = frozenset(qm9_training_smiles())
    print("| model | C / N / O / F share of heavy atoms | validity | hydrocarbon share of valid | novelty | "
          "novelty of hydrocarbons / of the others | most frequent |")
    print("|---|---|---|---|---|---|---|")
    for source in args.sources:
        r = composition(source, args.samples, args.steps, args.seed, training)
        shares = " / ".join(f"{r['elements'].get(e, 0.0):.3f}" for e in ("C", "N", "O", "F"))
        top = ", ".join(f"{s} ×{n}" for s, n in r["top"][:3])
        print(f"| {source} | {shares} | {r['validity']:.3f} | {r['hydrocarbon_share']:.3f} | {r['novelty']:.3f} | "
              f"{r['novelty_hydrocarbons']:.3f} / {r['novelty_others']:.3f} | {top} |", flush=True)


if __name__ == "__main__":
    main()
