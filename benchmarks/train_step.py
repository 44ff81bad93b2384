#!/usr/bin/env python3
"""Training-step and sampling-step time of rgdm's molecule diffusion vs EDM's reference, side by side.

Both implementations run in this process on the *identical* QM9-shaped batch (built by the
reference script's ``qm9_like_batch``), with the same optimiser settings (AdamW, lr 1e-4, amsgrad, as
EDM trains), each in the form its own training loop uses (ours: the fused AdamW of
``rgdm.training.loop.make_optimizer``; EDM: ``torch.optim.AdamW``), and the same number of threads.
Repeats alternate between the two (ours, EDM, EDM, ours, ...) so that machine noise hits both
alike; we report medians and the ratio EDM / ours.

* training step = loss forward + backward + optimiser step on one batch;
* sampling step = one reverse step z_t -> z_s at t = T/2 (no gradients).

Peak memory is measured per implementation and phase in a child process (torch's CPU allocations
are invisible to tracemalloc, so we read the process's peak resident set size instead).

The reference is ``<repo>/../shared/reference/edm_step_time.py`` (``--edm-reference`` overrides):
it is imported, never copied. Without it only our implementation is timed.

Usage:
    python benchmarks/train_step.py [--config edm|small|both] [--repeats 3] [--threads N]
                                    [--out runs/benchmarks/train_step.json] [--no-memory] [--check]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor, nn

from rgdm.data.qm9 import ELEMENTS, ELEMENTS_NO_H
from rgdm.diffusion.com import remove_mean_with_mask
from rgdm.diffusion.molecules import MoleculeDiffusion
from rgdm.diffusion.schedule import NoiseSchedule
from rgdm.models.egnn import EGNNDynamics
from rgdm.training.loop import make_optimizer

REPO = Path(__file__).resolve().parents[1]
DEFAULT_EDM_REFERENCE = REPO.parent / "shared" / "reference" / "edm_step_time.py"
SMALL_PRESET = REPO / "configs" / "qm9_noh_small.yaml"
DEFAULT_OUT = Path("runs/benchmarks/train_step.json")

SPEEDUP_TARGET = 3.0  # EDM time / our time, for both the training and the sampling step
PARAM_TOLERANCE = 0.05  # our trainable parameter count must be within 5 % of EDM's
LEARNING_RATE = 1e-4  # EDM's QM9 setting, for both implementations
WEIGHT_DECAY = 1e-12  # EDM's


# --------------------------------------------------------------------------------------------- #
# Benchmark configurations.


@dataclass(frozen=True)
class BenchConfig:
    """One model size and batch shape, shared by both implementations."""

    name: str
    hidden_nf: int
    n_layers: int
    batch: int
    max_nodes: int  # QM9: 29 atoms with hydrogens, 9 heavy atoms without
    elements: tuple[str, ...]
    include_charges: bool
    timesteps: int
    source: str  # where the numbers come from

    @property
    def n_features(self) -> int:
        return len(self.elements) + int(self.include_charges)


def edm_config() -> BenchConfig:
    """EDM's QM9 model: 256 features, 9 layers, batch 64, QM9 with hydrogens and charges."""
    return BenchConfig("edm", hidden_nf=256, n_layers=9, batch=64, max_nodes=29, elements=ELEMENTS,
                       include_charges=True, timesteps=1000, source="EDM's QM9 configuration")


def small_config(preset: Path = SMALL_PRESET) -> BenchConfig:
    """Our small preset (QM9 without hydrogens), read from its YAML when the file exists."""
    if not preset.exists():
        return BenchConfig("small", hidden_nf=128, n_layers=6, batch=64, max_nodes=9, elements=ELEMENTS_NO_H,
                           include_charges=True, timesteps=1000,
                           source=f"built-in numbers ({preset.name} not found)")
    from rgdm.config import ConfigError, load_config

    try:
        run = load_config(preset)
    except (ConfigError, OSError) as err:
        raise SystemExit(f"{preset}: {err}") from None
    remove_h = run.data.remove_h
    return BenchConfig("small", hidden_nf=run.model.hidden_nf, n_layers=run.model.n_layers,
                       batch=run.train.batch_size, max_nodes=9 if remove_h else 29,
                       elements=ELEMENTS_NO_H if remove_h else ELEMENTS,
                       include_charges=run.diffusion.include_charges, timesteps=run.diffusion.timesteps,
                       source=str(preset.relative_to(REPO)))


