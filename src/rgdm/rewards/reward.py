"""Rewards on batches: caching, fault isolation, statistics, and compositions.

A :class:`Reward` maps a batch of samples (and optional per-sample targets) to a
:class:`RewardResult`: ``values`` [B], ``valid`` [B] and ``info``. Samples the reward cannot score
(the scorer raised, returned NaN/inf, hung past ``timeout``, killed its worker, or judged the sample
invalid) get ``valid = False`` and ``value = penalty``; the run goes on. ``info["property"]`` holds
the raw property (NaN where invalid) so a trainer can log the property's error to its target.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from abc import ABC, abstractmethod
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor

from rgdm.rewards.execution import (
    BACKENDS,
    INLINE_TIMEOUT_MESSAGE,
    Backend,
    TaskFailure,
    make_backend,
    run_isolated,
)
from rgdm.rewards.molecule import Molecule, as_molecules
from rgdm.rewards.scoring import (
    CRASH,
    ERROR,
    INVALID,
    NONFINITE,
    OK,
    TIMEOUT,
    BatchFunction,
    Outcome,
    PerMolecule,
    Scorer,
)

logger = logging.getLogger("rgdm.rewards")

DEFAULT_PENALTY = -1.0
DEFAULT_TIMEOUT = 60.0
_MAX_LOGGED_REASONS = 50  # distinct failure reasons logged at WARNING per reward; the rest at DEBUG


def default_workers() -> int:
    """One worker per core, leaving one core to the training process."""
    return max(1, (os.cpu_count() or 2) - 1)


@dataclass
class RewardResult:
    """values [B] float (``penalty`` where invalid), valid [B] bool, info (``property`` [B], ...)."""

    values: Tensor
    valid: Tensor
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.values)


@dataclass
class RewardStats:
    """Counters since construction. ``samples`` = evaluated + cache hits."""

    calls: int = 0
    samples: int = 0
    evaluated: int = 0
    cache_hits: int = 0
    invalid: int = 0
    errors: int = 0
    nonfinite: int = 0
    timeouts: int = 0
    crashes: int = 0
    seconds: float = 0.0

    _FIELD_OF_KIND = {INVALID: "invalid", ERROR: "errors", NONFINITE: "nonfinite", TIMEOUT: "timeouts",
                      CRASH: "crashes"}

    def count_failure(self, kind: str) -> None:
        name = self._FIELD_OF_KIND[kind]
        setattr(self, name, getattr(self, name) + 1)

    @property
    def failures(self) -> int:
        """Samples without a value for any reason (invalid verdicts and faults)."""
        return self.invalid + self.errors + self.nonfinite + self.timeouts + self.crashes

    def as_dict(self) -> dict[str, float]:
        out: dict[str, float] = {f.name: getattr(self, f.name) for f in fields(self)}
        out["failures"] = self.failures
        out["samples_per_second"] = self.evaluated / self.seconds if self.seconds > 0 else 0.0
        return out


class Reward(ABC):
    """A reward on batches. Call it; read :meth:`stats`; :meth:`close` it (or use ``with``)."""

    name: str
    penalty: float

    @abstractmethod
    def __call__(self, samples: Any, targets: Any = None) -> RewardResult:
        """Score a MoleculeBatch or a list of Molecules; ``targets``: None, a number, or [B]."""

    @abstractmethod
    def stats(self) -> dict[str, float]:
        """Counters for the trainer's logs (calls, samples, failures by kind, seconds, ...)."""

    @abstractmethod
    def close(self) -> None:
        """Stop worker processes (if any)."""

    def __enter__(self) -> Reward:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def targets_as_list(targets: Any, batch_size: int) -> list[float | None]:
    """None, a number, or a [B] sequence/tensor of targets -> a list of B floats (or Nones)."""
    if targets is None:
        return [None] * batch_size
    if isinstance(targets, Tensor):
        targets = targets.detach().cpu().reshape(-1).tolist() if targets.dim() else float(targets)
    if isinstance(targets, (int, float)):
        return [float(targets)] * batch_size
    values = [float(t) for t in targets]
    if len(values) != batch_size:
        raise ValueError(f"got {len(values)} targets for a batch of {batch_size} samples")
    return values


