"""What a reward-driven objective needs to know about a domain: a *task*.

A task draws the conditions of a batch of roll-outs (shape, node mask, network context, reward
targets), scores final samples with the reward, and optionally supplies a data batch for the
maximum-likelihood regulariser. Objectives (RGDM, DDPO, RWR) only talk to the diffusion model and
the task, so one objective works for molecules, point clouds and the analytic Gaussian test bed.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch
from torch import Tensor

from rgdm import distributed


@dataclass
class Conditions:
    """Per-sample conditions of a batch of roll-outs."""

    shape: tuple[int, ...]  # state shape [B, ...]
    node_mask: Tensor | None = None  # [B, N, 1]
    context: Tensor | None = None  # [B, C] network input (conditional models only)
    targets: Tensor | None = None  # [B] reward targets (raw property units)

    @property
    def batch_size(self) -> int:
        return self.shape[0]

    def repeat(self, k: int) -> Conditions:
        """Each sample repeated k times consecutively (for K candidates per state)."""
        rep = lambda v: None if v is None else v.repeat_interleave(k, dim=0)  # noqa: E731
        return replace(self, shape=(self.shape[0] * k, *self.shape[1:]), node_mask=rep(self.node_mask),
                       context=rep(self.context), targets=rep(self.targets))

    def select(self, index: Tensor) -> Conditions:
        sel = lambda v: None if v is None else v[index]  # noqa: E731
        return replace(self, shape=(len(index), *self.shape[1:]), node_mask=sel(self.node_mask),
                       context=sel(self.context), targets=sel(self.targets))


@dataclass
class BatchShard:
    """This rank's rows ``[start, stop)`` of a global batch of roll-outs.

    Data-parallel fine-tuning splits every global batch across ranks (``rgdm.distributed``). What
    must not depend on the split is drawn for the *global* batch from the step's shared generator
    and sliced: the conditions (node counts, targets) and every noise draw (``noise``). Each rank
    therefore computes exactly the rows a single process would compute for it, and N processes
    follow the single-process trajectory. For a world of one the shard is the whole batch and the
    draws are the ones a plain single-process run makes.
    """

    global_conditions: Conditions
    start: int
    stop: int
    conditions: Conditions = field(init=False)  # this rank's rows (padded like the global batch)

    def __post_init__(self) -> None:
        rows = torch.arange(self.start, self.stop)
        self.conditions = self.global_conditions.select(rows)

    @classmethod
    def of(cls, conditions: Conditions) -> BatchShard:
        """This process's shard of ``conditions`` (all of it outside a data-parallel run)."""
        start, stop = distributed.shard_bounds(conditions.batch_size)
        return cls(conditions, start, stop)

    @property
    def global_size(self) -> int:
        return self.global_conditions.batch_size

    def noise(self, model: Any, generator: torch.Generator | None = None, repeats: int = 1) -> Tensor:
        """Standard noise of the state space for this rank's rows, each repeated ``repeats`` times
        consecutively (candidates, probes), drawn for the global batch and sliced."""
        cond = self.global_conditions if repeats == 1 else self.global_conditions.repeat(repeats)
        device = cond.node_mask.device if cond.node_mask is not None else distributed.module_device(model)
        full = model.noise(torch.empty(cond.shape, device=device), cond.node_mask, generator)
        return full[self.start * repeats : self.stop * repeats]

    def gather(self, local: Tensor) -> Tensor:
        """The global batch's rows of a per-row tensor, in batch order (every rank gets all of them)."""
        return distributed.all_gather(local)

    def local(self, global_rows: Tensor) -> Tensor:
        """This rank's rows of a tensor over the global batch."""
        return global_rows[self.start : self.stop]


@dataclass
class Scores:
    """Rewards of final samples: values [B] (penalty where invalid), valid [B], raw property [B]."""

    values: Tensor
    valid: Tensor
    property: Tensor | None = None

    def to(self, device: torch.device | str) -> Scores:
        """The same scores on ``device`` (rewards are computed on the CPU; weights live with the model)."""
        prop = None if self.property is None else self.property.to(device)
        return Scores(self.values.to(device), self.valid.to(device), prop)

    def gathered(self, shard: BatchShard) -> Scores:
        """The scores of the whole global batch (identity outside a data-parallel run)."""
        prop = None if self.property is None else shard.gather(self.property)
        return Scores(shard.gather(self.values), shard.gather(self.valid), prop)


class Task(Protocol):
    def conditions(self, n: int, generator: torch.Generator | None = None) -> Conditions: ...

    def score(self, x0: Tensor, conditions: Conditions) -> Scores: ...

    def data_loss(self, model: Any, step: int) -> Tensor | None:
        """This rank's share of the maximum-likelihood loss on the data batch of ``step`` (the
        lambda_mle regulariser), or None. Its noise comes from ``data_generator(seed, step)``."""

    def stats(self) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


# Offsets the data term's generator from the roll-outs' (seed * 1_000_003 + step): independent streams.
DATA_NOISE_OFFSET = 2**40


def data_generator(seed: int, step: int) -> torch.Generator:
    """The generator of the lambda_mle data term at ``step`` (shared by all ranks)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step + DATA_NOISE_OFFSET)


def sharded_denoising_loss(model: Any, x: Tensor, generator: torch.Generator, context: Tensor | None = None) -> Tensor:
    """This rank's share of the mean denoising loss of a global data batch ``x`` without a node mask:
    the noise level and noise of every sample are drawn for the whole batch, then sliced.

    ``x`` and ``generator`` are the data's (the CPU's): the draws are made there, as pre-training's
    data noise is, and the rank's slice moves to the model's device."""
    size = x.shape[0]
    t = torch.randint(0, model.timesteps + 1, (size,), generator=generator)
    noise = model.noise(x, None, generator)
    start, stop = distributed.shard_bounds(size)
    device = distributed.module_device(model)
    local_context = None if context is None else context[start:stop].to(device)
    per_sample = model.loss(x[start:stop].to(device), None, local_context, t=t[start:stop].to(device),
                            noise=noise[start:stop].to(device))
    return per_sample.sum() / size


def task_stats(task: Task) -> dict[str, float]:
    """The task's counters (reward samples, failures, seconds, ...) summed over ranks, for the logs.

    ``reward_calls`` is left out: objectives count their own (the same on every rank).
    """
    stats = task.stats()
    if distributed.world_size() > 1:
        per_rank = distributed.all_gather_objects(stats)
        total = {key: float(sum(rank_stats.get(key, 0.0) for rank_stats in per_rank)) for key in stats}
        counters = getattr(task, "counters", None)
        if isinstance(counters, RewardCounters):  # rank 0 checkpoints global totals
            counters.other_ranks = {key: total[key] - stats[key] for key in total}
        stats = total
    return {key: value for key, value in stats.items() if key != "reward_calls"}


class RewardCounters:
    """A reward's counters as a run logs them: this process's live counts plus a checkpoint's.

    A resumed run builds a fresh reward object whose counters start at zero; adding the totals
    stored in the checkpoint makes metrics.csv of a resumed run continue the uninterrupted one.
    Under ``torchrun`` the logged counters are summed over ranks: rank 0 remembers the other
    ranks' part (as of the last sum), so its checkpoint holds global totals, and on resume only
    rank 0 restores them. Rates (``samples_per_second``) are recomputed from the totals.
    """

    def __init__(self, reward: Any):
        self.reward = reward
        self.restored: dict[str, float] = {}
        self.other_ranks: dict[str, float] = {}

    def live(self) -> dict[str, float]:
        """This process's counters (``reward_<name>``), including what was restored on resume."""
        stats = self.reward.stats() if hasattr(self.reward, "stats") else {}
        out = {f"reward_{key}": float(value) for key, value in stats.items()
               if isinstance(value, (int, float)) and not isinstance(value, bool)}
        return _with_rates(_added(out, self.restored))

    def state_dict(self) -> dict[str, float]:
        return _with_rates(_added(self.live(), self.other_ranks))

    def load_state_dict(self, totals: dict[str, float]) -> None:
        self.restored = {key: float(value) for key, value in totals.items()} if distributed.rank() == 0 else {}
        self.other_ranks = {}


