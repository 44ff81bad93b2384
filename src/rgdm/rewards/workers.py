"""Backends that score in other processes: a pool of spawned worker processes, or Ray tasks.

Both give every task a deadline and survive scorers that hang, crash or kill their process: the
task comes back as a :class:`~rgdm.rewards.tasks.TaskFailure` and the worker is replaced (the pool)
or cancelled (Ray). :mod:`rgdm.rewards.execution` chooses between them and the inline backend.

Worker processes are started with the "spawn" method and ``OMP_NUM_THREADS=1`` already in their
environment: tblite (xTB) and torch ship different OpenMP runtimes that slow each other 10-100x in
one process, so xTB only ever runs in these workers. This module does not import torch.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import signal
import time
from collections import deque
from collections.abc import Iterator, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any

from rgdm.rewards.molecule import Molecule
from rgdm.rewards.scoring import CRASH, ERROR, TIMEOUT, RewardSetupError, Scorer, describe_exception
from rgdm.rewards.tasks import Task, TaskFailure, TaskResult, _evaluate_or_fail

SINGLE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


# --------------------------------------------------------------------------------- process pool


@contextlib.contextmanager
def single_threaded_environment() -> Iterator[None]:
    """Temporarily set the thread-count variables, so spawned children inherit them at startup."""
    saved = {name: os.environ.get(name) for name in SINGLE_THREAD_ENV}
    os.environ.update(SINGLE_THREAD_ENV)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _worker_main(conn: Connection, payload: bytes) -> None:
    """Body of a worker process: load the scorer once, then answer tasks until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    try:
        scorer = pickle.loads(payload)
        scorer.warm_up()
    except BaseException as error:  # noqa: BLE001 - reported to the parent as a setup error
        conn.send(("setup-error", describe_exception(error)))
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the parent went away
            return
        if message is None:
            return
        molecules, targets = message
        try:
            conn.send(("result", _evaluate_or_fail(scorer, molecules, targets)))
        except Exception as error:  # noqa: BLE001 - e.g. the result could not be pickled
            reason = f"result could not be sent back: {describe_exception(error)}"
            conn.send(("result", TaskFailure(ERROR, reason)))


STARTING, IDLE, BUSY = "starting", "idle", "busy"


class _Worker:
    """One worker process, its pipe, and the task it is working on."""

    def __init__(self, context: Any, payload: bytes, startup_timeout: float) -> None:
        self.conn, child_conn = context.Pipe()
        with single_threaded_environment():
            self.process = context.Process(target=_worker_main, args=(child_conn, payload), daemon=True)
            self.process.start()
        child_conn.close()
        self.state = STARTING
        self.deadline: float | None = time.monotonic() + startup_timeout
        self.task_index: int | None = None

    def waitables(self) -> list[Any]:
        return [self.conn, self.process.sentinel]

    def assign(self, task_index: int, task: Task, timeout: float | None) -> None:
        self.conn.send((task.molecules, task.targets))
        self.state, self.task_index = BUSY, task_index
        self.deadline = None if timeout is None else time.monotonic() + timeout

    def receive(self) -> Any | None:
        """The next message, or None if the process died (no message will ever come)."""
        try:
            if self.conn.poll():
                return self.conn.recv()
        except (EOFError, OSError):
            return None
        return None

    def stop(self, grace: float = 1.0) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(None)
        self.process.join(grace)
        self.kill()

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5.0)
        self.conn.close()


