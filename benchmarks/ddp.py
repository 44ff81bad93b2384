"""Data-parallel speed-up on this machine: 2 processes vs 1, same global batch.

Each setting runs the same command through the real launcher
(``python -m torch.distributed.run --nproc_per_node N -m rgdm pretrain|finetune ...``) and reads
the training wall time of each step from the run's ``metrics.csv`` (start-up and data loading are
excluded; the first ``--warmup`` steps too). ``--mode pretrain`` trains a QM9 model from scratch;
``--mode finetune`` fine-tunes the shipped ``qm9-noh-small`` with sequence-level RGDM toward QED
(each iteration: roll-outs of the global batch, RDKit rewards, the weighted loss; the ranks split
roll-outs and reward calls). Settings:

  1 process  x 1 thread    the baseline the 2-process run splits
  1 process  x 2 threads   the fair single-process baseline on a 2-core machine
  2 processes x 1 thread   data-parallel (gloo, all-reduce of the gradients every step)

Usage: python benchmarks/ddp.py [--mode pretrain] [--steps 40] [--batch-size 64] [--hidden-nf 64] [--n-layers 4]
                                [--repeats 3]
       python benchmarks/ddp.py --mode finetune --steps 12 --warmup 2 --batch-size 32
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

SETTINGS = [(1, 1), (1, 2), (2, 1)]  # (processes, threads per process)


def config_for(args: argparse.Namespace, threads: int) -> dict:
    return {
        "name": "bench",
        "data": {"dataset": "qm9", "remove_h": True},
        "model": {"hidden_nf": args.hidden_nf, "n_layers": args.n_layers},
        "diffusion": {"timesteps": 500},
        "train": {"steps": args.steps, "batch_size": args.batch_size, "log_every": 1, "val_batches": 0,
                  "checkpoint_every": args.steps, "num_threads": threads, "ema_decay": 0.999},
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rgdm_arguments(args: argparse.Namespace, threads: int, workdir: str) -> list[str]:
    """The ``rgdm`` command line of one run (writing ``runs/bench`` under ``workdir``)."""
    if args.mode == "pretrain":
        Path(workdir, "bench.yaml").write_text(yaml.safe_dump(config_for(args, threads)))
        return ["pretrain", "--config", "bench.yaml", "--device", "cpu"]
    settings = {"rgdm.variant": "sequence", "rgdm.batch_size": args.batch_size, "rgdm.sampling_steps": 50,
                "rgdm.lambda_mle": 0, "train.steps": args.steps, "train.num_threads": threads,
                "train.checkpoint_every": args.steps, "eval_samples": 0}
    overrides = [part for key, value in settings.items() for part in ("--set", f"{key}={value}")]
    return ["finetune", "--from", "qm9-noh-small", "--reward", "qed", "--name", "bench", "--compare", "0",
            "--device", "cpu", *overrides]


def seconds_per_step(args: argparse.Namespace, processes: int, threads: int) -> float:
    """Mean training wall time per step after the warm-up, read from metrics.csv."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "--master_port", str(free_port()), "-m", "rgdm", *rgdm_arguments(args, threads, tmp)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        result = subprocess.run(command, cwd=tmp, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"{processes} process(es) x {threads} thread(s) failed:\n{result.stderr[-2000:]}")
        with Path(tmp, "runs", "bench", "metrics.csv").open() as handle:
            wall = {int(row["step"]): float(row["wall_seconds"]) for row in csv.DictReader(handle)}
    return (wall[args.steps] - wall[args.warmup]) / (args.steps - args.warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("pretrain", "finetune"), default="pretrain")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--hidden-nf", type=int, default=64)
    parser.add_argument("--n-layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="Runs per setting; the fastest counts.")
    parser.add_argument("--json", type=Path, help="Also write the numbers to this file.")
    args = parser.parse_args()

    # Settings take turns, so that load from other jobs hits all of them alike; the fastest repeat
    # is the best estimate of the uncontended time.
    repeats: dict[tuple[int, int], list[float]] = {setting: [] for setting in SETTINGS}
    for _ in range(args.repeats):
        for processes, threads in SETTINGS:
            repeats[(processes, threads)].append(seconds_per_step(args, processes, threads))
    timings = {setting: min(values) for setting, values in repeats.items()}
    for (processes, threads), values in repeats.items():
        print(f"{processes} process(es) x {threads} thread(s): {min(values) * 1000:8.1f} ms/step "
              f"(repeats: {', '.join(f'{v * 1000:.1f}' for v in values)})  "
              f"{args.mode}, global batch {args.batch_size}, " + (
                  f"QM9 without H, EGNN {args.n_layers}x{args.hidden_nf}" if args.mode == "pretrain"
                  else "qm9-noh-small, sequence-level RGDM, QED, 50 sampling steps"))
    versus_one_thread = timings[(1, 1)] / timings[(2, 1)]
    versus_two_threads = timings[(1, 2)] / timings[(2, 1)]
    print(f"speed-up of 2 processes: {versus_one_thread:.2f}x vs 1 process x 1 thread, "
          f"{versus_two_threads:.2f}x vs 1 process x 2 threads")
    if args.json:
        args.json.write_text(json.dumps({
            "mode": args.mode, "cpu_count": os.cpu_count(), "global_batch": args.batch_size, "steps": args.steps,
            "ms_per_step": {f"{p}x{t}": round(s * 1000, 2) for (p, t), s in timings.items()},
            "repeats_ms": {f"{p}x{t}": [round(v * 1000, 2) for v in vs] for (p, t), vs in repeats.items()},
            "load_average": os.getloadavg(),
            "speedup_vs_1x1": round(versus_one_thread, 3), "speedup_vs_1x2": round(versus_two_threads, 3),
        }, indent=2))


if __name__ == "__main__":
    main()
