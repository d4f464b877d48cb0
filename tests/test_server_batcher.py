"""MicroBatcher: merging, splitting, failures, cancellation and the bounded queue."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from anglekit.server.batcher import EncodeResult, MicroBatcher, QueueFullError


class FakeModel:
    """Encodes text ``t`` as ``[len(t), ord(t[0])]`` and records every batch it gets."""

    def __init__(self, gate: threading.Event | None = None, fail: bool = False) -> None:
        self.batches: list[list[str]] = []
        self.started = threading.Event()
        self.gate, self.fail = gate, fail

    def __call__(self, texts: list[str]) -> EncodeResult:
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(10)
        self.batches.append(list(texts))
        if self.fail:
            raise RuntimeError("boom")
        rows = [[len(t), ord(t[0])] for t in texts]
        return EncodeResult(np.array(rows, dtype=np.float32), [len(t) for t in texts])


def rows(texts: list[str]) -> list[list[float]]:
    return [[float(len(t)), float(ord(t[0]))] for t in texts]


async def running(batcher: MicroBatcher):
    await batcher.start()
    return batcher


def test_merges_up_to_max_batch_size_and_splits_results():
    """Jobs queued together share passes of at most max_batch_size; each gets its own rows."""
    model = FakeModel()
    jobs = [["aa", "b"], ["ccc", "d"], ["e", "ffff"]]

    async def main():
        batcher = await running(MicroBatcher(model, max_batch_size=4, max_wait_ms=50))
        results = await asyncio.gather(*(batcher.submit(j) for j in jobs))
        await batcher.stop()
        return results

    results = asyncio.run(main())
    assert [len(b) for b in model.batches] == [4, 2]
    for job, result in zip(jobs, results, strict=True):
        assert result.embeddings.tolist() == rows(job)
        assert result.token_counts == [len(t) for t in job]


def test_default_sends_at_once_and_merges_what_queued_while_busy():
    """With no wait (the default), a lone request goes at once; the requests that arrive while
    the model runs it share the next pass."""
    gate = threading.Event()
    model = FakeModel(gate=gate)

    async def main():
        batcher = await running(MicroBatcher(model, max_batch_size=8))
        first = asyncio.ensure_future(batcher.submit(["first"]))
        while not model.started.is_set():
            await asyncio.sleep(0.001)
        later = [asyncio.ensure_future(batcher.submit([t])) for t in ("x", "yy", "zzz")]
        await asyncio.sleep(0.01)
        gate.set()
        results = await asyncio.gather(first, *later)
        await batcher.stop()
        return results

    results = asyncio.run(main())
    assert model.batches == [["first"], ["x", "yy", "zzz"]]
    assert [r.embeddings.tolist() for r in results[1:]] == [rows([t]) for t in ("x", "yy", "zzz")]


def test_big_job_runs_alone_and_merge_off_runs_each_job_alone():
    """A job over max_batch_size is one pass; merge=False never combines jobs."""
    big = FakeModel()
    single = FakeModel()

    async def main():
        batcher = await running(MicroBatcher(big, max_batch_size=2, max_wait_ms=20))
        await asyncio.gather(batcher.submit(["a", "b", "c"]), batcher.submit(["d"]))
        await batcher.stop()
        batcher = await running(MicroBatcher(single, max_wait_ms=20, merge=False))
        await asyncio.gather(*(batcher.submit([t]) for t in "xyz"))
        await batcher.stop()

    asyncio.run(main())
    assert big.batches == [["a", "b", "c"], ["d"]]
    assert single.batches == [["x"], ["y"], ["z"]]


def test_failed_pass_fails_its_jobs_and_the_next_pass_runs():
    """An encode error reaches every request of its batch; the batcher keeps serving."""
    model = FakeModel(fail=True)

    async def main():
        batcher = await running(MicroBatcher(model, max_wait_ms=20))
        outcomes = await asyncio.gather(
            batcher.submit(["a"]), batcher.submit(["b"]), return_exceptions=True
        )
        model.fail = False
        after = await batcher.submit(["c"])
        await batcher.stop()
        return outcomes, after

    outcomes, after = asyncio.run(main())
    assert all(isinstance(o, RuntimeError) and str(o) == "boom" for o in outcomes)
    assert after.embeddings.tolist() == rows(["c"])


def test_cancelled_requests_are_dropped_and_queue_is_bounded():
    """A request cancelled while queued never reaches the model; a full queue refuses more."""
    gate = threading.Event()
    model = FakeModel(gate=gate)

    async def main():
        batcher = await running(MicroBatcher(model, max_wait_ms=0, max_queue=3))
        first = asyncio.ensure_future(batcher.submit(["first"]))
        while not model.started.is_set():
            await asyncio.sleep(0.001)
        gone = asyncio.ensure_future(batcher.submit(["gone", "gone"]))
        kept = asyncio.ensure_future(batcher.submit(["kept"]))
        await asyncio.sleep(0.01)
        assert batcher.queued_texts == 3
        with pytest.raises(QueueFullError, match="limit of 3"):
            await batcher.submit(["more"])
        gone.cancel()
        gate.set()
        await first
        result = await kept
        await batcher.stop()
        return result, batcher.queued_texts

    result, queued = asyncio.run(main())
    assert model.batches == [["first"], ["kept"]]
    assert result.embeddings.tolist() == rows(["kept"]) and queued == 0


def test_submit_needs_a_running_batcher_and_stop_fails_queued_jobs():
    """Before start, submit raises; stop fails what is still queued."""
    gate = threading.Event()
    model = FakeModel(gate=gate)

    async def main():
        batcher = MicroBatcher(model)
        with pytest.raises(RuntimeError, match="not running"):
            await batcher.submit(["a"])
        await batcher.start()
        first = asyncio.ensure_future(batcher.submit(["a"]))
        while not model.started.is_set():
            await asyncio.sleep(0.001)
        queued = asyncio.ensure_future(batcher.submit(["b"]))
        await asyncio.sleep(0.01)
        stopping = asyncio.ensure_future(batcher.stop())
        await asyncio.sleep(0.01)
        gate.set()
        await stopping
        return await asyncio.gather(first, queued, return_exceptions=True)

    outcomes = asyncio.run(main())
    assert all(isinstance(o, (RuntimeError, asyncio.CancelledError)) for o in outcomes)
    assert "shutting down" in str(outcomes[1])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"max_queue": -1}, "max_queue"),
        ({"max_wait_ms": -1}, "max_wait_ms"),
    ],
)
def test_bad_settings_raise(kwargs, message):
    """Non-positive sizes and negative waits are refused, naming the setting."""
    with pytest.raises(ValueError, match=message):
        MicroBatcher(FakeModel(), **kwargs)
