"""RGDM's reusable batches in checkpoints: the replayed exploration and the sequence level's pool.

Both are written as plain tensors, numbers, lists and dicts, so that checkpoints load with
``weights_only``, and read back into the objects the objective replays.
"""

from __future__ import annotations

from typing import Any

from rgdm.training.rgdm_exploration import Exploration
from rgdm.training.rgdm_sequence import EarlyPath, ScoredRollouts
from rgdm.training.tasks import BatchShard, Conditions

_EXPLORATION_FIELDS = ("candidates", "perturbations", "log_proposal_ratio", "values", "valid", "reward_calls",
                       "reference_mean")


def shard_to_state(shard: BatchShard) -> dict[str, Any]:
    """A batch shard as plain tensors and numbers (checkpoints load with weights_only)."""
    g = shard.global_conditions
    return {"start": shard.start, "stop": shard.stop, "shape": list(g.shape), "node_mask": g.node_mask,
            "context": g.context, "targets": g.targets}


def shard_from_state(state: dict[str, Any]) -> BatchShard:
    conditions = Conditions(tuple(state["shape"]), state["node_mask"], state["context"], state["targets"])
    return BatchShard(conditions, state["start"], state["stop"])


def replay_to_state(cached: tuple) -> dict[str, Any]:
    """A replayed exploration as plain tensors and numbers."""
    step, shard, items, metrics, early = cached
    return {"step": step, **shard_to_state(shard), "metrics": dict(metrics),
            "items": [{"z_t": z_t, "t": t_int, "s": s_int, "weights": weights,
                       **{name: getattr(exp, name) for name in _EXPLORATION_FIELDS}}
                      for z_t, t_int, s_int, exp, weights in items],
            "early": None if early is None else {"times": [list(pair) for pair in early.times], "z_t": early.z_t,
                                                 "z_s": early.z_s, "sampler_mean": early.sampler_mean,
                                                 "weights": early.weights}}


def replay_from_state(state: dict[str, Any]) -> tuple:
    shard = shard_from_state(state)
    items = [(item["z_t"], item["t"], item["s"], Exploration(**{name: item[name] for name in _EXPLORATION_FIELDS}),
              item["weights"]) for item in state["items"]]
    early = state.get("early")
    if early is not None:
        early = EarlyPath([tuple(pair) for pair in early["times"]], early["z_t"], early["z_s"], early["sampler_mean"],
                          early["weights"])
    return state["step"], shard, items, state["metrics"], early


def pool_to_state(pool: list[ScoredRollouts]) -> list[dict[str, Any]]:
    """The sequence level's pool of scored roll-outs as plain tensors and numbers."""
    return [{"step": b.step, **shard_to_state(b.shard), "x0": b.x0, "values": b.values,
             "log_ratio": b.log_ratio, "metrics": dict(b.metrics), "states": b.states,
             "grid": b.grid} for b in pool]


def pool_from_state(pool: list[dict[str, Any]]) -> list[ScoredRollouts]:
    return [ScoredRollouts(b["step"], shard_from_state(b), b["x0"], b["values"], b["log_ratio"],
                           b["metrics"], b.get("states"), b.get("grid")) for b in pool]