class ProcessPoolBackend:
    """A pool of spawned worker processes that survives hung, crashing and failing scorers.

    Workers start on the first call and live until :meth:`close`. A worker that passes its
    deadline is killed; a worker that dies is replaced; its task comes back as a TaskFailure.
    """

    def __init__(self, scorer: Scorer, workers: int, startup_timeout: float = 120.0) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self._payload = _pickle_scorer(scorer)
        self._size = workers
        self._startup_timeout = startup_timeout
        self._context = multiprocessing.get_context("spawn")
        self._workers: list[_Worker] = []
        self.restarts = 0

    def run(self, tasks: Sequence[Task], timeout: float | None) -> list[TaskResult]:
        if not self._workers:
            self._workers = [self._spawn() for _ in range(self._size)]
        try:
            return self._dispatch(tasks, timeout)
        except BaseException:
            self.close()  # in-flight replies would be matched to the wrong tasks later
            raise

    def _dispatch(self, tasks: Sequence[Task], timeout: float | None) -> list[TaskResult]:
        results: list[TaskResult | None] = [None] * len(tasks)
        queue = deque(range(len(tasks)))
        while queue or any(w.state == BUSY for w in self._workers):
            self._assign_idle_workers(queue, tasks, timeout)
            self._wait_for_any_event()
            for slot, worker in enumerate(self._workers):
                self._handle_events(slot, worker, results, timeout)
        return results  # type: ignore[return-value]  # the loop ends when every task is answered

    def _assign_idle_workers(self, queue: deque[int], tasks: Sequence[Task], timeout: float | None) -> None:
        for slot, worker in enumerate(self._workers):
            if not queue:
                return
            if worker.state != IDLE:
                continue
            index = queue.popleft()
            try:
                worker.assign(index, tasks[index], timeout)
            except (OSError, ValueError):  # the worker died while idle: replace it, keep the task
                queue.appendleft(index)
                self._replace(slot)

    def _wait_for_any_event(self) -> None:
        active = [w for w in self._workers if w.state != IDLE]
        deadlines = [w.deadline for w in active if w.deadline is not None]
        horizon = None if not deadlines else max(0.0, min(deadlines) - time.monotonic())
        wait([obj for w in active for obj in w.waitables()], timeout=horizon)

    def _handle_events(self, slot: int, worker: _Worker, results: list[TaskResult | None],
                       timeout: float | None) -> None:
        if worker.state == IDLE:
            return
        message = worker.receive()
        expired = worker.deadline is not None and time.monotonic() > worker.deadline
        if message is not None:
            self._handle_message(worker, message, results)
        elif not worker.process.is_alive():
            self._handle_death(slot, worker, results)
        elif expired:
            self._handle_timeout(slot, worker, results, timeout)

    def _handle_message(self, worker: _Worker, message: tuple, results: list[TaskResult | None]) -> None:
        kind = message[0]
        if kind == "setup-error":
            raise RewardSetupError(f"the reward could not start in a worker process: {message[1]}")
        if kind == "result" and worker.task_index is not None:
            results[worker.task_index] = message[1]
        worker.state, worker.task_index, worker.deadline = IDLE, None, None

    def _handle_death(self, slot: int, worker: _Worker, results: list[TaskResult | None]) -> None:
        code = worker.process.exitcode
        if worker.state == STARTING:
            raise RewardSetupError(
                f"a reward worker process died while starting (exit code {code}); workers are spawned and "
                "re-import the main script, so guard its top-level code with `if __name__ == '__main__':`")
        results[worker.task_index] = TaskFailure(CRASH, f"worker process died (exit code {code})")
        self._replace(slot)

    def _handle_timeout(self, slot: int, worker: _Worker, results: list[TaskResult | None],
                        timeout: float | None) -> None:
        if worker.state == STARTING:
            raise RewardSetupError(f"a reward worker did not start within {self._startup_timeout:g} s")
        results[worker.task_index] = TaskFailure(TIMEOUT, f"no result within {timeout:g} s; worker killed")
        self._replace(slot)

    def _spawn(self) -> _Worker:
        return _Worker(self._context, self._payload, self._startup_timeout)

    def _replace(self, slot: int) -> None:
        self._workers[slot].kill()
        self._workers[slot] = self._spawn()
        self.restarts += 1

    def close(self) -> None:
        workers, self._workers = self._workers, []
        for worker in workers:
            worker.stop()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def _pickle_scorer(scorer: Scorer) -> bytes:
    try:
        return pickle.dumps(scorer)
    except Exception as error:  # noqa: BLE001 - turned into one clear message
        raise RewardSetupError(
            f"the reward function cannot be sent to worker processes ({describe_exception(error)}); "
            "define it at module level (not a lambda or a nested function), or use backend='inline'"
        ) from None


