"""Fine-tune, then steer: sampling-time search (SMC, SVDD) on an RGDM-fine-tuned model against the same
search on the pre-trained model, at equal sampling-time reward calls.

    OMP_NUM_THREADS=1 python benchmarks/steer_finetuned.py --setting window --seeds 0,1,2 \\
        --budget 792 --out runs/steer_finetuned
    python benchmarks/steer_finetuned.py --out runs/steer_finetuned --report   # the table of finished runs

Per seed: the shipped ``qm9-noh-small`` is fine-tuned toward QED (EDM bonds, −1 for invalid molecules)
with a setting of ``benchmarks/step_ablation.py`` until ``--budget`` training reward calls; then both
models draw ``--samples`` molecules at ``--steps`` reverse steps, plainly (no reward call), best of 2 (2
calls), with twisted SMC (K particles per sample, K·(S + 1) calls) and with SVDD-PM (M candidates per
step, M·S calls). Every sampler of a seed uses the same seed and node counts on both models, so each
pair of rows differs only in the proposal. The table gives mean ± s.e. over seeds of each run's mean
reward, reward of the valid molecules, validity and uniqueness (EDM's, among valid molecules), and the
fine-tuned model's gain over the same sampler on the pre-trained model, paired by seed.

Amortisation (N*): the fine-tuned model's plain samples cost no reward call, so against the cheapest
sampling-time method on the pre-trained model that reaches at least their reward (best-of-2, SMC or
SVDD), RGDM is cheaper in reward calls beyond N* = training calls / calls per sample of that method.

``--finetuned`` steers a checkpoint fine-tuned elsewhere instead (``{seed}`` in the path is replaced by
each seed), e.g. a model fine-tuned toward physical validity with ``benchmarks/physics.py`` and steered
toward the xTB gap. Its training calls are those of its own reward; N* is given only when that reward is
the one steered toward.

Runs write ``<out>/s<seed>.json`` and are skipped when present; ``<out>/results.md`` holds the table.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from pathlib import Path

import numpy as np
import torch

from amortisation import diversity
from step_ablation import REWARDS, add_fine_tuning_arguments, fine_tune, mean_se, training_task

SAMPLERS = ("plain", "best_of_2", "smc", "svdd")


def sample_rows(model, task, args: argparse.Namespace, seed: int) -> dict[str, dict]:
    """Plain, SMC and SVDD samples of ``model``: reward, QED of valid, validity, uniqueness, calls/sample."""
    from rgdm.distributed import generator_on, module_device
    from rgdm.sampling import smc_sample, svdd_sample
    from rgdm.training.best_of_n import best_of_n

    model.eval()
    rows = {}
    for sampler in SAMPLERS:
        generator = generator_on(module_device(model), 10_000 + seed)
        if sampler == "plain":
            cond = task.conditions(args.samples, generator)
            with torch.no_grad():
                x0 = model.sample(cond.shape, cond.node_mask, cond.context, num_steps=args.steps, generator=generator)
            scores, calls = task.score(x0, cond), 0
        elif sampler == "best_of_2":
            out = best_of_n(model, task, args.samples, 2, generator, args.steps)
            x0, cond, scores, calls = out.samples, out.conditions, out.scores, out.reward_calls
        elif sampler == "smc":
            out = smc_sample(model, task, args.samples, args.smc_k, args.smc_tau, generator, args.steps)
            x0, cond, scores, calls = out.samples, out.conditions, out.scores, out.reward_calls
        else:
            out = svdd_sample(model, task, args.samples, args.svdd_m, generator, args.steps, selection="greedy")
            x0, cond, scores, calls = out.samples, out.conditions, out.scores, out.reward_calls
        values, valid = scores.values.double().cpu().numpy(), scores.valid.cpu().numpy().astype(bool)
        rows[sampler] = {"reward": float(values.mean()),
                         "qed_valid": float(values[valid].mean()) if valid.any() else math.nan,
                         "calls_per_sample": calls / args.samples, **diversity(task, x0, cond)}
        print(f"    {sampler}: {rows[sampler]}", flush=True)
    return rows


def load_finetuned(source: str, pretrained_spec: dict) -> tuple[torch.nn.Module, dict]:
    """A checkpoint fine-tuned elsewhere (EMA weights when it kept them) and what its fine-tuning spent:
    reward calls, the reward's name and the optimizer steps."""
    from rgdm.runs import ModelSpec, load_model, resolve_checkpoint
    from rgdm.training.checkpoint import load_checkpoint

    path = resolve_checkpoint(source)
    state = load_checkpoint(path)  # checked before a model is built from it
    if ModelSpec.from_dict(state["model_spec"]).to_dict() != pretrained_spec:
        raise SystemExit(f"{path}: not a fine-tune of qm9-noh-small (its model spec differs)")
    calls = state.get("objective", {}).get("reward_calls")
    if calls is None:
        raise SystemExit(f"{path}: the checkpoint does not record its reward calls (not a fine-tuning run?)")
    reward = state["config"].get("reward", {}).get("name", "unknown")
    return load_model(path).model, {"checkpoint": str(path), "reward": reward, "reward_calls": int(calls),
                                    "iterations": int(state["step"])}