def selected_configs(choice: str) -> list[BenchConfig]:
    return {"edm": [edm_config()], "small": [small_config()], "both": [edm_config(), small_config()]}[choice]


# --------------------------------------------------------------------------------------------- #
# The shared batch.


@dataclass
class SharedBatch:
    """One QM9-shaped batch in EDM's layout; ``our_state`` gives the same molecules in ours."""

    x: Tensor  # [B, N, 3] zero-CoM positions
    one_hot: Tensor  # [B, N, types]
    charges: Tensor  # [B, N, 1], or empty when charges are off
    node_mask: Tensor  # [B, N, 1]
    edge_mask: Tensor  # [B * N * N, 1], EDM's dense edge mask

    def our_state(self, norm_values: tuple[float, float, float]) -> Tensor:
        """z = [x | one_hot / 4 | charge / 10]: EDM's scaling, which EDM applies inside its model."""
        norm_x, norm_onehot, norm_charge = norm_values
        parts = [self.x / norm_x, self.one_hot / norm_onehot]
        if self.charges.numel():
            parts.append(self.charges / norm_charge)
        return torch.cat(parts, dim=-1) * self.node_mask


def load_reference(path: Path) -> ModuleType | None:
    """Import the EDM timing script as a module, or return None (with a message) if unavailable."""
    if not path.is_file():
        print(f"EDM reference not found at {path}: timing our implementation only "
              "(pass --edm-reference PATH to compare).", file=sys.stderr)
        return None
    sys.path.insert(0, str(path.parent))
    try:
        return importlib.import_module(path.stem)
    except Exception as err:  # the reference is optional: any import failure means "ours only"
        print(f"could not import the EDM reference {path}: {err!r}; timing our implementation only.",
              file=sys.stderr)
        return None


def make_batch(cfg: BenchConfig, reference: ModuleType | None, seed: int = 0) -> SharedBatch:
    generator = torch.Generator().manual_seed(seed)
    atom_types = len(cfg.elements)
    if reference is not None:
        x, h, node_mask, edge_mask = reference.qm9_like_batch(cfg.batch, cfg.max_nodes, atom_types,
                                                              cfg.include_charges, torch.device("cpu"),
                                                              generator)
        return SharedBatch(x, h["categorical"], h["integer"], node_mask, edge_mask)
    return _own_batch(cfg, generator)


