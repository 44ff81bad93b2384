"""Steering a point-cloud diffusion model toward a shape class: before, RGDM, DDPO, conditional.

    python benchmarks/shapes.py --target ring_knot

One run does every stage in ``--out`` (default ``runs/benchmarks/shapes``) and skips stages whose
run directory already finished (``last_metrics.json`` present), so an interrupted benchmark
continues where it stopped:

1. pre-train the unconditional model (``configs/shapes_small.yaml``) and the class-conditional
   one (``configs/shapes_cond.yaml``), ``--pretrain-minutes`` each;
2. train the PointNet classifier (``configs/shapes_classifier.yaml``), ``--classifier-minutes``;
3. fine-tune the unconditional model toward ``--target`` with the ``shape_class`` reward (the
   classifier's log-probability of the target class), once with RGDM (step-level pay-off with
   feasible shifts) and once with DDPO_IS, the same wall-time budget ``--finetune-minutes`` each;
4. sample ``--samples`` clouds from each model (unconditional before, RGDM, DDPO, conditional
   asked for the target) with the same seed and sampler, and score them against the test clouds of
   the target class: fraction classified as the target, mean target log-probability, MMD/COV/1-NNA
   with Chamfer distance (on ``--cd-points`` points per cloud) and EMD (``--emd-points``).

Outputs: ``results.md`` (the table and the command), ``results.json``, ``before_after.png``
(rows of samples per model), ``samples.pt`` (the evaluated clouds, float16), ``classifier.json``
(test accuracy).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from rgdm.config import ConfigError, load_config
from rgdm.data.shapes import subsample_points
from rgdm.distributed import generator_on, resolve_device
from rgdm.eval.shapes import evaluate_shape_samples, render_point_clouds
from rgdm.training.classifier import ClassifierConfig, load_classifier, train_classifier
from rgdm.training.finetune import finetune
from rgdm.training.pretrain import pretrain
from rgdm.training.shape_configs import ShapeFinetuneConfig, ShapeRunConfig
from rgdm.training.shapes import load_shape_model, load_shape_split

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"


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


def finetune_stage(method: str, base: Path, classifier: Path, target: str, run_dir: Path, minutes: float,
                   lr: float, device: str = "cpu") -> dict[str, float]:
    if not finished(run_dir):
        cfg = ShapeFinetuneConfig(name=run_dir.name, base=str(base), method=method, reward={
            "name": "shape_class", "model": str(classifier), "target_class": target, "backend": "inline",
            "chunk_size": 1024})
        cfg.train.steps = 100_000
        cfg.train.max_minutes = minutes
        cfg.train.lr = lr
        cfg.train.num_threads = 1
        finetune(cfg, run_dir, resume=(run_dir / "checkpoints").is_dir(), progress=False, device=device)
    return json.loads((run_dir / "last_metrics.json").read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="ring_knot", help="shape class to steer toward")
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks/shapes"))
    parser.add_argument("--pretrain-minutes", type=float, default=10.0)
    parser.add_argument("--classifier-minutes", type=float, default=3.0)
    parser.add_argument("--finetune-minutes", type=float, default=5.0)
    parser.add_argument("--lr", type=float, default=5e-4, help="fine-tuning learning rate (RGDM and DDPO)")
    parser.add_argument("--samples", type=int, default=40, help="clouds sampled per model")
    parser.add_argument("--cd-points", type=int, default=256, help="points per cloud for the CD metrics")
    parser.add_argument("--emd-points", type=int, default=128, help="points per cloud for EMD (0 = skip)")
    parser.add_argument("--seed", type=int, default=0)
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

    runs = {name: out / name for name in ("shapes_small", "shapes_cond", "classifier", "rgdm", "ddpo")}
    pretrain_stage("shapes_small.yaml", runs["shapes_small"], args.pretrain_minutes, args.device)
    pretrain_stage("shapes_cond.yaml", runs["shapes_cond"], args.pretrain_minutes, args.device)
    classifier_metrics = classifier_stage(runs["classifier"], args.classifier_minutes, args.device)
    (out / "classifier.json").write_text(json.dumps(classifier_metrics, indent=2))
    print(f"classifier test accuracy: {classifier_metrics['accuracy']:.3f}")
    training = {method: finetune_stage(method, runs["shapes_small"], runs["classifier"], args.target, runs[method],
                                       args.finetune_minutes, args.lr, args.device) for method in ("rgdm", "ddpo")}

    classifier = load_classifier(runs["classifier"])
    base = load_shape_model(runs["shapes_small"], device=device)
    data_config = base.config.data
    reference = load_shape_split(data_config, "test").of_class(args.target).points
    models = {
        "unconditional (before)": (base.model, None),
        "RGDM (shape_class)": (load_shape_model(runs["rgdm"], device=device).model, None),
        "DDPO_IS (shape_class)": (load_shape_model(runs["ddpo"], device=device).model, None),
        "class-conditional": (load_shape_model(runs["shapes_cond"], device=device).model, [args.target]),
    }
    rows, samples = [], {}
    for label, (model, classes) in models.items():
        started = time.perf_counter()
        clouds = model.generate(args.samples, classes, num_steps=base.config.diffusion.sampling_steps,
                                generator=generator_on(device, args.seed)).cpu()
        sampled = time.perf_counter() - started
        samples[label] = clouds
        generator = torch.Generator().manual_seed(args.seed)
        metrics = evaluate_shape_samples(subsample_points(clouds, args.cd_points, generator),
                                         subsample_points(reference, args.cd_points, generator),
                                         classifier, args.target, emd_points=args.emd_points, seed=args.seed)
        method = {"RGDM (shape_class)": "rgdm", "DDPO_IS (shape_class)": "ddpo"}.get(label)
        metrics["finetune_iterations"] = float(training[method]["step"]) if method else 0.0
        metrics["reward_calls"] = float(training[method].get("reward_calls", 0.0)) if method else 0.0
        metrics["finetune_seconds"] = float(training[method].get("wall_seconds", 0.0)) if method else 0.0
        metrics["sampling_seconds"] = sampled
        rows.append({"model": label, **metrics})
        print(label, json.dumps(metrics))

    # The data row: test clouds of the target class against themselves split in halves.
    half = len(reference) // 2
    generator = torch.Generator().manual_seed(args.seed)
    data_metrics = evaluate_shape_samples(subsample_points(reference[:half], args.cd_points, generator),
                                          subsample_points(reference[half:], args.cd_points, generator),
                                          classifier, args.target, emd_points=args.emd_points, seed=args.seed)
    rows.append({"model": f"test data (half vs half, {half} clouds)", **data_metrics})

    torch.save({label: clouds.half() for label, clouds in samples.items()}, out / "samples.pt")
    rendered = {label: clouds[:6] for label, clouds in samples.items()}
    rendered[f"test data ({args.target})"] = reference[:6]
    render = render_point_clouds(rendered, out / "before_after.png", title=f"samples steered toward '{args.target}'")
    if args.docs:
        args.docs.mkdir(parents=True, exist_ok=True)
        shutil.copy(render, args.docs / "shapes_before_after.png")
    command = "python " + " ".join(["benchmarks/shapes.py", *(argv if argv is not None else sys.argv[1:])])
    table = markdown(rows, args, classifier_metrics, command)
    (out / "results.md").write_text(table)
    (out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                  "classifier": classifier_metrics, "rows": rows}, indent=2))
    print(table)
    return 0


def markdown(rows: list[dict], args: argparse.Namespace, classifier: dict[str, float], command: str) -> str:
    has_emd = any("MMD-EMD" in row for row in rows)
    header = ["model", "target acc.", "target log p", "MMD-CD", "COV-CD", "1-NNA-CD"]
    header += ["MMD-EMD", "COV-EMD", "1-NNA-EMD"] if has_emd else []
    header += ["iterations", "reward calls", "fine-tune s"]
    lines = [f"Target class: **{args.target}**; {args.samples} samples per model; reference: the "
             f"{args.target} test clouds; CD on {args.cd_points} points per cloud"
             + (f", EMD on {args.emd_points}" if has_emd else "") + f". Classifier test accuracy "
             f"{classifier['accuracy']:.3f} (5 classes, chance 0.2).", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["model"], f"{row['target_accuracy']:.3f}", f"{row['target_log_prob']:.2f}",
                 f"{row['MMD-CD']:.4f}", f"{row['COV-CD']:.3f}", f"{row['1-NNA-CD']:.3f}"]
        if has_emd:
            cells += [f"{row['MMD-EMD']:.4f}", f"{row['COV-EMD']:.3f}", f"{row['1-NNA-EMD']:.3f}"]
        calls = row.get("reward_calls", 0.0)
        cells += [f"{int(row.get('finetune_iterations', 0))}" if calls else "-", f"{int(calls)}" if calls else "-",
                  f"{row.get('finetune_seconds', 0.0):.0f}" if calls else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Command: `{command}`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
