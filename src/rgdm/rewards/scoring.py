"""Scoring functions and the per-sample outcome of calling them.

A *scorer* turns a list of molecules (and optional per-sample targets) into one
:class:`Outcome` per molecule. Two kinds cover every reward:

* :class:`PerMolecule` wraps ``fn(molecule, **params) -> float`` (xTB, RDKit scores). Each
  molecule is scored on its own, so an exception only spoils that molecule.
* :class:`BatchFunction` wraps a user's ``f(list_of_molecules) -> list[float]``. If the call
  raises, :meth:`BatchFunction.evaluate` raises too, and the executor retries the molecules one
  by one to find the culprit.

Scorers are pickled into worker processes, so this module imports only numpy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from rgdm.rewards.molecule import Molecule

# Kinds of outcome. "invalid" is an expected verdict on the sample (e.g. the bonds do not form a
# molecule, the SCF diverged); the others are faults of the reward or of its execution.
OK, INVALID, ERROR, NONFINITE, TIMEOUT, CRASH = "ok", "invalid", "error", "nonfinite", "timeout", "crash"
FAILURE_KINDS = (INVALID, ERROR, NONFINITE, TIMEOUT, CRASH)
_MAX_REASON = 300


class InvalidSample(Exception):  # noqa: N818 - it is a verdict, not an error of the code
    """Raise from a scoring function when the *sample* cannot be scored (not a bug of the reward)."""


class RewardSetupError(RuntimeError):
    """A reward cannot run at all (bad configuration, missing package, unpicklable function)."""


class Outcome(NamedTuple):
    """The result of scoring one molecule: a finite value when ``kind == "ok"``, else NaN."""

    value: float
    kind: str = OK
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.kind == OK


def failure(kind: str, reason: str) -> Outcome:
    return Outcome(math.nan, kind, reason[:_MAX_REASON])


def describe_exception(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:_MAX_REASON]


def outcome_from_value(value: Any) -> Outcome:
    """Check one returned value: numbers become ``ok``, NaN/inf ``nonfinite``, others ``error``."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return failure(ERROR, f"returned {type(value).__name__} {value!r:.60}, not a number")
    if not math.isfinite(number):
        return failure(NONFINITE, f"returned {number}")
    return Outcome(number)


def outcome_from_call(call: Callable[[], Any]) -> Outcome:
    """Run one scoring call, turning exceptions into failed outcomes."""
    try:
        return outcome_from_value(call())
    except InvalidSample as verdict:
        return failure(INVALID, str(verdict))
    except Exception as error:  # noqa: BLE001 - isolating arbitrary reward code is the point
        return failure(ERROR, describe_exception(error))


class Scorer(Protocol):
    """What executors run: one Outcome per molecule, or an exception for the whole chunk."""

    def evaluate(self, molecules: Sequence[Molecule], targets: Sequence[float | None]) -> list[Outcome]:
        ...

    def warm_up(self) -> None:
        """Pay one-off costs (heavy imports) when a worker starts, not inside a timed call."""


@dataclass(frozen=True)
class PerMolecule:
    """Score each molecule with ``fn(molecule, **params)`` (or ``fn(molecule, target, **params)``)."""

    fn: Callable[..., Any]
    params: dict[str, Any] = field(default_factory=dict)
    uses_target: bool = False
    setup: Callable[[], Any] | None = None

    def evaluate(self, molecules: Sequence[Molecule], targets: Sequence[float | None]) -> list[Outcome]:
        pairs = zip(molecules, targets, strict=True)
        return [outcome_from_call(lambda m=m, t=t: self._score(m, t)) for m, t in pairs]

    def _score(self, molecule: Molecule, target: float | None) -> Any:
        if self.uses_target:
            return self.fn(molecule, target, **self.params)
        return self.fn(molecule, **self.params)

    def warm_up(self) -> None:
        if self.setup is not None:
            self.setup()


@dataclass(frozen=True)
class BatchFunction:
    """Score a chunk at once with ``fn(molecules) -> list[float]`` (or ``fn(molecules, targets)``)."""

    fn: Callable[..., Sequence[Any]]
    uses_target: bool = False

    def evaluate(self, molecules: Sequence[Molecule], targets: Sequence[float | None]) -> list[Outcome]:
        molecules = list(molecules)
        values = self.fn(molecules, list(targets)) if self.uses_target else self.fn(molecules)
        values = list(values)
        if len(values) != len(molecules):
            raise ValueError(f"returned {len(values)} values for {len(molecules)} molecules")
        return [outcome_from_value(v) for v in values]

    def warm_up(self) -> None:
        return None

