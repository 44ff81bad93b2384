#!/usr/bin/env python3
"""GPU check in one run: step time of ours vs EDM's reference, a timed pre-training of EDM's QM9
configuration with the validity of its samples, and a short fine-tuning on the same device.

1. **Step time.** For each batch size (default 64 and 256) and precision (fp32; bf16 on CUDA), our
   EGNN diffusion and EDM's reference (``/work/shared/reference/edm_step_time.py``, imported
   through ``benchmarks/train_step.py``, never copied) are built at EDM's QM9 size (256 x 9, with
   hydrogens) on the *identical* batch and timed in alternation (``train_step.time_interleaved``):
   training step = loss forward + backward + AdamW step (the same AdamW for both); sampling step = one reverse step at
   t = T/2. bf16 means autocast around the forward, as ``rgdm pretrain --device cuda`` runs it.
   On CUDA every timed call ends with ``torch.cuda.synchronize()``. Without the reference only our
   side is timed and the EDM columns say so.
2. **Pre-training.** ``configs/qm9_edm.yaml`` trained with ``rgdm.training.pretrain`` for
   ``--minutes`` of training time on ``--device``, then ``--samples`` molecules sampled with
   ``--sample-steps`` DDIM steps and scored with EDM's metrics (validity, atom/molecule stability).
3. **Fine-tuning.** ``--finetune-steps`` RGDM iterations of that model on the device (reward:
   RDKit validity, in the training process): the device path of roll-outs, generators and rewards.
   A failure is recorded in the JSON and makes the script exit with status 1.

The default run fits in about 10 minutes on one H100 (timing ~1 min, pre-training 5 min, sampling
and fine-tuning ~1 min, QM9 parsing on a fresh machine ~10 s):

    python benchmarks/gpu.py --device cuda --out runs/benchmarks/gpu.json

On the CPU the same code runs with tiny settings (the test does this):

    python benchmarks/gpu.py --device cpu --batches 2 --minutes 0.05 --repeats 1 --samples 4 \\
        --sample-steps 2 --pretrain-batch 4 --finetune-steps 1 --finetune-batch 2 --finetune-sampling-steps 2
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from rgdm import distributed

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import (  # noqa: E402 - benchmarks/ is not a package
    DEFAULT_EDM_REFERENCE,
    LEARNING_RATE,
    BenchConfig,
    SharedBatch,
    build_ours,
    edm_config,
    load_reference,
    make_batch,
    time_interleaved,
)

REPO = Path(__file__).resolve().parents[1]
EDM_PRESET = REPO / "configs" / "qm9_edm.yaml"
DEFAULT_OUT = Path("runs/benchmarks/gpu.json")


# --------------------------------------------------------------------------------------------- #
# Step time on a device.


def batch_on(batch: SharedBatch, device: torch.device) -> SharedBatch:
    """The same molecules on ``device`` (the batch is always built on the CPU, so it is identical)."""
    return SharedBatch(batch.x.to(device), batch.one_hot.to(device), batch.charges.to(device),
                       batch.node_mask.to(device), batch.edge_mask.to(device))


def build_edm_on(reference: ModuleType, cfg: BenchConfig, device: torch.device) -> nn.Module:
    """EDM's model as ``train_step.build_edm`` builds it, with its dynamics told the device (EDM
    builds its edge lists on ``dynamics.device``, so moving the module alone is not enough)."""
    torch.manual_seed(0)
    dynamics = reference.EGNN_dynamics_QM9(
        in_node_nf=cfg.n_features + 1, context_node_nf=0, n_dims=3, device=device,
        hidden_nf=cfg.hidden_nf, act_fn=torch.nn.SiLU(), n_layers=cfg.n_layers, attention=True, tanh=True,
        mode="egnn_dynamics", norm_constant=1, inv_sublayers=1, sin_embedding=False,
        normalization_factor=1, aggregation_method="sum")
    with contextlib.redirect_stdout(io.StringIO()):  # EDM prints its noise schedule
        model = reference.EnVariationalDiffusion(
            dynamics=dynamics, in_node_nf=cfg.n_features, n_dims=3, timesteps=cfg.timesteps,
            noise_schedule="polynomial_2", noise_precision=1e-5, loss_type="l2", norm_values=[1, 4, 10],
            include_charges=cfg.include_charges)
    return model.to(device)


def adamw(model: nn.Module) -> torch.optim.Optimizer:
    """One optimiser for both sides: EDM's AdamW (lr 1e-4, amsgrad, weight decay 1e-12)."""
    return torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, amsgrad=True, weight_decay=1e-12)


