"""Physical feedback: RGDM against PPO-clip and RWR with the ``physics`` reward, at equal reward calls.

    OMP_NUM_THREADS=1 python benchmarks/physics.py --seeds 0,1,2 --iterations 50

Every method starts from the shipped heavy-atom model (``qm9-noh-small``), is fine-tuned with
``rgdm finetune``'s code path (:func:`rgdm.training.finetune.finetune`) on the ``physics`` reward
(excess valence + extra fragments + capped GFN2-xTB force RMS on the hydrogen-completed geometry,
see :mod:`rgdm.rewards.physics`) and spends the same number of reward calls: ``iterations`` batches
of ``batch`` roll-outs of ``steps`` reverse steps (``rgdm_step``, the step level's default recipe,
explores batches of 4 roll-outs at about 125 calls each; it runs as many as spend about the same calls,
and the table gives the calls each method spent). All methods get the same data term
(``lambda_mle``, the denoising loss on QM9) and the same learning rate. Then ``samples`` molecules
(same seed, same sampler) are scored with

* validity (EDM: the molecule built from EDM's bonds sanitises; its largest fragment names it),
* connected validity (valid and a single fragment), single-fragment fraction,
* uniqueness (distinct / valid) and novelty (distinct valid SMILES absent from QM9's training split).

Results: ``runs/physics/<method>-s<seed>/result.json`` per run (finished runs are skipped, so an
interrupted benchmark continues; a run whose loss turns non-finite is recorded as diverged and counted,
not averaged), and ``runs/physics/results.md``: mean ± s.e. over seeds, with the
base model measured the same way. The fine-tuned checkpoints stay in each run directory.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch

METHODS = ("rgdm", "rgdm_step", "rgdm_reference", "ppo", "rwr", "ddpo", "data_only")
# The step level's default recipe spends B + B · explore_steps · K · M calls per explored batch (K calls
# instead of K · M when the explored step ends at t = 0): about 125 at B = 4, K = 8, 2 states, M = 2.
STEP_BATCH, STEP_CALLS_PER_EXPLORATION = 4, 125
METRICS = ("validity", "connected_validity", "single_fragment", "uniqueness", "novelty", "reward_mean")


def method_settings(method: str, args: argparse.Namespace) -> dict:
    """The ``rgdm finetune`` config section of each method; one reward call per roll-out for all."""
    common = {"batch_size": args.batch, "sampling_steps": args.steps, "lambda_mle": args.lambda_mle,
              "mle_batch_size": args.batch}
    sequence = {**common, "variant": "sequence", "tau": args.tau, "sequence_loss": args.sequence_loss,
                "path_steps": args.path_steps}
    if method == "rgdm":
        return {"rgdm": sequence}
    if method == "rgdm_reference":  # exact pay-off of the frozen base: pooled, replayed reference roll-outs
        return {"rgdm": {**sequence, "sequence_proposal": "reference", "sequence_pool": args.pool,
                         "sequence_replay": args.replay, "sequence_minibatch": args.minibatch,
                         "sequence_draw": args.draw}}
    if method == "rgdm_step":  # the default recipe (window, continuations, replay), at its own batch
        return {"rgdm": {**common, "variant": "step", "batch_size": STEP_BATCH, "tau": args.tau}}
    replay = {"inner_epochs": args.ppo_epochs, "minibatches": args.ppo_minibatches,
              "timestep_fraction": args.ppo_timestep_fraction}
    if method == "ppo":  # RLPF's PPO-clip: batch-normalised advantages, several updates per batch
        return {"ppo": {**common, **replay}}
    if method == "ddpo":  # DDPO_IS: the running per-target tracker instead
        return {"ddpo": {**common, **replay, "variant": "is"}}
    if method == "rwr":  # weights softmax(beta · z-scored reward), beta = 1 / tau: RGDM's temperature
        return {"rwr": {**common, "normalize_rewards": True, "beta": 1.0 / args.tau}}
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def updates_per_collection(method: str, config) -> int:
    """Optimizer steps per batch of roll-outs (PPO replays each batch several times, the step level
    each explored batch ``replay`` times)."""
    if method == "rgdm_step":
        return config.method_config.replay
    if method == "rgdm_reference":
        return config.method_config.sequence_replay
    return config.method_config.updates_per_batch if method in ("ppo", "ddpo") else 1


def collections(method: str, args: argparse.Namespace) -> int:
    """Batches of roll-outs (explorations for the step level) that spend about the same reward calls
    as ``iterations`` batches of ``batch`` single-call roll-outs."""
    budget = args.iterations * args.batch
    return max(1, round(budget / STEP_CALLS_PER_EXPLORATION)) if method == "rgdm_step" else args.iterations


def reward_config(args: argparse.Namespace) -> dict:
    return {"name": "physics", "workers": args.workers, "timeout": 60, "force_cap": args.force_cap,
            "fragment_weight": args.fragment_weight}


@functools.cache
def training_smiles() -> frozenset[str]:
    from rgdm.eval.sampling import qm9_training_smiles

    return frozenset(qm9_training_smiles())


def graph_metrics(molecules) -> dict[str, float]:
    """Connected validity (``rgdm.eval.strict``: sanitises and one fragment) and the single-fragment
    fraction, both with EDM's bonds (the validity metric's)."""
    from rdkit import Chem

    from rgdm.eval.bonds import bond_matrix, mol_from_bond_matrix
    from rgdm.eval.strict import connected_molecule

    connected = single = 0
    for symbols, positions in molecules:
        symbols = list(symbols)
        pos = np.asarray(positions.detach().cpu() if hasattr(positions, "detach") else positions, dtype=float)
        bonds = bond_matrix(symbols, pos)
        single += len(Chem.GetMolFrags(mol_from_bond_matrix(symbols, pos, bonds))) == 1
        connected += connected_molecule(symbols, pos, bonds) is not None
    return {"connected_validity": connected / len(molecules), "single_fragment": single / len(molecules)}


def evaluate(model, args: argparse.Namespace) -> dict[str, float]:
    """``args.samples`` molecules of the model, fixed seed, scored by the metrics and the reward."""
    from rgdm.eval.molecules import evaluate_molecules
    from rgdm.eval.sampling import molecule_list, sample_in_chunks
    from rgdm.rewards import make_reward

    model.eval()
    with torch.no_grad():
        molecules = molecule_list(sample_in_chunks(model, args.samples, 100, args.steps, args.eval_seed,
                                                   progress=False))
    metrics = evaluate_molecules(molecules, set(training_smiles()))
    metrics.update(graph_metrics(molecules))
    with make_reward(reward_config(args)) as reward:
        values = reward(molecules).values
    metrics["reward_mean"] = float(values.mean())
    return {k: float(v) for k, v in metrics.items()}


def evaluations(trainer, args: argparse.Namespace) -> dict:
    """The metrics of the model the run samples (the EMA one with ``--ema``); with an EMA, the raw
    weights' metrics too, under ``raw`` (same sampling seed), so one run shows what the average buys."""
    result = evaluate(trainer.sampling_model, args)
    if trainer.ema is not None:
        result["raw"] = evaluate(trainer.model, args)
    return result