class PropertyReward(Reward):
    """A scorer run on a backend, with a geometry cache, fault isolation and counters.

    Its value is the raw property (e.g. the xTB gap in meV); invalid samples get ``penalty``.
    ``timeout`` (seconds) applies to each call of the scorer (a chunk of ``chunk_size`` molecules;
    failed chunks are retried one molecule at a time). ``cache`` keys: elements + coordinates rounded
    to ``cache_decimals`` Angstrom (+ the target when the scorer uses targets). Valid values and
    invalid verdicts are cached; faults (errors, timeouts, crashes) are retried on the next call.
    """

    def __init__(self, scorer: Scorer, name: str, *, units: str = "", backend: str = "process",
                 workers: int | None = None, timeout: float | None = DEFAULT_TIMEOUT,
                 penalty: float = DEFAULT_PENALTY, cache: bool = True, cache_size: int = 100_000,
                 cache_decimals: int = 4, chunk_size: int | None = None, address: str | None = None) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown reward backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be positive seconds or None, got {timeout}")
        if backend == "inline":
            # The default timeout is for worker backends; one given explicitly (a different object
            # than the default constant) cannot be enforced in this process: refuse it, do not ignore it.
            if timeout is not None and timeout is not DEFAULT_TIMEOUT:
                raise ValueError(INLINE_TIMEOUT_MESSAGE)
            timeout = None
        self.name, self.units, self.penalty = name, units, float(penalty)
        self.scorer = scorer
        self.timeout = timeout
        self.workers = workers or default_workers()
        self.chunk_size = chunk_size
        self._uses_target = bool(getattr(scorer, "uses_target", False))
        self._backend: Backend = make_backend(backend, scorer, self.workers, address)
        self._cache: OrderedDict[str, Outcome] | None = OrderedDict() if cache else None
        self._cache_size, self._cache_decimals = cache_size, cache_decimals
        self._stats = RewardStats()
        self._logged_reasons: set[tuple[str, str]] = set()

    def __call__(self, samples: Any, targets: Any = None) -> RewardResult:
        start = time.perf_counter()
        molecules = as_molecules(samples)
        target_list = targets_as_list(targets, len(molecules))
        scorer_targets = target_list if self._uses_target else [None] * len(molecules)
        outcomes = self._outcomes(molecules, scorer_targets)
        self._record(outcomes, time.perf_counter() - start)
        return self._result(outcomes, target_list)

    def _outcomes(self, molecules: list[Molecule], targets: list[float | None]) -> list[Outcome]:
        """Cached outcomes where available; each distinct new geometry is scored once."""
        keys = [m.key(self._cache_decimals, t) for m, t in zip(molecules, targets, strict=True)]
        known: dict[str, Outcome] = {}
        if self._cache is not None:
            known = {k: self._cache[k] for k in keys if k in self._cache}
        todo = {k: i for i, k in reversed(list(enumerate(keys))) if k not in known}  # first occurrence
        self._stats.cache_hits += len(keys) - len(todo)  # cached, or a duplicate within the batch
        if todo:
            indices = sorted(todo.values())
            fresh = run_isolated(self._backend, [molecules[i] for i in indices],
                                 [targets[i] for i in indices], self._chunk_size(len(indices)), self.timeout,
                                 on_chunk_failure=self._log_chunk_failure)
            self._stats.evaluated += len(indices)
            for i, outcome in zip(indices, fresh, strict=True):
                known[keys[i]] = outcome
                self._remember(keys[i], outcome)
        return [known[k] for k in keys]

    def _chunk_size(self, n: int) -> int:
        if self.chunk_size is not None:
            return self.chunk_size
        if isinstance(self.scorer, BatchFunction):  # let a vectorised user function see big chunks
            return max(1, math.ceil(n / self.workers))
        return 1

    def _remember(self, key: str, outcome: Outcome) -> None:
        if self._cache is None or outcome.kind not in (OK, INVALID):
            return
        self._cache[key] = outcome
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    def _record(self, outcomes: list[Outcome], seconds: float) -> None:
        self._stats.calls += 1
        self._stats.samples += len(outcomes)
        self._stats.seconds += seconds
        for index, outcome in enumerate(outcomes):
            if outcome.kind != OK:
                self._stats.count_failure(outcome.kind)
                self._log_once(index, outcome)

    def _log_once(self, index: int, outcome: Outcome) -> None:
        """Log each distinct failure reason once; repeats are only counted (see :meth:`stats`)."""
        # Reasons differ only in atom indices and numbers ("atom # 5 O, 3, ...") count as one reason.
        event = (outcome.kind, re.sub(r"\d+", "#", outcome.reason or ""))
        first_time = event not in self._logged_reasons and len(self._logged_reasons) < _MAX_LOGGED_REASONS
        self._logged_reasons.add(event)
        level = logging.DEBUG
        if first_time:
            level = logging.INFO if outcome.kind == INVALID else logging.WARNING
        logger.log(level, "reward %s: sample %d marked invalid (%s): %s", self.name, index, outcome.kind,
                   outcome.reason)

    def _log_chunk_failure(self, size: int, failure: TaskFailure) -> None:
        """Log a failed call on several molecules (once per distinct reason) before they are retried singly."""
        event = ("chunk " + failure.kind, re.sub(r"\d+", "#", failure.reason))
        if event in self._logged_reasons or len(self._logged_reasons) >= _MAX_LOGGED_REASONS:
            return
        self._logged_reasons.add(event)
        logger.warning("reward %s: a call on %d molecules failed (%s: %s); scoring them one at a time", self.name,
                       size, failure.kind, failure.reason)

    def _result(self, outcomes: list[Outcome], targets: list[float | None]) -> RewardResult:
        valid = torch.tensor([o.ok for o in outcomes], dtype=torch.bool)
        prop = torch.tensor([o.value if o.ok else math.nan for o in outcomes], dtype=torch.float64)
        values = torch.where(valid, prop, torch.full_like(prop, self.penalty)).float()
        info: dict[str, Any] = {
            "property": prop.float(),
            "units": self.units,
            "failures": dict(Counter(o.kind for o in outcomes if not o.ok)),
            "reasons": [o.reason for o in outcomes],
        }
        if any(t is not None for t in targets):
            info["target"] = torch.tensor([math.nan if t is None else t for t in targets])
        return RewardResult(values, valid, info)

    def stats(self) -> dict[str, float]:
        return self._stats.as_dict()

    def close(self) -> None:
        self._backend.close()

    def __repr__(self) -> str:
        return f"PropertyReward({self.name!r}, units={self.units!r}, penalty={self.penalty})"


