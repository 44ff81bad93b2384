"""Steering a point-cloud diffusion model toward a shape class: before, RGDM, DDPO, conditional.

    python benchmarks/shapes.py --target ring_knot --seeds 0 1 2 --reward-calls 544

One run does every stage in ``--out`` (default ``runs/benchmarks/shapes``) and skips stages whose
run directory already finished, and evaluations already written (``eval/*.json``), so an
interrupted benchmark continues where it stopped, and seeds can run in separate processes
(``--seeds 0`` and ``--seeds 1 2`` at once, then all seeds to write the table):

1. pre-train the unconditional model (``configs/shapes_small.yaml``) and the class-conditional
   one (``configs/shapes_cond.yaml``), ``--pretrain-minutes`` each;
2. train the PointNet classifier (``configs/shapes_classifier.yaml``), ``--classifier-minutes``;
3. the base models against the test clouds of *all* classes (``rgdm.eval.shapes.base_model_quality``):
   1-NNA / COV / MMD with Chamfer distance, and the class-conditional model's per-class accuracy;
4. for every seed, fine-tune the unconditional model toward ``--target`` with the ``shape_class``
   reward (the classifier's log-probability of the target class), with RGDM (step-level pay-off
   with feasible shifts) and with DDPO_IS, each to the same number of reward calls
   (``--reward-calls``: one iteration is run first to measure its calls, then the run resumes to
   ``ceil(budget / calls per iteration)`` iterations);
5. for every seed, sample ``--samples`` clouds from each model (unconditional before, RGDM, DDPO,
   conditional asked for the target; sampling seed = the seed) and score them against the test
   clouds of the target class: fraction classified as the target, mean target log-probability,
   MMD/COV/1-NNA with Chamfer distance (on ``--cd-points`` points per cloud), EMD optional.

Outputs: ``results.md`` (the tables, mean +- standard error over seeds, and the command),
``results.json``, ``before_after.png`` (rows of samples per model, first seed), ``classifier.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

import torch

from rgdm.config import ConfigError, load_config
from rgdm.data.shapes import subsample_points
from rgdm.distributed import generator_on, resolve_device
from rgdm.eval.shapes import base_model_quality, evaluate_shape_samples, render_point_clouds
from rgdm.training.classifier import ClassifierConfig, load_classifier, train_classifier
from rgdm.training.finetune import finetune
from rgdm.training.pretrain import pretrain
from rgdm.training.shape_configs import ShapeFinetuneConfig, ShapeRunConfig
from rgdm.training.shapes import load_shape_model, load_shape_split

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
MODELS = {"before": "unconditional (before)", "rgdm": "RGDM (shape_class)", "ddpo": "DDPO_IS (shape_class)",
          "cond": "class-conditional"}


def finished(run_dir: Path) -> bool:
    return (run_dir / "last_metrics.json").is_file()


def pretrain_stage(config_name: str, run_dir: Path, minutes: float, device: str = "cpu") -> None:
    if finished(run_dir):
        print(f"[skip] {run_dir} already trained")
        return
    overrides = {"name": run_dir.name, "train.max_minutes": minutes, "train.num_threads": 1}
    cfg = load_config(CONFIGS / config_name, ShapeRunConfig, overrides)
    pretrain(cfg, run_dir, resume=(run_dir / "checkpoints").is_dir(), progress=False, device=device)


def classifier_stage(run_dir: Path, minutes: float, device: str = "cpu") -> dict[str, float]:
    if not finished(run_dir):
        overrides = {"name": run_dir.name, "train.max_minutes": minutes, "train.num_threads": 1}
        cfg = load_config(CONFIGS / "shapes_classifier.yaml", ClassifierConfig, overrides)
        train_classifier(cfg, run_dir, resume=(run_dir / "checkpoints").is_dir(), progress=False, device=device)
    return json.loads((run_dir / "test_metrics.json").read_text())


def finetune_stage(method: str, base: Path, classifier: Path, target: str, run_dir: Path, reward_calls: int,
                   lr: float, seed: int, device: str = "cpu") -> dict[str, float]:
    """Fine-tune until ``reward_calls`` reward calls: one iteration measures the calls per iteration."""
    def run(steps: int) -> dict[str, float]:
        cfg = ShapeFinetuneConfig(name=run_dir.name, base=str(base), method=method, reward={
            "name": "shape_class", "model": str(classifier), "target_class": target, "backend": "inline",
            "chunk_size": 1024})
        cfg.train.steps, cfg.train.lr, cfg.train.seed, cfg.train.num_threads = steps, lr, seed, 1
        cfg.train.checkpoint_every = 5
        finetune(cfg, run_dir, resume=(run_dir / "checkpoints").is_dir(), progress=False, tensorboard=False,
                 device=device)
        return json.loads((run_dir / "last_metrics.json").read_text())

    metrics = json.loads((run_dir / "last_metrics.json").read_text()) if finished(run_dir) else run(1)
    if metrics["reward_calls"] < reward_calls:
        per_iteration = metrics["reward_calls"] / metrics["step"]
        metrics = run(math.ceil(reward_calls / per_iteration))
    return metrics


def evaluate_stage(label: str, model, classes, reference, classifier, args, seed: int, out: Path) -> dict:
    """Sample ``args.samples`` clouds (sampling seed ``seed``) and score them; cached in ``out``."""
    metrics_path, samples_path = out / f"{label}-seed{seed}.json", out / f"{label}-seed{seed}.pt"
    if metrics_path.is_file() and samples_path.is_file():
        return json.loads(metrics_path.read_text())
    device = next(model.parameters()).device
    clouds = model.generate(args.samples, classes, num_steps=args.sampling_steps,
                            generator=generator_on(device, seed)).cpu()
    generator = torch.Generator().manual_seed(seed)
    metrics = evaluate_shape_samples(subsample_points(clouds, args.cd_points, generator),
                                     subsample_points(reference, args.cd_points, generator),
                                     classifier, args.target, emd_points=args.emd_points, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(clouds.half(), samples_path)
    metrics_path.write_text(json.dumps(metrics, indent=2))
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="ring_knot", help="shape class to steer toward")
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks/shapes"))
    parser.add_argument("--pretrain-minutes", type=float, default=45.0)
    parser.add_argument("--classifier-minutes", type=float, default=3.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="fine-tuning and sampling seeds")
    parser.add_argument("--methods", nargs="+", choices=("rgdm", "ddpo"), default=["rgdm", "ddpo"],
                        help="fine-tuning methods of this invocation (the table lists the ones run)")
    parser.add_argument("--reward-calls", type=int, default=544,
                        help="reward calls per fine-tuning run (544 = 4 RGDM iterations of 136 = 34 DDPO ones of 16)")
    parser.add_argument("--lr", type=float, default=2e-4, help="fine-tuning learning rate (RGDM and DDPO)")
    parser.add_argument("--samples", type=int, default=40, help="clouds sampled per model and seed")
    parser.add_argument("--sampling-steps", type=int, default=50, help="reverse steps of every evaluated sample")
    parser.add_argument("--cd-points", type=int, default=256, help="points per cloud for the CD metrics")
    parser.add_argument("--emd-points", type=int, default=0, help="points per cloud for EMD (0 = skip)")
    parser.add_argument("--skip-base", action="store_true", help="skip stage 3 (the base models on all classes)")
    parser.add_argument("--base-only", action="store_true", help="stop after stage 3")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda: where the models train and sample")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs", help="where shapes_before_after.png goes")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    try:
        device = resolve_device(args.device)
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join(["benchmarks/shapes.py", *(argv if argv is not None else sys.argv[1:])])

    runs = {name: out / name for name in ("shapes_small", "shapes_cond", "classifier")}
    pretrain_stage("shapes_small.yaml", runs["shapes_small"], args.pretrain_minutes, args.device)
    pretrain_stage("shapes_cond.yaml", runs["shapes_cond"], args.pretrain_minutes, args.device)
    classifier_metrics = classifier_stage(runs["classifier"], args.classifier_minutes, args.device)
    (out / "classifier.json").write_text(json.dumps(classifier_metrics, indent=2))
    print(f"classifier test accuracy: {classifier_metrics['accuracy']:.3f}")
    classifier = load_classifier(runs["classifier"])
    base = load_shape_model(runs["shapes_small"], device=device)
    conditional = load_shape_model(runs["shapes_cond"], device=device)

    if not args.skip_base:
        base_quality(base, conditional, classifier, args, out, command)
    if args.base_only:
        return 0

    reference = load_shape_split(base.config.data, "test").of_class(args.target).points
    labels = ["before", *args.methods, "cond"]
    rows: dict[str, list[dict]] = {label: [] for label in labels}
    for seed in args.seeds:
        for method in args.methods:
            run_dir = out / f"{method}-seed{seed}"
            training = finetune_stage(method, runs["shapes_small"], runs["classifier"], args.target, run_dir,
                                      args.reward_calls, args.lr, seed, args.device)
            model = load_shape_model(run_dir, device=device).model
            metrics = evaluate_stage(method, model, None, reference, classifier, args, seed, out / "eval")
            metrics.update({"iterations": training["step"], "reward_calls": training["reward_calls"],
                            "finetune_seconds": training.get("wall_seconds", 0.0)})
            rows[method].append(metrics)
        rows["before"].append(evaluate_stage("before", base.model, None, reference, classifier, args, seed,
                                             out / "eval"))
        rows["cond"].append(evaluate_stage("cond", conditional.model, [args.target], reference, classifier, args,
                                           seed, out / "eval"))
        print(f"seed {seed}:", json.dumps({label: rows[label][-1] for label in labels}))

    first = args.seeds[0]
    rendered = {MODELS[label]: torch.load(out / "eval" / f"{label}-seed{first}.pt")[:6].float() for label in labels}
    rendered[f"test data ({args.target})"] = reference[:6]
    render = render_point_clouds(rendered, out / "before_after.png", title=f"samples steered toward '{args.target}'")
    if args.docs and len(args.methods) == 2:
        args.docs.mkdir(parents=True, exist_ok=True)
        shutil.copy(render, args.docs / "shapes_before_after.png")
    table = steering_markdown(rows, args, classifier_metrics, command)
    (out / "results.md").write_text(table)
    (out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                  "classifier": classifier_metrics, "rows": rows}, indent=2))
    print(table)
    return 0


def base_quality(base, conditional, classifier, args, out: Path, command: str) -> dict:
    """Stage 3: both base models against the test clouds of all classes (cached in base_quality.json)."""
    path = out / "base_quality.json"
    if path.is_file():
        return json.loads(path.read_text())
    test = load_shape_split(base.config.data, "test")
    results = {}
    for label, loaded in (("unconditional", base), ("class-conditional", conditional)):
        metrics, clouds = base_model_quality(loaded.model, test, classifier, args.cd_points, seed=args.seeds[0],
                                             num_steps=args.sampling_steps)
        metrics["training_steps"] = float(loaded.step)
        results[label] = metrics
        torch.save(clouds.half(), out / f"base_{label}.pt")
        print(label, json.dumps(metrics))
    path.write_text(json.dumps(results, indent=2))
    (out / "base_quality.md").write_text(base_markdown(results, test.class_names, command))
    # Renders: unconditional samples, then per class the conditional samples above the test clouds.
    rows = {"unconditional": torch.load(out / "base_unconditional.pt")[:6].float()}
    conditional_clouds, start = torch.load(out / "base_class-conditional.pt").float(), 0
    for name, count in test.class_counts().items():
        rows[f"cond. {name}"] = conditional_clouds[start:start + 6]
        rows[f"test {name}"] = test.of_class(name).points[:6]
        start += count
    render = render_point_clouds(rows, out / "base_samples.png", title="pre-trained models and test clouds")
    if args.docs:
        shutil.copy(render, args.docs / "shapes_base_samples.png")
    return results


def base_markdown(results: dict, class_names: tuple[str, ...], command: str) -> str:
    first = next(iter(results.values()))
    lines = [f"Against all {int(first['n_reference'])} test clouds ({', '.join(class_names)}); "
             f"{int(first['n_generated'])} samples per model; CD on the evaluated points.", "",
             "| model | steps | 1-NNA-CD | COV-CD | MMD-CD | cond. accuracy | "
             + " | ".join(class_names) + " |", "|" + "---|" * (6 + len(class_names))]
    for label, m in results.items():
        accuracy = f"{m['accuracy']:.3f}" if "accuracy" in m else "-"
        per_class = [f"{m[f'accuracy/{name}']:.3f}" if f"accuracy/{name}" in m
                     else f"({m[f'class_fraction/{name}']:.3f})" for name in class_names]
        lines.append(f"| {label} | {int(m['training_steps'])} | {m['1-NNA-CD']:.3f} | {m['COV-CD']:.3f} | "
                     f"{m['MMD-CD']:.4f} | {accuracy} | " + " | ".join(per_class) + " |")
    lines += ["", "Per-class columns: accuracy of the clouds asked for that class (conditional); in parentheses,",
              "the share of unconditional samples the classifier assigns to the class.", "",
              f"Command: `{command}`", ""]
    return "\n".join(lines)


def mean_se(values: list[float], digits: int = 3) -> str:
    """Mean and standard error of the mean over seeds (the mean alone for one seed)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return f"{mean:.{digits}f}"
    se = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)
    return f"{mean:.{digits}f} ± {se:.{digits}f}"