# ------------------------------------------------------------------------------------------ ray

_RAY_WARM_SCORERS: set[int] = set()


def _ray_evaluate(scorer: Scorer, molecules: Sequence[Molecule],
                  targets: Sequence[float | None]) -> TaskResult:
    """Body of a Ray task; warm-up runs once per worker process and scorer type."""
    if id(type(scorer)) not in _RAY_WARM_SCORERS:
        scorer.warm_up()
        _RAY_WARM_SCORERS.add(id(type(scorer)))
    return _evaluate_or_fail(scorer, molecules, targets)


class RayBackend:
    """Run chunks as Ray tasks, at most ``workers`` in flight, each with its own deadline.

    Uses the running Ray instance if there is one, else ``ray.init(address)`` (``None`` starts a
    local instance). A task past its deadline is cancelled with ``force=True``, which kills the
    Ray worker running it.
    """

    def __init__(self, scorer: Scorer, workers: int, address: str | None = None) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self._scorer = scorer
        self._size = workers
        self._address = address
        self._ray: Any = None

    def _start(self) -> None:
        """Connect to (or start) Ray on first use: ``ray.init`` is slow and may not be needed."""
        try:
            import ray
        except ImportError:
            raise RewardSetupError("backend 'ray' needs the ray package: pip install 'rgdm[ray]'") from None
        if not ray.is_initialized():
            ray.init(address=self._address, include_dashboard=False)
        self._ray = ray
        self._scorer_ref = ray.put(self._scorer)
        self._remote = ray.remote(_ray_evaluate).options(
            num_cpus=1, max_retries=0, runtime_env={"env_vars": dict(SINGLE_THREAD_ENV)})

    def run(self, tasks: Sequence[Task], timeout: float | None) -> list[TaskResult]:
        if self._ray is None:
            self._start()
        results: list[TaskResult | None] = [None] * len(tasks)
        queue = deque(range(len(tasks)))
        in_flight: dict[Any, tuple[int, float | None]] = {}
        while queue or in_flight:
            while queue and len(in_flight) < self._size:
                index = queue.popleft()
                ref = self._remote.remote(self._scorer_ref, tasks[index].molecules, tasks[index].targets)
                in_flight[ref] = (index, None if timeout is None else time.monotonic() + timeout)
            deadlines = [d for _, d in in_flight.values() if d is not None]
            horizon = None if not deadlines else max(0.0, min(deadlines) - time.monotonic())
            ready, _ = self._ray.wait(list(in_flight), num_returns=1, timeout=horizon)
            for ref in ready:
                index, _ = in_flight.pop(ref)
                results[index] = self._fetch(ref)
            self._cancel_expired(in_flight, results, timeout)
        return results  # type: ignore[return-value]

    def _fetch(self, ref: Any) -> TaskResult:
        exceptions = self._ray.exceptions
        try:
            return self._ray.get(ref)
        except (exceptions.WorkerCrashedError, exceptions.NodeDiedError) as died:
            return TaskFailure(CRASH, f"Ray worker died: {type(died).__name__}")
        except exceptions.RayError as error:
            return TaskFailure(ERROR, describe_exception(error))

    def _cancel_expired(self, in_flight: dict[Any, tuple[int, float | None]],
                        results: list[TaskResult | None], timeout: float | None) -> None:
        now = time.monotonic()
        for ref, (index, deadline) in list(in_flight.items()):
            if deadline is not None and now > deadline:
                self._ray.cancel(ref, force=True)
                del in_flight[ref]
                results[index] = TaskFailure(TIMEOUT, f"no result within {timeout:g} s; Ray task cancelled")

    def close(self) -> None:
        return None  # the Ray instance may be shared with the user's own work: leave it running
