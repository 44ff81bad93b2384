"""The one training loop. Objectives (MLE pre-training, RGDM, DDPO, RWR, ...) plug into it.

The loop owns what every method shares: the optimizer (AdamW), gradient clipping, the EMA copy,
logging (progress bar, CSV, TensorBoard), periodic evaluation, atomic checkpoints and exact resume.
An objective owns what differs: how a loss is computed at a step, and any state it carries
(a data stream position, reward statistics, an adaptive temperature).

Data-parallel runs (``torchrun``, see ``rgdm.distributed``) use the same loop: every rank computes
its share of the loss, gradients are summed over ranks before clipping and the optimizer step, so
all ranks take identical steps; only rank 0 writes checkpoints, metrics and the progress bar.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import errno
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from rgdm import distributed
from rgdm.config import TrainConfig
from rgdm.training.checkpoint import (
    CheckpointError,
    checkpoint_paths,
    latest_good_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    remove_stale_temp_files,
    rng_state,
    save_checkpoint,
    set_rng_state,
)

log = logging.getLogger("rgdm.training")

# A loss or gradient norm above these is almost always a run blowing up (EDM-style losses are O(1) and
# gradient norms rarely exceed 1e3): warn once per run segment, so that it does not go by unnoticed.
DIVERGING_LOSS = 1e4
DIVERGING_GRAD_NORM = 1e6

# Config keys that may differ when a run is resumed: they say how long and how verbosely to run,
# not what is computed (extending ``train.steps`` is how a finished run is continued).
RESUMABLE_CHANGES = frozenset({
    "train.steps", "train.max_minutes", "train.log_every", "train.val_every", "train.checkpoint_every",
    "train.keep_checkpoints", "train.num_threads",
})

# Options added after checkpoints existed whose earlier behaviour is not "off" (None, False, 0, ""), each
# with the value that reproduces the runs made before it: a checkpoint without the key resumes under it.
ADDED_OPTIONS = {"rgdm.sequence_draw": "batches", "rgdm.denoising_t_max": 1.0}


class Objective(Protocol):
    """What a training method provides to the loop."""

    name: str

    def loss(self, model: nn.Module, step: int) -> tuple[Tensor, dict[str, float]]:
        """Scalar loss to minimise at ``step`` and metrics to log.

        In a data-parallel run the loss is this rank's *share*: the shares of all ranks sum to the
        global loss (e.g. sum over the rank's samples / global batch size).
        """

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW with AMSGrad, as EDM trains, in its fused form: one kernel for all parameters instead
    of about ten small operations per parameter tensor, which dominate at molecule sizes."""
    return torch.optim.AdamW((p for p in model.parameters() if p.requires_grad), lr=lr,
                             weight_decay=weight_decay, amsgrad=True, fused=True)


class EMA:
    """Exponential moving average of a model's parameters (a full module, used for sampling)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        # One multi-tensor call instead of a small op per parameter (the step is op-bound at
        # molecule sizes); the same arithmetic as ``ema_p.lerp_(p, 1 - decay)`` per parameter.
        torch._foreach_lerp_(list(self.module.parameters()), [p.detach() for p in model.parameters()],
                             1.0 - self.decay)


class Anchor:
    """A pull of the weights toward where training started (L2-SP: Li, Grandvalet & Davoine, "Explicit
    inductive bias for transfer learning with convolutional networks", 2018), decoupled from the gradient
    as AdamW's weight decay is: after each optimizer step, ``theta += lr * strength * (theta_0 - theta)``.

    Why a fine-tuning run may want it: Adam moves every weight by about ``lr`` per step whatever the size
    of its gradient, so weights a reward says nothing about can wander and a converged model degrade.
    (On the physics benchmark it changed nothing for the step level: docs/physics.md.) The pull bounds
    that wandering: a weight with no consistent gradient stays within about
    ``sqrt(lr / (2 * strength))`` of its start, and one pushed the same way at every step settles
    ``1 / strength`` away from it (reached in about ``1 / (lr * strength)`` steps)."""

    def __init__(self, model: nn.Module, strength: float):
        self.strength = strength
        self.start = {name: p.detach().clone() for name, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module, lr: float) -> None:
        names, params = zip(*model.named_parameters(), strict=True)
        torch._foreach_lerp_([p.data for p in params], [self.start[n] for n in names], lr * self.strength)

    def state_dict(self) -> dict[str, Tensor]:
        return self.start

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if set(state) != set(self.start):
            raise CheckpointError("the checkpoint's anchor weights do not match the model's parameters")
        self.start = {name: tensor.to(self.start[name].device) for name, tensor in state.items()}


class MetricsLog:
    """Append-only CSV (one row per logged step, columns grow as new metrics appear) + TensorBoard."""

    def __init__(self, run_dir: Path, tensorboard: bool = True):
        self.path = run_dir / "metrics.csv"
        self.rows: list[dict[str, Any]] = []
        if self.path.exists():
            with self.path.open() as handle:
                self.rows = [dict(row) for row in csv.DictReader(handle)]
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def truncate(self, step: int) -> None:
        """Drop rows after ``step`` (a resumed run re-logs them exactly)."""
        self.rows = [r for r in self.rows if int(float(r["step"])) <= step]
        self._rewrite()

    def write(self, step: int, metrics: dict[str, float]) -> None:
        self.rows.append({"step": step, **metrics})
        self._rewrite()
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()

    def _rewrite(self) -> None:
        columns: list[str] = []
        for row in self.rows:
            columns += [k for k in row if k not in columns]
        tmp = self.path.with_suffix(".csv.tmp")
        try:
            with tmp.open("w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=columns or ["step"])
                writer.writeheader()
                writer.writerows(self.rows)
            tmp.replace(self.path)
        except OSError as err:
            # A full disk: the previous metrics.csv stays whole (written to a temp file, then renamed).
            tmp.unlink(missing_ok=True)
            reason = "no space left on device" if err.errno == errno.ENOSPC else (err.strerror or str(err))
            raise CheckpointError(f"{self.path}: metrics not written ({reason}); the checkpoints are intact, "
                                  "free some space and resume the run") from None

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class Trainer:
    """Runs ``objective`` on ``model`` for ``config.steps`` optimizer steps in ``run_dir``.

    ``run_info`` is stored in every checkpoint (the run config as a dict, the model spec) so that a
    checkpoint alone rebuilds the model. ``evaluate(ema_model, step) -> metrics`` runs every
    ``config.val_every`` steps (on rank 0 only). ``bf16_autocast`` runs the loss under bfloat16
    autocast (CUDA only; parameters, optimizer and EMA stay float32).
    """

    def __init__(self, model: nn.Module, objective: Objective, config: TrainConfig, run_dir: str | Path,
                 run_info: dict[str, Any], evaluate: Callable[[nn.Module, int], dict[str, float]] | None = None,
                 tensorboard: bool = True, progress: bool = True, bf16_autocast: bool = False):
        distributed.broadcast_parameters(model)  # identical starting point on every rank
        self.model = model
        self.objective = objective
        self.config = config
        self.run_dir = Path(run_dir)
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.run_info = run_info
        self.evaluate = evaluate
        self.tensorboard = tensorboard
        self.progress = progress
        self.bf16_autocast = bf16_autocast
        self.optimizer = make_optimizer(model, config.lr, config.weight_decay)
        self.ema = EMA(model, config.ema_decay) if config.ema_decay > 0 else None
        self.anchor = Anchor(model, config.anchor) if config.anchor > 0 else None
        self.step = 0
        self.elapsed = 0.0  # training wall time over all resumed segments
        self.warned_diverging = False

    @property
    def sampling_model(self) -> nn.Module:
        """The model to sample from: the EMA copy when there is one."""
        return self.ema.module if self.ema is not None else self.model

    # ------------------------------------------------------------------------------------- #
    def state_dict(self) -> dict[str, Any]:
        return {
            **self.run_info,
            "step": self.step,
            "elapsed_seconds": self.elapsed,
            "model": self.model.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "anchor": self.anchor.state_dict() if self.anchor is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "objective": self.objective.state_dict(),
            "rng": rng_state(),
        }

    def save(self) -> Path:
        """Write a checkpoint (rank 0; every rank must call this, it gathers their RNG states)."""
        rank_rngs = distributed.all_gather_objects(rng_state())
        path = self.checkpoint_dir / f"step_{self.step:08d}.pt"
        if distributed.is_main():
            state = self.state_dict()
            if len(rank_rngs) > 1:
                state["rank_rngs"] = rank_rngs
            save_checkpoint(state, path)
            prune_checkpoints(self.checkpoint_dir, self.config.keep_checkpoints)
        return path

    def resume(self) -> bool:
        """Continue from the newest good checkpoint of the run; False when the run has none yet.

        Corrupt or incompatible newer checkpoints are skipped (with a warning). When checkpoints
        exist but none is usable, this raises rather than start over and overwrite them.
        """
        if distributed.is_main():
            remove_stale_temp_files(self.checkpoint_dir)
        found = latest_good_checkpoint(self.checkpoint_dir)
        if found is None:
            existing = checkpoint_paths(self.checkpoint_dir)
            if existing:
                try:
                    load_checkpoint(existing[-1])
                except CheckpointError as err:
                    raise CheckpointError(f"no usable checkpoint to resume ({len(existing)} found; newest: {err}); "
                                          "nothing was overwritten") from None
            return False
        path, state = found
        changed = [k for k in _changed_keys(state.get("config") or {}, self.run_info.get("config") or {})
                   if k not in RESUMABLE_CHANGES]
        if changed:
            raise CheckpointError(f"{path}: the run was started with a different config "
                                  f"(changed: {', '.join(changed)}); use a new run name")
        self.model.load_state_dict(state["model"])
        if self.ema is not None:
            if state.get("ema") is None:
                raise CheckpointError(f"{path}: checkpoint has no EMA weights but the config enables EMA")
            self.ema.module.load_state_dict(state["ema"])
        if self.anchor is not None:
            if state.get("anchor") is None:
                raise CheckpointError(f"{path}: checkpoint has no anchor weights but the config sets train.anchor")
            self.anchor.load_state_dict(state["anchor"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.objective.load_state_dict(state["objective"])
        self._restore_rng(state, path)
        self.step = int(state["step"])
        self.elapsed = float(state.get("elapsed_seconds", 0.0))
        log.info("resumed from %s at step %d", path, self.step)
        return True

    def _restore_rng(self, state: dict[str, Any], path: Path) -> None:
        """Each rank continues its own random stream when the number of processes is unchanged."""
        rank_rngs = state.get("rank_rngs") or [state["rng"]]
        if len(rank_rngs) == distributed.world_size():
            set_rng_state(rank_rngs[distributed.rank()])
        else:
            log.warning("%s was written by %d process(es), this run has %d: random streams restart from "
                        "the per-rank seeds (pre-training data and noise do not depend on them)",
                        path, len(rank_rngs), distributed.world_size())

    # ------------------------------------------------------------------------------------- #
    def fit(self) -> dict[str, float]:
        """Train until ``config.steps`` (or ``max_minutes``); returns the last logged metrics."""
        from rgdm.runs import run_lock

        # Rank 0 writes the run directory; the lock keeps a second process from writing it at once.
        with run_lock(self.run_dir) if distributed.is_main() else contextlib.nullcontext():
            return self._fit()

    def _fit(self) -> dict[str, float]:
        cfg = self.config
        main = distributed.is_main()
        metrics_log = MetricsLog(self.run_dir, self.tensorboard) if main else None
        if metrics_log is not None:
            metrics_log.truncate(self.step)
        started = time.perf_counter()
        elapsed_before = self.elapsed
        window: dict[str, list[float]] = {}
        last: dict[str, float] = {}
        bar = None
        if self.progress and main:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, desc=self.objective.name, dynamic_ncols=True)
        try:
            while self.step < cfg.steps:
                metrics = self._train_step()
                self.step += 1
                self.elapsed = elapsed_before + time.perf_counter() - started
                for key, value in metrics.items():
                    window.setdefault(key, []).append(value)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    last = {k: sum(v) / len(v) for k, v in window.items()}
                    last["wall_seconds"] = round(self.elapsed, 3)
                    if (metrics_log is not None and self.evaluate is not None
                            and (self.step % cfg.val_every == 0 or self.step == cfg.steps)):
                        last.update(self.evaluate(self.sampling_model, self.step))
                    if metrics_log is not None:
                        metrics_log.write(self.step, last)
                    window = {}
                # Rank 0's clock decides, so that all ranks stop (and checkpoint) at the same step.
                out_of_time = cfg.max_minutes > 0 and distributed.broadcast_flag(
                    self.elapsed - elapsed_before > cfg.max_minutes * 60)
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps or out_of_time:
                    self.save()
                if out_of_time:
                    log.info("stopping at step %d: max_minutes=%s reached", self.step, cfg.max_minutes)
                    break
        finally:
            if bar is not None:
                bar.close()
            if metrics_log is not None:
                metrics_log.close()
        if main and last:  # a resumed, already finished run keeps its summary
            (self.run_dir / "last_metrics.json").write_text(json.dumps({"step": self.step, **last}, indent=2))
        return last

    def _train_step(self) -> dict[str, float]:
        self.model.train()
        device_type = next(self.model.parameters()).device.type
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.bf16_autocast):
            loss, metrics = self.objective.loss(self.model, self.step)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # One collective per step: gradients and the global loss (sum of the ranks' shares).
        # Every rank sees the same global loss, so a bad step stops all ranks together.
        global_loss = distributed.all_reduce_gradients(self.model, loss.detach().float())
        if not torch.isfinite(global_loss):
            raise FloatingPointError(f"step {self.step}: loss is {global_loss.item()} "
                                     "(lower train.lr or check the data)")
        if self.config.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
            metrics["grad_norm"] = float(grad_norm)
        self._warn_if_diverging(global_loss.item(), metrics.get("grad_norm", 0.0))
        self.optimizer.step()
        if self.anchor is not None:
            self.anchor.update(self.model, self.config.lr)
        if self.ema is not None:
            self.ema.update(self.model)
        metrics["loss"] = global_loss.item()
        return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}


    def _warn_if_diverging(self, loss: float, grad_norm: float) -> None:
        if self.warned_diverging or not (abs(loss) > DIVERGING_LOSS or grad_norm > DIVERGING_GRAD_NORM):
            return
        self.warned_diverging = True
        if distributed.is_main():
            log.warning("step %d: loss %.3g, gradient norm %.3g: training is probably diverging "
                        "(lower train.lr, check the data, or the reward's scale)", self.step + 1, loss, grad_norm)


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if key not in old and (b in (None, False, 0, "") or ADDED_OPTIONS.get(f"{prefix}{key}", ...) == b):
            continue  # an option newer than the checkpoint, set off (or as before it): how the run was made
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys
