"""What a reward-driven objective needs to know about a domain: a *task*.

A task draws the conditions of a batch of roll-outs (shape, node mask, network context, reward
targets), scores final samples with the reward, and optionally supplies a data batch for the
maximum-likelihood regulariser. Objectives (RGDM, DDPO, RWR) only talk to the diffusion model and
the task, so one objective works for molecules, point clouds and the analytic Gaussian test bed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch
from torch import Tensor


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
class Scores:
    """Rewards of final samples: values [B] (penalty where invalid), valid [B], raw property [B]."""

    values: Tensor
    valid: Tensor
    property: Tensor | None = None


class Task(Protocol):
    def conditions(self, n: int, generator: torch.Generator | None = None) -> Conditions: ...

    def score(self, x0: Tensor, conditions: Conditions) -> Scores: ...

    def data_loss(self, model: Any) -> Tensor | None:
        """Maximum-likelihood loss on a data batch (the lambda_mle regulariser), or None."""

    def stats(self) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


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

    def __init__(self, dim: int, reward, data_batch: int = 0):
        self.dim = dim
        self.reward = reward
        self.data_batch = data_batch
        self.calls = 0

    def conditions(self, n: int, generator=None) -> Conditions:
        return Conditions(shape=(n, self.dim))

    def score(self, x0: Tensor, conditions: Conditions) -> Scores:
        self.calls += x0.shape[0]
        return scores_from_result(self.reward(x0))

    def data_loss(self, model) -> Tensor | None:
        if not self.data_batch:
            return None
        return model.loss(torch.randn(self.data_batch, self.dim)).mean()

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
        from rgdm.training.mle import DataStream

        self.model = model
        self.reward = reward
        self.dataset = dataset
        self.target = target
        self.target_property = target_property
        if target == "data" and (dataset is None or target_property not in dataset.properties):
            raise ValueError("target 'data' needs a data set with the target property")
        self.stream = DataStream(dataset, mle_batch_size, seed) if mle_batch_size and dataset is not None else None

    def conditions(self, n: int, generator=None) -> Conditions:
        model = self.model
        targets = None
        if self.target == "data":
            from rgdm.data.dataset import sample_with_property

            counts, targets = sample_with_property(self.dataset, self.target_property, n, generator)
            targets = targets.float()
        else:
            counts = model.sample_node_counts(n, generator)
            if self.target is not None:
                targets = torch.full((n,), float(self.target))
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
        batch = self.decode(x0, conditions)
        return scores_from_result(self.reward(batch, conditions.targets))

    def data_loss(self, model) -> Tensor | None:
        if self.stream is None:
            return None
        return model.training_loss(self.stream.next()).mean()

    def stats(self) -> dict[str, float]:
        stats = self.reward.stats() if hasattr(self.reward, "stats") else {}
        out = {f"reward_{k}": float(v) for k, v in stats.items() if isinstance(v, (int, float))}
        if "reward_samples" in out:
            out["reward_calls"] = out["reward_samples"]
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"stream": self.stream.state_dict() if self.stream is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.stream is not None and state.get("stream") is not None:
            self.stream.load_state_dict(state["stream"])