def _own_batch(cfg: BenchConfig, generator: torch.Generator) -> SharedBatch:
    """A random batch when the reference is absent: sizes uniform in the upper part of [1, max_nodes]."""
    b, n, types = cfg.batch, cfg.max_nodes, len(cfg.elements)
    counts = torch.randint(max(2, (2 * n) // 3), n + 1, (b,), generator=generator)
    node_mask = (torch.arange(n)[None, :] < counts[:, None]).float().unsqueeze(-1)
    x = remove_mean_with_mask(torch.randn(b, n, 3, generator=generator), node_mask)
    kind = torch.randint(0, types, (b, n), generator=generator)
    one_hot = nn.functional.one_hot(kind, types).float() * node_mask
    charges = (kind.float() + 1).unsqueeze(-1) * node_mask if cfg.include_charges else torch.zeros(0)
    pair = node_mask * node_mask.transpose(1, 2) * (1 - torch.eye(n))
    return SharedBatch(x, one_hot, charges, node_mask, pair.reshape(b * n * n, 1))


# --------------------------------------------------------------------------------------------- #
# The two implementations behind one interface.


@dataclass
class Runner:
    """An implementation ready to time: its model and two zero-argument step functions."""

    name: str
    model: nn.Module
    train_step: Callable[[], None]
    sample_step: Callable[[], None]

    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def all_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def make_edm_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """The optimiser of EDM's training script."""
    return torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, amsgrad=True, weight_decay=WEIGHT_DECAY)


def build_ours(cfg: BenchConfig) -> MoleculeDiffusion:
    torch.manual_seed(0)
    dynamics = EGNNDynamics(in_node_nf=cfg.n_features, context_nf=0, hidden_nf=cfg.hidden_nf,
                            n_layers=cfg.n_layers, attention=True, tanh=True)
    node_count_probs = torch.ones(cfg.max_nodes + 1)  # only used to sample sizes; timing fixes them
    node_count_probs[0] = 0.0
    return MoleculeDiffusion(dynamics, NoiseSchedule(cfg.timesteps, "polynomial_2"), cfg.elements,
                             node_count_probs / node_count_probs.sum(), include_charges=cfg.include_charges)


def ours_runner(cfg: BenchConfig, batch: SharedBatch) -> Runner:
    model = build_ours(cfg)
    optimizer = make_optimizer(model, LEARNING_RATE, WEIGHT_DECAY)  # what our training loop builds
    z0 = batch.our_state(model.norm_values)
    node_mask = batch.node_mask
    # One reverse step in the middle of the chain, t = T/2 + 1 -> s = T/2, like the reference.
    s = torch.full((cfg.batch,), cfg.timesteps // 2, dtype=torch.long)
    t = s + 1
    z_t = model.sample_prior(tuple(z0.shape), node_mask)

    def train_step() -> None:
        model.train()
        loss = model.loss(z0, node_mask).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def sample_step() -> None:
        model.eval()
        with torch.no_grad():
            model.step(z_t, t, s, node_mask)

    return Runner("ours", model, train_step, sample_step)


def build_edm(reference: ModuleType, cfg: BenchConfig) -> nn.Module:
    """EDM's model exactly as the reference script's ``main()`` builds it."""
    import contextlib
    import io

    torch.manual_seed(0)
    in_node_nf = cfg.n_features
    dynamics = reference.EGNN_dynamics_QM9(
        in_node_nf=in_node_nf + 1, context_node_nf=0, n_dims=3, device=torch.device("cpu"),
        hidden_nf=cfg.hidden_nf, act_fn=torch.nn.SiLU(), n_layers=cfg.n_layers, attention=True, tanh=True,
        mode="egnn_dynamics", norm_constant=1, inv_sublayers=1, sin_embedding=False,
        normalization_factor=1, aggregation_method="sum")
    with contextlib.redirect_stdout(io.StringIO()):  # EDM prints its noise schedule
        return reference.EnVariationalDiffusion(
            dynamics=dynamics, in_node_nf=in_node_nf, n_dims=3, timesteps=cfg.timesteps,
            noise_schedule="polynomial_2", noise_precision=1e-5, loss_type="l2", norm_values=[1, 4, 10],
            include_charges=cfg.include_charges)


def edm_runner(reference: ModuleType, cfg: BenchConfig, batch: SharedBatch) -> Runner:
    model = build_edm(reference, cfg)
    optimizer = make_edm_optimizer(model)
    h = {"categorical": batch.one_hot, "integer": batch.charges}
    node_mask, edge_mask = batch.node_mask, batch.edge_mask
    s = torch.full((cfg.batch, 1), 0.5)  # EDM's times are fractions of T
    t = s + 1.0 / cfg.timesteps
    with torch.no_grad():
        z_t = model.sample_combined_position_feature_noise(cfg.batch, cfg.max_nodes, node_mask)

    def train_step() -> None:
        model.train()
        loss = model(batch.x, h, node_mask, edge_mask, None).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def sample_step() -> None:
        model.eval()
        with torch.no_grad():
            model.sample_p_zs_given_zt(s, t, z_t, node_mask, edge_mask, None)

    return Runner("edm", model, train_step, sample_step)


def make_runner(impl: str, cfg: BenchConfig, reference: ModuleType | None, batch: SharedBatch) -> Runner:
    if impl == "ours":
        return ours_runner(cfg, batch)
    if reference is None:
        raise SystemExit("the EDM implementation needs the reference script (--edm-reference)")
    return edm_runner(reference, cfg, batch)


# --------------------------------------------------------------------------------------------- #
# Timing.


def time_interleaved(steps: dict[str, Callable[[], None]], repeats: int,
                     warmup: int) -> dict[str, list[float]]:
    """Milliseconds per call of each step, alternating the order every repeat to cancel drift."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else reversed(names):
            start = time.perf_counter()
            steps[name]()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


# --------------------------------------------------------------------------------------------- #
# Peak memory, one child process per implementation and phase.


class RssMeter:
    """Resident-set-size readings of this process, in MB.

    On Linux the kernel's high-water mark (VmHWM) can be reset by writing 5 to /proc/self/clear_refs,
    so the peak of the steps alone is measurable even when imports peaked higher. (``ru_maxrss``
    cannot do that, and it even carries the *parent's* peak across fork + exec.) Elsewhere we fall
    back to ``ru_maxrss``.
    """

    STATUS = Path("/proc/self/status")
    CLEAR_REFS = Path("/proc/self/clear_refs")

    def __init__(self) -> None:
        self.linux = self.STATUS.exists() and self.CLEAR_REFS.exists()

    def _status_mb(self, field: str) -> float:
        for line in self.STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # reported in kB
        raise RuntimeError(f"{self.STATUS}: no {field} line")

    def current(self) -> float:
        return self._status_mb("VmRSS") if self.linux else self.peak()

    def peak(self) -> float:
        if self.linux:
            return self._status_mb("VmHWM")
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux

    def reset_peak(self) -> None:
        if self.linux:
            self.CLEAR_REFS.write_text("5")


def probe_memory(impl: str, phase: str, cfg: BenchConfig, reference: ModuleType | None) -> dict[str, float]:
    """Run in the child: build everything, then take the steps and report RSS figures.

    ``peak_rss_mb`` is the process's peak during the steps (model, batch and libraries included);
    ``step_rss_mb`` is how far the steps pushed it above the RSS right before them. Two training
    steps, so that the optimiser's state (allocated in the first) and the autograd graph of the
    second are alive together, as in a real training loop.
    """
    runner = make_runner(impl, cfg, reference, make_batch(cfg, reference))
    meter = RssMeter()
    before = meter.current()
    meter.reset_peak()
    for _ in range(2 if phase == "train" else 1):
        (runner.train_step if phase == "train" else runner.sample_step)()
    peak = meter.peak()
    return {"peak_rss_mb": round(peak, 1), "step_rss_mb": round(peak - before, 1)}


def measure_memory(impl: str, phase: str, args: argparse.Namespace, cfg: BenchConfig) -> dict[str, float]:
    command = [sys.executable, str(Path(__file__).resolve()), "--config", cfg.name,
               "--threads", str(args.threads), "--edm-reference", str(args.edm_reference),
               "--probe-memory", impl, "--probe-phase", phase]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"memory probe {impl}/{phase} for config {cfg.name} failed: {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------- #
# One configuration, end to end.


def benchmark_config(cfg: BenchConfig, args: argparse.Namespace, reference: ModuleType | None) -> dict:
    batch = make_batch(cfg, reference)
    impls = ["ours"] + (["edm"] if reference is not None else [])
    runners = {impl: make_runner(impl, cfg, reference, batch) for impl in impls}
    train = time_interleaved({n: r.train_step for n, r in runners.items()}, args.repeats, args.warmup)
    sample = time_interleaved({n: r.sample_step for n, r in runners.items()}, args.repeats, args.warmup)

    real_nodes = round(float(batch.node_mask.sum()) / cfg.batch, 2)
    result: dict = {"config": asdict(cfg), "real_nodes_per_molecule": real_nodes}
    for impl, runner in runners.items():
        entry = {
            "train_step_ms": round(statistics.median(train[impl]), 1),
            "sample_step_ms": round(statistics.median(sample[impl]), 1),
            "train_step_ms_all": [round(v, 1) for v in train[impl]],
            "sample_step_ms_all": [round(v, 1) for v in sample[impl]],
            "trainable_params": runner.trainable_params(),
            "all_params": runner.all_params(),
        }
        if args.memory:
            for phase in ("train", "sample"):
                probe = measure_memory(impl, phase, args, cfg)
                entry[f"{phase}_peak_rss_mb"] = probe["peak_rss_mb"]
                entry[f"{phase}_step_rss_mb"] = probe["step_rss_mb"]
        result[impl] = entry
    if "edm" in result:
        result["comparison"] = compare(result["ours"], result["edm"])
    return result


def benchmark_in_child(cfg: BenchConfig, args: argparse.Namespace) -> dict:
    """One configuration in a fresh process: after the EDM configuration's large steps, the allocator's
    state slows both implementations' small steps by up to a third in the same process."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--config", cfg.name,
                   "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--threads", str(args.threads),
                   "--edm-reference", str(args.edm_reference), "--out", str(out)]
        if not args.memory:
            command.append("--no-memory")
        done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise SystemExit(f"benchmark of config {cfg.name} failed: {last}")
        (result,) = json.loads(out.read_text())["results"]
        return result


def compare(ours: dict, edm: dict) -> dict:
    """EDM / ours for each figure, and whether the issue's targets are met."""
    ratios = {key: round(edm[key] / ours[key], 2)
              for key in ("train_step_ms", "sample_step_ms", "train_peak_rss_mb", "sample_peak_rss_mb")
              if key in ours and ours[key] > 0}
    param_ratio = ours["trainable_params"] / edm["trainable_params"]
    return {
        "edm_over_ours": ratios,
        "param_ratio_ours_over_edm": round(param_ratio, 4),
        "train_speedup_met": ratios["train_step_ms"] >= SPEEDUP_TARGET,
        "sample_speedup_met": ratios["sample_step_ms"] >= SPEEDUP_TARGET,
        "params_within_tolerance": abs(param_ratio - 1.0) <= PARAM_TOLERANCE,
    }


# --------------------------------------------------------------------------------------------- #
# Reporting.


ROWS = [  # (label, key, format)
    ("training step, median (ms)", "train_step_ms", "{:,.1f}"),
    ("sampling step, median (ms)", "sample_step_ms", "{:,.1f}"),
    ("trainable parameters", "trainable_params", "{:,}"),
    ("peak RSS, training (MB)", "train_peak_rss_mb", "{:,.0f}"),
    ("  of which the steps (MB)", "train_step_rss_mb", "{:,.0f}"),
    ("peak RSS, sampling (MB)", "sample_peak_rss_mb", "{:,.0f}"),
    ("  of which the step (MB)", "sample_step_rss_mb", "{:,.0f}"),
]


def markdown_table(result: dict) -> str:
    cfg = result["config"]
    title = (f"### `{cfg['name']}`: {cfg['hidden_nf']} features x {cfg['n_layers']} layers, "
             f"batch {cfg['batch']}, "
             f"max {cfg['max_nodes']} nodes ({result['real_nodes_per_molecule']} real on average), "
             f"{'/'.join(cfg['elements'])}{' + charge' if cfg['include_charges'] else ''}")
    has_edm = "edm" in result
    lines = [title, "", "| | ours | EDM | EDM / ours |" if has_edm else "| | ours |",
             "|---|---:|---:|---:|" if has_edm else "|---|---:|"]
    for label, key, fmt in ROWS:
        if key not in result["ours"]:
            continue
        cells = [fmt.format(result["ours"][key])]
        if has_edm:
            cells.append(fmt.format(result["edm"][key]))
            ratio = result["edm"][key] / result["ours"][key] if result["ours"][key] else float("nan")
            cells.append(f"{ratio:.2f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if has_edm:
        lines += ["", verdict_line(result["comparison"])]
    return "\n".join(lines)


def verdict_line(comparison: dict) -> str:
    ratios = comparison["edm_over_ours"]

    def mark(ok: bool) -> str:
        return "met" if ok else "MISSED"

    return (f"Targets: training >= {SPEEDUP_TARGET:g}x faster: {ratios['train_step_ms']:.2f}x "
            f"({mark(comparison['train_speedup_met'])}); sampling >= {SPEEDUP_TARGET:g}x faster: "
            f"{ratios['sample_step_ms']:.2f}x ({mark(comparison['sample_speedup_met'])}); parameters within "
            f"{PARAM_TOLERANCE:.0%}: ours/EDM = {comparison['param_ratio_ours_over_edm']:.4f} "
            f"({mark(comparison['params_within_tolerance'])}).")


def machine_info() -> dict:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "platform": platform.platform(),
            "load_average_1min": round(os.getloadavg()[0], 2)}


def warn_if_busy(threads: int) -> None:
    """Other processes on the cores distort both timings; say so rather than report quietly."""
    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"warning: 1-minute load average is {load:.1f} before starting ({os.cpu_count()} CPUs, "
              f"{threads} torch threads); timings will be noisy.", file=sys.stderr)


# --------------------------------------------------------------------------------------------- #
# Command line.


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=("edm", "small", "both"), default="both")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed steps per implementation (the median is reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per implementation first")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 keeps torch's default")
    parser.add_argument("--edm-reference", type=Path, default=DEFAULT_EDM_REFERENCE,
                        help="path to EDM's edm_step_time.py")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    parser.add_argument("--no-memory", dest="memory", action="store_false",
                        help="skip the peak-memory child processes")
    parser.add_argument("--check", action="store_true",
                        help="exit with status 1 if a target is missed or EDM's reference was not timed")
    parser.add_argument("--probe-memory", choices=("ours", "edm"), help=argparse.SUPPRESS)
    parser.add_argument("--probe-phase", choices=("train", "sample"), default="train", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.threads < 0:
        parser.error("--repeats must be >= 1, --warmup and --threads >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    reference = load_reference(args.edm_reference)

    if args.probe_memory:  # child process: one implementation, one phase, one configuration
        (cfg,) = selected_configs(args.config)
        print(json.dumps(probe_memory(args.probe_memory, args.probe_phase, cfg, reference)))
        return 0

    warn_if_busy(torch.get_num_threads())
    results = []
    configs = selected_configs(args.config)
    for cfg in configs:
        print(f"benchmarking {cfg.name} ({cfg.source}) ...", file=sys.stderr, flush=True)
        if len(configs) > 1:
            results.append(benchmark_in_child(cfg, args))
        else:
            results.append(benchmark_config(cfg, args, reference))
        print(markdown_table(results[-1]) + "\n", flush=True)

    report = {"machine": machine_info(), "repeats": args.repeats, "warmup": args.warmup,
              "edm_reference": str(args.edm_reference) if reference is not None else None, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)

    if not args.check:
        return 0
    if reference is None:  # a target relative to EDM cannot be met without timing EDM
        print("--check: the EDM reference was not timed, so the targets are not verified", file=sys.stderr)
        return 1
    comparisons = [r["comparison"] for r in results]
    missed = any(not all(v for k, v in c.items() if k.endswith("_met") or k == "params_within_tolerance")
                 for c in comparisons)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
