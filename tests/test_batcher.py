"""MicroBatcher: concurrent requests share one model call; answers go back to the right caller."""
from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from nasxserve.serve.batcher import MicroBatcher


class SlowDouble:
    """A stand-in model: doubles its input, records the batch sizes it saw, takes a little time."""

    def __init__(self, delay: float = 0.02, fail_on: float | None = None):
        self.calls: list[int] = []
        self.delay = delay
        self.fail_on = fail_on
        self.lock = threading.Lock()

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        with self.lock:
            self.calls.append(len(x))
        threading.Event().wait(self.delay)
        if self.fail_on is not None and (x == self.fail_on).any():
            raise RuntimeError("model failed")
        return {"y": x * 2, "first": x[:, 0]}


def test_a_lone_request_runs_at_once_and_alone():
    model = SlowDouble(delay=0.0)
    batcher = MicroBatcher(model)
    out = asyncio.run(batcher(np.full((1, 3), 5.0)))
    np.testing.assert_array_equal(out["y"], np.full((1, 3), 10.0))
    assert model.calls == [1]


def test_concurrent_requests_are_merged_and_each_gets_its_own_answer():
    model = SlowDouble()
    sizes = []
    batcher = MicroBatcher(model, max_batch=8, on_batch=sizes.append)

    async def main():
        return await asyncio.gather(*(batcher(np.full((1, 2), float(i))) for i in range(20)))

    outs = asyncio.run(main())
    for i, out in enumerate(outs):
        np.testing.assert_array_equal(out["y"], np.full((1, 2), 2.0 * i))
        assert out["first"].shape == (1,) and out["first"][0] == i
    assert model.calls == [8, 8, 4]          # all 20 were queued before the first call started
    assert sizes == model.calls


def test_multi_image_requests_are_kept_whole():
    model = SlowDouble()
    batcher = MicroBatcher(model, max_batch=4)

    async def main():
        return await asyncio.gather(*(batcher(np.full((3, 1), float(i))) for i in range(5)))

    outs = asyncio.run(main())
    assert [o["y"].shape for o in outs] == [(3, 1)] * 5
    assert all(c % 3 == 0 for c in model.calls)


def test_a_failing_batch_fails_its_requests_and_the_next_batch_still_runs():
    model = SlowDouble(fail_on=3.0)
    batcher = MicroBatcher(model, max_batch=32)

    async def main():
        first = asyncio.gather(*(batcher(np.full((1, 1), float(i))) for i in range(6)), return_exceptions=True)
        results = await first
        after = await batcher(np.full((1, 1), 7.0))
        return results, after

    results, after = asyncio.run(main())
    failed = [r for r in results if isinstance(r, Exception)]
    assert failed and all(isinstance(r, RuntimeError) for r in failed)
    assert after["y"][0, 0] == 14.0
    with pytest.raises(RuntimeError):
        asyncio.run(MicroBatcher(SlowDouble(fail_on=1.0))(np.ones((1, 1))))