def _added(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {key: a.get(key, 0.0) + b.get(key, 0.0) for key in (*a, *(k for k in b if k not in a))}


def _with_rates(stats: dict[str, float]) -> dict[str, float]:
    """Recompute every ``<prefix>samples_per_second`` as ``<prefix>evaluated / <prefix>seconds``."""
    rate = "samples_per_second"
    for key in stats:
        if key.endswith(rate):
            prefix = key[: -len(rate)]
            seconds = stats.get(prefix + "seconds", 0.0)
            stats[key] = stats.get(prefix + "evaluated", 0.0) / seconds if seconds > 0 else 0.0
    return stats


def scores_from_result(result: Any) -> Scores:
    """Accept a RewardResult (values, valid, info) or a plain tensor of values."""
    if isinstance(result, Tensor):
        values = result.detach().float().reshape(-1)
        return Scores(values, torch.isfinite(values))
    prop = result.info.get("property") if getattr(result, "info", None) else None
    prop = None if prop is None else torch.as_tensor(prop, dtype=torch.float32).reshape(-1)
    return Scores(result.values.detach().float().reshape(-1), result.valid.reshape(-1).bool(), prop)


class GaussianTask:
    """The analytic test bed: states in R^d, data N(0, I), any reward on vectors."""

    def __init__(self, dim: int, reward, data_batch: int = 0, seed: int = 0):
        self.dim = dim
        self.reward = reward
        self.data_batch = data_batch
        self.seed = seed
        self.calls = 0

    def conditions(self, n: int, generator=None) -> Conditions:
        return Conditions(shape=(n, self.dim))

    def score(self, x0: Tensor, conditions: Conditions) -> Scores:
        self.calls += x0.shape[0]
        return scores_from_result(self.reward(x0))

    def data_loss(self, model, step: int) -> Tensor | None:
        if not self.data_batch:
            return None
        generator = data_generator(self.seed, step)
        data = torch.randn(self.data_batch, self.dim, generator=generator)
        return sharded_denoising_loss(model, data, generator)

    def stats(self) -> dict[str, float]:
        return {"reward_calls": float(self.calls)}

    def state_dict(self) -> dict[str, Any]:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls = int(state["calls"])


class MoleculeTask:
    """Molecules: node counts (and targets) drawn from the data, rewards from the reward layer.

    target: None (plain reward maximisation), a number (every sample aims at it), or "data"
    (targets drawn jointly with node counts from the training molecules' ``target_property``, as in
    EDM's conditional protocol). A conditional model also receives the target as its context.
    """

    def __init__(self, model, reward, dataset=None, target: float | str | None = None,
                 target_property: str | None = None, mle_batch_size: int = 0, seed: int = 0):
        from rgdm.training.mle import DenoisingObjective

        self.model = model
        self.reward = reward
        self.counters = RewardCounters(reward)
        self.dataset = dataset
        self.target = target
        self.target_property = target_property
        if target == "data" and (dataset is None or target_property not in dataset.properties):
            raise ValueError("target 'data' needs a data set with the target property")
        # The data term is pre-training's objective (sharded over ranks) with its own noise stream.
        self.data_objective = (DenoisingObjective(dataset, mle_batch_size, seed, distributed.module_device(model),
                                                  noise_offset=DATA_NOISE_OFFSET)
                               if mle_batch_size and dataset is not None else None)

    def conditions(self, n: int, generator=None) -> Conditions:
        model = self.model
        targets = None
        if self.target == "data":
            from rgdm.data.dataset import sample_with_property

            counts, targets = sample_with_property(self.dataset, self.target_property, n, generator)
            targets = targets.float().to(model.node_count_probs.device)
        else:
            counts = model.sample_node_counts(n, generator)
            if self.target is not None:
                targets = torch.full((n,), float(self.target), device=model.node_count_probs.device)
        node_mask = model.mask_from_counts(counts)
        context = None
        if model.context_names:
            if targets is None or model.context_names != (self.target_property,):
                raise ValueError(f"the model is conditioned on {model.context_names}: give a target for "
                                 f"{model.context_names[0]!r}")
            context = model.normalize_context({self.target_property: targets})
        return Conditions((n, node_mask.shape[1], 3 + model.n_features), node_mask, context, targets)

    def decode(self, x0: Tensor, conditions: Conditions):
        return self.model.decode(x0, conditions.node_mask)

    def score(self, x0: Tensor, conditions: Conditions) -> Scores:
        batch = self.decode(x0, conditions).to("cpu")  # rewards read molecules on the CPU
        targets = None if conditions.targets is None else conditions.targets.cpu()
        return scores_from_result(self.reward(batch, targets)).to(x0.device)

    def data_loss(self, model, step: int) -> Tensor | None:
        if self.data_objective is None:
            return None
        return self.data_objective.loss(model, step)[0]

    def stats(self) -> dict[str, float]:
        out = self.counters.live()
        if "reward_samples" in out:
            out["reward_calls"] = out["reward_samples"]
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"stream": self.data_objective.stream.state_dict() if self.data_objective is not None else None,
                "reward_counters": self.counters.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.data_objective is not None and state.get("stream") is not None:
            self.data_objective.stream.load_state_dict(state["stream"])
        self.counters.load_state_dict(state.get("reward_counters") or {})  # absent in checkpoints before 0.2
