"""Side-by-side comparison of reward-driven methods: one pretrained model, one reward, one budget.

    python benchmarks/compare.py --base qm9-noh-small --reward qed --budget small
    python benchmarks/compare.py --base qm9-noh-small --reward xtb_gap --target 7500 --scale 1000 \
        --reward-option add_hydrogens=true --budget small

Every method starts from the same pre-trained weights, uses the same reward API, the same seeds and
the same budget of *reward calls* (the black box is the expensive part). Methods: RGDM step-level and
sequence-level, DDPO_SF, DDPO_IS, RWR, best-of-N, and the sampling-time steering methods SVDD-PM
(``svdd``, M candidates per step) and twisted SMC (``smc``, K particles per sample), whose reward
calls are reported *per produced sample* (they pay at every sample; ``benchmarks/amortisation.py``
turns that into a crossover against RGDM's one-off training calls). Gradient guidance would need a
differentiable reward: no built-in chemistry or xTB reward is, so it is reported as not applicable.

Outputs in ``--out`` (default ``runs/compare/<reward>``): ``results.md`` (table: final reward mean ± s.e.,
property MAE to target, validity, stability, uniqueness, reward calls, wall time), ``results.json``,
``reward_vs_calls.png`` (evaluation reward against reward calls, one curve per method).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from rgdm.config import ConfigError, RGDMConfig, TrainConfig
from rgdm.distributed import generator_on, module_device, resolve_device
from rgdm.eval.compare import sample_scored, summarize
from rgdm.rewards import make_reward
from rgdm.runs import load_model
from rgdm.sampling import smc_sample, svdd_sample
from rgdm.training.best_of_n import best_of_n
from rgdm.training.ddpo import DDPOConfig, DDPOObjective
from rgdm.training.loop import Trainer
from rgdm.training.rgdm import RGDMObjective
from rgdm.training.rwr import RWRConfig, RWRObjective
from rgdm.training.tasks import MoleculeTask


@dataclass
class Budget:
    reward_calls: int  # training reward calls per method
    eval_points: int  # evaluations along the way (their reward calls are not charged)
    eval_samples: int  # molecules per evaluation
    final_samples: int  # molecules of the final evaluation
    sampling_steps: int  # reverse steps of roll-outs and evaluation samples
    minutes_per_method: float  # wall-time cap per method


BUDGETS = {
    "tiny": Budget(600, 3, 16, 32, 20, 2.0),
    "small": Budget(6000, 6, 48, 200, 50, 5.0),
    "medium": Budget(30000, 10, 96, 500, 50, 30.0),
}
METHODS = ("rgdm_step", "rgdm_sequence", "ddpo_sf", "ddpo_is", "rwr", "best_of_n", "svdd", "smc")
SAMPLING_TIME = ("svdd", "smc")  # reward calls per produced sample


def make_objective(method: str, model, task, steps: int, seed: int):
    """The method's objective at its documented defaults (rollouts of ``steps`` reverse steps)."""
    if method == "rgdm_step":
        config = RGDMConfig(variant="step", batch_size=16, sampling_steps=steps, num_candidates=8, explore_steps=2,
                            tau=0.5)
        return RGDMObjective(model, task, config, seed), 1e-4
    if method == "rgdm_sequence":
        config = RGDMConfig(variant="sequence", batch_size=16, sampling_steps=steps, tau=0.5)
        return RGDMObjective(model, task, config, seed), 1e-4
    if method in ("ddpo_sf", "ddpo_is"):
        variant = method.split("_")[1]
        updates = {"inner_epochs": 2, "minibatches": 2} if variant == "is" else {}
        config = DDPOConfig(variant=variant, batch_size=16, sampling_steps=steps, timestep_fraction=0.5, **updates)
        return DDPOObjective(model, task, config, seed), 1e-4
    if method == "rwr":
        return RWRObjective(model, task, RWRConfig(batch_size=16, sampling_steps=steps, beta=0.2), seed), 1e-4
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def evaluate_model(model, task, n: int, steps: int, seed: int) -> dict:
    return summarize(sample_scored(model, task, n, steps, seed, progress=False))


