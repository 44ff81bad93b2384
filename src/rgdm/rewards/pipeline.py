"""Score one batch while the model samples the next: reward calls overlapped with sampling.

A reward with the ``process`` (or ``ray``) backend computes in worker processes; the calling
thread only waits for their answers. :class:`ScoringPipeline` makes that wait useful: each
submitted batch is scored by one background thread, while the caller goes on sampling the next
batch on the model's device. Results are exactly those of scoring every batch right after it is
sampled: the thread makes the reward calls one at a time, in submission order (so caches,
counters and failure logs see the same sequence), and sampling draws from its own generator,
which scoring never touches.

Where it applies: loops that sample several batches from a fixed model and score each one, i.e.
before/after evaluation (``rgdm.eval.compare.sample_scored``, the fine-tuning report). Training
steps cannot overlap this way: each step's loss needs its own batch's rewards, and the next
step's roll-out needs the weights that loss updates (docs/scaling.md).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class ScoringPipeline(Generic[Item, Result]):
    """Run ``score(item)`` for submitted items in one background thread, in submission order.

    ``depth`` bounds how many submitted items may wait unscored (their samples stay in memory):
    ``submit`` blocks until the oldest is done when more would be. ``results()`` waits for all and
    returns them in submission order; an exception raised by ``score`` is raised there (or by the
    ``submit`` that waits for it). Use as a context manager so that the thread always stops.
    """

    def __init__(self, score: Callable[[Item], Result], depth: int = 1):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.score = score
        self.depth = depth
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rgdm-scoring")
        self._pending: deque[Future[Result]] = deque()
        self._done: list[Result] = []

    def submit(self, item: Item) -> None:
        """Queue ``item`` for scoring; returns at once unless ``depth`` items already wait."""
        while len(self._pending) >= self.depth:
            self._done.append(self._pending.popleft().result())
        self._pending.append(self._executor.submit(self.score, item))

    def results(self) -> list[Result]:
        """Every submitted item's result, in submission order (waits for the ones still running)."""
        while self._pending:
            self._done.append(self._pending.popleft().result())
        done, self._done = self._done, []
        return done

    def close(self) -> None:
        """Wait for running calls and stop the thread (results not yet collected are dropped)."""
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._pending.clear()

    def __enter__(self) -> ScoringPipeline[Item, Result]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
