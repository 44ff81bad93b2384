"""When does training-time steering pay off? RGDM vs SVDD-PM and twisted SMC, in reward calls and time.

    python benchmarks/amortisation.py --base runs/qm9-noh-small --reward qed --reward-option method=edm

RGDM pays its reward calls once, while fine-tuning; afterwards every sample is a plain sample of
the fine-tuned model (no reward call). SVDD-PM and SMC pay per sample: M (or K) look-ahead calls
at every reverse step. For N accepted samples at the same reward level:

    RGDM:            C_train + 0 · N         calls,   W_train + N · w_rgdm   seconds
    inference-time:  c · N                   calls,   N · w                  seconds

so RGDM is cheaper beyond N* = C_train / c calls-wise (and W_train / (w - w_rgdm) time-wise).
The target level is the mean reward of RGDM's fine-tuned model, measured on ``--eval-samples``
samples; each inference-time setting (M for SVDD, K for SMC, and optionally N for best-of-N, c = N)
is measured on the same number of samples, and the cheapest setting that reaches the level defines c.
RGDM is fine-tuned here with the step-level defaults of ``benchmarks/compare.py`` (``rgdm_step``), on
the same model, reward and seeds.

Outputs in ``--out`` (default ``runs/amortisation/<reward>``): ``results.json``, ``results.md`` (table
and crossover) and ``calls_vs_n.png`` (total reward calls against the number of samples N).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch

from compare import make_objective, parse_option
from rgdm.config import ConfigError, TrainConfig
from rgdm.distributed import generator_on, module_device, resolve_device
from rgdm.eval.molecules import evaluate_molecules
from rgdm.rewards import make_reward
from rgdm.runs import load_model
from rgdm.sampling import smc_sample, svdd_sample
from rgdm.training.best_of_n import best_of_n
from rgdm.training.loop import Trainer
from rgdm.training.tasks import MoleculeTask


def diversity(task, samples: torch.Tensor, conditions) -> dict:
    """EDM validity and uniqueness (among valid) of decoded samples: a collapsed sampler shows here."""
    metrics = evaluate_molecules(task.decode(samples, conditions).molecules())
    return {"validity": float(metrics["validity"]), "uniqueness": float(metrics["uniqueness"])}


def mean_and_se(values: torch.Tensor) -> tuple[float, float]:
    se = values.std().item() / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return values.mean().item(), se


@torch.no_grad()
def plain_samples(model, task, n: int, steps: int, seed: int) -> dict:
    """Rewards of ``n`` ordinary samples and the sampling seconds per sample (scoring not timed)."""
    model.eval()
    generator = generator_on(module_device(model), seed)
    cond = task.conditions(n, generator)
    started = time.perf_counter()
    x0 = model.sample(cond.shape, cond.node_mask, cond.context, num_steps=steps, generator=generator)
    seconds = time.perf_counter() - started
    reward, se = mean_and_se(task.score(x0, cond).values)
    return {"reward": reward, "reward_se": se, "calls_per_sample": 0.0, "seconds_per_sample": seconds / n,
            **diversity(task, x0, cond)}


def steered(task, result, n: int, seconds: float) -> dict:
    reward, se = mean_and_se(result.scores.values)
    return {"reward": reward, "reward_se": se, "calls_per_sample": result.reward_calls / n,
            "seconds_per_sample": seconds / n, **diversity(task, result.samples, result.conditions)}


def finetune_rgdm(model, task, calls: int, steps: int, seed: int, minutes: float, out_dir: Path,
                  lr: float | None = None) -> dict:
    """Step-level RGDM (compare.py's defaults) until ``calls`` reward calls or ``minutes`` have passed."""
    torch.manual_seed(seed)
    model.train()
    objective, default_lr = make_objective("rgdm_step", model, task, steps, seed)
    lr = lr or default_lr
    train = TrainConfig(steps=1, lr=lr, ema_decay=0.0, grad_clip=1.0, log_every=1, val_every=10**9,
                        checkpoint_every=10**9, seed=seed)
    trainer = Trainer(model, objective, train, out_dir / "rgdm_step", {"config": {"method": "rgdm_step"}},
                      tensorboard=False, progress=False)
    started = time.perf_counter()
    while objective.reward_calls < calls and time.perf_counter() - started < minutes * 60:
        trainer.config.steps = trainer.step + 1
        trainer.fit()
        print(f"  rgdm_step: iteration {trainer.step}, {objective.reward_calls} reward calls", flush=True)
    return {"train_calls": objective.reward_calls, "train_seconds": time.perf_counter() - started,
            "iterations": trainer.step, "lr": lr}


def measure_best_of(base, task, args, skip: set[str] = frozenset()) -> dict[str, dict]:
    """Best-of-N rows (N reward calls per sample) on the same conditions, except those in ``skip``."""
    rows = {}
    for n in args.best_of:
        if f"best-of-{n}" in skip:
            continue
        started = time.perf_counter()
        result = best_of_n(base, task, args.eval_samples, n, generator_on(module_device(base), args.seed + 1),
                           args.steps)
        rows[f"best-of-{n}"] = steered(task, result, args.eval_samples, time.perf_counter() - started)
        print(f"  best-of-{n}: {rows[f'best-of-{n}']}", flush=True)
    return rows


def measure_inference(base, task, args) -> dict[str, dict]:
    """Reward level, calls and seconds per sample of every best-of-N, SVDD M and SMC K on the same conditions."""
    rows = measure_best_of(base, task, args)
    for m in args.svdd_m:
        started = time.perf_counter()
        result = svdd_sample(base, task, args.eval_samples, m, generator_on(module_device(base), args.seed + 1),
                             args.steps, selection="greedy")
        rows[f"svdd M={m}"] = steered(task, result, args.eval_samples, time.perf_counter() - started)
        print(f"  svdd M={m}: {rows[f'svdd M={m}']}", flush=True)
    for k in args.smc_k:
        started = time.perf_counter()
        generator = generator_on(module_device(base), args.seed + 1)
        result = smc_sample(base, task, args.eval_samples, k, args.smc_tau, generator, args.steps)
        rows[f"smc K={k}"] = steered(task, result, args.eval_samples, time.perf_counter() - started)
        print(f"  smc K={k}: {rows[f'smc K={k}']}", flush=True)
    return rows


def crossover(rgdm: dict, row: dict) -> tuple[float, float]:
    """N* in reward calls and in wall time beyond which RGDM is cheaper than this setting."""
    calls = rgdm["train_calls"] / row["calls_per_sample"] if row["calls_per_sample"] > 0 else math.inf
    extra = row["seconds_per_sample"] - rgdm["seconds_per_sample"]
    seconds = rgdm["train_seconds"] / extra if extra > 0 else math.inf
    return calls, seconds


def cheapest_reaching(rows: dict, prefix: str, level: float) -> str | None:
    """The setting of one family with the fewest calls per sample that reaches the level.

    SVDD with M = 1 keeps its only candidate: it *is* the pretrained sampler (identical samples) at
    the price of the look-ahead calls, so it never counts as steering.
    """
    reaching = [(r["calls_per_sample"], name) for name, r in rows.items() if name.startswith(prefix)
                and name != "svdd M=1" and r["reward"] >= level]
    return min(reaching)[1] if reaching else None


def crossover_text(summary: dict) -> str:
    level, pretrained = summary["level"], summary["pretrained"]["reward"]
    lines = [f"- {name}: N* = {c['calls']:.0f} samples (reward calls), {c['seconds']:.0f} samples (wall time)"
             for name, c in summary["cheapest_reaching_level"].items()]
    if pretrained >= level:
        lines.insert(0, f"- the pretrained model already reaches RGDM's level ({pretrained:.3f} >= {level:.3f}): "
                        "no steering is needed for it, so RGDM's training calls never pay off (N* = ∞); the N* "
                        "below compare RGDM with steering settings that reach at least the same level")
    return "\n".join(lines) or "- no inference-time setting reached the level"


def table(rgdm: dict, base: dict, rows: dict, level: float) -> str:
    lines = ["| method | mean reward ± s.e. | validity / uniqueness | reaches level | reward calls / sample | "
             "s / sample | N* (calls) | N* (time) |", "|---|---:|---:|:---:|---:|---:|---:|---:|"]
    quality = lambda r: f"{r.get('validity', math.nan):.2f} / {r.get('uniqueness', math.nan):.2f}"  # noqa: E731
    lines.append(f"| pretrained | {base['reward']:.3f} ± {base['reward_se']:.3f} | {quality(base)} | "
                 f"{'yes' if base['reward'] >= level else 'no'} | 0 | {base['seconds_per_sample']:.3f} | – | – |")
    lines.append(f"| RGDM (fine-tuned) | {rgdm['reward']:.3f} ± {rgdm['reward_se']:.3f} | {quality(rgdm)} | "
                 f"(defines it) | 0 (+{rgdm['train_calls']} once) | {rgdm['seconds_per_sample']:.3f} "
                 f"(+{rgdm['train_seconds']:.0f} once) | – | – |")
    for name, row in rows.items():
        n_calls, n_time = crossover(rgdm, row)
        fmt = lambda v: "∞" if math.isinf(v) else f"{v:.0f}"  # noqa: E731
        lines.append(f"| {name} | {row['reward']:.3f} ± {row['reward_se']:.3f} | {quality(row)} | "
                     f"{'yes' if row['reward'] >= level else 'no'} | {row['calls_per_sample']:.0f} | "
                     f"{row['seconds_per_sample']:.3f} | {fmt(n_calls)} | {fmt(n_time)} |")
    return "\n".join(lines)


def plot(rgdm: dict, rows: dict, chosen: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n = np.logspace(0, 5, 200)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(n, np.full_like(n, rgdm["train_calls"]), color="k", lw=2, label="RGDM (training calls, once)")
    for name in chosen:
        row = rows[name]
        ax.plot(n, row["calls_per_sample"] * n, label=f"{name} ({row['calls_per_sample']:.0f} calls/sample)")
        n_star = crossover(rgdm, row)[0]
        ax.axvline(n_star, color=ax.lines[-1].get_color(), ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("number of samples N")
    ax.set_ylabel("total reward calls")
    ax.set_title("reward calls to produce N samples at RGDM's reward level")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="qm9-noh-small", help="pretrained run, checkpoint or shipped name")
    parser.add_argument("--reward", default="qed")
    parser.add_argument("--reward-option", action="append", default=[], help="extra reward key=value")
    parser.add_argument("--target", type=float, default=None)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--train-calls", type=int, default=4000, help="RGDM fine-tuning budget (reward calls)")
    parser.add_argument("--train-minutes", type=float, default=10.0, help="wall-time cap of the fine-tuning")
    parser.add_argument("--rgdm-lr", type=float, default=None, help="learning rate (default: compare.py's)")
    parser.add_argument("--reuse-inference", type=Path, default=None,
                        help="results.json of an earlier run with the same base, reward, steps, samples and seed: "
                             "reuse its pretrained and sampling-time rows (best-of-N rows it lacks are measured)")
    parser.add_argument("--steps", type=int, default=20, help="reverse steps of every sampler")
    parser.add_argument("--eval-samples", type=int, default=48)
    parser.add_argument("--svdd-m", type=lambda s: [int(v) for v in s.split(",")], default=[1, 2, 4, 8])
    parser.add_argument("--smc-k", type=lambda s: [int(v) for v in s.split(",")], default=[2, 4, 8])
    parser.add_argument("--best-of", type=lambda s: [int(v) for v in s.split(",")] if s else [], default=[],
                        help="also best-of-N at these N (N reward calls per sample), e.g. 2,4,8,16")
    parser.add_argument("--smc-tau", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda: where the models sample and train")
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    try:
        device = resolve_device(args.device)
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None
    reward_config = {"name": args.reward, "backend": "process" if args.reward.startswith("xtb") else "inline",
                     **dict(parse_option(o) for o in args.reward_option)}
    if args.target is not None:
        reward_config.update({"target": args.target, "scale": args.scale})
    out = args.out or Path("runs/amortisation") / args.reward
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_model(args.base, device=device)  # loaded once: a run still training may write newer checkpoints
    base = loaded.model.eval()
    with make_reward(reward_config) as reward:
        plain_samples(base, MoleculeTask(base, reward, target=args.target), 2, 2, args.seed)  # warm-up, untimed
        if args.reuse_inference is not None:
            earlier = json.loads(args.reuse_inference.read_text())
            base_row, rows = earlier["pretrained"], earlier["inference"]
            print(f"pretrained and inference-time rows reused from {args.reuse_inference}", flush=True)
            rows.update(measure_best_of(base, MoleculeTask(base, reward, target=args.target), args, set(rows)))
        else:
            print("pretrained ...", flush=True)
            base_row = plain_samples(base, MoleculeTask(base, reward, target=args.target), args.eval_samples,
                                     args.steps, args.seed + 1)
            print("inference-time methods ...", flush=True)
            rows = measure_inference(base, MoleculeTask(base, reward, target=args.target), args)
        print("RGDM fine-tuning ...", flush=True)
        tuned = copy.deepcopy(base)
        tuned_task = MoleculeTask(tuned, reward, target=args.target)
        rgdm = finetune_rgdm(tuned, tuned_task, args.train_calls, args.steps, args.seed, args.train_minutes, out,
                             args.rgdm_lr)
        rgdm.update(plain_samples(tuned, tuned_task, args.eval_samples, args.steps, args.seed + 1))
    level = rgdm["reward"]
    families = ("svdd", "smc", "best-of")
    chosen = [name for name in (cheapest_reaching(rows, family, level) for family in families) if name]
    summary = {"base": str(loaded.checkpoint), "base_step": loaded.step, "reward": reward_config,
               "level": level, "pretrained": base_row, "rgdm": rgdm, "inference": rows,
               "cheapest_reaching_level": {name: dict(zip(("calls", "seconds"), crossover(rgdm, rows[name])))
                                           for name in chosen},
               "args": {k: str(v) for k, v in vars(args).items()}}
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=float))
    text = table(rgdm, base_row, rows, level)
    command = "python benchmarks/amortisation.py " + " ".join(
        f"--{k.replace('_', '-')} {','.join(map(str, v)) if isinstance(v, list) and k != 'reward_option' else v}"
        for k, v in vars(args).items() if k != "reward_option" and v is not None)
    command += "".join(f" --reward-option {o}" for o in args.reward_option)
    crossings = crossover_text(summary)
    (out / "results.md").write_text(
        f"Command: `{command}`\n\nBase: `{loaded.checkpoint}` (step {loaded.step}); level = RGDM's mean reward "
        f"{level:.3f}.\n\n{text}\n\nCheapest setting reaching the level, and the crossover:\n{crossings}\n")
    plot(rgdm, rows, chosen or list(rows)[-1:], out / "calls_vs_n.png")
    print(text)
    print(crossings)


if __name__ == "__main__":
    main()