def run_seed(seed: int, args: argparse.Namespace) -> dict:
    from rgdm.rewards import make_reward
    from rgdm.runs import load_model

    loaded = load_model("qm9-noh-small")
    pretrained = copy.deepcopy(loaded.model).eval()
    torch.manual_seed(seed)
    with make_reward(REWARDS[args.reward]) as reward:
        task = training_task(loaded, reward, args, seed)
        if args.finetuned:
            setting = f"checkpoint {args.finetuned}"
            finetuned, training = load_finetuned(args.finetuned.format(seed=seed), loaded.spec.to_dict())
        else:
            setting = args.setting
            print(f"seed {seed}: fine-tuning with {args.setting!r} ...", flush=True)
            training = {**next(fine_tune(args.setting, seed, args, loaded.model, task, [args.budget])),
                        "reward": REWARDS[args.reward]["name"]}
            finetuned = loaded.model
        print(f"  {training}", flush=True)
        print("  pre-trained:", flush=True)
        before = sample_rows(pretrained, task, args, seed)
        print("  fine-tuned:", flush=True)
        after = sample_rows(finetuned, task, args, seed)
    return {"seed": seed, "setting": setting, "reward": REWARDS[args.reward]["name"], "training": training,
            "pretrained": before, "finetuned": after}


def crossover(run: dict) -> tuple[float, str] | None:
    """N* and the sampler it is measured against: the cheapest sampling-time method on the pre-trained
    model (calls per sample) whose mean reward reaches the fine-tuned model's plain samples; None when
    none does (RGDM is then ahead at every N); infinite when the pre-trained model's own samples already
    reach it (the fine-tuning bought nothing, so it never pays for itself)."""
    level = run["finetuned"]["plain"]["reward"]
    if run["pretrained"]["plain"]["reward"] >= level:
        return math.inf, "plain"
    reaching = [(row["calls_per_sample"], name) for name, row in run["pretrained"].items()
                if name != "plain" and row["reward"] >= level]
    if not reaching:
        return None
    calls, name = min(reaching)
    return run["training"]["reward_calls"] / calls, name


def star_text(star: tuple[float, str] | None) -> str:
    if star is None:
        return "none reaches it"
    if math.isinf(star[0]):
        return "never (the pre-trained model's plain samples are as good)"
    return f"{star[0]:,.0f} (vs {star[1]})"


def table(runs: list[dict]) -> str:
    lines = ["| model | sampler | reward calls per sample | reward | reward of valid | validity | uniqueness | "
             "gain over the same sampler on the pre-trained model (paired by seed) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for model in ("pretrained", "finetuned"):
        for sampler in SAMPLERS:
            rows = [r[model][sampler] for r in runs]
            label = "pre-trained" if model == "pretrained" else "RGDM fine-tuned"
            gain = (mean_se([r["finetuned"][sampler]["reward"] - r["pretrained"][sampler]["reward"] for r in runs])
                    if model == "finetuned" else "")
            lines.append(f"| {label} | {sampler} | {np.mean([r['calls_per_sample'] for r in rows]):.0f} | "
                         f"{mean_se([r['reward'] for r in rows])} | {mean_se([r['qed_valid'] for r in rows])} | "
                         f"{mean_se([r['validity'] for r in rows])} | {mean_se([r['uniqueness'] for r in rows])} | "
                         f"{gain} |")
    calls = np.mean([r["training"]["reward_calls"] for r in runs])
    trained_on = {r["training"].get("reward", r.get("reward")) for r in runs}  # older runs name neither
    steered_to = {r.get("reward") for r in runs}
    named = ", ".join(sorted(name for name in trained_on if name))
    lines.append(f"\nFine-tuning: {runs[0]['setting']!r}, {calls:,.0f} training reward calls"
                 f"{f' of {named}' if named else ''} on average, "
                 f"seeds {', '.join(str(r['seed']) for r in runs)}.")
    if trained_on != steered_to:  # calls of another reward: no break-even in calls of this one
        lines.append("N*: not defined, the model was fine-tuned on another reward than the one steered toward.")
        return "\n".join(lines)
    stars = [crossover(r) for r in runs]
    lines.append("N* (training calls / calls per sample of the cheapest pre-trained sampling-time method that "
                 "reaches the fine-tuned model's plain reward), per seed: "
                 + ", ".join(star_text(s) for s in stars) + ".")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", default="window", help="a setting of benchmarks/step_ablation.py")
    parser.add_argument("--finetuned", help="steer this fine-tuned checkpoint instead of fine-tuning ({seed} is "
                        "replaced by the seed), e.g. runs/phys_s{seed}/rgdm_reference-s{seed}")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--budget", type=int, default=792, help="training reward calls of the fine-tuning")
    add_fine_tuning_arguments(parser)  # --reward, --steps (also every sampler's), --batch, --tau, --lr, ...
    parser.add_argument("--samples", type=int, default=128, help="molecules per model and sampler")
    parser.add_argument("--smc-k", type=int, default=4)
    parser.add_argument("--smc-tau", type=float, default=0.05)
    parser.add_argument("--svdd-m", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("runs/steer_finetuned"))
    parser.add_argument("--report", action="store_true", help="only print the table of finished runs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    for seed in seeds:
        path = args.out / f"s{seed}.json"
        if not args.report and not path.exists():
            path.write_text(json.dumps(run_seed(seed, args), indent=2))
    runs = [json.loads((args.out / f"s{seed}.json").read_text()) for seed in seeds
            if (args.out / f"s{seed}.json").exists()]
    if not runs:
        raise SystemExit(f"no finished runs in {args.out}")
    text = table(runs)
    (args.out / "results.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