def precision_context(device: torch.device, precision: str) -> Callable[[], contextlib.AbstractContextManager]:
    """bf16: autocast around the forward (CUDA only in rgdm); fp32: nothing."""
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def synchronised(step: Callable[[], None], device: torch.device) -> Callable[[], None]:
    """The step, waiting for the GPU to finish it (CUDA calls return before the work is done)."""
    if device.type != "cuda":
        return step

    def run() -> None:
        step()
        torch.cuda.synchronize(device)

    return run


def our_steps(cfg: BenchConfig, batch: SharedBatch, device: torch.device,
              precision: str) -> tuple[nn.Module, Callable[[], None], Callable[[], None]]:
    model = build_ours(cfg).to(device)
    optimizer = adamw(model)
    autocast = precision_context(device, precision)
    z0 = batch.our_state(model.norm_values)
    s = torch.full((cfg.batch,), cfg.timesteps // 2, dtype=torch.long, device=device)
    t = s + 1
    z_t = model.sample_prior(tuple(z0.shape), batch.node_mask)

    def train_step() -> None:
        model.train()
        with autocast():
            loss = model.loss(z0, batch.node_mask).float().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def sample_step() -> None:
        model.eval()
        with torch.no_grad(), autocast():
            model.step(z_t, t, s, batch.node_mask)

    return model, train_step, sample_step


def edm_steps(reference: ModuleType, cfg: BenchConfig, batch: SharedBatch, device: torch.device,
              precision: str) -> tuple[nn.Module, Callable[[], None], Callable[[], None]]:
    model = build_edm_on(reference, cfg, device)
    optimizer = adamw(model)
    autocast = precision_context(device, precision)
    h = {"categorical": batch.one_hot, "integer": batch.charges}
    s = torch.full((cfg.batch, 1), 0.5, device=device)  # EDM's times are fractions of T
    t = s + 1.0 / cfg.timesteps
    with torch.no_grad():
        z_t = model.sample_combined_position_feature_noise(cfg.batch, cfg.max_nodes, batch.node_mask)

    def train_step() -> None:
        model.train()
        with autocast():
            loss = model(batch.x, h, batch.node_mask, batch.edge_mask, None).float().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def sample_step() -> None:
        model.eval()
        with torch.no_grad(), autocast():
            model.sample_p_zs_given_zt(s, t, z_t, batch.node_mask, batch.edge_mask, None)

    return model, train_step, sample_step


def time_steps(cfg: BenchConfig, device: torch.device, precision: str, reference: ModuleType | None,
               repeats: int, warmup: int) -> dict:
    """Median milliseconds of the training and sampling step, ours and (if available) EDM's."""
    batch = batch_on(make_batch(cfg, reference), device)
    steps: dict[str, Callable[[], None]] = {}
    _, train, sample = our_steps(cfg, batch, device, precision)
    steps |= {"ours_train": synchronised(train, device), "ours_sample": synchronised(sample, device)}
    row: dict = {"batch": cfg.batch, "precision": precision}
    if reference is not None:
        _, train, sample = edm_steps(reference, cfg, batch, device, precision)
        steps |= {"edm_train": synchronised(train, device), "edm_sample": synchronised(sample, device)}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = time_interleaved(steps, repeats, warmup)
    row |= {f"{name}_ms": round(statistics.median(values), 3) for name, values in times.items()}
    if reference is not None:
        row["train_speedup"] = round(row["edm_train_ms"] / row["ours_train_ms"], 2)
        row["sample_speedup"] = round(row["edm_sample_ms"] / row["ours_sample_ms"], 2)
    if device.type == "cuda":
        row["peak_memory_gb_both"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
    return row


# --------------------------------------------------------------------------------------------- #
# Pre-training for a fixed time, then sampling; a short fine-tuning on the same device.


def pretrain_for(minutes: float, device: str, out_dir: Path, samples: int, sample_steps: int,
                 batch_size: int | None, seed: int = 0) -> dict:
    from rgdm.config import load_config
    from rgdm.eval.sampling import sample_and_evaluate
    from rgdm.training.pretrain import pretrain

    overrides = {"name": "gpu-check", "train.max_minutes": minutes, "train.steps": 10**9,
                 "train.checkpoint_every": 10**9, "train.val_batches": 0, "train.log_every": 50,
                 "train.seed": seed}
    if batch_size:
        overrides["train.batch_size"] = batch_size
    cfg = load_config(EDM_PRESET, overrides=overrides)
    started = time.perf_counter()
    trainer = pretrain(cfg, out_dir / "pretrain", progress=False, tensorboard=False, device=device)
    train_seconds = trainer.elapsed
    metrics = sample_and_evaluate(trainer.sampling_model, samples, out_dir / "samples", num_steps=sample_steps,
                                  seed=seed, progress=False)
    keep = ("validity", "uniqueness", "atom_stability", "molecule_stability", "sampling_seconds")
    return {"config": str(EDM_PRESET.relative_to(REPO)), "batch_size": cfg.train.batch_size,
            "minutes": minutes, "steps": trainer.step, "train_seconds": round(train_seconds, 1),
            "steps_per_second": round(trainer.step / max(train_seconds, 1e-9), 2),
            "ema": cfg.train.ema_decay > 0, "samples": samples, "sample_steps": sample_steps,
            **{key: metrics[key] for key in keep if key in metrics},
            "wall_seconds": round(time.perf_counter() - started, 1), "run_dir": str(out_dir / "pretrain")}


def finetune_on(base: Path, steps: int, device: str, out_dir: Path, batch_size: int = 8,
                sampling_steps: int = 20) -> dict:
    from rgdm.config import FinetuneConfig, RGDMConfig, TrainConfig
    from rgdm.training.finetune import finetune

    config = FinetuneConfig(
        name="gpu-check-finetune", base=str(base), method="rgdm",
        reward={"name": "validity", "backend": "inline"},
        rgdm=RGDMConfig(batch_size=batch_size, sampling_steps=sampling_steps, num_candidates=4, explore_steps=2),
        train=TrainConfig(steps=steps, lr=1e-5, ema_decay=0.0, log_every=1, val_every=10**6,
                          checkpoint_every=10**6),
        eval_samples=0,
    ).validate()
    started = time.perf_counter()
    trainer = finetune(config, out_dir / "finetune", progress=False, tensorboard=False, device=device)
    seconds = time.perf_counter() - started
    last = json.loads((out_dir / "finetune" / "last_metrics.json").read_text())
    return {"steps": trainer.step, "seconds_per_iteration": round(seconds / max(trainer.step, 1), 2),
            "reward_mean": last.get("reward_mean"), "device": str(distributed.module_device(trainer.model))}


# --------------------------------------------------------------------------------------------- #


def markdown(result: dict) -> str:
    edm = result["edm_reference"] is not None
    lines = [f"device: {result['device']} ({result['device_name']}); EDM side: "
             + ("EDM's reference implementation" if edm else "absent (ours only)"),
             "", "| batch | precision | ours train ms | EDM train ms | train EDM/ours | ours sample ms | "
             "EDM sample ms | sample EDM/ours |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for row in result["step_time"]:
        if "skipped" in row:
            lines.append(f"| {row['batch']} | {row['precision']} | {row['skipped']} | | | | | |")
            continue
        cells = [str(row.get(key, "–")) for key in ("ours_train_ms", "edm_train_ms", "train_speedup",
                                                    "ours_sample_ms", "edm_sample_ms", "sample_speedup")]
        lines.append(f"| {row['batch']} | {row['precision']} | " + " | ".join(cells) + " |")
    pre = result.get("pretrain")
    if pre and "error" not in pre:
        lines += ["", f"pre-training {pre['config']}: {pre['steps']} steps of batch {pre['batch_size']} in "
                  f"{pre['train_seconds']} s ({pre['steps_per_second']} steps/s); {pre['samples']} samples "
                  f"({pre['sample_steps']} steps): validity {pre.get('validity')}, "
                  f"molecule stability {pre.get('molecule_stability')}"]
    for part in ("pretrain", "finetune"):
        if result.get(part) and "error" in result[part]:
            lines.append(f"{part}: FAILED: {result[part]['error']}")
    if result.get("finetune") and "error" not in result["finetune"]:
        ft = result["finetune"]
        lines.append(f"fine-tuning on {ft['device']}: {ft['steps']} RGDM iterations, "
                     f"{ft['seconds_per_iteration']} s each")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--batches", default="64,256", help="comma-separated batch sizes of the step timing")
    parser.add_argument("--precisions", default="fp32,bf16", help="fp32 and/or bf16 (bf16: CUDA only)")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per step and implementation")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls first")
    parser.add_argument("--minutes", type=float, default=5.0, help="pre-training time (training loop only)")
    parser.add_argument("--pretrain-batch", type=int, default=0, help="pre-training batch (0: the config's, 64)")
    parser.add_argument("--samples", type=int, default=200, help="molecules sampled after pre-training")
    parser.add_argument("--sample-steps", type=int, default=100, help="DDIM steps of those samples")
    parser.add_argument("--finetune-steps", type=int, default=3, help="RGDM iterations on the device (0: none)")
    parser.add_argument("--finetune-batch", type=int, default=8, help="roll-outs per RGDM iteration")
    parser.add_argument("--finetune-sampling-steps", type=int, default=20, help="reverse steps of a roll-out")
    parser.add_argument("--edm-reference", type=Path, default=DEFAULT_EDM_REFERENCE)
    parser.add_argument("--work-dir", type=Path, default=None, help="run directories (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from rgdm.config import ConfigError

    try:
        device = distributed.resolve_device(args.device)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    reference = load_reference(args.edm_reference)
    result: dict = {"device": str(device),
                    "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
                    "torch": torch.__version__, "edm_reference": str(args.edm_reference) if reference else None,
                    "model": "EDM's QM9 size: EGNN 256 x 9, with hydrogens (29 atoms), 1000 steps",
                    "step_time": []}
    for batch_size in (int(b) for b in args.batches.split(",")):
        for precision in args.precisions.split(","):
            if precision == "bf16" and device.type != "cuda":
                result["step_time"].append({"batch": batch_size, "precision": precision,
                                            "skipped": "bf16 autocast is used on CUDA only"})
                continue
            cfg = replace(edm_config(), batch=batch_size)
            result["step_time"].append(time_steps(cfg, device, precision, reference, args.repeats, args.warmup))
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or Path(tmp)
        try:
            result["pretrain"] = pretrain_for(args.minutes, args.device, work, args.samples, args.sample_steps,
                                              args.pretrain_batch or None)
        except Exception as err:  # recorded and reported: the JSON says what failed on the device
            result["pretrain"], failed = {"error": f"{type(err).__name__}: {err}",
                                          "traceback": traceback.format_exc()}, True
        if args.finetune_steps and not failed:
            try:
                result["finetune"] = finetune_on(work / "pretrain", args.finetune_steps, args.device, work,
                                                 args.finetune_batch, args.finetune_sampling_steps)
            except Exception as err:
                result["finetune"], failed = {"error": f"{type(err).__name__}: {err}",
                                              "traceback": traceback.format_exc()}, True
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(markdown(result))
    print(f"results in {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
