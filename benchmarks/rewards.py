"""Reward throughput: GFN2-xTB gaps per second on QM9 molecules, per execution backend.

Single points (``relax: none``): the relaxation's own cost is in docs/metrics.md.

Runs the same molecules through the process pool with 1 and 2 workers and through Ray (local,
2 CPUs), each after a warm-up call (worker start-up is paid once per training run), with the
cache off so every molecule is computed. Prints rewards/second side by side with ratios to
1 worker.

    python benchmarks/rewards.py --molecules 400
"""

from __future__ import annotations

import argparse
import time

import torch

from rgdm.data.qm9 import load_qm9
from rgdm.rewards import make_reward


def throughput(config: dict, batch, warm_up) -> tuple[float, float]:
    """(rewards per second, fraction valid) of one backend on ``batch``."""
    reward = make_reward({"name": "xtb_gap", "cache": False, "timeout": 120, "relax": "none", **config})
    try:
        reward(warm_up)
        start = time.perf_counter()
        result = reward(batch)
        seconds = time.perf_counter() - start
    finally:
        reward.close()
    return len(batch) / seconds, float(result.valid.float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--molecules", type=int, default=400, help="QM9 test molecules to score")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray backend")
    args = parser.parse_args()

    dataset = load_qm9("test")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))
    batch = dataset.batch(order[: args.molecules])
    warm_up = dataset.batch(order[args.molecules: args.molecules + 8])

    backends = {"process, 1 worker": {"backend": "process", "workers": 1},
                "process, 2 workers": {"backend": "process", "workers": 2}}
    if not args.no_ray:
        import ray

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        backends["ray, 2 workers"] = {"backend": "ray", "workers": 2}

    print(f"xTB gap (GFN2-xTB single point), {args.molecules} QM9 test molecules, "
          f"{batch.num_atoms.float().mean():.1f} atoms on average")
    print(f"{'backend':<20} {'rewards/s':>10} {'ratio':>7} {'valid':>7}")
    baseline = None
    for label, config in backends.items():
        rate, valid = throughput(config, batch, warm_up)
        baseline = baseline or rate
        print(f"{label:<20} {rate:>10.1f} {rate / baseline:>6.2f}x {valid:>7.1%}")


if __name__ == "__main__":
    main()
