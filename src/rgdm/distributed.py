"""Data-parallel training helpers: one process per device, launched by ``torchrun``.

``torchrun --nproc_per_node N -m rgdm pretrain ...`` starts N copies of the command with the
environment variables ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT`` set. ``init_from_env`` joins the process group they describe (gloo on CPU, nccl on
GPU); without them every helper here behaves as a world of one process, so the same code runs
single-process with no launcher.

How the pieces fit (see docs/scaling.md): every rank reads the *same* global batch order from the
data stream and takes its contiguous slice; each rank's loss is its share of the global mean
(sum over its samples / global batch size), so summing gradients over ranks gives exactly the
gradient of the single-process loss. Only rank 0 writes checkpoints and logs.
"""

from __future__ import annotations

import gc
import itertools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

ENV_KEYS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched_by_torchrun() -> bool:
    """True when the environment describes a process group (``torchrun`` or a test harness)."""
    return all(key in os.environ for key in ENV_KEYS) and int(os.environ["WORLD_SIZE"]) > 1


def init_from_env(device: torch.device | None = None) -> bool:
    """Join the process group the environment describes; False (and no-op) for a world of one.

    The backend follows the device: nccl for CUDA, gloo otherwise.
    """
    if is_initialized() or not launched_by_torchrun():
        return is_initialized()
    backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend)
    return True


def shutdown(synchronize: bool = True) -> None:
    """Leave the process group. On a clean exit every rank first waits for the others: a rank that
    tears gloo down while a peer still talks to it can abort with "terminate called without an
    active exception". After an error there is no waiting (the peers may never arrive)."""
    if is_initialized():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()
        gc.collect()  # a group kept alive by a reference cycle would otherwise be torn down at exit


@contextmanager
def leaving_process_group() -> Iterator[None]:
    """Run the body, then leave the process group: in step with the other ranks after a clean run,
    at once after an error."""
    try:
        yield
    except BaseException:
        shutdown(synchronize=False)
        raise
    shutdown()


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0: the one process that writes checkpoints, logs and reports."""
    return rank() == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def shard_bounds(total: int, rank_: int | None = None, world: int | None = None) -> tuple[int, int]:
    """[start, stop) of this rank's contiguous slice of ``total`` items (sizes differ by at most 1)."""
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    return total * rank_ // world, total * (rank_ + 1) // world


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over ranks in place (identity for a world of one)."""
    if is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather(tensor: Tensor) -> Tensor:
    """Concatenate every rank's ``tensor`` along dim 0, in rank order.

    Ranks may hold different numbers of rows (the other dimensions must agree): rows are padded to
    the largest count for the collective and trimmed afterwards.
    """
    if not is_initialized():
        return tensor
    if tensor.dtype == torch.bool:  # gloo has no boolean collectives
        return all_gather(tensor.to(torch.uint8)).bool()
    counts = torch.zeros(world_size(), dtype=torch.long, device=tensor.device)
    counts[rank()] = tensor.shape[0]
    all_reduce_sum(counts)
    padded = torch.zeros((int(counts.max()), *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(gathered, padded)
    return torch.cat([g[: int(n)] for g, n in zip(gathered, counts)], dim=0)


def all_gather_objects(value: Any) -> list[Any]:
    """Every rank's picklable ``value``, in rank order (``[value]`` for a world of one)."""
    if not is_initialized():
        return [value]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, value)
    return out


def broadcast_flag(flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank: collective decisions (e.g. stop on a time limit) must agree."""
    if not is_initialized():
        return flag
    value = torch.tensor([int(flag)], device=_collective_device())
    dist.broadcast(value, src=0)
    return bool(value.item())


def broadcast_parameters(model: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank (identical starting points)."""
    if not is_initialized():
        return
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=0)


def all_reduce_gradients(model: nn.Module, extra: Tensor | None = None) -> Tensor | None:
    """Sum gradients over ranks, in one flat buffer (one collective instead of one per tensor).

    Each rank's loss is its share of the global loss, so the sum is the global gradient. A rank
    whose parameter got no gradient contributes zeros (all ranks must call the collective).
    ``extra`` (e.g. the loss share) rides along in the same collective and is returned summed.
    """
    if not is_initialized():
        return extra
    params = [p for p in model.parameters() if p.requires_grad]
    parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
    if extra is not None:
        parts.append(extra.detach().reshape(-1).to(parts[0].dtype if parts else extra.dtype))
    flat = all_reduce_sum(torch.cat(parts))
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n
    return None if extra is None else flat[offset:].view_as(extra).to(extra.dtype)


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def resolve_device(name: str) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` -> this process's device (``cuda:LOCAL_RANK`` under torchrun)."""
    from rgdm.config import ConfigError

    if name not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device: {name!r} is not one of auto, cpu, cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank())


def module_device(module: nn.Module) -> torch.device:
    """The device of ``module``'s parameters (the device its inputs, noise and generators must be on)."""
    tensor = next(itertools.chain(module.parameters(), module.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def generator_on(device: torch.device | str, seed: int) -> torch.Generator:
    """A random generator seeded with ``seed`` that draws on ``device``.

    Noise must be drawn where the model runs: a CUDA tensor cannot be filled from a CPU generator.
    On the CPU this is exactly ``torch.Generator().manual_seed(seed)``, so CPU runs draw the same
    numbers as before devices were configurable (a CUDA generator draws different ones).
    """
    return torch.Generator(device=torch.device(device)).manual_seed(seed)


def seed_rank(seed: int) -> None:
    """Seed this rank's global random streams: rank 0 uses ``seed`` itself, other ranks differ.

    Per-rank streams make rank-local randomness (e.g. roll-outs) independent across ranks; what
    must agree across ranks (model initialisation, data order, pre-training noise) is seeded
    separately from the run seed alone.
    """
    import random

    import numpy as np

    rank_seed = seed + 1_000_003 * rank()
    torch.manual_seed(rank_seed)
    np.random.seed(rank_seed % 2**32)
    random.seed(rank_seed)
