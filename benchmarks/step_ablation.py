"""Step-level RGDM on QM9 toward QED: ablations at equal reward calls, and the training baselines.

    OMP_NUM_THREADS=1 python benchmarks/step_ablation.py --seeds 0,1,2 --budget 792 --steps 30 \\
        --out runs/step_ablation
    python benchmarks/step_ablation.py --out runs/step_ablation --report   # the table of finished runs

Every run starts from the shipped ``qm9-noh-small`` and trains until it has spent ``--budget`` reward
calls (the iteration that crosses it finishes; the calls actually spent are reported), with the same
learning rate and data term (λ_mle) for every method. The reward is RDKit's QED of the molecule built
with EDM's bonds, −1 for invalid molecules. Then ``--eval-samples`` molecules are sampled at ``--steps``
reverse steps with one seed and node counts shared by all runs; the table gives the mean reward
(QED, −1 when invalid), the QED of the valid molecules and validity, mean ± s.e. over seeds.

Settings (``SETTINGS``): the step level as ``benchmarks/compare.py`` runs it (``shipped``: Tweedie
look-ahead, every step explored) and the molecule recipe ``window`` (explore t <= 0.3 T only, 2
stochastic continuations per candidate on the roll-outs' grid, 4 optimizer steps per explored batch)
with one change each: the shift (none / random / finite difference), the radius (in step stds, or in
noise norms σ_t·√dof), K, the window, the replay and the look-ahead. Baselines (``--baselines``):
sequence-level RGDM, RWR, DDPO_IS and PPO-clip, at ``--baseline-factor`` times the budget, evaluated
also at the budget itself: target (b) asks whether the best step-level setting reaches the best
baseline's final reward with a third of its calls.

Runs write ``<out>/<setting>-s<seed>.json`` and are skipped when present, so an interrupted
benchmark continues; ``<out>/results.json`` and ``results.md`` hold the table.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from rgdm.config import DDPOConfig, RGDMConfig, RWRConfig, TrainConfig, ppo_clip_defaults

QED = {"name": "qed", "method": "edm", "backend": "inline"}
# The demo's physics black box: GFN2-xTB HOMO-LUMO gap toward 4000 meV, −|gap − 4000| / 1000, −5 when xTB fails.
XTB_GAP = {"name": "xtb_gap", "add_hydrogens": True, "relax": "mmff", "target": 4000.0, "scale": 1000.0,
           "workers": 1, "timeout": 30, "penalty": -5.0}
REWARDS = {"qed": QED, "xtb_gap": XTB_GAP}
# Every step-level setting spends the same reward calls per exploration: B + B · explore_steps · K · M
# (+ the probes of finite differences), 132 at B = 4, so that equal budgets mean equal numbers of
# explored batches; K and the look-ahead change explore_steps to keep it so.
WINDOW = {"variant": "step", "num_candidates": 8, "explore_steps": 2, "explore_t_max": 0.3,
          "lookahead": "continuation", "lookahead_samples": 2, "lookahead_steps": 0, "shift": "random",
          "radius": 0.5, "radius_units": "std", "replay": 4}
# The step level as it was before the window (Tweedie look-ahead, the whole horizon, no replay).
SHIPPED = {"variant": "step", "num_candidates": 8, "explore_steps": 4, "lookahead": "tweedie", "explore_t_max": 1.0,
           "replay": 1, "shift": "random", "radius": 0.5, "radius_units": "std"}
SETTINGS: dict[str, dict] = {
    "shipped": SHIPPED,
    "window": WINDOW,
    "window shift=none": {**WINDOW, "shift": "none"},
    "window shift=finite_difference": {**WINDOW, "shift": "finite_difference", "num_probes": 7, "explore_steps": 1},
    "window radius=1.0": {**WINDOW, "radius": 1.0},
    "window radius=0.1 noise_norm": {**WINDOW, "radius": 0.1, "radius_units": "noise_norm"},
    "window K=4": {**WINDOW, "num_candidates": 4, "explore_steps": 4},
    "window K=16": {**WINDOW, "num_candidates": 16, "explore_steps": 1},
    "window t_max=0.15": {**WINDOW, "explore_t_max": 0.15},
    "window t_max=1": {**WINDOW, "explore_t_max": 1.0},
    "window replay=1": {**WINDOW, "replay": 1},
    "window lookahead=tweedie": {**WINDOW, "lookahead": "tweedie", "explore_steps": 4},
    "window replay=8": {**WINDOW, "replay": 8},
    "shipped replay=4": {**SHIPPED, "replay": 4},
    "window t_max=0.5": {**WINDOW, "explore_t_max": 0.5},
    "window tau=0.25": {**WINDOW, "tau": 0.25},
    # the last explored batches regressed on together: more optimizer steps per call, each on more states
    "window pool=4": {**WINDOW, "explored_pool": 4},
    "window pool=4 replay=8": {**WINDOW, "explored_pool": 4, "replay": 8},
    "window pool=2 replay=8": {**WINDOW, "explored_pool": 2, "replay": 8},
    "window pool=4 replay=16": {**WINDOW, "explored_pool": 4, "replay": 16},
    # candidates' values shrunk toward their mean by the share of their spread that is not continuation noise
    "window shrink": {**WINDOW, "value_shrinkage": True},
    "window t_max=1 shrink": {**WINDOW, "explore_t_max": 1.0, "value_shrinkage": True},
    # the exact KL of the first reverse step to the reference (no reward calls)
    "window first_step_kl=1": {**WINDOW, "first_step_kl": 1.0},
    "window t_max=1 first_step_kl=1": {**WINDOW, "explore_t_max": 1.0, "first_step_kl": 1.0},
    # the reference refreshed with the policy (each exploration then targets the last copy's pay-off),
    # alone and with the base mix that fixes where the refreshes end
    "window refresh=4": {**WINDOW, "reference_refresh": 4},
    "window refresh=4 first_step_kl=1": {**WINDOW, "reference_refresh": 4, "first_step_kl": 1.0},
    "window refresh=4 mix=0.2": {**WINDOW, "reference_refresh": 4, "reference_base_mix": 0.2},
    # ... holding the atom types near the pre-trained model's (the refreshes drift toward carbon)
    "window refresh=4 atom_type_kl=1": {**WINDOW, "reference_refresh": 4, "atom_type_kl": 1.0},
    "window refresh=4 atom_type_kl=10": {**WINDOW, "reference_refresh": 4, "atom_type_kl": 10.0},
    # one continuation per candidate, the calls spent on more explored states instead
    "window M=1": {**WINDOW, "lookahead_samples": 1, "explore_steps": 4},
    "window M=1 K=4": {**WINDOW, "lookahead_samples": 1, "num_candidates": 4, "explore_steps": 8},
}
# Sequence-level RGDM at the baselines' batch, with its weighted batches replayed for more optimizer
# steps per reward call (exact: the weights compare the pay-off with the policy that sampled them).
SEQUENCE_SETTINGS: dict[str, dict] = {
    "sequence": {"sequence_replay": 1},
    "sequence replay=2": {"sequence_replay": 2},
    "sequence replay=4": {"sequence_replay": 4},
    "sequence B=32 replay=4": {"sequence_replay": 4, "batch_size": 32},
    "sequence replay=8": {"sequence_replay": 8},
    "sequence replay=16": {"sequence_replay": 16},
    # pools weight the last batches jointly; one noise level per pooled sample keeps the cost per step
    "sequence pool=4": {"sequence_pool": 4, "denoising_repeats": 1},
    "sequence pool=4 replay=4": {"sequence_pool": 4, "sequence_replay": 4, "denoising_repeats": 1},
    "sequence pool=8 replay=2": {"sequence_pool": 8, "sequence_replay": 2, "denoising_repeats": 1},
    # roll-outs of the frozen reference: the importance ratio is exactly 1, so batches never go stale
    "sequence reference": {"sequence_proposal": "reference"},
    "sequence reference pool=8 replay=2": {"sequence_proposal": "reference", "sequence_pool": 8, "sequence_replay": 2,
                                           "denoising_repeats": 1},
    "sequence reference pool=4 replay=4": {"sequence_proposal": "reference", "sequence_pool": 4, "sequence_replay": 4,
                                           "denoising_repeats": 1},
    # the exact path likelihood on the reference's roll-outs: trains the sampler's own steps
    "sequence reference path pool=4 replay=2": {"sequence_proposal": "reference", "sequence_loss": "path",
                                                "sequence_pool": 4, "sequence_replay": 2, "path_steps": 8},
    "sequence reference path pool=4 replay=4": {"sequence_proposal": "reference", "sequence_loss": "path",
                                                "sequence_pool": 4, "sequence_replay": 4, "path_steps": 8},
    # every batch of the budget pooled (50 at 792 calls), each step fitted on 2 of them drawn at random
    "sequence reference path pool=50 minibatch=2 replay=4": {
        "sequence_proposal": "reference", "sequence_loss": "path", "sequence_pool": 50, "sequence_minibatch": 2,
        "sequence_replay": 4, "path_steps": 8},
}
BASELINES = ("rgdm_sequence", "rwr", "ddpo_is", "ppo")


def make_objective(name: str, model, task, args: argparse.Namespace, seed: int):
    """The objective of a setting or baseline; every method gets the same data term."""
    from rgdm.training.ddpo import DDPOObjective
    from rgdm.training.rgdm import RGDMObjective
    from rgdm.training.rwr import RWRObjective

    common = {"sampling_steps": args.steps, "lambda_mle": args.lambda_mle, "mle_batch_size": 32}
    if name in SETTINGS:
        config = RGDMConfig(**{"batch_size": args.batch, "tau": args.tau, **common, **SETTINGS[name]})
        return RGDMObjective(model, task, config, seed)
    if name in SEQUENCE_SETTINGS:
        config = RGDMConfig(**{"variant": "sequence", "batch_size": args.baseline_batch, "tau": args.tau, **common,
                               **SEQUENCE_SETTINGS[name]})
        return RGDMObjective(model, task, config, seed)
    if name == "rgdm_sequence":
        config = RGDMConfig(variant="sequence", batch_size=args.baseline_batch, tau=args.tau, **common)
        return RGDMObjective(model, task, config, seed)
    if name == "rwr":  # weights softmax(beta · z-scored reward), beta = 1 / tau: RGDM's temperature
        config = RWRConfig(batch_size=args.baseline_batch, normalize_rewards=True, beta=1.0 / args.tau, **common)
        return RWRObjective(model, task, config, seed)
    if name == "ddpo_is":  # benchmarks/compare.py's DDPO_IS (running per-target tracker)
        config = DDPOConfig(variant="is", batch_size=args.baseline_batch, inner_epochs=2, minibatches=2,
                            timestep_fraction=0.5, **common)
        return DDPOObjective(model, task, config, seed)
    if name == "ppo":  # RLPF's PPO-clip at its defaults (batch 32, 4 epochs of 2 minibatches, batch advantages)
        base = ppo_clip_defaults()
        config = DDPOConfig(variant="is", batch_size=base.batch_size, inner_epochs=base.inner_epochs,
                            minibatches=base.minibatches, advantage_baseline=base.advantage_baseline,
                            timestep_fraction=0.5, **common)
        return DDPOObjective(model, task, config, seed, name="ppo-clip")
    raise ValueError(f"unknown setting {name!r}")


def evaluate(model, task, args: argparse.Namespace) -> dict[str, float]:
    from rgdm.eval.compare import sample_scored

    result = sample_scored(model, task, args.eval_samples, args.steps, seed=1234, progress=False)
    reward, valid = np.asarray(result["reward"]), np.asarray(result["reward_valid"]).astype(bool)
    return {"reward": float(reward.mean()), "qed_valid": float(reward[valid].mean()) if valid.any() else math.nan,
            "validity": float(valid.mean())}


def training_task(loaded, reward, args: argparse.Namespace, seed: int):
    """The QED task of a fine-tuning run, with the data term's QM9 batches when λ_mle > 0."""
    from rgdm.runs import load_training_data
    from rgdm.training.tasks import MoleculeTask

    dataset = load_training_data(loaded.config) if args.lambda_mle > 0 else None
    return MoleculeTask(loaded.model, reward, dataset, target=REWARDS[args.reward].get("target"),
                        mle_batch_size=32 if args.lambda_mle > 0 else 0, seed=seed)


