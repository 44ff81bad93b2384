"""The unit of work a reward backend runs, and scoring a batch so that a fault stays local.

A backend (see :mod:`rgdm.rewards.execution`) runs a list of :class:`Task` (a chunk of molecules)
and returns, per task, either one :class:`~rgdm.rewards.scoring.Outcome` per molecule or a
:class:`TaskFailure` for the whole chunk (the scorer raised, hung past the timeout, or killed its
process). :func:`run_isolated` splits failed chunks into single molecules and retries them, so a
fault spoils exactly the samples that cause it. This module does not import torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from rgdm.rewards.molecule import Molecule
from rgdm.rewards.scoring import ERROR, Outcome, Scorer, describe_exception, failure


@dataclass(frozen=True)
class Task:
    """A chunk of molecules scored in one call; ``indices`` locate them in the caller's batch."""

    indices: tuple[int, ...]
    molecules: tuple[Molecule, ...]
    targets: tuple[float | None, ...]

    def __len__(self) -> int:
        return len(self.indices)

    def singles(self) -> list[Task]:
        parts = zip(self.indices, self.molecules, self.targets, strict=True)
        return [Task((i,), (m,), (t,)) for i, m, t in parts]


@dataclass(frozen=True)
class TaskFailure:
    """The whole chunk failed; ``kind`` is one of error / timeout / crash."""

    kind: str
    reason: str


TaskResult = list[Outcome] | TaskFailure


class Backend(Protocol):
    def run(self, tasks: Sequence[Task], timeout: float | None) -> list[TaskResult]: ...

    def close(self) -> None: ...


def run_isolated(backend: Backend, molecules: Sequence[Molecule], targets: Sequence[float | None],
                 chunk_size: int, timeout: float | None,
                 on_chunk_failure: Callable[[int, TaskFailure], None] | None = None) -> list[Outcome]:
    """Score ``molecules`` in chunks; retry the molecules of failed chunks one at a time.

    ``on_chunk_failure(size, failure)`` hears of each failed chunk before the retry: when every single
    molecule then succeeds, as for a function that returns the wrong number of values for a chunk,
    that is the only trace of the fault.
    """
    tasks = make_tasks(molecules, targets, chunk_size)
    outcomes: list[Outcome | None] = [None] * len(molecules)
    retry: list[Task] = []
    for task, result in zip(tasks, backend.run(tasks, timeout), strict=True):
        if isinstance(result, TaskFailure) and len(task) > 1:
            if on_chunk_failure is not None:
                on_chunk_failure(len(task), result)
            retry.extend(task.singles())
        else:
            _store(outcomes, task, result)
    for task, result in zip(retry, backend.run(retry, timeout) if retry else [], strict=True):
        _store(outcomes, task, result)
    return outcomes  # type: ignore[return-value]  # every index was stored above


def make_tasks(molecules: Sequence[Molecule], targets: Sequence[float | None], chunk_size: int) -> list[Task]:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return [
        Task(tuple(range(start, min(start + chunk_size, len(molecules)))),
             tuple(molecules[start:start + chunk_size]), tuple(targets[start:start + chunk_size]))
        for start in range(0, len(molecules), chunk_size)
    ]


def _store(outcomes: list[Outcome | None], task: Task, result: TaskResult) -> None:
    if isinstance(result, TaskFailure):
        for index in task.indices:
            outcomes[index] = failure(result.kind, result.reason)
        return
    for index, outcome in zip(task.indices, result, strict=True):
        outcomes[index] = outcome


def _evaluate_or_fail(scorer: Scorer, molecules: Sequence[Molecule],
                      targets: Sequence[float | None]) -> TaskResult:
    try:
        return scorer.evaluate(molecules, targets)
    except Exception as error:  # noqa: BLE001 - the chunk failed; the caller retries singles
        return TaskFailure(ERROR, describe_exception(error))
