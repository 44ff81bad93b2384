"""How far have fine-tuned models drifted at the first reverse steps, and what does it do to the chain?

    python benchmarks/first_step_drift.py runs/phys_fkl/rgdm_step-s0 runs/phys_w1.0_flat/rgdm_step-s1

For the base model and for the raw and EMA weights of each run directory given, samples ``--samples``
molecules at ``--steps`` reverse steps from one seed and reports along the chain

* the largest |coordinate| of the states (the prior's is about 4; a chain that throws atoms apart
  shows it first after the first step),
* the RMS difference of the noise prediction from the base model's on the same states.

The first step T -> s multiplies a noise-prediction error by alpha_s / alpha_T (about 21 on
``qm9-noh-small``'s 30-step grid) in the state, while the regression measures it in noise-prediction
units; ``rgdm.first_step_kl`` prices it by its exact KL instead (docs/physics.md).
"""

from __future__ import annotations

import argparse

import torch


def chain_report(model, base, samples: int, steps: int, seed: int, at: tuple[int, ...]) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    counts = model.sample_node_counts(samples, generator)
    mask = model.mask_from_counts(counts)
    shape = (samples, mask.shape[1], 3 + model.n_features)
    with torch.no_grad():
        _, trajectory = model.sample(shape, mask, None, steps, 1.0, generator, return_trajectory=True)
        grid = model.time_grid(steps)
        cells = []
        for i in at:
            t = torch.full((samples,), grid[i], dtype=torch.long)
            drift = model.predict_eps(trajectory[i], t, mask) - base.predict_eps(trajectory[i], t, mask)
            cells.append(f"t={grid[i]}: max|x| {trajectory[i][..., :3].abs().amax():.3g}, "
                         f"eps drift {drift.pow(2).mean().sqrt():.2g}")
    return cells


def main() -> None:
    from rgdm.runs import load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", help="fine-tuning run directories")
    parser.add_argument("--base", default="qm9-noh-small")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    base = load_model(args.base).model.eval()
    at = (0, 1, 2, 10, args.steps - 5)
    print(f"{args.base}: " + " | ".join(chain_report(base, base, args.samples, args.steps, args.seed, at)))
    for run in args.runs:
        for use_ema in (False, True):
            model = load_model(run, use_ema=use_ema).model.eval()
            label = f"{run} ({'EMA' if use_ema else 'raw'})"
            print(f"{label}: " + " | ".join(chain_report(model, base, args.samples, args.steps, args.seed, at)))


if __name__ == "__main__":
    main()