def code_version() -> dict[str, str]:
    """The commit and a hash of the objectives' source at start-up (the working tree may be ahead of HEAD)."""
    import hashlib
    import inspect
    import subprocess

    from rgdm.training import ddpo, rgdm, rwr

    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    source = "".join(inspect.getsource(module) for module in (rgdm, ddpo, rwr))
    return {"git_head": head, "objectives_sha1": hashlib.sha1(source.encode()).hexdigest()[:12]}


def train_config(steps: int, seed: int, args: argparse.Namespace, log_every: int = 1):
    from rgdm.config import TrainConfig

    return TrainConfig(steps=steps, lr=args.lr, ema_decay=args.ema, anchor=args.anchor, grad_clip=1.0, seed=seed,
                       log_every=log_every, val_every=10**9, checkpoint_every=steps, num_threads=1)


def run_data_only(seed: int, args: argparse.Namespace, run_dir: Path) -> dict:
    """The control without a reward: ``iterations`` optimizer steps of the data term alone (the denoising
    loss on ``batch`` QM9 molecules; its weight λ_mle only has to be > 0, since the loss is the whole
    objective), with every method's optimizer, clip, EMA and learning rate. What it loses against the
    base is what the fine-tuning protocol itself costs."""
    from rgdm.runs import load_model, load_training_data
    from rgdm.training.loop import Trainer
    from rgdm.training.mle import DenoisingObjective
    from rgdm.training.tasks import DATA_NOISE_OFFSET

    loaded = load_model(args.base, device=args.torch_device)
    torch.manual_seed(seed)
    objective = DenoisingObjective(load_training_data(loaded.config), args.batch, seed, args.torch_device,
                                   noise_offset=DATA_NOISE_OFFSET)
    config = train_config(args.iterations, seed, args)
    run_info = {"kind": "finetune", "config": {"data_only": True}, "model_spec": loaded.spec.to_dict()}
    trainer = Trainer(loaded.model.train(), objective, config, run_dir, run_info, tensorboard=False, progress=False)
    started = time.perf_counter()
    trainer.fit()
    return {"method": "data_only", "seed": seed, "reward_calls": 0, "train_seconds": time.perf_counter() - started,
            "optimizer_steps": trainer.step, **evaluations(trainer, args)}