def fine_tune(name: str, seed: int, args: argparse.Namespace, model, task, limits: list[int]) -> Iterator[dict]:
    """Train ``model`` with setting or baseline ``name``; at each reward-call limit (the iteration that
    crosses it finishes, and so does a replayed batch) yield the calls, iterations and seconds so far,
    with the model in eval mode until the next limit is asked for."""
    from rgdm.training.loop import Trainer

    model.train()
    objective = make_objective(name, model, task, args, seed)
    train = TrainConfig(steps=1, lr=args.lr, ema_decay=0.0, grad_clip=1.0, log_every=10**9, val_every=10**9,
                        checkpoint_every=10**9, seed=seed)
    with _quiet_dir() as tmp:
        trainer = Trainer(model, objective, train, Path(tmp), {"config": {"setting": name}},
                          tensorboard=False, progress=False)
        started = time.perf_counter()
        for limit in limits:
            while objective.reward_calls < limit or _replaying(objective, trainer.step):
                trainer.config.steps = trainer.step + 1
                trainer.fit()
            model.eval()
            yield {"reward_calls": objective.reward_calls, "iterations": trainer.step,
                   "train_seconds": round(time.perf_counter() - started, 1)}
            model.train()


def run_one(name: str, seed: int, args: argparse.Namespace) -> dict:
    from rgdm.rewards import make_reward
    from rgdm.runs import load_model

    loaded = load_model("qm9-noh-small")
    torch.manual_seed(seed)
    budget = args.budget * (args.baseline_factor if name in BASELINES else 1)
    points = []
    with make_reward(REWARDS[args.reward]) as reward:
        task = training_task(loaded, reward, args, seed)
        for progress in fine_tune(name, seed, args, loaded.model, task, sorted({args.budget, budget})):
            points.append({**progress, **evaluate(loaded.model, task, args)})
            print(f"  {name} seed {seed}: {progress['reward_calls']} calls, {progress['iterations']} it., "
                  f"reward {points[-1]['reward']:.3f}, of valid {points[-1]['qed_valid']:.3f}, "
                  f"validity {points[-1]['validity']:.3f}", flush=True)
    return {"setting": name, "seed": seed, "points": points}