def run_trained_method(method, args, budget, reward_config, out_dir) -> dict:
    loaded = load_model(args.base, device=args.torch_device)
    model = loaded.model.train()
    torch.manual_seed(args.seed)
    with make_reward(reward_config) as reward:
        task = MoleculeTask(model, reward, target=args.target)
        objective, lr = make_objective(method, model, task, budget.sampling_steps, args.seed)
        train = TrainConfig(steps=1, lr=lr, ema_decay=0.0, grad_clip=1.0, log_every=1, val_every=10**9,
                            checkpoint_every=10**9, seed=args.seed)
        trainer = Trainer(model, objective, train, out_dir / method, {"config": {"method": method}},
                          tensorboard=False, progress=False)
        curve = [(0, evaluate_model(model, task, budget.eval_samples, budget.sampling_steps, args.seed))]
        thresholds = [budget.reward_calls * (i + 1) / budget.eval_points for i in range(budget.eval_points)]
        started = time.perf_counter()
        for threshold in thresholds:
            while objective.reward_calls < threshold and time.perf_counter() - started < budget.minutes_per_method * 60:
                trainer.config.steps = trainer.step + 1
                trainer.fit()
            curve.append((objective.reward_calls,
                          evaluate_model(model, task, budget.eval_samples, budget.sampling_steps, args.seed)))
            print(f"  {method}: {objective.reward_calls} calls, eval reward {curve[-1][1]['reward_mean']:.4f}",
                  flush=True)
        seconds = time.perf_counter() - started
        final = evaluate_model(model, task, budget.final_samples, budget.sampling_steps, args.seed + 1)
    final.update({"reward_calls": objective.reward_calls, "wall_seconds": seconds, "iterations": trainer.step})
    return {"final": final, "curve": [(c, s["reward_mean"]) for c, s in curve]}