def run_one(method: str, seed: int, args: argparse.Namespace) -> dict:
    from rgdm.config import FinetuneConfig, from_dict, to_dict
    from rgdm.training.finetune import finetune

    run_dir = args.out / f"{method}-s{seed}"
    done = run_dir / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    if method == "data_only":
        run_dir.mkdir(parents=True, exist_ok=True)
        return save_result(run_data_only(seed, args, run_dir), done, args)
    values = to_dict(FinetuneConfig())
    values.update({"name": run_dir.name, "base": args.base, "method": "rgdm" if method.startswith("rgdm") else method,
                   "reward": reward_config(args),
                   "eval_samples": 0, **method_settings(method, args)})
    for key, value in args.set:
        section, _, field = key.partition(".")
        values.setdefault(section, {})[field] = value
    config = from_dict(FinetuneConfig, values)
    updates = updates_per_collection(method, config)
    steps = collections(method, args) * updates
    config.train = train_config(steps, seed, args, log_every=updates)
    config.validate()
    earlier_seconds = continue_run(method, seed, args, run_dir)
    started = time.perf_counter()
    try:
        trainer = finetune(config, run_dir, resume=earlier_seconds is not None, progress=False, tensorboard=False,
                           device=args.device)
    except FloatingPointError as err:  # a diverged run is a result too: kept, counted, left out of the means
        return save_result({"method": method, "seed": seed, "diverged": str(err), "config": to_dict(config)},
                           done, args)
    seconds = time.perf_counter() - started + (earlier_seconds or 0.0)
    calls, budget = trainer.objective.reward_calls, args.iterations * args.batch
    # one call per roll-out for the sequence methods; the step level's count varies with the explored steps
    if (calls != budget) if method != "rgdm_step" else not 0.85 * budget <= calls <= 1.15 * budget:
        raise RuntimeError(f"{method}: {calls} reward calls, expected {budget}")
    result = {"method": method, "seed": seed, "reward_calls": calls, "train_seconds": seconds,
              "optimizer_steps": trainer.step, **evaluations(trainer, args)}
    result["config"] = to_dict(config)
    return save_result(result, done, args)


def save_result(result: dict, path: Path, args: argparse.Namespace) -> dict:
    """Stamp ``result`` with the code version and write it as the run's finished marker."""
    result["code"] = args.code
    path.write_text(json.dumps(result, indent=2))
    return result


def run_base(args: argparse.Namespace) -> dict:
    from rgdm.runs import load_model

    path = args.out / "base" / "result.json"
    if path.exists():
        return json.loads(path.read_text())
    path.parent.mkdir(parents=True, exist_ok=True)
    model = load_model(args.base, device=args.torch_device).model
    result = {"method": "base", "reward_calls": 0, **evaluate(model, args)}
    path.write_text(json.dumps(result, indent=2))
    return result