class TargetMatch(Reward):
    """r = -|property - target| / scale, for reaching a property value (conditional generation).

    ``target`` is the default; targets passed at call time (a number or one per sample) override it.
    """

    def __init__(self, reward: Reward, target: float | None = None, scale: float = 1.0,
                 penalty: float = DEFAULT_PENALTY) -> None:
        if scale <= 0:
            raise ValueError(f"scale must be positive, got {scale}")
        self.reward, self.target, self.scale, self.penalty = reward, target, float(scale), float(penalty)
        self.name = f"{reward.name}_target"

    def __call__(self, samples: Any, targets: Any = None) -> RewardResult:
        if targets is None and self.target is None:
            raise ValueError(f"reward {self.name} has no default target: pass targets=... when calling it")
        inner = self.reward(samples, targets)
        goal = torch.tensor(targets_as_list(self.target if targets is None else targets, len(inner)))
        prop = inner.info["property"].to(goal.dtype)
        error = (prop - goal).abs()
        values = torch.where(inner.valid, -error / self.scale, torch.full_like(error, self.penalty))
        info = {**inner.info, "target": goal, "abs_error": error}
        return RewardResult(values.float(), inner.valid.clone(), info)

    def stats(self) -> dict[str, float]:
        return self.reward.stats()

    def close(self) -> None:
        self.reward.close()


class WeightedSum(Reward):
    """r = sum_i w_i r_i over ``[(reward, weight), ...]``; a sample is valid if every term is.

    Invalid samples get ``penalty``. ``info[<term name>]`` holds each term's values and property.
    """

    def __init__(self, terms: Sequence[tuple[Reward, float]], penalty: float = DEFAULT_PENALTY) -> None:
        if not terms:
            raise ValueError("a weighted sum needs at least one (reward, weight) term")
        self.terms = [(reward, float(weight)) for reward, weight in terms]
        self.penalty = float(penalty)
        self.name = "+".join(reward.name for reward, _ in self.terms)

    def __call__(self, samples: Any, targets: Any = None) -> RewardResult:
        molecules = as_molecules(samples)  # convert once, not per term
        results = [(reward.name, weight, reward(molecules, targets)) for reward, weight in self.terms]
        valid = torch.stack([r.valid for _, _, r in results]).all(dim=0)
        total = sum(weight * r.values for _, weight, r in results)
        values = torch.where(valid, total, torch.full_like(total, self.penalty))
        info: dict[str, Any] = {name: {"values": r.values, "property": r.info.get("property")}
                                for name, _, r in results}
        return RewardResult(values.float(), valid, info)

    def stats(self) -> dict[str, float]:
        """Each term's counters, keyed ``<term name>/<counter>``."""
        return {f"{reward.name}/{key}": value
                for reward, _ in self.terms for key, value in reward.stats().items()}

    def close(self) -> None:
        for reward, _ in self.terms:
            reward.close()


def reward_from_function(fn: Callable[..., Any], name: str | None = None, *, per_molecule: bool = False,
                         with_targets: bool = False, **options: Any) -> PropertyReward:
    """Make a reward from a plain function: the one-liner for users.

    ``fn(list_of_molecules) -> list[float]`` by default (``fn(molecules, targets)`` with
    ``with_targets=True``); ``per_molecule=True`` for ``fn(molecule) -> float``. Each molecule is a
    :class:`~rgdm.rewards.molecule.Molecule` (``.symbols``, ``.positions`` in Angstrom). ``options``
    are :class:`PropertyReward`'s: backend, workers, timeout, penalty, cache, chunk_size, ...
    For the process backend ``fn`` must be importable (defined at module level, not a lambda).
    """
    scorer: Scorer = (PerMolecule(fn, uses_target=with_targets) if per_molecule
                      else BatchFunction(fn, uses_target=with_targets))
    return PropertyReward(scorer, name or getattr(fn, "__name__", "reward"), **options)
