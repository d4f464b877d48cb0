"""Dynamic micro-batching: concurrent requests share forward passes.

Requests arrive on the event loop as lists of texts. The :class:`MicroBatcher` queues them
(up to ``max_queue`` texts waiting), and a collector task takes the oldest ones once
``max_batch_size`` texts are together or the oldest has waited ``max_wait_ms``. The merged
texts go through one ``encode`` call on a single worker thread, so the event loop keeps
answering while the model runs, and each request gets its own rows back. Requests that
queue while the model is busy form the next batch and go as soon as it is free.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

__all__ = ["EncodeResult", "MicroBatcher", "QueueFullError"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncodeResult:
    """Embeddings ``(N, D)`` float32 and the token count of each of the ``N`` texts."""

    embeddings: np.ndarray
    token_counts: list[int]


EncodeFn = Callable[[list[str]], EncodeResult]
BatchObserver = Callable[[int, int], None]


class QueueFullError(RuntimeError):
    """The queue holds too many texts to accept a request now."""


@dataclass
class _Job:
    texts: list[str]
    future: asyncio.Future[EncodeResult] = field(repr=False)
    arrived: float  # event-loop time


class MicroBatcher:
    """Merge concurrent encode requests into shared forward passes.

    Args:
        encode: maps a list of texts to their :class:`EncodeResult`; runs on the worker
            thread, one call at a time.
        max_batch_size: texts merged into one ``encode`` call; a single request with more
            texts runs alone.
        max_wait_ms: how long the first queued request waits for others to join it; 0 sends
            it at once (requests queued while the model was busy still go together).
        max_queue: texts allowed to wait; :meth:`submit` raises :class:`QueueFullError`
            beyond it.
        merge: ``False`` runs every request on its own (one request per forward pass).
        on_batch: called with ``(texts, requests)`` of every ``encode`` call, e.g. to record
            metrics.
    """

    def __init__(
        self,
        encode: EncodeFn,
        *,
        max_batch_size: int = 64,
        max_wait_ms: float = 0.0,
        max_queue: int = 4096,
        merge: bool = True,
        on_batch: BatchObserver | None = None,
    ) -> None:
        for name, value in (("max_batch_size", max_batch_size), ("max_queue", max_queue)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms!r}")
        self.encode = encode
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self.max_queue = max_queue
        self.merge = merge
        self.on_batch = on_batch
        self._jobs: deque[_Job] = deque()
        self._running_jobs: list[_Job] = []
        self._queued_texts = 0
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None

    @property
    def queued_texts(self) -> int:
        """Texts waiting for a forward pass (not counting the one running)."""
        return self._queued_texts

    @property
    def running(self) -> bool:
        """Whether :meth:`start` was called and :meth:`stop` not yet."""
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        """Start the worker thread and the collector task on the running event loop."""
        if self.running:
            return
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="anglekit-model")
        self._task = asyncio.get_running_loop().create_task(self._collect())

    async def stop(self) -> None:
        """Stop collecting; requests still queued or running fail with :class:`RuntimeError`."""
        running = self._running_jobs  # the collector clears it when cancelled
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for job in [*running, *self._jobs]:
            if not job.future.done():
                job.future.set_exception(RuntimeError("the server is shutting down"))
        self._jobs.clear()
        self._running_jobs = []
        self._queued_texts = 0
        if self._executor is not None:
            await asyncio.to_thread(self._executor.shutdown, wait=True)  # the pass running
            self._executor = None

    async def submit(self, texts: Sequence[str]) -> EncodeResult:
        """Queue texts and wait for their embeddings (rows in the order given).

        Raises:
            QueueFullError: when accepting the texts would exceed ``max_queue``.
            RuntimeError: when the batcher is not running.
        """
        if not self.running or self._arrived is None:
            raise RuntimeError("the batcher is not running; call start() first")
        if not texts:
            raise ValueError("submit needs at least one text")
        if self._jobs and self._queued_texts + len(texts) > self.max_queue:
            raise QueueFullError(
                f"{self._queued_texts} texts are queued; {len(texts)} more would exceed "
                f"the limit of {self.max_queue}"
            )
        loop = asyncio.get_running_loop()
        job = _Job(list(texts), loop.create_future(), loop.time())
        self._jobs.append(job)
        self._queued_texts += len(job.texts)
        self._arrived.set()
        return await job.future

    async def _collect(self) -> None:
        assert self._arrived is not None
        loop = asyncio.get_running_loop()
        while True:
            if not self._jobs:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            if self.merge:  # requests that queued while the model was busy go at once
                deadline = self._jobs[0].arrived + self.max_wait
                while self._queued_texts < self.max_batch_size:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    self._arrived.clear()
                    try:
                        await asyncio.wait_for(self._arrived.wait(), remaining)
                    except asyncio.TimeoutError:
                        break
            jobs = self._take()
            if not jobs:  # every queued request was cancelled by its client
                continue
            texts = [text for job in jobs for text in job.texts]
            if self.on_batch is not None:
                self.on_batch(len(texts), len(jobs))
            self._running_jobs = jobs
            try:
                result = await loop.run_in_executor(self._executor, self.encode, texts)
            except Exception as e:  # the requests fail, the server keeps serving
                logger.exception("encode failed for a batch of %d texts", len(texts))
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(e)
                continue
            finally:
                self._running_jobs = []
            start = 0
            for job in jobs:
                end = start + len(job.texts)
                if not job.future.done():
                    job.future.set_result(
                        EncodeResult(result.embeddings[start:end], result.token_counts[start:end])
                    )
                start = end

    def _take(self) -> list[_Job]:
        """Pop the jobs of the next forward pass, oldest first; drop cancelled ones."""
        jobs: list[_Job] = []
        size = 0
        while self._jobs:
            job = self._jobs[0]
            if job.future.done():  # its client went away
                self._jobs.popleft()
                self._queued_texts -= len(job.texts)
                continue
            if jobs and (not self.merge or size + len(job.texts) > self.max_batch_size):
                break
            self._jobs.popleft()
            self._queued_texts -= len(job.texts)
            jobs.append(job)
            size += len(job.texts)
        return jobs