def continue_run(method: str, seed: int, args: argparse.Namespace, run_dir: Path) -> float | None:
    """With ``--extend-from DIR``: copy DIR's finished run of ``method`` and ``seed`` (its last checkpoint,
    config and metrics) into ``run_dir``, to be resumed for the larger ``--iterations``; return its
    training seconds. A resumed run continues bit-for-bit, so it ends where a run of that length started
    afresh would. None without ``--extend-from``."""
    if args.extend_from is None:
        return None
    source = args.extend_from / run_dir.name
    finished = source / "result.json"
    if not finished.exists():
        raise SystemExit(f"--extend-from: {finished} does not exist (no finished run to extend)")
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in ("config.yaml", "metrics.csv"):
        shutil.copy2(source / name, run_dir / name)
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    from rgdm.training.checkpoint import checkpoint_paths

    newest = checkpoint_paths(source / "checkpoints")[-1]
    shutil.copy2(newest, run_dir / "checkpoints" / newest.name)
    return float(json.loads(finished.read_text())["train_seconds"])


def ship(run: str, args: argparse.Namespace, name: str = "qm9-noh-physics") -> Path:
    """Write run ``<method>-s<seed>``'s fine-tuned weights as the shipped model ``name``: the EMA weights
    when the run kept an EMA (the model its metrics were measured on), else the raw ones."""
    import rgdm
    from rgdm.runs import PRETRAINED_DIR
    from rgdm.training.checkpoint import checkpoint_paths, load_checkpoint

    run_dir = args.out / run
    result = json.loads((run_dir / "result.json").read_text())
    state = load_checkpoint(checkpoint_paths(run_dir / "checkpoints")[-1])
    base = dict(state["base_config"], name=name)
    shipped = {"format_version": state["format_version"], "rgdm_version": rgdm.__version__, "kind": "finetune",
               "config": base, "model_spec": state["model_spec"], "step": state["step"],
               "elapsed_seconds": result["train_seconds"],
               "model": state["ema"] if state.get("ema") is not None else state["model"], "ema": None,
               "finetune_config": result["config"]}
    path = PRETRAINED_DIR / f"{name}.pt"
    torch.save(shipped, path)
    return path


