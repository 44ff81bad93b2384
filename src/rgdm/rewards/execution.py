"""Where scorers run: in-process, in a pool of worker processes, or on a Ray cluster.

Every backend runs a list of :class:`Task` (a chunk of molecules) and returns, per task, either
one :class:`~rgdm.rewards.scoring.Outcome` per molecule or a :class:`TaskFailure` for the whole
chunk (the scorer raised, hung past the timeout, or killed its process).
:func:`run_isolated` splits failed chunks into single molecules and retries them, so a fault
spoils exactly the samples that cause it.

Worker processes are started with the "spawn" method and ``OMP_NUM_THREADS=1`` already in their
environment: tblite (xTB) and torch ship different OpenMP runtimes that slow each other 10-100x in
one process, so xTB only ever runs in these workers. This module does not import torch.

What lives where: this module holds the backend names, :func:`make_backend` and the inline
backend; the tasks, their failures and :func:`run_isolated` are in :mod:`rgdm.rewards.tasks`; the
process pool and the Ray backend are in :mod:`rgdm.rewards.workers`. Their public names are
importable from here.
"""

from __future__ import annotations

from collections.abc import Sequence

from rgdm.rewards.scoring import Scorer
from rgdm.rewards.tasks import (
    Backend,
    Task,
    TaskFailure,
    TaskResult,
    _evaluate_or_fail,
    make_tasks,
    run_isolated,
)
from rgdm.rewards.workers import (
    BUSY,
    IDLE,
    SINGLE_THREAD_ENV,
    STARTING,
    ProcessPoolBackend,
    RayBackend,
    single_threaded_environment,
)

__all__ = [
    "BACKENDS",
    "BUSY",
    "IDLE",
    "INLINE_TIMEOUT_MESSAGE",
    "SINGLE_THREAD_ENV",
    "STARTING",
    "Backend",
    "InlineBackend",
    "ProcessPoolBackend",
    "RayBackend",
    "Task",
    "TaskFailure",
    "TaskResult",
    "make_backend",
    "make_tasks",
    "run_isolated",
    "single_threaded_environment",
]

INLINE_TIMEOUT_MESSAGE = ("timeout: the inline backend runs the reward in the training process, where nothing "
                          "can stop a call that hangs or exits; use backend 'process' (or 'ray') for a timeout")
BACKENDS = ("process", "ray", "inline")


def make_backend(kind: str, scorer: Scorer, workers: int, address: str | None = None) -> Backend:
    if kind == "inline":
        return InlineBackend(scorer)
    if kind == "process":
        return ProcessPoolBackend(scorer, workers)
    if kind == "ray":
        return RayBackend(scorer, workers, address)
    raise ValueError(f"unknown reward backend {kind!r}; choose one of {', '.join(BACKENDS)}")


# --------------------------------------------------------------------------------------- inline


class InlineBackend:
    """Run in the calling process. Exceptions are isolated; timeouts and crashes cannot be.

    Nothing can stop a function call in the same process from the outside, and a reward that calls
    ``os._exit`` or crashes the interpreter takes the training with it. So this backend refuses a
    timeout instead of ignoring it: rewards that may hang or crash belong in ``process`` or ``ray``.
    """

    def __init__(self, scorer: Scorer) -> None:
        self._scorer = scorer
        self._warm = False

    def run(self, tasks: Sequence[Task], timeout: float | None) -> list[TaskResult]:
        if timeout is not None:
            raise ValueError(INLINE_TIMEOUT_MESSAGE)
        if not self._warm:
            self._scorer.warm_up()
            self._warm = True
        return [_evaluate_or_fail(self._scorer, task.molecules, task.targets) for task in tasks]

    def close(self) -> None:
        return None
