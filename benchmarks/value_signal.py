"""Where along the reverse chain do the step level's look-ahead values carry information?

    OMP_NUM_THREADS=1 python benchmarks/value_signal.py --reward physics --rollouts 16 --out runs/value_signal
    OMP_NUM_THREADS=1 python benchmarks/value_signal.py --reward qed --reward-option method=edm \
        --reward-option backend=inline --out runs/value_signal_qed

Rolls out ``--rollouts`` samples of the shipped model and, at every reverse step t -> s of the
``--steps`` grid, explores the step as RGDM's step level does (K candidates with random feasible
shifts, M stochastic continuations of the frozen model from each candidate to t = 0, one reward call
each). From the raw values v[b, k, m] of roll-out b, candidate k and continuation m it reports

* the within-candidate variance W = mean over (b, k) of var_m v (the continuations' noise),
* the between-candidate variance B = mean over b of var_k (mean_m v),
* the signal fraction 1 − W / (M · B): the share of the spread between candidates' estimated values
  that is not the continuations' noise (E[B] = var of the true values + W / M). Near 0 the weights
  rank candidates by noise; near 1 by their values. (At the last step s = 0 there are no
  continuations: the reward of the candidate itself, fraction 1.)

This is what ``rgdm.value_shrinkage`` estimates on every explored step during training.
Writes ``<out>/value_signal.json`` and a plot ``<out>/value_signal.png`` (with ``--overlay`` the curves of
earlier measurements in the same figure; docs/value_signal.png is the QED run with the physics run
overlaid).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def measure(args: argparse.Namespace) -> list[dict]:
    from rgdm.config import FinetuneConfig, from_dict, to_dict
    from rgdm.domains import domain_of_config
    from rgdm.training.payoff_weights import value_signal_fraction, value_variances
    from rgdm.training.rgdm import RGDMObjective
    from rgdm.training.rollouts import collect_trajectories
    from rgdm.training.tasks import BatchShard

    values = to_dict(FinetuneConfig())
    reward = {"name": args.reward, "workers": args.workers, **dict(args.reward_option)}
    values.update({"base": args.base, "method": "rgdm", "reward": reward,
                   "rgdm": {"variant": "step", "sampling_steps": args.steps, "num_candidates": args.candidates,
                            "lookahead": "continuation", "lookahead_samples": args.continuations,
                            "explore_t_max": 1.0}})
    config = from_dict(FinetuneConfig, values)
    config.validate()
    torch.set_num_threads(1)
    domain = domain_of_config(config)
    loaded = domain.load_model(config.base)
    model = loaded.model.eval()
    reward = domain.make_reward(config.reward)
    try:
        task = domain.build_task(config, loaded, model, reward)
        objective = RGDMObjective(model, task, config.rgdm, seed=args.seed)
        generator = torch.Generator().manual_seed(args.seed)
        shard = BatchShard.of(task.conditions(args.rollouts, generator))
        grid = objective._grid(model)
        with torch.no_grad():
            traj = collect_trajectories(model, shard, grid, config.rgdm.eta, generator, stochastic=False)
        rows = []
        for idx in range(len(grid) - 1):
            t_int, s_int = grid[idx], grid[idx + 1]
            exp = objective.explore(traj.states[idx], t_int, s_int, shard, generator)
            v = exp.values.double()  # [B, K, M] (or [B, K] at s = 0: the reward itself, no noise)
            if v.dim() == 3:
                within, between = (x.item() for x in value_variances(v))
                fraction = value_signal_fraction(v, clamp=False).item()
            else:
                within, between, fraction = 0.0, v.var(dim=-1).mean().item(), 1.0
            rows.append({"t": t_int, "s": s_int, "t_fraction": t_int / model.timesteps, "within": within,
                         "between": between, "signal_fraction": fraction,
                         "value_mean": v.mean().item()})
            print(f"t {t_int:4d} -> {s_int:4d}  W {within:8.4f}  B {between:8.4f}  signal {fraction:+.3f}"
                  f"  mean value {v.mean().item():+.3f}", flush=True)
        return rows
    finally:
        if hasattr(reward, "close"):
            reward.close()


def plot(curves: dict[str, list[dict]], path: Path) -> None:
    """The signal fraction against t / T, one line per reward."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, rows in curves.items():
        ax.plot([r["t_fraction"] for r in rows], [r["signal_fraction"] for r in rows], marker="o", ms=3,
                label=label)
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.axvline(0.3, color="grey", ls="--", lw=0.8, label="default window (t ≤ 0.3 T)")
    ax.set_xlabel("t / T of the explored step")
    ax.set_ylabel("signal fraction 1 − W / (M·B)")
    ax.set_title("Look-ahead values: spread between candidates vs noise")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def reward_option(text: str) -> tuple[str, object]:
    import yaml

    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE, e.g. method=edm")
    return key, yaml.safe_load(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="qm9-noh-small")
    parser.add_argument("--reward", default="physics")
    parser.add_argument("--rollouts", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--continuations", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--reward-option", action="append", default=[], type=reward_option, metavar="KEY=VALUE",
                        help="one more option of the reward (YAML value), e.g. method=edm (repeatable)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overlay", action="append", default=[], type=Path, metavar="JSON",
                        help="a value_signal.json written before, drawn in the same plot (repeatable)")
    parser.add_argument("--out", type=Path, default=Path("runs/value_signal"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = measure(args)
    (args.out / "value_signal.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                            "steps": rows}, indent=2))
    curves = {args.reward: rows}
    for other in args.overlay:  # earlier measurements drawn in the same figure
        saved = json.loads(other.read_text())
        curves[saved["args"]["reward"]] = saved["steps"]
    plot(curves, args.out / "value_signal.png")
    print(f"wrote {args.out / 'value_signal.json'} and value_signal.png")


if __name__ == "__main__":
    main()