def config_override(text: str) -> tuple[str, object]:
    """``section.key=value`` with a YAML value, as a config file would give it."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or "." not in key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected SECTION.KEY=VALUE, e.g. rgdm.replay=8")
    return key, yaml.safe_load(value)


def mean_se(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    array = np.asarray(values)
    return f"{array.mean():.3f} ± {array.std(ddof=1) / math.sqrt(len(array)):.3f}"


def table(base: dict, results: dict[str, list[dict]]) -> str:
    header = "| method | seeds | reward calls | " + " | ".join(METRICS) + " | train min |"
    lines = [header, "|" + "---|" * (len(METRICS) + 4)]
    lines.append("| base | - | 0 | " + " | ".join(f"{base[m]:.3f}" for m in METRICS) + " | - |")
    for method, all_runs in results.items():
        runs = [r for r in all_runs if "diverged" not in r]
        label = method + (f" ({len(all_runs) - len(runs)} of {len(all_runs)} seeds diverged)"
                          if len(runs) < len(all_runs) else "")
        if not runs:
            lines.append(f"| {label} | 0 | – | " + " | ".join("–" for _ in METRICS) + " | – |")
            continue
        cells = [mean_se([r[m] for r in runs]) for m in METRICS]
        minutes = np.mean([r["train_seconds"] for r in runs]) / 60
        calls = np.mean([r["reward_calls"] for r in runs])
        lines.append(f"| {label} | {len(runs)} | {calls:,.0f} | " + " | ".join(cells)
                     + f" | {minutes:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="qm9-noh-small")
    parser.add_argument("--methods", default="rgdm,ppo,rwr")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--iterations", type=int, default=50, help="batches of roll-outs (reward calls / batch)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30, help="reverse steps of roll-outs and evaluation samples")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--ema", type=float, default=0.0,
                        help="EMA decay of the weights (0: none); the evaluation samples the EMA model")
    parser.add_argument("--anchor", type=float, default=0.0,
                        help="pull toward the base weights (train.anchor; 0: none)")
    parser.add_argument("--tau", type=float, default=0.25, help="RGDM temperature (RWR: beta = 1 / tau)")
    parser.add_argument("--lambda-mle", type=float, default=1.0, help="data term of every method")
    parser.add_argument("--sequence-loss", default="denoising", choices=("denoising", "path"),
                        help="sequence level: weighted denoising fit of x0, or the weighted path likelihood")
    parser.add_argument("--path-steps", type=int, default=0, help="path loss: random steps per trajectory (0: all)")
    parser.add_argument("--pool", type=int, default=8, help="rgdm_reference: batches weighted jointly")
    parser.add_argument("--replay", type=int, default=4, help="rgdm_reference: optimizer steps per batch")
    parser.add_argument("--minibatch", type=int, default=0,
                        help="rgdm_reference: pooled batches fitted per optimizer step (0: the whole pool)")
    parser.add_argument("--draw", default="batches", choices=("batches", "weights"),
                        help="rgdm_reference with --minibatch: draw whole batches, or samples by their weights")
    parser.add_argument("--ppo-epochs", type=int, default=2, help="PPO/DDPO passes over each batch")
    parser.add_argument("--ppo-minibatches", type=int, default=1, help="PPO/DDPO updates per pass")
    parser.add_argument("--ppo-timestep-fraction", type=float, default=0.2, help="steps of each trajectory per update")
    parser.add_argument("--force-cap", type=float, default=10.0)
    parser.add_argument("--fragment-weight", type=float, default=1.0,
                        help="physics reward: cost of each extra fragment (1: the same as one excess bond order)")
    parser.add_argument("--set", action="append", default=[], type=config_override, metavar="SECTION.KEY=VALUE",
                        help="one more fine-tuning config value for every method, e.g. rgdm.replay=8 (repeatable)")
    parser.add_argument("--workers", type=int, default=1, help="xTB worker processes")
    parser.add_argument("--samples", type=int, default=500, help="molecules per evaluation")
    parser.add_argument("--eval-seed", type=int, default=12345)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda: where the models sample and train")
    parser.add_argument("--out", type=Path, default=Path("runs/physics"))
    parser.add_argument("--extend-from", type=Path, default=None, metavar="DIR",
                        help="continue DIR's finished runs (same settings, fewer iterations) up to --iterations")
    parser.add_argument("--ship", default="", help="write run METHOD-sSEED as the shipped qm9-noh-physics model")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from rgdm.config import ConfigError
    from rgdm.distributed import resolve_device

    try:
        args.torch_device = resolve_device(args.device)  # a clear error before any run starts
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None
    if "data_only" in args.methods.split(",") and args.lambda_mle == 0:
        raise SystemExit("error: the data_only control trains the data term alone; it needs --lambda-mle > 0")
    if args.ship:
        print(f"wrote {ship(args.ship, args)}")
        return
    args.out.mkdir(parents=True, exist_ok=True)
    args.code = code_version()  # the objectives are imported here, once: later edits do not reach this run

    base = run_base(args)
    print("base", json.dumps({m: round(base[m], 4) for m in METRICS}), flush=True)
    results: dict[str, list[dict]] = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        for method in args.methods.split(","):
            result = run_one(method, seed, args)
            results.setdefault(method, []).append(result)
            if "diverged" in result:
                print(method, seed, "diverged:", result["diverged"], flush=True)
            else:
                raw = f"raw weights: validity {result['raw']['validity']:.3f}" if "raw" in result else ""
                print(method, seed, f"{result['train_seconds']:.0f}s",
                      json.dumps({m: round(result[m], 4) for m in METRICS}), raw, flush=True)
            (args.out / "results.md").write_text(table(base, results) + "\n")
    print(table(base, results))


if __name__ == "__main__":
    main()