def run_best_of_n(args, budget, reward_config) -> dict:
    loaded = load_model(args.base, device=args.torch_device)
    model = loaded.model.eval()
    curve, final = [], None
    started = time.perf_counter()
    with make_reward(reward_config) as reward:
        task = MoleculeTask(model, reward, target=args.target)
        n_max = max(1, budget.reward_calls // budget.final_samples)
        for n in sorted({1, 2, 4, 8, n_max}):
            if n > n_max:
                continue
            generator = generator_on(module_device(model), args.seed + 1)
            kept = best_of_n(model, task, budget.eval_samples, n, generator, budget.sampling_steps)
            curve.append((n * budget.eval_samples, kept.scores.values.mean().item()))
        generator = generator_on(module_device(model), args.seed + 1)
        kept = best_of_n(model, task, budget.final_samples, n_max, generator, budget.sampling_steps)
        final = summarize_kept(task, kept)
    final.update({"reward_calls": kept.reward_calls, "wall_seconds": time.perf_counter() - started,
                  "iterations": 0, "n": float(n_max)})
    return {"final": final, "curve": curve}


def summarize_kept(task, kept) -> dict:
    """Reward and EDM metrics of samples kept by a sampling-time method (samples, scores, conditions)."""
    from rgdm.eval.molecules import evaluate_molecules

    molecules = task.decode(kept.samples, kept.conditions).molecules()
    scores = kept.scores.to("cpu")
    prop = scores.property if scores.property is not None else torch.full_like(scores.values, math.nan)
    targets = None if kept.conditions.targets is None else kept.conditions.targets.cpu()
    result = {"molecules": molecules, "reward": scores.values.numpy(),
              "reward_valid": scores.valid.numpy(), "property": prop.numpy(),
              "target": (targets if targets is not None else torch.full_like(prop, math.nan)).numpy(),
              "metrics": evaluate_molecules(molecules)}
    return summarize(result)


def steer(method: str, model, task, n: int, size: int, args, budget, seed: int):
    """SVDD-PM with M = ``size`` candidates per step, or SMC with K = ``size`` particles per sample."""
    generator = generator_on(module_device(model), seed)
    if method == "svdd":
        return svdd_sample(model, task, n, size, generator, budget.sampling_steps)
    return smc_sample(model, task, n, size, args.smc_tau, generator, budget.sampling_steps)


def run_sampling_time(method: str, args, budget, reward_config) -> dict:
    """Curve over M (or K) = 1, 2, ... up to the chosen size; reward calls are per produced sample."""
    model = load_model(args.base, device=args.torch_device).model.eval()
    size = args.svdd_m if method == "svdd" else args.smc_k
    curve = []
    started = time.perf_counter()
    with make_reward(reward_config) as reward:
        task = MoleculeTask(model, reward, target=args.target)
        for m in sorted({1, 2, size} | {v for v in (4, 8) if v < size}):
            out = steer(method, model, task, budget.eval_samples, m, args, budget, args.seed + 1)
            curve.append((out.reward_calls / budget.eval_samples, out.scores.values.mean().item()))
        out = steer(method, model, task, budget.final_samples, size, args, budget, args.seed + 1)
        final = summarize_kept(task, out)
    final.update({"reward_calls": out.reward_calls / budget.final_samples,
                  "wall_seconds": time.perf_counter() - started, "iterations": 0, "n": float(size)})
    return {"final": final, "curve": curve}


def table(results: dict, reference: dict) -> str:
    columns = [("reward", "reward_mean"), ("MAE to target", "property_mae"), ("validity", "validity"),
               ("uniqueness", "uniqueness"), ("atom stab.", "atom_stability"), ("reward calls", "reward_calls"),
               ("wall s", "wall_seconds")]
    lines = ["| method | " + " | ".join(c for c, _ in columns) + " |", "|---|" + "---:|" * len(columns)]
    for name, res in {"pretrained": {"final": reference}, **results}.items():
        f = res["final"]
        cells = []
        for _, key in columns:
            value = f.get(key, math.nan)
            if key == "reward_mean":
                cells.append(f"{value:.4f} ± {f.get('reward_se', math.nan):.4f}")
            elif key in ("reward_calls", "wall_seconds"):
                cells.append(f"{value:.0f}" if math.isfinite(value) else "–")
            else:
                cells.append(f"{value:.4g}" if math.isfinite(value) else "–")
        labels = {"best_of_n": f"best-of-{f.get('n', 0):.0f}", "svdd": f"SVDD-PM (M={f.get('n', 0):.0f})",
                  "smc": f"SMC (K={f.get('n', 0):.0f})"}
        label = labels.get(name, name)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict, reference_reward: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, res in results.items():
        calls, rewards = zip(*res["curve"])
        label = f"{name} (calls per sample)" if name in SAMPLING_TIME else name
        ax.plot(calls, rewards, marker="o", ms=3, label=label, ls="--" if name in SAMPLING_TIME else "-")
    ax.axhline(reference_reward, color="k", ls=":", lw=1, label="pretrained")
    ax.set_xlabel("reward calls")
    ax.set_ylabel("mean reward of samples")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def parse_option(text: str) -> tuple[str, object]:
    key, value = text.split("=", 1)
    return key, yaml.safe_load(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="qm9-noh-small", help="pretrained run, checkpoint or shipped name")
    parser.add_argument("--reward", default="qed")
    parser.add_argument("--reward-option", action="append", default=[], help="extra reward key=value")
    parser.add_argument("--target", type=float, default=None)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="small")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--svdd-m", type=int, default=4, help="SVDD-PM candidates per reverse step")
    parser.add_argument("--smc-k", type=int, default=4, help="SMC particles per produced sample")
    parser.add_argument("--smc-tau", type=float, default=0.05, help="SMC temperature: target p(x) exp(r(x)/tau)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda: where the models sample and train")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    try:
        args.torch_device = resolve_device(args.device)
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None
    budget = BUDGETS[args.budget]
    reward_config = {"name": args.reward, "backend": "process" if args.reward.startswith("xtb") else "inline",
                     **dict(parse_option(o) for o in args.reward_option)}
    if args.target is not None:
        reward_config.update({"target": args.target, "scale": args.scale})
    out = args.out or Path("runs/compare") / f"{args.reward}-{args.budget}"
    out.mkdir(parents=True, exist_ok=True)

    with make_reward(reward_config) as reward:
        base = load_model(args.base, device=args.torch_device).model
        reference = evaluate_model(base, MoleculeTask(base, reward, target=args.target), budget.final_samples,
                                   budget.sampling_steps, args.seed + 1)
    results = {}
    for method in args.methods.split(","):
        print(f"{method} ...", flush=True)
        if method == "best_of_n":
            results[method] = run_best_of_n(args, budget, reward_config)
        elif method in SAMPLING_TIME:
            results[method] = run_sampling_time(method, args, budget, reward_config)
        else:
            results[method] = run_trained_method(method, args, budget, reward_config, out)
        (out / "results.json").write_text(json.dumps({"reference": reference, "results": results,
                                                      "budget": budget.__dict__, "reward": reward_config},
                                                     indent=2, default=float))
    text = table(results, reference)
    command = "python benchmarks/compare.py " + " ".join(
        f"--{k.replace('_', '-')} {item}" for k, v in vars(args).items() if v not in (None, [], False)
        if k != "torch_device"
        for item in (v if isinstance(v, list) else [v]))  # --reward-option is repeated, one flag per value
    per_sample = [m for m in SAMPLING_TIME if m in results]
    note = (f"\n\nReward calls of {', '.join(per_sample)} are per produced sample (paid again for every "
            f"sample); the other methods' are training calls, paid once." if per_sample else "")
    (out / "results.md").write_text(f"Command: `{command}`\n\n{text}{note}\n\nGuidance: not applicable "
                                    f"({args.reward} is not differentiable).\n")
    plot(results, reference["reward_mean"], out / "reward_vs_calls.png")
    print(text)


if __name__ == "__main__":
    main()