def steering_markdown(rows: dict[str, list[dict]], args: argparse.Namespace, classifier: dict[str, float],
                      command: str) -> str:
    columns = [("target acc.", "target_accuracy"), ("target log p", "target_log_prob"), ("MMD-CD", "MMD-CD"),
               ("COV-CD", "COV-CD"), ("1-NNA-CD", "1-NNA-CD")]
    if args.emd_points:
        columns += [("MMD-EMD", "MMD-EMD"), ("COV-EMD", "COV-EMD"), ("1-NNA-EMD", "1-NNA-EMD")]
    training = [("iterations", "iterations"), ("reward calls", "reward_calls"), ("fine-tune s", "finetune_seconds")]
    header = ["model", *(name for name, _ in columns + training)]
    lines = [f"Target class: **{args.target}**; seeds {', '.join(map(str, args.seeds))} (mean ± s.e.); "
             f"{args.samples} samples per model and seed ({args.sampling_steps} reverse steps); reference: the "
             f"{args.target} test clouds; CD on {args.cd_points} points per cloud. Fine-tuning budget: "
             f"{args.reward_calls} reward calls per run. Classifier test accuracy {classifier['accuracy']:.3f}.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, entries in rows.items():
        cells = [MODELS[label], *(mean_se([e[key] for e in entries]) for _, key in columns)]
        trained = all(key in e for e in entries for _, key in training)
        cells += [mean_se([e[key] for e in entries], digits=0) if trained else "-" for _, key in training]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Command: `{command}`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