def _replaying(objective, step: int) -> bool:
    """Whether the next step would still reuse the last batch of reward calls (no new reward calls)."""
    return hasattr(objective, "replaying") and objective.replaying(step)


class _quiet_dir:
    def __enter__(self):
        import tempfile

        self._tmp = tempfile.TemporaryDirectory()
        return self._tmp.name

    def __exit__(self, *exc):
        self._tmp.cleanup()


def base_row(args: argparse.Namespace) -> dict:
    from rgdm.rewards import make_reward
    from rgdm.runs import load_model
    from rgdm.training.tasks import MoleculeTask

    model = load_model("qm9-noh-small").model.eval()
    with make_reward(REWARDS[args.reward]) as reward:
        task = MoleculeTask(model, reward, target=REWARDS[args.reward].get("target"))
        return {"points": [{"reward_calls": 0, "iterations": 0, "train_seconds": 0.0, **evaluate(model, task, args)}]}


def mean_se(values: list[float]) -> str:
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return "–"
    m = sum(values) / len(values)
    if len(values) < 2:
        return f"{m:.3f}"
    se = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1) / len(values))
    return f"{m:.3f} ± {se:.3f}"


def table(runs: dict[str, list[dict]], base: dict | None, budget: int, reward: str = "qed") -> str:
    header = ("reward (QED, −1 invalid) | QED of valid" if reward == "qed" else
              "reward (−\\|gap − 4 eV\\| in eV, −5 failed) | reward of valid")
    lines = [f"| setting | seeds | reward calls | iterations | {header} | validity | train s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    if base is not None:
        p = base["points"][0]
        lines.append(f"| base `qm9-noh-small` | – | 0 | 0 | {p['reward']:.3f} | {p['qed_valid']:.3f} | "
                     f"{p['validity']:.3f} | – |")
    for name, results in runs.items():
        for index in range(max(len(r["points"]) for r in results)):
            points = [r["points"][index] for r in results if len(r["points"]) > index]
            calls = sum(p["reward_calls"] for p in points) / len(points)
            label = name if calls <= budget * 1.5 else f"{name} (×{round(calls / budget)} budget)"
            iterations = sum(p["iterations"] for p in points) / len(points)
            lines.append(
                f"| {label} | {len(points)} | {calls:,.0f} | {iterations:.0f} | "
                f"{mean_se([p['reward'] for p in points])} | {mean_se([p['qed_valid'] for p in points])} | "
                f"{mean_se([p['validity'] for p in points])} | "
                f"{sum(p['train_seconds'] for p in points) / len(points):.0f} |")
    return "\n".join(lines)


def add_fine_tuning_arguments(parser: argparse.ArgumentParser) -> None:
    """The options ``fine_tune`` and ``make_objective`` read (shared with ``steer_finetuned.py``)."""
    parser.add_argument("--reward", choices=sorted(REWARDS), default="qed")
    parser.add_argument("--steps", type=int, default=30, help="reverse steps of roll-outs and evaluation samples")
    parser.add_argument("--batch", type=int, default=4, help="roll-outs per step-level exploration")
    parser.add_argument("--baseline-batch", type=int, default=16, help="roll-outs per sequence-level iteration")
    parser.add_argument("--tau", type=float, default=0.5, help="temperature in reward standard deviations")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--lambda-mle", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--budget", type=int, default=792, help="reward calls per step-level run")
    parser.add_argument("--baseline-factor", type=int, default=3, help="baselines get this many times the budget")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated setting names "
                        "(step level: SETTINGS; sequence level: SEQUENCE_SETTINGS)")
    parser.add_argument("--baselines", default=",".join(BASELINES), help="comma-separated, or empty")
    add_fine_tuning_arguments(parser)
    parser.add_argument("--eval-samples", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path("runs/step_ablation"))
    parser.add_argument("--report", action="store_true", help="only print the table of finished runs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    names = [n for n in args.settings.split(",") if n] + [n for n in args.baselines.split(",") if n]
    base_path = args.out / "base.json"
    if not args.report:
        if not base_path.exists():
            base_path.write_text(json.dumps(base_row(args), indent=2))
        for name in names:
            for seed in seeds:
                path = args.out / f"{name.replace(' ', '_').replace('=', '')}-s{seed}.json"
                if path.exists():
                    continue
                print(f"{name}, seed {seed} ...", flush=True)
                path.write_text(json.dumps(run_one(name, seed, args), indent=2))
    runs: dict[str, list[dict]] = {}
    for name in names:
        for seed in seeds:
            path = args.out / f"{name.replace(' ', '_').replace('=', '')}-s{seed}.json"
            if path.exists():
                runs.setdefault(name, []).append(json.loads(path.read_text()))
    base = json.loads(base_path.read_text()) if base_path.exists() else None
    text = table(runs, base, args.budget, args.reward)
    (args.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                       "base": base, "runs": runs}, indent=2))
    (args.out / "results.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
