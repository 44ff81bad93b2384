"""End-to-end throughput of the shipped model: molecules sampled per second, and xTB rewards per second.

Sampling: ``sample_molecules`` of the shipped ``qm9-noh-small`` model (100 DDIM steps by default),
timed after a warm-up, at each batch size; prints molecules/s and *valid* molecules/s (RDKit
validity of the same samples).

Rewards: the sampled molecules scored by ``xtb_gap`` (GFN2-xTB single points on the skeletons with
hydrogens added, the fine-tuning reward of a heavy-atom model) in worker processes, with 1 and 2
workers side by side (ratio to 1 worker), cache off, after a warm-up call that pays the workers'
start-up.

    OMP_NUM_THREADS=2 python benchmarks/throughput.py --batch-sizes 64,256 --xtb-molecules 256
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from rgdm.eval.molecules import evaluate_molecules
from rgdm.runs import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rewards import throughput  # noqa: E402 - benchmarks/ is not a package


def sampling_rate(model, batch_size: int, num_steps: int, seed: int) -> dict[str, float]:
    """Molecules per second (all and valid) for one ``sample_molecules`` call of ``batch_size``."""
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    batch = model.sample_molecules(batch_size, num_steps=num_steps, generator=generator)
    seconds = time.perf_counter() - start
    validity = float(evaluate_molecules(batch)["validity"])
    return {"batch_size": batch_size, "seconds": seconds, "molecules_per_s": batch_size / seconds,
            "validity": validity, "valid_molecules_per_s": validity * batch_size / seconds}


def xtb_rate(batch, warm_up, workers: int) -> dict[str, float]:
    """xTB gap rewards per second on ``batch`` with ``workers`` worker processes (``rewards.throughput``)."""
    rate, scored = throughput({"backend": "process", "workers": workers, "add_hydrogens": True}, batch, warm_up)
    return {"workers": workers, "molecules": len(batch), "seconds": len(batch) / rate,
            "molecules_per_s": rate, "scored": scored}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qm9-noh-small", help="shipped model name, run or checkpoint")
    parser.add_argument("--batch-sizes", default="64,256", help="comma-separated sampling batch sizes")
    parser.add_argument("--steps", type=int, default=100, help="sampling steps per molecule")
    parser.add_argument("--xtb-molecules", type=int, default=256, help="sampled molecules to score (0: skip xTB)")
    parser.add_argument("--workers", default="1,2", help="comma-separated xTB worker counts")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    model = load_model(args.model).model
    batch_sizes = [int(size) for size in args.batch_sizes.split(",")]
    model.sample_molecules(8, num_steps=2, generator=torch.Generator().manual_seed(0))  # warm-up
    results: dict = {"model": args.model, "steps": args.steps, "torch_threads": torch.get_num_threads(),
                     "sampling": [], "xtb": []}
    print(f"sampling {args.model}, {args.steps} steps, {torch.get_num_threads()} torch threads")
    print(f"{'batch':>6} {'seconds':>8} {'molecules/s':>12} {'validity':>9} {'valid/s':>8}")
    for size in batch_sizes:
        row = sampling_rate(model, size, args.steps, seed=size)
        results["sampling"].append(row)
        print(f"{size:>6} {row['seconds']:>8.2f} {row['molecules_per_s']:>12.1f} {row['validity']:>9.1%} "
              f"{row['valid_molecules_per_s']:>8.1f}")

    if args.xtb_molecules > 0:
        generator = torch.Generator().manual_seed(1)
        warm_up = model.sample_molecules(8, num_steps=args.steps, generator=generator)
        batch = model.sample_molecules(args.xtb_molecules, num_steps=args.steps, generator=generator)
        print(f"xTB gap (GFN2-xTB single points, hydrogens added) on {len(batch)} sampled molecules")
        print(f"{'workers':>8} {'seconds':>8} {'molecules/s':>12} {'ratio':>6} {'scored':>7}")
        baseline = None
        for workers in (int(count) for count in args.workers.split(",")):
            row = xtb_rate(batch, warm_up, workers)
            baseline = baseline or row["molecules_per_s"]
            row["ratio_to_first"] = row["molecules_per_s"] / baseline
            results["xtb"].append(row)
            print(f"{workers:>8} {row['seconds']:>8.2f} {row['molecules_per_s']:>12.1f} "
                  f"{row['ratio_to_first']:>5.2f}x {row['scored']:>7.1%}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
