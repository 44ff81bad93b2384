"""EDM's row and the strict row (connected validity, PoseBusters checks) on QM9 test molecules.

A sanity check of the strict metrics: QM9 molecules are DFT ground states, so they should mostly pass
PoseBusters (Buttenschoen et al. 2024). Prints both rows and every check's pass rate, with and
without hydrogens (the same molecules).

    python benchmarks/strict_metrics.py --n 200
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from rgdm.data.qm9 import load_qm9
from rgdm.eval.molecules import evaluate_molecules
from rgdm.eval.strict import format_evaluation, strict_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="QM9 test molecules (a fixed random subset)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for remove_h in (False, True):
        test = load_qm9("test", remove_h=remove_h)
        picks = np.random.default_rng(args.seed).choice(len(test), size=min(args.n, len(test)), replace=False)
        molecules = [test.molecule(i) for i in picks.tolist()]
        started = time.perf_counter()
        strict = strict_metrics(molecules)
        print(f"\nQM9 test, {'without' if remove_h else 'with'} hydrogens ({time.perf_counter() - started:.0f} s)")
        print(format_evaluation(evaluate_molecules(molecules), strict))
        print("PoseBusters pass rates (connected-valid molecules): "
              + ", ".join(f"{name} {100 * rate:.1f} %" for name, rate in strict["pb_checks"].items()))


if __name__ == "__main__":
    main()
